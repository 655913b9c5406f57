"""The emulator's camera server (dpag_engine/ursim/cameras.py) and its client, the sim: camera source
(dpag_engine/cameras/sim.py): timing, stamps, injected faults, the scene over the socket, bad input."""
import json
import socket
import threading
import time

import numpy as np
import pytest

from dpag_engine.cameras import CameraFault, open_camera
from dpag_engine.cameras.sim import FRAME_HEADER, FRAME_MAGIC, MAX_LINE, SimCamera, SimScene, SimSceneError
from dpag_engine.envs.ur5_reach import ReachTask
from dpag_engine.render import SCENE_CAMERA, Scene, project, render
from dpag_engine.ursim.cameras import CameraServer

HOME = np.asarray(ReachTask().q_home)


class MovingArm:
    """A fake emulator state: joint 0 swings, the gripper opens and closes; counts the reads."""

    def __init__(self, moving=True):
        self.moving, self.reads, self.t0 = moving, 0, time.monotonic()

    def __call__(self):
        self.reads += 1
        if not self.moving:
            return HOME.copy(), 0.04
        s = np.sin(2 * np.pi * 0.5 * (time.monotonic() - self.t0))
        q = HOME.copy()
        q[0] += 0.1 * s
        return q, 0.04 + 0.04 * s


@pytest.fixture
def server():
    srv = CameraServer(MovingArm()).start()
    yield srv
    srv.stop()


def camera(srv, name="scene", **kw):
    return SimCamera(name, address=("127.0.0.1", srv.port), **kw)


def wait_for(pred, timeout=2.0, step=0.005):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if pred():
            return True
        time.sleep(step)
    return False


def goal_centroid(img):
    r, g, b = (img[..., i].astype(int) for i in range(3))
    rows, cols = np.nonzero((g >= 50) & (g > 1.5 * r) & (g > 1.5 * b))
    return np.array([cols.mean(), rows.mean()])


def raw(srv):
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=2.0)
    return s, s.makefile("rb")


def ask(sock, f, msg):
    sock.sendall((msg if isinstance(msg, bytes) else json.dumps(msg).encode()) + b"\n")
    return json.loads(f.readline())


def test_frames_arrive_at_fps_with_capture_stamps(server):
    t_request = time.monotonic()
    with camera(server) as cam, camera(server, "wrist") as wrist:
        frames, wframes = {}, {}
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:
            f = cam.latest()
            assert t_request - 0.1 < f.t_capture <= time.monotonic()
            frames[f.index] = f
            wf = wrist.latest()
            wframes[wf.index] = wf
            time.sleep(0.004)
        idx = sorted(frames)
        assert 24 <= len(idx) <= 36, f"{len(idx)} frames in 1 s at 30 fps"
        assert all(b > a for a, b in zip(idx, idx[1:]))
        stamps = [frames[i].t_capture for i in idx]
        assert all(b > a for a, b in zip(stamps, stamps[1:]))
        assert 0.02 < np.median(np.diff(stamps)) < 0.05
        assert 25 <= cam.stats["fps_measured"] <= 35
        img = frames[idx[-1]].image
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8
        # The arm moves: frames differ. The wrist frames come from the same ticks (one state read
        # renders both cameras), so they carry the same capture stamps.
        assert not np.array_equal(frames[idx[0]].image, img)
        common = set(stamps) & {f.t_capture for f in wframes.values()}
        assert len(common) >= 0.8 * min(len(frames), len(wframes))


def test_injected_delay_shows_as_frame_age(server):
    with camera(server) as cam:
        server.set_delay("scene", 0.08)
        time.sleep(0.3)
        ages = []
        for _ in range(40):
            ages.append(time.monotonic() - cam.latest().t_capture)
            time.sleep(0.01)
        assert min(ages) >= 0.075, ages
        assert 0.08 <= np.median(ages) <= 0.16, np.median(ages)
        server.set_delay("scene", 0.0)
        time.sleep(0.2)
        assert time.monotonic() - cam.latest().t_capture < 0.06


def test_freeze_faults_within_the_stall_timeout_and_recovers(server):
    with camera(server, stall_timeout_s=0.3) as cam:
        cam.latest()
        server.freeze("scene", None)
        t0 = time.monotonic()
        while True:
            try:
                cam.latest()
            except CameraFault as e:
                assert "stalled" in str(e) and "'scene'" in str(e)
                break
            assert time.monotonic() - t0 < 0.3 + 0.25, "no CameraFault after the freeze"
            time.sleep(0.005)
        assert server.stats()["frozen"] == ["scene"]
        server.unfreeze("scene")
        assert wait_for(lambda: time.monotonic() - cam.stats["last_t_capture"] < 0.1, 1.0)
        cam.latest()
        # A timed freeze ends by itself.
        server.freeze("scene", 0.2)
        time.sleep(0.1)
        assert server.stats()["frozen"] == ["scene"]
        assert wait_for(lambda: server.stats()["frozen"] == [], 0.5)


def test_server_stopped_is_a_camera_fault():
    srv = CameraServer(MovingArm()).start()
    cam = camera(srv)
    cam.start()
    try:
        cam.latest()
        srv.stop()
        assert wait_for(lambda: cam.stats["error"] is not None, 1.0)
        with pytest.raises(CameraFault, match="closed the stream"):
            cam.latest()
        # Nobody listens any more: opening is a CameraFault too.
        with pytest.raises(CameraFault, match="cannot connect"):
            camera(srv).start()
    finally:
        cam.stop()
        srv.stop()


def test_scene_set_over_the_socket_changes_the_goal_pixels():
    srv = CameraServer(MovingArm(moving=False)).start()
    try:
        scene = SimScene(("127.0.0.1", srv.port))
        with camera(srv) as cam:
            for goal in ([-0.70, -0.189, 0.24], [-0.64, -0.029, 0.24]):
                t_set = time.monotonic()
                reply = scene.set(goal=goal)
                assert reply["goal"] == goal and reply["obstacle"]["radius"] == 0.06
                assert wait_for(lambda: cam.latest().t_capture > t_set + 0.01, 1.0)
                img = cam.latest().image
                np.testing.assert_allclose(goal_centroid(img), project(SCENE_CAMERA, HOME, np.array([goal]))[0], atol=1.5)
                # The stream is the renderer's output, byte for byte.
                assert img.tobytes() == render(SCENE_CAMERA, HOME, 0.04, Scene().with_goal(goal)).tobytes()
            # Parts not given stay; None removes; reset goes back to the default scene.
            assert scene.set(block={"center": [-0.3, -0.3, 0.025], "yaw": 0.3})["goal"] == [-0.64, -0.029, 0.24]
            assert scene.set(goal=None, obstacle=None)["obstacle"] is None
            assert srv.scene.goal is None and srv.scene.block is not None
            assert scene.set(reset=True) == {"goal": None, "obstacle": {"center": [-0.52, -0.109, 0.24], "radius": 0.06},
                                             "block": None}
            assert scene.set(obstacle=[-0.5, -0.2, 0.2])["obstacle"] == {"center": [-0.5, -0.2, 0.2], "radius": 0.06}
            for bad in ({"goal": [1, 2]}, {"goal": [0, 0, float("nan")]}, {"obstacle": {"center": [0, 0, 0], "radius": -1}},
                        {"block": {"centre": [0, 0, 0]}}):
                with pytest.raises(SimSceneError, match="refused scene"):
                    scene.set(**bad)
        info = scene.info()
        assert info["cameras"]["scene"]["height"] == 96 and info["fps"] == 30.0
        assert info["header"] == {"struct": FRAME_HEADER.format, "magic": FRAME_MAGIC.decode()}
    finally:
        srv.stop()
    with pytest.raises(SimSceneError, match="emulator cameras at"):
        SimScene(("127.0.0.1", srv.port), timeout_s=0.5).set(goal=None)


def test_bad_requests_get_errors_and_never_touch_other_clients(server):
    with camera(server) as cam:
        s, f = raw(server)
        with s:
            assert ask(s, f, b"{not json")["error"].startswith("bad JSON")
            assert "JSON object" in ask(s, f, [1, 2])["error"]
            assert "unknown op" in ask(s, f, {"op": "dance"})["error"]
            r = ask(s, f, {"op": "subscribe", "camera": "ceiling"})
            assert r["ok"] is False and "unknown camera 'ceiling'" in r["error"] and "scene, wrist" in r["error"]
            assert "resolution" in ask(s, f, {"op": "subscribe", "camera": "scene", "resolution": [1, 2]})["error"]
            assert ask(s, f, {"op": "info"})["ok"] is True          # the connection stayed
            # A line over MAX_LINE drops this client only.
            s.sendall(b"x" * (MAX_LINE + 100))
            assert f.read() == b""
        assert server.stats()["dropped_long_line"] == 1
        with pytest.raises(CameraFault, match="unknown camera 'ceiling'"):
            SimCamera("ceiling", address=("127.0.0.1", server.port)).start()
        n = cam.latest().index
        assert wait_for(lambda: cam.latest().index > n + 2, 1.0)


def test_raw_stream_format_and_a_client_that_stops_reading_is_dropped(server):
    with camera(server) as cam:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", server.port))
        with s:
            f = s.makefile("rb")
            assert ask(s, f, {"op": "subscribe", "camera": "wrist"}) == {"ok": True, "camera": "wrist", "height": 96,
                                                                         "width": 96, "fps": 30.0}
            magic, index, t, h, w, c = FRAME_HEADER.unpack(f.read(FRAME_HEADER.size))
            assert (magic, h, w, c) == (FRAME_MAGIC, 96, 96, 3) and t <= time.monotonic()
            assert len(f.read(h * w * c)) == h * w * c
            # Now it stops reading: dropped once its buffers fill and SEND_TIMEOUT_S passes.
            assert wait_for(lambda: server.stats().get("dropped_not_reading", 0) == 1, 5.0)
        n = cam.latest().index
        assert wait_for(lambda: cam.latest().index > n + 2, 1.0)


def test_nothing_rendered_without_subscribers_and_asked_fps_and_resolution():
    state = MovingArm()
    srv = CameraServer(state).start()
    try:
        time.sleep(0.3)
        assert state.reads == 0 and srv.stats()["frames"] == {}
        cam = open_camera("sim:scene", "front", address=("127.0.0.1", srv.port), fps=10.0, resolution=(48, 64))
        with cam:
            assert cam.camera == "scene" and cam.latest().image.shape == (48, 64, 3)
            time.sleep(1.0)
            assert 8 <= cam.stats["fps_measured"] <= 12
            assert srv.stats()["subscribers"] == {"scene": 1}
        assert wait_for(lambda: srv.stats()["subscribers"] == {}, 1.0)
        reads = state.reads
        time.sleep(0.2)
        assert state.reads == reads
    finally:
        srv.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("ursim-cameras")]


def test_server_arguments_are_checked():
    with pytest.raises(TypeError):
        CameraServer(None)
    with pytest.raises(ValueError):
        CameraServer(MovingArm(), fps=0)
    srv = CameraServer(MovingArm())
    with pytest.raises(ValueError, match="unknown camera"):
        srv.freeze("ceiling", 1.0)
    with pytest.raises(ValueError):
        srv.set_delay("scene", -1.0)
    with pytest.raises(TypeError):
        srv.set_scene({"goal": None})
    srv.stop()      # never started: a no-op
