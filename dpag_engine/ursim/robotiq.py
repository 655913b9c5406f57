"""An emulated Robotiq 2F-85 / 2F-140 behind the Robotiq URCap's socket (port 63352).

GripperSim is the gripper: its registers and a motion model, stepped with a dt. RobotiqServer
serves it over TCP the way the URCap does on a UR controller, and steps it from its own thread, so
it needs nothing from the rest of the emulator.

The protocol (ASCII, one reply per request line; as the public clients use it, e.g. the
robotiq_gripper.py shipped with ur_rtde's examples):
  SET <VAR> <int> [<VAR> <int> ...]\\n   -> ack          (all pairs applied together, or none)
  GET <VAR>\\n                          -> <VAR> <int>\\n
  ACT activate (0/1)  GTO go to (0/1)  ATR auto-release (0/1)  ADR auto-release direction
  (1 opening, 0 closing)  POS request on SET, actual position on GET (0 open .. 255 closed)
  SPE speed and FOR force (0..255)  STA 0 reset / 1 activating / 3 active  OBJ 0 moving /
  1 stopped on an object while opening / 2 stopped on an object while closing / 3 at the requested
  position  FLT fault code (0 = none)  PRE the position request echoed  COU motor current (0 here)
The URCap answers a SET with the three bytes "ack" and no newline: the public clients compare a
reply to b"ack" exactly, and Robotiq's own URScript reads three bytes. What it answers to an
unknown variable or a malformed line is not documented publicly; this emulator answers
"ERR <why>\\n" (which no client can mistake for "ack" or "<VAR> <value>"), applies nothing, and
keeps the connection.

Not modelled: the calibration stroke the real gripper makes while activating, the fingers'
compliance, force-dependent stopping (any object stops the fingers), gripping currents, and the
priority faults the real gripper raises for a GTO before activation (FLT stays 0 unless a test
injects a fault).
"""
import math
import socket
import threading
import time

from ..gripper import GRIPPER_MODELS, ROBOTIQ_PORT
from .listener import Listener

__all__ = ["GripperSim", "RobotiqServer", "ROBOTIQ_PORT"]

MIN_SPEED_FRACTION = 20 / 150   # SPE 0 still moves: the 2F-85 spans 20..150 mm/s
ACTIVATION_S = 0.2              # STA 1 -> 3
STEP_HZ = 100.0                 # RobotiqServer's model thread
MAX_LINE = 4096                 # a request line longer than this drops its client
MAX_CLIENTS = 16                # open connections; more are closed at once
REPLY_TIMEOUT_S = 0.5           # a client that does not read its replies for this long is dropped

_WRITABLE = {"ACT": 1, "GTO": 1, "ATR": 1, "ADR": 1, "POS": 255, "SPE": 255, "FOR": 255}   # max
_READ_ONLY = ("STA", "OBJ", "FLT", "PRE", "COU")


class GripperSim:
    """The gripper's registers and fingers; every method is thread-safe.

    object_width_m: an object between the fingers of that width (None: nothing). Closing stops
    where the fingers touch it (OBJ 2); opening is never blocked.
    """

    def __init__(self, model="2f85", object_width_m=None):
        if model not in GRIPPER_MODELS:
            raise ValueError(f"model: {model!r} is not one of {sorted(GRIPPER_MODELS)}")
        self.model, self.stroke_m = model, GRIPPER_MODELS[model].stroke_m
        self.full_stroke_s = GRIPPER_MODELS[model].full_stroke_s   # 0 -> 255 at SPE 255
        self._lock = threading.Lock()
        self._reg = {"ACT": 0, "GTO": 0, "ATR": 0, "ADR": 0, "POS": 0, "SPE": 0, "FOR": 0,
                     "STA": 0, "OBJ": 0, "FLT": 0, "COU": 0}
        self._pos = 0.0                 # actual position, counts (float; GET POS rounds)
        self._activating_s = 0.0        # time left until STA 3
        self.activations = 0            # ACT 0 -> 1 transitions (tests read it)
        self._object_pos = None
        self.object_width_m = object_width_m

    # ------------------------------------------------------------------ state
    @property
    def object_width_m(self):
        with self._lock:
            return None if self._object_pos is None else self._width(self._object_pos)

    @object_width_m.setter
    def object_width_m(self, width):
        if width is not None and not (math.isfinite(width) and 0.0 <= width <= self.stroke_m):
            raise ValueError(f"object_width_m: {width!r} is not within [0, {self.stroke_m}] m")
        with self._lock:
            self._object_pos = None if width is None else 255.0 * (1.0 - width / self.stroke_m)

    @property
    def width_m(self):
        """The fingers' opening now, metres (what a renderer draws)."""
        with self._lock:
            return self._width(self._pos)

    def register(self, name):
        """A register as GET would answer it (POS: the actual position)."""
        with self._lock:
            return self._get(name)

    def inject_fault(self, code):
        """Raise fault `code` (FLT); the fingers stop until a reset (ACT 0) clears it."""
        with self._lock:
            self._reg["FLT"] = int(code)

    def _width(self, pos):
        # The URCap's convention, linear in the position count (real fingers are not quite).
        return self.stroke_m * (1.0 - pos / 255.0)

    def _get(self, name):
        if name == "POS":
            return int(round(self._pos))
        if name == "PRE":
            return self._reg["POS"]
        return self._reg[name]

    # -------------------------------------------------------------- protocol
    def handle(self, line):
        """The reply to one request line (without its newline): "ack", "<VAR> <value>" or
        "ERR <why>"; an error changes nothing."""
        words = line.split()
        verb = words[0].upper() if words else ""
        if verb == "SET":
            pairs = words[1:]
            if not pairs or len(pairs) % 2:
                return "ERR SET needs <VAR> <value> pairs"
            updates = []
            for name, text in zip(pairs[::2], pairs[1::2]):
                name = name.upper()
                if name in _READ_ONLY:
                    return f"ERR {name} is read-only"
                if name not in _WRITABLE:
                    return f"ERR unknown variable {name[:32]!r}"
                try:
                    value = int(text)
                except ValueError:
                    return f"ERR {name} value {text[:32]!r} is not an integer"
                if not 0 <= value <= _WRITABLE[name]:
                    return f"ERR {name} value {value} is outside 0..{_WRITABLE[name]}"
                updates.append((name, value))
            with self._lock:
                for name, value in updates:
                    self._set(name, value)
            return "ack"
        if verb == "GET":
            if len(words) != 2:
                return "ERR GET takes one variable"
            name = words[1].upper()
            if name not in _WRITABLE and name not in _READ_ONLY:
                return f"ERR unknown variable {name[:32]!r}"
            with self._lock:
                return f"{name} {self._get(name)}"
        return f"ERR unknown request {line.strip()[:32]!r}"

    def _set(self, name, value):
        reg = self._reg
        if name == "ACT" and value != reg["ACT"]:
            if value:                               # activate: STA 1 for ACTIVATION_S, then 3
                reg["STA"], self._activating_s = 1, ACTIVATION_S
                self.activations += 1
            else:                                   # reset: status and faults cleared
                reg["STA"] = reg["OBJ"] = reg["FLT"] = 0
        reg[name] = value

    # ---------------------------------------------------------------- motion
    def step(self, dt):
        """Advance the gripper by dt seconds."""
        with self._lock:
            reg = self._reg
            if not reg["ACT"]:
                return
            if reg["STA"] != 3:
                self._activating_s -= dt
                if self._activating_s <= 0.0:
                    reg["STA"] = 3
                return
            if reg["FLT"]:
                reg["OBJ"] = 0
                return
            if reg["ATR"]:      # auto-release: slowly to the ADR end, whatever GTO says
                target, fraction = (0.0 if reg["ADR"] else 255.0), MIN_SPEED_FRACTION
            elif reg["GTO"]:
                target, fraction = float(reg["POS"]), max(reg["SPE"] / 255.0, MIN_SPEED_FRACTION)
            else:
                reg["OBJ"] = 0  # the manual: ignore OBJ while GTO is 0
                return
            move = 255.0 / self.full_stroke_s * fraction * dt
            pos, blocked = self._pos, False
            if target > pos:                        # closing: an object may stop the fingers
                new = min(target, pos + move)
                obj = self._object_pos
                if obj is not None and pos <= obj < target and new >= obj:
                    new, blocked = obj, True
            else:
                new = max(target, pos - move)
            self._pos = new
            reg["OBJ"] = 2 if blocked else 3 if new == target else 0


class RobotiqServer(Listener):
    """The URCap's socket for one GripperSim: multi-client, bounded input, own model thread.

    port=0 binds a free port (read .port after start()). drop_connections() and freeze() inject
    faults for tests: every connection closed / no replies for a while (connections stay open).
    The lifecycle (start, stop, port, drop_connections) and the accept loop are Listener's.
    """

    thread_prefix = "robotiq-sim-"
    max_clients = MAX_CLIENTS
    client_timeout_s = REPLY_TIMEOUT_S      # bounds both a blocked send and the wait for input

    def __init__(self, gripper, host="127.0.0.1", port=ROBOTIQ_PORT):
        super().__init__(host, port, counters=("accepted", "refused", "dropped_long_line",
                                               "dropped_not_reading", "requests", "errors"))
        self.gripper = gripper
        self._frozen_until = 0.0

    def freeze(self, seconds):
        """No replies for `seconds` (requests wait, connections stay open); 0 ends a freeze."""
        with self._lock:
            self._frozen_until = time.monotonic() + seconds

    def stats(self):
        with self._lock:
            return dict(self._counts, clients=len(self._clients),
                        frozen=time.monotonic() < self._frozen_until)

    # ---------------------------------------------------------------- threads
    def _loop(self):
        """The model thread: steps the gripper at STEP_HZ with the time that really passed."""
        last = time.monotonic()
        while not self._stopping.wait(1.0 / STEP_HZ):
            now = time.monotonic()
            self.gripper.step(min(now - last, 0.1))     # a stalled machine must not teleport
            last = now

    def _serve(self, sock, addr):
        """Answer request lines until the peer goes, misbehaves or the server stops."""
        buf = b""
        while not self._stopping.is_set():
            try:
                chunk = sock.recv(4096)
            except socket.timeout:
                continue                            # (stop() shuts the socket: recv returns)
            if not chunk:
                return
            *lines, buf = (buf + chunk).split(b"\n")
            if len(buf) > MAX_LINE or any(len(line) > MAX_LINE for line in lines):
                self._count("dropped_long_line")
                return                              # no request is that long: hang up
            requests = [t for t in (x.decode("ascii", errors="replace").strip() for x in lines)
                        if t]                       # a blank line is no request
            if not requests:
                continue
            if not self._wait_unfrozen():           # frozen: requests wait, unanswered
                return
            replies = []
            for text in requests:
                reply = self.gripper.handle(text)
                with self._lock:
                    self._counts["requests"] += 1
                    self._counts["errors"] += reply.startswith("ERR")
                replies.append(reply.encode() if reply == "ack" else reply.encode() + b"\n")
            try:
                sock.sendall(b"".join(replies))
            except socket.timeout:
                self._count("dropped_not_reading")
                return

    def _wait_unfrozen(self):
        """Hold the replies while frozen; False if the server stops meanwhile."""
        while not self._stopping.is_set():
            with self._lock:
                left = self._frozen_until - time.monotonic()
            if left <= 0:
                return True
            self._stopping.wait(min(left, 0.05))
        return False
