"""RealSenseCamera: the colour stream of an Intel RealSense (D4xx) through pyrealsense2."""
from __future__ import annotations

import time

import numpy as np

from .base import Camera


class RealSenseCamera(Camera):
    """The RGB8 colour stream of one RealSense device (serial None: the first one found).

    Stamps: librealsense's own frame timestamp where it is on the host's wall clock (global_time:
    the device clock mapped to the host's; system_time: the host's arrival stamp, taken in the
    driver), converted to time.monotonic() with the wall-minus-monotonic offset measured at open;
    hardware_clock stamps (the device's own clock, unrelated to ours) are replaced by our arrival
    time. librealsense may start a stream in hardware_clock and switch to global_time a few frames
    in, hence the check per frame.

    timeout_ms bounds each wait_for_frames once streaming; the first frame may take longer (auto
    exposure settles, USB enumeration), so it gets first_timeout_ms, librealsense's own default.
    """

    def __init__(self, name: str, serial: str | None = None, *, fps: float,
                 resolution: tuple[int, int] | None = None, timeout_ms: int = 1000,
                 first_timeout_ms: int = 5000, **kw):
        super().__init__(name, fps=fps, resolution=resolution, **kw)
        self.serial = serial or None
        self.timeout_ms = int(timeout_ms)
        self.first_timeout_ms = int(first_timeout_ms)
        self._rs = None
        self._pipeline = None
        self._wall_minus_mono = 0.0
        self._waited = 0

    def _open(self) -> None:
        try:
            import pyrealsense2 as rs   # optional: only a RealSense session needs it
        except ImportError as e:
            raise self._fault(f"pyrealsense2 is not installed (pip install pyrealsense2): {e}") from e
        h, w = self.resolution or (0, 0)   # 0 x 0: the device's default colour mode
        config = rs.config()
        if self.serial:
            config.enable_device(self.serial)
        config.enable_stream(rs.stream.color, w, h, rs.format.rgb8, int(round(self.fps)))
        pipeline = rs.pipeline()
        which = f"RealSense {self.serial}" if self.serial else "the first RealSense"
        try:
            pipeline.start(config)
        except RuntimeError as e:   # no device, device busy, or no such mode ("Couldn't resolve requests")
            raise self._fault(f"cannot start {which} at {w}x{h} rgb8 {int(round(self.fps))} fps: {e}") from e
        self._rs, self._pipeline, self._waited = rs, pipeline, 0
        self._wall_minus_mono = time.time() - time.monotonic()

    def _grab(self) -> tuple[np.ndarray, float]:
        rs = self._rs
        timeout_ms = self.first_timeout_ms if self._waited == 0 else self.timeout_ms
        try:
            frames = self._pipeline.wait_for_frames(timeout_ms)
        except RuntimeError as e:   # what pyrealsense2 raises on a timeout ("Frame didn't arrive within ...")
            raise self._fault(f"no frame within {timeout_ms} ms: {e}") from e
        t_arrival = time.monotonic()
        self._waited += 1
        color = frames.get_color_frame()
        if not color:
            raise self._fault("frameset without a colour frame")
        image = np.asanyarray(color.get_data())   # a view of librealsense's buffer; the base copies it
        if color.get_frame_timestamp_domain() in (rs.timestamp_domain.global_time, rs.timestamp_domain.system_time):
            # ms on the host's wall clock -> monotonic. A frame cannot be captured after it arrived:
            # the min() keeps a wall-clock step (NTP) since open from stamping frames in the future.
            t = min(color.get_timestamp() / 1e3 - self._wall_minus_mono, t_arrival)
        else:
            t = t_arrival
        return image, t

    def _close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.stop()
            self._pipeline = None
