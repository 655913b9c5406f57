"""The emulator's bounded logs and error counters: what tests read back through the side channel.

  command log  every non-zero command a client wrote to the command register, with its registers
  event log    what happened, in words (program start/end, stops, faults, refused input, errors)
  setup log    the RTDE setup requests as received (the handshake guard's evidence)

All three are rings: memory stays flat in a long run. The command log keeps the newest
`capacity` commands and counts the ones it dropped. Unexpected errors are counted here
(tick_errors: the timing thread, handler_errors: a connection) and written to the event log.
"""
import struct
from collections import deque

# Capacities. The command log holds 40 s of servoJ at 500 Hz (160 s at 125 Hz; tests read a few
# thousand entries at most) in about 5 MB; older entries are dropped and counted (log_dropped).
COMMAND_LOG_SIZE = 20_000
EVENT_LOG_SIZE = 10_000
SETUP_LOG_SIZE = 4096
SETUP_LOG_NAMES = 64                # names kept per setup-log entry (each cut to 64 characters)

# ur_rtde command ids (RTDE::RobotCommand::Type in 1.6.5), to name command-log entries.
COMMAND_NAMES = {
    0: "clear", 1: "moveJ", 2: "moveJ_IK", 3: "moveL", 4: "moveL_FK", 6: "forceMode",
    7: "forceModeStop", 8: "zeroFtSensor", 9: "speedJ", 10: "speedL", 11: "servoJ", 12: "servoC",
    15: "speedStop", 16: "servoStop", 24: "servoL", 31: "protectiveStop", 33: "stopL", 34: "stopJ",
    35: "setWatchdog", 255: "stopScript"}

_INT_REGISTER, _DOUBLE_REGISTER = "input_int_register_", "input_double_register_"


class Logs:
    """The three rings and the error counters; every method is safe from any thread (`lock` is
    the emulator's lock, `clock` its controller time)."""

    def __init__(self, lock, clock, command_capacity=COMMAND_LOG_SIZE):
        self._lock, self._clock = lock, clock
        self.command_capacity = command_capacity
        # Command entries are (t, id, n_ints, packed registers): one small bytes object and no
        # containers, so the garbage collector stops tracking them (a log of 100k dicts once cost
        # a 300 ms full collection, which stalled the stream for longer than a client tolerates).
        self._commands = deque(maxlen=command_capacity)
        self._commands_total = 0                        # appended since the last clear
        self._events = deque(maxlen=EVENT_LOG_SIZE)
        self._setups = deque(maxlen=SETUP_LOG_SIZE)
        self.tick_errors = self.handler_errors = 0
        self._last_tick_error = None

    # ---------------------------------------------------------------- command log
    def command(self, cmd_reg, values):
        """Log the command in values[cmd_reg] with the package's other int registers and its
        double registers, in package order."""
        ints = [v for n, v in values.items() if n.startswith(_INT_REGISTER) and n != cmd_reg]
        doubles = [v for n, v in values.items() if n.startswith(_DOUBLE_REGISTER)]
        with self._lock:
            self._commands.append((self._clock(), values[cmd_reg], len(ints),
                                   struct.pack(f">{len(ints)}i{len(doubles)}d", *ints, *doubles)))
            self._commands_total += 1

    def commands(self, since=0.0):
        """Dicts with t (controller time), id, name, ints, doubles; the newest `command_capacity`."""
        with self._lock:
            entries = [e for e in self._commands if e[0] >= since]
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

    def clear_commands(self):
        with self._lock:
            self._commands.clear()
            self._commands_total = 0

    def commands_dropped(self):
        return self._commands_total - len(self._commands)

    # ------------------------------------------------------------ event, setup log
    def event(self, text):
        self._events.append({"t": self._clock(), "event": text})

    def events(self):
        with self._lock:
            return list(self._events)

    def clear_events(self):
        with self._lock:
            self._events.clear()

    def setup(self, conn, mtype):
        """A new setup-log entry for a request of type mtype on connection `conn` (a number);
        the caller completes the returned dict with what the request asked and was answered."""
        entry = {"conn": conn, "type": chr(mtype)}
        with self._lock:
            self._setups.append(entry)
        return entry

    def setups(self):
        with self._lock:
            return list(self._setups)

    # ------------------------------------------------------------------- errors
    def handler_error(self, where, e):
        """A connection closed by an error nobody foresaw."""
        with self._lock:
            self.handler_errors += 1
        self.event(f"{where} closed after {describe_error(e)}")

    def tick_error(self, e=None):
        """An error in the timing thread; a cycle's error `e` is logged once per distinct error."""
        with self._lock:
            self.tick_errors += 1
            if e is None:
                return
            text = describe_error(e)
            if text != self._last_tick_error:
                self._last_tick_error = text
                self.event(f"controller cycle error (#{self.tick_errors}): {text}")


def loggable(names):
    """What the setup log keeps of a request's names: enough for the handshake guard, bounded."""
    return [n[:64] for n in names[:SETUP_LOG_NAMES]]


def describe_error(e):
    """'ValueError: ... (rtde.py:123)', short enough for the event log."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" ({tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno})" if tb else ""
    return f"{type(e).__name__}: {str(e)[:200]}{where}"
