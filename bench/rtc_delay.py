"""Real-time chunking (RTC) under simulated inference delay: success, jerk and chunk-boundary jumps.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/rtc_delay.py --ckpt outputs/ur5_6k.pt --task ur5_reach \
        --delays 0 100 200 300 --episodes 20 [--mode dp] [--soft-steps 4] [--replan 4] [--seed 0] \
        [--chunk-rows action|horizon] [--candidates K] [--repeats R] [--served-goals SEED] [--out DIR]

A discrete-time simulation of asynchronous chunk execution at the task's 10 Hz (dt = 0.1 s):

* step k executes action exec[k] (the target for step k + 1, as ur5_reach.py / eval.py: row i of a
  chunk planned from the observation at step t is executed at step t + i);
* every `replan` steps (k = 0, replan, 2 replan, ...) the policy plans from the observation at step k;
  with a delay of d ms the chunk is only available at step k + d_steps (d_steps = d / dt, here
  0/1/2/3); until then the previous chunk keeps executing (past its end, its last action is held; before
  the first chunk, the current position is held);
* without RTC the new chunk's rows 0 .. d_steps - 1 are discarded (they are in the past when it
  arrives) and execution switches to its row d_steps at step k + d_steps;
* with RTC (--rtc on) the planner is given `rtc.committed_prefix` of the executing chunk, exactly as
  `serve --rtc` computes it: the d_steps actions that execute while it plans (weight 1, inpainted
  hard) plus up to --soft-steps following ones with decaying weights, capped at n_action_steps rows
  and at what the executing chunk still has. The switch happens at the same step as without RTC.
  The executing chunk is the plan's n_action_steps rows, as serve submits them (--chunk-rows action);
  --chunk-rows horizon keeps every predicted row from the current step on (H - To + 1 = 15), which
  only matters for how many soft rows RTC gets (with replan 4 and 8 rows, 4 - d_steps at most).

With --candidates K > 1 every plan after the first samples K chunks in one batch and keeps the one
closest to the executing chunk where they overlap (`rtc.most_coherent`, exactly as `serve
--candidates`). --repeats R runs every episode R times with different sampler seeds: a mode switch
that clips the obstacle is a ~1 % event, which 100 episodes cannot resolve.

The replan interval is fixed (default 4 steps, the same for every delay and for RTC on/off): with
n_action_steps = 8 and d_steps <= 3 the executed rows d .. d + 3 always lie inside the 8-action
chunk, so no run ever holds, every delay switches chunks equally often, and differences come from the
delay and RTC only. (replan = n_action_steps - d_steps instead would change the switch rate with d.)
replan must exceed d_steps (one plan in flight at a time).

Metrics per episode (then mean over episodes, same seeds for every delay and RTC on/off):
  * task score - ur5_reach: `evaluate(q_traj, goal)` success and collision; pusht/dynamic_pusht: max
    coverage and success (> 0.95), DP's 300-step episodes that stop at success;
  * jerk - `ur5_reach.mean_jerk` of the executed (commanded) action sequence: mean over steps and
    dimensions of |third difference| / dt^3 (rad/s^3 for joint targets, px/s^3 for Push-T targets);
  * at every chunk-to-chunk switch at step s (the first switch, from holding to chunk 0, is left out):
      pos jump  = || new(s) - old(s) ||                   (L2 over dims; rad or px)
      vel jump  = || v_new(s) - v_old(s) || / dt           (rad/s or px/s)
    where old(.) / new(.) are the old / new chunk's actions for a step (old held past its end) and
    v_c(s) = c(s+1) - c(s), the chunk's own forward difference, or its backward difference c(s) - c(s-1)
    when s is the chunk's last row (so the metric compares the two plans' velocities, and does not
    report the hold of a chunk that ran out as a velocity change). The literal executed-velocity form
    (new(s) - exec(s-1)) - (old(s) - old(s-1)) reduces to new(s) - old(s) because exec(s-1) = old(s-1),
    i.e. to the position jump / dt, so it is not reported separately. Mean and p95 over all switches.

Output: a markdown table on stdout and in DIR/table.md, everything in DIR/results.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dpag_engine.envs.ur5_reach import EVAL_SEED, ReachTask, evaluate, mean_jerk, observe
from dpag_engine.rtc import committed_prefix
from dpag_engine.session import TimedPlanner

DT = 0.1


# ----------------------------------------------------------------------------------------------
# Planners: obs dict + generator + optional prefix -> raw chunk (Na, Da) float64
# ----------------------------------------------------------------------------------------------
class ChunkPlanner:
    """session.TimedPlanner (what serve plans with), keeping `chunk_rows` of each plan as the chunk."""

    def __init__(self, policy, mode: str = "dp", runtime: str = "cpp", chunk_rows: str = "action",
                 candidates: int = 1):
        if chunk_rows not in ("action", "horizon"):
            raise ValueError(f"chunk_rows: 'action' or 'horizon', got {chunk_rows!r}")
        self.timed = TimedPlanner(policy, mode, runtime, threads=1, candidates=candidates)
        self.cfg, self.chunk_rows, self.runtime = policy.cfg, chunk_rows, runtime

    @property
    def calls(self) -> int:
        return self.timed.calls

    @property
    def candidates(self) -> int:
        return self.timed.candidates

    def __call__(self, obs: dict, generator: torch.Generator, prefix=None, reference=None) -> np.ndarray:
        # "action": the n_action_steps rows serve submits; "horizon": every predicted row from the
        # current step on (H - To + 1), so RTC has more of the executing chunk for its soft rows.
        rows = self.timed(obs, prefix, generator, reference)
        return rows[:self.cfg.n_action_steps] if self.chunk_rows == "action" else rows


# ----------------------------------------------------------------------------------------------
# Environments: the same small interface for the UR5 kinematic arm and Push-T
# ----------------------------------------------------------------------------------------------
class UR5Env:
    """ur5_reach.rollout's arm: moves to each target at most max_joint_speed * dt per joint."""

    def __init__(self, task: ReachTask, goal: np.ndarray, n_obs: int, q0: np.ndarray | None = None,
                 steps: int | None = None):
        self.task, self.goal, self.n_obs = task, np.asarray(goal, float), n_obs
        self.q = np.asarray(task.q_home if q0 is None else q0, dtype=float).copy()
        self.steps_total = task.episode_steps if steps is None else steps
        self.max_step = task.max_joint_speed * task.dt
        self.traj = [self.q.copy()]
        self.history = [observe(self.q, self.goal)] * n_obs

    def hold_action(self) -> np.ndarray:
        return self.q.copy()

    def obs(self) -> dict:
        return {"state": torch.from_numpy(np.stack(self.history[-self.n_obs:]))[None]}

    def step(self, action: np.ndarray) -> None:
        self.q = self.q + np.clip(action - self.q, -self.max_step, self.max_step)
        self.traj.append(self.q.copy())
        self.history.append(observe(self.q, self.goal))

    @property
    def done(self) -> bool:
        return len(self.traj) > self.steps_total

    def score(self) -> dict:
        r = evaluate(np.asarray(self.traj), self.goal, self.task)
        return {"success": r["success"], "collided": r["collided"], "final_error_m": r["final_error_m"],
                "path_side": r["path_side"], "q_jerk": r["mean_jerk"]}


class PushTEnv:
    """Push-T / Dynamic Push-T as eval.py runs them (obs from the checkpoint's data mapping)."""

    def __init__(self, name: str, seed: int, n_obs: int, state_keys, cameras, max_steps: int):
        from dpag_engine.envs.dynamic_pusht import make_task
        self.task = make_task(name, render=bool(cameras))
        self.state_keys, self.cameras, self.n_obs, self.max_steps = state_keys, cameras, n_obs, max_steps
        self.history = [self.task.reset(seed)] * n_obs

    def hold_action(self) -> np.ndarray:
        return self.task.agent_pos.astype(float).copy()

    def obs(self) -> dict:
        from dpag_engine.eval import policy_obs
        return policy_obs(self.history[-self.n_obs:], self.state_keys, self.cameras)

    def step(self, action: np.ndarray) -> None:
        self.history.append(self.task.step(action))

    @property
    def done(self) -> bool:
        return self.task.done or self.task.steps >= self.max_steps

    def score(self) -> dict:
        return {"success": bool(self.task.success), "max_coverage": float(self.task.max_coverage),
                "steps": int(self.task.steps)}


# ----------------------------------------------------------------------------------------------
# The simulation
# ----------------------------------------------------------------------------------------------
def _at(chunk: tuple[np.ndarray, int], k: int) -> np.ndarray:
    """The action a chunk (actions, step of row 0) gives for step k; its last one held past its end."""
    actions, first = chunk
    return actions[min(max(k - first, 0), len(actions) - 1)]


def boundary_jump(old: tuple[np.ndarray, int], new: tuple[np.ndarray, int], s: int, dt: float = DT) -> tuple[float, float]:
    """(position jump, velocity jump) when execution switches from chunk `old` to `new` at step s."""
    pos = float(np.linalg.norm(_at(new, s) - _at(old, s)))
    vel = float(np.linalg.norm(_velocity(new, s) - _velocity(old, s))) / dt
    return pos, vel


def _velocity(chunk: tuple[np.ndarray, int], k: int) -> np.ndarray:
    """A chunk's own velocity (per step) at step k: forward difference, backward at (or past) its last row."""
    actions, first = chunk
    if len(actions) < 2:
        return np.zeros_like(actions[0])
    i = min(max(k - first, 0), len(actions) - 2)
    return actions[i + 1] - actions[i]


@dataclass
class SimResult:
    executed: np.ndarray        # (T, Da) the executed (commanded) actions
    pos_jumps: list[float]
    vel_jumps: list[float]
    plans: int
    committed: list[int]        # P per plan (0 without RTC)


def simulate(env, planner, generator: torch.Generator, delay_steps: int, replan: int, rtc: bool,
             soft_steps: int = 4, dt: float = DT) -> SimResult:
    """Run one episode with asynchronous chunk execution (see the module docstring)."""
    if delay_steps < 0 or replan < 1 or replan <= delay_steps:
        raise ValueError(f"need 0 <= delay_steps < replan, got delay_steps={delay_steps}, replan={replan}")
    n_action = planner.cfg.n_action_steps
    hold = env.hold_action()
    current: tuple[np.ndarray, int] | None = None   # executing chunk: (actions, step of its row 0)
    pending: tuple[np.ndarray, int] | None = None   # planned, not yet available
    executed, pos_jumps, vel_jumps, committed = [], [], [], []
    plans, k = 0, 0
    while not env.done:
        if k % replan == 0:
            prefix = None
            if rtc and current is not None:
                # In step units (dt = 1): row j of the executing chunk is due at step current[1] + j.
                prefix = committed_prefix(torch.from_numpy(current[0]), float(current[1]), 1.0, float(k),
                                          float(delay_steps), soft_steps=soft_steps, max_len=n_action)
            committed.append(prefix.n_committed if prefix is not None else 0)
            reference = None
            if planner.candidates > 1 and current is not None:   # as serve: the executing chunk on the new grid
                reference = committed_prefix(torch.from_numpy(current[0]), float(current[1]), 1.0, float(k), 0.0,
                                             soft_steps=len(current[0])).actions.numpy()
            pending = (planner(env.obs(), generator, prefix, reference), k)
            plans += 1
        if pending is not None and k == pending[1] + delay_steps:   # the plan arrives: switch now
            if current is not None:
                pos, vel = boundary_jump(current, pending, k, dt)
                pos_jumps.append(pos)
                vel_jumps.append(vel)
            current, pending = pending, None
        action = _at(current, k) if current is not None else hold
        executed.append(action)
        env.step(action)
        k += 1
    return SimResult(np.asarray(executed), pos_jumps, vel_jumps, plans, committed)


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------
def make_envs(task: str, policy, ckpt: str, episodes: int, seed: int, max_steps: int | None,
              served_goals: int | None = None):
    """(label, factory) per episode; every factory builds a fresh env for the same episode.
    served_goals: draw the reach goals as `serve --seed served_goals` does (one stream, in order)."""
    n_obs = policy.cfg.n_obs_steps
    if task == "ur5_reach":
        reach = ReachTask()
        served = None if served_goals is None else np.random.default_rng(served_goals)
        out = []
        for i in range(episodes):
            goal = reach.sample_goal(served if served is not None else np.random.default_rng([EVAL_SEED + seed, i]))
            out.append((f"goal{i}", lambda goal=goal: UR5Env(reach, goal, n_obs, steps=max_steps)))
        return out
    from dpag_engine.envs.pusht import MAX_STEPS, TEST_START_SEED
    from dpag_engine.eval import observation_mapping
    state_keys, cameras = observation_mapping(ckpt)
    return [(f"seed{TEST_START_SEED + seed + i}",
             lambda s=TEST_START_SEED + seed + i: PushTEnv(task, s, n_obs, state_keys, cameras, max_steps or MAX_STEPS))
            for i in range(episodes)]


def _p95(x: list[float]) -> float:
    return float(np.percentile(x, 95)) if x else math.nan


def run(args) -> dict:
    from dpag_engine.checkpoint import load_policy
    torch.set_num_threads(1)
    policy = load_policy(args.ckpt).eval()
    planner = ChunkPlanner(policy, args.mode, args.runtime, args.chunk_rows, args.candidates)
    envs = make_envs(args.task, policy, args.ckpt, args.episodes, args.seed, args.max_steps, args.served_goals)
    rows = []
    for delay_ms in args.delays:
        d = int(round(delay_ms / 1000.0 / DT))
        for rtc in (False, True):
            t0, calls0 = time.perf_counter(), planner.calls
            episodes = []
            for (i, (label, factory)), r in itertools.product(enumerate(envs), range(args.repeats)):
                env = factory()
                # The same per episode and repeat for every row; repeat 0 is the seed the tables before
                # --repeats used.
                gen = torch.Generator().manual_seed(args.seed * 1_000_003 + i + r * 2**32)
                sim = simulate(env, planner, gen, d, args.replan, rtc, args.soft_steps)
                ep = {"episode": label, "repeat": r, **env.score(), "jerk": mean_jerk(sim.executed, DT),
                      "pos_jumps": sim.pos_jumps, "vel_jumps": sim.vel_jumps, "plans": sim.plans,
                      "committed_max": max(sim.committed)}
                episodes.append(ep)
            pos = [j for e in episodes for j in e["pos_jumps"]]
            vel = [j for e in episodes for j in e["vel_jumps"]]
            row = {"task": args.task, "delay_ms": delay_ms, "delay_steps": d, "rtc": rtc,
                   "episodes": len(episodes), "success_rate": float(np.mean([e["success"] for e in episodes])),
                   "jerk_mean": float(np.mean([e["jerk"] for e in episodes])),
                   "pos_jump_mean": float(np.mean(pos)) if pos else math.nan, "pos_jump_p95": _p95(pos),
                   "vel_jump_mean": float(np.mean(vel)) if vel else math.nan, "vel_jump_p95": _p95(vel),
                   "switches": len(pos), "seconds": round(time.perf_counter() - t0, 1),
                   "plans": planner.calls - calls0}
            if args.task == "ur5_reach":
                row["collision_rate"] = float(np.mean([e["collided"] for e in episodes]))
                row["final_error_cm"] = float(np.mean([e["final_error_m"] for e in episodes]) * 100)
            else:
                row["coverage_mean"] = float(np.mean([e["max_coverage"] for e in episodes]))
            row["per_episode"] = episodes
            rows.append(row)
            print(format_row(row), flush=True)
    return {"ckpt": args.ckpt, "task": args.task, "mode": args.mode, "runtime": planner.runtime,
            "replan": args.replan, "soft_steps": args.soft_steps, "candidates": args.candidates,
            "repeats": args.repeats, "chunk_rows": args.chunk_rows, "seed": args.seed,
            "served_goals": args.served_goals, "dt": DT,
            "n_action_steps": policy.cfg.n_action_steps, "rows": rows, "command": " ".join(sys.argv)}


HEADER = ("| task | delay ms | RTC | success | collisions / coverage | jerk | pos jump mean / p95 "
          "| vel jump mean / p95 | N |\n|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    ur5 = r["task"] == "ur5_reach"
    unit, vunit, junit = ("rad", "rad/s", "rad/s^3") if ur5 else ("px", "px/s", "px/s^3")
    other = f"coll. {r['collision_rate']:.1%}" if ur5 else f"cov. {r['coverage_mean']:.3f}"
    return (f"| {r['task']} | {r['delay_ms']} | {'on' if r['rtc'] else 'off'} | {r['success_rate']:.0%} | {other} "
            f"| {r['jerk_mean']:.1f} {junit} | {r['pos_jump_mean']:.3f} / {r['pos_jump_p95']:.3f} {unit} "
            f"| {r['vel_jump_mean']:.2f} / {r['vel_jump_p95']:.2f} {vunit} | {r['episodes']} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="model.pt")
    p.add_argument("--task", default="ur5_reach", choices=["ur5_reach", "pusht", "dynamic_pusht"])
    p.add_argument("--delays", type=int, nargs="+", default=[0, 100, 200, 300], help="inference delays, ms")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--mode", default="dp", choices=["dp", "guided"])
    p.add_argument("--runtime", default="cpp", choices=["cpp", "torch"],
                   help="cpp: the C++ engine (as serve), torch: the PyTorch reference")
    p.add_argument("--soft-steps", type=int, default=4, help="RTC soft rows (serve --rtc-soft-steps default)")
    p.add_argument("--replan", type=int, default=4, help="plan every this many steps (fixed for all delays)")
    p.add_argument("--candidates", type=int, default=1,
                   help="chunks sampled per plan, the one closest to the executing chunk kept (serve --candidates)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every episode this many times with different sampler seeds (rare events need many)")
    p.add_argument("--chunk-rows", default="action", choices=["action", "horizon"],
                   help="rows of a plan kept as the executing chunk: the n_action_steps ones (as serve) or all "
                        "H - To + 1 from the current step (more rows for RTC's soft prefix)")
    p.add_argument("--seed", type=int, default=0, help="offset of the held-out goals / test seeds, and sampler seeds")
    p.add_argument("--served-goals", type=int, metavar="SEED",
                   help="ur5_reach: the goals `serve --seed SEED` meets, in its order (the demo's: 100000)")
    p.add_argument("--max-steps", type=int, help="episode length cap (default: the task's)")
    p.add_argument("--out", help="output directory (default outputs/rtc_delay/<task>)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.episodes < 1:
        p.error("--episodes and --repeats: at least 1")
    if args.served_goals is not None and args.task != "ur5_reach":
        p.error("--served-goals: ur5_reach only (Push-T episodes are test seeds)")
    out = Path(args.out or f"outputs/rtc_delay/{args.task}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(HEADER, flush=True)
    results = run(args)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(HEADER + "\n" + "\n".join(format_row(r) for r in results["rows"]) + "\n")
    print(f"{results['seconds']} s -> {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
