"""OpenCVCamera: a V4L2 device (path or index) or a video file played back like a live camera."""
from __future__ import annotations

import os
import time

import cv2
import numpy as np

from .base import Camera


class OpenCVCamera(Camera):
    """cv2.VideoCapture as a Camera.

    device: "/dev/videoN" or an int index (V4L2, the device paces the frames), or a video file path,
    played at `fps` (each frame released at its due time, so a replay behaves like a live camera);
    at the end of the file the camera stops delivering (a CameraFault) unless loop=True.
    fourcc (devices only), e.g. "MJPG": the pixel format asked of the device; many USB cameras
    reach 30 fps at 720p and above only in MJPG (their raw YUYV mode is limited by USB bandwidth).
    """

    def __init__(self, name: str, device: str | int, *, fps: float,
                 resolution: tuple[int, int] | None = None, loop: bool = False,
                 fourcc: str | None = None, **kw):
        super().__init__(name, fps=fps, resolution=resolution, **kw)
        self.device = device
        self.is_file = not (isinstance(device, int) or str(device).startswith("/dev/"))
        self.loop = bool(loop)
        if fourcc is not None and len(fourcc) != 4:
            raise ValueError(f"camera {name!r}: fourcc is 4 characters (e.g. 'MJPG'), got {fourcc!r}")
        self.fourcc = fourcc
        self._cap: cv2.VideoCapture | None = None
        self._t_next = 0.0

    def _open(self) -> None:
        if self.is_file:
            if not os.path.isfile(self.device):
                raise self._fault(f"no such video file: {self.device}")
            cap = cv2.VideoCapture(str(self.device))
        else:
            cap = cv2.VideoCapture(self.device, cv2.CAP_V4L2)
        if not cap.isOpened():
            cap.release()
            raise self._fault(f"cannot open {'video file' if self.is_file else 'V4L2 device'} {self.device!r}")
        if not self.is_file:
            # Ask; the driver picks the nearest mode it has, checked just below. The pixel format
            # goes first: it decides which sizes and rates the device offers.
            if self.fourcc is not None:
                cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*self.fourcc))
            if self.resolution is not None:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.resolution[0])
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.resolution[1])
            cap.set(cv2.CAP_PROP_FPS, self.fps)
        got = (int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)))
        if self.resolution is not None and got != self.resolution:
            cap.release()
            raise self._fault(f"{self.device!r} gives {got[0]}x{got[1]} frames, asked "
                              f"{self.resolution[0]}x{self.resolution[1]} (height x width)")
        self._cap = cap
        self._t_next = time.monotonic()

    def _grab(self) -> tuple[np.ndarray, float] | None:
        if self.is_file:
            # Pace the file: release each frame at its due time; after a hiccup, resync rather
            # than burst through the backlog (a live camera would have dropped those frames).
            if not self._wait_until(self._t_next):
                return None
            t_due = self._t_next
            self._t_next = max(self._t_next + 1.0 / self.fps, time.monotonic())
        ok, bgr = self._cap.read()
        if not ok and self.is_file and self.loop:
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, bgr = self._cap.read()
        # Stamped when read() returns: cv2 does not reliably expose the V4L2 buffer timestamp
        # (CAP_PROP_POS_MSEC is driver- and backend-dependent), so the arrival time is the most
        # honest capture time there is; it is late by the driver's transfer, not by our queueing,
        # since this thread reads continuously and keeps the driver's queue drained. A file's frame
        # is captured at its due time; decoding it is its transfer delay (the first decode of a
        # clip is slow, so the arrival time would understate the pacing).
        t = t_due if self.is_file else time.monotonic()
        if not ok:
            if self.is_file:
                return None   # end of file: the base turns it into a fault
            raise self._fault(f"read from {self.device!r} failed (unplugged or stopped?)")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), t

    def _close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
