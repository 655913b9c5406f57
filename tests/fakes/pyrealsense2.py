"""A fake of the few pyrealsense2 names dpag_engine.cameras.realsense uses, for tests without a camera.

Same names and call shapes as the real module (pipeline, config, stream, format, timestamp_domain,
composite frames with get_color_frame, frames with get_data / get_timestamp /
get_frame_timestamp_domain, RuntimeError from wait_for_frames on a timeout and from start when no
device matches). Frames are synthetic random RGB images paced at the configured fps, stamped in
the global_time domain (host wall clock, ms) `latency_s` before wait_for_frames returns them.

Test knobs (module attributes, set before start): devices, latency_s, hardware_clock_frames (the
first N frames stamped in hardware_clock, as a real device does before global time locks),
stall_after (deliver that many frames, then time out). What was asked and delivered is recorded
in `configs`, `produced` (frame_number, timestamp_ms, domain, image) and `stopped`.
"""
from __future__ import annotations

import enum
import time

import numpy as np

devices = ["123456789012"]
latency_s = 0.03
hardware_clock_frames = 0
stall_after: int | None = None
DEFAULT_COLOR = (640, 480)   # width, height: what a 0 x 0 request gets

configs: list["config"] = []
produced: list[tuple[int, float, "timestamp_domain", np.ndarray]] = []
stopped = 0


class stream(enum.Enum):
    depth = 1
    color = 2


class format(enum.Enum):   # noqa: A001 - the real module's name
    z16 = 1
    rgb8 = 5
    bgr8 = 6


class timestamp_domain(enum.Enum):
    hardware_clock = 0
    system_time = 1
    global_time = 2


class config:
    def __init__(self):
        self.serial: str | None = None
        self.streams: list[tuple] = []
        configs.append(self)

    def enable_device(self, serial: str) -> None:
        if not isinstance(serial, str):
            raise TypeError(f"enable_device(): incompatible arguments: {serial!r}")
        self.serial = serial

    def enable_stream(self, stream_type, width, height, format, framerate) -> None:  # noqa: A002
        # pybind11 refuses anything but these exact types
        args = (stream_type, width, height, format, framerate)
        if not (isinstance(stream_type, stream) and isinstance(format, globals()["format"])
                and all(type(v) is int for v in (width, height, framerate))):
            raise TypeError(f"enable_stream(): incompatible arguments: {args}")
        self.streams.append(args)


class frame:
    def __init__(self, number: int, timestamp_ms: float, domain: timestamp_domain, image: np.ndarray):
        self._number, self._timestamp, self._domain, self._image = number, timestamp_ms, domain, image

    def __bool__(self) -> bool:
        return True

    def get_data(self) -> memoryview:
        return memoryview(self._image)   # a buffer, like the real BufData

    def get_timestamp(self) -> float:
        return self._timestamp

    def get_frame_timestamp_domain(self) -> timestamp_domain:
        return self._domain

    def get_frame_number(self) -> int:
        return self._number


class composite_frame:
    def __init__(self, color: frame):
        self._color = color

    def get_color_frame(self) -> frame:
        return self._color


class pipeline_profile:
    pass


class pipeline:
    def __init__(self):
        self._cfg: config | None = None
        self._next = 0.0
        self._number = 0
        self._rng = np.random.default_rng()

    def start(self, config: config | None = None) -> pipeline_profile:  # noqa: A002
        if self._cfg is not None:
            raise RuntimeError("start() cannot be called before stop()")
        cfg = config or globals()["config"]()
        if not devices or (cfg.serial is not None and cfg.serial not in devices):
            raise RuntimeError("No device connected" if not devices else "Couldn't resolve requests")
        colour = [s for s in cfg.streams if s[0] is stream.color] or [(stream.color, 0, 0, format.rgb8, 30)]
        _, w, h, fmt, fps = colour[0]
        self._w, self._h = (w, h) if w and h else DEFAULT_COLOR
        self._period = 1.0 / (fps or 30)
        self._cfg, self._next, self._number = cfg, time.monotonic(), 0
        return pipeline_profile()

    def wait_for_frames(self, timeout_ms: int = 5000) -> composite_frame:
        if self._cfg is None:
            raise RuntimeError("wait_for_frames cannot be called before start()")
        if stall_after is not None and self._number >= stall_after:
            time.sleep(timeout_ms / 1e3)
            raise RuntimeError(f"Frame didn't arrive within {timeout_ms}")
        time.sleep(max(0.0, self._next - time.monotonic()))
        self._next = max(self._next + self._period, time.monotonic())
        image = self._rng.integers(1, 256, (self._h, self._w, 3), dtype=np.uint8)
        if self._number < hardware_clock_frames:
            domain, stamp = timestamp_domain.hardware_clock, 1e3 * (self._number * self._period + 12.5)
        else:
            domain, stamp = timestamp_domain.global_time, 1e3 * (time.time() - latency_s)
        produced.append((self._number, stamp, domain, image))
        color = frame(self._number, stamp, domain, image)
        self._number += 1
        return composite_frame(color)

    def stop(self) -> None:
        global stopped
        if self._cfg is None:
            raise RuntimeError("stop() cannot be called before start()")
        self._cfg = None
        stopped += 1
