"""The terminal: keys read raw from stdin (termios, no X server), for episode control in every mode
and for the keyboard teleop's TCP velocities.

    with Terminal(sys.stdin.fileno()) as term:   # raw keys, no echo; restored on every exit
        for key in term.keys():                  # what was typed since the last call, never blocks
            ...

Keys are single characters ("w", " ", "\\n" for Enter, "\\x7f" for Backspace) or names of escape
sequences ("up", "down", "right", "left"). Ctrl-C still interrupts (ISIG stays on), so the
recorder's finally block runs as for any other exit; a 0x03 byte that reaches us anyway is
reported as "ctrl-c".

A terminal reports key presses, never releases: `KeyboardTeleop` treats an axis key as held for
`hold_s` after its last press. A held key repeats (typematic: a first repeat after ~250-600 ms, then
~30 per second), so the default 0.6 s bridges the first gap and the axis stops at most 0.6 s after
the key is let go; "x" stops every axis at once.
"""
from __future__ import annotations

import os
import select
import termios

import numpy as np

from .base import DeviceInput, Teleop

ENTER, BACKSPACE, CTRL_C = "\n", "\x7f", "ctrl-c"
_ESCAPES = {"[A": "up", "[B": "down", "[C": "right", "[D": "left"}

# key -> (axis index, sign); axes are x y z roll pitch yaw of the TCP velocity.
MOTION_KEYS = {
    "w": (0, +1), "s": (0, -1), "a": (1, +1), "d": (1, -1), "r": (2, +1), "f": (2, -1),
    "j": (3, +1), "l": (3, -1), "i": (4, +1), "k": (4, -1), "u": (5, +1), "o": (5, -1),
}
KEY_HELP = "w/s +-x, a/d +-y, r/f +-z, j/l +-roll, i/k +-pitch, u/o +-yaw, x stop"


class Terminal:
    """stdin in raw mode: no line buffering, no echo; the previous settings come back on close()
    (also from __exit__, so `with` restores them on every exit path, exceptions included)."""

    def __init__(self, fd: int):
        self.fd = fd
        self._saved: list | None = None
        self._pending = b""
        self._interrupted = False

    @staticmethod
    def available(fd: int) -> bool:
        return fd >= 0 and os.isatty(fd)

    def open(self) -> "Terminal":
        if self._saved is not None:
            return self
        self._saved = termios.tcgetattr(self.fd)
        mode = termios.tcgetattr(self.fd)
        # Input: no CR -> NL translation surprises (Enter arrives as \r: mapped below), no XON/XOFF
        # (Ctrl-S would freeze the terminal's output). Local: no canonical lines, no echo; ISIG kept.
        mode[0] &= ~(termios.IXON | termios.ICRNL | termios.INLCR | termios.IGNCR)
        mode[3] &= ~(termios.ICANON | termios.ECHO | termios.ECHONL | termios.IEXTEN)
        mode[6] = list(mode[6])
        mode[6][termios.VMIN], mode[6][termios.VTIME] = 0, 0
        termios.tcsetattr(self.fd, termios.TCSANOW, mode)
        return self

    def close(self) -> None:
        """Restore the terminal's settings; idempotent."""
        if self._saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSANOW, self._saved)
            except termios.error:   # the terminal went away (a closed pty): nothing to restore
                pass
            self._saved = None

    def __enter__(self) -> "Terminal":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def note_interrupt(self) -> None:
        """A SIGINT arrived (from a signal handler): the next keys() reports "ctrl-c", so an
        interrupt whose KeyboardInterrupt something swallowed still stops the caller."""
        self._interrupted = True

    def keys(self) -> list[str]:
        """Every key typed since the last call (never blocks)."""
        if self._interrupted:
            self._interrupted = False
            return [CTRL_C]
        data = self._pending
        while True:
            ready, _, _ = select.select([self.fd], [], [], 0)
            if not ready:
                break
            try:
                chunk = os.read(self.fd, 1024)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:   # the terminal hung up
                break
            if not chunk:
                break
            data += chunk
        self._pending = b""
        out, i = [], 0
        text = data.decode("utf-8", errors="replace")
        while i < len(text):
            c = text[i]
            if c == "\x1b":
                seq = text[i + 1:i + 3]
                if seq in _ESCAPES:
                    out.append(_ESCAPES[seq])
                    i += 3
                    continue
                if len(text) - i < 3 and text[i + 1:i + 2] in ("", "["):   # the rest of it comes next time
                    self._pending = text[i:].encode()
                    break
                out.append("esc")
            elif c in ("\r", "\n"):
                out.append(ENTER)
                if c == "\r" and text[i + 1:i + 2] == "\n":   # CR LF is one Enter
                    i += 1
            elif c in ("\x7f", "\x08"):
                out.append(BACKSPACE)
            elif c == "\x03":
                out.append(CTRL_C)
            else:
                out.append(c)
            i += 1
        return out


class KeyboardTeleop(Teleop):
    """TCP velocities from motion keys: each key drives one axis at full speed (the recorder's
    --max-linear / --max-angular) while held (see the module's note on key repeat). The gripper's
    space bar is the recorder's, as in every mode."""

    name = "keyboard"

    def __init__(self, hold_s: float = 0.6):
        self.hold_s = float(hold_s)
        self._until = np.full(6, -np.inf)   # each axis is driven until this time ...
        self._sign = np.zeros(6)            # ... in this direction

    def on_key(self, key: str, now: float) -> bool:
        if key in MOTION_KEYS:
            axis, sign = MOTION_KEYS[key]
            self._sign[axis], self._until[axis] = sign, now + self.hold_s
            return True
        if key == "x":
            self.stop_motion()
            return True
        return False

    def stop_motion(self) -> None:
        self._until[:] = -np.inf
        self._sign[:] = 0.0

    def read(self, now: float) -> DeviceInput:
        return DeviceInput(np.where(now < self._until, self._sign, 0.0).astype(np.float64))

    def describe(self) -> str:
        return f"keyboard ({KEY_HELP})"
