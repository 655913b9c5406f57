"""`python -m dpag_engine.record` against the UR controller emulator through the real ur_rtde client.

The operator is scripted at each device's boundary: a fake pyspacemouse (tests/fakes, installed in
sys.modules) plays a motion chosen afresh each run, the terminal is a pseudo-terminal (the keys are
written to its master side; the keyboard runs are the CLI in a child process with the pty as its
stdin), and freedrive is the emulator's teach_path, the operator's hand. Each test waits for the
recorder's own prompts on stderr before pressing a key; no pass/fail depends on timing beyond
generous bounds (an episode's length is whatever the machine gave; the checks are on the data).

What the data must be: the replay buffer's checks pass (read_replay_buffer) or it opens as LeRobot
v3 (read_lerobot), every key the recorder promises is there with its shape, the motion recorded is
the motion asked for, the actions are what the arm was commanded (or, in freedrive, the next
sample), every command the controller got stayed inside the limits and the box, the arm ended at
rest with servoStop + stopScript, and a replay reproduces the recorded joint path within 5 mrad.
"""
import json
import math
import os
import pty
import re
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dpag_engine import record
from dpag_engine.data.lerobot import read_lerobot
from dpag_engine.data.replay_buffer import read_replay_buffer
from dpag_engine.envs.ur5_reach import ReachTask
from dpag_engine.kinematics import fk_matrix, forward_kinematics, matrix_from_rotvec
from dpag_engine.rig import Rig
from dpag_engine.robot import SafetyLimits
from dpag_engine.session import EXIT_OK, EXIT_SENSOR_FAULT, EXIT_USAGE
from dpag_engine.spec import build_spec, merge_hints
from dpag_engine.teleop import (KeyboardTeleop, SpaceMouseTeleop, TcpTarget, TeleopFault, Terminal, TwistShaper,
                                apply_deadband, continuous_rotvec, parse_axis_map)
from dpag_engine.ursim import wait_until
from factories import running_emulator

pytest.importorskip("rtde_control")

HOST, CONTROL_PORT = "127.0.0.51", 30151
FAKES = Path(__file__).parent / "fakes"
ROOT = Path(__file__).resolve().parents[1]
HOME = np.array(ReachTask().q_home)
HOME_TCP = forward_kinematics(HOME)
V_MAX, A_MAX = 1.0, 8.0
rng = np.random.default_rng()   # fresh each run


@pytest.fixture(scope="module")
def emu():
    yield from running_emulator(HOST, "3.15", CONTROL_PORT)


def fresh(emu):
    emu.control.reset_faults()
    emu.control.stop_program()
    emu.control.set_joint_positions(q=HOME.tolist())
    emu.control.clear_command_log()
    for cam in ("scene", "wrist"):
        emu.control.camera_freeze(camera=cam, seconds=0)
    emu.control.gripper_freeze(seconds=0)


def cell_toml(tmp_path: Path, cameras=("scene", "wrist"), gripper=True, name="cell.toml") -> str:
    text = [f'[robot]\nhost = "{HOST}"\nhome = {HOME.tolist()}\n', f"[limits]\nv_max = {V_MAX}\na_max = {A_MAX}\n"]
    text += [f'[cameras.{c}]\nsource = "sim:{c}"\nfps = 30\nresolution = [48, 64]\n' for c in cameras]
    text.append(f'[gripper]\nkind = "{"robotiq" if gripper else "none"}"\n')
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text("\n".join(text))
    return str(path)


def load_fake_spacemouse():
    import importlib.util
    spec = importlib.util.spec_from_file_location("fake_pyspacemouse", FAKES / "pyspacemouse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Operator:
    """The terminal's other side: reads the recorder's output lines, presses keys on the pty."""

    def __init__(self):
        self.master, self.slave = pty.openpty()
        self.lines: list[str] = []
        self.cursor = 0
        self._lock = threading.Lock()
        self._ended = threading.Event()     # the stream reached its end: every line is in

    def follow(self, stream) -> None:
        def read():
            for line in stream:
                with self._lock:
                    self.lines.append(line)
            self._ended.set()
        threading.Thread(target=read, daemon=True).start()

    def wait(self, pattern: str, timeout: float = 40.0) -> re.Match:
        """The next line (after the previous match) matching `pattern`; fails at once, with the
        program's last words, if its output ended without one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ended = self._ended.is_set()
            with self._lock:
                for i in range(self.cursor, len(self.lines)):
                    m = re.search(pattern, self.lines[i])
                    if m:
                        self.cursor = i + 1
                        return m
            if ended:
                raise AssertionError(f"the output ended without a line matching {pattern!r}:\n{self.text()[-3000:]}")
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s; output:\n{self.text()[-3000:]}")

    def press(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def text(self) -> str:
        with self._lock:
            return "".join(self.lines)

    def close(self) -> None:
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


class InProcess:
    """record.main on a thread with the pty as stdin and stderr into the operator (the fake
    SpaceMouse lives in this process's sys.modules)."""

    def __init__(self, monkeypatch, argv):
        self.op = Operator()
        r, w = os.pipe()
        self.op.follow(os.fdopen(r, "r", errors="replace"))
        self._err = os.fdopen(w, "w", buffering=1)
        monkeypatch.setattr(sys, "stdin", os.fdopen(os.dup(self.op.slave), "rb", buffering=0))
        monkeypatch.setattr(sys, "stderr", self._err)
        self.code = None
        self.thread = threading.Thread(target=lambda: setattr(self, "code", record.main(argv)), daemon=True)
        self.thread.start()

    def join(self, timeout=60.0) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "record did not return:\n" + self.op.text()[-3000:]
        self._err.close()
        return self.code


class Child:
    """The CLI in a child process, the pty its stdin (and its controlling terminal's settings)."""

    def __init__(self, argv):
        self.op = Operator()
        self.before = termios.tcgetattr(self.op.slave)
        # stderr and stdout (the closing summary, flushed at exit) in one stream: the operator sees both.
        self.proc = subprocess.Popen([sys.executable, "-m", "dpag_engine.record", *argv], stdin=self.op.slave,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                     errors="replace")
        self.op.follow(self.proc.stdout)

    def join(self, timeout=60.0) -> int:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("record did not exit:\n" + self.op.text()[-3000:])
        return self.proc.returncode


def summary_of(log_dir: Path) -> dict:
    return json.loads((log_dir / "summary.json").read_text())


def check_commands(emu, log_dir: Path, workspace_lo=SafetyLimits().workspace_lo):
    """Every servoJ the controller got is one the run logged, within the joint, velocity and
    acceleration limits and inside the box; the last commands were servoStop then stopScript."""
    log = emu.control.command_log()
    servoj = np.array([e["doubles"][:6] for e in log if e["name"] == "servoJ"])
    run = np.load(log_dir / "run.npz")
    assert len(servoj) > 10 and np.allclose(servoj, run["cmd_q"][:len(servoj)])
    t = run["cmd_t_slot"][:len(servoj)]
    dt = np.diff(t)
    v = np.diff(servoj, axis=0) / dt[:, None]
    assert np.abs(v).max() <= V_MAX * (1 + 1e-6)
    a = np.diff(v, axis=0) / (0.5 * (dt[1:] + dt[:-1]))[:, None]
    assert np.abs(a).max() <= A_MAX * (1 + 1e-6)
    p = fk_matrix(servoj)[:, :3, 3]
    assert np.all(p >= np.array(workspace_lo) - 1e-9) and np.all(p <= np.array(SafetyLimits().workspace_hi))
    assert wait_until(lambda: [e["name"] for e in emu.control.command_log() if e["name"] != "servoJ"][-2:]
                      == ["servoStop", "stopScript"], 3.0)
    return servoj


def spec_from(buffer, state_keys, action_key="action"):
    state = [(k, None, int(np.prod(buffer.data[k].shape[1:]))) for k in state_keys]
    return build_spec(state, [], None, buffer.data[action_key].shape[1], merge_hints(buffer.spec_hints))


def unit_xy(angle):
    return np.array([math.cos(angle), math.sin(angle), 0.0])


# ---------------------------------------------------------------------------------------------
# The teleop parts, without an arm
# ---------------------------------------------------------------------------------------------
def test_deadband_shaping_and_the_slew_limit():
    a = rng.uniform(-1, 1, 6)
    out = apply_deadband(a, 0.2)
    assert np.all(out[np.abs(a) <= 0.2] == 0)
    big = np.abs(a) > 0.2
    assert np.allclose(out[big], np.sign(a[big]) * (np.abs(a[big]) - 0.2) / 0.8)
    assert np.allclose(apply_deadband(np.ones(6) * 1.7, 0.2), 1.0)      # clipped, full scale reached
    shaper = TwistShaper(0.1, 0.4, deadband=0.0, ramp_s=0.3)
    steps = [shaper(np.ones(6), 0.1) for _ in range(5)]
    assert np.allclose(steps[0], [0.1 / 3] * 3 + [0.4 / 3] * 3) and np.allclose(steps[-1], [0.1] * 3 + [0.4] * 3)


def test_the_tcp_target_follows_the_twist_and_stays_in_the_box():
    lim = SafetyLimits(v_max=(V_MAX,) * 6)
    z_lo = HOME_TCP[2] - 0.05
    target = TcpTarget((-0.85, -0.85, z_lo), lim.workspace_hi, lim.v_max, lim.q_min, lim.q_max)
    target.reset(HOME)
    direction = unit_xy(rng.uniform(0, 2 * np.pi))
    for _ in range(10):                                  # 10 steps of 0.05 m/s in the base frame
        step = target.step(np.concatenate([0.05 * direction, np.zeros(3)]), 0.1)
        assert step.held == ""
    moved = forward_kinematics(step.q) - HOME_TCP
    assert np.allclose(moved[:3], 0.05 * direction, atol=1e-5)
    assert np.allclose(matrix_from_rotvec(forward_kinematics(step.q)[3:]), matrix_from_rotvec(HOME_TCP[3:]), atol=1e-5)
    for _ in range(20):                                  # down at 0.1 m/s for 2 s: stops 1 cm above the floor
        step = target.step(np.array([0, 0, -0.1, 0, 0, 0]), 0.1)
    assert step.held == "workspace box"
    assert abs(forward_kinematics(step.q)[2] - (z_lo + 0.01)) < 1e-6
    # A rotation in the tool frame keeps the TCP where it is.
    before = forward_kinematics(step.q)[:3]
    step = target.step(np.array([0, 0, 0, 0, 0, 0.3]), 0.1, frame="tool")
    assert np.allclose(forward_kinematics(step.q)[:3], before, atol=1e-6)
    # The next chunk extrapolates one step, and holds where that would leave the box.
    q0 = target.q.copy()
    step = target.step(np.array([0, 0, -0.1, 0, 0, 0]), 0.1)
    assert np.array_equal(target.chunk(q0, step.q), np.stack([step.q, step.q]))


def test_rotation_vectors_stay_on_one_branch():
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angles = np.linspace(np.pi - 0.05, np.pi + 0.05, 21)      # through a half turn: the short vector flips
    short = [(a if a <= np.pi else a - 2 * np.pi) * axis for a in angles]
    prev, out = None, []
    for rv in short:
        prev = continuous_rotvec(rv, prev)
        out.append(prev)
    assert np.max(np.linalg.norm(np.diff(out, axis=0), axis=1)) < 0.01
    for rv, c in zip(short, out):
        assert np.allclose(matrix_from_rotvec(rv), matrix_from_rotvec(c), atol=1e-9)


def test_the_terminal_reads_raw_keys_and_restores_its_settings():
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        with Terminal(slave) as term:
            os.write(master, b"w\r\n\x7f \x1b[Aq")      # (Ctrl-C stays a signal: ISIG is kept)
            time.sleep(0.05)
            assert term.keys() == ["w", "\n", "\x7f", " ", "up", "q"]
            os.write(master, b"d")
            time.sleep(0.05)
            term.note_interrupt()                       # a SIGINT's handler: reported first, once
            assert term.keys() == ["ctrl-c"] and term.keys() == ["d"] and term.keys() == []
            assert termios.tcgetattr(slave)[3] & termios.ISIG
            assert not termios.tcgetattr(slave)[3] & termios.ECHO
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)
    kb = KeyboardTeleop(hold_s=0.5)
    assert kb.on_key("w", 10.0) and kb.on_key("u", 10.2) and not kb.on_key("q", 10.2)
    assert np.array_equal(kb.read(10.3).axes, [1, 0, 0, 0, 0, 1])
    assert np.array_equal(kb.read(10.6).axes, [0, 0, 0, 0, 0, 1])   # w let go 0.6 s ago
    kb.on_key("x", 10.6)
    assert not kb.read(10.61).axes.any()


def test_the_spacemouse_device_through_the_fake(monkeypatch):
    fake = load_fake_spacemouse()
    monkeypatch.setitem(sys.modules, "pyspacemouse", fake)
    want = rng.uniform(-1, 1, 6)
    fake.script = lambda t: (want, [1, 0] if t > 0.05 else [0, 0])
    dev = SpaceMouseTeleop(parse_axis_map("-y x z -pitch roll yaw"))
    dev.open()
    assert fake.opened[0]["axis_convention"] == fake.AxisConvention.HID_Z_UP
    time.sleep(0.1)
    reading = dev.read(time.monotonic())
    assert np.allclose(reading.axes, [-want[1], want[0], want[2], -want[4], want[3], want[5]])
    assert reading.gripper == ["close"]                 # button 0's press, once
    assert dev.read(time.monotonic()).gripper == []
    fake.fail_after_s = 0.0
    with pytest.raises(TeleopFault, match="read failed"):
        dev.read(time.monotonic())
    dev.close()
    assert fake.closed == 1
    with pytest.raises(ValueError, match="each device axis once"):
        parse_axis_map("x x z roll pitch yaw")


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, named", [
    (["--fps", "0"], "--fps"), (["--fps", "nan"], "--fps"), (["--fps", "7.5", "--format", "lerobot"], "--fps"),
    (["--max-linear", "2"], "--max-linear"), (["--max-angular", "-1"], "--max-angular"),
    (["--deadband", "0.95"], "--deadband"), (["--axis-map", "x y z"], "--axis-map"),
    (["--task", "ur5_reach", "--fps", "20"], "--fps"), (["--task", "nope"], "--task"),
    (["--v-max", "2.0"], "--v-max"),
    (["--workspace", "-2", "-1", "0", "1", "1", "1"], "--workspace"), (["--episodes", "0"], "--episodes"),
    (["--duration", "0.01"], "--duration"), (["--episode", "1"], "--episode"),
    (["--append"], "--out"), (["--append", "--overwrite"], "--append"),
])
def test_a_bad_option_exits_1_naming_it_before_connecting(emu, tmp_path, monkeypatch, capsys, extra, named):
    fresh(emu)
    clients = emu.control.snapshot()["rtde_clients"]
    master, slave = pty.openpty()
    monkeypatch.setattr(sys, "stdin", os.fdopen(slave, "rb", buffering=0))
    try:
        code = record.main(["--robot", "ur5", "--config", cell_toml(tmp_path), "--teleop", "keyboard",
                            "--out", str(tmp_path / "d.zarr"), "--log-dir", str(tmp_path / "log"), *extra])
    finally:
        os.close(master)
    assert code == EXIT_USAGE
    assert named in capsys.readouterr().err
    assert emu.control.command_log() == [] and emu.control.snapshot()["rtde_clients"] == clients
    assert not (tmp_path / "d.zarr").exists()


def test_what_needs_a_terminal_a_device_or_a_fresh_path_is_refused_first(emu, tmp_path, monkeypatch, capsys):
    fresh(emu)
    base = ["--robot", "ur5", "--config", cell_toml(tmp_path), "--log-dir", str(tmp_path / "log")]
    r, w = os.pipe()                                         # stdin that is not a terminal
    monkeypatch.setattr(sys, "stdin", os.fdopen(r, "rb", buffering=0))
    assert record.main([*base, "--teleop", "keyboard", "--out", str(tmp_path / "d.zarr")]) == EXIT_USAGE
    assert "run record at a terminal" in capsys.readouterr().err
    os.close(w)
    master, slave = pty.openpty()
    monkeypatch.setattr(sys, "stdin", os.fdopen(slave, "rb", buffering=0))
    monkeypatch.setitem(sys.modules, "pyspacemouse", None)  # not installed
    assert record.main([*base, "--teleop", "spacemouse", "--out", str(tmp_path / "d.zarr")]) == EXIT_USAGE
    assert "needs the pyspacemouse package" in capsys.readouterr().err
    fake = load_fake_spacemouse()
    fake.devices.clear()                                     # installed, nothing plugged in
    monkeypatch.setitem(sys.modules, "pyspacemouse", fake)
    assert record.main([*base, "--teleop", "spacemouse", "--out", str(tmp_path / "d.zarr")]) == EXIT_USAGE
    assert "no SpaceMouse could be opened" in capsys.readouterr().err
    (tmp_path / "old.zarr").mkdir()
    assert record.main([*base, "--teleop", "keyboard", "--out", str(tmp_path / "old.zarr")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--out" in err and "exists" in err
    assert record.main([*base, "--teleop", "keyboard", "--out", str(tmp_path / "d.zarr.zip")]) == EXIT_USAGE
    assert "record into a directory" in capsys.readouterr().err
    os.close(master)
    assert emu.control.command_log() == []


# ---------------------------------------------------------------------------------------------
# SpaceMouse: three episodes (and a discarded one) into zarr
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spacemouse_run(emu, tmp_path_factory):
    """Three kept episodes and one discarded: 0 moves in a fresh random direction of the xy plane,
    1 another one while button 0 closes the gripper, 2 presses down into a box floor 4 cm below
    home. Returns (log dir, dataset, the directions)."""
    tmp = tmp_path_factory.mktemp("spacemouse")
    fresh(emu)
    fake = load_fake_spacemouse()
    z_lo = float(HOME_TCP[2] - 0.04)
    out, log_dir = tmp / "demos.zarr", tmp / "log"
    argv = ["--robot", "ur5", "--config", cell_toml(tmp), "--teleop", "spacemouse", "--out", str(out),
            "--episodes", "3", "--max-linear", "0.1", "--deadband", "0.1", "--no-rt", "--log-dir", str(log_dir),
            "--workspace", "-0.85", "-0.85", str(z_lo), "0.85", "0.85", "1.0"]
    angles = rng.uniform(0, 2 * np.pi, 2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "pyspacemouse", fake)
        run = InProcess(mp, argv)
        op = run.op

        def episode(axes, seconds, key="\n", buttons_at=None):
            op.wait(r"Enter starts")
            t_start = [None]

            def script(t):
                if t_start[0] is None:
                    t_start[0] = t
                pressed = buttons_at is not None and t - t_start[0] > buttons_at
                return axes, [1 if pressed else 0, 0]
            fake.script = script
            op.press("\n")
            op.wait(r"recording episode")
            time.sleep(seconds)
            op.press(key)
            op.wait(r"kept|discarded")
            fake.script = None

        episode((0.7 * math.cos(angles[0]), 0.7 * math.sin(angles[0]), 0, 0, 0, 0), 1.5)
        episode((0, 0, 0.7, 0, 0, 0), 0.6, key="\x7f")                      # discarded
        episode((0.7 * math.cos(angles[1]), 0.7 * math.sin(angles[1]), 0, 0, 0, 0), 1.5, buttons_at=0.3)
        episode((0, 0, -1.0, 0, 0, 0), 1.5)
        code = run.join()
    assert code == EXIT_OK, run.op.text()[-3000:]
    assert fake.opened[0]["axis_convention"] == fake.AxisConvention.HID_Z_UP and fake.closed == 1
    return log_dir, out, angles, z_lo, run.op.text()


def test_spacemouse_episodes_are_recorded_as_driven(emu, spacemouse_run):
    log_dir, out, angles, z_lo, stderr = spacemouse_run
    buf = read_replay_buffer(out)
    assert buf.n_episodes == 3
    n = buf.n_steps
    shapes = {k: v.shape[1:] for k, v in buf.data.items()}
    assert shapes == {"q": (6,), "qd": (6,), "tcp_pose": (6,), "tcp_speed": (6,), "gripper_width": (1,),
                      "scene": (48, 64, 3), "wrist": (48, 64, 3), "action": (7,)}
    assert buf.data["scene"].dtype == np.uint8 and all(len(v) == n for v in buf.data.values())
    assert buf.spec_hints["dt"] == pytest.approx(0.1)
    assert buf.spec_hints["action"] == {"kind": "joint_pos", "absolute": True, "gripper": True}
    # What training makes of it: q + gripper -> joint targets + a gripper column at 10 Hz.
    spec, why = spec_from(buf, ["q", "gripper_width"])
    assert spec is not None, why
    assert [f.kind for f in spec.obs] == ["joint_pos", "gripper_width"] and spec.action.gripper and spec.dt == 0.1
    for i, angle in enumerate(angles):
        ep = buf.get_episode(i if i == 0 else 1)
        tcp = ep["tcp_pose"].astype(float)
        assert np.allclose(tcp[0], HOME_TCP, atol=2e-3)          # each episode starts at home
        # The deadband acts per axis (rescaled): an axis reading near 0.1 all but vanishes.
        axes = 0.7 * unit_xy(angle)
        twist = np.sign(axes) * np.maximum(np.abs(axes) - 0.1, 0.0) / 0.9 * 0.1     # at --max-linear
        v = np.linalg.norm(twist)
        moved = tcp[-1, :3] - tcp[0, :3]
        assert np.dot(moved / np.linalg.norm(moved), twist / v) > 0.99, (moved, twist)
        steady = np.linalg.norm(np.diff(tcp[4:, :3], axis=0), axis=1)   # past the 0.3 s ramp
        assert abs(np.median(steady) - v * 0.1) < 0.25 * v * 0.1, np.median(steady)
        # The orientation is held while translating.
        rot = [matrix_from_rotvec(r) for r in tcp[:, 3:]]
        assert max(np.abs(r - rot[0]).max() for r in rot) < 2e-3
        # Each action is the joint target commanded for the next step; the arm got there (tracking lag only).
        q, act = ep["q"].astype(float), ep["action"][:, :6].astype(float)
        assert np.abs(q[1:] - act[:-1]).max() < 0.01
    grip = buf.get_episode(1)
    assert grip["action"][0, 6] == pytest.approx(0.085, abs=1e-6) and grip["action"][-1, 6] == 0.0
    assert grip["gripper_width"][-1, 0] < grip["gripper_width"][0, 0] - 0.02
    assert np.all(buf.get_episode(0)["action"][:, 6] == pytest.approx(0.085, abs=1e-6))
    down = buf.get_episode(2)["tcp_pose"][:, 2].astype(float)
    assert down.min() >= z_lo and abs(down[-1] - (z_lo + 0.01)) < 3e-3   # stopped 1 cm above the box floor
    s = summary_of(log_dir)
    assert s["exit_code"] == 0 and s["episodes_kept"] == 3 and s["episodes_discarded"] == 1
    assert s["teleop_held_steps"] > 0                           # the box floor held the target
    for cam in ("scene", "wrist"):
        assert 0 <= s["cameras"][cam]["frame_age_ms"]["p50"] < 60, s["cameras"][cam]
    check_commands(emu, log_dir, workspace_lo=(-0.85, -0.85, z_lo))


def replay_random_episode(emu, out, tmp_path) -> tuple[dict, int]:
    """Replay one of the 3 recorded episodes at random on the emulator; (its summary, its index),
    after checking it followed the recorded path within 5 mrad up to a tracking lag of at most
    5 servo periods, and within every limit (at that lag: 0.1-0.6 mrad on a quiet host, 2.9 on a
    loaded one; without it the error is lag x joint speed, 1.5-5.5 mrad)."""
    fresh(emu)
    log_dir = tmp_path / "replay"
    episode = int(rng.integers(0, 3))
    code = record.main(["--robot", "ur5", "--config", cell_toml(tmp_path), "--replay", str(out), "--episode",
                        str(episode), "--no-rt", "--log-dir", str(log_dir)])
    s = summary_of(log_dir)
    assert code == EXIT_OK, s["message"]
    assert s["max_deviation_at_best_lag_mrad"] < 5.0 and s["best_lag_ms"] <= 40.0, s
    check_commands(emu, log_dir)
    return s, episode


def test_replay_reproduces_the_recorded_joint_path(emu, spacemouse_run, tmp_path):
    _, out, *_ = spacemouse_run
    s, episode = replay_random_episode(emu, out, tmp_path)
    assert s["samples"] == len(read_replay_buffer(out).get_episode(episode)["q"])


# ---------------------------------------------------------------------------------------------
# Keyboard: the CLI in a child process on a pseudo-terminal, into LeRobot v3
# ---------------------------------------------------------------------------------------------
def hold_key(op: Operator, key: str, seconds: float, rate_hz: float = 25.0) -> None:
    """A held key as a terminal delivers it: the character repeated (typematic) for `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        op.press(key)
        time.sleep(1.0 / rate_hz)


KEY_DIRECTIONS = {"w": (0, 1), "s": (0, -1), "a": (1, 1), "d": (1, -1), "r": (2, 1)}


def test_keyboard_episodes_into_lerobot_from_a_terminal(emu, tmp_path):
    fresh(emu)
    out, log_dir = tmp_path / "demos", tmp_path / "log"
    child = Child(["--robot", "ur5", "--config", cell_toml(tmp_path), "--teleop", "keyboard", "--format", "lerobot",
                   "--out", str(out), "--episodes", "3", "--max-linear", "0.08", "--no-rt", "--log-dir", str(log_dir)])
    op = child.op
    keys = list(rng.choice(list(KEY_DIRECTIONS), 3, replace=False))
    for i, key in enumerate(keys):
        op.wait(r"Enter starts")
        op.press("\r")
        op.wait(r"recording episode")
        hold_key(op, key, 1.2)
        if i == 1:
            op.press(" ")                   # the gripper closes
            time.sleep(0.6)
        op.press("x\r")                     # stop moving, keep
        op.wait(r"kept")
    code = child.join()
    assert code == EXIT_OK, op.text()[-3000:]
    assert termios.tcgetattr(op.slave) == child.before      # the terminal is as it was
    op.close()
    buf = read_lerobot(out)
    assert buf.n_episodes == 3 and buf.spec_hints["fps"] == 10     # read back from info.json's dpag_spec
    assert buf.spec_hints["action"]["kind"] == "joint_pos" and buf.spec_hints["kinds"]["q"] == "joint_pos"
    assert {k: v.shape[1:] for k, v in buf.data.items()} == {
        "observation.q": (6,), "observation.qd": (6,), "observation.tcp_pose": (6,), "observation.tcp_speed": (6,),
        "observation.gripper_width": (), "observation.images.scene": (48, 64, 3),   # LeRobot: a 1-vector is a scalar
        "observation.images.wrist": (48, 64, 3), "action": (7,)}
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["dpag_spec"]["action"]["gripper"] and info["robot_type"] == "ur5"
    # Training's names resolve as for zarr (q -> observation.q), and the kinds come from the names.
    spec, why = spec_from(buf, ["observation.q", "observation.gripper_width"])
    assert spec is not None and [f.kind for f in spec.obs] == ["joint_pos", "gripper_width"], why
    assert spec.action.kind == "joint_pos" and spec.action.gripper and spec.dt == pytest.approx(0.1)
    for i, key in enumerate(keys):
        ep = buf.get_episode(i)
        tcp = ep["observation.tcp_pose"].astype(float)
        axis, sign = KEY_DIRECTIONS[key]
        moved = tcp[-1, :3] - tcp[0, :3]
        # 1.2 s at 0.08 m/s is ~0.09 m less the ramps; a loaded host that stalls the recorder for a
        # second delivers the held key's repeats with "x" in one read (it stops at once): 1 cm, not 5.
        assert sign * moved[axis] > 0.01, (key, moved)
        assert np.abs(np.delete(moved, axis)).max() < 0.005, (key, moved)
        assert ep["observation.images.scene"].std() > 1.0              # frames, not blanks
    closing = buf.get_episode(1)
    assert closing["action"][-1, 6] == 0.0 and closing["observation.gripper_width"][-1] < 0.07
    s = summary_of(log_dir)
    assert s["episodes_kept"] == 3 and s["exit_code"] == 0
    check_commands(emu, log_dir)


def test_ctrl_c_keeps_the_finished_episodes_and_stops_the_arm(emu, tmp_path):
    fresh(emu)
    out, log_dir = tmp_path / "demos.zarr", tmp_path / "log"
    child = Child(["--robot", "ur5", "--config", cell_toml(tmp_path, cameras=("wrist",), gripper=False),
                   "--teleop", "keyboard", "--out", str(out), "--no-rt", "--log-dir", str(log_dir)])
    op = child.op
    for _ in range(2):
        op.wait(r"Enter starts")
        op.press("\r")
        op.wait(r"recording episode")
        hold_key(op, "d", 0.8)
        op.press("\r")
        op.wait(r"kept")
    op.wait(r"Enter starts")
    op.press("\r")
    op.wait(r"recording episode")
    hold_key(op, "a", 0.5)                  # moving when interrupted
    child.proc.send_signal(signal.SIGINT)
    assert child.join() == 130, op.text()[-3000:]
    assert termios.tcgetattr(op.slave) == child.before
    op.close()
    buf = read_replay_buffer(out)
    assert buf.n_episodes == 2 and "gripper_width" not in buf.data and buf.data["action"].shape[1] == 6
    s = summary_of(log_dir)
    assert s["message"] == "interrupted" and s["episodes_kept"] == 2
    servoj = check_commands(emu, log_dir)
    assert np.abs(servoj[-1] - servoj[-2]).max() * 125 < 1e-2         # at rest before the stop


def test_a_camera_that_stops_is_a_sensor_fault_and_keeps_the_episodes(emu, tmp_path, monkeypatch):
    fresh(emu)
    fake = load_fake_spacemouse()
    monkeypatch.setitem(sys.modules, "pyspacemouse", fake)
    out, log_dir = tmp_path / "demos.zarr", tmp_path / "log"
    run = InProcess(monkeypatch, ["--robot", "ur5", "--config", cell_toml(tmp_path), "--teleop", "spacemouse",
                                  "--out", str(out), "--duration", "0.8", "--no-rt", "--log-dir", str(log_dir)])
    op = run.op
    op.wait(r"Enter starts")
    fake.script = lambda t: ((0.0, 0.5, 0.0, 0.0, 0.0, 0.0), [0, 0])
    op.press("\n")
    op.wait(r"kept")                        # --duration: stopped and kept after 0.8 s
    op.wait(r"Enter starts")
    op.press("\n")
    op.wait(r"recording episode")
    emu.control.camera_freeze(camera="wrist", seconds=None)
    code = run.join()
    emu.control.camera_freeze(camera="wrist", seconds=0)
    s = summary_of(log_dir)
    assert code == EXIT_SENSOR_FAULT, s["message"]
    assert s["message"].startswith("sensor fault:") and "'wrist'" in s["message"]
    buf = read_replay_buffer(out)
    assert buf.n_episodes == 1 and buf.n_steps == 8
    check_commands(emu, log_dir)


def test_a_step_stalled_past_its_due_time_is_retimed_and_the_episode_goes_on(emu, tmp_path, monkeypatch):
    """A loaded host can stall the recorder past a step's due time (here 0.35 s inside one
    observation, mid-motion): that step's target is submitted from now, not refused as the past."""
    fresh(emu)
    fake = load_fake_spacemouse()
    monkeypatch.setitem(sys.modules, "pyspacemouse", fake)
    snapshot, calls = Rig.snapshot, []

    def stalled(self, *args, **kwargs):
        calls.append(time.monotonic())
        if len(calls) == 6:
            time.sleep(0.35)
        return snapshot(self, *args, **kwargs)
    monkeypatch.setattr(Rig, "snapshot", stalled)
    out, log_dir = tmp_path / "demos.zarr", tmp_path / "log"
    run = InProcess(monkeypatch, ["--robot", "ur5", "--config", cell_toml(tmp_path), "--teleop", "spacemouse",
                                  "--out", str(out), "--episodes", "1", "--duration", "1.5", "--no-rt",
                                  "--log-dir", str(log_dir)])
    run.op.wait(r"Enter starts")
    fake.script = lambda t: ((0.0, 0.5, 0.0, 0.0, 0.0, 0.0), [0, 0])
    run.op.press("\n")
    run.op.wait(r"kept")
    code = run.join()
    s = summary_of(log_dir)
    assert code == EXIT_OK, s["message"]
    assert s["retimed_steps"] >= 1 and s["episodes_kept"] == 1
    assert read_replay_buffer(out).n_steps == 15
    check_commands(emu, log_dir)


# ---------------------------------------------------------------------------------------------
# Freedrive: the operator's hand is the emulator's teach_path
# ---------------------------------------------------------------------------------------------
PATH_DT = 0.02
TEACH_MODE, END_TEACH_MODE = 18, 19   # ur_rtde's RobotCommand types
PLAYING = 2                           # the controller's runtime state of a running program


def hand_path(q0, seconds, reach=0.12, wiggle=0.02):
    """A smooth hand path from q0 at rest to rest: a minimum-jerk move to a fresh random point (at
    most `reach` rad per joint) plus a wiggle, sampled every PATH_DT (well within the arm's limits)."""
    s = np.linspace(0.0, 1.0, int(round(seconds / PATH_DT)) + 1)[:, None]
    blend = 10 * s**3 - 15 * s**4 + 6 * s**5
    wig = rng.uniform(-wiggle, wiggle, 6) * np.sin(2 * np.pi * rng.integers(1, 3, 6) * s) * np.sin(np.pi * s)
    return np.asarray(q0) + rng.uniform(-reach, reach, 6) * blend + wig


def distance_to_path(q, path):
    """Each sample's distance (max over joints, rad) to the hand path's densely resampled points."""
    dense = np.concatenate([path[k] + np.linspace(0, 1, 20, endpoint=False)[:, None] * (path[k + 1] - path[k])
                            for k in range(len(path) - 1)] + [path[-1:]])
    return np.array([np.abs(dense - x).max(axis=1).min() for x in q])


@pytest.fixture(scope="module")
def freedrive_run(emu, tmp_path_factory):
    """Three episodes by hand, TCP pose actions: each a fresh random path from where the last left the arm."""
    tmp = tmp_path_factory.mktemp("freedrive")
    fresh(emu)
    out, log_dir = tmp / "demos.zarr", tmp / "log"
    paths = []
    with pytest.MonkeyPatch.context() as mp:
        run = InProcess(mp, ["--robot", "ur5", "--config", cell_toml(tmp, cameras=("scene",)), "--teleop", "freedrive",
                             "--action", "tcp", "--out", str(out), "--episodes", "3", "--no-rt",
                             "--log-dir", str(log_dir)])
        op = run.op
        for _ in range(3):
            op.wait(r"Enter starts")
            op.press("\n")
            op.wait(r"recording episode")
            # A slow hand (<= ~0.15 rad/s): the replay's deviation is its speed times the arm's lag
            # (one or two 125 Hz cycles), and this keeps it well inside 5 mrad on a loaded machine.
            path = hand_path(emu.control.snapshot()["q"], 1.5, reach=0.08, wiggle=0.01)
            paths.append(path)
            emu.control.teach_path(q=path.tolist(), dt=PATH_DT)
            assert wait_until(emu.control.teach_path_done, 10.0)
            time.sleep(0.3)
            op.press("\n")
            op.wait(r"kept")
        code = run.join()
    assert code == EXIT_OK, op.text()[-3000:]
    return log_dir, out, paths


def test_freedrive_samples_the_hand_and_the_actions_are_the_next_samples(emu, freedrive_run):
    log_dir, out, paths = freedrive_run
    buf = read_replay_buffer(out)
    assert buf.n_episodes == 3 and buf.data["scene"].shape[1:] == (48, 64, 3)
    assert buf.spec_hints["action"] == {"kind": "tcp_pose", "absolute": True, "gripper": True,
                                        "dims": ["x", "y", "z", "rx", "ry", "rz"]}
    spec, why = spec_from(buf, ["tcp_pose"])
    assert spec is not None and spec.action.kind == "tcp_pose" and spec.action.dim == 7, why
    for i, path in enumerate(paths):
        ep = buf.get_episode(i)
        q = ep["q"].astype(float)
        assert np.abs(q[0] - path[0]).max() < 1e-3             # the arm was where the last hand left it
        assert distance_to_path(q, path).max() < 2e-3          # every sample on the hand's path
        assert np.abs(q[-1] - path[-1]).max() < 1e-3           # and the hand's end reached
        # Action t is the TCP pose of sample t + 1 (its rotation vector on the observation's branch).
        act, tcp = ep["action"].astype(float), ep["tcp_pose"].astype(float)
        assert np.allclose(act[:-1, :3], tcp[1:, :3], atol=1e-6)
        assert np.allclose(act[:-1, 3:6], tcp[1:, 3:], atol=1e-4)
        assert np.allclose(act[:, 6], 0.085, atol=1e-6)        # the gripper column: open throughout
        if i:   # not moved home between episodes: the operator brings the arm back
            assert np.abs(q[0] - paths[i - 1][-1]).max() < 1e-3
    log = emu.control.command_log()
    names, ids = [e["name"] for e in log], [e["id"] for e in log]
    # ur_rtde's teachMode / endTeachMode are commands 18 / 19: on once, off once, then the stop.
    assert "servoJ" not in names and ids.count(TEACH_MODE) == 1 and ids.count(END_TEACH_MODE) == 1
    assert ids.index(TEACH_MODE) < ids.index(END_TEACH_MODE) and names[-2:] == ["servoStop", "stopScript"]
    s = summary_of(log_dir)
    assert s["exit_code"] == 0 and s["episodes_kept"] == 3 and s["loop"]["cycles"] is None
    assert 0 <= s["cameras"]["scene"]["frame_age_ms"]["p50"] < 60


def test_replay_of_a_freedrive_episode_follows_the_hand_path(emu, freedrive_run, tmp_path):
    _, out, _ = freedrive_run
    replay_random_episode(emu, out, tmp_path)


# ---------------------------------------------------------------------------------------------
# The whole path: record the reach task by hand, train on it, serve what was trained
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_record_train_serve_the_reach_task_round_trip(emu, tmp_path):
    """Six freedrive episodes of --task ur5_reach, the hand moving along the task's expert to each
    episode's goal (as the recorder's prompt states it), a small policy trained on them with the
    task's own config (state q + goal), served on the same cell. The success rate need not be high;
    the path must be whole, with no conversion between the steps."""
    from dpag_engine import serve
    from dpag_engine.checkpoint import load_policy
    from dpag_engine.envs.ur5_reach import ReachExpert
    from dpag_engine.train import main as train_main
    fresh(emu)
    cell = cell_toml(tmp_path, cameras=(), gripper=False)
    out = tmp_path / "reach.zarr"
    expert = ReachExpert()
    with pytest.MonkeyPatch.context() as mp:
        run = InProcess(mp, ["--robot", "ur5", "--config", cell, "--teleop", "freedrive", "--task", "ur5_reach",
                             "--out", str(out), "--episodes", "6", "--duration", "7.0", "--seed",
                             str(int(rng.integers(1 << 20))), "--no-rt", "--log-dir", str(tmp_path / "rec")])
        op = run.op
        for _ in range(6):
            goal = np.array(json.loads(op.wait(r"setup (\{.*\}): Enter starts").group(1))["goal"])
            q_now = np.array(emu.control.snapshot()["q"])      # the operator brings the arm home first
            s = np.linspace(0, 1, 51)[:, None]
            emu.control.teach_path(q=(q_now + (10 * s**3 - 15 * s**4 + 6 * s**5) * (HOME - q_now)).tolist(), dt=PATH_DT)
            assert wait_until(emu.control.teach_path_done, 10.0)
            traj, _ = expert.run(rng, goal, HOME)
            op.press("\n")
            op.wait(r"recording episode")
            emu.control.teach_path(q=traj.tolist(), dt=0.1)
            op.wait(r"kept", timeout=30)
        code = run.join()
    assert code == EXIT_OK, op.text()[-3000:]
    buf = read_replay_buffer(out)
    assert buf.n_episodes == 6 and set(buf.data) == {"q", "qd", "tcp_pose", "tcp_speed", "goal", "action"}
    assert buf.spec_hints["task"] == "ur5_reach" and np.all(buf.episode_lengths() == 70)
    train_out = tmp_path / "train"
    # 600 steps: after 200 or 400 the tiny policy this config trained before drove the tool into the box
    # floor in its second episode (a robot fault, exit 2: the safety path doing its job).
    assert train_main(["--config", "configs/ur5_reach.toml", f"data.path={out}", "train.steps=600",
                       "train.eval_every=0", f"train.out_dir={train_out}", "train.batch_size=32"]) == 0
    spec = load_policy(train_out / "model.pt").spec
    assert spec.task == "ur5_reach" and spec.dt == pytest.approx(0.1) and spec.action.kind == "joint_pos"
    assert [(f.key, f.kind) for f in spec.obs] == [("q", "joint_pos"), ("goal", "task")]
    fresh(emu)
    log_dir = tmp_path / "serve"
    code = serve.main(["--ckpt", str(train_out / "model.pt"), "--robot", "ur5", "--config", cell, "--episodes", "2",
                       "--no-rt", "--log-dir", str(log_dir)])
    s = summary_of(log_dir)
    assert code == EXIT_OK, s["message"]
    assert s["task"] == "ur5_reach" and s["episodes"] == 2 and s["success_rate"] in (0.0, 0.5, 1.0)
    assert math.isfinite(s["mean_jerk"])
    print(f"round trip: success {s['success_rate']:.0%} of 2 goals, per episode "
          f"{[(e.get('success'), round(e.get('final_error_m', math.nan), 3)) for e in s['per_episode']]}")


def test_a_killed_recorder_keeps_its_episodes_the_watchdog_stops_the_arm_and_append_goes_on(emu, tmp_path):
    """SIGKILL mid-episode: no finally block runs, so the kept episodes are on disk only if the
    writer made each durable, and the arm stops only because the controller's RTDE watchdog ends
    the program when commands stop. Then --append adds to the same dataset."""
    fresh(emu)
    out = tmp_path / "demos.zarr"
    cell = cell_toml(tmp_path, cameras=("scene",), gripper=False)
    argv = ["--robot", "ur5", "--config", cell, "--teleop", "keyboard", "--out", str(out), "--no-rt"]
    child = Child([*argv, "--log-dir", str(tmp_path / "a")])
    op = child.op
    for _ in range(2):
        op.wait(r"Enter starts")
        op.press("\r")
        op.wait(r"recording episode")
        hold_key(op, "w", 0.6)
        op.press("\r")
        op.wait(r"kept")
    op.wait(r"Enter starts")
    op.press("\r")
    op.wait(r"recording episode")
    hold_key(op, "s", 0.5)
    child.proc.kill()
    assert child.join() == -signal.SIGKILL
    assert wait_until(lambda: emu.control.snapshot()["runtime_state"] != PLAYING, 3.0)   # the watchdog ended it
    assert wait_until(lambda: np.abs(emu.control.snapshot()["qd"]).max() < 1e-6, 3.0)
    op.close()
    buf = read_replay_buffer(out)
    assert buf.n_episodes == 2
    lengths = buf.episode_lengths()
    fresh(emu)
    child = Child([*argv, "--append", "--episodes", "1", "--log-dir", str(tmp_path / "b")])
    child.op.wait(r"Enter starts")
    child.op.press("\r")
    child.op.wait(r"recording episode")
    hold_key(child.op, "d", 0.5)
    child.op.press("\r")
    assert child.join() == EXIT_OK, child.op.text()[-3000:]
    child.op.close()
    again = read_replay_buffer(out)
    assert again.n_episodes == 3 and np.array_equal(again.episode_lengths()[:2], lengths)
    assert again.spec_hints == buf.spec_hints
    assert np.array_equal(again.data["q"][:buf.n_steps], buf.data["q"])
