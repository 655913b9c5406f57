"""The dashboard server on port 29999: the line commands ur_rtde's DashboardClient and
RTDEControlInterface send, answered in PolyScope's wording.

One command per line, one reply line each. A line over MAX_DASHBOARD_LINE bytes (no command is
that long) gets a "could not understand" reply and the connection is closed, so a client cannot
make the emulator buffer without end. State changes (play, pause, power, unlock ...) go to
the Controller; unknown commands get "could not understand".
"""
from .controller import PLAYING, ROBOT_MODE_NAMES, RUNTIME_NAMES, SAFETY_MODE_NAMES, Controller

MAX_DASHBOARD_LINE = 4096           # a dashboard command is one short line

# Replies that do not depend on the controller's state: by the command (lower case) ...
_FIXED = {"is in remote control": "true", "get robot model": "UR5", "close popup": "closing popup",
          "close safety popup": "closing safety popup", "shutdown": "Shutting down",
          "quit": "Disconnected"}
# ... and by its first word ({} is the rest of the line as sent).
_PREFIXED = (("load ", "Loading program: {}"), ("popup ", "showing popup"),
             ("addtolog ", "Added log message"), ("setuserrole ", "Setting user role: {}"))

# Commands that change the controller's state: what does it, the reply, and the reply when the
# Controller refuses (returns False: no program to stop, play or pause, no protective stop).
_ACTIONS = {
    "stop": (lambda ctl: ctl.stop_program("stopped from dashboard"), "Stopped",
             "Failed to execute: stop"),
    "play": (Controller.play, "Starting program", "Failed to execute: play"),
    "pause": (Controller.pause, "Pausing program", "Failed to execute: pause"),
    "unlock protective stop": (Controller.unlock_protective_stop, "Protective stop releasing",
                               "Cannot unlock protective stop: robot is not protective stopped"),
    "restart safety": (Controller.restart_safety, "Restarting safety", None),
    "power on": (Controller.power_on, "Powering on", None),
    "power off": (Controller.power_off, "Powering off", None),
    "brake release": (Controller.brake_release, "Brake releasing", None),
}


class DashboardServer:
    """The dashboard of one Controller (`chunks` is Servers.chunks)."""

    def __init__(self, controller, version, serial_number, lock, logs, chunks):
        self.ctl, self.version, self.serial_number = controller, version, serial_number
        self._lock, self._logs, self._chunks = lock, logs, chunks

    def client(self, sock, addr):
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
                    replies.append(self.reply(text).encode() + b"\n")
                if text == "quit":
                    quit_ = True
                    break
            if too_long and not quit_:
                # No dashboard command is this long: say so and hang up rather than buffer it.
                self._logs.event(f"dashboard {addr[0]}:{addr[1]}: line over {MAX_DASHBOARD_LINE} "
                                 "bytes, closed")
                replies.append(f"could not understand: line too long (over {MAX_DASHBOARD_LINE} "
                               "bytes)\n".encode())
            if replies:
                sock.sendall(b"".join(replies))     # (times out after 0.5 s if the client never reads)
            if quit_ or too_long:
                return

    def reply(self, cmd):
        """Reply text for one dashboard command (call with the lock held)."""
        low = cmd.lower()
        if low in _FIXED:
            return _FIXED[low]
        for prefix, text in _PREFIXED:
            if low.startswith(prefix):
                return text.format(cmd[len(prefix):])
        ctl = self.ctl
        prog = ctl.program_name or "<unnamed>"
        if low == "polyscopeversion":
            return f"URSoftware {'.'.join(map(str, self.version))} (emulated)"
        if low == "get serial number":
            return self.serial_number
        if low == "running":
            return f"Program running: {'true' if ctl.runtime_state == PLAYING else 'false'}"
        if low == "programstate":
            return f"{RUNTIME_NAMES[ctl.runtime_state]} {prog}"
        if low == "get loaded program":
            return f"Loaded program: {prog}" if ctl.program_name else "No program loaded"
        if low == "isprogramsaved":
            return f"true {prog}"
        if low == "robotmode":
            return f"Robotmode: {ROBOT_MODE_NAMES[ctl.robot_mode]}"
        if low in ("safetymode", "safetystatus"):
            return f"{low.capitalize()}: {SAFETY_MODE_NAMES[ctl.safety_mode]}"
        if low in _ACTIONS:
            action, done, refused = _ACTIONS[low]
            return refused if action(ctl) is False else done
        return f"could not understand: '{cmd}'"
