"""MailboxSink (csrc/robot_bridge.h): the C++ loop hands commands to a client thread without waiting.

A Python thread plays the ur_rtde pump: it takes commands and posts back the arm's state. Checked:
the C++ UR5 forward kinematics against the Python one, command hand-off and overwrite counting,
and each loop-side safety stop (stale state, workspace box, a client-posted fault) with no command
past the stop.
"""
import threading
import time

import numpy as np
import pytest

from dpag_engine import _C
from dpag_engine.kinematics import forward_kinematics, tcp_pose
from dpag_engine.ursim import wait_until

HOME = np.array([0.0, -1.7, 2.2, -2.0708, -1.5708, 0.0])
BOX = ((-0.85, -0.85, 0.02), (0.85, 0.85, 1.0))


def scheduler(v_max=1.5, a_max=10.0):
    return _C.ActionScheduler(6, [-6.2] * 6, [6.2] * 6, [v_max] * 6, [a_max] * 6, blend_window=0.1)


class Pump:
    """The client side: takes every command, echoes it back as the arm's state (a perfect arm)."""

    def __init__(self, sink, delay_s=0.0, post_state=True):
        self.sink, self.delay_s, self.post_state = sink, delay_s, post_state
        self.taken = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            cmd = self.sink.wait_command(0.02)
            if cmd is None:
                if self.sink.faulted:
                    return
                continue
            self.taken.append(cmd)
            if self.delay_s:
                time.sleep(self.delay_s)
            if self.post_state:
                self.sink.post_state(cmd[4])

    def join(self):
        self.stop.set()
        self.thread.join(2.0)


def test_ur5_tcp_position_matches_python_kinematics():
    rng = np.random.default_rng()
    for q in rng.uniform(-2 * np.pi, 2 * np.pi, size=(50, 6)):
        assert np.allclose(_C.ur5_tcp_position(q), forward_kinematics(q)[:3], atol=1e-12)


def test_the_box_bounds_the_tool_centre_not_the_flange():
    """With a tool offset the checked point is the TCP (flange pose x offset), as kinematics.tcp_pose;
    a tool 17 cm long pointing down takes the fingertips under a floor the flange stays above."""
    rng = np.random.default_rng()
    for q in rng.uniform(-2 * np.pi, 2 * np.pi, size=(20, 6)):
        tool = rng.uniform(-0.2, 0.2, 3)
        assert np.allclose(_C.ur5_tcp_position(q, tool_offset=tuple(tool)),
                           tcp_pose(q, np.concatenate([tool, rng.normal(size=3)]))[:3], atol=1e-12)
    flange_z = forward_kinematics(HOME)[2]
    floor = flange_z - 0.1                       # 10 cm under the flange: the flange is fine, the tip is not
    tool = (0.0, 0.0, 0.17)                      # along the tool axis, which points down at HOME
    assert _C.ur5_tcp_position(HOME, tool_offset=tool)[2] < floor < flange_z
    box = ((-2.0, -2.0, floor), (2.0, 2.0, 2.0))
    for offset, faults in (((0.0, 0.0, 0.0), False), (tool, True)):
        sink = _C.MailboxSink(6, HOME, state_timeout=0.2, workspace_box=box, tool_offset=offset)
        sched = scheduler()
        pump = Pump(sink)
        sched.submit(np.repeat(HOME[None], 3, axis=0), _C.monotonic() + 0.02, 0.05)
        loop = _C.ControlLoop(sink, sched, rate_hz=500.0)
        loop.start()
        time.sleep(0.2)
        running = loop.running
        loop.stop()
        pump.join()
        assert running is not faults, loop.stats["fault"]
        assert ("outside the workspace box" in loop.stats["fault"]) is faults


def test_commands_reach_the_client_in_order():
    sink = _C.MailboxSink(6, HOME, state_timeout=0.2, workspace_box=BOX)
    sched = scheduler()
    pump = Pump(sink)
    target = HOME + np.random.default_rng().uniform(-0.2, 0.2, 6)
    sched.submit(np.linspace(HOME, target, 10)[1:], _C.monotonic() + 0.05, 0.05)
    with _C.ControlLoop(sink, sched, rate_hz=500.0) as loop:
        time.sleep(1.0)
    pump.join()
    assert loop.stats["fault"] == "" and not sink.faulted
    seq = np.array([c[0] for c in pump.taken])
    cycles = np.array([c[1] for c in pump.taken])
    assert len(seq) > 300 and np.all(np.diff(seq) >= 1) and np.all(np.diff(cycles) >= 1)
    st = sink.stats
    assert st["posted"] == loop.stats["cycles"]
    # Every command not taken was counted as overwritten.
    assert st["taken"] + st["overwritten"] in (st["posted"], st["posted"] - 1)
    # The hold at the chunk end decelerates from the last tangent, so it settles near, not at, the target.
    assert np.allclose(pump.taken[-1][4], target, atol=0.02)


def test_a_slow_client_gets_the_newest_command_and_overwrites_are_counted():
    sink = _C.MailboxSink(6, HOME, state_timeout=0.5, workspace_box=None)
    pump = Pump(sink, delay_s=0.01)      # 100 Hz client behind a 500 Hz loop
    with _C.ControlLoop(sink, scheduler(), rate_hz=500.0) as loop:
        time.sleep(0.5)
    pump.join()
    st = sink.stats
    assert loop.stats["fault"] == ""
    assert st["overwritten"] > st["posted"] // 2      # most commands were replaced, none queued
    assert np.all(np.diff([c[0] for c in pump.taken]) > 1)


def test_stale_state_stops_the_loop():
    sink = _C.MailboxSink(6, HOME, state_timeout=0.05)
    pump = Pump(sink, post_state=False)          # a frozen stream: commands go out, no state comes back
    loop = _C.ControlLoop(sink, scheduler(), rate_hz=500.0)
    t0 = time.monotonic()
    loop.start()
    assert wait_until(lambda: not loop.running, 1.0)
    stopped_after = time.monotonic() - t0
    pump.join()
    assert "stale" in loop.stats["fault"] and "stale" in sink.fault
    assert 0.05 <= stopped_after < 0.5
    # Commands stopped at the fault: the last one taken is no later than the cycle that failed.
    assert sink.stats["posted"] <= 0.05 * 500 + 3


def test_a_command_outside_the_workspace_box_is_never_sent():
    sink = _C.MailboxSink(6, HOME, state_timeout=0.2, workspace_box=((-0.5, -0.3, 0.1), (-0.2, 0.1, 0.5)))
    sched = scheduler()
    pump = Pump(sink)
    # Swing the shoulder: the TCP sweeps sideways out of the box.
    swing = HOME + np.outer(np.linspace(0, 1.2, 13)[1:], [1, 0, 0, 0, 0, 0])
    sched.submit(swing, _C.monotonic() + 0.05, 0.1)
    loop = _C.ControlLoop(sink, sched, rate_hz=500.0)
    loop.start()
    assert wait_until(lambda: not loop.running, 3.0)
    pump.join()
    assert "outside the workspace box" in loop.stats["fault"]
    tcp = np.array([_C.ur5_tcp_position(c[4]) for c in pump.taken])
    assert len(tcp) > 10
    assert np.all(tcp >= np.array((-0.5, -0.3, 0.1))) and np.all(tcp <= np.array((-0.2, 0.1, 0.5)))


def test_a_client_fault_stops_the_loop_within_a_cycle():
    sink = _C.MailboxSink(6, HOME, state_timeout=0.2)
    pump = Pump(sink)
    loop = _C.ControlLoop(sink, scheduler(), rate_hz=500.0)
    loop.start()
    time.sleep(0.2)
    sink.post_fault("protective stop (injected)")
    posted_at_fault = sink.stats["posted"]
    assert wait_until(lambda: not loop.running, 0.5)
    pump.join()
    assert "protective stop (injected)" in loop.stats["fault"]
    assert sink.stats["posted"] <= posted_at_fault + 1
    assert sink.wait_command(0.01) is None
    # reset() re-arms the sink for the next run.
    sink.reset(HOME)
    assert not sink.faulted and sink.fault == ""


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="state_timeout"):
        _C.MailboxSink(6, HOME, state_timeout=0.0)
    with pytest.raises(ValueError, match="lo must be < hi"):
        _C.MailboxSink(6, HOME, state_timeout=0.1, workspace_box=((0, 0, 0), (1, -1, 1)))
    with pytest.raises(ValueError, match="q_initial"):
        _C.MailboxSink(6, HOME[:5], state_timeout=0.1)
    with pytest.raises(ValueError, match="6-joint"):
        _C.MailboxSink(7, np.zeros(7), state_timeout=0.1, workspace_box=BOX)
    sink = _C.MailboxSink(6, HOME, state_timeout=0.1)
    with pytest.raises(ValueError, match="q"):
        sink.post_state(np.zeros(3))
