"""A UR controller emulator that the real ur_rtde client talks to.

Servers (fixed UR ports, on one loopback address per emulator):
  30004 RTDE      multi-client, per-connection recipes, NOT_FOUND / IN_USE, streaming
  29999 dashboard the line commands ur_rtde's DashboardClient and RTDEControlInterface send
  30003 script    accepts ur_rtde's uploaded control script, then the emulator plays the
                  script's register protocol itself (no URScript interpreter)
One controller thread ticks at the controller rate (125 Hz CB3, 500 Hz e-Series): it runs
one pass of the emulated script, moves the UR5 joints within their limits and streams
RTDE data. Faults are injected through the public methods (see also control.py).

Teach mode (freedrive): ur_rtde's teachMode() / endTeachMode() (commands 18 / 19) put the arm in
and out of it; while in it, the operator's hand is teach_path(q, dt) (the arm follows the hand
along those joint vectors within its limits) and the script's motion commands are ignored.

No client can stop the stream for the others: a malformed or oversized request gets the
protocol's failure reply, every connection's input is bounded (RTDE packages 64 KiB, dashboard
lines 4 KiB, programs 1 MiB), a client that stops reading is dropped instead of blocking the
timing thread, and an unexpected error closes only its own connection (or, in the timing
thread, is logged and the next cycle goes on). The logs are bounded rings: memory stays flat
in a long run (the command log keeps the newest COMMAND_LOG_SIZE commands and counts the rest).

This module wires the parts and runs the controller's clock; each part is a module of its own
(lowest first): logs, server (sockets, threads, send buffers), arm (joints, motion model),
controller (modes, program state, registers), script (port 30003 and the control script's
register protocol), rtde (port 30004), dashboard (port 29999).

Note: ur_rtde's pybind constructors hold the GIL, so a client in the same Python process
as this emulator deadlocks. Run the emulator in its own process (EmulatorProcess).
"""
import math
import threading
import time

from ..kinematics import UR5_LIMITS
from .arm import Arm
from .controller import PLAYING, Controller
from .dashboard import DashboardServer
from .cameras import CameraServer
from .logs import COMMAND_LOG_SIZE, Logs
from .robotiq import GripperSim, RobotiqServer
from .rtde import RtdeServer
from .script import ControlScript, ScriptServer
from .server import Servers

RTDE_PORT, DASHBOARD_PORT, SCRIPT_PORT = 30004, 29999, 30003
__all__ = ["URControllerEmulator", "parse_version", "RTDE_PORT", "DASHBOARD_PORT", "SCRIPT_PORT"]


def parse_version(text):
    """'3.15' / '5.11.1' / '5.11.1.108318' -> (major, minor, bugfix, build)."""
    parts = [int(p) for p in str(text).split(".")]
    defaults = {(3, 15): (7, 106331), (5, 11): (1, 108318)}
    if len(parts) == 2:
        parts += list(defaults.get(tuple(parts), (0, 0)))
    parts += [0] * (4 - len(parts))
    return tuple(parts[:4])


class URControllerEmulator:
    """Emulated UR5 controller. Use as a context manager or start()/stop().

    servo_horizon_s sets the protective-stop rule: a servo target (servoJ/servoL) farther
    than v_max * servo_horizon_s from the actual position of any joint, or outside the
    joint position range, raises a protective stop instead of moving.

    The parts: controller (its .arm), control_script, rtde, dashboard, script_server, servers,
    logs. One lock (the emulator's) guards them all.
    """

    def __init__(self, host="127.0.0.1", version="3.15", q0=None, limits=UR5_LIMITS,
                 servo_horizon_s=0.04, preload=False, serial_number="2017300000",
                 log_size=COMMAND_LOG_SIZE, gripper_port=None, camera_port=None):
        self.host = host
        self.version = parse_version(version)
        self.cb3 = self.version[0] < 5
        self.rate = 125 if self.cb3 else 500          # controller cycle and RTDE limit
        self.dt = 1.0 / self.rate
        self.limits, self.servo_horizon_s, self.serial_number = limits, servo_horizon_s, serial_number
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._frozen_until = 0.0
        self._t0 = time.monotonic()
        self._t_cycle = None        # the controller time of the cycle in progress (the ticker's)
        self.logs = Logs(self._lock, self.now, log_size)
        self.servers = Servers(host, self._lock, self._stopping, self.logs)
        chunks = self.servers.chunks
        self.controller = Controller(Arm(q0, limits, self.dt, servo_horizon_s), self.logs.event)
        self.control_script = ControlScript(self.controller)
        # self._data_package is looked up per package: tests replace it on the instance.
        self.rtde = RtdeServer(self.version, self.rate, self._lock, self.logs, chunks,
                               on_data=lambda conn, payload: self._data_package(conn, payload))
        self.dashboard = DashboardServer(self.controller, self.version, serial_number, self._lock,
                                         self.logs, chunks)
        self.script_server = ScriptServer(self.controller, self._lock, self.logs, chunks)
        self._values = {}           # the RTDE output variables, as of the last cycle
        self._exec_time = 0.0
        self._update_values()       # complete from the start, even if a later update fails
        if preload:
            self.controller.start_program("rtde_control", 0)
        # The cell around the arm, each on its own port when asked for: a Robotiq gripper on the
        # URCap socket, and cameras rendering the cell from the arm's state (scene + wrist).
        self.gripper = GripperSim()
        self.robotiq = RobotiqServer(self.gripper, host, gripper_port) if gripper_port is not None else None
        self.cameras = CameraServer(self._camera_state, host=host, port=camera_port) if camera_port is not None else None

    # ----------------------------------------------------------------- lifecycle
    def start(self):
        self.servers.listen(RTDE_PORT, "rtde_client", self.rtde.client)
        self.servers.listen(DASHBOARD_PORT, "dashboard_client", self.dashboard.client)
        self.servers.listen(SCRIPT_PORT, "script_client", self.script_server.client)
        self.servers.spawn(self._ticker)
        for part in (self.robotiq, self.cameras):
            if part is not None:
                part.start()
        self.logs.event(f"started: {self.describe()}")
        return self

    def stop(self):
        self._stopping.set()
        self.servers.stop()
        for part in (self.robotiq, self.cameras):
            if part is not None:
                part.stop()

    def _camera_state(self):
        """What the cameras render: the arm's joints and the gripper's opening, read together."""
        with self._lock:
            return self.controller.arm.q.copy(), self.gripper.width_m

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def describe(self):
        v = ".".join(map(str, self.version))
        cell = "".join([f", gripper {self.robotiq.port}" if self.robotiq else "",
                        f", cameras {self.cameras.port}" if self.cameras else ""])
        return (f"UR5 emulator, controller {v} ({'CB3' if self.cb3 else 'e-Series'}, {self.rate} Hz) "
                f"on {self.host}: rtde {RTDE_PORT}, dashboard {DASHBOARD_PORT}, script {SCRIPT_PORT}{cell}")

    @property
    def command_log_capacity(self):
        return self.logs.command_capacity

    @property
    def in_int(self):
        """The 48 input int registers (the command register is in_int[offset])."""
        return self.controller.in_int

    @property
    def _threads(self):
        return self.servers.threads

    # ------------------------------------------------------------- side channel
    def now(self):
        """Controller time (the RTDE `timestamp`), seconds since the emulator was created."""
        return time.monotonic() - self._t0

    def protective_stop(self, reason="injected"):
        with self._lock:
            self.controller.protective_stop(reason)

    def emergency_stop(self, reason="injected"):
        with self._lock:
            self.controller.emergency_stop(reason)

    def stop_program(self, reason="injected"):
        with self._lock:
            self.controller.end_program(f"program stopped: {reason}")

    def freeze_stream(self, seconds=None):
        """Stop sending RTDE data (connections stay open) for `seconds`, or until unfrozen."""
        with self._lock:
            self._frozen_until = math.inf if seconds is None else time.monotonic() + seconds
            self.logs.event(f"stream frozen for {seconds} s")

    def unfreeze_stream(self):
        with self._lock:
            self._frozen_until = 0.0

    def drop_connections(self, refuse_s=0.0):
        """Close every client connection; refuse new ones for `refuse_s` seconds."""
        with self._lock:
            self.servers.refuse(refuse_s)
            self.logs.event(f"connections dropped, refusing for {refuse_s} s")
        self.servers.close_clients()

    def reset_faults(self):
        """Back to a powered, brake-released, unfaulted arm (the program is not restarted)."""
        with self._lock:
            self.controller.reset_faults()
            self._frozen_until = self.servers.refuse_until = 0.0
            self.logs.event("faults reset")

    # The cell's faults (the gripper's socket, the cameras' stream), for the tests of serve and record.
    def gripper_freeze(self, seconds):
        self.robotiq.freeze(seconds)

    def gripper_drop(self):
        self.robotiq.drop_connections()

    def set_gripper_object(self, width_m=None):
        self.gripper.object_width_m = width_m

    def camera_freeze(self, camera, seconds=None):
        """That camera sends nothing for `seconds` (None: until 0 is given)."""
        if seconds == 0:
            self.cameras.unfreeze(camera)
        else:
            self.cameras.freeze(camera, seconds)

    def camera_delay(self, camera, seconds):
        self.cameras.set_delay(camera, seconds)

    def set_joint_positions(self, q):
        with self._lock:
            self.controller.arm.set_joint_positions(q)

    # The operator's hand in teach mode (freedrive), for the tests of recording.
    def teach_path(self, q, dt):
        """The operator's hand moves the arm along `q` (joint vectors), one every `dt` seconds,
        starting now: the arm follows within its velocity and acceleration limits, and holds the
        last point. Only in teach mode (ur_rtde's teachMode()); refused otherwise (ValueError,
        with the reason). Returns the controller time (the RTDE timestamp) of the path's first point."""
        with self._lock:
            t0 = self.now()
            refused = self.controller.arm.teach_path(q, dt, t0)
            if refused is None:
                self.logs.event(f"teach path: {len(q)} points at {dt} s from t={t0:.3f}")
        if refused is not None:
            raise ValueError(refused)
        return t0

    def teach_path_done(self):
        """True when no hand path is in progress (it has ended and the arm has reached its last
        point, or teach mode has ended)."""
        with self._lock:
            return self.controller.arm.teach_path_done(self.now())

    def command_log(self, since=0.0):
        """Commands received from clients: dicts with t (controller time), id, name, ints, doubles.

        The newest command_log_capacity commands; snapshot()["log_dropped"] counts older ones."""
        return self.logs.commands(since)

    def clear_command_log(self):
        self.logs.clear_commands()

    def clear_event_log(self):
        self.logs.clear_events()

    def setup_log(self):
        """RTDE setup messages as received: dicts with conn (1, 2, ...), type ('V', 'v', 'O',
        'I', 'S', 'P'), names, frequency and the recipe id answered (the handshake guard)."""
        return self.logs.setups()

    def event_log(self):
        return self.logs.events()

    def snapshot(self):
        with self._lock:
            ctl, arm = self.controller, self.controller.arm
            return {"t": self.now(), "q": arm.q.tolist(), "qd": arm.qd.tolist(), "mode": arm.mode,
                    "target": arm.target.tolist(), "runtime_state": ctl.runtime_state,
                    "robot_mode": ctl.robot_mode, "safety_mode": ctl.safety_mode,
                    "program": ctl.program_name, "reg_offset": ctl.reg_off,
                    "rtde_clients": len(self.rtde.conns),
                    "frozen": time.monotonic() < self._frozen_until,
                    "log_dropped": self.logs.commands_dropped(),
                    "tick_errors": self.logs.tick_errors, "handler_errors": self.logs.handler_errors,
                    "gripper_width": self.gripper.width_m,
                    "teach": arm.teaching, "teach_ignored": ctl.teach_ignored}

    # ------------------------------------------------------------ controller clock
    def _ticker(self):
        next_t = time.monotonic()
        while not self._stopping.is_set():
            next_t += self.dt
            t_start = time.monotonic()
            with self._lock:
                try:
                    # The cycle's time: the arm moves to it, the stream stamps it (one clock reading).
                    self._t_cycle = self.now()
                    self._cycle()
                    self._update_values()
                except Exception as e:      # one bad cycle must not end the stream for everyone
                    self._cycle_error(e)
                self._t_cycle = None
                conns = list(self.rtde.conns) if t_start >= self._frozen_until else []
            for c in conns:
                self.rtde.stream(c, self._values)
            self._exec_time = (time.monotonic() - t_start) * 1000.0
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -0.1:
                next_t = time.monotonic()   # fell far behind (machine stalled): do not burst

    def _cycle(self):
        """One controller cycle (at the ticker's cycle time): the watchdog, one pass of the program,
        the arm's motion."""
        ctl = self.controller
        ctl.check_watchdog()
        if ctl.runtime_state == PLAYING and ctl.program_name:
            self.control_script.run_pass()
        ctl.step(self._cycle_time())

    def _cycle_error(self, e):
        """Log an unexpected error of a controller cycle (once per distinct error) and end the
        program, as a controller's runtime error does; the next cycle and the stream go on."""
        self.logs.tick_error(e)
        try:
            self.controller.arm.halt()
            self.controller.end_program("controller cycle error")
        except Exception:
            pass

    def _cycle_time(self):
        """The running cycle's controller time (the ticker reads the clock once per cycle), or now."""
        return self.now() if self._t_cycle is None else self._t_cycle

    def _update_values(self):
        self.controller.publish(self._values, self._cycle_time(), self._exec_time)

    def _data_package(self, conn, payload):
        """One RTDE input package: its values into the registers; a command logged."""
        values = self.rtde.unpack_inputs(conn, payload)
        if values is None:
            return
        with self._lock:
            cmd_reg = self.controller.write_inputs(values)
            if cmd_reg is not None and values[cmd_reg] != 0:
                self.logs.command(cmd_reg, values)
