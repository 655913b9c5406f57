"""Run a trained policy on a UR5: `python -m dpag_engine.serve --ckpt model.pt --robot ur5 --config cell.toml`.

    python -m dpag_engine.serve --ckpt outputs/demo/model.pt                  # --robot sim: the emulator
    python -m dpag_engine.serve --ckpt model.pt --robot ur5 --config cell.toml --episodes 3

Any policy trained here: the checkpoint's spec (dpag_engine/spec.py) says what it observes (joints,
TCP pose, gripper width, named cameras, task inputs) and what its actions are (joint targets
through servoJ, TCP pose targets through servoL, a gripper channel); the robot config
(dpag_engine/cell.py) says where each comes from in this cell. Both are checked against each other
before anything connects. The task plug-in (dpag_engine/tasks, from the checkpoint or --task)
supplies what no sensor measures: its inputs (a goal), its scene, its score; `--task own` serves a
policy of a task with no plug-in. Each episode the arm is brought to the home pose through the
same servo path, then the policy drives it. `--robot sim` starts the project's UR controller
emulator on loopback, with its rendered cameras and emulated Robotiq gripper, and talks to it
through the real ur_rtde client, so it exercises exactly the code a real arm gets.

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
    for --abort-after seconds the run stops; exit code 4;
  * a camera or the gripper that stops delivering (disconnect, stall): as for NaN; exit code 6.
Every option is checked against the policy, the task, the cell and the arm before anything connects
or moves (`check_options`): a limit above the UR5's own (joint speed pi rad/s, acceleration 40 rad/s^2,
servo rates 125 Hz CB3 / up to 500 Hz e-Series) or the cell's, a non-positive or non-finite value,
is refused, never capped; exit code 1, as for an unreadable checkpoint or a robot config that does
not provide what the policy observes. Any other error while running is a bug:
the arm is brought to rest and stopped as for a fault, then exit code 5 with the traceback in
summary.json. Every exit writes the true code and reason.
At the end: summary.json (with each camera's frame age at the observations and the camera-to-command
latency), run.npz (every observation, plan and command with timestamps) and plots.
While running, these logs stream to <log-dir>/stream/ (memory stays flat); a run that dies leaves
them there.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from .cameras.sim import SIM_CAMERA_PORT, SimScene
from .cell import Cell, CellError, bind, load_cell, needed_cameras, sim_cell
from .checkpoint import CheckpointError, load_policy
from .rig import Rig, SensorFault
from .robot import (CONTROLLER_RATES_HZ, STATE_TIMEOUT_MAX_S, UR5_JOINT_ACCEL_MAX, UR5_JOINT_SPEED_MAX, LimitError,
                    SafetyLimits, UR5Robot, ur5_left_wedged)
from .session import (EXIT_INTERNAL, EXIT_OK, EXIT_ROBOT_FAULT, EXIT_SENSOR_FAULT, EXIT_USAGE, SafetyStop, Session,
                      TimedPlanner, bring_to_rest, print_summary, rtc_applies, summarize)
from .spec_io import ActionDecoder, ObservationBuilder
from .tasks import OwnTask, Task, get_task

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
    ap.add_argument("--config", default=None,
                    help="robot config TOML of the cell (dpag_engine/cell.py): host, limits, cameras, gripper, "
                         "which source feeds each observation key. Default: the emulated cell (--robot sim) or "
                         "an arm with no cameras or gripper at --host")
    ap.add_argument("--task", default=None,
                    help="task plug-in (dpag_engine/tasks): default the checkpoint's; 'own' for a task with none")
    ap.add_argument("--host", default=None, help="controller address (required for ur5 unless the config "
                                                 "names it; 127.0.0.1 for sim)")
    ap.add_argument("--sim-version", default=None, help="sim: controller version, 3.x (CB3) or 5.x (e-Series); "
                                                        "default the config's [robot] version, 3.15")
    ap.add_argument("--frequency", type=finite, default=None,
                    help="servo rate in Hz: 125 on a CB3; 125, 250 or 500 on an e-Series (default: the "
                         "controller's own, 125 or 500)")
    ap.add_argument("--plan-hz", type=finite, default=5.0,
                    help="how often to plan a new chunk, at most the policy's rate (its spec's dt; 10 Hz for reach)")
    ap.add_argument("--inference-steps", type=int, default=None,
                    help="DDIM steps, 1 .. the checkpoint's training timesteps (default: the checkpoint's)")
    ap.add_argument("--mode", choices=("dp", "guided"), default="dp", help="sampling mode")
    ap.add_argument("--runtime", choices=("cpp", "torch"), default="cpp",
                    help="what runs each plan: the C++ engine (dpag_engine.runtime.cpu) or the PyTorch reference")
    ap.add_argument("--threads", type=int, default=None,
                    help="planner threads, 1 .. this machine's cores (default: all but two, at least one: the servo "
                         "loop and the cameras keep theirs. A core taken by another thread stalls a multi-threaded "
                         "planner's barriers: with cameras streaming on 2 cores, 2 threads gave 300 ms plans)")
    ap.add_argument("--episodes", type=int, default=3, help=f"goals to reach, 1 .. {MAX_EPISODES}")
    ap.add_argument("--duration", type=finite, default=None,
                    help=f"seconds per episode, up to {MAX_DURATION_S:g} (default: the task's)")
    ap.add_argument("--seed", type=int, default=100_000, help="goal and sampler seed (>= 0)")
    ap.add_argument("--servo", choices=("servoJ", "servoL"), default=None,
                    help="servoJ: joint targets; servoL: the same limited trajectory as tool poses. Default: "
                         "servoL for a policy with TCP pose actions, else servoJ")
    ap.add_argument("--lookahead-time", type=finite, default=0.1, help="servoJ lookahead, 0.03 .. 0.2 s")
    ap.add_argument("--gain", type=finite, default=300.0, help="servoJ gain, 100 .. 2000")
    ap.add_argument("--hold-after", type=finite, default=None,
                    help="execute at most this many seconds of a chunk past its observation, then decelerate; "
                         "at most the chunk's length (default: the policy's n_action_steps * dt)")
    ap.add_argument("--abort-after", type=finite, default=2.0,
                    help=f"stop when no plan was accepted for this long, up to {MAX_ABORT_AFTER_S:g} s")
    ap.add_argument("--v-max", type=finite, default=None,
                    help=f"joint velocity limit (rad/s; default the cell's, pi/2). Refused above the cell's and the "
                         f"UR5's own {UR5_JOINT_SPEED_MAX:.2f} rad/s")
    ap.add_argument("--a-max", type=finite, default=None,
                    help=f"joint acceleration limit (rad/s^2; default the cell's, 10). Refused above the cell's and "
                         f"{UR5_JOINT_ACCEL_MAX:g} rad/s^2, the bound ur_rtde enforces")
    ap.add_argument("--watchdog-hz", type=finite, default=5.0,
                    help="RTDE watchdog: the controller stops the program if commands arrive slower than this "
                         "(0 < hz <= the servo rate)")
    ap.add_argument("--state-timeout", type=finite, default=None,
                    help="stop when the arm's state has not updated for this long: frozen stream, lost link "
                         f"(0 .. {STATE_TIMEOUT_MAX_S:g} s; default the cell's, {SafetyLimits.state_timeout_s:g} s)")
    ap.add_argument("--workspace", type=finite, nargs=6, default=None, metavar=("XLO", "YLO", "ZLO", "XHI", "YHI", "ZHI"),
                    help="TCP box (m, base frame), inside the cell's; default the cell's (robot.SafetyLimits' UR5 box)")
    ap.add_argument("--rtc", action=argparse.BooleanOptionalAction, default=True,
                    help="real-time chunking: inpaint the actions that execute while planning (dpag_engine/rtc.py); "
                         "on by default: it cut jerk and chunk-boundary jumps ~3-10x in bench/RTC.md")
    ap.add_argument("--rtc-soft-steps", type=int, default=4,
                    help="--rtc: also pull this many following actions towards the executing chunk, decaying "
                         "(0 .. the policy's horizon)")
    ap.add_argument("--candidates", type=int, default=4,
                    help=f"sample this many chunks per plan in one batch and keep the one closest to the executing "
                         f"chunk (dpag_engine/rtc.py most_coherent; 1 .. {MAX_CANDIDATES}): holds the mode where the "
                         f"demonstrations split; at 5 Hz it cut the demo's jerk by a third, ~3.3x the plan time (bench/RTC.md)")
    ap.add_argument("--simulate-delay", type=finite, default=0.0,
                    help=f"add this many ms to every plan (testing), 0 .. {MAX_SIMULATED_DELAY_MS:g}")
    ap.add_argument("--no-rt", action="store_true", help="do not ask for SCHED_FIFO for the servo loop")
    ap.add_argument("--log-dir", default="outputs/serve", help="run log and plots go here")
    return ap


MAX_EPISODES, MAX_DURATION_S, MAX_ABORT_AFTER_S, MAX_SIMULATED_DELAY_MS = 10_000, 3600.0, 60.0, 10_000.0
MAX_CANDIDATES = 8   # the C++ engine allocates its buffers for batches up to 8 (runtime/cpu.py)


def check_options(args, cfg, dt: float, cell: Cell, from_config: bool) -> SafetyLimits:
    """Every option against what the policy, the cell and the arm allow, before anything connects
    or moves; returns the safety limits. Raises UsageError naming the first bad option.

    The limits are the cell's; an option may only tighten them when they come from a robot config
    (a lab's own maxima), and never above the UR5's own."""
    def need(ok: bool, option: str, why: str) -> None:
        if not ok:
            raise UsageError(f"{option} {getattr(args, option[2:].replace('-', '_'))}: {why}")

    chunk_s = (cfg.horizon - cfg.n_obs_steps + 1) * dt
    need(args.robot == "sim" or bool(args.host or not cell.sim), "--host",
         "--robot ur5 needs the controller's address (or [robot] host in --config)")
    if args.robot == "sim":
        major = parse_major(args.sim_version)
        need(major in (3, 5), "--sim-version", "the emulator is a CB3 (3.x) or an e-Series (5.x)")
        rates = CONTROLLER_RATES_HZ[major]
    else:
        rates = CONTROLLER_RATES_HZ[5]   # the controller's version (read before streaming) narrows it
    need(args.frequency is None or args.frequency in rates, "--frequency",
         f"the controller servos at {' or '.join(f'{r:g}' for r in rates)} Hz")
    need(0 < args.plan_hz <= 1 / dt, "--plan-hz", f"must be in (0, {1 / dt:g}] Hz (the policy's rate)")
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
    need(1 <= args.candidates <= MAX_CANDIDATES, "--candidates",
         f"must be in [1, {MAX_CANDIDATES}] (one batch of the C++ engine's buffers)")
    need(0 <= args.rtc_soft_steps <= cfg.horizon, "--rtc-soft-steps", f"must be in [0, {cfg.horizon}] (the horizon)")
    need(0 <= args.simulate_delay <= MAX_SIMULATED_DELAY_MS, "--simulate-delay",
         f"must be in [0, {MAX_SIMULATED_DELAY_MS:g}] ms")
    return cell_limits(args, cell, from_config)


def cell_limits(args, cell: Cell, from_config: bool) -> SafetyLimits:
    """The cell's safety limits, tightened by --v-max / --a-max / --workspace / --state-timeout: a
    lab's config holds its cell's maxima, so options tighten them and never loosen them, and never
    go above the UR5's own (SafetyLimits checks). UsageError naming the option. Serve and record."""
    def need(ok: bool, option: str, why: str) -> None:
        if not ok:
            raise UsageError(f"{option} {getattr(args, option[2:].replace('-', '_'))}: {why}")

    base = cell.limits
    if from_config:
        need(args.v_max is None or args.v_max <= min(base.v_max), "--v-max", f"above the cell's {min(base.v_max):g} rad/s ({cell.path})")
        need(args.a_max is None or args.a_max <= min(base.a_max), "--a-max", f"above the cell's {min(base.a_max):g} rad/s^2 ({cell.path})")
        need(args.workspace is None or (all(a >= b for a, b in zip(args.workspace[:3], base.workspace_lo))
                                        and all(a <= b for a, b in zip(args.workspace[3:], base.workspace_hi))),
             "--workspace", f"outside the cell's box {base.workspace_lo} .. {base.workspace_hi} ({cell.path})")
    changes = {}
    if args.v_max is not None:
        changes["v_max"] = (args.v_max,) * 6
    if args.a_max is not None:
        changes["a_max"] = (args.a_max,) * 6
    if args.state_timeout is not None:
        changes["state_timeout_s"] = args.state_timeout
    if args.workspace:
        changes.update(workspace_lo=tuple(args.workspace[:3]), workspace_hi=tuple(args.workspace[3:]))
    try:
        return dataclasses.replace(base, **changes)
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
    cfg, spec = policy.cfg, policy.spec
    try:
        if spec is None:
            raise UsageError(f"{args.ckpt}: the checkpoint has no spec (what its inputs and action columns are), so "
                             f"it cannot be served; retrain it with data.spec set (dt, action; see dpag_engine/spec.py)")
        cell = load_cell(args.config) if args.config else (sim_cell(args.sim_version or "3.15") if args.robot == "sim"
                                                           else Cell(host=args.host or "sim"))
        args.sim_version = args.sim_version or cell.version
        task = resolve_task(args.task or spec.task, spec, cell, args.duration)
        limits = check_options(args, cfg, spec.dt, cell, from_config=args.config is not None)
        rng = np.random.default_rng(args.seed)
        episodes = [task.sample_episode(rng) for _ in range(args.episodes)]
        bindings = bind(spec, cell, task.inputs(episodes[0]))
        check_scene(cell, args, task)
    except (UsageError, CellError, KeyError) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return EXIT_USAGE
    args.threads = args.threads or max(1, (os.cpu_count() or 1) - 2)
    torch.set_num_threads(args.threads)
    sys.setswitchinterval(0.001)   # the servo pump waits at most ~1 ms for the GIL
    if args.inference_steps:
        policy.set_inference_steps(args.inference_steps)
    if args.hold_after is None:
        args.hold_after = cfg.n_action_steps * spec.dt
    if args.rtc and not rtc_applies(spec):
        print(f"serve: --rtc applies to absolute joint actions without a gripper; this policy's are "
              f"{spec.action.kind}{' + gripper' if spec.action.gripper else ''}: planning without it", file=sys.stderr)
        args.rtc = False
    if args.candidates > 1 and not rtc_applies(spec):
        print(f"serve: --candidates compares chunks in absolute joint actions without a gripper; this policy's are "
              f"{spec.action.kind}{' + gripper' if spec.action.gripper else ''}: one sample per plan", file=sys.stderr)
        args.candidates = 1
    out = Path(args.log_dir)
    stream_dir = out / "stream"
    planner = TimedPlanner(policy, args.mode, args.runtime, args.seed, args.simulate_delay / 1e3, args.threads,
                           args.candidates)
    builder, decoder = ObservationBuilder(spec, bindings, cell.tcp_offset), ActionDecoder(spec, cell.tcp_offset)

    host = args.host or ("127.0.0.1" if args.robot == "sim" or cell.sim else cell.host)
    emulator = None
    if args.robot == "sim":
        from .ursim import EmulatorProcess
        emulator = EmulatorProcess(host, args.sim_version, control_port=0)
    servo = args.servo or ("servoL" if spec.action.kind == "tcp_pose" else "servoJ")
    robot = UR5Robot(host, limits, frequency=args.frequency or cell.frequency, lookahead_time=args.lookahead_time,
                     gain=args.gain, watchdog_hz=args.watchdog_hz, rt_priority=not args.no_rt,
                     servo=servo, log_dir=stream_dir, tcp_offset=cell.tcp_offset)
    trained = {b.sources[0][7:]: tuple(b.field.shape[1:]) for b in bindings if b.field.kind == "camera"}
    needs_gripper = spec.action.gripper or any("gripper.width" in b.sources for b in bindings)
    rig = Rig.for_cell(cell, robot, needed_cameras(bindings), needs_gripper, trained, host, emulator)
    session = Session(rig, planner, task, args, stream_dir, builder, decoder, scene_setter(task, args, cell, host))
    cameras, gripper = rig.cameras, rig.gripper
    code, message, trace = EXIT_OK, "done", None
    try:
        try:
            rig.connect()
        except (ConnectionError, RuntimeError) as err:   # unreachable, refused, or not ready to move
            if isinstance(err, SensorFault):
                raise SafetyStop(EXIT_SENSOR_FAULT, f"sensor fault: {err}") from err
            raise SafetyStop(EXIT_ROBOT_FAULT, f"cannot connect to the controller at {host}: {err}") from err
        print(f"serve: connected to {host} (controller {robot.controller_major}.x), servo {robot.frequency:.0f} Hz "
              f"({servo}), plan {args.plan_hz:g} Hz, {args.mode} mode on {planner.runtime}, "
              f"DDIM-{policy.schedule.num_steps}; task {task.name}; policy: {spec.describe()}"
              + (f"; cameras {', '.join(cameras)}" if cameras else "") + ("; gripper" if gripper else ""),
              file=sys.stderr)
        # The first plan pays one-off costs (allocation, caches): pay them before the arm moves, so
        # it is not a late first chunk.
        session.set_scene(episodes[0])
        _, state, images = session.observe(time.monotonic(), task.inputs(episodes[0]))
        planner(builder.policy_obs([(state, images)] * cfg.n_obs_steps))
        planner.latencies_ms.clear()
        # Everything loaded so far (torch, the policy) is long-lived: move it out of the collector's
        # reach, so a full collection never stalls the servo pump on the GIL for 100+ ms.
        gc.collect()
        gc.freeze()
        robot.start()
        home = np.asarray(cell.home if cell.home is not None else task.q_home)
        for i, episode in enumerate(episodes):
            session.move_home(home)
            session.set_scene(episode)
            m = session.run_episode(i, episode)
            session._status(i, m["steps"] * spec.dt, force=True)
            print(f"\nepisode {i + 1}: {describe_episode(m)}", file=sys.stderr)
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
        rig.close()
    print_summary(summary, out, plots)
    return code


def resolve_task(name: str | None, spec, cell: Cell, duration: float | None) -> Task:
    """The task plug-in by name; 'own' (or none named) is a task of the lab's own: it needs a home
    pose in the robot config and --duration per episode."""
    if name and name != "own":
        task = get_task(name)
        if abs(task.dt - spec.dt) > 1e-9:
            raise UsageError(f"--task {name}: runs at {1 / task.dt:g} Hz, the policy at {1 / spec.dt:g} Hz")
        return task
    if cell.home is None:
        raise UsageError("--task own: the policy has no task plug-in; give its home pose as [robot] home in --config")
    if duration is None:
        raise UsageError("--task own: give --duration (seconds per episode)")
    return OwnTask(q_home=cell.home, dt=spec.dt, episode_steps=int(round(duration / spec.dt)))


def check_scene(cell: Cell, args, task: Task) -> None:
    """What the cell's sources need before anything opens: a scene only an operator can set needs an
    operator at the terminal."""
    if task.needs_scene and not emulated(args, cell) and not sys.stdin.isatty():
        raise UsageError(f"task {task.name}: shows its goal in the scene only; on a real cell an operator sets "
                         f"each episode's scene, so run serve at a terminal")


def emulated(args, cell: Cell) -> bool:
    """The arm is the emulator (started here, or one whose cell renders its cameras: sim: sources)."""
    return args.robot == "sim" or any(c.kind == "sim" for c in cell.cameras.values())


def scene_setter(task: Task, args, cell: Cell, host: str):
    """How an episode's scene is shown: the emulator renders it; an operator sets up a real cell."""
    if emulated(args, cell):
        return lambda scene: SimScene((host, SIM_CAMERA_PORT)).set(**scene)
    if not task.needs_scene:
        return None

    def ask(scene: dict) -> None:
        input(f"serve: set up the scene {scene} and press Enter ")
    return ask


def describe_episode(m: dict) -> str:
    words = [] if m.get("success") is None else ["success" if m["success"] else "failure"]
    if "final_error_m" in m:
        words.append(f"final error {m['final_error_m'] * 100:.1f} cm")
    if m.get("collided"):
        words.append("collided")
    if "gripper_closed" in m:
        words.append(f"gripper {'closed' if m['gripper_closed'] else 'open'}")
    words.append(f"mean jerk {m['mean_jerk']:.1f} rad/s^3")
    return ", ".join(words)


if __name__ == "__main__":
    exit_code = main()
    if ur5_left_wedged():
        # A ur_rtde client is stuck on a dead connection; its destructor would block or abort the
        # process (losing the exit code). Logs are written and closed: leave without destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    raise SystemExit(exit_code)
