"""Run a trained policy on a UR5: `python -m dpag_engine.serve --ckpt model.pt --robot ur5 --host IP`.

    python -m dpag_engine.serve --ckpt outputs/demo/model.pt                  # --robot sim: the emulator
    python -m dpag_engine.serve --ckpt model.pt --robot ur5 --host 192.168.1.10 --episodes 3

The task is the embedded UR5 reach task (`dpag_engine.envs.ur5_reach`): the policy sees the joint
positions of the last To steps and the goal, and returns joint position targets at 10 Hz. Each
episode the arm is brought to the task's home pose through the same servo path, then the policy
drives it to a goal. `--robot sim` starts the project's UR controller emulator on loopback and
talks to it through the real ur_rtde client, so it exercises exactly the code a real arm gets.

Who runs what (see dpag_engine/robot.py): the C++ loop servos at 125 Hz (CB3) or 500 Hz (e-Series)
with limits, blending and hold; this module's planner samples observations at the policy's rate,
plans every 1/plan_hz seconds and submits each chunk stamped with its observation time (the
scheduler drops what is already past). Safety, every case ending in servoStop + stopScript:
  * robot fault (protective/emergency stop, program stopped, disconnect, frozen stream, a command
    leaving the workspace box): the loop stops within one cycle; exit code 2;
  * NaN/inf in an observation or a plan: nothing more is submitted, the scheduler decelerates the
    arm to rest, then it stops; exit code 3;
  * a plan that misses its deadline: the previous chunk keeps executing; a chunk is only trusted
    for --hold-after seconds, after which the scheduler decelerates to rest; if no plan is accepted
    for --abort-after seconds the run stops; exit code 4.
At the end: summary.json, run.npz (every observation, plan and command with timestamps) and plots.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import _C
from .checkpoint import CheckpointError, load_policy
from .envs.ur5_reach import ReachTask, evaluate, frame_origins, observe
from .robot import SafetyLimits, UR5Robot, ur5_left_wedged
from .rtc import CommittedPrefix, DelayEstimator, committed_prefix

EXIT_OK, EXIT_ROBOT_FAULT, EXIT_BAD_VALUES, EXIT_PLANNER_STALLED = 0, 2, 3, 4


class SafetyStop(Exception):
    """Raised on the planner side; `code` is the process exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class Planner:
    """The policy as `state history (To, Ds) -> joint targets (Na, Da)`, raw units, with its latencies.

    backend "cpp" (the default) runs the C++ engine in either mode (one call, GIL released, so the
    servo pump never waits on it); "torch" runs the PyTorch reference.
    """

    def __init__(self, policy, mode: str, backend: str, seed: int, delay_s: float = 0.0, threads: int | None = None):
        self.policy, self.mode, self.delay_s = policy, mode, delay_s
        self.generator = torch.Generator().manual_seed(seed)
        self.engine = None
        if backend == "cpp":
            from .runtime_cpu import CpuPolicy
            self.engine = CpuPolicy.from_policy(policy, threads=threads, guided=mode == "guided")
        self.backend = backend
        self.latencies_ms: list[float] = []

    def __call__(self, history: np.ndarray, prefix: CommittedPrefix | None = None) -> np.ndarray:
        """prefix: the committed actions of the executing chunk (real-time chunking), or None."""
        obs = {"state": torch.from_numpy(np.ascontiguousarray(history, dtype=np.float32))[None]}
        inpaint = {}
        if prefix is not None and prefix.weights.numel():
            inpaint = {"prefix": prefix.actions.to(torch.float32)[None], "prefix_weight": prefix.weights}
        t0 = time.perf_counter()
        with torch.inference_mode(self.mode == "dp"):   # guided mode needs autograd for its VJP
            if self.engine is not None:
                out = self.engine.step(obs, self.generator, mode=self.mode, **inpaint)
            else:
                out = self.policy.predict_action(obs, self.generator, mode=self.mode, **inpaint)
        if self.delay_s > 0:   # --simulate-delay: a slower planner, for testing the runtime
            time.sleep(self.delay_s)
        self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        # Every future row of the prediction (from n_obs_steps - 1 on), not only the n_action_steps
        # executed: the rows past them are the soft guidance of the next real-time-chunking plan.
        start = self.policy.cfg.n_obs_steps - 1
        return out["action_pred"][0, start:].detach().cpu().numpy().astype(np.float64)


def set_inference_steps(policy, k: int) -> None:
    from .diffusion import NoiseSchedule

    sched = dataclasses.replace(policy.cfg.scheduler, num_inference_steps=k)
    policy.cfg = policy.cfg.replace(scheduler=sched)
    policy.schedule = NoiseSchedule(sched).to(next(policy.parameters()).device)


class Session:
    """One connected arm, its planner and everything recorded for the run log."""

    def __init__(self, robot: UR5Robot, planner: Planner, task: ReachTask, args):
        self.robot, self.planner, self.task, self.args = robot, planner, task, args
        cfg = planner.policy.cfg
        self.n_obs, self.dt = cfg.n_obs_steps, task.dt
        self.plan_every = max(1, round(1.0 / (args.plan_hz * task.dt)))
        self.obs_t, self.obs_state, self.obs_episode = [], [], []
        self.plans = {"t_obs": [], "t_done": [], "latency_ms": [], "accepted": [], "kept": [], "episode": [],
                      "actions": [], "committed": [], "disagreement": []}
        # Real-time chunking: the chunk executing now (all its future rows, time of its row 0, rows
        # submitted) and the delay to plan for.
        self.executing: tuple[np.ndarray, float, int] | None = None
        self.delay = DelayEstimator(initial_s=0.1)
        self.episodes: list[dict] = []
        self._last_status = 0.0

    def _check_robot(self) -> None:
        if not self.robot.running or self.robot.fault:
            raise SafetyStop(EXIT_ROBOT_FAULT, f"robot fault: {self.robot.fault or 'the servo loop stopped'}")

    def _submit(self, actions: np.ndarray, t_first: float):
        """Submit a chunk whose action 0 is due at t_first, trusted for at most --hold-after seconds."""
        keep = max(1, int(math.floor(self.args.hold_after / self.dt + 1e-9)))
        result = self.robot.scheduler.submit(actions[:keep], t_first, self.dt)
        if result.accepted:
            self.executing = (actions, t_first, keep)
        return result

    def _committed(self, t_first: float) -> CommittedPrefix | None:
        """--rtc: the executing chunk's actions due before the new plan can take over (+ soft rows)."""
        if not self.args.rtc or self.executing is None:
            return None
        prev, prev_first, _ = self.executing
        if t_first < prev_first:
            return None
        cfg = self.planner.policy.cfg
        return committed_prefix(torch.from_numpy(prev), prev_first, self.dt, t_first, self.delay.estimate(),
                                soft_steps=self.args.rtc_soft_steps, max_len=cfg.horizon - cfg.n_obs_steps + 1)

    def _disagreement(self, actions: np.ndarray, t_first: float, t_switch: float) -> float:
        """max |new chunk - executing chunk| (rad) at the time the new one takes over: the jump the
        scheduler's blend has to absorb. NaN when they do not overlap there."""
        if self.executing is None:
            return math.nan
        prev, prev_first, keep = self.executing
        prev = prev[:keep]
        grid_prev = prev_first + self.dt * np.arange(len(prev))
        grid_new = t_first + self.dt * np.arange(len(actions))
        if not (grid_prev[0] <= t_switch <= grid_prev[-1] and grid_new[0] <= t_switch <= grid_new[-1]):
            return math.nan
        return float(max(abs(np.interp(t_switch, grid_new, actions[:, j]) - np.interp(t_switch, grid_prev, prev[:, j]))
                         for j in range(actions.shape[1])))

    def move_home(self, q_home: np.ndarray, speed: float = 0.5) -> None:
        """A straight joint-space ramp to home at `speed` rad/s (through the scheduler, so limited)."""
        q = self.robot.joint_positions()
        n = max(2, int(math.ceil(np.max(np.abs(q_home - q)) / (speed * self.dt))) + 1)
        ramp = q + np.linspace(0.0, 1.0, n)[1:, None] * (q_home - q)
        # Repeat the end so the spline's tangent there is zero: the ramp stops at home, no overshoot.
        ramp = np.vstack([ramp, np.repeat(ramp[-1:], 3, axis=0)])
        result = self.robot.scheduler.submit(ramp, _C.monotonic() + self.dt, self.dt)
        if not result.accepted:
            raise RuntimeError(f"home ramp rejected: {result.reason}")
        self.executing = None   # the next plan continues nothing
        deadline = time.monotonic() + n * self.dt + 3.0
        while time.monotonic() < deadline:
            self._check_robot()
            cmd = self.robot.scheduler.commanded()
            if cmd is not None and np.max(np.abs(self.robot.joint_positions() - q_home)) < 2e-3 \
                    and np.max(np.abs(cmd[1])) < 1e-3:
                return
            time.sleep(0.02)
        raise SafetyStop(EXIT_ROBOT_FAULT, "could not reach the home pose (is the arm tracking its commands?)")

    def run_episode(self, index: int, goal: np.ndarray) -> dict:
        """Observe at the policy's rate on an absolute time grid, plan every plan_every samples."""
        args, dt = self.args, self.dt
        steps = int(round(args.duration / dt)) if args.duration else self.task.episode_steps
        history, q_traj = [], []
        t0 = time.monotonic()
        last_accept = t0
        for step in range(steps + 1):
            t_obs = t0 + step * dt
            time.sleep(max(0.0, t_obs - time.monotonic()))
            self._check_robot()
            t_obs = time.monotonic()   # the time the observation was really taken
            q = self.robot.joint_positions()
            state = observe(q, goal)
            if not np.all(np.isfinite(state)):
                raise SafetyStop(EXIT_BAD_VALUES, f"non-finite observation at step {step}: {state.tolist()}")
            history.append(state)
            q_traj.append(q)
            self.obs_t.append(t_obs)
            self.obs_state.append(state)
            self.obs_episode.append(index)
            if step == steps:
                break
            if step % self.plan_every == 0:
                window = [history[0]] * max(0, self.n_obs - len(history)) + history[-self.n_obs:]
                # Action i of the chunk is the target for t_obs + (i + 1) dt (see envs/ur5_reach.py).
                t_first = t_obs + dt
                prefix = self._committed(t_first)
                actions = self.planner(np.stack(window), prefix)
                if not np.all(np.isfinite(actions)):
                    raise SafetyStop(EXIT_BAD_VALUES, f"the policy returned non-finite actions at step {step}")
                now = time.monotonic()
                self.delay.update(now - t_obs)
                jump = self._disagreement(actions, t_first, now + dt)
                result = self._submit(actions, t_first)
                self._record_plan(t_obs, now, actions, result, index, prefix.n_committed if prefix else 0, jump)
                if result.accepted:
                    last_accept = now
                elif now - last_accept > args.abort_after:
                    raise SafetyStop(EXIT_PLANNER_STALLED,
                                     f"no plan accepted for {now - last_accept:.2f} s (--abort-after {args.abort_after})")
            self._status(index, step * dt)
        metrics = evaluate(np.asarray(q_traj), goal, self.task)
        metrics.update(goal=goal.tolist(), steps=steps)
        self.episodes.append(metrics)
        return metrics

    def _record_plan(self, t_obs, t_done, actions, result, episode, committed, disagreement) -> None:
        p = self.plans
        p["committed"].append(committed)
        p["disagreement"].append(disagreement)
        p["t_obs"].append(t_obs)
        p["t_done"].append(t_done)
        p["latency_ms"].append(self.planner.latencies_ms[-1])
        p["accepted"].append(result.accepted)
        p["kept"].append(result.kept)
        p["episode"].append(episode)
        p["actions"].append(actions)

    def _status(self, episode: int, t: float, force: bool = False) -> None:
        now = time.monotonic()
        tty = sys.stderr.isatty()
        if not force and now - self._last_status < (0.5 if tty else 5.0):
            return
        self._last_status = now
        lat = self.planner.latencies_ms or [0.0]
        loop = self.robot.loop.stats
        log = self.robot.log
        track = float(np.max(np.abs(log.q_cmd[-1] - log.q_actual[-1]))) * 1e3 if log.q_actual else 0.0
        line = (f"ep {episode + 1}/{self.args.episodes} t {t:4.1f} s | plan p50 {np.percentile(lat, 50):5.1f} ms "
                f"p99 {np.percentile(lat, 99):5.1f} ms | {loop['rate_hz']:.0f} Hz period err p99 "
                f"{loop['period_error_p99_us']:.0f} us, late {loop['late_cycles']} | track err {track:.1f} mrad")
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    # ---- the run log ----
    def save(self, out: Path, summary: dict) -> None:
        out.mkdir(parents=True, exist_ok=True)
        log, p = self.robot.log, self.plans
        cfg = self.planner.policy.cfg
        n_rows = cfg.horizon - cfg.n_obs_steps + 1
        np.savez_compressed(
            out / "run.npz",
            obs_t=np.asarray(self.obs_t), obs_state=np.asarray(self.obs_state).reshape(-1, self.planner.policy.cfg.state_dim),
            obs_episode=np.asarray(self.obs_episode),
            plan_t_obs=np.asarray(p["t_obs"]), plan_t_done=np.asarray(p["t_done"]),
            plan_latency_ms=np.asarray(p["latency_ms"]), plan_accepted=np.asarray(p["accepted"]),
            plan_kept=np.asarray(p["kept"]), plan_episode=np.asarray(p["episode"]),
            plan_committed=np.asarray(p["committed"]), plan_disagreement_rad=np.asarray(p["disagreement"]),
            plan_actions=np.asarray(p["actions"]).reshape(-1, n_rows, 6),
            cmd_t_slot=np.asarray(log.t_slot), cmd_t_sent=np.asarray(log.t_sent),
            cmd_q=np.asarray(log.q_cmd).reshape(-1, 6), cmd_v=np.asarray(log.v_cmd).reshape(-1, 6),
            state_t=np.asarray(log.t_state), state_q=np.asarray(log.q_actual).reshape(-1, 6),
            period_error_hist_us=self.robot.loop.period_error_histogram() if self.robot.loop else np.zeros(0))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_run(out, self, summary)


def plot_run(out: Path, session: Session, summary: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = session.robot.log
    if log.q_cmd:
        t_c, q_c = np.asarray(log.t_slot), np.asarray(log.q_cmd)
        t_a, q_a = np.asarray(log.t_state), np.asarray(log.q_actual).reshape(-1, 6)
        t_ref = t_c[0]
        fig, axes = plt.subplots(6, 1, figsize=(10, 12), sharex=True)
        for j, ax in enumerate(axes):
            ax.plot(t_c - t_ref, q_c[:, j], lw=1.0, label="commanded")
            if len(t_a):
                ax.plot(t_a - t_ref, q_a[:, j], lw=1.0, ls="--", label="actual")
            ax.set_ylabel(f"q{j} (rad)")
        axes[0].legend(loc="upper right")
        axes[-1].set_xlabel("time (s)")
        fig.suptitle(f"joint trajectories at {summary['frequency_hz']:.0f} Hz")
        fig.tight_layout()
        fig.savefig(out / "joints.png", dpi=90)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(session.planner.latencies_ms, bins=40)
    ax.set(xlabel="plan latency (ms)", ylabel="plans", title=f"planning latency ({session.planner.backend}, {session.planner.mode})")
    fig.savefig(out / "plan_latency.png", dpi=90)
    plt.close(fig)
    hist = session.robot.loop.period_error_histogram() if session.robot.loop else np.zeros(0)
    if hist.sum():
        top = int(np.flatnonzero(hist)[-1]) + 2
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar(np.arange(top), hist[:top], width=1.0)
        ax.set(xlabel="|period - nominal| (us)", ylabel="cycles", yscale="log",
               title=f"servo loop period error at {summary['frequency_hz']:.0f} Hz")
        fig.savefig(out / "loop_period.png", dpi=90)
        plt.close(fig)
    # Tool paths seen from above, with the obstacle.
    obs = np.asarray(session.obs_state).reshape(-1, session.planner.policy.cfg.state_dim)
    if len(obs):
        ep = np.asarray(session.obs_episode)
        task = session.task
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.add_patch(plt.Circle(task.obstacle_center[:2], task.obstacle_radius, color="grey", alpha=0.5))
        for i, m in enumerate(session.episodes):
            tcp = frame_origins(obs[ep == i, :6].astype(float))[:, 6]
            line, = ax.plot(tcp[:, 0], tcp[:, 1], lw=1.2)
            ax.plot(*m["goal"][:2], "*", ms=12, color=line.get_color())
        ax.set(aspect="equal", xlabel="x (m)", ylabel="y (m)", title="TCP paths (top view), goals *")
        fig.savefig(out / "tcp_paths.png", dpi=90)
        plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dpag_engine.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="model.pt written by dpag_engine.train")
    ap.add_argument("--robot", choices=("sim", "ur5"), default="sim",
                    help="ur5: a real arm at --host; sim: start the UR controller emulator on loopback")
    ap.add_argument("--host", default=None, help="controller address (default 127.0.0.1 for sim)")
    ap.add_argument("--sim-version", default="3.15", help="sim: controller version, 3.15 (CB3) or 5.11 (e-Series)")
    ap.add_argument("--frequency", type=float, default=None,
                    help="servo rate in Hz (default: 125 for a CB3, 500 for an e-Series, from the controller)")
    ap.add_argument("--plan-hz", type=float, default=5.0, help="how often to plan a new chunk")
    ap.add_argument("--inference-steps", type=int, default=None, help="DDIM steps (default: the checkpoint's)")
    ap.add_argument("--mode", choices=("dp", "guided"), default="dp", help="sampling mode")
    ap.add_argument("--backend", choices=("cpp", "torch"), default="cpp",
                    help="planner: the C++ engine (dpag_engine.runtime_cpu) or the PyTorch reference")
    ap.add_argument("--threads", type=int, default=None,
                    help="planner threads (default: torch's). Small policies plan as fast on 1, and a busy "
                         "core stalls a multi-threaded planner's barriers")
    ap.add_argument("--episodes", type=int, default=3, help="goals to reach (sampled from the task)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per episode (default: the task's)")
    ap.add_argument("--seed", type=int, default=100_000, help="goal and sampler seed")
    ap.add_argument("--servo", choices=("servoJ", "servoL"), default="servoJ",
                    help="servoJ: joint targets (default); servoL: the same trajectory as tool poses")
    ap.add_argument("--lookahead-time", type=float, default=0.1, help="servoJ lookahead (s)")
    ap.add_argument("--gain", type=float, default=300.0, help="servoJ gain")
    ap.add_argument("--hold-after", type=float, default=None,
                    help="execute at most this many seconds of a chunk past its observation, then decelerate "
                         "(default: the policy's n_action_steps * dt)")
    ap.add_argument("--abort-after", type=float, default=2.0, help="stop when no plan was accepted for this long (s)")
    ap.add_argument("--v-max", type=float, default=math.pi / 2, help="joint velocity limit (rad/s)")
    ap.add_argument("--a-max", type=float, default=10.0, help="joint acceleration limit (rad/s^2)")
    ap.add_argument("--watchdog-hz", type=float, default=5.0,
                    help="RTDE watchdog: the controller stops the program if commands arrive slower than this")
    ap.add_argument("--state-timeout", type=float, default=SafetyLimits.state_timeout_s,
                    help="stop when the arm's state has not updated for this long (s): frozen stream, lost link")
    ap.add_argument("--workspace", type=float, nargs=6, default=None, metavar=("XLO", "YLO", "ZLO", "XHI", "YHI", "ZHI"),
                    help="TCP box (m, base frame); default the UR5 box of robot.SafetyLimits")
    ap.add_argument("--rtc", action=argparse.BooleanOptionalAction, default=True,
                    help="real-time chunking: inpaint the actions that execute while planning (dpag_engine/rtc.py); "
                         "on by default: it cut jerk and chunk-boundary jumps ~3-10x in bench/RTC.md")
    ap.add_argument("--rtc-soft-steps", type=int, default=4,
                    help="--rtc: also pull this many following actions towards the executing chunk, decaying")
    ap.add_argument("--simulate-delay", type=float, default=0.0, help="add this many ms to every plan (testing)")
    ap.add_argument("--no-rt", action="store_true", help="do not ask for SCHED_FIFO for the servo loop")
    ap.add_argument("--log-dir", default="outputs/serve", help="run log and plots go here")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plan_hz <= 0 or args.abort_after <= 0:
        raise SystemExit("--plan-hz and --abort-after must be > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.setswitchinterval(0.001)   # the servo pump waits at most ~1 ms for the GIL
    try:
        policy = load_policy(args.ckpt)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.inference_steps:
        set_inference_steps(policy, args.inference_steps)
    cfg, task = policy.cfg, ReachTask()
    if (cfg.state_dim, cfg.action_dim) != (9, 6):
        raise SystemExit(f"{args.ckpt}: expected a UR5 reach policy (state_dim 9, action_dim 6), "
                         f"got state_dim {cfg.state_dim}, action_dim {cfg.action_dim}")
    if args.hold_after is None:
        args.hold_after = cfg.n_action_steps * task.dt
    limits = SafetyLimits(v_max=(args.v_max,) * 6, a_max=(args.a_max,) * 6, state_timeout_s=args.state_timeout,
                          **({"workspace_lo": tuple(args.workspace[:3]), "workspace_hi": tuple(args.workspace[3:])}
                             if args.workspace else {}))
    planner = Planner(policy, args.mode, args.backend, args.seed, args.simulate_delay / 1e3, args.threads)
    rng = np.random.default_rng(args.seed)
    goals = [task.sample_goal(rng) for _ in range(args.episodes)]

    host = args.host or "127.0.0.1"
    emulator = None
    if args.robot == "sim":
        from .ursim import EmulatorProcess
        emulator = EmulatorProcess(host, args.sim_version, control_port=0)
    robot = UR5Robot(host, limits, frequency=args.frequency, lookahead_time=args.lookahead_time,
                     gain=args.gain, watchdog_hz=args.watchdog_hz, rt_priority=not args.no_rt,
                     servo=args.servo)
    session = Session(robot, planner, task, args)
    code, message = EXIT_OK, "done"
    try:
        if emulator is not None:
            emulator.start()
            print(f"serve: {emulator.banner}", file=sys.stderr)
        robot.connect()
        print(f"serve: connected to {host} (controller {robot.controller_major}.x), servo {robot.frequency:.0f} Hz, "
              f"plan {args.plan_hz:g} Hz, {args.mode} mode on {planner.backend}, DDIM-{policy.schedule.num_steps}",
              file=sys.stderr)
        # The first plan pays one-off costs (allocation, caches): pay them before the arm moves, so
        # it is not a late first chunk.
        if goals:
            planner(np.stack([observe(robot.joint_positions(), goals[0])] * cfg.n_obs_steps))
            planner.latencies_ms.clear()
        # Everything loaded so far (torch, the policy) is long-lived: move it out of the collector's
        # reach, so a full collection never stalls the servo pump on the GIL for 100+ ms.
        gc.collect()
        gc.freeze()
        robot.start()
        for i, goal in enumerate(goals):
            session.move_home(np.asarray(task.q_home))
            m = session.run_episode(i, goal)
            session._status(i, m["steps"] * task.dt, force=True)
            print(f"\nepisode {i + 1}: {'success' if m['success'] else 'failure'}, final error "
                  f"{m['final_error_m'] * 100:.1f} cm, {'collided, ' if m['collided'] else ''}side {m['path_side']}, "
                  f"mean jerk {m['mean_jerk']:.1f} rad/s^3", file=sys.stderr)
    except SafetyStop as stop:
        code, message = stop.code, str(stop)
        if code != EXIT_ROBOT_FAULT and robot.running:
            bring_to_rest(robot)
    except (RuntimeError, OSError) as err:
        if robot.loop is not None:   # not a connection problem: a bug, keep its traceback
            raise
        code, message = EXIT_ROBOT_FAULT, f"cannot connect to the controller at {host}: {err}"
    except KeyboardInterrupt:
        code, message = 130, "interrupted"
    finally:
        robot.stop()
        if robot.fault and code == EXIT_OK:
            code, message = EXIT_ROBOT_FAULT, f"robot fault: {robot.fault}"
        summary = summarize(session, code, message)
        session.save(Path(args.log_dir), summary)
        robot.close()
        if emulator is not None:
            emulator.stop()
    print_summary(summary, Path(args.log_dir))
    return code


def bring_to_rest(robot: UR5Robot, timeout: float = 2.0) -> None:
    """Submit nothing more and let the scheduler's hold decelerate the arm to rest."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and robot.running:
        if robot.scheduler.stats["mode"] != "tracking":
            cmd = robot.scheduler.commanded()
            if cmd is None or np.max(np.abs(cmd[1])) < 1e-4:
                return
        time.sleep(0.01)


def summarize(session: Session, code: int, message: str) -> dict:
    lat = np.asarray(session.planner.latencies_ms or [math.nan])
    jumps = np.asarray(session.plans["disagreement"] or [math.nan], dtype=float)
    loop = session.robot.loop.stats if session.robot.loop is not None else {}
    eps = session.episodes
    return {
        "exit_code": code, "message": message,
        "episodes": len(eps), "success_rate": float(np.mean([e["success"] for e in eps])) if eps else math.nan,
        "collision_rate": float(np.mean([e["collided"] for e in eps])) if eps else math.nan,
        "mean_jerk": float(np.mean([e["mean_jerk"] for e in eps])) if eps else math.nan,
        "sides": [e["path_side"] for e in eps],
        "plan_ms_p50": float(np.percentile(lat, 50)), "plan_ms_p99": float(np.percentile(lat, 99)),
        "plans": len(session.planner.latencies_ms), "backend": session.planner.backend, "mode": session.planner.mode,
        "rtc": bool(session.args.rtc),
        # How far each new chunk was from the executing one where it took over (the blend's job).
        "chunk_disagreement_rad_mean": float(np.nanmean(jumps)) if np.isfinite(jumps).any() else math.nan,
        "frequency_hz": session.robot.frequency or math.nan,
        "loop": {k: loop.get(k) for k in ("cycles", "late_cycles", "period_error_p50_us", "period_error_p99_us",
                                           "period_error_max_us", "rt_granted", "fault")},
        "mailbox": session.robot.sink.stats if session.robot.sink is not None else {},
        "scheduler": dict(session.robot.scheduler.stats) if session.robot.scheduler is not None else {},
        "stop_sequence": [[t, what] for t, what in session.robot.stop_log],   # monotonic s
        "per_episode": eps,
    }


def print_summary(s: dict, out: Path) -> None:
    loop = s["loop"]
    print(f"\n== serve: {s['message']} (exit {s['exit_code']}) ==")
    print(f"success {s['success_rate'] * 100:.0f}% of {s['episodes']} episodes, collisions "
          f"{s['collision_rate'] * 100:.0f}%, sides {s['sides']}, mean jerk {s['mean_jerk']:.1f} rad/s^3")
    print(f"plan latency p50 {s['plan_ms_p50']:.1f} ms, p99 {s['plan_ms_p99']:.1f} ms over {s['plans']} plans "
          f"({s['mode']} on {s['backend']}{', RTC' if s['rtc'] else ''}); chunk disagreement at takeover "
          f"{s['chunk_disagreement_rad_mean'] * 1e3:.1f} mrad")
    if loop.get("cycles"):
        print(f"servo loop {s['frequency_hz']:.0f} Hz: {loop['cycles']} cycles, period error p50 "
              f"{loop['period_error_p50_us']:.0f} us, p99 {loop['period_error_p99_us']:.0f} us, max "
              f"{loop['period_error_max_us']:.0f} us, late {loop['late_cycles']}, SCHED_FIFO {loop['rt_granted']}; "
              f"mailbox overwritten {s['mailbox'].get('overwritten')} of {s['mailbox'].get('posted')}")
    print(f"run log: {out / 'run.npz'}, {out / 'summary.json'}; plots: {out}/{{joints,plan_latency,loop_period,tcp_paths}}.png")


if __name__ == "__main__":
    exit_code = main()
    if ur5_left_wedged():
        # A ur_rtde client is stuck on a dead connection; its destructor would block or abort the
        # process (losing the exit code). Logs are written and closed: leave without destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    raise SystemExit(exit_code)
