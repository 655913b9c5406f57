"""A UR controller emulator that the real ur_rtde client talks to.

Servers (fixed UR ports, on one loopback address per emulator):
  30004 RTDE      multi-client, per-connection recipes, NOT_FOUND / IN_USE, streaming
  29999 dashboard the line commands ur_rtde's DashboardClient and RTDEControlInterface send
  30003 script    accepts ur_rtde's uploaded control script, then the emulator plays the
                  script's register protocol itself (no URScript interpreter)
One controller thread ticks at the controller rate (125 Hz CB3, 500 Hz e-Series): it runs
one pass of the emulated script, moves the UR5 joints within their limits and streams
RTDE data. Faults are injected through the public methods (see also control.py).

No client can stop the stream for the others: a malformed or oversized request gets the
protocol's failure reply, every connection's input is bounded (RTDE packages 64 KiB, dashboard
lines 4 KiB, programs 1 MiB), a client that stops reading is dropped instead of blocking the
timing thread, and an unexpected error closes only its own connection (or, in the timing
thread, is logged and the next cycle goes on). The logs are bounded rings: memory stays flat
in a long run (the command log keeps the newest COMMAND_LOG_SIZE commands and counts the rest).

Note: ur_rtde's pybind constructors hold the GIL, so a client in the same Python process
as this emulator deadlocks. Run the emulator in its own process (EmulatorProcess).
"""
import math
import re
import select
import socket
import struct
import threading
import time
from collections import deque

import numpy as np

from . import protocol as P
from ..kinematics import (UR5_LIMITS, fk_matrix, forward_kinematics, inverse_kinematics, matrix_from_rotvec,
                          rotvec_from_matrix)
from .kinematics import track_step, velocity_step

RTDE_PORT, DASHBOARD_PORT, SCRIPT_PORT = 30004, 29999, 30003

# Runtime states, robot modes, safety modes (UR enums).
STOPPED, PLAYING, PAUSED = 1, 2, 4
POWER_OFF, IDLE, RUNNING = 3, 5, 7
NORMAL, PROTECTIVE_STOP, ROBOT_EMERGENCY_STOP = 1, 3, 7
SAFETY_MODE_NAMES = {NORMAL: "NORMAL", PROTECTIVE_STOP: "PROTECTIVE_STOP",
                     ROBOT_EMERGENCY_STOP: "ROBOT_EMERGENCY_STOP"}
ROBOT_MODE_NAMES = {POWER_OFF: "POWER_OFF", IDLE: "IDLE", RUNNING: "RUNNING"}
RUNTIME_NAMES = {STOPPED: "STOPPED", PLAYING: "PLAYING", PAUSED: "PAUSED"}
# safety_status_bits: 0 normal, 2 protective stopped, 6 robot e-stopped, 7 emergency
# stopped, 10 stopped due to safety.
SAFETY_BITS = {NORMAL: 1 << 0, PROTECTIVE_STOP: (1 << 2) | (1 << 10),
               ROBOT_EMERGENCY_STOP: (1 << 6) | (1 << 7) | (1 << 10)}

# ur_rtde command ids (RTDE::RobotCommand::Type in 1.6.5).
COMMAND_NAMES = {
    0: "clear", 1: "moveJ", 2: "moveJ_IK", 3: "moveL", 4: "moveL_FK", 6: "forceMode",
    7: "forceModeStop", 8: "zeroFtSensor", 9: "speedJ", 10: "speedL", 11: "servoJ", 12: "servoC",
    15: "speedStop", 16: "servoStop", 24: "servoL", 31: "protectiveStop", 33: "stopL", 34: "stopJ",
    35: "setWatchdog", 255: "stopScript"}
# Commands the control script handles "in real time": processed every cycle, then ready (1).
REALTIME_COMMANDS = {24, 11, 9, 10, 6, 25, 26, 27, 38, 58, 66, 67, 68, 69, 70, 71}
SIGNAL_READY, SIGNAL_DONE = 1, 2
# The script uses 24 registers from its offset (ur_rtde: 0, or 24 for the upper range); any other
# offset would index past the 48 registers, which on a controller is a runtime error.
MAX_REG_OFFSET = 24

# Per-connection input limits: no client can grow the emulator's memory or CPU without bound.
MAX_DASHBOARD_LINE = 4096           # a dashboard command is one short line
MAX_PROGRAM = 1 << 20               # ur_rtde's control script is 38-42 kB
SEND_BACKLOG = 64 * 1024            # RTDE bytes a client may leave unread beyond the kernel's buffer
MAX_CLIENTS = 64                    # open connections, all ports together (one thread each)
# Log capacities. The command log holds 40 s of servoJ at 500 Hz (160 s at 125 Hz; tests read a few
# thousand entries at most) in about 5 MB; older entries are dropped and counted (log_dropped).
COMMAND_LOG_SIZE = 20_000
EVENT_LOG_SIZE = 10_000
SETUP_LOG_SIZE = 4096
SETUP_LOG_NAMES = 64                # names kept per setup-log entry (each cut to 64 characters)
# The requests the controller answers (and the setup log records); data packages aside.
_SETUP_TYPES = {P.REQUEST_PROTOCOL_VERSION, P.GET_URCONTROL_VERSION, P.SETUP_OUTPUTS, P.SETUP_INPUTS,
                P.START, P.PAUSE}

# The uploaded script has "global reg_offset_int = # int register offset\n24" (the offset
# is injected after the comment), so allow a comment and a newline before the number.
_OFFSET_RE = re.compile(rb"global\s+reg_offset_int\s*=\s*(?:#[^\n]*\n)?\s*(-?\d+)")
# A program ends with a top-level "end" line; its newline must have arrived too, so a chunk that
# happens to end after "end" of "end_something()" is not taken for the end of the program.
_PROGRAM_END_RE = re.compile(rb"^end[ \t\r]*\n", re.MULTILINE)


def parse_version(text):
    """'3.15' / '5.11.1' / '5.11.1.108318' -> (major, minor, bugfix, build)."""
    parts = [int(p) for p in str(text).split(".")]
    defaults = {(3, 15): (7, 106331), (5, 11): (1, 108318)}
    if len(parts) == 2:
        parts += list(defaults.get(tuple(parts), (0, 0)))
    parts += [0] * (4 - len(parts))
    return tuple(parts[:4])


class _Connection:
    """One RTDE client: its recipes and its outgoing bytes.

    The socket is non-blocking, and the reader (setup replies) and the ticker (data) both write
    through send(): what the kernel does not take at once waits in a backlog of at most
    SEND_BACKLOG bytes. Past that the client is not reading and is dropped, so a silent client
    can never block the ticker, and with it every other client's stream.
    """

    def __init__(self, sock, addr, number, on_drop=None):
        self.sock, self.addr, self.number = sock, addr, number
        self.on_drop = on_drop
        self.send_lock = threading.Lock()
        self.backlog = bytearray()
        self.dropped = False
        self.output = None          # Recipe streamed to this client
        self.frequency = 0.0
        self.phase = 0.0
        self.inputs = []            # input recipes; id = index + 1 (ur_rtde hard-codes 1..23)
        self.started = False

    def send(self, data=b""):
        """Queue data and write what the socket takes now; never blocks. False once dropped."""
        with self.send_lock:
            if self.dropped:
                return False
            self.backlog += data
            try:
                while self.backlog:
                    del self.backlog[:self.sock.send(self.backlog)]
            except (BlockingIOError, InterruptedError):
                pass                # kernel buffer full: the rest goes out on a later call
            except OSError as e:
                return self._drop(f"send failed ({e})")
            if len(self.backlog) > SEND_BACKLOG:
                return self._drop(f"not reading ({len(self.backlog)} bytes waiting)")
            return True

    def _drop(self, reason):
        self.dropped = True
        self.backlog = bytearray()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)    # the reader thread sees EOF and cleans up
        except OSError:
            pass
        if self.on_drop:
            self.on_drop(f"rtde client {self.number} dropped: {reason}")
        return False


class URControllerEmulator:
    """Emulated UR5 controller. Use as a context manager or start()/stop().

    servo_horizon_s sets the protective-stop rule: a servo target (servoJ/servoL) farther
    than v_max * servo_horizon_s from the actual position of any joint, or outside the
    joint position range, raises a protective stop instead of moving.
    """

    def __init__(self, host="127.0.0.1", version="3.15", q0=None, limits=UR5_LIMITS,
                 servo_horizon_s=0.04, preload=False, serial_number="2017300000",
                 log_size=COMMAND_LOG_SIZE):
        self.host = host
        self.version = parse_version(version)
        self.cb3 = self.version[0] < 5
        self.rate = 125 if self.cb3 else 500          # controller cycle and RTDE limit
        self.dt = 1.0 / self.rate
        self.limits = limits
        self.servo_horizon_s = servo_horizon_s
        self.serial_number = serial_number
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._threads = []
        self._listeners = {}
        self._client_socks = set()
        self._rtde_conns = set()
        self._input_owner = {}                          # input name -> _Connection
        self._refuse_until = 0.0
        self._frozen_until = 0.0
        self._t0 = time.monotonic()
        # Command log entries are (t, id, n_ints, packed registers): one small bytes object and no
        # containers, so the garbage collector stops tracking them (a log of 100k dicts once cost
        # a 300 ms full collection, which stalled the stream for longer than a client tolerates).
        self.command_log_capacity = log_size
        self._log = deque(maxlen=log_size)
        self._log_total = 0                             # appended since the last clear
        self._events = deque(maxlen=EVENT_LOG_SIZE)
        self._setup_log = deque(maxlen=SETUP_LOG_SIZE)
        self._conn_count = 0
        self._tick_errors = self._handler_errors = 0
        self._last_tick_error = None
        # Arm state.
        self.q = np.array(q0 if q0 is not None else [0.0, -1.57, 1.57, -1.57, -1.57, 0.0], float)
        self.qd = np.zeros(6)
        self.qdd = np.zeros(6)
        self.mode = "idle"          # idle | servo | speed | move | stop
        self._target = self.q.copy()
        self._vel_target = np.zeros(6)
        self._move_v = self._move_a = None
        self._acc = limits.a_max
        self._servol_cache = (None, None)
        self.robot_mode, self.safety_mode = RUNNING, NORMAL
        # Control script state (what rtde_control.script keeps in its globals).
        self.runtime_state = STOPPED
        self.program_name = None
        self.reg_off = 0
        self._executing = False
        self._blocking = False
        self._wd_freq, self._wd_last = 0.0, 0.0
        self.in_int, self.in_double = [0] * 48, [0.0] * 48
        self.out_int, self.out_double = [0] * 48, [0.0] * 48
        self.inputs = {}            # other input variables (IO, external_force_torque ...)
        self._values = {}
        self._prev_pose = None
        self._exec_time = 0.0
        self._update_values()       # complete from the start, even if a later update fails
        if preload:
            self._start_program("rtde_control", 0)

    # ----------------------------------------------------------------- lifecycle
    def start(self):
        for port, handler in ((RTDE_PORT, self._rtde_client), (DASHBOARD_PORT, self._dashboard_client),
                              (SCRIPT_PORT, self._script_client)):
            self._listeners[port] = self._bind(port)
            self._spawn(self._serve, port, handler)
        self._spawn(self._ticker)
        self._event(f"started: {self.describe()}")
        return self

    def stop(self):
        self._stopping.set()
        self._close_clients()
        for t in self._threads:
            t.join(timeout=2.0)
        for s in self._listeners.values():
            if s is not None:
                s.close()
        self._listeners.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def describe(self):
        v = ".".join(map(str, self.version))
        return (f"UR5 emulator, controller {v} ({'CB3' if self.cb3 else 'e-Series'}, {self.rate} Hz) "
                f"on {self.host}: rtde {RTDE_PORT}, dashboard {DASHBOARD_PORT}, script {SCRIPT_PORT}")

    def _spawn(self, fn, *args):
        t = threading.Thread(target=fn, args=args, daemon=True, name=f"ursim-{fn.__name__}")
        t.start()
        with self._lock:    # forget finished client threads: a long run opens many connections
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        return t

    def _bind(self, port):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, port))
        s.listen(8)
        s.settimeout(0.1)   # accept() wakes up to notice stop() and refusal windows
        return s

    def _serve(self, port, handler):
        while not self._stopping.is_set():
            if time.monotonic() < self._refuse_until:
                # "Connection dropped": nobody listens, so reconnect attempts are refused.
                if self._listeners.get(port) is not None:
                    self._listeners[port].close()
                    self._listeners[port] = None
                time.sleep(0.05)
                continue
            if self._listeners.get(port) is None:
                try:
                    self._listeners[port] = self._bind(port)
                except OSError:
                    time.sleep(0.1)
                    continue
            try:
                sock, addr = self._listeners[port].accept()
            except (socket.timeout, OSError, AttributeError):   # AttributeError: just closed
                continue
            with self._lock:
                full = len(self._client_socks) >= MAX_CLIENTS
                if not full:
                    self._client_socks.add(sock)
            if full:    # a client leaking connections must not cost a thread each, without end
                self._event(f"too many connections: {addr[0]}:{addr[1]} on {port} closed")
                sock.close()
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(0.5)    # dashboard replies; RTDE sockets are made non-blocking
            self._spawn(self._client_wrapper, handler, sock, addr)

    def _client_wrapper(self, handler, sock, addr):
        try:
            handler(sock, addr)
        except OSError:
            pass                    # the peer went away
        except Exception as e:      # an input nobody foresaw: it closes this connection only
            with self._lock:
                self._handler_errors += 1
            self._event(f"{handler.__name__.strip('_')} {addr[0]}:{addr[1]} closed after "
                        f"{_describe_error(e)}")
        finally:
            with self._lock:
                self._client_socks.discard(sock)
            sock.close()

    def _close_clients(self):
        with self._lock:
            socks = list(self._client_socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _chunks(self, sock):
        """Data as it arrives, until the peer closes or the emulator stops (the poll timeout lets
        the loop check for stop; it works for blocking and non-blocking sockets alike)."""
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while not self._stopping.is_set():
            if not poller.poll(500):
                continue
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, BlockingIOError, InterruptedError):
                continue
            if not chunk:
                return
            yield chunk

    # ------------------------------------------------------------- side channel
    def now(self):
        """Controller time (the RTDE `timestamp`), seconds since the emulator was created."""
        return time.monotonic() - self._t0

    def protective_stop(self, reason="injected"):
        with self._lock:
            self._protective_stop(reason)

    def emergency_stop(self, reason="injected"):
        with self._lock:
            self.safety_mode, self.robot_mode = ROBOT_EMERGENCY_STOP, POWER_OFF
            self._halt()
            self._end_program(f"emergency stop: {reason}")

    def stop_program(self, reason="injected"):
        with self._lock:
            self._end_program(f"program stopped: {reason}")

    def freeze_stream(self, seconds=None):
        """Stop sending RTDE data (connections stay open) for `seconds`, or until unfrozen."""
        with self._lock:
            self._frozen_until = math.inf if seconds is None else time.monotonic() + seconds
            self._event(f"stream frozen for {seconds} s")

    def unfreeze_stream(self):
        with self._lock:
            self._frozen_until = 0.0

    def drop_connections(self, refuse_s=0.0):
        """Close every client connection; refuse new ones for `refuse_s` seconds."""
        with self._lock:
            self._refuse_until = time.monotonic() + refuse_s
            self._event(f"connections dropped, refusing for {refuse_s} s")
            if refuse_s > 0:
                # Close the listeners now: a reconnect in the next few ms must be refused,
                # not queued in the kernel backlog.
                for port, s in list(self._listeners.items()):
                    if s is not None:
                        s.close()
                        self._listeners[port] = None
        self._close_clients()

    def reset_faults(self):
        """Back to a powered, brake-released, unfaulted arm (the program is not restarted)."""
        with self._lock:
            self.safety_mode, self.robot_mode = NORMAL, RUNNING
            self._frozen_until = self._refuse_until = 0.0
            self._event("faults reset")

    def set_joint_positions(self, q):
        with self._lock:
            self.q = np.array(q, float)
            self.qd[:] = 0.0
            self._target = self.q.copy()
            self.mode = "idle"

    def command_log(self, since=0.0):
        """Commands received from clients: dicts with t (controller time), id, name, ints, doubles.

        The newest command_log_capacity commands; snapshot()["log_dropped"] counts older ones."""
        with self._lock:
            entries = [e for e in self._log if e[0] >= since]
        out, layouts = [], {}
        for t, cmd, n_ints, packed in entries:
            layout = layouts.get((n_ints, len(packed)))
            if layout is None:
                layout = layouts[n_ints, len(packed)] = struct.Struct(
                    f">{n_ints}i{(len(packed) - 4 * n_ints) // 8}d")
            flat = layout.unpack(packed)
            out.append({"t": t, "id": cmd, "name": COMMAND_NAMES.get(cmd) or f"cmd{cmd}",
                        "ints": flat[:n_ints], "doubles": flat[n_ints:]})
        return out

    def clear_command_log(self):
        with self._lock:
            self._log.clear()
            self._log_total = 0

    def clear_event_log(self):
        with self._lock:
            self._events.clear()

    def setup_log(self):
        """RTDE setup messages as received: dicts with conn (1, 2, ...), type ('V', 'v', 'O',
        'I', 'S', 'P'), names, frequency and the recipe id answered (the handshake guard)."""
        with self._lock:
            return list(self._setup_log)

    def event_log(self):
        with self._lock:
            return list(self._events)

    def snapshot(self):
        with self._lock:
            return {"t": self.now(), "q": self.q.tolist(), "qd": self.qd.tolist(), "mode": self.mode,
                    "target": self._target.tolist(), "runtime_state": self.runtime_state,
                    "robot_mode": self.robot_mode, "safety_mode": self.safety_mode,
                    "program": self.program_name, "reg_offset": self.reg_off,
                    "rtde_clients": len(self._rtde_conns),
                    "frozen": time.monotonic() < self._frozen_until,
                    "log_dropped": self._log_total - len(self._log),
                    "tick_errors": self._tick_errors, "handler_errors": self._handler_errors}

    # ------------------------------------------------------------ controller tick
    def _ticker(self):
        next_t = time.monotonic()
        while not self._stopping.is_set():
            next_t += self.dt
            t_start = time.monotonic()
            with self._lock:
                try:
                    self._cycle()
                    self._update_values()
                except Exception as e:      # one bad cycle must not end the stream for everyone
                    self._cycle_error(e)
                conns = list(self._rtde_conns) if t_start >= self._frozen_until else []
            for c in conns:
                self._stream(c)
            self._exec_time = (time.monotonic() - t_start) * 1000.0
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -0.1:
                next_t = time.monotonic()   # fell far behind (machine stalled): do not burst

    def _cycle_error(self, e):
        """Log an unexpected error of a controller cycle (once per distinct error) and end the
        program, as a controller's runtime error does; the next cycle and the stream go on."""
        self._tick_errors += 1
        text = _describe_error(e)
        if text != self._last_tick_error:
            self._last_tick_error = text
            self._event(f"controller cycle error (#{self._tick_errors}): {text}")
        try:
            self._halt()
            self._end_program("controller cycle error")
        except Exception:
            pass

    def _stream(self, c):
        if not c.started or c.output is None:
            if c.backlog:
                c.send()            # setup replies the kernel could not take yet
            return
        # Phase accumulator: a client at f Hz gets a package on f of every `rate` ticks.
        c.phase += c.frequency
        if c.phase < self.rate:
            if c.backlog:
                c.send()
            return
        c.phase -= self.rate
        try:
            package = c.output.pack(self._values)
        except Exception as e:      # setup checked the recipe; a last resort, for this client only
            with self._lock:
                self._tick_errors += 1
            c._drop(f"cannot pack its recipe: {_describe_error(e)}")
            return
        c.send(package)

    def _cycle(self):
        # (elapsed * f > 1, not elapsed > 1 / f: any float the client sent is safe here)
        if (self.runtime_state == PLAYING and self._wd_freq > 0
                and (time.monotonic() - self._wd_last) * self._wd_freq > 1.0):
            self._end_program("RTDE watchdog expired")
        if self.runtime_state == PLAYING and self.program_name:
            self._script_pass()
        self._motion_step()

    def _motion_step(self):
        lim = self.limits
        qd_prev = self.qd.copy()
        if self.robot_mode != RUNNING or self.safety_mode != NORMAL or self.mode == "idle":
            self.qd[:] = 0.0
        elif self.mode == "servo":
            self.q, self.qd = track_step(self.q, self.qd, self._target, self.dt, lim.v_max, lim.a_max)
        elif self.mode == "move":
            self.q, self.qd = track_step(self.q, self.qd, self._target, self.dt, self._move_v, self._move_a)
            if np.max(np.abs(self.q - self._target)) < 1e-9 and np.max(np.abs(self.qd)) < 1e-6:
                self.q, self.qd, self.mode = self._target.copy(), np.zeros(6), "idle"
        elif self.mode in ("speed", "stop"):
            goal = self._vel_target if self.mode == "speed" else np.zeros(6)
            self.qd = velocity_step(self.qd, goal, self.dt, self._acc)
            self.q = self.q + self.qd * self.dt
            if self.mode == "stop" and not np.any(self.qd):
                self.mode = "idle"
            if np.any(self.q < lim.q_min) or np.any(self.q > lim.q_max):
                self._protective_stop("joint position limit reached")
        self.qdd = (self.qd - qd_prev) / self.dt

    def _update_values(self):
        v = self._values
        pose = forward_kinematics(self.q)
        t = fk_matrix(self.q + self.qd * self.dt)   # pose one cycle ahead -> TCP speed
        lin = (t[:3, 3] - pose[:3]) / self.dt
        ang = rotvec_from_matrix(t[:3, :3] @ matrix_from_rotvec(pose[3:]).T) / self.dt
        powered = self.robot_mode != POWER_OFF
        v.update({
            "timestamp": self.now(), "actual_q": self.q, "target_q": self.q, "actual_qd": self.qd,
            "target_qd": self.qd, "actual_qdd": self.qdd, "target_qdd": self.qdd,
            "actual_TCP_pose": pose, "target_TCP_pose": pose,
            "actual_TCP_speed": np.concatenate([lin, ang]), "target_TCP_speed": np.concatenate([lin, ang]),
            "robot_mode": self.robot_mode, "safety_mode": self.safety_mode,
            "runtime_state": self.runtime_state,
            "joint_mode": [253 if self.robot_mode == RUNNING else (255 if powered else 239)] * 6,
            "robot_status_bits": (1 if powered else 0) | (2 if self.runtime_state == PLAYING else 0),
            "safety_status_bits": SAFETY_BITS[self.safety_mode],
            "actual_execution_time": self._exec_time,
            "actual_main_voltage": 48.0 if powered else 0.0,
            "actual_robot_voltage": 48.0 if powered else 0.0,
            "actual_joint_voltage": [48.0 if powered else 0.0] * 6,
        })
        for n in range(48):
            v[f"output_int_register_{n}"] = self.out_int[n]
            v[f"output_double_register_{n}"] = self.out_double[n]
        if "speed_scaling" not in v:    # constants and quantities this emulator does not model
            zeros6, zeros3 = [0.0] * 6, [0.0] * 3
            for name, typ in P.OUTPUT_TYPES.items():
                if name not in v:
                    v[name] = {"VECTOR6D": zeros6, "VECTOR3D": zeros3, "VECTOR6INT32": [0] * 6}.get(
                        typ, 0.0 if typ == "DOUBLE" else 0)
            v.update({"speed_scaling": 1.0, "target_speed_fraction": 1.0,
                      "joint_temperatures": [30.0] * 6, "actual_tool_accelerometer": [0.0, 0.0, 9.81]})

    # ------------------------------------------------------- emulated control script
    def _start_program(self, name, reg_off):
        self.program_name, self.reg_off = name, reg_off
        self.runtime_state = PLAYING
        self._executing = self._blocking = False
        self._wd_freq = 0.0
        self.out_int[reg_off] = SIGNAL_READY
        self.out_int[reg_off + 2] = 0
        self._event(f"program {name} started (register offset {reg_off})")

    def _end_program(self, reason):
        if self.runtime_state != STOPPED:
            self._event(reason)
        self.runtime_state = STOPPED
        self.out_int[self.reg_off] = 0
        self._executing = self._blocking = False
        self._wd_freq = 0.0
        if self.mode != "idle":     # like a real program end: brake to a stop
            self.mode, self._acc = "stop", self.limits.a_max

    def _protective_stop(self, reason):
        if self.safety_mode != NORMAL:
            return
        self.safety_mode = PROTECTIVE_STOP
        self._halt()
        if self.runtime_state == PLAYING:
            self.runtime_state = PAUSED     # a protective stop pauses the running program
        self._event(f"protective stop: {reason}")

    def _halt(self):
        self.qd[:] = 0.0
        self.mode = "idle"
        self._target = self.q.copy()

    def _script_pass(self):
        """One pass of rtde_control.script's main loop (one controller cycle)."""
        off = self.reg_off
        if self._blocking:              # inside a blocking call (stopj, movej ...)
            if self.mode == "idle":
                self._blocking = False
                self.out_int[off] = SIGNAL_DONE
            return
        cmd = self.in_int[off]
        if cmd in REALTIME_COMMANDS:
            self._realtime_command(cmd)
            if self.runtime_state == PLAYING:
                self.out_int[off] = SIGNAL_READY
        elif cmd == 0:
            self._executing = False
            self.out_int[off] = SIGNAL_READY
        elif not self._executing:
            self._executing = True
            self._command(cmd)

    def _d(self, i, n=1):
        base = self.reg_off + i
        return self.in_double[base:base + n] if n > 1 else self.in_double[base]

    def _realtime_command(self, cmd):
        lim = self.limits
        if cmd == 11:                                   # servoJ
            self._servo(np.array(self._d(0, 6)))
        elif cmd == 24:                                 # servoL: IK near the current joints
            pose = tuple(self._d(0, 6))
            if not np.all(np.isfinite(pose)):
                self._protective_stop(f"servoL pose {pose} not finite")
                return
            if self._servol_cache[0] != pose:
                self._servol_cache = (pose, inverse_kinematics(np.array(pose), self.q))
            q = self._servol_cache[1]
            if q is None:
                self._end_program(f"servoL: no inverse kinematics solution for {pose}")
            else:
                self._servo(q)
        elif cmd == 9:                                  # speedJ
            qd = np.array(self._d(0, 6))
            if not np.all(np.abs(qd) <= lim.v_max):     # (also catches NaN)
                self._protective_stop(f"speedJ {qd.round(3).tolist()} exceeds joint speed limit")
                return
            acc = self._d(6)
            self.mode, self._vel_target = "speed", qd
            self._acc = min(acc, lim.a_max) if acc > 0 else lim.a_max
        # Other realtime commands (speedL, forceMode, getters) are not emulated: they only
        # signal ready, which keeps the client's handshake going.

    def _servo(self, target):
        lim = self.limits
        reach = lim.v_max * self.servo_horizon_s
        if not np.all(np.isfinite(target)):
            self._protective_stop(f"servo target {target.tolist()} not finite")
        elif np.any(target < lim.q_min) or np.any(target > lim.q_max):
            self._protective_stop(f"servo target {target.round(4).tolist()} outside joint range")
        elif np.any(np.abs(target - self.q) > reach):
            dev = float(np.max(np.abs(target - self.q)))
            self._protective_stop(f"servo target {dev:.4f} rad from actual q (> {reach:.4f})")
        else:
            self.mode, self._target = "servo", target

    def _command(self, cmd):
        """Non-realtime commands; each ends with SIGNAL_DONE (now or when its motion ends)."""
        off, lim = self.reg_off, self.limits
        async_flag = self.in_int[off + 1]
        if cmd in (1, 2):                               # moveJ, moveJ_IK
            target = np.array(self._d(0, 6))
            if cmd == 2:
                target = inverse_kinematics(target, self.q) if np.all(np.isfinite(target)) else None
                if target is None:
                    self._end_program("moveJ_IK: no inverse kinematics solution")
                    return
            self._start_move(target, self._d(6), self._d(7))
            self._finish(blocking=not async_flag)
        elif cmd in (15, 16, 33, 34):                   # speedStop, servoStop, stopL, stopJ
            acc = self._d(0)
            self.mode = "stop" if self.mode != "idle" else "idle"
            self._acc = min(acc, lim.a_max) if acc > 0 else lim.a_max
            self._finish(blocking=not (cmd in (33, 34) and async_flag))
        elif cmd == 35:                                 # setWatchdog on input_int_register_<off>
            self._wd_freq, self._wd_last = self._d(0), time.monotonic()
            self._finish()
        elif cmd == 31:                                 # triggerProtectiveStop
            self._protective_stop("requested by client")
        elif cmd == 255:                                # stopScript: the program ends
            self._end_program("stopScript")
        else:
            # Not emulated (moveL, forceMode stop, IO, ...): still signal done, otherwise
            # the client would block for its 300 s execution timeout.
            self._finish()

    def _finish(self, blocking=False):
        if blocking and self.mode != "idle":
            self._blocking = True       # SIGNAL_DONE once the motion has ended
        else:
            self.out_int[self.reg_off] = SIGNAL_DONE

    def _start_move(self, target, speed, acc):
        lim = self.limits
        if not np.all((target >= lim.q_min) & (target <= lim.q_max)):    # (also catches NaN)
            self._protective_stop("moveJ target outside joint range")
            return
        delta = np.abs(target - self.q)
        if np.max(delta) < 1e-12:
            return
        # Synchronised joint move: every joint's limits scaled so they all arrive together.
        scale = delta / np.max(delta)
        speed = min(speed, lim.v_max) if speed > 0 else lim.v_max
        acc = min(acc, lim.a_max) if acc > 0 else lim.a_max
        self._move_v, self._move_a = speed * scale + 1e-12, acc * scale + 1e-12
        self.mode, self._target = "move", target

    def _event(self, text):
        self._events.append({"t": self.now(), "event": text})

    # ----------------------------------------------------------------- RTDE 30004
    def _rtde_client(self, sock, addr):
        sock.setblocking(False)     # see _Connection.send
        with self._lock:
            self._conn_count += 1
            conn = _Connection(sock, addr, self._conn_count, on_drop=self._event)
            self._rtde_conns.add(conn)
        buf = bytearray()
        try:
            for chunk in self._chunks(sock):
                buf += chunk
                while len(buf) >= P.HEADER.size:
                    size, mtype = P.HEADER.unpack_from(buf)
                    if size < P.HEADER.size:
                        return              # corrupt stream: drop the client like a controller would
                    if len(buf) < size:
                        break
                    payload = bytes(buf[P.HEADER.size:size])
                    del buf[:size]
                    self._rtde_message(conn, mtype, payload)
        finally:
            with self._lock:
                self._rtde_conns.discard(conn)
                for name in [n for n, c in self._input_owner.items() if c is conn]:
                    del self._input_owner[name]

    def _rtde_message(self, conn, mtype, payload):
        if mtype == P.DATA_PACKAGE:
            self._data_package(conn, payload)
            return
        if mtype not in _SETUP_TYPES:
            return                  # text messages from a client, unknown types: ignored, not answered
        entry = {"conn": conn.number, "type": chr(mtype)}
        with self._lock:
            self._setup_log.append(entry)
        # Malformed requests get the failure reply (accepted 0, recipe id 0), never an exception.
        if mtype == P.REQUEST_PROTOCOL_VERSION:
            ok = len(payload) >= 2 and struct.unpack_from(">H", payload)[0] == 2   # only v2 framing
            conn.send(P.frame(mtype, struct.pack(">B", ok)))
        elif mtype == P.GET_URCONTROL_VERSION:
            conn.send(P.frame(mtype, struct.pack(">IIII", *self.version)))
        elif mtype == P.SETUP_OUTPUTS:
            if len(payload) < 8:                        # not even the frequency
                entry.update(names=[], n_names=0, frequency=None, recipe_id=0)
                conn.send(P.setup_reply(mtype, 0, []))
                return
            (freq,) = struct.unpack_from(">d", payload)
            names = P.parse_names(payload[8:])
            types = P.fit_package([P.OUTPUT_TYPES[n] if P.output_available(n, self.version)
                                   else "NOT_FOUND" for n in names])
            ok = bool(names) and "NOT_FOUND" not in types and freq > 0     # (NaN fails too)
            if ok:
                conn.output = P.Recipe(1, names, types)
                # Stream at the requested rate, capped by the controller's limit.
                conn.frequency, conn.phase = min(freq, self.rate), float(self.rate)
            entry.update(names=_loggable(names), n_names=len(names), frequency=freq,
                         recipe_id=1 if ok else 0)
            conn.send(P.setup_reply(mtype, 1 if ok else 0, types))
        elif mtype == P.SETUP_INPUTS:
            names = P.parse_names(payload)
            with self._lock:
                types = []
                for n in names:
                    owner = self._input_owner.get(n)
                    types.append("NOT_FOUND" if n not in P.INPUT_TYPES
                                 else "IN_USE" if owner is not None and owner is not conn
                                 else P.INPUT_TYPES[n])
                types = P.fit_package(types)
                # Recipe ids are one byte: a connection can configure at most 255 input recipes.
                ok = names and not {"NOT_FOUND", "IN_USE"} & set(types) and len(conn.inputs) < 255
                rid = 0
                if ok:
                    rid = len(conn.inputs) + 1
                    conn.inputs.append(P.Recipe(rid, names, types))
                    for n in names:
                        self._input_owner[n] = conn
                entry.update(names=_loggable(names), n_names=len(names), recipe_id=rid)
            conn.send(P.setup_reply(mtype, rid, types))
        elif mtype == P.START:
            conn.send(P.frame(mtype, b"\x01"))   # reply before the first data package
            conn.started = True
        elif mtype == P.PAUSE:
            conn.started = False
            conn.send(P.frame(mtype, b"\x01"))

    def _data_package(self, conn, payload):
        if not payload:
            return
        rid = payload[0]
        if not 1 <= rid <= len(conn.inputs):
            return
        recipe = conn.inputs[rid - 1]
        if len(payload) != recipe.struct.size:
            self._event(f"ignored data package for recipe {rid}: {len(payload)} bytes, "
                        f"expected {recipe.struct.size}")
            return
        values = recipe.unpack(payload)
        with self._lock:
            for name, value in values.items():
                if name.startswith("input_int_register_"):
                    self.in_int[int(name[19:])] = value
                elif name.startswith("input_double_register_"):
                    self.in_double[int(name[22:])] = value
                else:
                    self.inputs[name] = value
            cmd_reg = f"input_int_register_{self.reg_off}"
            if cmd_reg in values:
                self._wd_last = time.monotonic()    # the watchdog watches this register
                cmd = values[cmd_reg]
                if cmd != 0:
                    ints = [v for n, v in values.items()
                            if n.startswith("input_int_register_") and n != cmd_reg]
                    doubles = [v for n, v in values.items() if n.startswith("input_double_register_")]
                    self._log.append((self.now(), cmd, len(ints),
                                      struct.pack(f">{len(ints)}i{len(doubles)}d", *ints, *doubles)))
                    self._log_total += 1

    # ------------------------------------------------------------- dashboard 29999
    def _dashboard_client(self, sock, addr):
        sock.sendall(b"Connected: Universal Robots Dashboard Server\n")
        buf = b""
        for chunk in self._chunks(sock):
            *lines, buf = (buf + chunk).split(b"\n")      # one pass per chunk, however many lines
            replies, quit_, too_long = [], False, len(buf) > MAX_DASHBOARD_LINE
            for line in lines:
                if len(line) > MAX_DASHBOARD_LINE:
                    too_long = True
                    break
                text = line.decode(errors="replace").strip()
                with self._lock:
                    replies.append(self._dashboard(text).encode() + b"\n")
                if text == "quit":
                    quit_ = True
                    break
            if too_long and not quit_:
                # No dashboard command is this long: say so and hang up rather than buffer it.
                self._event(f"dashboard {addr[0]}:{addr[1]}: line over {MAX_DASHBOARD_LINE} bytes, closed")
                replies.append(f"could not understand: line too long (over {MAX_DASHBOARD_LINE} "
                               "bytes)\n".encode())
            if replies:
                sock.sendall(b"".join(replies))     # (times out after 0.5 s if the client never reads)
            if quit_ or too_long:
                return

    def _dashboard(self, cmd):
        """Reply text for one dashboard command (wording as on PolyScope)."""
        v = ".".join(map(str, self.version))
        low = cmd.lower()
        state = RUNTIME_NAMES[self.runtime_state]
        prog = self.program_name or "<unnamed>"
        if low == "polyscopeversion":
            return f"URSoftware {v} (emulated)"
        if low == "get serial number":
            return self.serial_number
        if low == "is in remote control":
            return "true"
        if low == "get robot model":
            return "UR5"
        if low == "stop":
            if self.runtime_state == STOPPED:
                return "Failed to execute: stop"
            self._end_program("stopped from dashboard")
            return "Stopped"
        if low == "play":
            if self.program_name is None or not self._can_run():
                return "Failed to execute: play"
            if self.runtime_state == STOPPED:
                self._start_program(self.program_name, self.reg_off)
            self.runtime_state = PLAYING
            return "Starting program"
        if low == "pause":
            if self.runtime_state != PLAYING:
                return "Failed to execute: pause"
            self.runtime_state = PAUSED
            return "Pausing program"
        if low == "running":
            return f"Program running: {'true' if self.runtime_state == PLAYING else 'false'}"
        if low == "programstate":
            return f"{state} {prog}"
        if low == "get loaded program":
            return f"Loaded program: {prog}" if self.program_name else "No program loaded"
        if low.startswith("load "):
            return f"Loading program: {cmd[5:]}"
        if low == "isprogramsaved":
            return f"true {prog}"
        if low == "robotmode":
            return f"Robotmode: {ROBOT_MODE_NAMES[self.robot_mode]}"
        if low == "safetymode":
            return f"Safetymode: {SAFETY_MODE_NAMES[self.safety_mode]}"
        if low == "safetystatus":
            return f"Safetystatus: {SAFETY_MODE_NAMES[self.safety_mode]}"
        if low == "unlock protective stop":
            if self.safety_mode != PROTECTIVE_STOP:
                return "Cannot unlock protective stop: robot is not protective stopped"
            self.safety_mode = NORMAL
            self._event("protective stop unlocked from dashboard")
            return "Protective stop releasing"
        if low == "restart safety":
            self.safety_mode, self.robot_mode = NORMAL, POWER_OFF
            self._end_program("safety restarted")
            return "Restarting safety"
        if low == "power on":
            if self.robot_mode == POWER_OFF and self.safety_mode == NORMAL:
                self.robot_mode = IDLE
            return "Powering on"
        if low == "power off":
            self.robot_mode = POWER_OFF
            self._halt()
            self._end_program("powered off")
            return "Powering off"
        if low == "brake release":
            if self.robot_mode == IDLE:
                self.robot_mode = RUNNING
            return "Brake releasing"
        if low == "close popup":
            return "closing popup"
        if low == "close safety popup":
            return "closing safety popup"
        if low.startswith("popup "):
            return "showing popup"
        if low.startswith("addtolog "):
            return "Added log message"
        if low.startswith("setuserrole "):
            return f"Setting user role: {cmd[12:]}"
        if low == "shutdown":
            return "Shutting down"
        if low == "quit":
            return "Disconnected"
        return f"could not understand: '{cmd}'"

    def _can_run(self):
        return self.robot_mode == RUNNING and self.safety_mode == NORMAL

    # --------------------------------------------------------------- script 30003
    def _script_client(self, sock, addr):
        """Collect programs ("def name(): ... end") and start ur_rtde's control script.

        ur_rtde never reads this socket, so nothing is sent back (a real controller
        would stream its realtime state here).
        """
        buf = bytearray()
        scan = 0        # the search for "end" resumes at the start of the last unfinished line
        ignored = 0     # programs that are not ur_rtde's: the first 3 are logged, then counted
        try:
            for chunk in self._chunks(sock):
                buf += chunk
                done = 0
                for m in _PROGRAM_END_RE.finditer(buf, scan):
                    ignored += not self._run_script(bytes(buf[done:m.end()]), log_ignored=ignored < 3)
                    done = m.end()
                if done:
                    del buf[:done]
                    scan = 0
                # Only the new bytes are searched for a newline: linear in the input, not quadratic.
                newline = buf.rfind(b"\n", max(0, len(buf) - len(chunk)))
                if newline >= 0:
                    scan = newline + 1
                if len(buf) > MAX_PROGRAM:
                    self._event(f"script {addr[0]}:{addr[1]}: over 1 MiB without a program end, closed")
                    return
        finally:
            if ignored > 3:
                self._event(f"script {addr[0]}:{addr[1]}: ignored {ignored - 3} more scripts")

    def _run_script(self, program, log_ignored=True):
        """Start ur_rtde's control script (or log why not); False if it is some other script."""
        head = re.match(rb"\s*(?:def|sec)\s+(\w+)\s*\(", program)
        name = head.group(1).decode() if head else None
        with self._lock:
            if name != "rtde_control":
                if log_ignored:
                    self._event(f"ignored script {name or program[:40]!r} ({len(program)} bytes)")
                return False
            if not self._can_run():
                self._event("control script refused: robot not running or not in normal safety mode")
                return True
            m = _OFFSET_RE.search(program)
            offset = m.group(1).decode() if m else "0"
            if not (offset.isdigit() and len(offset) <= 2 and int(offset) <= MAX_REG_OFFSET):
                self._event(f"control script refused: register offset {offset[:12]} outside "
                            f"0..{MAX_REG_OFFSET} (48 registers, 24 used)")
                return True
            self._start_program(name, int(offset))
        return True


def _loggable(names):
    """What the setup log keeps of a request's names: enough for the handshake guard, bounded."""
    return [n[:64] for n in names[:SETUP_LOG_NAMES]]


def _describe_error(e):
    """'ValueError: ... (emulator.py:123)', short enough for the event log."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" ({tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno})" if tb else ""
    return f"{type(e).__name__}: {str(e)[:200]}{where}"
