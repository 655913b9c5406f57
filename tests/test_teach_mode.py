"""Teach mode (freedrive) in the emulator, driven by the real ur_rtde 1.6.5 client, and UR5Robot.teach_mode.

ur_rtde's teachMode() / endTeachMode() send commands 18 / 19 over the control script's registers; the
emulator then lets the operator's hand (its teach_path side-channel op) move the arm and ignores the
script's motion commands, as the URScript manual says freedrive does. The emulator runs in its own
process (EmulatorProcess) on 127.0.0.41 / .42; every wait is bounded; fresh random paths each run.
"""
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from dpag_engine.kinematics import UR5_LIMITS
from dpag_engine.ursim import wait_until
from factories import running_emulator

rtde_control = pytest.importorskip("rtde_control")
rtde_receive = pytest.importorskip("rtde_receive")

CB3_HOST, ESERIES_HOST = "127.0.0.41", "127.0.0.42"
HOME = [0.0, -1.57, 1.57, -1.57, -1.57, 0.0]
TEACH_MODE, END_TEACH_MODE = 18, 19
PATH_DT = 0.02


@pytest.fixture(scope="module")
def cb3():
    yield from running_emulator(CB3_HOST, "3.15", 30141)


@pytest.fixture(scope="module")
def eseries():
    yield from running_emulator(ESERIES_HOST, "5.11", 30142)


def _reset(emu):
    emu.control.reset_faults()
    emu.control.stop_program()
    emu.control.set_joint_positions(q=HOME)
    emu.control.clear_command_log()
    emu.control.clear_event_log()


@pytest.fixture
def session(cb3):
    """The CB3 emulator, reset, with a control and a receive interface (disconnected at teardown)."""
    _reset(cb3)
    c = rtde_control.RTDEControlInterface(cb3.host)
    r = rtde_receive.RTDEReceiveInterface(cb3.host)
    yield cb3, c, r
    for iface in (c, r):
        try:
            iface.disconnect()
        except RuntimeError:
            pass


def random_path(q0, seconds, rng, reach=0.15, wiggle=0.03):
    """A smooth hand path from q0 at rest to rest: a minimum-jerk move to a random point (at most
    `reach` rad per joint) plus a wiggle b sin(2 pi m s) sin(pi s), |b| <= wiggle, m in {1, 2}
    (s = t / seconds), sampled every PATH_DT. Over 2 s: under 0.4 rad/s and 1.5 rad/s^2, a hand the arm can
    follow exactly (it starts and ends at rest, so the arm need not brake harder than it can)."""
    s = np.linspace(0.0, 1.0, int(round(seconds / PATH_DT)) + 1)[:, None]
    blend = 10 * s**3 - 15 * s**4 + 6 * s**5
    m = rng.integers(1, 3, 6)
    wig = rng.uniform(-wiggle, wiggle, 6) * np.sin(2 * np.pi * m * s) * np.sin(np.pi * s)
    return np.asarray(q0) + rng.uniform(-reach, reach, 6) * blend + wig


def path_at(path, t0, stamps):
    """The hand path at controller times `stamps` (straight lines between points; held at both ends)."""
    times = t0 + PATH_DT * np.arange(len(path))
    return np.stack([np.interp(stamps, times, path[:, j]) for j in range(6)], axis=1)


def sample_states(r, until, timeout):
    """(timestamps, joint positions) from the receive interface until until() or timeout; only
    readings whose timestamp is the same before and after getActualQ (one controller sample)."""
    stamps, qs = [], []
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        t1 = r.getTimestamp()
        q = r.getActualQ()
        if r.getTimestamp() == t1:
            stamps.append(t1)
            qs.append(q)
        time.sleep(0.004)
    return np.array(stamps), np.array(qs)


def teach_commands(emu):
    return [e["id"] for e in emu.control.command_log() if e["id"] in (TEACH_MODE, END_TEACH_MODE)]


# ----------------------------------------------------------------- the hand moves the arm
@pytest.mark.parametrize("version", ["cb3", "eseries"])
def test_a_hand_path_moves_the_arm_in_teach_mode(request, version):
    emu = request.getfixturevalue(version)
    _reset(emu)
    c = rtde_control.RTDEControlInterface(emu.host)
    r = rtde_receive.RTDEReceiveInterface(emu.host)
    try:
        assert c.teachMode()
        snap = emu.control.snapshot()
        assert snap["teach"] and snap["mode"] == "teach", snap
        assert wait_until(lambda: teach_commands(emu) == [TEACH_MODE], 2.0), emu.control.command_log()
        seed = int(np.random.default_rng().integers(1 << 31))
        path = random_path(r.getActualQ(), 2.0, np.random.default_rng(seed))
        t0 = emu.control.teach_path(q=path.tolist(), dt=PATH_DT)
        assert not emu.control.teach_path_done()
        stamps, qs = sample_states(r, emu.control.teach_path_done, timeout=10.0)
        assert emu.control.teach_path_done()
        during = (stamps > t0) & (stamps < t0 + PATH_DT * (len(path) - 1))
        assert during.sum() >= 40, f"only {during.sum()} samples during the path (seed {seed})"
        err = np.abs(qs - path_at(path, t0, stamps)).max(axis=1)
        worst = int(np.argmax(err))
        assert err[worst] < 1e-3, (f"seed {seed}: {err[worst]:.2e} rad off the hand path at t - t0 = "
                                   f"{stamps[worst] - t0:.3f} s")
        assert np.ptp(qs[during], axis=0).max() > 0.02      # the arm really moved along it
        # The hand has let go: the arm holds the last point, still in teach mode, and streams as usual.
        t_end = r.getTimestamp()
        time.sleep(0.2)
        assert r.getTimestamp() > t_end + 0.1
        assert np.abs(np.array(r.getActualQ()) - path[-1]).max() < 1e-9
        assert np.abs(np.array(r.getActualQd())).max() < 1e-9
        assert emu.control.snapshot()["teach"]
        assert c.endTeachMode()
        assert not emu.control.snapshot()["teach"]
        assert wait_until(lambda: teach_commands(emu) == [TEACH_MODE, END_TEACH_MODE], 2.0)
    finally:
        c.stopScript()
        c.disconnect()
        r.disconnect()


def test_a_hand_faster_than_the_arm_is_followed_within_its_limits(session):
    """A hand that jumps 0.6 rad on joint 0: the arm gets there, no faster than v_max."""
    emu, c, r = session
    assert c.teachMode()
    q0 = np.array(r.getActualQ())
    jump = q0.copy()
    jump[0] += 0.6
    emu.control.teach_path(q=[q0.tolist(), jump.tolist()], dt=0.01)
    speeds = []
    deadline = time.monotonic() + 5.0
    while not emu.control.teach_path_done() and time.monotonic() < deadline:
        speeds.append(np.abs(r.getActualQd()).max())
        time.sleep(0.005)
    assert emu.control.teach_path_done()
    assert np.abs(np.array(r.getActualQ()) - jump).max() < 1e-9
    assert max(speeds) <= UR5_LIMITS.v_max + 1e-9
    assert max(speeds) > 1.0                # it did have to hurry: the limit, not the path, set the pace


# ------------------------------------------------------------ commands in teach mode
def test_servo_commands_do_not_move_the_arm_in_teach_mode(session):
    emu, c, r = session
    assert c.teachMode()
    q0 = np.array(r.getActualQ())
    target = q0.copy()
    target[0] += 0.02        # inside the servo horizon: outside teach mode this moves the arm
    for _ in range(40):
        t = c.initPeriod()
        assert c.servoJ(target.tolist(), 0.5, 0.5, 0.008, 0.1, 300)      # answered, not refused
        c.waitPeriod(t)
    for _ in range(10):
        t = c.initPeriod()
        assert c.speedJ([0.2, 0, 0, 0, 0, 0], 1.0, 0.008)
        c.waitPeriod(t)
    assert c.moveJ((q0 + 0.1).tolist(), 0.5, 0.5)                      # returns at once, nothing moved
    assert c.servoStop()
    time.sleep(0.1)
    assert np.abs(np.array(r.getActualQ()) - q0).max() < 1e-12
    snap = emu.control.snapshot()
    assert snap["teach"] and snap["safety_mode"] == 1 and snap["teach_ignored"] >= 40, snap
    events = " ".join(map(str, emu.control.event_log()))
    for name in ("servoJ", "speedJ", "moveJ", "servoStop"):
        assert f"{name} ignored: the arm is in teach mode" in events, events
    # Out of teach mode the same servoJ moves the arm: it was teach mode that kept it still.
    assert c.endTeachMode()
    for _ in range(40):
        t = c.initPeriod()
        assert c.servoJ(target.tolist(), 0.5, 0.5, 0.008, 0.1, 300)
        c.waitPeriod(t)
    assert wait_until(lambda: abs(r.getActualQ()[0] - target[0]) < 1e-6, 2.0)
    assert c.servoStop()


def test_teach_path_is_refused_outside_teach_mode_and_teach_mode_ends_with_the_program(session):
    emu, c, r = session
    q0 = r.getActualQ()
    with pytest.raises(RuntimeError, match="not in teach mode"):
        emu.control.teach_path(q=[q0], dt=PATH_DT)                 # never entered
    assert c.teachMode()
    with pytest.raises(RuntimeError, match="6 joint positions"):
        emu.control.teach_path(q=[[0.0, 1.0]], dt=PATH_DT)
    with pytest.raises(RuntimeError, match="joint range"):
        emu.control.teach_path(q=[[7.0] * 6], dt=PATH_DT)
    with pytest.raises(RuntimeError, match="dt must be"):
        emu.control.teach_path(q=[q0], dt=0.0)
    # endTeachMode ends it: the arm stands where the hand left it and no hand moves it any more.
    path = random_path(q0, 0.3, np.random.default_rng())
    emu.control.teach_path(q=path.tolist(), dt=PATH_DT)
    assert wait_until(emu.control.teach_path_done, 5.0)
    assert c.endTeachMode()
    snap = emu.control.snapshot()
    assert not snap["teach"] and snap["mode"] == "idle"
    with pytest.raises(RuntimeError, match="not in teach mode"):
        emu.control.teach_path(q=[q0], dt=PATH_DT)
    time.sleep(0.1)
    assert np.abs(np.array(r.getActualQ()) - path[-1]).max() < 1e-9
    # A hand path dropped mid-way: the program's end (stopScript) ends teach mode with it.
    assert c.teachMode()
    emu.control.teach_path(q=random_path(path[-1], 2.0, np.random.default_rng()).tolist(), dt=PATH_DT)
    c.stopScript()
    assert wait_until(lambda: not emu.control.snapshot()["teach"], 2.0)
    assert emu.control.teach_path_done()
    assert any("teach mode ended: the program ended" in str(e) for e in emu.control.event_log())


def test_a_protective_stop_ends_teach_mode(session):
    emu, c, r = session
    assert c.teachMode()
    emu.control.protective_stop(reason="test")
    snap = emu.control.snapshot()
    assert not snap["teach"] and snap["safety_mode"] == 3
    with pytest.raises(RuntimeError, match="not in teach mode"):
        emu.control.teach_path(q=[r.getActualQ()], dt=PATH_DT)


# ----------------------------------------------------------------- UR5Robot.teach_mode
def test_robot_teach_mode_reads_the_hand_and_refuses_while_servoing(cb3, tmp_path):
    from dpag_engine.robot import UR5Robot

    _reset(cb3)
    robot = UR5Robot(cb3.host, rt_priority=False, log_dir=tmp_path)
    robot.connect()
    try:
        robot.teach_mode(True)
        assert cb3.control.snapshot()["teach"]
        path = random_path(robot.joint_positions(), 0.5, np.random.default_rng())
        cb3.control.teach_path(q=path.tolist(), dt=PATH_DT)
        assert wait_until(cb3.control.teach_path_done, 5.0)
        q, qd = robot.joint_state()
        assert np.abs(q - path[-1]).max() < 1e-9 and np.abs(qd).max() < 1e-9
        robot.teach_mode(False)
        assert not cb3.control.snapshot()["teach"]
        # Servoing from where the hand left the arm; freedrive is refused while the loop runs.
        robot.start()
        assert robot.running
        with pytest.raises(RuntimeError, match="exclusive"):
            robot.teach_mode(True)
        assert not cb3.control.snapshot()["teach"]
        assert robot.running and not robot.fault
        robot.stop()
        # stop() ended the control script (stopScript): teach_mode uploads it again.
        assert wait_until(lambda: cb3.control.snapshot()["runtime_state"] == 1, 2.0)
        robot.teach_mode(True)
        assert cb3.control.snapshot()["teach"]
        robot.teach_mode(False)
        assert not cb3.control.snapshot()["teach"]
    finally:
        robot.close()


def test_robot_teach_mode_on_a_frozen_stream_is_an_error_not_a_hang(cb3, tmp_path):
    """teachMode waits for the script's answer on the RTDE stream; frozen, the call does not return.
    In a child process: the wedged ur_rtde client keeps reconnecting, which must not outlive it."""
    _reset(cb3)
    code = textwrap.dedent(f"""
        import os, sys, time
        from dpag_engine.robot import UR5Robot
        from dpag_engine.ursim import ControlClient
        robot = UR5Robot({cb3.host!r}, rt_priority=False, log_dir={str(tmp_path)!r})
        robot.connect()
        ctl = ControlClient({cb3.host!r}, {cb3.control_port})
        ctl.freeze_stream(seconds=None)
        t = time.monotonic()
        try:
            robot.teach_mode(True, timeout=2.0)
            print("RETURNED")
        except RuntimeError as err:
            print(f"ERROR {{time.monotonic() - t:.1f}} {{err}}")
            try:
                robot.teach_mode(False)
            except RuntimeError as err2:
                print(f"THEN {{err2}}")
        ctl.unfreeze_stream()
        sys.stdout.flush()
        os._exit(0)
    """)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    finally:
        cb3.control.unfreeze_stream()
    lines = out.stdout.splitlines()
    errors = [line for line in lines if line.startswith("ERROR")]
    assert errors and "did not return within 2 s" in errors[0], out.stdout + out.stderr
    assert float(errors[0].split()[1]) < 10.0
    assert any(line.startswith("THEN") and "never returned" in line for line in lines), out.stdout
