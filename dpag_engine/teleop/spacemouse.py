"""A 3Dconnexion SpaceMouse through pyspacemouse (2.x; imported only when asked for).

    pip install pyspacemouse     # needs the hidapi library (libhidapi-hidraw0) and read access to
                                 # the /dev/hidraw* device (a udev rule), see pyspacemouse's docs

pyspacemouse 2.x: `device = pyspacemouse.open(axis_convention=...)` finds the first supported
device (RuntimeError when there is none) and `device.read()` processes at most one pending HID
report (non-blocking) and returns the device's state: x, y, z, roll, pitch, yaw in [-1, 1], t (the
time of the last report) and buttons (0/1 each). The state object is the device's own, updated in
place: its values are copied out at once. Translation and rotation arrive as separate reports on
older devices, so each step drains what is pending. 1.x's module-level `pyspacemouse.read()` is
used when the device object has no read().

Axes: pyspacemouse's HID_Z_UP convention (right-handed: +x right, +y away from the operator, +z up;
roll, pitch, yaw about them), mapped to the TCP velocity's x y z roll pitch yaw by `axis_map`
(default identity: the operator stands at the base facing the arm's +y). Buttons: 0 closes the
gripper, 1 opens it; a one-button device toggles. A device whose axes are deflected but which has
sent nothing for `stale_s` counts as released (a lost release report must not keep the arm going).
"""
from __future__ import annotations

import time

import numpy as np

from .base import AXES, CLOSE, OPEN, TOGGLE, DeviceInput, Teleop, TeleopFault


class TeleopUnavailable(RuntimeError):
    """The device or its library is missing: a usage error, said before anything connects."""


def parse_axis_map(text: str) -> tuple[tuple[int, float], ...]:
    """'x y z roll pitch yaw' (the default) or any signed permutation, e.g. '-y x z -pitch roll yaw':
    output axis i reads the named device axis (negated with '-'). ValueError saying what is wrong."""
    words = text.split()
    if len(words) != 6:
        raise ValueError(f"six signed axis names, got {len(words)} in {text!r}")
    out = []
    for w in words:
        sign = -1.0 if w.startswith("-") else 1.0
        name = w.lstrip("+-")
        if name not in AXES:
            raise ValueError(f"{w!r} is not one of {', '.join(AXES)} (optionally signed)")
        out.append((AXES.index(name), sign))
    if len({i for i, _ in out}) != 6:
        raise ValueError(f"each device axis once, got {text!r}")
    return tuple(out)


def import_pyspacemouse():
    try:
        import pyspacemouse
    except (ImportError, OSError) as err:   # not installed, or its hidapi library is missing
        raise TeleopUnavailable(
            f"--teleop spacemouse needs the pyspacemouse package and the hidapi library ({type(err).__name__}: "
            f"{err}); install them with `pip install pyspacemouse` and your system's hidapi "
            f"(e.g. apt install libhidapi-hidraw0), or record with --teleop keyboard / freedrive") from None
    return pyspacemouse


class SpaceMouseTeleop(Teleop):
    name = "spacemouse"

    def __init__(self, axis_map: tuple[tuple[int, float], ...] | None = None, stale_s: float = 0.5,
                 max_reads: int = 64):
        self.axis_map = axis_map or tuple((i, 1.0) for i in range(6))
        self.stale_s, self.max_reads = stale_s, max_reads
        self._device = self._read = None
        self._module = None
        self._last_t = None
        self._last_change = 0.0
        self._axes = np.zeros(6)
        self._buttons: list[int] = []
        self._pending: list[str] = []
        self.reports = 0
        self.stale = False
        self.device_name = "spacemouse"

    def open(self) -> None:
        psm = self._module = import_pyspacemouse()
        kwargs = {}
        convention = getattr(psm, "AxisConvention", None)
        if convention is not None:   # 2.x: a right-handed z-up frame instead of the deprecated legacy one
            kwargs["axis_convention"] = convention.HID_Z_UP
        try:
            device = psm.open(**kwargs)
        except Exception as err:   # RuntimeError: none connected; ValueError: unknown; OSError: permissions
            raise TeleopUnavailable(f"--teleop spacemouse: no SpaceMouse could be opened ({type(err).__name__}: "
                                    f"{err}); is it plugged in, and may this user read /dev/hidraw*?") from None
        if device is None or device is False:
            raise TeleopUnavailable("--teleop spacemouse: no SpaceMouse found (pyspacemouse.open() returned nothing)")
        self._device = device
        self._read = device.read if hasattr(device, "read") else psm.read
        self.device_name = str(getattr(device, "name", None) or "spacemouse")
        self._last_change = time.monotonic()

    def read(self, now: float) -> DeviceInput:
        if self._read is None:
            raise TeleopFault("spacemouse: not open")
        state = None
        try:
            for _ in range(self.max_reads):   # drain what is pending: the newest values win
                state = self._read()
                t = float(state.t)
                if t == self._last_t:
                    break
                self._last_t = t
                self.reports += 1
                self._last_change = now
                self._axes = np.array([float(getattr(state, a)) for a in AXES])
                buttons = [int(bool(b)) for b in state.buttons]
                self._pending += self._button_requests(buttons)
                self._buttons = buttons
        except TeleopFault:
            raise
        except Exception as err:   # easyhid's HIDException on an unplugged device, or anything it raises
            raise TeleopFault(f"spacemouse: read failed ({type(err).__name__}: {err})") from err
        raw = self._axes
        self.stale = bool(np.any(raw != 0) and now - self._last_change > self.stale_s)
        if self.stale:
            raw = np.zeros(6)
        if not np.all(np.isfinite(raw)):
            raise TeleopFault(f"spacemouse: non-finite axes {raw.tolist()}")
        axes = np.array([sign * raw[i] for i, sign in self.axis_map])
        requests, self._pending = self._pending, []
        return DeviceInput(np.clip(axes, -1.0, 1.0), requests)

    def _button_requests(self, buttons: list[int]) -> list[str]:
        before = self._buttons + [0] * (len(buttons) - len(self._buttons))
        pressed = [i for i, (a, b) in enumerate(zip(before, buttons)) if b and not a]
        if len(buttons) == 1:
            return [TOGGLE] if pressed else []
        return [CLOSE if i == 0 else OPEN for i in pressed if i in (0, 1)]

    def close(self) -> None:
        device, self._device, self._read = self._device, None, None
        if device is not None and hasattr(device, "close"):
            try:
                device.close()
            except Exception:   # closing an unplugged device: nothing left to release
                pass
        elif device is not None and self._module is not None and hasattr(self._module, "close"):
            try:
                self._module.close()
            except Exception:
                pass

    def describe(self) -> str:
        return f"{self.device_name} (button 0 closes the gripper, button 1 opens it)"
