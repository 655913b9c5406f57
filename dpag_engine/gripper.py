"""A Robotiq 2F-85 / 2F-140 gripper over the Robotiq URCap's socket (port 63352 of the robot).

    gripper = RobotiqGripper("192.168.1.10", model="2f85")   # or the emulator's 127.0.0.1
    gripper.connect()                  # activates it (unless it already is) and holds its position
    gripper.command(0.04)              # non-blocking: the newest request wins
    width, t = gripper.width()         # metres, time.monotonic() of the reading
    gripper.close()

One background thread owns the socket. It sends the newest pending command as one line
(SET POS SPE FOR GTO) and polls GET POS, GET OBJ and GET FLT at poll_hz, stamping each reading.
A socket error, a reply later than timeout_s, a reply it cannot parse or a fault code ends the
thread, and from then on width(), command() and object_detected() raise GripperFault; so does a
reading older than stall_timeout_s. A gripper that disconnects or stalls is a fault: the session
can safe-stop instead of acting on a stale width. Nothing reconnects behind the caller's back.

The URCap's wire format (see dpag_engine/ursim/robotiq.py, which emulates it): a SET is answered
"ack" (three bytes, no newline), a GET "<VAR> <value>" (a newline is expected but not required:
the URCap writes each reply in one piece, so a reply that parses completely and is not followed
by more bytes within REPLY_GRACE_S is taken as complete).
"""
from __future__ import annotations

import abc
import math
import numbers
import re
import socket
import threading
import time
from dataclasses import dataclass

__all__ = ["Gripper", "GripperFault", "GripperModel", "GRIPPER_MODELS", "RobotiqGripper",
           "ROBOTIQ_PORT"]

ROBOTIQ_PORT = 63352
MAX_REPLY = 256             # bytes; no URCap reply is near this long
REPLY_GRACE_S = 0.005       # a reply without its newline: how long to wait for the rest
STA_ACTIVE = 3
OBJ_ON_OBJECT = (1, 2)      # stopped on an object while opening / while closing


class GripperFault(RuntimeError):
    """The gripper cannot be trusted any more; the message names it and says why."""

    def __init__(self, gripper: str, reason: str):
        super().__init__(f"{gripper}: {reason}")
        self.gripper, self.reason = gripper, reason


@dataclass(frozen=True)
class GripperModel:
    name: str
    stroke_m: float              # full opening, metres
    full_stroke_s: float = 0.7   # open -> closed at full speed (SPE 255): Robotiq's 2F-85 data sheet, ~150 mm/s

    @property
    def speed_m_s(self) -> float:
        return self.stroke_m / self.full_stroke_s


GRIPPER_MODELS = {"2f85": GripperModel("2f85", 0.085), "2f140": GripperModel("2f140", 0.140)}


class Gripper(abc.ABC):
    """What a session uses: connect, command an opening, read it back, close."""

    @abc.abstractmethod
    def connect(self, timeout_s: float = 2.0) -> None:
        """Connect and activate; GripperFault on failure or after timeout_s."""

    @abc.abstractmethod
    def command(self, width_m: float) -> None:
        """Request an opening (metres); returns at once, the newest request wins."""

    @abc.abstractmethod
    def width(self) -> tuple[float, float]:
        """(measured opening in metres, time.monotonic() of that reading)."""

    @abc.abstractmethod
    def object_detected(self) -> bool:
        """Whether the fingers stopped on an object."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop talking to the gripper (it stays where it is); idempotent."""

    @property
    @abc.abstractmethod
    def stats(self) -> dict:
        """Counters and the latest reading, for logs."""


class _LinkError(Exception):
    """The link to the gripper broke (the poll thread's reason to stop)."""


class RobotiqGripper(Gripper):
    """A 2F-85 / 2F-140 behind the Robotiq URCap on a UR controller (`host`: the robot's IP).

    speed, force: fractions of the gripper's range (0, 1], sent as SPE / FOR 1..255 with every
    command. poll_hz: readings per second. stall_timeout_s: the oldest reading width() returns.
    timeout_s: the longest wait for one reply (and for the TCP connect).
    """

    def __init__(self, host: str, port: int = ROBOTIQ_PORT, model: str = "2f85",
                 speed: float = 1.0, force: float = 0.5, poll_hz: float = 30.0,
                 stall_timeout_s: float = 0.5, timeout_s: float = 1.0):
        if not isinstance(host, str) or not host:
            raise ValueError(f"host: {host!r} is not a host name or address")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port: {port!r} is not a TCP port (1..65535)")
        if model not in GRIPPER_MODELS:
            raise ValueError(f"model: {model!r} is not one of {sorted(GRIPPER_MODELS)}")
        for name, value in (("speed", speed), ("force", force)):
            if not _real(value) or not 0.0 < value <= 1.0:
                raise ValueError(f"{name}: {value!r} is not a fraction in (0, 1]")
        if not _real(poll_hz) or not 0.0 < poll_hz <= 200.0:
            raise ValueError(f"poll_hz: {poll_hz!r} is not in (0, 200]")
        if not _real(stall_timeout_s) or stall_timeout_s <= 1.0 / poll_hz:
            raise ValueError(f"stall_timeout_s: {stall_timeout_s!r} must exceed one poll period "
                             f"({1.0 / poll_hz:.3f} s at poll_hz {poll_hz})")
        if not _real(timeout_s) or timeout_s <= 0.0:
            raise ValueError(f"timeout_s: {timeout_s!r} is not a positive number of seconds")
        self.host, self.port, self.model = host, port, GRIPPER_MODELS[model]
        self.spe, self.force_reg = max(1, round(speed * 255)), max(1, round(force * 255))
        self.poll_hz, self.stall_timeout_s, self.timeout_s = poll_hz, stall_timeout_s, timeout_s
        self.name = f"Robotiq {model} at {host}:{port}"

        self._lock = threading.Lock()
        self._wake = threading.Event()          # a new command: send it now
        self._closing = threading.Event()
        self._sock = None
        self._rx = b""
        self._thread = None
        self._pending = None                    # newest POS request not yet sent
        self._sent = None
        self._reading = None                    # (pos, obj, t)
        self._fault = ""
        self._counts = {"commands": 0, "sets": 0, "polls": 0}

    # ------------------------------------------------------------- session API
    def connect(self, timeout_s: float = 2.0) -> None:
        """Connect, then activate (reset, ACT 1, wait for STA 3), then GTO 1 at the current
        position, so connecting never moves the fingers. An already active, unfaulted gripper is
        not reset (a reset would drop what it holds), as the URCap's own rq_activate does."""
        if not _real(timeout_s) or timeout_s <= 0.0:
            raise ValueError(f"timeout_s: {timeout_s!r} is not a positive number of seconds")
        with self._lock:
            if self._closing.is_set():
                raise GripperFault(self.name, "closed")
            if self._fault:
                raise GripperFault(self.name, self._fault)
            if self._thread is not None:
                return
        deadline = time.monotonic() + timeout_s
        try:
            sock = socket.create_connection((self.host, self.port),
                                            timeout=min(self.timeout_s, timeout_s))
        except OSError as e:
            raise GripperFault(self.name, f"cannot connect: {e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._rx = sock, b""
        try:
            self._activate(deadline)
            pos, obj, t, flt = self._poll_once()
            if flt:
                raise _LinkError(_fault_text(flt))
        except (OSError, _LinkError) as e:
            self._drop_socket()
            raise GripperFault(self.name, _describe(e)) from None
        with self._lock:
            self._reading = (pos, obj, t)
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"robotiq-{self.host}:{self.port}")
        self._thread.start()

    def command(self, width_m: float) -> None:
        """Open to width_m (clipped into [0, stroke]: the gripper's own range)."""
        if not _real(width_m) or not math.isfinite(width_m):
            raise ValueError(f"width_m: {width_m!r} is not a finite number of metres")
        stroke = self.model.stroke_m
        pos = round(255.0 * (1.0 - min(max(float(width_m), 0.0), stroke) / stroke))
        with self._lock:
            self._check()
            self._pending = pos
            self._counts["commands"] += 1
        self._wake.set()

    def width(self) -> tuple[float, float]:
        with self._lock:
            pos, _, t = self._check()
        return self.pos_to_width(pos), t

    def object_detected(self) -> bool:
        with self._lock:
            return self._check()[1] in OBJ_ON_OBJECT

    def close(self) -> None:
        self._closing.set()
        self._wake.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            sock = self._sock
            if sock is not None:            # wake a recv() that waits on the gripper
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            thread.join(timeout=self.timeout_s + 1.0)
        self._drop_socket()

    @property
    def stats(self) -> dict:
        with self._lock:
            pos, obj, t = self._reading or (None, None, None)
            return dict(self._counts, fault=self._fault, position=pos, obj=obj,
                        age_s=None if t is None else time.monotonic() - t,
                        connected=self._thread is not None and not self._fault
                        and not self._closing.is_set())

    def pos_to_width(self, pos: float) -> float:
        # The URCap's own convention: 0 = open (the full stroke), 255 = closed, linear in
        # between. Real fingers are not exactly linear, and most 2F units do not reach 0 or 255
        # exactly; the width is what the gripper reports, not a calibrated measurement.
        return self.model.stroke_m * (1.0 - pos / 255.0)

    # --------------------------------------------------------------- internals
    def _check(self):
        """The latest reading (call with the lock held); GripperFault if it cannot be trusted."""
        if self._fault:
            raise GripperFault(self.name, self._fault)
        if self._closing.is_set():
            raise GripperFault(self.name, "closed")
        if self._reading is None:
            raise GripperFault(self.name, "not connected")
        age = time.monotonic() - self._reading[2]
        if age > self.stall_timeout_s:
            raise GripperFault(self.name, f"stalled: the newest reading is {age:.2f} s old "
                                          f"(stall_timeout_s {self.stall_timeout_s})")
        return self._reading

    def _activate(self, deadline):
        if self._get("STA") != STA_ACTIVE or self._get("FLT"):
            self._set("ACT 0 ATR 0")
            self._wait_for(lambda: self._get("ACT") == 0 and self._get("STA") == 0, deadline,
                           "reset")
            self._set("ACT 1")
            self._wait_for(lambda: self._get("STA") == STA_ACTIVE, deadline, "activation")
        pos = self._get("POS")                  # hold where the fingers are
        self._set(f"POS {pos} SPE {self.spe} FOR {self.force_reg} GTO 1")
        self._sent = pos

    def _wait_for(self, done, deadline, what):
        while not done():
            if time.monotonic() > deadline:
                raise _LinkError(f"{what} timed out (STA {self._get('STA')})")
            time.sleep(0.02)

    def _run(self):
        period = 1.0 / self.poll_hz
        next_poll = time.monotonic() + period
        try:
            while not self._closing.is_set():
                self._wake.wait(max(0.0, next_poll - time.monotonic()))
                self._wake.clear()
                if self._closing.is_set():
                    break
                with self._lock:
                    pos, self._pending = self._pending, None
                if pos is not None and pos != self._sent:
                    self._set(f"POS {pos} SPE {self.spe} FOR {self.force_reg} GTO 1")
                    self._sent = pos
                    with self._lock:
                        self._counts["sets"] += 1
                now = time.monotonic()
                if now < next_poll:
                    continue
                next_poll = max(next_poll + period, now)    # late: no burst of polls
                pos, obj, t, flt = self._poll_once()
                with self._lock:
                    self._reading = (pos, obj, t)
                    self._counts["polls"] += 1
                if flt:
                    raise _LinkError(_fault_text(flt))
        except (OSError, _LinkError) as e:
            if not self._closing.is_set():
                with self._lock:
                    self._fault = _describe(e)
        finally:
            self._drop_socket()

    def _poll_once(self):
        pos = self._get("POS")
        t = time.monotonic()
        return pos, self._get("OBJ"), t, self._get("FLT")

    def _set(self, assignments):
        reply = self._request(f"SET {assignments}")
        if reply != "ack":
            raise _LinkError(f"bad reply to 'SET {assignments}': {reply[:64]!r}")

    def _get(self, var):
        reply = self._request(f"GET {var}")
        m = _GET_REPLY.fullmatch(reply)
        if m is None or m.group(1) != var:
            raise _LinkError(f"bad reply to 'GET {var}': {reply[:64]!r}")
        return int(m.group(2))

    def _request(self, text):
        """Send one request line, return its reply (stripped). Raises OSError / _LinkError."""
        sock = self._sock
        if sock is None:
            raise _LinkError("closed")
        sock.settimeout(self.timeout_s)
        sock.sendall(text.encode("ascii") + b"\n")   # (one request at a time: no pipelining)
        deadline = time.monotonic() + self.timeout_s
        while True:
            self._rx = self._rx.lstrip()            # e.g. a newline sent after an "ack"
            nl = self._rx.find(b"\n")
            if nl >= 0:
                reply, self._rx = self._rx[:nl], self._rx[nl + 1:]
                return reply.decode("ascii", errors="replace").strip()
            if self._rx == b"ack" or (_GET_REPLY.fullmatch(self._rx.decode("ascii", "replace"))
                                      and not self._more_within(sock, REPLY_GRACE_S)):
                reply, self._rx = self._rx, b""
                return reply.decode("ascii")
            if len(self._rx) > MAX_REPLY:
                raise _LinkError(f"reply to {text!r} over {MAX_REPLY} bytes")
            left = deadline - time.monotonic()
            if left <= 0:
                raise _LinkError(f"no reply to {text!r} within {self.timeout_s} s")
            self._recv(sock, left, text)

    def _more_within(self, sock, seconds):
        """Whether more bytes arrive within `seconds` (they are appended to the buffer)."""
        try:
            self._recv(sock, seconds, None)
        except _LinkError:
            return False
        return True

    def _recv(self, sock, seconds, text):
        sock.settimeout(seconds)
        try:
            chunk = sock.recv(4096)
        except socket.timeout:
            if text is None:
                raise _LinkError("no more bytes") from None
            raise _LinkError(f"no reply to {text!r} within {self.timeout_s} s") from None
        if not chunk:
            raise _LinkError("connection closed by the gripper")
        self._rx += chunk

    def _drop_socket(self):
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


_GET_REPLY = re.compile(r"([A-Z]{3}) ([0-9]+)")


def _real(x):
    """A real number that is not NaN (numpy scalars included, bool not)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and not math.isnan(x)


def _fault_text(code):
    return f"gripper fault code 0x{code:02X} (FLT {code})"


def _describe(e):
    return str(e) if isinstance(e, _LinkError) else f"link lost: {e}"
