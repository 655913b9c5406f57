"""ur_rtde's control script: the programs uploaded on port 30003 and the register protocol the
emulator plays in their place (there is no URScript interpreter).

ScriptServer collects programs ("def name(): ... end") from a script connection and starts
ur_rtde's rtde_control program with the register offset it declares; other programs are logged
and ignored. ur_rtde never reads this socket, so nothing is sent back (a real controller would
stream its realtime state here).

ControlScript is one pass of rtde_control.script's main loop per controller cycle: the command
id in input_int_register_<offset>, its arguments in input_double_register_<offset>..., the
answer (ready 1, done 2) in output_int_register_<offset>.

Teach mode (ur_rtde 1.6.5 teachMode() / endTeachMode(): commands 18 / 19, no arguments, each
answered done like any non-realtime command; the script calls teach_mode() / end_teach_mode()).
In teach mode the motion commands (servoJ, servoL, speedJ, moveJ, the stops) are ignored: the
URScript manual says the robot "will not be able to follow a trajectory (eg. a movej) in this
mode", and ur_rtde does not check for it (its script hands servoJ's target to its servo thread as
always). The client still gets its ready / done answer (servoJ returns True), no protective stop
is raised, the arm stays with the hand. The passes that ignore one are counted (teach_ignored: a
realtime command such as servoJ counts once per cycle it stays in the register), and the first of
each kind per teach session is in the event log.
"""
import re

import numpy as np

from ..kinematics import inverse_kinematics
from .controller import PLAYING, SIGNAL_DONE, SIGNAL_READY

# Commands the control script handles "in real time": processed every cycle, then ready (1).
REALTIME_COMMANDS = {24, 11, 9, 10, 6, 25, 26, 27, 38, 58, 66, 67, 68, 69, 70, 71}
# The script uses 24 registers from its offset (ur_rtde: 0, or 24 for the upper range); any other
# offset would index past the 48 registers, which on a controller is a runtime error.
MAX_REG_OFFSET = 24
MAX_PROGRAM = 1 << 20               # ur_rtde's control script is 38-42 kB
TEACH_MODE, END_TEACH_MODE = 18, 19  # ur_rtde's RobotCommand::Type TEACH_MODE / END_TEACH_MODE
# The commands that move the arm (or stop its motion), which teach mode ignores.
MOTION_COMMANDS = {1: "moveJ", 2: "moveJ_IK", 3: "moveL", 4: "moveL_FK", 9: "speedJ", 10: "speedL",
                   11: "servoJ", 12: "servoC", 15: "speedStop", 16: "servoStop", 24: "servoL",
                   33: "stopL", 34: "stopJ"}

# The uploaded script has "global reg_offset_int = # int register offset\n24" (the offset
# is injected after the comment), so allow a comment and a newline before the number.
_OFFSET_RE = re.compile(rb"global\s+reg_offset_int\s*=\s*(?:#[^\n]*\n)?\s*(-?\d+)")
# A program ends with a top-level "end" line; its newline must have arrived too, so a chunk that
# happens to end after "end" of "end_something()" is not taken for the end of the program.
_PROGRAM_END_RE = re.compile(rb"^end[ \t\r]*\n", re.MULTILINE)


class ControlScript:
    """rtde_control.script's main loop, over a Controller's registers and arm."""

    def __init__(self, controller):
        self.ctl = controller
        self._servol_cache = (None, None)   # (pose, IK solution) of the last servoL target
        self._teach_logged = set()          # motion commands already logged as ignored this teach session

    def run_pass(self):
        """One pass of the main loop (one controller cycle)."""
        ctl = self.ctl
        off = ctl.reg_off
        if ctl.blocking:                # inside a blocking call (stopj, movej ...)
            if ctl.arm.mode == "idle":
                ctl.blocking = False
                ctl.out_int[off] = SIGNAL_DONE
            return
        cmd = ctl.in_int[off]
        if not ctl.arm.teaching:
            self._teach_logged.clear()
        if cmd in REALTIME_COMMANDS:
            self._realtime_command(cmd)
            if ctl.runtime_state == PLAYING:
                ctl.out_int[off] = SIGNAL_READY
        elif cmd == 0:
            ctl.executing = False
            ctl.out_int[off] = SIGNAL_READY
        elif not ctl.executing:
            ctl.executing = True
            self._command(cmd)

    def _d(self, i, n=1):
        base = self.ctl.reg_off + i
        return self.ctl.in_double[base:base + n] if n > 1 else self.ctl.in_double[base]

    def _ignored_in_teach_mode(self, cmd):
        """True (and counted) if cmd is a motion command and the arm is in teach mode."""
        if not (self.ctl.arm.teaching and cmd in MOTION_COMMANDS):
            return False
        self.ctl.teach_ignored += 1
        if cmd not in self._teach_logged:
            self._teach_logged.add(cmd)
            self.ctl.event(f"{MOTION_COMMANDS[cmd]} ignored: the arm is in teach mode (freedrive), "
                            "it follows the operator's hand, not a trajectory")
        return True

    def _realtime_command(self, cmd):
        ctl, arm = self.ctl, self.ctl.arm
        if self._ignored_in_teach_mode(cmd):
            return
        if cmd == 11:                                   # servoJ
            self._stop_if_refused(arm.servo(np.array(self._d(0, 6))))
        elif cmd == 24:                                 # servoL: IK near the current joints
            pose = tuple(self._d(0, 6))
            if not np.all(np.isfinite(pose)):
                ctl.protective_stop(f"servoL pose {pose} not finite")
                return
            if self._servol_cache[0] != pose:
                self._servol_cache = (pose, inverse_kinematics(np.array(pose), arm.q))
            q = self._servol_cache[1]
            if q is None:
                ctl.end_program(f"servoL: no inverse kinematics solution for {pose}")
            else:
                self._stop_if_refused(arm.servo(q))
        elif cmd == 9:                                  # speedJ
            self._stop_if_refused(arm.speed(np.array(self._d(0, 6)), self._d(6)))
        # Other realtime commands (speedL, forceMode, getters) are not emulated: they only
        # signal ready, which keeps the client's handshake going.

    def _command(self, cmd):
        """Non-realtime commands; each ends with SIGNAL_DONE (now or when its motion ends)."""
        ctl, arm = self.ctl, self.ctl.arm
        async_flag = ctl.in_int[ctl.reg_off + 1]
        if self._ignored_in_teach_mode(cmd):
            self._finish()                              # done at once: no motion to wait for
        elif cmd in (TEACH_MODE, END_TEACH_MODE):
            ctl.teach_mode(cmd == TEACH_MODE)
            self._finish()
        elif cmd in (1, 2):                               # moveJ, moveJ_IK
            target = np.array(self._d(0, 6))
            if cmd == 2:
                target = inverse_kinematics(target, arm.q) if np.all(np.isfinite(target)) else None
                if target is None:
                    ctl.end_program("moveJ_IK: no inverse kinematics solution")
                    return
            self._stop_if_refused(arm.move(target, self._d(6), self._d(7)))
            self._finish(blocking=not async_flag)
        elif cmd in (15, 16, 33, 34):                   # speedStop, servoStop, stopL, stopJ
            arm.brake(self._d(0))
            self._finish(blocking=not (cmd in (33, 34) and async_flag))
        elif cmd == 35:                                 # setWatchdog on input_int_register_<off>
            ctl.set_watchdog(self._d(0))
            self._finish()
        elif cmd == 31:                                 # triggerProtectiveStop
            ctl.protective_stop("requested by client")
        elif cmd == 255:                                # stopScript: the program ends
            ctl.end_program("stopScript")
        else:
            # Not emulated (moveL, forceMode stop, IO, ...): still signal done, otherwise
            # the client would block for its 300 s execution timeout.
            self._finish()

    def _stop_if_refused(self, refused):
        """An Arm command's answer: the reason it refused the command is a protective stop."""
        if refused is not None:
            self.ctl.protective_stop(refused)

    def _finish(self, blocking=False):
        if blocking and self.ctl.arm.mode != "idle":
            self.ctl.blocking = True    # SIGNAL_DONE once the motion has ended
        else:
            self.ctl.out_int[self.ctl.reg_off] = SIGNAL_DONE


class ScriptServer:
    """Port 30003: programs in, ur_rtde's control script started (`chunks` is Servers.chunks)."""

    def __init__(self, controller, lock, logs, chunks):
        self.ctl, self._lock, self._logs, self._chunks = controller, lock, logs, chunks

    def client(self, sock, addr):
        buf = bytearray()
        scan = 0        # the search for "end" resumes at the start of the last unfinished line
        ignored = 0     # programs that are not ur_rtde's: the first 3 are logged, then counted
        try:
            for chunk in self._chunks(sock):
                buf += chunk
                done = 0
                for m in _PROGRAM_END_RE.finditer(buf, scan):
                    ignored += not self.run(bytes(buf[done:m.end()]), log_ignored=ignored < 3)
                    done = m.end()
                if done:
                    del buf[:done]
                    scan = 0
                # Only the new bytes are searched for a newline: linear in the input, not quadratic.
                newline = buf.rfind(b"\n", max(0, len(buf) - len(chunk)))
                if newline >= 0:
                    scan = newline + 1
                if len(buf) > MAX_PROGRAM:
                    self._logs.event(f"script {addr[0]}:{addr[1]}: over 1 MiB without a program end, closed")
                    return
        finally:
            if ignored > 3:
                self._logs.event(f"script {addr[0]}:{addr[1]}: ignored {ignored - 3} more scripts")

    def run(self, program, log_ignored=True):
        """Start ur_rtde's control script (or log why not); False if it is some other script."""
        head = re.match(rb"\s*(?:def|sec)\s+(\w+)\s*\(", program)
        name = head.group(1).decode() if head else None
        with self._lock:
            if name != "rtde_control":
                if log_ignored:
                    self._logs.event(f"ignored script {name or program[:40]!r} ({len(program)} bytes)")
                return False
            if not self.ctl.can_run():
                self._logs.event("control script refused: robot not running or not in normal safety mode")
                return True
            m = _OFFSET_RE.search(program)
            offset = m.group(1).decode() if m else "0"
            if not (offset.isdigit() and len(offset) <= 2 and int(offset) <= MAX_REG_OFFSET):
                self._logs.event(f"control script refused: register offset {offset[:12]} outside "
                                 f"0..{MAX_REG_OFFSET} (48 registers, 24 used)")
                return True
            self.ctl.start_program(name, int(offset))
        return True
