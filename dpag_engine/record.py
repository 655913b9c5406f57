"""Record demonstrations on a UR5 into a dataset that trains and serves: `python -m dpag_engine.record`.

    python -m dpag_engine.record --teleop keyboard --out data/task.zarr            # --robot sim: the emulator
    python -m dpag_engine.record --robot ur5 --config cell.toml --teleop spacemouse --out data/task.zarr
    python -m dpag_engine.record --robot ur5 --config cell.toml --teleop freedrive --task ur5_reach \\
        --out data/reach --format lerobot --episodes 20
    python -m dpag_engine.record --replay data/task.zarr --episode 0 --robot ur5 --config cell.toml

Teleoperation (dpag_engine/teleop):
  * spacemouse: a 3Dconnexion SpaceMouse (pyspacemouse 2.x) is a 6-DoF TCP velocity, in the base or
    the tool frame (--frame), with a deadband and the maximum speeds at full deflection (--max-linear,
    --max-angular); button 0 closes the gripper, button 1 opens it;
  * keyboard: the same velocities on keys (w/s x, a/d y, r/f z, j/l roll, i/k pitch, u/o yaw; x stops);
  * freedrive: the arm in teach mode, moved by the operator's hand; the recorder samples it.
SpaceMouse and keyboard commands go through the same path as a served policy's: each step the TCP
target is integrated at the recording rate, clipped to the workspace box, solved to joints (inverse
kinematics warm-started from the previous target) and submitted as a short chunk to the
ActionScheduler; the C++ fixed-rate loop enforces the joint, velocity and acceleration limits and
the box on every command (robot.py). Nothing commands the arm around them.

Keys, in every mode (the terminal in raw mode; restored on every exit):
    Enter       start an episode / stop it and keep it
    Backspace   stop it and discard it
    space       open / close the gripper
    q           quit (an episode in progress is discarded: Enter first keeps it); Ctrl-C also quits
Between episodes the arm goes home (the cell's [robot] home, else the task's, else where it was at
the start) through the scheduler, the gripper opening; with --task the next episode's setup comes
from the task plug-in (its scene shown by the emulator's cameras, or to the operator on a real cell,
its inputs such as the goal recorded as keys of their own). In freedrive the recorder never moves
the arm: the operator brings it back (the status line shows how far from home it is); see
teleop/freedrive.py for why.

What is recorded, every step at --fps on an absolute time grid (Rig.snapshot, aligned as serve
aligns a policy's observations: the arm's newest state, each camera's frame nearest the step's
time): q, qd, tcp_pose, tcp_speed, gripper_width (with a gripper), one uint8 (H, W, 3) key per camera
of the config, the task's inputs (e.g. goal), and the action: the next joint targets (--action
joint) or the next TCP pose x y z rx ry rz (--action tcp; rotation vectors kept continuous), plus
the gripper command column when the cell has a gripper (in freedrive: the next sampled joints or
pose). The dataset carries the spec hints (spec.py: task, dt = 1/fps, the kind of every key, the
action's kind and gripper), so `python -m dpag_engine.train` on it writes a checkpoint whose spec
`python -m dpag_engine.serve` builds from this same robot config. Formats: Diffusion Policy's zarr
(--format zarr; images uint8, chunked along time) or LeRobot v3 (--format lerobot: observation.<key>,
observation.images.<camera>, action). A finished episode is written when it is kept: Ctrl-C or a
fault keeps every finished one.

Safety and exit codes as serve's: every option is checked before anything connects or moves (1,
naming the option); a robot fault 2; non-finite values 3; an internal error 5 (the traceback in
summary.json); a camera, the gripper or the teleop device that stops delivering 6; Ctrl-C 130. On
every exit path the arm is brought to rest where the servo loop runs (teach mode ended in
freedrive), then stopped (servoStop, stopScript), and <log-dir>/summary.json says what happened
(episodes, frame ages at the steps, the loop's timing) next to run.npz (every command sent, every
state measured). A kill (SIGKILL) runs none of this: the controller's RTDE watchdog (--watchdog-hz)
ends the program once commands stop, and every kept episode is already on disk (a LeRobot
recording is then finalized with `python -m dpag_engine.data.lerobot finalize`, or resumed with
--append).

Replay (--replay DATASET --episode I): the episode's recorded joint path (key q) goes back through
the same safety path: home to its first pose through Rig.move_home, then the whole path submitted to
the scheduler at the recorded dt. The report is the deviation between the recorded path and the
measured replay, both at the recorded sample times.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from . import _C
from .cameras import CameraFault
from .cameras.sim import SIM_CAMERA_PORT, SimScene
from .cell import Cell, CellError, load_cell, sim_cell
from .kinematics import fk_matrix, tcp_pose, tcp_speed
from .rig import Rig, SensorFault
from .robot import CONTROLLER_RATES_HZ, STATE_TIMEOUT_MAX_S, UR5_JOINT_ACCEL_MAX, LimitError, \
    SafetyLimits, UR5Robot, ur5_left_wedged
from .serve import UsageError, _Parser, cell_limits, emulated, finite, parse_major
from .session import (EXIT_BAD_VALUES, EXIT_INTERNAL, EXIT_OK, EXIT_ROBOT_FAULT, EXIT_SENSOR_FAULT, EXIT_USAGE,
                      SafetyStop, bring_to_rest, json_safe)
from .tasks import get_task
from .teleop import (CLOSE, OPEN, TOGGLE, FreedriveTeleop, KeyboardTeleop, SpaceMouseTeleop, TcpTarget, TeleopFault,
                     TeleopUnavailable, Terminal, TwistShaper, continuous_rotvec, parse_axis_map)
from .teleop.keyboard import BACKSPACE, CTRL_C, ENTER

MAX_EPISODES, MAX_DURATION_S, MAX_FPS = 10_000, 3600.0, 60.0
MAX_LINEAR_M_S, MAX_ANGULAR_RAD_S = 0.5, 2.0      # teleop speeds at full deflection, at most
HOME_SPEED_RAD_S = 0.5
EXIT_TERMINATED = 143


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m dpag_engine.record", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--robot", choices=("sim", "ur5"), default="sim",
                    help="ur5: a real arm at --host; sim: start the UR controller emulator on loopback")
    ap.add_argument("--config", default=None,
                    help="robot config TOML of the cell (dpag_engine/cell.py): host, limits, cameras, gripper. "
                         "Default: the emulated cell (--robot sim: both cameras and the gripper) or an arm with "
                         "no cameras or gripper at --host")
    ap.add_argument("--host", default=None, help="controller address (required for ur5 unless the config names it)")
    ap.add_argument("--sim-version", default="3.15", help="sim: controller version, 3.x (CB3) or 5.x (e-Series)")
    ap.add_argument("--frequency", type=finite, default=None,
                    help="servo rate in Hz (default: the controller's own, 125 CB3 or 500 e-Series)")
    ap.add_argument("--teleop", choices=("spacemouse", "keyboard", "freedrive"), default=None,
                    help="how the operator moves the arm (required when recording)")
    ap.add_argument("--out", default=None, help="the dataset to write: a .zarr (or .zarr.zip) or a LeRobot directory")
    ap.add_argument("--format", choices=("zarr", "lerobot"), default="zarr",
                    help="zarr: Diffusion Policy's replay buffer; lerobot: LeRobotDataset v3 (AV1 videos)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists (when the first episode is kept)")
    ap.add_argument("--append", action="store_true",
                    help="add episodes to --out: a zarr directory recorded the same way (same keys, spec hints), or "
                         "a LeRobot recording that did not finish (a crash: its finished episodes are kept)")
    ap.add_argument("--fps", type=finite, default=None,
                    help=f"recording rate, the policy's rate (Hz, up to {MAX_FPS:g}; default the task's, else 10)")
    ap.add_argument("--action", choices=("joint", "tcp"), default="joint",
                    help="joint: next joint targets; tcp: next TCP pose x y z rx ry rz")
    ap.add_argument("--task", default=None, help="task plug-in (dpag_engine/tasks) giving each episode's setup")
    ap.add_argument("--episodes", type=int, default=None, help=f"stop after this many kept episodes (1 .. "
                                                               f"{MAX_EPISODES}; default: until q)")
    ap.add_argument("--duration", type=finite, default=None,
                    help=f"seconds per episode: it stops and is kept then (up to {MAX_DURATION_S:g}; default: "
                         f"until Enter)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the task's episode setups (>= 0)")
    ap.add_argument("--frame", choices=("base", "tool"), default="base",
                    help="spacemouse/keyboard: the frame the TCP velocity is expressed in")
    ap.add_argument("--max-linear", type=finite, default=0.1,
                    help=f"TCP speed at full deflection (m/s, up to {MAX_LINEAR_M_S:g})")
    ap.add_argument("--max-angular", type=finite, default=0.3,
                    help=f"TCP angular speed at full deflection (rad/s, up to {MAX_ANGULAR_RAD_S:g})")
    ap.add_argument("--deadband", type=finite, default=0.1,
                    help="spacemouse: axis readings at or below this fraction count as zero (0 .. 0.9)")
    ap.add_argument("--axis-map", default="x y z roll pitch yaw",
                    help="spacemouse: the device axis (signed) feeding each of the TCP velocity's x y z roll pitch "
                         "yaw, e.g. '-y x z -pitch roll yaw' for an operator facing the arm's -x")
    ap.add_argument("--key-hold", type=finite, default=0.6,
                    help="keyboard: seconds an axis keeps moving after its key's last press (key repeat "
                         "refreshes it), 0.05 .. 2")
    ap.add_argument("--v-max", type=finite, default=None,
                    help="joint velocity limit (rad/s; default the cell's). Refused above the cell's and the UR5's")
    ap.add_argument("--a-max", type=finite, default=None,
                    help="joint acceleration limit (rad/s^2; default the cell's). Refused above the cell's and "
                         f"{UR5_JOINT_ACCEL_MAX:g}")
    ap.add_argument("--workspace", type=finite, nargs=6, default=None, metavar=("XLO", "YLO", "ZLO", "XHI", "YHI", "ZHI"),
                    help="TCP box (m, base frame), inside the cell's; default the cell's")
    ap.add_argument("--state-timeout", type=finite, default=None,
                    help=f"stop when the arm's state has not updated for this long (0 .. {STATE_TIMEOUT_MAX_S:g} s)")
    ap.add_argument("--watchdog-hz", type=finite, default=5.0,
                    help="RTDE watchdog: the controller stops the program if commands arrive slower than this")
    ap.add_argument("--no-rt", action="store_true", help="do not ask for SCHED_FIFO for the servo loop")
    ap.add_argument("--log-dir", default="outputs/record", help="summary.json and the robot's logs go here")
    ap.add_argument("--replay", default=None, metavar="DATASET", help="play an episode's joint path back (see above)")
    ap.add_argument("--episode", type=int, default=None, help="--replay: the episode's index in the dataset (0, 1, ...)")
    return ap


# ---------------------------------------------------------------------------------------------
# Options, checked before anything connects or moves
# ---------------------------------------------------------------------------------------------
def check_options(args, cell: Cell, task, stdin_fd: int) -> tuple[SafetyLimits, float]:
    """Every option, before anything connects or moves: (limits, fps). UsageError naming the first bad one."""
    def need(ok: bool, option: str, why: str) -> None:
        if not ok:
            value = getattr(args, option[2:].replace("-", "_"), None)
            raise UsageError(f"{option}{'' if value is None or value is True else f' {value}'}: {why}")

    need(args.robot == "sim" or bool(args.host or not cell.sim), "--host",
         "--robot ur5 needs the controller's address (or [robot] host in --config)")
    if args.robot == "sim":
        need(parse_major(args.sim_version) in (3, 5), "--sim-version", "the emulator is a CB3 (3.x) or an e-Series (5.x)")
        rates = CONTROLLER_RATES_HZ[parse_major(args.sim_version)]
    else:
        rates = CONTROLLER_RATES_HZ[5]
    need(args.frequency is None or args.frequency in rates, "--frequency",
         f"the controller servos at {' or '.join(f'{r:g}' for r in rates)} Hz")
    need(0 < args.watchdog_hz <= (args.frequency or max(rates)), "--watchdog-hz",
         f"must be in (0, {args.frequency or max(rates):g}] Hz")
    limits = cell_limits(args, cell, from_config=args.config is not None)
    if args.replay is not None:
        for option in ("teleop", "out", "task", "episodes", "duration"):
            need(getattr(args, option) is None, f"--{option}", "not used with --replay (it plays a recorded episode)")
        need(args.episode is not None and args.episode >= 0, "--episode", "--replay needs the episode's index (>= 0)")
        return limits, math.nan
    need(args.episode is None, "--episode", "only with --replay")
    need(args.teleop is not None, "--teleop", "say how the operator moves the arm: spacemouse, keyboard or freedrive")
    need(args.out is not None, "--out", "say where the dataset goes")
    fps = args.fps if args.fps is not None else (1.0 / task.dt if task is not None else 10.0)
    need(0 < fps <= MAX_FPS, "--fps", f"must be in (0, {MAX_FPS:g}] Hz")
    if task is not None:
        need(abs(fps * task.dt - 1.0) < 1e-9, "--fps", f"task {task.name} runs at {1 / task.dt:g} Hz: its policies "
                                                       f"are served at that rate")
    if args.format == "lerobot":
        need(float(fps).is_integer(), "--fps", "LeRobot stores an integer frame rate")
    out = Path(args.out)
    need(not (args.append and args.overwrite), "--append", "and --overwrite exclude each other")
    need(args.overwrite or args.append or not out.exists(), "--out", "exists (--append adds to it, --overwrite replaces it)")
    need(not out.parent.exists() or out.parent.is_dir(), "--out", f"{out.parent} is not a directory")
    if args.format == "zarr":
        need(not out.name.endswith(".zip"), "--out", "record into a directory (*.zarr): each episode is on disk when it "
                                                     "is kept; a .zarr.zip is written whole at the end (zip it then)")
        need(out.name.endswith(".zarr"), "--out", "a zarr dataset is a directory named *.zarr")
        need(not args.append or (out / "meta" / "episode_ends").exists(), "--out",
             "--append needs an existing zarr replay buffer there")
    else:
        need(not out.name.endswith((".zarr", ".zip")), "--out", "a LeRobot dataset is a directory, not *.zarr")
        need(not args.append or (out / ".recording" / "writer.json").is_file(), "--out",
             "--append on a LeRobot dataset resumes a recording that did not finish (its .recording journal); a "
             "finished LeRobot dataset is not appended to: record into a new one")
    need(args.episodes is None or 1 <= args.episodes <= MAX_EPISODES, "--episodes", f"must be in [1, {MAX_EPISODES}]")
    need(args.duration is None or 1.0 / fps < args.duration <= MAX_DURATION_S, "--duration",
         f"must be in ({1 / fps:g}, {MAX_DURATION_S:g}] s")
    need(args.seed >= 0, "--seed", "must be >= 0")
    need(0 < args.max_linear <= MAX_LINEAR_M_S, "--max-linear", f"must be in (0, {MAX_LINEAR_M_S:g}] m/s")
    need(0 < args.max_angular <= MAX_ANGULAR_RAD_S, "--max-angular", f"must be in (0, {MAX_ANGULAR_RAD_S:g}] rad/s")
    need(0 <= args.deadband <= 0.9, "--deadband", "must be in [0, 0.9]")
    need(0.05 <= args.key_hold <= 2.0, "--key-hold", "must be in [0.05, 2] s")
    try:
        parse_axis_map(args.axis_map)
    except ValueError as err:
        raise UsageError(f"--axis-map {args.axis_map!r}: {err}") from None
    need(Terminal.available(stdin_fd), "--teleop", "episodes are started and stopped from the terminal (Enter, "
                                                   "Backspace, q): run record at a terminal (stdin is not one)")
    return limits, fps


def make_teleop(args):
    if args.teleop == "spacemouse":
        teleop = SpaceMouseTeleop(parse_axis_map(args.axis_map))
    elif args.teleop == "keyboard":
        teleop = KeyboardTeleop(args.key_hold)
    else:
        teleop = FreedriveTeleop()
        teleop.check(UR5Robot)
    teleop.open()   # a missing device is said now, before the arm connects
    return teleop


def make_robot(host, limits, args, cell: Cell, log_dir: Path) -> UR5Robot:
    return UR5Robot(host, limits, frequency=args.frequency or cell.frequency, watchdog_hz=args.watchdog_hz,
                    rt_priority=not args.no_rt, log_dir=log_dir, tcp_offset=cell.tcp_offset)


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------
class DatasetOut:
    """Episodes into the zarr or LeRobot writer, opened when the first episode is kept (an aborted
    run with none kept leaves nothing behind, and --overwrite replaces only then). Both writers are
    durable per episode: a kept episode is on disk when add() returns, whatever happens next (a zarr
    buffer is then readable as it is; a LeRobot recording killed before close() is finalized with
    `python -m dpag_engine.data.lerobot finalize`, or resumed with --append)."""

    def __init__(self, path: Path, fmt: str, fps: float, hints: dict, task_name: str | None, overwrite: bool,
                 append: bool = False):
        self.path, self.fmt, self.fps, self.hints = path, fmt, fps, hints
        self.task_name, self.overwrite, self.append = task_name, overwrite, append
        self.writer = None
        self.episodes = 0

    def _key(self, key: str, image: bool) -> str:
        if self.fmt == "zarr" or key == "action":
            return key
        return f"observation.images.{key}" if image else f"observation.{key}"

    def add(self, episode: dict[str, np.ndarray], cameras: set[str]) -> None:
        arrays = {self._key(k, k in cameras): v for k, v in episode.items()}
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.fmt == "zarr":
                from .data.replay_buffer import ReplayBufferWriter
                self.writer = ReplayBufferWriter(self.path, overwrite=self.overwrite, spec_hints=self.hints,
                                                 append=self.append)
            elif self.append:
                from .data.lerobot import LeRobotWriter
                self.writer = LeRobotWriter(self.path, fps=int(round(self.fps)), resume=True)
            else:
                from .data.lerobot import LeRobotWriter
                # The spec hints go into meta/info.json as "dpag_spec" (read_lerobot reads them back).
                self.writer = LeRobotWriter(self.path, fps=int(round(self.fps)), robot_type="ur5",
                                            overwrite=self.overwrite, extra_info={"dpag_spec": self.hints})
        if self.fmt == "zarr":
            self.writer.add_episode(arrays)
        else:
            self.writer.add_episode(arrays, task=self.task_name or "")
        self.episodes += 1

    def close(self) -> None:
        if self.writer is None:
            return
        writer, self.writer = self.writer, None
        writer.close()


def recorded_keys(cell: Cell, inputs: dict, fmt: str) -> set[str]:
    """The dataset keys a recording on this cell writes (as its format names them)."""
    lowdim = ["q", "qd", "tcp_pose", "tcp_speed"] + (["gripper_width"] if cell.gripper.kind == "robotiq" else [])
    lowdim += list(inputs)
    if fmt == "zarr":
        return {*lowdim, *cell.cameras, "action"}
    return {*(f"observation.{k}" for k in lowdim), *(f"observation.images.{c}" for c in cell.cameras), "action"}


def check_append(args, hints: dict, cell: Cell, inputs: dict) -> None:
    """--append: the dataset there was recorded the same way (its keys and spec hints)."""
    from .data.formats import read_schema
    from .data.replay_buffer import SPEC_ATTR, DataError
    path = Path(args.out)
    want = recorded_keys(cell, inputs, args.format)
    if args.format == "zarr":
        import zarr
        try:
            have = set(read_schema(path, "zarr"))
            existing = dict(zarr.open_group(str(path), mode="r").attrs.get(SPEC_ATTR, {}) or {})
        except (DataError, OSError, ValueError) as err:
            raise UsageError(f"--append {path}: {err}") from None
        if json.loads(json.dumps(existing)) != json.loads(json.dumps(hints)):
            raise UsageError(f"--append {path}: its spec hints {existing} differ from this recording's {hints} "
                             f"(--fps, --action, --task and the cell's gripper must be the same)")
    else:
        settings = json.loads((path / ".recording" / "writer.json").read_text())
        have = set(settings.get("features") or want)
        if settings.get("fps") != int(round(1 / hints["dt"])):
            raise UsageError(f"--append {path}: recorded at {settings.get('fps')} fps, this recording at "
                             f"{1 / hints['dt']:g}")
    if have != want:
        raise UsageError(f"--append {path}: its keys {sorted(have)} differ from what this cell records "
                         f"{sorted(want)} (the same cameras, gripper and task inputs)")


def spec_hints(task, fps: float, action: str, gripper: bool, cameras: list[str], inputs: dict) -> dict:
    kinds = {"q": "joint_pos", "qd": "joint_vel", "tcp_pose": "tcp_pose", "tcp_speed": "tcp_speed"}
    if gripper:
        kinds["gripper_width"] = "gripper_width"
    kinds.update({k: "task" for k in inputs})
    hints = {"dt": 1.0 / fps, "kinds": kinds,
             "action": {"kind": "joint_pos" if action == "joint" else "tcp_pose", "absolute": True,
                        "gripper": bool(gripper)}}
    if action == "tcp":
        hints["action"]["dims"] = ["x", "y", "z", "rx", "ry", "rz"]
    if task is not None:
        hints["task"] = task.name
    return hints


# ---------------------------------------------------------------------------------------------
# The recording session
# ---------------------------------------------------------------------------------------------
class _Quit(Exception):
    """The operator asked to quit (q)."""


class Recorder:
    """One connected cell, one teleop device, the terminal: episodes recorded into `out`."""

    def __init__(self, rig: Rig, teleop, terminal: Terminal, out: DatasetOut, task, args, fps: float, limits,
                 cell: Cell, scene=None, home=None):
        self.rig, self.robot, self.teleop, self.terminal, self.out = rig, rig.robot, teleop, terminal, out
        self.task, self.args, self.dt, self.limits, self.cell = task, args, 1.0 / fps, limits, cell
        self.scene, self.home = scene, home
        self.servo = args.teleop != "freedrive"
        self.offset = None if not np.any(cell.tcp_offset) else np.asarray(cell.tcp_offset, dtype=float)
        # The box bounds the tool centre (robot.py's sink): the TCP target is checked on the same point.
        self.target = TcpTarget(limits.workspace_lo, limits.workspace_hi, limits.v_max, limits.q_min, limits.q_max,
                                self.offset, cell.tcp_offset[:3])
        self.shaper = TwistShaper(args.max_linear, args.max_angular, args.deadband if args.teleop == "spacemouse" else 0.0)
        self.stroke = rig.gripper.model.stroke_m if rig.gripper is not None else None
        self.g_cmd = self.stroke
        self.rng = np.random.default_rng(args.seed)
        self.cameras = list(rig.cameras)
        self.kept, self.discarded, self.started = [], 0, 0
        self.queued: list[str] = []     # episode keys typed while the arm was moving home
        self.held = ""                  # why the TCP target last did not move as asked
        self.held_steps = 0
        self.late_steps, self.max_late_s = 0, 0.0
        self.retimed_steps = 0          # teleop targets submitted later than the grid (see drive)
        self.ages: dict[str, list[float]] = {c: [] for c in self.cameras}
        self._last_status = 0.0
        self._status_open = False
        self._q_prev_target: np.ndarray | None = None

    # ---- terminal ----
    def say(self, text: str) -> None:
        if self._status_open:
            print(file=sys.stderr)
            self._status_open = False
        print(f"record: {text}", file=sys.stderr, flush=True)

    def keys(self, now: float, motion: bool = True) -> list[str]:
        """Episode events typed since the last call ("enter", "discard", "quit"); motion keys go
        to the device (or are dropped: `motion` False while the arm moves home), space to the gripper."""
        events = []
        for key in self.terminal.keys():
            if key == CTRL_C:
                raise KeyboardInterrupt
            if motion and self.teleop.on_key(key, now):
                continue
            if key == ENTER:
                events.append("enter")
            elif key == BACKSPACE:
                events.append("discard")
            elif key in ("q", "Q"):
                events.append("quit")
            elif key == " " and motion:
                self.gripper_request(TOGGLE)
        return events

    # ---- the arm ----
    def check_robot(self) -> None:
        if self.servo:
            if not self.robot.running or self.robot.fault:
                raise SafetyStop(EXIT_ROBOT_FAULT, f"robot fault: {self.robot.fault or 'the servo loop stopped'}")
            return
        problem = self.robot.status_problem()
        if problem:
            raise SafetyStop(EXIT_ROBOT_FAULT, f"robot fault: {problem}")

    def gripper_request(self, what: str) -> None:
        if self.rig.gripper is None:
            return
        closed = self.g_cmd is not None and self.g_cmd < self.stroke / 2
        width = {OPEN: self.stroke, CLOSE: 0.0, TOGGLE: self.stroke if closed else 0.0}[what]
        try:
            self.rig.command_gripper(width)
        except SensorFault as err:
            raise SafetyStop(EXIT_SENSOR_FAULT, f"sensor fault: {err}") from err
        self.g_cmd = width

    def anchor(self) -> None:
        """The TCP target where the arm is commanded now (after homing, at the start)."""
        if not self.servo:
            return
        cmd = self.robot.scheduler.commanded()
        q = np.asarray(cmd[0]) if cmd is not None else self.robot.joint_positions()
        self.target.reset(q)
        self.shaper.reset()
        self.teleop.stop_motion()
        self._q_prev_target = self.target.q.copy()

    def drive(self, now: float) -> np.ndarray | None:
        """One teleop step: the device's reading -> the next joint target, submitted; None in freedrive."""
        try:
            reading = self.teleop.read(now)
        except TeleopFault as err:
            raise SafetyStop(EXIT_SENSOR_FAULT, f"sensor fault: {err}") from err
        for request in reading.gripper:
            self.gripper_request(request)
        if not self.servo:
            return None
        twist = self.shaper(reading.axes, self.dt)
        step = self.target.step(twist, self.dt, self.args.frame)
        self.held = step.held
        self.held_steps += bool(step.held)
        rows = self.target.chunk(self._q_prev_target, step.q)
        self._q_prev_target = step.q
        # Due one period after the observation, on the time grid; a step that ran past that (a
        # loaded host stalled this process) is re-timed from now, as rows in the past are refused.
        due = now + self.dt
        if due <= time.monotonic():
            due = time.monotonic() + self.dt
            self.retimed_steps += 1
        result = self.robot.scheduler.submit(rows, due, self.dt)
        if not result.accepted:
            raise SafetyStop(EXIT_BAD_VALUES, f"teleop target refused by the scheduler: {result.reason}")
        return step.q

    def go_home(self) -> None:
        """Home through the scheduler (servo modes); episode keys typed meanwhile are kept for after."""
        if not self.servo or self.home is None:
            return
        self.say(f"moving home {np.round(self.home, 3).tolist()}")

        def check():
            self.check_robot()
            events = self.keys(time.monotonic(), motion=False)
            if "quit" in events:
                raise _Quit
            self.queued += [e for e in events if e == "enter"]
        try:
            self.rig.move_home(np.asarray(self.home), self.dt, check, speed=HOME_SPEED_RAD_S)
        except SensorFault as err:
            raise SafetyStop(EXIT_SENSOR_FAULT, f"sensor fault: {err}") from err
        except TimeoutError as err:
            raise SafetyStop(EXIT_ROBOT_FAULT, str(err)) from err
        if self.rig.gripper is not None:
            self.g_cmd = self.stroke

    def observe(self, t: float, inputs: dict):
        try:
            snap = self.rig.snapshot(t, inputs)
        except SensorFault as err:
            raise SafetyStop(EXIT_SENSOR_FAULT, f"sensor fault: {err}") from err
        values = [snap.q, snap.qd] + ([np.array([snap.gripper_width])] if snap.gripper_width is not None else [])
        if not all(np.all(np.isfinite(v)) for v in values):
            raise SafetyStop(EXIT_BAD_VALUES, f"non-finite measurement at t = {t:.3f}: q {snap.q.tolist()}, "
                                              f"qd {snap.qd.tolist()}, gripper {snap.gripper_width}")
        return snap

    # ---- episodes ----
    def run(self) -> None:
        want = self.args.episodes
        self.say(f"teleop {self.teleop.describe()}; keys: Enter start/keep, Backspace discard, space gripper, q quit")
        if self.rig.gripper is not None:
            self.gripper_request(OPEN)
        try:
            while want is None or len(self.kept) < want:
                setup = self.task.sample_episode(self.rng) if self.task is not None else {}
                inputs = self.task.inputs(setup) if self.task is not None else {}
                self.go_home()
                scene = self.set_scene(setup)
                if not self.wait_start(scene, setup):
                    return
                outcome, frames = self.record_episode(setup, inputs)
                if outcome in ("keep", "keep-quit"):
                    self.write(frames, setup)
                elif frames is not None:
                    self.discarded += 1
                    self.say(f"episode discarded ({len(frames['q'])} frames)")
                if outcome in ("quit", "keep-quit"):
                    return
        except _Quit:
            self.say("quit")

    def set_scene(self, setup: dict):
        """Show the episode's scene (the emulator renders it; the first frame recorded shows it); on a
        real cell it is returned for the prompt: the operator sets it up."""
        if self.task is None:
            return None
        scene = self.task.scene(setup)
        if self.scene is None:
            return scene
        try:
            self.scene(scene)
        except (OSError, ValueError, RuntimeError) as err:
            raise SafetyStop(EXIT_SENSOR_FAULT, f"sensor fault: the emulator's scene: {err}") from err
        t_set, deadline = time.monotonic(), time.monotonic() + 1.0
        for cam in self.rig.cameras.values():
            try:
                while time.monotonic() < deadline and cam.latest().t_capture <= t_set:
                    time.sleep(0.005)
            except CameraFault as err:
                raise SafetyStop(EXIT_SENSOR_FAULT, f"sensor fault: {err}") from err
        return None

    def wait_start(self, scene, setup: dict) -> bool:
        """Idle until Enter (True) or q (False); the teleop moves the arm meanwhile."""
        self.anchor()
        n = len(self.kept)
        ask = (f"episode {n} ({self.started} started, {self.discarded} discarded)"
               + (f", setup {json.dumps(json_safe(setup))}" if setup else "") + ": Enter starts, q quits")
        if scene is not None:
            ask = f"set up the scene {json.dumps(json_safe(scene))}; then " + ask
        self.say(ask)
        t0 = time.monotonic()
        for step in range(1 << 62):
            t = t0 + step * self.dt
            time.sleep(max(0.0, t - time.monotonic()))
            self.check_robot()
            now = time.monotonic()
            events, self.queued = self.queued + self.keys(now), []
            for event in events:
                if event == "quit":
                    return False
                if event == "enter":
                    return True
            self.drive(now)
            self.status("ready", now - t0, None)
        return False

    def record_episode(self, setup: dict, inputs: dict):
        """Steps on the absolute time grid until Enter / Backspace / q / --duration: (outcome, frames)."""
        dt, args = self.dt, self.args
        self.started += 1
        steps = int(round(args.duration / dt)) if args.duration else None
        rows: list[dict] = []
        ages: dict[str, list[float]] = {c: [] for c in self.cameras}
        outcome = None
        t0 = time.monotonic()
        self.say(f"recording episode {len(self.kept)}: Enter keeps it, Backspace discards it")
        for step in range(1 << 62):
            t_due = t0 + step * dt
            time.sleep(max(0.0, t_due - time.monotonic()))
            self.check_robot()
            t_obs = time.monotonic()
            late = t_obs - t_due
            if late > 0.5 * dt:
                self.late_steps += 1
            self.max_late_s = max(self.max_late_s, late)
            snap = self.observe(t_obs, inputs)
            for name, f in snap.frames.items():
                ages[name].append((t_obs - f.t_capture) * 1e3)
            events = self.keys(t_obs)
            if "quit" in events:
                outcome = "quit"
            elif "discard" in events:
                outcome = "discard"
            elif "enter" in events:
                outcome = "keep"
            if outcome is not None:
                if not self.servo:   # freedrive: this sample is the last step's action (the next sample)
                    rows.append(self.row(snap, None))
                break
            q_next = self.drive(t_obs)
            rows.append(self.row(snap, q_next))
            self.status("REC", t_obs - t0, len(rows), ages)
            if steps is not None and len(rows) >= steps + (0 if self.servo else 1):
                outcome = "keep"
                break
        if outcome == "quit":
            return "quit", self.frames(rows, inputs) if rows else None
        frames = self.frames(rows, inputs) if len(rows) >= (1 if self.servo else 2) else None
        if frames is None:
            self.say("episode too short to keep (no step recorded)")
            return "discard", None
        if outcome == "keep":
            for name in self.cameras:
                self.ages[name] += ages[name]
        return outcome, frames

    def row(self, snap, q_next) -> dict:
        r = {"q": snap.q, "qd": snap.qd, "width": snap.gripper_width, "q_next": q_next, "g_cmd": self.g_cmd,
             "frames": {name: f.image for name, f in snap.frames.items()}}
        return r

    def frames(self, rows: list[dict], inputs: dict) -> dict[str, np.ndarray]:
        """The episode's arrays: observations and the action of each step."""
        if not self.servo:   # the action is the next sample: the last sample only gives the previous one's
            for a, b in zip(rows[:-1], rows[1:]):
                a["q_next"], a["g_cmd"] = b["q"], a["g_cmd"]
            rows = rows[:-1]
        q = np.stack([r["q"] for r in rows])
        qd = np.stack([r["qd"] for r in rows])
        poses, prev = [], None
        for qi in q:
            p = tcp_pose(qi, self.offset)
            p[3:] = prev = continuous_rotvec(p[3:], prev)
            poses.append(p)
        poses = np.stack(poses)
        out = {"q": q.astype(np.float32), "qd": qd.astype(np.float32), "tcp_pose": poses.astype(np.float32),
               "tcp_speed": np.stack([tcp_speed(a, b, self.offset) for a, b in zip(q, qd)]).astype(np.float32)}
        if self.rig.gripper is not None:
            out["gripper_width"] = np.array([[r["width"]] for r in rows], dtype=np.float32)
        for name in self.cameras:
            out[name] = np.stack([r["frames"][name] for r in rows])
        for key, value in inputs.items():
            out[key] = np.repeat(np.asarray(value, dtype=np.float32).reshape(1, -1), len(rows), axis=0)
        targets = np.stack([r["q_next"] for r in rows])
        if self.args.action == "joint":
            action = targets
        else:
            action = np.empty((len(rows), 6))
            for i, (qt, p) in enumerate(zip(targets, poses)):
                a = tcp_pose(qt, self.offset)
                a[3:] = continuous_rotvec(a[3:], p[3:])   # on the observation's branch
                action[i] = a
        if self.rig.gripper is not None:
            action = np.concatenate([action, np.array([[r["g_cmd"]] for r in rows])], axis=1)
        out["action"] = action.astype(np.float32)
        return out

    def write(self, frames: dict, setup: dict) -> None:
        from .data.replay_buffer import DataError
        try:
            self.out.add(frames, set(self.cameras))
        except DataError as err:   # an --append whose data does not fit the dataset's
            raise SafetyStop(EXIT_USAGE, f"--out {self.out.path}: {err}") from err
        n = len(frames["q"])
        self.kept.append({"frames": n, "duration_s": n * self.dt, "setup": setup})
        self.say(f"episode {len(self.kept) - 1} kept: {n} frames ({n * self.dt:.1f} s) -> {self.out.path}")

    def status(self, what: str, t: float, frames: int | None, ages: dict | None = None) -> None:
        now = time.monotonic()
        tty = sys.stderr.isatty()
        if now - self._last_status < (0.5 if tty else 2.0):
            return
        self._last_status = now
        parts = [f"{what} ep {len(self.kept)} t {t:5.1f} s" + (f" {frames} frames" if frames is not None else "")]
        if ages:
            parts.append("frame age " + " ".join(f"{c} {v[-1]:.0f}" for c, v in ages.items() if v) + " ms")
        if self.servo:
            tw = self.shaper.twist
            parts.append(f"v {np.linalg.norm(tw[:3]):.3f} m/s w {np.linalg.norm(tw[3:]):.2f} rad/s")
            if self.held:
                parts.append(f"held: {self.held}")
        elif self.home is not None:
            q = self.robot.joint_state()[0]
            parts.append(f"{np.max(np.abs(q - self.home)) * 1e3:.0f} mrad from home")
        if self.rig.gripper is not None and self.g_cmd is not None:
            parts.append(f"gripper {'closed' if self.g_cmd < self.stroke / 2 else 'open'}")
        line = " | ".join(parts)
        print(("\r" + line + "\033[K") if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
        self._status_open = tty


def halt(robot, timeout: float = 3.0) -> None:
    """Bring a servoing arm to rest now: a chunk that holds where its braking would stop it replaces
    whatever runs (a home ramp, a teleop step), then the scheduler holds."""
    if robot.scheduler is None or not robot.running:
        return
    cmd = robot.scheduler.commanded()
    if cmd is not None:
        q, v = np.asarray(cmd[0]), np.asarray(cmd[1])
        a = np.asarray(robot.limits.a_max)
        stop = q + v * np.abs(v) / a   # braking at half the limit
        robot.scheduler.submit(np.stack([stop, stop, stop]), _C.monotonic() + 0.02, 0.1)
    bring_to_rest(robot, timeout)


def percentiles(values) -> dict:
    v = np.asarray(values, dtype=float)
    if not len(v):
        return {"p50": None, "p99": None, "max": None, "n": 0}
    return {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)), "max": float(v.max()), "n": len(v)}


def loop_summary(robot) -> dict:
    loop = robot.loop.stats if robot.loop is not None else {}
    return {k: loop.get(k) for k in ("cycles", "late_cycles", "period_error_p50_us", "period_error_p99_us",
                                     "period_error_max_us", "rt_granted", "fault")}


# ---------------------------------------------------------------------------------------------
# Replay
# ---------------------------------------------------------------------------------------------
def load_episode(path: str, index: int) -> tuple[np.ndarray, float, np.ndarray | None]:
    """(the episode's recorded joints (T, 6), its dt, the gripper column of its actions or None)."""
    from .data.formats import detect_format, read_buffer, read_schema
    from .data.replay_buffer import DataError
    try:
        fmt = detect_format(path)
        schema = read_schema(Path(path), fmt)
        qkey = next((k for k in ("q", "observation.q") if k in schema), None)
        if qkey is None:
            raise UsageError(f"--replay {path}: no recorded joints (key q or observation.q; keys: {', '.join(schema)})")
        keys = [qkey] + (["action"] if "action" in schema else [])
        buffer = read_buffer(Path(path), fmt, keys)
    except DataError as err:
        raise UsageError(f"--replay {path}: {err}") from None
    if not 0 <= index < buffer.n_episodes:
        raise UsageError(f"--episode {index}: the dataset has episodes 0 .. {buffer.n_episodes - 1}")
    hints = buffer.spec_hints
    dt = hints.get("dt") or (1.0 / hints["fps"] if hints.get("fps") else None)
    if dt is None:
        raise UsageError(f"--replay {path}: the dataset does not say its rate (spec hints dt or fps)")
    ep = buffer.get_episode(index)
    q = np.asarray(ep[qkey], dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != 6 or len(q) < 2:
        raise UsageError(f"--replay {path}: episode {index}'s {qkey} is {q.shape}, not (T >= 2, 6) joints")
    grip = None
    action = ep.get("action")
    gripper = (hints.get("action") or {}).get("gripper")
    if action is not None and gripper:
        grip = np.asarray(action[:, -1], dtype=np.float64)
    return q, float(dt), grip


def check_path(q: np.ndarray, dt: float, limits: SafetyLimits, tcp_offset) -> None:
    """The recorded path must be one the cell allows: joint ranges, the workspace box, the speed limit."""
    lo, hi = np.asarray(limits.q_min), np.asarray(limits.q_max)
    bad = np.flatnonzero(np.any((q < lo) | (q > hi), axis=1))
    if len(bad):
        raise UsageError(f"--episode: step {bad[0]} leaves the joint ranges of the cell")
    point = np.append(np.asarray(tcp_offset, float)[:3], 1.0)   # the point the box bounds: the tool centre
    p = (fk_matrix(q) @ point)[:, :3]
    out = np.flatnonzero(np.any((p < np.asarray(limits.workspace_lo)) | (p > np.asarray(limits.workspace_hi)), axis=1))
    if len(out):
        raise UsageError(f"--episode: step {out[0]} puts the tool at {np.round(p[out[0]], 3).tolist()}, outside the "
                         f"workspace box {limits.workspace_lo} .. {limits.workspace_hi}")
    speed = np.abs(np.diff(q, axis=0)) / dt
    if np.any(speed > np.asarray(limits.v_max)):
        raise UsageError(f"--episode: the recorded path moves a joint at {speed.max():.2f} rad/s, above the cell's "
                         f"--v-max {min(limits.v_max):g}")


def deviation(q_rec: np.ndarray, t_rec: np.ndarray, states) -> dict:
    """max |measured - recorded| (rad) at the recorded sample times, the measured replay interpolated."""
    t, qm = np.asarray(states["t"]), np.asarray(states["q"])
    if len(t) < 2 or t[0] > t_rec[0] or t[-1] < t_rec[-1]:
        raise SafetyStop(EXIT_INTERNAL, "replay: the measured joint log does not cover the path")
    meas = np.stack([np.interp(t_rec, t, qm[:, j]) for j in range(6)], axis=1)
    err = np.abs(meas - q_rec)
    per_step = err.max(axis=1)
    # The best constant shift (the arm's tracking lag), for the record: the deviation at it.
    lags = np.arange(0.0, 0.1001, 0.002)
    dev_at = []
    for lag in lags:
        if t[-1] < t_rec[-1] + lag:
            break
        m = np.stack([np.interp(t_rec + lag, t, qm[:, j]) for j in range(6)], axis=1)
        dev_at.append(float(np.abs(m - q_rec).max()))
    best = int(np.argmin(dev_at)) if dev_at else 0
    return {"samples": len(t_rec), "max_deviation_mrad": float(per_step.max() * 1e3),
            "p50_deviation_mrad": float(np.percentile(per_step, 50) * 1e3),
            "per_joint_max_mrad": (err.max(axis=0) * 1e3).tolist(),
            "best_lag_ms": float(lags[best] * 1e3) if dev_at else None,
            "max_deviation_at_best_lag_mrad": dev_at[best] * 1e3 if dev_at else None}


def replay(rig: Rig, q: np.ndarray, dt: float, grip: np.ndarray | None, summary: dict) -> None:
    robot = rig.robot

    def check():
        if not robot.running or robot.fault:
            raise SafetyStop(EXIT_ROBOT_FAULT, f"robot fault: {robot.fault or 'the servo loop stopped'}")
    print("record: replay: home to the episode's first pose", file=sys.stderr, flush=True)
    try:
        rig.move_home(q[0], dt, check, speed=HOME_SPEED_RAD_S)
    except TimeoutError as err:
        raise SafetyStop(EXIT_ROBOT_FAULT, str(err)) from err
    except SensorFault as err:
        raise SafetyStop(EXIT_SENSOR_FAULT, f"sensor fault: {err}") from err
    time.sleep(0.2)
    t_first = _C.monotonic() + 0.2
    # The path, then its last pose twice more: the spline's tangent there is zero, the arm stops on it.
    rows = np.vstack([q, q[-1:], q[-1:]])
    result = robot.scheduler.submit(rows, t_first, dt)
    if not result.accepted:
        raise SafetyStop(EXIT_BAD_VALUES, f"replay: the path was refused by the scheduler: {result.reason}")
    print(f"record: replay: {len(q)} steps at {1 / dt:g} Hz ({len(q) * dt:.1f} s)", file=sys.stderr, flush=True)
    t_rec = t_first + dt * np.arange(len(q))
    end = t_rec[-1] + 3 * dt + 0.3
    step = 0
    while time.monotonic() < end:
        check()
        if grip is not None and rig.gripper is not None and step < len(grip) and time.monotonic() >= t_rec[step]:
            try:
                rig.command_gripper(float(grip[step]))
            except SensorFault as err:
                raise SafetyStop(EXIT_SENSOR_FAULT, f"sensor fault: {err}") from err
            step += 1
        time.sleep(0.005)
    summary.update(deviation(q, t_rec, robot.log.states.rows()))


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
class _Terminated(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:
        return int(done.code or 0)
    try:
        stdin_fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):   # no stdin, or one with no file behind it
        stdin_fd = -1
    teleop = None
    try:
        cell = load_cell(args.config) if args.config else (sim_cell(args.sim_version) if args.robot == "sim"
                                                           else Cell(host=args.host or "sim"))
        task = get_task(args.task) if args.task else None
        limits, fps = check_options(args, cell, task, stdin_fd)
        if args.replay is not None:
            q_path, dt_path, grip = load_episode(args.replay, args.episode)
            check_path(q_path, dt_path, limits, cell.tcp_offset)
        else:
            inputs = task.inputs(task.sample_episode(np.random.default_rng(0))) if task is not None else {}
            hints = spec_hints(task, fps, args.action, cell.gripper.kind == "robotiq", list(cell.cameras), inputs)
            if args.append:
                check_append(args, hints, cell, inputs)
            teleop = make_teleop(args)
    except (UsageError, CellError, TeleopUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyError as err:
        print(f"error: --task {args.task}: {err.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    sys.setswitchinterval(0.001)   # the servo pump waits at most ~1 ms for the GIL
    out_dir = Path(args.log_dir)
    host = args.host or ("127.0.0.1" if args.robot == "sim" or cell.sim else cell.host)
    emulator = None
    if args.robot == "sim":
        from .ursim import EmulatorProcess
        emulator = EmulatorProcess(host, args.sim_version, control_port=0)
    robot = make_robot(host, limits, args, cell, out_dir / "stream")
    gripper = cell.gripper.kind == "robotiq"
    cameras = list(cell.cameras) if args.replay is None else []
    rig = Rig.for_cell(cell, robot, cameras, gripper, {}, host, emulator)
    summary: dict = {"mode": "replay" if args.replay is not None else "record", "robot": args.robot, "host": host}
    code, message, trace = EXIT_OK, "done", None
    recorder = out = terminal = None
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if main_thread:
        def terminated(*_):
            raise _Terminated
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, terminated)
    try:
        try:
            rig.connect()
        except (ConnectionError, RuntimeError) as err:
            if isinstance(err, SensorFault):
                raise SafetyStop(EXIT_SENSOR_FAULT, f"sensor fault: {err}") from err
            raise SafetyStop(EXIT_ROBOT_FAULT, f"cannot connect to the controller at {host}: {err}") from err
        print(f"record: connected to {host} (controller {robot.controller_major}.x), servo {robot.frequency:.0f} Hz"
              + (f"; cameras {', '.join(rig.cameras)}" if rig.cameras else "") + ("; gripper" if rig.gripper else ""),
              file=sys.stderr, flush=True)
        if args.replay is not None:
            summary.update(dataset=str(args.replay), episode=args.episode, dt=dt_path)
            robot.start()
            replay(rig, q_path, dt_path, grip, summary)
            message = (f"replayed episode {args.episode}: max deviation {summary['max_deviation_mrad']:.2f} mrad "
                       f"(p50 {summary['p50_deviation_mrad']:.2f}) over {summary['samples']} samples")
        else:
            out = DatasetOut(Path(args.out), args.format, fps, hints, task.name if task else None, args.overwrite,
                             args.append)
            summary.update(teleop=args.teleop, out=str(args.out), format=args.format, fps=fps, action=args.action,
                           task=task.name if task else None, spec_hints=hints)
            home = cell.home if cell.home is not None else (task.q_home if task is not None else None)
            if home is None:
                home = robot.joint_positions()   # where the arm was at the start
            terminal = Terminal(stdin_fd).open()
            if main_thread:
                # Ctrl-C seen in the run's own key stream as well: a KeyboardInterrupt raised inside
                # code that swallows it (we saw a recorder go on for 60 s after one) still ends the
                # run at its next step.
                def interrupted(*_):
                    terminal.note_interrupt()
                    raise KeyboardInterrupt
                previous[signal.SIGINT] = signal.signal(signal.SIGINT, interrupted)
            scene = (lambda s: SimScene((host, SIM_CAMERA_PORT)).set(**s)) if emulated(args, cell) else None
            recorder = Recorder(rig, teleop, terminal, out, task, args, fps, limits, cell, scene, np.asarray(home))
            if args.teleop == "freedrive":
                try:
                    teleop.engage(robot)
                except RuntimeError as err:
                    raise SafetyStop(EXIT_ROBOT_FAULT, f"teach mode refused: {err}") from err
            else:
                robot.start()
            recorder.run()
            message = f"{len(recorder.kept)} episodes kept, {recorder.discarded} discarded"
    except SafetyStop as stop:
        code, message = stop.code, str(stop)
    except LimitError as err:
        code, message = EXIT_USAGE, f"--{err.field.replace('_', '-')}: {err.reason}"
    except KeyboardInterrupt:
        code, message = 130, "interrupted"
    except _Terminated:
        code, message = EXIT_TERMINATED, "terminated (SIGTERM)"
    except Exception as err:
        code, message, trace = EXIT_INTERNAL, f"internal error: {type(err).__name__}: {err}", traceback.format_exc()
    finally:
        if main_thread:   # a second Ctrl-C or a SIGTERM must not cut the stop sequence short
            previous.setdefault(signal.SIGINT, signal.getsignal(signal.SIGINT))
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
        try:
            # Every exit path: the arm to rest where the loop runs (not after a robot fault: the
            # controller stopped it), teach mode off, stop; then every finished episode written.
            if code != EXIT_ROBOT_FAULT and robot.running:
                halt(robot)
            if isinstance(teleop, FreedriveTeleop):
                try:
                    teleop.release()
                except RuntimeError as err:
                    summary["teach_mode_end"] = str(err)
            robot.stop()
            if robot.fault and code == EXIT_OK:
                code, message = EXIT_ROBOT_FAULT, f"robot fault: {robot.fault}"
            if out is not None:
                try:
                    out.close()
                except Exception as err:   # the episodes are on disk as far as the writer got
                    if code == EXIT_OK:
                        code, message, trace = EXIT_INTERNAL, f"dataset close failed: {err}", traceback.format_exc()
        finally:
            if terminal is not None:
                terminal.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        summary.update(exit_code=code, message=message)
        if recorder is not None:
            summary.update(episodes_kept=len(recorder.kept), episodes_discarded=recorder.discarded,
                           per_episode=recorder.kept, late_steps=recorder.late_steps,
                           retimed_steps=recorder.retimed_steps,
                           max_late_ms=recorder.max_late_s * 1e3, teleop_held_steps=recorder.held_steps,
                           cameras={c: {"frame_age_ms": percentiles(v), **rig.cameras[c].stats}
                                    for c, v in recorder.ages.items()})
        summary.update(loop=loop_summary(robot), stop_sequence=[[t, w] for t, w in robot.stop_log],
                       scheduler=dict(robot.scheduler.stats) if robot.scheduler is not None else {},
                       gripper=rig.gripper.stats if rig.gripper is not None else None)
        if trace:
            summary["traceback"] = trace
            print(trace, file=sys.stderr)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))
        save_commands(out_dir, robot)
        rig.close()
        if teleop is not None:
            teleop.close()
    print_summary(summary, out_dir)
    return code


def save_commands(out_dir: Path, robot) -> None:
    """run.npz: every command the pump sent (its loop slot time, q, v) and every state it measured;
    the streamed logs it comes from are removed once it is written (a run that dies keeps them)."""
    log = robot.log
    cmds, states = log.commands.rows(), log.states.rows()
    np.savez_compressed(out_dir / "run.npz", cmd_t_slot=cmds["t_slot"], cmd_t_sent=cmds["t_sent"], cmd_q=cmds["q"],
                        cmd_v=cmds["v"], state_t=states["t"], state_q=states["q"])
    del cmds, states
    log.close(remove=True)


def print_summary(s: dict, out_dir: Path) -> None:
    print(f"\n== record: {s['message']} (exit {s['exit_code']}) ==")
    for name, c in (s.get("cameras") or {}).items():
        a = c["frame_age_ms"]
        if a["n"]:
            print(f"camera {name}: frame age at the recorded steps p50 {a['p50']:.0f} ms, p99 {a['p99']:.0f} ms, "
                  f"max {a['max']:.0f} ms")
    if s.get("mode") == "record" and s.get("episodes_kept"):
        print(f"dataset: {s['out']} ({s['format']}, {s['episodes_kept']} episodes, {s['fps']:g} Hz)")
    loop = s.get("loop") or {}
    if loop.get("cycles"):
        print(f"servo loop: {loop['cycles']} cycles, period error p99 {loop['period_error_p99_us']:.0f} us, "
              f"late {loop['late_cycles']}")
    print(f"summary: {out_dir / 'summary.json'}")


if __name__ == "__main__":
    exit_code = main()
    if ur5_left_wedged():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    raise SystemExit(exit_code)
