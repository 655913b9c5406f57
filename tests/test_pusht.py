"""Push-T environment, coverage metric, Dynamic Push-T, scripted expert and the demo writer."""
import numpy as np
import pytest

pytest.importorskip("gym_pusht")

from dpag_engine.data import DataConfig, load_datasets, read_replay_buffer  # noqa: E402
from dpag_engine.envs import GOAL_POSE, DynamicPushT, PushT, coverage, keypoints  # noqa: E402
from dpag_engine.envs.expert import PushTExpert, kp_cost, run_expert_episode  # noqa: E402
from dpag_engine.envs.generate import main as generate_main  # noqa: E402


def test_coverage_known_poses():
    assert coverage(GOAL_POSE) == pytest.approx(1.0)
    assert coverage(GOAL_POSE + [300.0, 0.0, 0.0]) == 0.0  # far away: no overlap
    # Slide the goal T along its own bar axis by 30 px: the bar (120 x 30) keeps 90 x 30 of its
    # overlap and the stem (30 x 90) none of its own; the shifted stem lies under the bar's 30 px.
    axis = np.array([np.cos(GOAL_POSE[2]), np.sin(GOAL_POSE[2])])
    shifted = np.r_[GOAL_POSE[:2] + 30 * axis, GOAL_POSE[2]]
    assert coverage(shifted) == pytest.approx((90 * 30) / (120 * 30 + 30 * 90), abs=1e-9)


def test_score_is_gym_pushts_max_reward():
    """DP's score, checked against the reward gym-pusht's own step returns (clip(coverage / 0.95, 0, 1)):
    an expert episode that succeeds (score 1, raw coverage above 0.95) and a random one that does not."""
    seed = int(np.random.default_rng().integers(0, 10_000))
    for policy in ("expert", "random"):
        task, rewards = PushT(), []
        step = task.env.step
        task.env.step = lambda a: (out := step(a), rewards.append(out[1]))[0]
        task.reset(seed)
        expert, rng = PushTExpert(seed), np.random.default_rng(seed)
        while not task.done and task.steps < (300 if policy == "expert" else 40):
            task.step(expert.act(task) if policy == "expert" else rng.uniform(50, 450, size=2))
        assert task.score == pytest.approx(max(rewards), abs=1e-6)
        assert task.score == pytest.approx(min(1.0, task.max_coverage / 0.95))
    assert task.score < 1.0 and not task.success   # 40 random steps do not solve Push-T


def test_keypoints_match_gym_pusht_vertices():
    task = PushT()
    task.reset(5)
    ours = keypoints(task.block_pose)
    theirs = task.env.get_keypoints(task.env._block_shapes)  # the 8 corners of its two rectangles
    assert np.allclose(np.sort(ours[:8].round(6), axis=0), np.sort(theirs.round(6), axis=0), atol=1e-5)
    assert kp_cost(GOAL_POSE) == pytest.approx(0.0, abs=1e-9)


def test_reset_and_step_are_deterministic():
    def run(seed):
        task = PushT()
        obs = [task.reset(seed)]
        rng = np.random.default_rng(0)
        for _ in range(15):
            obs.append(task.step(rng.uniform(50, 450, size=2)))
        return obs
    a, b, c = run(3), run(3), run(4)
    for x, y in zip(a, b):
        assert all(np.array_equal(x[k], y[k]) for k in x)
    assert not np.array_equal(a[0]["state"], c[0]["state"])
    assert a[0]["keypoint"].shape == (9, 2) and a[0]["state"].shape == (5,)


def test_images_and_state_roundtrip():
    task = PushT(render=True)
    obs = task.reset(1)
    assert obs["img"].shape == (96, 96, 3) and obs["img"].dtype == np.uint8
    saved = task.get_state()
    task.step([100.0, 100.0])
    task.set_state(saved)
    assert np.allclose(task.block_pose, saved["block"][:3])


def test_dynamic_ball_keeps_speed_and_is_seeded():
    task = DynamicPushT()
    first = task.reset(11)["ball"]
    assert np.array_equal(first, DynamicPushT().reset(11)["ball"])
    for _ in range(40):
        obs = task.step(task.agent_pos)
    assert np.linalg.norm(obs["ball"][2:]) == pytest.approx(60.0, rel=1e-3)
    assert np.all((obs["ball"][:2] > 0) & (obs["ball"][:2] < 512))  # bounced, not escaped


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 3])
def test_expert_reaches_goal(seed):
    task = PushT()
    episode = run_expert_episode(task, seed)
    assert task.success and task.max_coverage > 0.95
    assert len(episode["action"]) == task.steps


def test_expert_makes_progress_quickly():
    task = PushT()
    task.reset(2)
    expert, start = PushTExpert(2), kp_cost(task.block_pose)
    for _ in range(60):
        task.step(expert.act(task))
    assert kp_cost(task.block_pose) < 0.7 * start


def test_generate_writes_readable_zarr(tmp_path):
    out = tmp_path / "demo.zarr"
    assert generate_main(["--out", str(out), "--episodes", "2", "--seed", "2", "--keep-failed", "--image"]) == 0
    buf = read_replay_buffer(out)
    assert set(buf.data) == {"action", "state", "keypoint", "img"} and buf.n_episodes == 2
    assert buf.data["keypoint"].shape[1:] == (9, 2) and buf.data["img"].shape[1:] == (96, 96, 3)
    cfg = DataConfig(path=str(out), state_keys=["keypoint", "state[:2]"], val_ratio=0.0)
    train, _ = load_datasets(cfg, n_obs_steps=2, horizon=16, n_action_steps=8)
    assert train.state_dim == 20 and train.action_dim == 2


def test_a_killed_generate_leaves_no_dataset(tmp_path, monkeypatch):
    """Half a dataset must not pass for a whole one (bench/compare.py reuses an existing --out)."""
    import dpag_engine.envs.generate as generate
    out, calls, real = tmp_path / "demo.zarr", [], generate._episode

    def dies_on_the_second(job):
        calls.append(job)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(job)
    monkeypatch.setattr(generate, "_episode", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        generate_main(["--out", str(out), "--episodes", "3", "--seed", "2", "--keep-failed"])
    assert not out.exists()
    monkeypatch.setattr(generate, "_episode", real)
    assert generate_main(["--out", str(out), "--episodes", "2", "--seed", "2", "--keep-failed"]) == 0
    assert read_replay_buffer(out).n_episodes == 2 and not (tmp_path / ".partial-demo.zarr").exists()
    with pytest.raises(SystemExit):   # checked before any episode runs
        generate_main(["--out", str(out), "--episodes", "2"])
