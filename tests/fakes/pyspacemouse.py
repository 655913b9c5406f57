"""A fake of pyspacemouse 2.x at its API boundary, for tests without a SpaceMouse.

Same names and call shapes as pyspacemouse 2.1.0 (read from its wheel): `open(callback=None, ...,
nonblocking=True, device=None, device_index=0, device_spec=None, axis_convention=None)` returns a
SpaceMouseDevice, or raises RuntimeError("No connected or supported devices found.") when none is
connected; `device.read()` processes at most one pending HID report and returns the device's own
SpaceMouseState (updated in place: t, x, y, z, roll, pitch, yaw, buttons); `device.close()`;
`AxisConvention`, `ButtonState`, `get_connected_devices()`.

Reports: while any axis is deflected, or when the scripted state changed, one report becomes
pending every `report_period_s` (a real device streams at ~60-120 Hz while moved and goes silent at
rest). The script is a function of the seconds since open(): `script(t) -> (axes (6,), buttons)`,
axes in the axis convention the caller asked for (this fake does not remap).

Test knobs (module attributes, set before open): devices, script, report_period_s, fail_after_s
(read() raises OSError after that many seconds, as easyhid's HIDException on an unplugged device).
What happened is recorded in `opened` (the keyword arguments of each open), `reads`, `reports`
and `closed`.
"""

import enum
import timeit
from dataclasses import dataclass, field

__version__ = "2.1.0"
AXIS_NAMES = ("x", "y", "z", "roll", "pitch", "yaw")

devices = ["SpaceMouse Compact"]
script = None                  # t -> (axes, buttons); None: at rest, no buttons
report_period_s = 0.008
fail_after_s: float | None = None

opened: list[dict] = []
reads = 0
reports = 0
closed = 0


def reset() -> None:
    global script, report_period_s, fail_after_s, reads, reports, closed
    script, report_period_s, fail_after_s, reads, reports, closed = None, 0.008, None, 0, 0, 0
    devices[:] = ["SpaceMouse Compact"]
    opened.clear()


class AxisConvention(str, enum.Enum):
    LEGACY = "legacy"
    HID = "hid"
    HID_Z_UP = "hid_z_up"
    ROS = "ros"
    UNITY = "unity"


class ButtonState(list):
    def __int__(self) -> int:
        return sum((b << i) for (i, b) in enumerate(reversed(self)))


@dataclass
class SpaceMouseState:
    t: float = -1.0
    x: float = 0.0
    y: float = 0.0
    z: float = 0.0
    roll: float = 0.0
    pitch: float = 0.0
    yaw: float = 0.0
    buttons: ButtonState = field(default_factory=lambda: ButtonState([]))

    def __getitem__(self, key: str) -> float:
        return getattr(self, key)


class SpaceMouseDevice:
    def __init__(self, name: str, n_buttons: int = 2):
        self.name = name
        self._state = SpaceMouseState(buttons=ButtonState([0] * n_buttons))
        self._t_open = timeit.default_timer()
        self._last_report = -1.0
        self._open = True

    @property
    def connected(self) -> bool:
        return self._open

    def _scripted(self, t: float):
        if script is None:
            return (0.0,) * 6, [0] * len(self._state.buttons)
        axes, buttons = script(t)
        return tuple(float(a) for a in axes), [int(b) for b in buttons]

    def read(self) -> SpaceMouseState:
        global reads, reports
        reads += 1
        if not self._open:
            return self._state
        now = timeit.default_timer()
        t = now - self._t_open
        if fail_after_s is not None and t > fail_after_s:
            raise OSError("HIDException: device disconnected")
        axes, buttons = self._scripted(t)
        current = tuple(getattr(self._state, a) for a in AXIS_NAMES)
        moving = any(a != 0.0 for a in axes) or any(a != 0.0 for a in current)
        changed = axes != current or buttons != list(self._state.buttons)
        if (moving or changed) and now - self._last_report >= report_period_s:
            self._last_report = now
            for name, value in zip(AXIS_NAMES, axes):
                setattr(self._state, name, value)
            self._state.buttons[:] = buttons
            self._state.t = now
            reports += 1
        return self._state

    def close(self) -> None:
        global closed
        if self._open:
            self._open = False
            closed += 1

    def __enter__(self) -> "SpaceMouseDevice":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def get_connected_devices() -> list[str]:
    return list(devices)


def open(callback=None, dof_callback=None, dof_callbacks=None, button_callback=None, button_callbacks=None,  # noqa: A001
         nonblocking=True, device=None, device_index=0, device_spec=None, axis_convention=None) -> SpaceMouseDevice:
    opened.append({"nonblocking": nonblocking, "device": device, "device_index": device_index,
                   "axis_convention": axis_convention})
    if device is None:
        if not devices:
            raise RuntimeError("No connected or supported devices found.")
        device = devices[0]
    if device not in devices:
        raise RuntimeError(f"Device '{device}' not found.")
    return SpaceMouseDevice(device)
