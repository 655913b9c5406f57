"""The camera interface: a capture thread per camera, a small ring of stamped, immutable frames.

Subclasses implement _open / _grab / _close; everything a session calls (start, latest, nearest,
stop, stats) lives here once, so every source (OpenCV, RealSense, the emulator's cameras) faults
the same way: a grab error, an end of stream or a frame older than stall_timeout_s turns the next
latest()/nearest() into a CameraFault naming the camera, and the session safe-stops on it.
"""
from __future__ import annotations

import abc
import collections
import logging
import re
import threading
import time
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Frame:
    image: np.ndarray     # uint8 (H, W, 3) RGB, C-contiguous, read-only (never modified after capture)
    t_capture: float      # time.monotonic() seconds at capture (a driver's stamp converted to this clock);
                          # never decreasing per source
    index: int            # 0, 1, 2 ... per source since start


class CameraFault(RuntimeError):
    """A camera cannot deliver: it would not open, a grab failed, the stream ended or stalled."""


class Camera(abc.ABC):
    """A camera on its own capture thread with a small ring buffer of stamped frames."""

    # How long stop() waits for the capture thread. The device is closed by the capture thread
    # itself when its loop ends, never from another thread under a grab in progress (closing a
    # V4L2 or librealsense handle while another thread reads it can crash inside the C library).
    join_timeout_s = 5.0

    def __init__(self, name: str, *, fps: float, resolution: tuple[int, int] | None,
                 ring: int = 16, stall_timeout_s: float = 0.5):
        if not isinstance(name, str) or not name:
            raise ValueError(f"camera name must be a non-empty string, got {name!r}")
        if not (isinstance(fps, (int, float)) and fps > 0):
            raise ValueError(f"camera {name!r}: fps must be > 0, got {fps!r}")
        if resolution is not None:
            if (len(resolution) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0
                                                 for v in resolution)):
                raise ValueError(f"camera {name!r}: resolution is (height, width) in pixels, got {resolution!r}")
            resolution = (int(resolution[0]), int(resolution[1]))
        if not (isinstance(ring, int) and ring >= 1):
            raise ValueError(f"camera {name!r}: ring must be an int >= 1, got {ring!r}")
        if not stall_timeout_s > 0:
            raise ValueError(f"camera {name!r}: stall_timeout_s must be > 0, got {stall_timeout_s!r}")
        self.name = name
        self.fps = float(fps)
        self.resolution = resolution
        self.stall_timeout_s = float(stall_timeout_s)
        self._ring: collections.deque[Frame] = collections.deque(maxlen=ring)
        self._cond = threading.Condition()     # guards everything below; notified on each frame/error
        self._lifecycle = threading.Lock()     # serialises start/stop
        self._stopping = threading.Event()     # set by stop(); subclasses wait on it instead of sleeping
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._frames = 0
        self._errors = 0

    # -- subclasses implement -------------------------------------------------------------------
    @abc.abstractmethod
    def _open(self) -> None:
        """Open the device; raise CameraFault if it cannot."""

    @abc.abstractmethod
    def _grab(self) -> tuple[np.ndarray, float] | None:
        """Block for the next frame: (RGB uint8 HxWx3, t_capture monotonic); raise CameraFault,
        or return None at the end of the stream."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Release the device. Called once, from the capture thread, after its last _grab."""

    # -- for subclasses -------------------------------------------------------------------------
    def _wait_until(self, t_due: float) -> bool:
        """Sleep until time.monotonic() >= t_due; False (at once) if stop() was called meanwhile."""
        return not self._stopping.wait(max(0.0, t_due - time.monotonic()))

    def _fault(self, what: str) -> CameraFault:
        return CameraFault(f"camera {self.name!r}: {what}")

    # -- public interface -----------------------------------------------------------------------
    def start(self, timeout_s: float = 5.0) -> None:
        """Open the device, start the capture thread, wait for the first frame (CameraFault if
        none arrives within timeout_s). A stopped camera may be started again (index restarts at 0)."""
        with self._lifecycle:
            if self._thread is not None:
                raise self._fault("already started (stop() it before starting again)")
            with self._cond:
                self._ring.clear()
                self._error, self._frames, self._errors = None, 0, 0
            self._stopping.clear()
            try:
                self._open()
            except CameraFault as e:
                raise self._named(e) from e
            except Exception as e:   # a driver's own exception type: still a camera fault
                raise self._fault(f"cannot open: {type(e).__name__}: {e}") from e
            self._thread = threading.Thread(target=self._run, name=f"camera-{self.name}", daemon=True)
            self._thread.start()
        with self._cond:
            self._cond.wait_for(lambda: self._ring or self._error is not None, timeout=timeout_s)
            error, got = self._error, bool(self._ring)
        if not got:
            self.stop()
            raise CameraFault(error or f"camera {self.name!r}: no frame within {timeout_s:g} s of start")

    def latest(self) -> Frame:
        """The newest frame. CameraFault if the capture thread stopped (error, end of stream, not
        started) or the newest frame is older than stall_timeout_s."""
        with self._cond:
            self._check()
            return self._ring[-1]

    def nearest(self, t: float) -> Frame:
        """The ring's frame whose t_capture is closest to t (monotonic seconds); same checks as latest()."""
        with self._cond:
            self._check()
            return min(self._ring, key=lambda f: abs(f.t_capture - t))

    def stop(self) -> None:
        """Stop the capture thread and close the device; idempotent."""
        with self._lifecycle:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            self._stopping.set()
            thread.join(self.join_timeout_s)
            if thread.is_alive():
                # Stuck inside the driver's read: it closes the device when that read returns.
                log.warning("camera %r: capture thread still in a grab after %.1f s; it closes the "
                            "device when the grab returns", self.name, self.join_timeout_s)

    @property
    def stats(self) -> dict:
        """frames, errors, the error, last index / t_capture / age, fps measured over the ring (JSON-safe)."""
        with self._cond:
            ring = list(self._ring)
            last = ring[-1] if ring else None
            span = ring[-1].t_capture - ring[0].t_capture if len(ring) >= 2 else 0.0
            return {
                "name": self.name,
                "running": self._thread is not None and self._thread.is_alive(),
                "frames": self._frames,
                "errors": self._errors,
                "error": self._error,
                "last_index": None if last is None else last.index,
                "last_t_capture": None if last is None else last.t_capture,
                "age_s": None if last is None else time.monotonic() - last.t_capture,
                "shape": None if last is None else list(last.image.shape),
                "fps_asked": self.fps,
                "fps_measured": (len(ring) - 1) / span if span > 0 else None,
                "resolution_asked": None if self.resolution is None else list(self.resolution),
            }

    def __enter__(self) -> "Camera":
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, fps={self.fps:g}, resolution={self.resolution})"

    # -- internals ------------------------------------------------------------------------------
    def _named(self, e: Exception) -> CameraFault:
        """e's message, prefixed with this camera's name unless it already carries it."""
        msg = str(e)
        return CameraFault(msg if msg.startswith(f"camera {self.name!r}") else f"camera {self.name!r}: {msg}")

    def _check(self) -> None:
        # Called with self._cond held.
        if self._error is not None:
            raise CameraFault(self._error)
        if self._thread is None:
            raise self._fault("not started" if not self._frames else "stopped")
        if not self._ring:
            raise self._fault("no frame yet")
        age = time.monotonic() - self._ring[-1].t_capture
        if age > self.stall_timeout_s:
            raise self._fault(f"stalled: newest frame #{self._ring[-1].index} is {age * 1e3:.0f} ms old "
                              f"(stall_timeout_s={self.stall_timeout_s:g})")

    def _run(self) -> None:
        index, t_last = 0, -float("inf")
        try:
            while not self._stopping.is_set():
                got = self._grab()
                if self._stopping.is_set():
                    break
                if got is None:
                    raise self._fault(f"end of stream after {index} frames")
                image, t = got
                if not (isinstance(image, np.ndarray) and image.dtype == np.uint8
                        and image.ndim == 3 and image.shape[2] == 3):
                    raise self._fault(f"grab gave {type(image).__name__} "
                                      f"{getattr(image, 'dtype', '')}{getattr(image, 'shape', '')}, "
                                      "not a uint8 (H, W, 3) image")
                if self.resolution is not None and image.shape[:2] != self.resolution:
                    raise self._fault(f"delivers {image.shape[0]}x{image.shape[1]} frames, "
                                      f"asked {self.resolution[0]}x{self.resolution[1]} (height x width)")
                # Always copy: drivers recycle their buffers (librealsense, cv2's retrieve), and a
                # read-only copy is what makes a Frame immutable for every reader.
                image = np.array(image, order="C", copy=True)
                image.flags.writeable = False
                # Stamps never go back: a source that changes clocks mid-stream (RealSense moves from
                # arrival stamps to the device's global time a few frames in) can step back by a
                # frame or two; readers (nearest, recorders) rely on the order.
                t_last = max(float(t), t_last)
                frame = Frame(image, t_last, index)
                with self._cond:
                    self._ring.append(frame)
                    self._frames += 1
                    self._cond.notify_all()
                index += 1
        except Exception as e:
            fault = self._named(e) if isinstance(e, CameraFault) else \
                self._fault(f"grab failed: {type(e).__name__}: {e}")
            with self._cond:
                self._error = str(fault)
                self._errors += 1
                self._cond.notify_all()
        finally:
            try:
                self._close()
            except Exception as e:   # nothing left to protect: report and go
                log.warning("camera %r: close failed: %s: %s", self.name, type(e).__name__, e)


_SOURCES = ("opencv:/dev/videoN", "opencv:N (a device index)", "opencv:path/to/video.mp4",
            "realsense:<serial>", "realsense: (the first device)", "sim:<camera>")


def open_camera(source: str, name: str, **options) -> Camera:
    """A camera (not started) for a source string; options go to its constructor (fps=, resolution=,
    ring=, stall_timeout_s=, and the source's own, e.g. loop= for a video file, address= for sim).

    Every source class is called as Cls(name, <what follows the colon>, **options):
      "opencv:/dev/video0", "opencv:2"   -> OpenCVCamera(name, "/dev/video0" | 2, ...)    (V4L2)
      "opencv:path/to/file.mp4"          -> OpenCVCamera(name, "path/to/file.mp4", ...)   (paced at fps)
      "realsense:<serial>", "realsense:" -> RealSenseCamera(name, "<serial>" | None, ...)
      "sim:<camera>"                     -> dpag_engine.cameras.sim.SimCamera(name, "<camera>", ...)
    """
    kind, sep, rest = source.partition(":") if isinstance(source, str) else ("", "", "")
    if sep and kind == "opencv" and rest.strip():
        from .opencv import OpenCVCamera
        return OpenCVCamera(name, int(rest) if rest.isdigit() else rest, **options)
    if sep and kind == "realsense" and re.fullmatch(r"[A-Za-z0-9_-]*", rest):
        from .realsense import RealSenseCamera
        return RealSenseCamera(name, rest or None, **options)
    if sep and kind == "sim" and re.fullmatch(r"\S+", rest):
        from .sim import SimCamera   # the emulator's client; imported only when asked for
        return SimCamera(name, rest, **options)
    raise ValueError(f"camera {name!r}: unknown source {source!r}; accepted: " + ", ".join(_SOURCES))
