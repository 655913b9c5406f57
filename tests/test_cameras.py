"""dpag_engine.cameras: the Camera base (ring, stamps, faults, lifecycle), the OpenCV source on
video files written here, the RealSense source on a fake pyrealsense2 (tests/fakes), open_camera.

Timing is only asserted with generous bounds (the machine is shared); what must hold exactly
(which frame, which index, which stamp after conversion) is checked against what was produced.
"""
from __future__ import annotations

import importlib.util
import statistics
import sys
import threading
import time
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from dpag_engine.cameras import Camera, CameraFault, Frame, open_camera
from dpag_engine.cameras.opencv import OpenCVCamera
from dpag_engine.cameras.realsense import RealSenseCamera

FAKE_RS = Path(__file__).parent / "fakes" / "pyrealsense2.py"
rng = np.random.default_rng()


def camera_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("camera-")]


@pytest.fixture(autouse=True)
def no_leaked_threads():
    yield
    deadline = time.monotonic() + 2.0
    while camera_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not camera_threads(), f"capture threads left running: {camera_threads()}"


def wait_for(pred, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def fault_of(cam: Camera, timeout: float = 5.0) -> tuple[CameraFault, float]:
    """Poll latest() until it raises; the fault and when (monotonic) it was first seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            cam.latest()
        except CameraFault as e:
            return e, time.monotonic()
        time.sleep(0.005)
    raise AssertionError(f"{cam.name}: latest() never raised")


class Scripted(Camera):
    """Random frames paced at fps, stamped `delay` s before _grab returns them, written into ONE
    reused buffer (as drivers do: the base must copy). After `limit` frames: then="block" (a frozen
    device: _grab waits until stop), "raise" (a grab error) or "end" (end of stream)."""

    def __init__(self, name="scripted", *, fps=200.0, delay=0.0, limit=None, then="block",
                 shape=(24, 32), first_delay=0.0, **kw):
        super().__init__(name, fps=fps, resolution=shape, **kw)
        self.delay, self.limit, self.then, self.first_delay = delay, limit, then, first_delay
        self.produced: list[tuple[int, float, np.ndarray]] = []
        self.opened = self.closed = 0
        self._buf = np.empty((*shape, 3), np.uint8)

    def _open(self):
        self.opened += 1
        self._n, self._next = 0, time.monotonic() + self.first_delay

    def _grab(self):
        if self.limit is not None and self._n >= self.limit:
            if self.then == "raise":
                raise RuntimeError("sensor unplugged")
            if self.then == "end":
                return None
            self._wait_until(time.monotonic() + 3600)   # frozen until stop()
            return None
        if not self._wait_until(self._next):
            return None
        self._next += 1.0 / self.fps
        self._buf[...] = rng.integers(1, 256, self._buf.shape, dtype=np.uint8)
        t = time.monotonic() - self.delay
        self.produced.append((self._n, t, self._buf.copy()))
        self._n += 1
        return self._buf, t

    def _close(self):
        self.closed += 1


# -- the base: stamps, ring, faults ------------------------------------------------------------

def test_injected_delay_gives_the_frame_age():
    with Scripted("delayed", fps=100, delay=0.05) as cam:
        ages = []
        for _ in range(20):
            f = cam.latest()
            ages.append(time.monotonic() - f.t_capture)
            n, t, image = cam.produced[f.index]
            assert (n, t) == (f.index, f.t_capture) and np.array_equal(f.image, image)
            time.sleep(0.01)
        stats = cam.stats
    assert min(ages) >= 0.05                      # stamped 50 ms before it was returned
    assert statistics.median(ages) < 0.05 + 0.1   # plus at most ~a frame period and scheduling
    assert stats["frames"] >= 2 and stats["errors"] == 0 and stats["shape"] == [24, 32, 3]
    assert stats["fps_measured"] is not None and 20 < stats["fps_measured"] < 200


@pytest.mark.parametrize("ring", [16, 4])
def test_nearest_picks_the_ring_frame_closest_in_time(ring):
    n = 10
    with Scripted("ringcam", fps=100, delay=0.02, limit=n, ring=ring, stall_timeout_s=5.0) as cam:
        wait_for(lambda: cam.stats["frames"] == n, what="10 frames")
        produced = cam.produced
        kept = produced[-ring:]
        assert cam.latest().index == n - 1
        for k, (i, t, image) in enumerate(kept):
            f = cam.nearest(t)
            assert (f.index, f.t_capture) == (i, t) and np.array_equal(f.image, image)
            if k + 1 < len(kept):   # 30% of the way to the next frame is still this one, 70% the next
                dt = kept[k + 1][1] - t
                assert cam.nearest(t + 0.3 * dt).index == i
                assert cam.nearest(t + 0.7 * dt).index == i + 1
        assert cam.nearest(0.0).index == kept[0][0]            # older than the ring: its oldest
        assert cam.nearest(time.monotonic() + 10).index == n - 1


def test_frames_are_immutable_copies():
    with Scripted("immutable", fps=200) as cam:
        wait_for(lambda: cam.stats["frames"] >= 5, what="5 frames")
        f = cam.nearest(cam.produced[0][1])
        assert isinstance(f, Frame) and f.image.dtype == np.uint8 and f.image.flags.c_contiguous
        with pytest.raises(ValueError):
            f.image[0, 0, 0] = 0
        with pytest.raises(AttributeError):
            f.index = 7
        # the source reused its buffer for every later frame; this one kept its own content
        assert np.array_equal(f.image, cam.produced[f.index][2])


@pytest.mark.parametrize("then, words", [("raise", "sensor unplugged"), ("end", "end of stream"),
                                         ("block", "stalled")])
def test_a_camera_that_stops_delivering_faults_within_the_stall_timeout(then, words):
    stall = 0.3
    cam = Scripted("wrist_cam", fps=100, limit=5, then=then, stall_timeout_s=stall)
    cam.start()
    try:
        wait_for(lambda: len(cam.produced) == 5, what="5 frames")
        fault, seen = fault_of(cam)
        last_t = cam.produced[-1][1]
        assert "'wrist_cam'" in str(fault) and words in str(fault), str(fault)
        assert seen - last_t <= stall + 0.5          # generous: the poll and a loaded machine
        if then == "block":
            assert seen - last_t > stall             # a frozen stream is served until it is stale
        else:
            assert cam.stats["errors"] == 1 and words in cam.stats["error"]
            assert cam.closed == 1                   # the capture thread released the device
        with pytest.raises(CameraFault, match="wrist_cam"):
            cam.nearest(last_t)
    finally:
        cam.stop()
    assert cam.closed == 1


def test_a_bad_image_from_the_source_is_a_fault():
    class Gray(Scripted):
        def _grab(self):
            return np.full((24, 32), 7, np.uint8), time.monotonic()

    with pytest.raises(CameraFault, match=r"'gray'.*not a uint8 \(H, W, 3\)"):
        Gray("gray").start(timeout_s=2.0)


def test_start_waits_for_a_first_frame_and_faults_without_one():
    cam = Scripted("slow", limit=0, then="block")             # opens, never delivers
    t0 = time.monotonic()
    with pytest.raises(CameraFault, match=r"'slow': no frame within 0.2 s"):
        cam.start(timeout_s=0.2)
    assert time.monotonic() - t0 < 2.0 and cam.closed == 1 and not camera_threads()

    late = Scripted("late", first_delay=0.15)
    t0 = time.monotonic()
    late.start(timeout_s=3.0)                                  # waits the 150 ms for it
    assert time.monotonic() - t0 >= 0.15 and late.stats["frames"] >= 1
    late.stop()

    class Broken(Scripted):
        def _open(self):
            raise OSError("no such bus")

    with pytest.raises(CameraFault, match=r"'broken': cannot open: OSError: no such bus"):
        Broken("broken").start()


def test_stop_is_idempotent_joins_the_thread_and_allows_a_restart():
    cam = Scripted("lifecycle", fps=200)
    with pytest.raises(CameraFault, match="not started"):
        cam.latest()
    cam.start()
    assert [t.name for t in camera_threads()] == ["camera-lifecycle"]
    assert all(t.daemon for t in camera_threads())
    with pytest.raises(CameraFault, match="already started"):
        cam.start()
    wait_for(lambda: cam.stats["frames"] >= 3, what="3 frames")
    cam.stop()
    assert not camera_threads() and cam.closed == 1 and not cam.stats["running"]
    cam.stop()
    cam.stop()
    assert cam.closed == 1
    with pytest.raises(CameraFault, match="'lifecycle': stopped"):
        cam.latest()
    with cam:                                     # restarts, index from 0 again
        assert cam.latest().index < 3 and cam.opened == 2
    assert not camera_threads() and cam.closed == 2


def test_stats_are_json_safe():
    import json
    with Scripted("stats") as cam:
        wait_for(lambda: cam.stats["frames"] >= 3, what="3 frames")
        s = json.loads(json.dumps(cam.stats))
    assert s["name"] == "stats" and s["running"] and s["last_index"] >= 2 and s["error"] is None
    assert s["fps_asked"] == 200.0 and s["resolution_asked"] == [24, 32]


# -- OpenCV on video files ----------------------------------------------------------------------

H, W, BITS = 48, 64, 6   # frame number in BITS black/white 8x8 blocks on the top row


def make_frames(n: int) -> list[np.ndarray]:
    """RGB frames: random 8x8 colour blocks (survive a lossy codec), the frame number as a bit
    pattern on the top row, a pure red patch bottom-right; frame 0 entirely pure red."""
    frames = []
    for i in range(n):
        f = np.kron(rng.integers(1, 256, (H // 8, W // 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
        for b in range(BITS):
            f[:8, 8 * b:8 * b + 8] = 255 if i >> b & 1 else 10
        f[32:, 48:] = (255, 0, 0)
        if i == 0:
            f[...] = (255, 0, 0)
        frames.append(f)
    return frames


def decode_number(image: np.ndarray) -> int:
    return sum(1 << b for b in range(BITS) if image[2:6, 8 * b + 2:8 * b + 6].mean() > 128)


def write_video(path: Path, frames: list[np.ndarray], fourcc: str, fps: float = 30.0) -> Path:
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (W, H))
    if not out.isOpened():
        pytest.skip(f"this cv2 build cannot write {fourcc}")
    for f in frames:
        out.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))   # VideoWriter takes BGR
    out.release()
    return path


@pytest.mark.parametrize("fourcc, ext, lossless", [("FFV1", ".avi", True), ("mp4v", ".mp4", False)])
def test_opencv_video_file_delivers_rgb_frames_paced_at_fps(tmp_path, fourcc, ext, lossless):
    n, fps = 12, 40.0
    written = make_frames(n)
    path = write_video(tmp_path / f"clip{ext}", written, fourcc)
    cam = open_camera(f"opencv:{path}", "replay", fps=fps, resolution=(H, W), ring=16)
    assert isinstance(cam, OpenCVCamera) and cam.is_file
    got: dict[int, Frame] = {}
    cam.start()
    try:
        first = cam.latest()
        if first.index == 0:                          # almost always: start returns on frame 0
            assert (first.image == (255, 0, 0)).all() if lossless else first.image[..., 0].min() > 200
        while True:
            try:
                f = cam.latest()
            except CameraFault as e:
                fault = e
                break
            got[f.index] = f
            time.sleep(0.004)
    finally:
        cam.stop()
    assert "'replay'" in str(fault) and f"end of stream after {n} frames" in str(fault)
    assert len(got) >= 3
    frames = [got[i] for i in sorted(got)]
    for f in frames:
        assert f.image.shape == (H, W, 3) and f.image.dtype == np.uint8
        assert decode_number(f.image) == f.index                    # index == the file's frame number
        patch = f.image[34:46, 50:62].reshape(-1, 3)
        assert patch[:, 0].min() > 200 and patch[:, 1:].max() < 50  # pure red reads back as R: RGB order
        if lossless:
            assert np.array_equal(f.image, written[f.index])
        else:
            assert np.abs(f.image.astype(int) - written[f.index]).mean() < 12
    idx = [f.index for f in frames]
    ts = [f.t_capture for f in frames]
    assert idx == sorted(set(idx)) and all(b > a for a, b in zip(ts, ts[1:]))
    period = (ts[-1] - ts[0]) / (idx[-1] - idx[0])
    assert 0.9 / fps < period < 3.0 / fps                           # paced, not read flat out


def test_opencv_video_file_loops_when_asked(tmp_path):
    n = 6
    path = write_video(tmp_path / "loop.avi", make_frames(n), "FFV1")
    with OpenCVCamera("looped", str(path), fps=100, loop=True) as cam:
        f = wait_for(lambda: (lambda f: f if f.index >= 2 * n else None)(cam.latest()), what="a second lap")
        assert decode_number(f.image) == f.index % n
        assert cam.stats["errors"] == 0


def test_opencv_file_of_another_size_than_asked_is_a_fault(tmp_path):
    path = write_video(tmp_path / "small.avi", make_frames(3), "FFV1")
    with pytest.raises(CameraFault, match=r"'sized'.*gives 48x64 frames, asked 480x640"):
        open_camera(f"opencv:{path}", "sized", fps=30, resolution=(480, 640)).start()


@pytest.mark.parametrize("source, words", [("opencv:/dev/video99", "cannot open V4L2 device '/dev/video99'"),
                                           ("opencv:99", "cannot open V4L2 device 99"),
                                           ("opencv:no/such/clip.mp4", "no such video file")])
def test_opencv_device_that_cannot_open_is_a_fault(source, words):
    cam = open_camera(source, "missing", fps=30)
    with pytest.raises(CameraFault) as e:
        cam.start()
    assert "'missing'" in str(e.value) and words in str(e.value)
    assert not camera_threads()


# -- RealSense on the fake pyrealsense2 ---------------------------------------------------------

@pytest.fixture
def rs_fake(monkeypatch):
    spec = importlib.util.spec_from_file_location("pyrealsense2", FAKE_RS)
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)                     # a fresh module, fresh knobs, per test
    monkeypatch.setitem(sys.modules, "pyrealsense2", fake)
    return fake


def test_realsense_delivers_frames_stamped_on_the_monotonic_clock(rs_fake):
    rs_fake.latency_s = 0.04
    t0 = time.monotonic()
    cam = open_camera("realsense:123456789012", "wrist", fps=60, resolution=(H, W))
    assert isinstance(cam, RealSenseCamera)
    with cam:
        wait_for(lambda: cam.stats["frames"] >= 6, what="6 frames")
        f = cam.latest()
        t1 = time.monotonic()
    assert rs_fake.configs[-1].serial == "123456789012"
    assert rs_fake.configs[-1].streams == [(rs_fake.stream.color, W, H, rs_fake.format.rgb8, 60)]
    number, stamp_ms, domain, image = rs_fake.produced[f.index]
    assert number == f.index and domain is rs_fake.timestamp_domain.global_time
    assert np.array_equal(f.image, image) and f.image.shape == (H, W, 3)
    assert t0 <= f.t_capture <= t1
    wall_minus_mono = time.time() - time.monotonic()
    assert abs(f.t_capture - (stamp_ms / 1e3 - wall_minus_mono)) < 0.01    # the driver's stamp, converted
    assert t1 - f.t_capture >= 0.04 - 0.01                                 # so it shows the 40 ms latency
    assert rs_fake.stopped == 1


def test_realsense_hardware_clock_stamps_fall_back_to_arrival(rs_fake):
    rs_fake.hardware_clock_frames = 2             # as a real device does before global time locks
    t0 = time.monotonic()
    with open_camera("realsense:", "front", fps=100, resolution=(H, W)) as cam:
        wait_for(lambda: cam.stats["frames"] >= 5, what="5 frames")
        oldest = cam.nearest(0.0)
        t1 = time.monotonic()
    assert rs_fake.configs[-1].serial is None     # "realsense:": the first device, no enable_device
    assert oldest.index == 0 and rs_fake.produced[0][2] is rs_fake.timestamp_domain.hardware_clock
    assert t0 <= oldest.t_capture <= t1           # not the device clock's 12.5 s


def test_realsense_wait_timeout_is_a_camera_fault(rs_fake):
    rs_fake.stall_after = 3
    cam = RealSenseCamera("wrist", "123456789012", fps=60, timeout_ms=100, stall_timeout_s=2.0)
    with cam:
        fault, _ = fault_of(cam)
    assert "'wrist'" in str(fault) and "no frame within 100 ms" in str(fault)
    assert "Frame didn't arrive within 100" in str(fault)
    assert rs_fake.stopped == 1


def test_realsense_start_failures_are_camera_faults(rs_fake, monkeypatch):
    with pytest.raises(CameraFault, match=r"'wrist': cannot start RealSense 999.*Couldn't resolve requests"):
        open_camera("realsense:999", "wrist", fps=30).start()
    rs_fake.devices = []
    with pytest.raises(CameraFault, match=r"'wrist': cannot start the first RealSense.*No device connected"):
        open_camera("realsense:", "wrist", fps=30).start()
    monkeypatch.setitem(sys.modules, "pyrealsense2", None)    # not installed: import fails
    with pytest.raises(CameraFault, match=r"'wrist': pyrealsense2 is not installed \(pip install pyrealsense2\)"):
        open_camera("realsense:", "wrist", fps=30).start()
    assert rs_fake.stopped == 0 and not camera_threads()


# -- open_camera ------------------------------------------------------------------------------

@pytest.mark.parametrize("source, cls, attr, value", [
    ("opencv:/dev/video0", OpenCVCamera, "device", "/dev/video0"),
    ("opencv:2", OpenCVCamera, "device", 2),
    ("opencv:clips/run3.mp4", OpenCVCamera, "device", "clips/run3.mp4"),
    ("realsense:123456789012", RealSenseCamera, "serial", "123456789012"),
    ("realsense:", RealSenseCamera, "serial", None),
])
def test_open_camera_parses_every_form(source, cls, attr, value):
    cam = open_camera(source, "cam0", fps=15, resolution=(240, 320), stall_timeout_s=0.25)
    assert type(cam) is cls and getattr(cam, attr) == value
    assert (cam.name, cam.fps, cam.resolution, cam.stall_timeout_s) == ("cam0", 15.0, (240, 320), 0.25)
    if cls is OpenCVCamera:
        assert cam.is_file == source.endswith(".mp4")
        with pytest.raises(ValueError, match="fourcc is 4 characters"):
            open_camera(source, "cam0", fps=15, fourcc="MJPEG")


def test_open_camera_sim_imports_the_sim_client_lazily(monkeypatch):
    calls = []

    class SimCamera:   # stands in for dpag_engine.cameras.sim (the emulator's client, its own tests)
        def __init__(self, *args, **kw):
            calls.append((args, kw))

    monkeypatch.setitem(sys.modules, "dpag_engine.cameras.sim", types.SimpleNamespace(SimCamera=SimCamera))
    cam = open_camera("sim:wrist_rgb", "wrist", fps=10, address=("127.0.0.1", 5555))
    assert isinstance(cam, SimCamera)
    assert calls == [(("wrist", "wrist_rgb"), {"fps": 10, "address": ("127.0.0.1", 5555)})]


@pytest.mark.parametrize("source", ["", "opencv", "opencv:", "usb:0", "OpenCV:0", "realsense:12 34",
                                    "sim:", "/dev/video0", 3, None])
def test_open_camera_refuses_other_forms(source):
    with pytest.raises(ValueError, match=r"unknown source.*opencv:/dev/videoN.*realsense:<serial>.*sim:<camera>"):
        open_camera(source, "cam0", fps=30)
