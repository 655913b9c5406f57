"""bench/rtc_delay.py: the asynchronous-execution simulator behind bench/RTC.md (fast, no training)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpag_engine.config import PolicyConfig, SchedulerConfig
from dpag_engine.envs.ur5_reach import ReachTask, rollout
from dpag_engine.policy import DPAGPolicy

_PATH = Path(__file__).resolve().parents[1] / "bench" / "rtc_delay.py"
_spec = importlib.util.spec_from_file_location("rtc_delay", _PATH)
rtc_delay = importlib.util.module_from_spec(_spec)
sys.modules["rtc_delay"] = rtc_delay
_spec.loader.exec_module(rtc_delay)


def make_ur5_policy(seed: int = 0) -> DPAGPolicy:
    """An untrained tiny policy with the UR5 reach dims, normaliser fitted around ReachTask().q_home."""
    cfg = PolicyConfig(recipe="tiny", state_dim=9, action_dim=6, n_obs_steps=2, horizon=16, n_action_steps=8,
                       scheduler=SchedulerConfig(num_inference_steps=4))
    torch.manual_seed(seed)
    policy = DPAGPolicy(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    q_home = torch.tensor(ReachTask().q_home, dtype=torch.float32)
    q = q_home + 0.2 * torch.randn(300, 6, generator=g)
    goal = torch.tensor([-0.67, -0.109, 0.24]) + 0.05 * torch.randn(300, 3, generator=g)
    policy.normalizer.fit({"action": q_home + 0.2 * torch.randn(300, 6, generator=g),
                           "state": torch.cat([q, goal], dim=1)})
    return policy


GOAL = np.array([-0.67, -0.10, 0.24])
STEPS = 30


@pytest.mark.parametrize("runtime", ["torch", "cpp"])
def test_zero_delay_matches_plain_receding_horizon(runtime):
    if runtime == "cpp":
        pytest.importorskip("dpag_engine._C")
    policy = make_ur5_policy()
    task = ReachTask()
    replan = 4
    planner = rtc_delay.ChunkPlanner(policy, "dp", runtime)

    # The plain loop: ur5_reach.rollout executing the first `replan` actions of every plan.
    gen = torch.Generator().manual_seed(7)
    chunks = []

    def policy_fn(history):
        chunk = planner({"state": torch.from_numpy(history)[None]}, gen)[:replan]
        chunks.append(chunk)
        return chunk
    q_plain = rollout(policy_fn, task, GOAL, steps=STEPS, n_obs_steps=2)
    plain = np.concatenate(chunks)[:STEPS]

    # RTC off, and RTC on with no soft rows (P = 0 at zero delay: no prefix, the same draws).
    for rtc in (False, True):
        env = rtc_delay.UR5Env(task, GOAL, 2, steps=STEPS)
        sim = rtc_delay.simulate(env, planner, torch.Generator().manual_seed(7), 0, replan, rtc, soft_steps=0)
        np.testing.assert_array_equal(sim.executed, plain)
        np.testing.assert_array_equal(np.asarray(env.traj), q_plain)
        assert sim.plans == len(chunks) and max(sim.committed) == 0
        assert len(sim.pos_jumps) == sim.plans - 1  # every switch but the first (from holding)


class StubPlanner:
    """Chunk n, row i = 100 n + i in every dimension; records the prefixes it was given."""

    class cfg:
        n_action_steps = 8
    candidates = 1

    def __init__(self):
        self.n, self.prefixes, self.references = 0, [], []

    def __call__(self, obs, generator, prefix=None, reference=None):
        self.prefixes.append(prefix)
        self.references.append(reference)
        chunk = 100.0 * self.n + np.arange(8, dtype=float)[:, None] * np.ones((1, 2))
        self.n += 1
        return chunk


class StubEnv:
    def __init__(self, steps):
        self.steps, self.k = steps, 0

    def hold_action(self):
        return np.full(2, -1.0)

    def obs(self):
        return {}

    def step(self, action):
        self.k += 1

    @property
    def done(self):
        return self.k >= self.steps


@pytest.mark.parametrize("rtc", [False, True])
def test_delay_executes_old_chunk_until_the_new_one_arrives(rtc):
    planner = StubPlanner()
    sim = rtc_delay.simulate(StubEnv(14), planner, None, delay_steps=2, replan=4, rtc=rtc, soft_steps=4)
    # Plans at steps 0, 4, 8, 12, each available 2 steps later; before chunk 0 the start is held.
    expected = [-1, -1, 2, 3,     # hold, then chunk 0 from its row 2
                4, 5, 102, 103,   # chunk 0 rows 4, 5 while chunk 1 is computed, then chunk 1 from row 2
                104, 105, 202, 203,
                204, 205]
    np.testing.assert_array_equal(sim.executed[:, 0], expected)
    # Without RTC (a stub ignores the prefix either way) each switch jumps from old(s) to new(s).
    np.testing.assert_allclose(sim.pos_jumps, [np.hypot(96, 96)] * 2)   # 102 - 6, 202 - 106
    if rtc:
        assert planner.prefixes[0] is None
        p = planner.prefixes[1]   # chunk 0's rows 4, 5 committed; 6, 7 soft (all it still has)
        assert p.n_committed == 2
        np.testing.assert_array_equal(p.actions[:, 0].numpy(), [4, 5, 6, 7])
        np.testing.assert_allclose(p.weights.numpy(), [1, 1, 0.8, 0.6])
        assert sim.committed == [0, 2, 2, 2]
    else:
        assert all(p is None for p in planner.prefixes) and sim.committed == [0, 0, 0, 0]


def test_boundary_jump_by_hand():
    old = (np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]), 10)   # rows at steps 10..13
    new = (np.array([[9.0, 9.0], [2.0, 1.0], [4.0, 1.0], [6.0, 1.0]]), 11)   # rows at steps 11..14
    pos, vel = rtc_delay.boundary_jump(old, new, 12, dt=0.1)
    assert pos == pytest.approx(1.0)                                # new(12) - old(12) = (0, 1)
    assert vel == pytest.approx(np.linalg.norm([2.0 - 1.0, 0.0]) / 0.1)   # new vel (2, 0), old vel (1, 0)
    # At its last row (s = 13) the old chunk's velocity is its backward difference (1, 0), not the hold's 0.
    pos, vel = rtc_delay.boundary_jump(old, new, 13, dt=0.1)
    assert pos == pytest.approx(np.hypot(1.0, 1.0))
    assert vel == pytest.approx(10.0)
    # Past its end: position held at old(13) = (3, 0), velocity still the last one.
    pos, vel = rtc_delay.boundary_jump(old, new, 14, dt=0.1)
    assert pos == pytest.approx(np.hypot(3.0, 1.0))
    assert vel == pytest.approx(10.0)


def test_replan_must_exceed_delay():
    with pytest.raises(ValueError, match="delay_steps"):
        rtc_delay.simulate(StubEnv(4), StubPlanner(), None, delay_steps=4, replan=4, rtc=False)


def test_candidates_are_given_the_executing_chunk_on_the_new_grid():
    """--candidates: every plan after the first gets the executing chunk's rows from its own step on."""
    planner = StubPlanner()
    planner.candidates = 4
    rtc_delay.simulate(StubEnv(12), planner, None, delay_steps=1, replan=4, rtc=False)
    assert planner.references[0] is None                      # nothing executes before the first plan
    # Plan 1 at step 4: chunk 0 (row 0 at step 0) executes, rows 4..7; plan 2 at step 8: chunk 1
    # (row 0 at step 4), rows 4..7.
    np.testing.assert_array_equal(planner.references[1][:, 0], [4, 5, 6, 7])
    np.testing.assert_array_equal(planner.references[2][:, 0], [104, 105, 106, 107])


def test_served_goals_are_the_goals_serve_meets():
    """--served-goals S: the bench's episodes are serve --seed S's (its task plug-in's draw), in order."""
    from dpag_engine.tasks import get_task
    served = get_task("ur5_reach")
    rng = np.random.default_rng(123)
    expected = [served.sample_episode(rng)["goal"] for _ in range(5)]
    envs = rtc_delay.make_envs("ur5_reach", make_ur5_policy(), "unused.pt", 5, 0, None, served_goals=123)
    np.testing.assert_allclose([factory().goal for _, factory in envs], expected, rtol=0, atol=0)
    held_out = rtc_delay.make_envs("ur5_reach", make_ur5_policy(), "unused.pt", 5, 0, None)
    assert not np.allclose(held_out[0][1]().goal, expected[0])


def test_rtc_new_chunk_starts_with_the_committed_actions():
    """With RTC and d > 0 the policy's new chunk reproduces the old chunk's committed rows (aligned)."""
    policy = make_ur5_policy()
    inner = rtc_delay.ChunkPlanner(policy, "dp", "torch")
    chunks = []

    def planner(obs, generator, prefix=None, reference=None):
        chunk = inner(obs, generator, prefix, reference)
        chunks.append(chunk)
        return chunk
    planner.cfg, planner.candidates = policy.cfg, 1
    d, replan = 2, 4
    env = rtc_delay.UR5Env(ReachTask(), GOAL, 2, steps=12)
    sim = rtc_delay.simulate(env, planner, torch.Generator().manual_seed(3), d, replan, True, soft_steps=0)
    assert sim.committed == [0, d, d]
    for old, new in zip(chunks, chunks[1:]):
        # New row j is due at the old chunk's row replan + j; rows j < d are committed (sampler clip aside:
        # the old rows came out of the same clipped sampler, so they are inside its range).
        np.testing.assert_allclose(new[:d], old[replan:replan + d], atol=1e-5)
    np.testing.assert_allclose(sim.pos_jumps, [np.linalg.norm(n[d] - o[replan + d]) for o, n in zip(chunks, chunks[1:])])
