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
Every option is checked against the policy, the task and the arm before anything connects or
moves (`check_options`): a limit above the UR5's own (joint speed pi rad/s, acceleration 40 rad/s^2,
servo rates 125 Hz CB3 / up to 500 Hz e-Series), a non-positive or non-finite value, is refused,
never capped; exit code 1, as for an unreadable checkpoint. Any other error while running is a bug:
the arm is brought to rest and stopped as for a fault, then exit code 5 with the traceback in
summary.json. Every exit writes the true code and reason.
At the end: summary.json, run.npz (every observation, plan and command with timestamps) and plots.
While running, these logs stream to <log-dir>/stream/ (memory stays flat); a run that dies leaves
them there.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback
from collections import deque
from pathlib import Path

import numpy as np
import torch

from . import _C
from .checkpoint import CheckpointError, load_policy
from .envs.ur5_reach import ReachTask, evaluate, frame_origins, observe
from .robot import (CONTROLLER_RATES_HZ, STATE_TIMEOUT_MAX_S, UR5_JOINT_ACCEL_MAX, UR5_JOINT_SPEED_MAX, LimitError,
                    SafetyLimits, UR5Robot, ur5_left_wedged)
from .runlog import StreamLog
from .rtc import CommittedPrefix, DelayEstimator, committed_prefix

# 1: bad input (an option, a checkpoint), refused before anything connects or moves; 5: a bug.
EXIT_OK, EXIT_USAGE, EXIT_ROBOT_FAULT, EXIT_BAD_VALUES, EXIT_PLANNER_STALLED, EXIT_INTERNAL = 0, 1, 2, 3, 4, 5


class SafetyStop(Exception):
    """Raised on the planner side; `code` is the process exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class TimedPlanner:
    """A policy's plan contract (planner.py) on one runtime, timed: obs -> every future row of the
    chunk (H - To + 1, Da), raw float64, with its latencies.

    runtime "cpp" (the default) runs the C++ engine in either mode (one call, GIL released, so the
    servo pump never waits on it); "torch" runs the PyTorch reference.
    """

    def __init__(self, policy, mode: str, runtime: str = "cpp", seed: int = 0, delay_s: float = 0.0,
                 threads: int | None = None):
        self.mode, self.runtime, self.delay_s, self.cfg = mode, runtime, delay_s, policy.cfg
        self.generator = torch.Generator().manual_seed(seed)
        if runtime == "cpp":
            from .runtime.cpu import CpuRuntime
            self.planner = CpuRuntime.planner(policy, threads=threads, guided=mode == "guided")
        else:
            self.planner = policy.planner()
        # The recent latencies for the live status line; every plan's is in the session's plan log.
        self.latencies_ms: deque[float] = deque(maxlen=500)
        self.calls, self.seconds = 0, 0.0

    def __call__(self, obs: dict, prefix: CommittedPrefix | None = None,
                 generator: torch.Generator | None = None) -> np.ndarray:
        """prefix: the committed actions of the executing chunk (real-time chunking), or None.
        generator: this plan's random numbers (default: the planner's own stream)."""
        inpaint = {}
        if prefix is not None and prefix.weights.numel():
            inpaint = {"prefix": prefix.actions.to(torch.float32)[None], "prefix_weight": prefix.weights}
        t0 = time.perf_counter()
        out = self.planner.predict_action(obs, generator or self.generator, mode=self.mode, **inpaint)
        if self.delay_s > 0:   # --simulate-delay: a slower planner, for testing the runtime
            time.sleep(self.delay_s)
        seconds = time.perf_counter() - t0
        self.latencies_ms.append(seconds * 1e3)
        self.calls, self.seconds = self.calls + 1, self.seconds + seconds
        # Every future row of the prediction (from n_obs_steps - 1 on), not only the n_action_steps
        # executed: the rows past them are the soft guidance of the next real-time-chunking plan.
        return out["action_pred"][0, self.cfg.n_obs_steps - 1:].detach().cpu().numpy().astype(np.float64)


class Session:
    """One connected arm, its planner and everything recorded for the run log."""

    def __init__(self, robot: UR5Robot, planner: TimedPlanner, task: ReachTask, args, stream_dir: Path):
        self.robot, self.planner, self.task, self.args = robot, planner, task, args
        cfg = planner.cfg
        self.n_obs, self.dt = cfg.n_obs_steps, task.dt
        self.plan_every = max(1, round(1.0 / (args.plan_hz * task.dt)))
        # Streamed to disk as they come (runlog.py): memory stays flat however long the run.
        self.observations = StreamLog(stream_dir / "observations.bin",
                                      [("t", "f8"), ("episode", "i4"), ("state", "f8", cfg.state_dim)])
        self.plans = StreamLog(stream_dir / "plans.bin", [
            ("t_obs", "f8"), ("t_done", "f8"), ("latency_ms", "f8"), ("accepted", "?"), ("kept", "i4"),
            ("episode", "i4"), ("committed", "i4"), ("disagreement", "f8"),
            ("actions", "f8", (cfg.horizon - cfg.n_obs_steps + 1, cfg.action_dim))])
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
        cfg = self.planner.cfg
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
        history, q_traj = deque(maxlen=self.n_obs), []
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
            self.observations.append(t_obs, index, state)
            if step == steps:
                break
            if step % self.plan_every == 0:
                # Before To observations exist, the first one stands in for the missing ones (as in training).
                window = [history[0]] * (self.n_obs - len(history)) + list(history)
                # Action i of the chunk is the target for t_obs + (i + 1) dt (see envs/ur5_reach.py).
                t_first = t_obs + dt
                prefix = self._committed(t_first)
                try:
                    actions = self.planner(state_obs(window), prefix)
                except (ValueError, FloatingPointError) as err:   # the runtimes' observation/action checks
                    raise SafetyStop(EXIT_BAD_VALUES, f"plan at step {step} refused: {err}") from err
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
        self.plans.append(t_obs, t_done, self.planner.latencies_ms[-1], result.accepted, result.kept, episode,
                          committed, disagreement, actions)

    def _status(self, episode: int, t: float, force: bool = False) -> None:
        now = time.monotonic()
        tty = sys.stderr.isatty()
        if not force and now - self._last_status < (0.5 if tty else 5.0):
            return
        self._last_status = now
        lat = self.planner.latencies_ms or [0.0]
        loop = self.robot.loop.stats
        cmd, state = self.robot.log.commands.last, self.robot.log.states.last
        track = float(np.max(np.abs(cmd["q"] - state["q"]))) * 1e3 if cmd is not None and state is not None else 0.0
        line = (f"ep {episode + 1}/{self.args.episodes} t {t:4.1f} s | plan p50 {np.percentile(lat, 50):5.1f} ms "
                f"p99 {np.percentile(lat, 99):5.1f} ms | {loop['rate_hz']:.0f} Hz period err p99 "
                f"{loop['period_error_p99_us']:.0f} us, late {loop['late_cycles']} | track err {track:.1f} mrad")
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    # ---- the run log ----
    def save(self, out: Path, summary: dict) -> list[str]:
        """run.npz, summary.json and the plots; returns the names of the plots that were written."""
        out.mkdir(parents=True, exist_ok=True)
        log = self.robot.log
        obs, plans, cmds, states = (self.observations.rows(), self.plans.rows(), log.commands.rows(),
                                    log.states.rows())
        np.savez_compressed(
            out / "run.npz",
            obs_t=obs["t"], obs_state=obs["state"], obs_episode=obs["episode"],
            plan_t_obs=plans["t_obs"], plan_t_done=plans["t_done"], plan_latency_ms=plans["latency_ms"],
            plan_accepted=plans["accepted"], plan_kept=plans["kept"], plan_episode=plans["episode"],
            plan_committed=plans["committed"], plan_disagreement_rad=plans["disagreement"],
            plan_actions=plans["actions"],
            cmd_t_slot=cmds["t_slot"], cmd_t_sent=cmds["t_sent"], cmd_q=cmds["q"], cmd_v=cmds["v"],
            state_t=states["t"], state_q=states["q"],
            period_error_hist_us=self.robot.loop.period_error_histogram() if self.robot.loop else np.zeros(0))
        (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))
        written: list[str] = []
        try:
            plot_run(out, self, summary, obs, plans, cmds, states, written)
        except Exception as err:   # a plot must never cost the run log or the exit code
            print(f"serve: plotting stopped after {written}: {type(err).__name__}: {err}", file=sys.stderr)
        del obs, plans, cmds, states    # the maps, before their files go
        for stream in (self.observations, self.plans, log.commands, log.states):
            stream.close(remove=True)   # folded into run.npz; a run that dies keeps them
        return written


def state_obs(window) -> dict[str, torch.Tensor]:
    """The policy's observation from the last To task states: {"state": (1, To, Ds)}."""
    return {"state": torch.from_numpy(np.ascontiguousarray(np.stack(window), dtype=np.float32))[None]}


def json_safe(value):
    """NaN/inf as null (JSON has no NaN: a bare NaN makes summary.json unreadable to strict parsers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def plot_run(out: Path, session: Session, summary: dict, obs, plans, cmds, states, written: list[str]) -> None:
    """The run's plots from its logs; each file's name goes into `written` once it is saved."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name):
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        written.append(name)

    if len(cmds):
        t_ref = cmds["t_slot"][0]
        fig, axes = plt.subplots(6, 1, figsize=(10, 12), sharex=True)
        for j, ax in enumerate(axes):
            ax.plot(cmds["t_slot"] - t_ref, cmds["q"][:, j], lw=1.0, label="commanded")
            if len(states):
                ax.plot(states["t"] - t_ref, states["q"][:, j], lw=1.0, ls="--", label="actual")
            ax.set_ylabel(f"q{j} (rad)")
        axes[0].legend(loc="upper right")
        axes[-1].set_xlabel("time (s)")
        fig.suptitle(f"joint trajectories at {summary['frequency_hz']:.0f} Hz")
        fig.tight_layout()
        save(fig, "joints.png")
    if len(plans):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(plans["latency_ms"], bins=40)
        ax.set(xlabel="plan latency (ms)", ylabel="plans",
               title=f"planning latency ({session.planner.runtime}, {session.planner.mode})")
        save(fig, "plan_latency.png")
    hist = session.robot.loop.period_error_histogram() if session.robot.loop else np.zeros(0)
    if hist.sum():
        top = int(np.flatnonzero(hist)[-1]) + 2
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar(np.arange(top), hist[:top], width=1.0)
        ax.set(xlabel="|period - nominal| (us)", ylabel="cycles", yscale="log",
               title=f"servo loop period error at {summary['frequency_hz']:.0f} Hz")
        save(fig, "loop_period.png")
    if len(obs) and session.episodes:   # tool paths seen from above, with the obstacle
        task = session.task
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.add_patch(plt.Circle(task.obstacle_center[:2], task.obstacle_radius, color="grey", alpha=0.5))
        for i, m in enumerate(session.episodes):
            tcp = frame_origins(np.asarray(obs["state"][obs["episode"] == i, :6], dtype=float))[:, 6]
            line, = ax.plot(tcp[:, 0], tcp[:, 1], lw=1.2)
            ax.plot(*m["goal"][:2], "*", ms=12, color=line.get_color())
        ax.set(aspect="equal", xlabel="x (m)", ylabel="y (m)", title="TCP paths (top view), goals *")
        save(fig, "tcp_paths.png")


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # exit EXIT_USAGE, not argparse's 2: 2 means a robot fault here
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def finite(text: str) -> float:
    """argparse type: a finite float ("nan" and "inf" are floats to Python, never an option value)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m dpag_engine.serve", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="model.pt written by dpag_engine.train")
    ap.add_argument("--robot", choices=("sim", "ur5"), default="sim",
                    help="ur5: a real arm at --host; sim: start the UR controller emulator on loopback")
    ap.add_argument("--host", default=None, help="controller address (required for ur5; 127.0.0.1 for sim)")
    ap.add_argument("--sim-version", default="3.15", help="sim: controller version, 3.x (CB3) or 5.x (e-Series)")
    ap.add_argument("--frequency", type=finite, default=None,
                    help="servo rate in Hz: 125 on a CB3; 125, 250 or 500 on an e-Series (default: the "
                         "controller's own, 125 or 500)")
    ap.add_argument("--plan-hz", type=finite, default=5.0,
                    help="how often to plan a new chunk, at most the policy's rate (10 Hz for the reach task)")
    ap.add_argument("--inference-steps", type=int, default=None,
                    help="DDIM steps, 1 .. the checkpoint's training timesteps (default: the checkpoint's)")
    ap.add_argument("--mode", choices=("dp", "guided"), default="dp", help="sampling mode")
    ap.add_argument("--runtime", choices=("cpp", "torch"), default="cpp",
                    help="what runs each plan: the C++ engine (dpag_engine.runtime.cpu) or the PyTorch reference")
    ap.add_argument("--threads", type=int, default=None,
                    help="planner threads, 1 .. this machine's cores (default: torch's). Small policies plan "
                         "as fast on 1, and a busy core stalls a multi-threaded planner's barriers")
    ap.add_argument("--episodes", type=int, default=3, help=f"goals to reach, 1 .. {MAX_EPISODES}")
    ap.add_argument("--duration", type=finite, default=None,
                    help=f"seconds per episode, up to {MAX_DURATION_S:g} (default: the task's)")
    ap.add_argument("--seed", type=int, default=100_000, help="goal and sampler seed (>= 0)")
    ap.add_argument("--servo", choices=("servoJ", "servoL"), default="servoJ",
                    help="servoJ: joint targets (default); servoL: the same trajectory as tool poses")
    ap.add_argument("--lookahead-time", type=finite, default=0.1, help="servoJ lookahead, 0.03 .. 0.2 s")
    ap.add_argument("--gain", type=finite, default=300.0, help="servoJ gain, 100 .. 2000")
    ap.add_argument("--hold-after", type=finite, default=None,
                    help="execute at most this many seconds of a chunk past its observation, then decelerate; "
                         "at most the chunk's length (default: the policy's n_action_steps * dt)")
    ap.add_argument("--abort-after", type=finite, default=2.0,
                    help=f"stop when no plan was accepted for this long, up to {MAX_ABORT_AFTER_S:g} s")
    ap.add_argument("--v-max", type=finite, default=math.pi / 2,
                    help=f"joint velocity limit (rad/s). Refused above the UR5's own {UR5_JOINT_SPEED_MAX:.2f} rad/s")
    ap.add_argument("--a-max", type=finite, default=10.0,
                    help=f"joint acceleration limit (rad/s^2). Refused above {UR5_JOINT_ACCEL_MAX:g} rad/s^2, "
                         "the bound ur_rtde enforces")
    ap.add_argument("--watchdog-hz", type=finite, default=5.0,
                    help="RTDE watchdog: the controller stops the program if commands arrive slower than this "
                         "(0 < hz <= the servo rate)")
    ap.add_argument("--state-timeout", type=finite, default=SafetyLimits.state_timeout_s,
                    help="stop when the arm's state has not updated for this long: frozen stream, lost link "
                         f"(0 .. {STATE_TIMEOUT_MAX_S:g} s)")
    ap.add_argument("--workspace", type=finite, nargs=6, default=None, metavar=("XLO", "YLO", "ZLO", "XHI", "YHI", "ZHI"),
                    help="TCP box (m, base frame); default the UR5 box of robot.SafetyLimits")
    ap.add_argument("--rtc", action=argparse.BooleanOptionalAction, default=True,
                    help="real-time chunking: inpaint the actions that execute while planning (dpag_engine/rtc.py); "
                         "on by default: it cut jerk and chunk-boundary jumps ~3-10x in bench/RTC.md")
    ap.add_argument("--rtc-soft-steps", type=int, default=4,
                    help="--rtc: also pull this many following actions towards the executing chunk, decaying "
                         "(0 .. the policy's horizon)")
    ap.add_argument("--simulate-delay", type=finite, default=0.0,
                    help=f"add this many ms to every plan (testing), 0 .. {MAX_SIMULATED_DELAY_MS:g}")
    ap.add_argument("--no-rt", action="store_true", help="do not ask for SCHED_FIFO for the servo loop")
    ap.add_argument("--log-dir", default="outputs/serve", help="run log and plots go here")
    return ap


MAX_EPISODES, MAX_DURATION_S, MAX_ABORT_AFTER_S, MAX_SIMULATED_DELAY_MS = 10_000, 3600.0, 60.0, 10_000.0


def check_options(args, cfg, task: ReachTask) -> SafetyLimits:
    """Every option against what the policy, the task and the arm allow, before anything connects
    or moves; returns the safety limits. Raises UsageError naming the first bad option."""
    def need(ok: bool, option: str, why: str) -> None:
        if not ok:
            raise UsageError(f"{option} {getattr(args, option[2:].replace('-', '_'))}: {why}")

    chunk_s = (cfg.horizon - cfg.n_obs_steps + 1) * task.dt
    need(args.robot == "sim" or bool(args.host), "--host", "--robot ur5 needs the controller's address")
    if args.robot == "sim":
        major = parse_major(args.sim_version)
        need(major in (3, 5), "--sim-version", "the emulator is a CB3 (3.x) or an e-Series (5.x)")
        rates = CONTROLLER_RATES_HZ[major]
    else:
        rates = CONTROLLER_RATES_HZ[5]   # the controller's version (read before streaming) narrows it
    need(args.frequency is None or args.frequency in rates, "--frequency",
         f"the controller servos at {' or '.join(f'{r:g}' for r in rates)} Hz")
    need(0 < args.plan_hz <= 1 / task.dt, "--plan-hz", f"must be in (0, {1 / task.dt:g}] Hz (the policy's rate)")
    steps = cfg.scheduler.num_train_timesteps
    need(args.inference_steps is None or 1 <= args.inference_steps <= steps, "--inference-steps",
         f"must be in [1, {steps}] (the checkpoint's training timesteps)")
    need(args.threads is None or 1 <= args.threads <= (os.cpu_count() or 1), "--threads",
         f"must be in [1, {os.cpu_count()}] (this machine's cores)")
    need(1 <= args.episodes <= MAX_EPISODES, "--episodes", f"must be in [1, {MAX_EPISODES}]")
    need(args.duration is None or 0 < args.duration <= MAX_DURATION_S, "--duration",
         f"must be in (0, {MAX_DURATION_S:g}] s")
    need(args.seed >= 0, "--seed", "must be >= 0")
    need(0.03 <= args.lookahead_time <= 0.2, "--lookahead-time", "ur_rtde accepts [0.03, 0.2] s")
    need(100 <= args.gain <= 2000, "--gain", "ur_rtde accepts [100, 2000]")
    need(args.hold_after is None or 0 < args.hold_after <= chunk_s + 1e-9, "--hold-after",
         f"must be in (0, {chunk_s:g}] s (a chunk holds {chunk_s:g} s of actions)")
    need(0 < args.abort_after <= MAX_ABORT_AFTER_S, "--abort-after", f"must be in (0, {MAX_ABORT_AFTER_S:g}] s")
    need(0 < args.watchdog_hz <= (args.frequency or max(rates)), "--watchdog-hz",
         f"must be in (0, {args.frequency or max(rates):g}] Hz (commands are sent at the servo rate)")
    need(0 <= args.rtc_soft_steps <= cfg.horizon, "--rtc-soft-steps", f"must be in [0, {cfg.horizon}] (the horizon)")
    need(0 <= args.simulate_delay <= MAX_SIMULATED_DELAY_MS, "--simulate-delay",
         f"must be in [0, {MAX_SIMULATED_DELAY_MS:g}] ms")
    box = {"workspace_lo": tuple(args.workspace[:3]), "workspace_hi": tuple(args.workspace[3:])} if args.workspace else {}
    try:
        return SafetyLimits(v_max=(args.v_max,) * 6, a_max=(args.a_max,) * 6, state_timeout_s=args.state_timeout, **box)
    except LimitError as err:
        option = {"v_max": "--v-max", "a_max": "--a-max", "state_timeout_s": "--state-timeout"}.get(err.field, f"--{err.field}")
        raise UsageError(f"{option}: {err.reason}") from None


class UsageError(ValueError):
    """An option the policy, the task or the arm does not allow (exit EXIT_USAGE)."""


def parse_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return -1


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:   # --help (0) or an unparsable option (EXIT_USAGE): said on stderr
        return int(done.code or 0)
    try:
        policy = load_policy(args.ckpt)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    task = ReachTask()
    cfg = policy.cfg
    try:
        if (cfg.state_dim, cfg.action_dim) != (9, 6):
            raise UsageError(f"{args.ckpt}: expected a UR5 reach policy (state_dim 9, action_dim 6), "
                             f"got state_dim {cfg.state_dim}, action_dim {cfg.action_dim}")
        limits = check_options(args, cfg, task)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.setswitchinterval(0.001)   # the servo pump waits at most ~1 ms for the GIL
    if args.inference_steps:
        policy.set_inference_steps(args.inference_steps)
    if args.hold_after is None:
        args.hold_after = cfg.n_action_steps * task.dt
    out = Path(args.log_dir)
    stream_dir = out / "stream"
    planner = TimedPlanner(policy, args.mode, args.runtime, args.seed, args.simulate_delay / 1e3, args.threads)
    rng = np.random.default_rng(args.seed)
    goals = [task.sample_goal(rng) for _ in range(args.episodes)]

    host = args.host or "127.0.0.1"
    emulator = None
    if args.robot == "sim":
        from .ursim import EmulatorProcess
        emulator = EmulatorProcess(host, args.sim_version, control_port=0)
    robot = UR5Robot(host, limits, frequency=args.frequency, lookahead_time=args.lookahead_time,
                     gain=args.gain, watchdog_hz=args.watchdog_hz, rt_priority=not args.no_rt,
                     servo=args.servo, log_dir=stream_dir)
    session = Session(robot, planner, task, args, stream_dir)
    code, message, trace = EXIT_OK, "done", None
    try:
        try:
            if emulator is not None:
                emulator.start()
                print(f"serve: {emulator.banner}", file=sys.stderr)
            robot.connect()
        except (ConnectionError, RuntimeError) as err:   # unreachable, refused, or not ready to move
            raise SafetyStop(EXIT_ROBOT_FAULT, f"cannot connect to the controller at {host}: {err}") from err
        print(f"serve: connected to {host} (controller {robot.controller_major}.x), servo {robot.frequency:.0f} Hz, "
              f"plan {args.plan_hz:g} Hz, {args.mode} mode on {planner.runtime}, DDIM-{policy.schedule.num_steps}",
              file=sys.stderr)
        # The first plan pays one-off costs (allocation, caches): pay them before the arm moves, so
        # it is not a late first chunk.
        planner(state_obs([observe(robot.joint_positions(), goals[0])] * cfg.n_obs_steps))
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
    except LimitError as err:   # an option the controller does not allow, found when it told its version
        code, message = EXIT_USAGE, f"--{err.field.replace('_', '-')}: {err.reason}"
    except KeyboardInterrupt:
        code, message = 130, "interrupted"
    except Exception as err:    # a bug: the arm is stopped as for any fault, and it is said so, with the trace
        code, message, trace = EXIT_INTERNAL, f"internal error: {type(err).__name__}: {err}", traceback.format_exc()
    finally:
        # Every exit path: decelerate to rest where the loop still runs (not after a robot fault:
        # the controller has stopped the arm), stop, then write the true outcome.
        if code not in (EXIT_OK, EXIT_ROBOT_FAULT) and robot.running:
            bring_to_rest(robot)
        robot.stop()
        if robot.fault and code == EXIT_OK:
            code, message = EXIT_ROBOT_FAULT, f"robot fault: {robot.fault}"
        summary = summarize(session, code, message)
        if trace:
            summary["traceback"] = trace
            print(trace, file=sys.stderr)
        plots = session.save(out, summary)
        robot.close()
        if emulator is not None:
            emulator.stop()
    print_summary(summary, out, plots)
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
    plans = session.plans.rows()
    lat = plans["latency_ms"] if len(plans) else np.array([math.nan])
    jumps = plans["disagreement"]
    loop = session.robot.loop.stats if session.robot.loop is not None else {}
    eps = session.episodes
    return {
        "exit_code": code, "message": message,
        "episodes": len(eps), "success_rate": float(np.mean([e["success"] for e in eps])) if eps else math.nan,
        "collision_rate": float(np.mean([e["collided"] for e in eps])) if eps else math.nan,
        "mean_jerk": float(np.mean([e["mean_jerk"] for e in eps])) if eps else math.nan,
        "sides": [e["path_side"] for e in eps],
        "plan_ms_p50": float(np.percentile(lat, 50)), "plan_ms_p99": float(np.percentile(lat, 99)),
        "plans": len(plans), "runtime": session.planner.runtime, "mode": session.planner.mode,
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


def print_summary(s: dict, out: Path, plots: list[str]) -> None:
    def num(x, fmt, scale=1.0):   # summary values that may be null (nothing measured)
        return "n/a" if x is None or not math.isfinite(x) else format(x * scale, fmt)

    loop = s["loop"]
    print(f"\n== serve: {s['message']} (exit {s['exit_code']}) ==")
    if s["episodes"]:
        print(f"success {num(s['success_rate'], '.0f', 100)}% of {s['episodes']} episodes, collisions "
              f"{num(s['collision_rate'], '.0f', 100)}%, sides {s['sides']}, mean jerk {num(s['mean_jerk'], '.1f')} rad/s^3")
    if s["plans"]:
        print(f"plan latency p50 {num(s['plan_ms_p50'], '.1f')} ms, p99 {num(s['plan_ms_p99'], '.1f')} ms over "
              f"{s['plans']} plans ({s['mode']} on {s['runtime']}{', RTC' if s['rtc'] else ''}); chunk disagreement "
              f"at takeover {num(s['chunk_disagreement_rad_mean'], '.1f', 1e3)} mrad")
    if loop.get("cycles"):
        print(f"servo loop {s['frequency_hz']:.0f} Hz: {loop['cycles']} cycles, period error p50 "
              f"{loop['period_error_p50_us']:.0f} us, p99 {loop['period_error_p99_us']:.0f} us, max "
              f"{loop['period_error_max_us']:.0f} us, late {loop['late_cycles']}, SCHED_FIFO {loop['rt_granted']}; "
              f"mailbox overwritten {s['mailbox'].get('overwritten')} of {s['mailbox'].get('posted')}")
    print(f"run log: {out / 'run.npz'}, {out / 'summary.json'}"
          + (f"; plots: {', '.join(str(out / p) for p in plots)}" if plots else "; no plots (nothing ran)"))


if __name__ == "__main__":
    exit_code = main()
    if ur5_left_wedged():
        # A ur_rtde client is stuck on a dead connection; its destructor would block or abort the
        # process (losing the exit code). Logs are written and closed: leave without destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    raise SystemExit(exit_code)
