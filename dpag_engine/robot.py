"""A UR5 over ur_rtde, servoed by the C++ fixed-rate loop.

    robot = UR5Robot("192.168.1.10", SafetyLimits())    # or the emulator's 127.0.0.1
    robot.connect()                                      # frequency from the controller version
    robot.start()                                        # C++ loop + the servoJ pump thread
    robot.scheduler.submit(actions, t_obs, dt)           # plans arrive whenever they are ready
    ...
    robot.close()                                        # servoStop, stopScript, disconnect

Threads and who waits on whom:
  * the C++ ControlLoop (csrc/control_loop.h) ticks the ActionScheduler at 125/500 Hz and posts each
    limited command into a MailboxSink (csrc/robot_bridge.h). It never takes the GIL or waits on
    Python: if the pump below is late, the mailbox keeps only the newest command;
  * the pump thread (Python, because ur_rtde ships only Python bindings on PyPI) waits on the
    mailbox with the GIL released, checks the arm's status, sends servoJ, and posts the measured
    joint positions back. ur_rtde releases the GIL inside its calls;
  * the planner (serve.py) submits chunks to the scheduler.
Any fault (protective or emergency stop, program stopped, lost connection, frozen stream, a
command outside the workspace box) stops the loop within one cycle; the pump then sends nothing
more, calls servoStop and stopScript, and the fault is reported by `robot.fault`.
"""
from __future__ import annotations

import math
import os
import re
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _C
from .runlog import StreamLog
from .kinematics import UR5_LIMITS, tcp_pose

UR5_DOF = 6
RT_PRIORITY = 80   # SCHED_FIFO level of the servo loop
DASHBOARD_PORT, RTDE_PORT = 29999, 30004
# ur_rtde's SafetyMode values (RTDE safety_mode); only NORMAL allows motion.
SAFETY_NORMAL = 1
SAFETY_NAMES = {1: "normal", 2: "reduced", 3: "protective stop", 4: "recovery", 5: "safeguard stop",
                6: "system emergency stop", 7: "robot emergency stop", 8: "violation", 9: "fault"}


# What the arm itself allows; SafetyLimits may only be tighter. Range (+-360 deg) and joint speed
# (180 deg/s on every joint of the UR5 and UR5e) are the data sheet's (kinematics.UR5_LIMITS). Joint
# acceleration is not in the data sheets: 40 rad/s^2 is the bound ur_rtde itself enforces on joint
# accelerations (UR_JOINT_ACCELERATION_MAX), above the emulated arm's own 25. Servo rates: a CB3
# controller runs at 125 Hz, an e-Series at 500 Hz (divisors allowed).
UR5_JOINT_RANGE = UR5_LIMITS.q_max
UR5_JOINT_SPEED_MAX = UR5_LIMITS.v_max
UR5_JOINT_ACCEL_MAX = 40.0
CONTROLLER_RATES_HZ = {3: (125.0,), 5: (125.0, 250.0, 500.0)}   # by controller major version
# No fresh state for longer than this cannot be a safety stop any more: at 0.2 m/s it is 20 cm.
STATE_TIMEOUT_MAX_S = 1.0


class LimitError(ValueError):
    """A SafetyLimits field the arm does not allow; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.reason = field, message


@dataclass(frozen=True)
class SafetyLimits:
    """What the arm may be commanded; the scheduler and the sink enforce it on every cycle.

    Defaults are for a UR5: joint ranges +-2 pi, half the data sheet's 180 deg/s, an acceleration a
    servo trajectory can follow, and a tool box that keeps the TCP above the table and inside reach.
    Every value is checked at construction: never above the arm's own limits (UR5_*), never <= 0.
    """
    q_min: tuple[float, ...] = (-2 * math.pi,) * UR5_DOF
    q_max: tuple[float, ...] = (2 * math.pi,) * UR5_DOF
    v_max: tuple[float, ...] = (math.pi / 2,) * UR5_DOF
    a_max: tuple[float, ...] = (10.0,) * UR5_DOF
    workspace_lo: tuple[float, float, float] = (-0.85, -0.85, 0.02)
    workspace_hi: tuple[float, float, float] = (0.85, 0.85, 1.0)
    # No fresh joint state for this long = a frozen stream or a dead connection: stop. 0.2 s is 25
    # cycles at 125 Hz: long enough not to trip on a scheduling hiccup of a loaded machine.
    state_timeout_s: float = 0.2
    blend_window_s: float = 0.1

    def __post_init__(self):
        def values(name, n):
            v = getattr(self, name)
            try:
                ok = len(v) == n and all(math.isfinite(float(x)) for x in v)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise LimitError(name, f"expected {n} finite numbers, got {v!r}")
            return v

        q_min, q_max = values("q_min", UR5_DOF), values("q_max", UR5_DOF)
        if not all(-UR5_JOINT_RANGE <= lo < hi <= UR5_JOINT_RANGE for lo, hi in zip(q_min, q_max)):
            raise LimitError("q_min/q_max", f"need -{UR5_JOINT_RANGE:.4f} <= q_min < q_max <= {UR5_JOINT_RANGE:.4f} "
                                            "rad on every joint (the UR5's range)")
        for name, cap, unit, what in (("v_max", UR5_JOINT_SPEED_MAX, "rad/s", "joint speed"),
                                      ("a_max", UR5_JOINT_ACCEL_MAX, "rad/s^2", "joint acceleration")):
            worst = max(values(name, UR5_DOF))
            if worst > cap or min(getattr(self, name)) <= 0:
                raise LimitError(name, f"{worst:g} {unit}: must be > 0 and at most the UR5's {what} limit "
                                       f"({cap:g} {unit})")
        lo, hi = values("workspace_lo", 3), values("workspace_hi", 3)
        if not all(a < b for a, b in zip(lo, hi)):
            raise LimitError("workspace", "workspace_lo must be below workspace_hi on every axis")
        if not 0 < self.state_timeout_s <= STATE_TIMEOUT_MAX_S:
            raise LimitError("state_timeout_s", f"{self.state_timeout_s:g} s: must be in (0, {STATE_TIMEOUT_MAX_S:g}] s")
        if not 0 < self.blend_window_s <= 1.0:
            raise LimitError("blend_window_s", f"{self.blend_window_s:g} s: must be in (0, 1] s")


def controller_major_version(host: str) -> int:
    """The controller's major version from the dashboard server (3 = CB3, 5 = e-Series)."""
    import dashboard_client

    dash = dashboard_client.DashboardClient(host)
    dash.connect()
    try:
        text = dash.polyscopeVersion()
    finally:
        dash.disconnect()
    match = re.search(r"(\d+)\.(\d+)", text)
    if not match:
        raise RuntimeError(f"{host}: cannot read the controller version from {text!r}")
    return int(match.group(1))


class CommandLog:
    """What the pump sent and measured, appended from the pump thread only, streamed to disk
    (runlog.StreamLog) so that memory stays flat however long the arm runs."""

    def __init__(self, folder: str | os.PathLike):
        self.commands = StreamLog(Path(folder) / "commands.bin",
                                  [("t_sent", "f8"), ("t_slot", "f8"), ("q", "f8", UR5_DOF), ("v", "f8", UR5_DOF)])
        self.states = StreamLog(Path(folder) / "states.bin", [("t", "f8"), ("q", "f8", UR5_DOF)])

    def close(self, remove: bool = False) -> None:
        self.commands.close(remove)
        self.states.close(remove)


class UR5Robot:
    def __init__(self, host: str, limits: SafetyLimits = SafetyLimits(), frequency: float | None = None,
                 lookahead_time: float = 0.1, gain: float = 300.0, watchdog_hz: float = 5.0,
                 rt_priority: bool = True, servo: str = "servoJ", log_dir: str | os.PathLike | None = None,
                 tcp_offset=None):
        """log_dir: where the command and state logs stream to (default: a fresh temporary folder).
        tcp_offset: flange -> TCP (x, y, z, rx, ry, rz), as set on the pendant: the workspace box
        bounds that point, and servoL targets are its poses (the controller's IK removes it)."""
        if not 0.03 <= lookahead_time <= 0.2:
            raise ValueError(f"lookahead_time: ur_rtde accepts [0.03, 0.2] s, got {lookahead_time}")
        if not 100 <= gain <= 2000:
            raise ValueError(f"gain: ur_rtde accepts [100, 2000], got {gain}")
        if servo not in ("servoJ", "servoL"):
            raise ValueError(f"servo: 'servoJ' or 'servoL', got {servo!r}")
        self.host, self.limits, self.frequency, self.servo = host, limits, frequency, servo
        self.tcp_offset = np.zeros(6) if tcp_offset is None else np.asarray(tcp_offset, dtype=float).reshape(6)
        self.lookahead_time, self.gain, self.watchdog_hz, self.rt_priority = lookahead_time, gain, watchdog_hz, rt_priority
        self.receive = self.control = None
        self.scheduler = self.sink = self.loop = None
        self.log = CommandLog(log_dir if log_dir is not None else tempfile.mkdtemp(prefix="ur5_log_"))
        self.stop_log: list[tuple[float, str]] = []   # (monotonic s, what) of the stop sequence
        self._pump_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wedged = False   # a control call is blocked on a dead stream: make no further calls

    # ---- connection ----
    def connect(self) -> None:
        """Connect; the servo rate comes from the controller version unless one was given (and then
        it must be one that controller runs). Raises ConnectionError saying what failed, in words."""
        import rtde_control
        import rtde_receive

        for port, what in ((DASHBOARD_PORT, "dashboard server"), (RTDE_PORT, "RTDE interface")):
            check_reachable(self.host, port, what)
        major = controller_major_version(self.host)
        rates = CONTROLLER_RATES_HZ[3 if major <= 3 else 5]
        if self.frequency is None:
            self.frequency = rates[-1]   # e-Series streams at 500 Hz, CB3 at 125 Hz
        elif self.frequency not in rates:
            raise LimitError("frequency", f"{self.frequency:g} Hz: a controller {major}.x servos at "
                                          f"{' or '.join(f'{r:g}' for r in rates)} Hz")
        if not 0 < self.watchdog_hz <= self.frequency:
            raise LimitError("watchdog_hz", f"{self.watchdog_hz:g} Hz: must be in (0, {self.frequency:g}] "
                                            "(commands are sent at the servo rate)")
        # ur_rtde's own rt_priority argument is left at 0: with it set, its constructor crashed (segfault)
        # in our fault tests after a frozen-stream run; the loop and the pump carry the real-time load.
        try:
            self.receive = rtde_receive.RTDEReceiveInterface(self.host, self.frequency)
            self.control = rtde_control.RTDEControlInterface(self.host, self.frequency)
        except RuntimeError as err:
            raise ConnectionError(f"{self.host} answered, but ur_rtde could not set up its RTDE session "
                                  f"({err}); is the arm powered on and in remote control?") from err
        self.controller_major = major
        problem = self.status_problem()
        if problem:
            raise RuntimeError(f"{self.host}: the arm is not ready: {problem}")

    def status_problem(self) -> str | None:
        """Why the arm cannot be commanded now, or None."""
        if not (self.receive.isConnected() and self.control.isConnected()):
            return "connection to the controller lost"
        mode = self.receive.getSafetyMode()
        if mode != SAFETY_NORMAL:
            return f"safety mode is {SAFETY_NAMES.get(mode, mode)}"
        if not self.control.isProgramRunning():
            return "the control script is not running (program stopped)"
        return None

    def joint_positions(self) -> np.ndarray:
        """The newest measured joint positions. While servoing they come from the pump, the only
        thread that calls ur_rtde then: its interfaces are not safe to call from two threads (a
        second reader froze the receive interface's data after ~24 s in our runs)."""
        return self.joint_state()[0]

    def joint_state(self) -> tuple[np.ndarray, np.ndarray]:
        """The newest measured (joint positions, joint velocities), from one controller sample."""
        if self._pump_thread is not None and self._pump_thread.is_alive():
            q, qd = self._latest
            return q.copy(), qd.copy()
        return (np.asarray(self.receive.getActualQ(), dtype=np.float64),
                np.asarray(self.receive.getActualQd(), dtype=np.float64))

    def teach_mode(self, on: bool, timeout: float = 5.0) -> None:
        """Freedrive (ur_rtde teachMode / endTeachMode) on or off: the operator moves the arm by hand
        and joint_state() reads where it is. Only while the servo loop is not running: freedrive and
        servoing are exclusive. If a stop() ended the control script (its stopScript), the script is
        uploaded again first (reuploadScript). Raises RuntimeError when the loop runs, when a ur_rtde
        call fails or does not return within `timeout` (never hangs; the interface is then wedged
        and no further call is made), or when the controller did not execute the command."""
        if self.control is None:
            raise RuntimeError("teach_mode: not connected (connect() first)")
        if self.running or (self._pump_thread is not None and self._pump_thread.is_alive()):
            raise RuntimeError("teach_mode: the servo loop is running; freedrive and servoing are exclusive: "
                               "stop() servoing first")
        if self._wedged:
            raise RuntimeError("teach_mode: an earlier ur_rtde call never returned (dead stream); reconnect")
        name = "teachMode" if on else "endTeachMode"

        def call(fn_name):
            returned, problem = bounded_call(getattr(self.control, fn_name), timeout)
            if problem is not None:
                if "did not return" in problem:
                    self._wedged = True   # ur_rtde is not thread-safe: no call while that one is blocked
                raise RuntimeError(f"{name}: {fn_name} {problem}")
            return returned

        if not call("isProgramRunning"):
            if not on:
                return   # no control script, no teach mode: the program's end ended it
            if not call("reuploadScript"):
                raise RuntimeError(f"{name}: the control script is not running and reuploadScript failed")
            # reuploadScript returns before ur_rtde's own state shows the program running, and until
            # it does teachMode refuses (returns False): wait for it, bounded.
            deadline = time.monotonic() + timeout
            while not call("isProgramRunning"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: the control script was uploaded again but is not running "
                                       f"after {timeout:g} s")
                time.sleep(0.01)
        if call(name) is False:
            raise RuntimeError(f"{name}: the controller did not execute it (is the arm in a safety stop?)")

    # ---- servoing ----
    def start(self) -> None:
        """Start the C++ loop at the arm's position and the pump that feeds servoJ."""
        lim = self.limits
        q0 = self.joint_positions()
        self._latest = (q0, np.zeros(UR5_DOF))
        self.scheduler = _C.ActionScheduler(UR5_DOF, lim.q_min, lim.q_max, lim.v_max, lim.a_max,
                                            blend_window=lim.blend_window_s)
        self.scheduler.reset(q0)
        self.sink = _C.MailboxSink(UR5_DOF, q0, lim.state_timeout_s, (lim.workspace_lo, lim.workspace_hi),
                                   tool_offset=tuple(self.tcp_offset[:3]))
        self.loop = _C.ControlLoop(self.sink, self.scheduler, rate_hz=self.frequency,
                                   rt_priority=self.rt_priority, rt_priority_level=RT_PRIORITY)
        # The RTDE watchdog stops the program if commands stop arriving (this process hangs or dies).
        self.control.setWatchdog(self.watchdog_hz)
        self._stop.clear()
        # The state clock starts from a reading taken now, not when the sink was built: the calls
        # above can take a second on a loaded host, and the loop's first cycle must not see that
        # as a frozen stream (the pump posts every state after this one).
        self.sink.post_state(self.joint_positions())
        self._pump_thread = threading.Thread(target=self._pump, name="ur5-pump", daemon=True)
        self._pump_thread.start()
        self.loop.start()

    def _pump(self) -> None:
        # Normal priority on purpose: ur_rtde's calls wait for its own receive thread (normal
        # priority); a SCHED_FIFO pump starved that thread on 2 cores and froze the state stream.
        try:
            self._pump_commands()
        except RuntimeError as err:   # ur_rtde raises when the socket dies mid-call
            self.sink.post_fault(f"connection to the controller lost: {err}")
        if self.sink.faulted:
            self._stop_arm()

    def _pump_commands(self) -> None:
        period = 1.0 / self.frequency
        last_stamp = last_slot = None
        log = self.log
        while not self._stop.is_set():
            cmd = self.sink.wait_command(0.05)
            if cmd is None:
                if self.sink.faulted:
                    return
                continue
            _, _, t_slot_ns, _, q, v = cmd
            problem = self.status_problem()
            if problem:
                self.sink.post_fault(problem)
                return
            # servoL gets the same limited trajectory as TCP poses (UR5 forward kinematics and the
            # tool offset the controller has set): the scheduler's joint limits still hold, and
            # the controller's IK maps it back.
            target = q.tolist() if self.servo == "servoJ" else tcp_pose(q, self.tcp_offset).tolist()
            # The time to reach it is the span of trajectory since the last command sent: one period,
            # or more when a late pump found newer commands that replaced ones it never sent.
            span = period if last_slot is None else max(period, (t_slot_ns - last_slot) * 1e-9)
            last_slot = t_slot_ns
            if not getattr(self.control, self.servo)(target, 0.5, 0.5, span, self.lookahead_time, self.gain):
                self.sink.post_fault(f"{self.servo} refused by the controller")
                return
            now = time.monotonic()
            log.commands.append(now, t_slot_ns * 1e-9, q, v)
            # Post only states the controller has produced since the last one: a frozen stream then
            # ages out in the sink and stops the loop.
            stamp = self.receive.getTimestamp()
            if stamp != last_stamp:
                last_stamp = stamp
                q_actual = np.asarray(self.receive.getActualQ())
                qd_actual = np.asarray(self.receive.getActualQd())
                if not (np.all(np.isfinite(q_actual)) and np.all(np.isfinite(qd_actual))):
                    self.sink.post_fault("non-finite joint positions or velocities from the controller")
                    return
                self.sink.post_state(q_actual)
                self._latest = (q_actual, qd_actual)   # one tuple: readers never see q and qd of two samples
                log.states.append(now, q_actual)

    def _stop_arm(self) -> None:
        """servoStop then stopScript, each only where the connection still allows it."""
        if self.control is None:
            return
        self.stop_log.append((time.monotonic(), "stop"))
        if not self.control.isConnected():
            self.stop_log.append((time.monotonic(), "not connected: nothing to send"))
            return
        for name in ("servoStop", "stopScript"):
            returned, problem = bounded_call(getattr(self.control, name))
            # What the call returned, not only that it was made: under a protective stop servoStop
            # returns False (the controller did not execute it).
            outcome = problem or ("done" if returned is None else f"returned {returned}")
            self.stop_log.append((time.monotonic(), f"{name}: {outcome}"))
            if problem is not None and "did not return" in problem:
                # The call went out but its reply never comes (frozen stream). ur_rtde is not
                # thread-safe: no further call may touch this interface while that one is blocked.
                self._wedged = True
                break

    @property
    def fault(self) -> str:
        """Why the loop stopped, or "" while it runs or after a clean stop."""
        if self.loop is None:
            return ""
        return self.loop.stats["fault"] or self.sink.fault

    @property
    def running(self) -> bool:
        return self.loop is not None and self.loop.running

    def stop(self) -> None:
        """Stop servoing (the loop, then the pump), then the arm."""
        if self.loop is not None:
            self.loop.stop()
        self._stop.set()
        if self._pump_thread is not None:
            self._pump_thread.join(timeout=5.0)   # it may be in the stop sequence: 2 bounded calls
        if not self.stop_log:
            self._stop_arm()

    def close(self) -> None:
        self.stop()
        if self._wedged:
            _wedged.append(self.control)
        for iface in (self.receive, None if self._wedged else self.control):
            if iface is not None and bounded_call(iface.disconnect)[1] is not None:
                _wedged.append(iface)


# ur_rtde calls that bounded_call gave up on, and interfaces left wedged by them (a frozen stream:
# the client reconnects forever, and its destructor joins that thread, so it would block or abort).
# They are kept alive here, never destroyed; a process holding any must leave through os._exit
# once its logs are written (`ur5_left_wedged`).
_blocked: list[threading.Thread] = []
_wedged: list = []


def ur5_left_wedged() -> bool:
    """True when a ur_rtde call or interface is stuck on a dead connection in this process."""
    return bool(_wedged) or any(w.is_alive() for w in _blocked)


def bounded_call(fn, timeout: float = 2.0) -> tuple[object, str | None]:
    """Call a ur_rtde function that may block on a dead connection (a frozen stream makes its
    client reconnect in a loop and disconnect() wait for it): (what it returned, None) when it
    returned in time, else (None, what went wrong)."""
    result: list = []
    errors: list[str] = []

    def call():
        try:
            result.append(fn())
        except RuntimeError as err:   # ur_rtde raises when the socket died mid-call
            errors.append(str(err))
    worker = threading.Thread(target=call, daemon=True, name=f"ur_rtde-{fn.__name__}")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        _blocked.append(worker)
        return None, f"did not return within {timeout:.0f} s"
    if errors:
        return None, f"failed: {errors[0]}"
    return result[0], None


def check_reachable(host: str, port: int, what: str, timeout: float = 2.0) -> None:
    """Raise ConnectionError, in plain words, when nothing accepts a TCP connection at host:port
    (ur_rtde reports a refused connection and a dead link alike, as a timeout)."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except ConnectionRefusedError:
        raise ConnectionError(f"{host}:{port} ({what}) refused the connection: nothing listens there. Is the "
                              f"controller on and is {host} its address?") from None
    except (socket.timeout, TimeoutError):
        raise ConnectionError(f"no answer from {host}:{port} ({what}) within {timeout:g} s: wrong address, "
                              "or the network or cable to the controller is down") from None
    except OSError as err:
        raise ConnectionError(f"cannot reach {host}:{port} ({what}): {err.strerror or err}") from None
