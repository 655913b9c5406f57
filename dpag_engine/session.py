"""One serving session on a connected arm: the timed planner, episodes on an absolute time grid,
safety stops, and the run log (streamed while running, then run.npz, summary.json and plots).

`python -m dpag_engine.serve` (serve.py) checks the options, connects and runs a Session; everything
here runs with the arm already connected and servoing.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from .cameras import CameraFault
from .kinematics import frame_origins
from .rig import Rig, SensorFault
from .runlog import StreamLog
from .rtc import CommittedPrefix, DelayEstimator, committed_prefix, most_coherent
from .runtime import policy_planner
from .spec_io import ActionDecoder, ObservationBuilder, Snapshot
from .tasks import Task, Trace

# 1: bad input (an option, a checkpoint, a robot config), refused before anything connects or moves;
# 5: a bug; 6: a camera or the gripper stopped delivering.
EXIT_OK, EXIT_USAGE, EXIT_ROBOT_FAULT, EXIT_BAD_VALUES, EXIT_PLANNER_STALLED, EXIT_INTERNAL, EXIT_SENSOR_FAULT = \
    0, 1, 2, 3, 4, 5, 6


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
                 threads: int | None = None, candidates: int = 1):
        self.mode, self.runtime, self.delay_s, self.cfg = mode, runtime, delay_s, policy.cfg
        self.generator = torch.Generator().manual_seed(seed)
        self.planner = policy_planner(policy, runtime, mode, threads)
        max_batch = getattr(self.planner, "max_batch", None)
        if candidates < 1 or (max_batch is not None and candidates > max_batch):
            raise ValueError(f"candidates: must be in [1, {max_batch or 'any'}] (one batch of the {runtime} runtime), "
                             f"got {candidates}")
        self.candidates = candidates
        # The recent latencies for the live status line; every plan's is in the session's plan log.
        self.latencies_ms: deque[float] = deque(maxlen=500)
        self.calls, self.seconds = 0, 0.0

    def __call__(self, obs: dict, prefix: CommittedPrefix | None = None,
                 generator: torch.Generator | None = None, reference: np.ndarray | None = None) -> np.ndarray:
        """prefix: the committed actions of the executing chunk (real-time chunking), or None.
        generator: this plan's random numbers (default: the planner's own stream).
        reference: the executing chunk on the new chunk's grid (M, Da); with candidates K > 1 the plan
        samples K chunks in one batch and returns the one closest to it (rtc.most_coherent)."""
        k = self.candidates if reference is not None and len(reference) else 1
        if k > 1:
            obs = {key: v.repeat(k, *[1] * (v.dim() - 1)) for key, v in obs.items()}   # (1, ...) -> (K, ...)
        inpaint = {}
        if prefix is not None and prefix.weights.numel():
            inpaint = {"prefix": prefix.actions.to(torch.float32)[None].repeat(k, 1, 1), "prefix_weight": prefix.weights}
        t0 = time.perf_counter()
        out = self.planner.predict_action(obs, generator or self.generator, mode=self.mode, **inpaint)
        # Every future row of the prediction (from n_obs_steps - 1 on), not only the n_action_steps
        # executed: the rows past them are the soft guidance of the next real-time-chunking plan.
        rows = out["action_pred"][:, self.cfg.n_obs_steps - 1:].detach().cpu().to(torch.float64)
        chosen = rows[most_coherent(rows, reference) if k > 1 else 0].numpy()
        if self.delay_s > 0:   # --simulate-delay: a slower planner, for testing the runtime
            time.sleep(self.delay_s)
        seconds = time.perf_counter() - t0
        self.latencies_ms.append(seconds * 1e3)
        self.calls, self.seconds = self.calls + 1, self.seconds + seconds
        return chosen


class Session:
    """One connected arm, its cameras and gripper, its planner, and everything recorded for the run log.

    The observation and the commands come from the checkpoint's spec (spec_io.py), the episode
    setup and the score from the task plug-in (dpag_engine/tasks): nothing here knows a task.
    """

    def __init__(self, rig: Rig, planner: TimedPlanner, task: Task, args, stream_dir: Path,
                 builder: ObservationBuilder, decoder: ActionDecoder, scene=None):
        self.rig, self.robot, self.planner, self.task, self.args = rig, rig.robot, planner, task, args
        self.cameras, self.gripper = rig.cameras, rig.gripper
        self.builder, self.decoder, self.scene = builder, decoder, scene
        cfg = planner.cfg
        self.n_obs, self.dt = cfg.n_obs_steps, builder.spec.dt
        self.plan_every = max(1, round(1.0 / (args.plan_hz * self.dt)))
        # Streamed to disk as they come (runlog.py): memory stays flat however long the run.
        cams = list(self.cameras)
        self.observations = StreamLog(stream_dir / "observations.bin", [
            ("t", "f8"), ("episode", "i4"), ("q", "f8", 6), ("state", "f8", max(1, cfg.state_dim)),
            ("gripper_width", "f8"), ("frame_age_ms", "f8", max(1, len(cams)))])
        self.plans = StreamLog(stream_dir / "plans.bin", [
            ("t_obs", "f8"), ("t_done", "f8"), ("latency_ms", "f8"), ("accepted", "?"), ("kept", "i4"),
            ("episode", "i4"), ("committed", "i4"), ("disagreement", "f8"), ("camera_to_command_ms", "f8"),
            ("actions", "f8", (cfg.horizon - cfg.n_obs_steps + 1, 6))])
        # Real-time chunking: the chunk executing now (all its future rows, time of its row 0, rows
        # submitted) and the delay to plan for.
        self.executing: tuple[np.ndarray, float, int] | None = None
        self.delay = DelayEstimator(initial_s=0.1)
        self.episodes: list[dict] = []
        self.episode_setups: list[dict] = []
        self.frames_seen: dict[str, list[np.ndarray]] = {c: [] for c in cams}   # a few, for the plot
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
        """--rtc: the executing chunk's actions due before the new plan can take over (+ soft rows).
        Real-time chunking inpaints in the policy's action space; only joint actions are continued."""
        if not self.args.rtc or self.executing is None or not rtc_applies(self.builder.spec):
            return None
        prev, prev_first, _ = self.executing
        if t_first < prev_first:
            return None
        cfg = self.planner.cfg
        return committed_prefix(torch.from_numpy(prev), prev_first, self.dt, t_first, self.delay.estimate(),
                                soft_steps=self.args.rtc_soft_steps, max_len=cfg.horizon - cfg.n_obs_steps + 1)

    def _executing_on_grid(self, t_first: float) -> np.ndarray | None:
        """--candidates > 1: the executing chunk's rows on the new chunk's grid (row 0 due at t_first),
        all that overlap, for the planner to keep the candidate that continues it. Compared in the
        policy's action space, so only for the actions real-time chunking continues (rtc_applies)."""
        if self.planner.candidates == 1 or self.executing is None or not rtc_applies(self.builder.spec):
            return None
        prev, prev_first, _ = self.executing
        if t_first < prev_first:
            return None
        return committed_prefix(torch.from_numpy(prev), prev_first, self.dt, t_first, 0.0,
                                soft_steps=len(prev)).actions.numpy()

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

    def move_home(self, q_home: np.ndarray) -> None:
        """To the home pose through the scheduler (limited), the gripper opening on the way."""
        try:
            self.rig.move_home(q_home, self.dt, self._check_robot)
        except SensorFault as err:
            raise SafetyStop(EXIT_SENSOR_FAULT, f"sensor fault: {err}") from err
        except TimeoutError as err:
            raise SafetyStop(EXIT_ROBOT_FAULT, str(err)) from err
        self.executing = None   # the next plan continues nothing

    def _command_gripper(self, width: float) -> None:
        try:
            self.rig.command_gripper(width)
        except SensorFault as err:
            raise SafetyStop(EXIT_SENSOR_FAULT, f"sensor fault: {err}") from err

    def set_scene(self, episode: dict) -> None:
        """Show the episode's scene: the emulator renders it; on a real cell the operator sets it."""
        if self.scene is None:
            return
        self.scene(self.task.scene(episode))
        # The episode's first observation must show the new scene: wait for a frame captured after it.
        t_set, deadline = time.monotonic(), time.monotonic() + 1.0
        for cam in self.cameras.values():
            while time.monotonic() < deadline and self._latest_capture(cam) <= t_set:
                time.sleep(0.005)

    def _latest_capture(self, cam) -> float:
        try:
            return cam.latest().t_capture
        except CameraFault as err:
            raise SafetyStop(EXIT_SENSOR_FAULT, f"sensor fault: {err}") from err

    def observe(self, t: float, task_inputs: dict) -> tuple[Snapshot, np.ndarray, dict]:
        """One policy step's snapshot and its policy inputs (state, images), checked finite."""
        try:
            snap = self.rig.snapshot(t, task_inputs)
        except SensorFault as err:   # a camera or the gripper that stopped is a fault, like a frozen robot stream
            raise SafetyStop(EXIT_SENSOR_FAULT, f"sensor fault: {err}") from err
        state = self.builder.state(snap)
        if not np.all(np.isfinite(state)):
            raise SafetyStop(EXIT_BAD_VALUES, f"non-finite observation at t = {t:.3f}: {state.tolist()}")
        return snap, state, self.builder.images(snap)

    def run_episode(self, index: int, episode: dict) -> dict:
        """Observe at the policy's rate on an absolute time grid, plan every plan_every samples."""
        args, dt = self.args, self.dt
        steps = int(round(args.duration / dt)) if args.duration else self.task.episode_steps
        inputs = self.task.inputs(episode)
        history, q_traj, widths = deque(maxlen=self.n_obs), [], []
        t0 = time.monotonic()
        last_accept = t0
        for step in range(steps + 1):
            t_obs = t0 + step * dt
            time.sleep(max(0.0, t_obs - time.monotonic()))
            self._check_robot()
            t_obs = time.monotonic()   # the time the observation was really taken
            snap, state, images = self.observe(t_obs, inputs)
            history.append((state, images))
            q_traj.append(snap.q)
            widths.append(math.nan if snap.gripper_width is None else snap.gripper_width)
            ages = [(t_obs - f.t_capture) * 1e3 for f in snap.frames.values()] or [math.nan]
            self.observations.append(t_obs, index, snap.q, state if len(state) else np.zeros(1),
                                     widths[-1], np.asarray(ages))
            if index == 0 and step in (0, steps):
                for name, f in snap.frames.items():
                    self.frames_seen[name].append(f.image)
            if step == steps:
                break
            if step % self.plan_every == 0:
                # Before To observations exist, the first one stands in for the missing ones (as in training).
                window = [history[0]] * (self.n_obs - len(history)) + list(history)
                # Action i of the chunk is the target for t_obs + (i + 1) dt (see dpag_engine/spec.py).
                t_first = t_obs + dt
                prefix = self._committed(t_first)
                try:
                    actions = self.planner(self.builder.policy_obs(window), prefix,
                                           reference=self._executing_on_grid(t_first))
                    if not np.all(np.isfinite(actions)):
                        raise ValueError("the policy returned non-finite actions")
                    joints, grip = self.decoder(actions, snap)
                except (ValueError, FloatingPointError) as err:   # the runtimes' checks, an unreachable target
                    raise SafetyStop(EXIT_BAD_VALUES, f"plan at step {step} refused: {err}") from err
                now = time.monotonic()
                self.delay.update(now - t_obs)
                jump = self._disagreement(joints, t_first, now + dt)
                result = self._submit(joints, t_first)
                if grip is not None and result.accepted:
                    self._command_gripper(float(grip[0]))   # at the plan rate: the target for the next step
                oldest = min((f.t_capture for f in snap.frames.values()), default=math.nan)
                self._record_plan(t_obs, now, joints, result, index, prefix.n_committed if prefix else 0, jump,
                                  (now - oldest) * 1e3)
                if result.accepted:
                    last_accept = now
                elif now - last_accept > args.abort_after:
                    raise SafetyStop(EXIT_PLANNER_STALLED,
                                     f"no plan accepted for {now - last_accept:.2f} s (--abort-after {args.abort_after})")
            self._status(index, step * dt)
        metrics = self.task.evaluate(Trace(np.asarray(q_traj), np.asarray(widths) if self.gripper else None), episode)
        metrics.update(episode=episode, steps=steps)
        self.episodes.append(metrics)
        return metrics

    def _record_plan(self, t_obs, t_done, actions, result, episode, committed, disagreement, cam_to_cmd_ms) -> None:
        self.plans.append(t_obs, t_done, self.planner.latencies_ms[-1], result.accepted, result.kept, episode,
                          committed, disagreement, cam_to_cmd_ms, actions)

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
        ages = self.observations.last["frame_age_ms"] if self.cameras and self.observations.last is not None else None
        line = (f"ep {episode + 1}/{self.args.episodes} t {t:4.1f} s | plan p50 {np.percentile(lat, 50):5.1f} ms "
                f"p99 {np.percentile(lat, 99):5.1f} ms | {loop['rate_hz']:.0f} Hz period err p99 "
                f"{loop['period_error_p99_us']:.0f} us, late {loop['late_cycles']} | track err {track:.1f} mrad"
                + (f" | frame age {' '.join(f'{a:.0f}' for a in ages)} ms" if ages is not None else ""))
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
            obs_t=obs["t"], obs_q=obs["q"], obs_state=obs["state"], obs_episode=obs["episode"],
            obs_gripper_width=obs["gripper_width"], obs_frame_age_ms=obs["frame_age_ms"],
            camera_names=np.array(list(self.cameras), dtype=str),
            plan_t_obs=plans["t_obs"], plan_t_done=plans["t_done"], plan_latency_ms=plans["latency_ms"],
            plan_accepted=plans["accepted"], plan_kept=plans["kept"], plan_episode=plans["episode"],
            plan_committed=plans["committed"], plan_disagreement_rad=plans["disagreement"],
            plan_camera_to_command_ms=plans["camera_to_command_ms"], plan_actions=plans["actions"],
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


def rtc_applies(spec) -> bool:
    """Real-time chunking inpaints the committed actions in the policy's own action space: that is
    the executed joint chunk only for absolute joint targets with no gripper column."""
    a = spec.action
    return a.kind == "joint_pos" and a.absolute and not a.gripper


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
    if len(obs) and session.episodes:   # tool paths seen from above, with what the scene shows
        fig, ax = plt.subplots(figsize=(6, 6))
        for i, m in enumerate(session.episodes):
            scene = session.task.scene(m["episode"])
            if i == 0 and scene.get("obstacle"):
                ob = scene["obstacle"]
                ax.add_patch(plt.Circle(ob["center"][:2], ob["radius"], color="grey", alpha=0.5))
            tcp = frame_origins(np.asarray(obs["q"][obs["episode"] == i], dtype=float))[:, 6]
            line, = ax.plot(tcp[:, 0], tcp[:, 1], lw=1.2)
            if scene.get("goal") is not None:
                ax.plot(*scene["goal"][:2], "*", ms=12, color=line.get_color())
        ax.set(aspect="equal", xlabel="x (m)", ylabel="y (m)", title="TCP paths (top view), goals *")
        save(fig, "tcp_paths.png")
    if any(session.frames_seen.values()):   # what the policy saw: each camera at the first episode's start and end
        names = [n for n, f in session.frames_seen.items() if f]
        cols = max(len(session.frames_seen[n]) for n in names)
        fig, axes = plt.subplots(len(names), cols, figsize=(3 * cols, 3 * len(names)), squeeze=False)
        for r, name in enumerate(names):
            for c in range(cols):
                ax = axes[r][c]
                ax.axis("off")
                if c < len(session.frames_seen[name]):
                    ax.imshow(session.frames_seen[name][c])
                    ax.set_title(f"{name}, {'start' if c == 0 else 'end'}", fontsize=9)
        save(fig, "camera_frames.png")


def bring_to_rest(robot, timeout: float = 2.0) -> None:
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

    def rate(key):   # over the episodes the task scores on it (a task of your own has no success)
        values = [e[key] for e in eps if e.get(key) is not None]
        return float(np.mean(values)) if values else math.nan

    obs = session.observations.rows()
    ages = obs["frame_age_ms"] if session.cameras and len(obs) else np.zeros((0, 1))
    cam_cmd = plans["camera_to_command_ms"][np.isfinite(plans["camera_to_command_ms"])] if len(plans) else []

    def pct(x, p):
        return float(np.percentile(x, p)) if len(x) else math.nan
    return {
        "exit_code": code, "message": message, "task": session.task.name,
        "episodes": len(eps), "success_rate": rate("success"), "collision_rate": rate("collided"),
        "mean_jerk": rate("mean_jerk"), "sides": [e.get("path_side") for e in eps],
        "plan_ms_p50": float(np.percentile(lat, 50)), "plan_ms_p99": float(np.percentile(lat, 99)),
        "cameras": {name: {"frame_age_ms_p50": pct(ages[:, i], 50), "frame_age_ms_p99": pct(ages[:, i], 99),
                           **session.cameras[name].stats} for i, name in enumerate(session.cameras)},
        "camera_to_command_ms_p50": pct(cam_cmd, 50), "camera_to_command_ms_p99": pct(cam_cmd, 99),
        "gripper": session.gripper.stats if session.gripper is not None else None,
        "plans": len(plans), "runtime": session.planner.runtime, "mode": session.planner.mode,
        "rtc": bool(session.args.rtc), "candidates": session.planner.candidates,
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
    for name, c in s["cameras"].items():
        print(f"camera {name}: frame age at each observation p50 {num(c['frame_age_ms_p50'], '.0f')} ms, "
              f"p99 {num(c['frame_age_ms_p99'], '.0f')} ms")
    if s["cameras"]:
        print(f"camera-to-command latency p50 {num(s['camera_to_command_ms_p50'], '.0f')} ms, "
              f"p99 {num(s['camera_to_command_ms_p99'], '.0f')} ms")
    if s["plans"]:
        print(f"plan latency p50 {num(s['plan_ms_p50'], '.1f')} ms, p99 {num(s['plan_ms_p99'], '.1f')} ms over "
              f"{s['plans']} plans ({s['mode']} on {s['runtime']}{', RTC' if s['rtc'] else ''}"
              f"{', best of %d candidates' % s['candidates'] if s['candidates'] > 1 else ''}); chunk disagreement "
              f"at takeover {num(s['chunk_disagreement_rad_mean'], '.1f', 1e3)} mrad")
    if loop.get("cycles"):
        print(f"servo loop {s['frequency_hz']:.0f} Hz: {loop['cycles']} cycles, period error p50 "
              f"{loop['period_error_p50_us']:.0f} us, p99 {loop['period_error_p99_us']:.0f} us, max "
              f"{loop['period_error_max_us']:.0f} us, late {loop['late_cycles']}, SCHED_FIFO {loop['rt_granted']}; "
              f"mailbox overwritten {s['mailbox'].get('overwritten')} of {s['mailbox'].get('posted')}")
    print(f"run log: {out / 'run.npz'}, {out / 'summary.json'}"
          + (f"; plots: {', '.join(str(out / p) for p in plots)}" if plots else "; no plots (nothing ran)"))
