"""The emulator's cameras: the cell rendered from the arm's state (dpag_engine/render.py), streamed
over TCP with capture timestamps, with fault injection (a frozen camera, late frames).

    server = CameraServer(state, port=SIM_CAMERA_PORT).start()   # state() -> (q (6,), gripper width m)
    server.set_scene(Scene().with_goal(goal)); server.freeze("wrist", 1.0); server.set_delay("scene", 0.08)
    server.stop()

The client side and the wire format (one JSON request line per request, then binary frames after a
subscribe) are in dpag_engine/cameras/sim.py (SimCamera, SimScene, FRAME_HEADER), which this module
imports: serving code never imports the emulator.

One render thread ticks at `fps`. A tick with no subscriber costs nothing (no state read, no
render). Otherwise it reads the state once (q and gripper width, under the emulator's lock inside
`state`), stamps t_capture = time.monotonic() right after that read, renders each camera (at each
resolution) someone subscribed to once from that one state, so the scene and wrist frames of a
tick agree, and hands the frame to each subscriber's queue. Every connection has its own thread:
it answers request lines, and after a subscribe sends its queue's frames when they are due (at
t_capture + the camera's injected delay). The render thread never waits for a client: a queue
keeps the newest few frames (a client that reads slowly skips frames), and a client that takes
no bytes for SEND_TIMEOUT_S is dropped. A request line over MAX_LINE bytes drops its client; bad
JSON, an unknown op or camera, a bad scene get {"ok": false, "error": ...} and the connection
stays; an error in one connection never reaches another, nor the render thread.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import select
import socket
import threading
import time
from typing import Callable

import numpy as np

from ..cameras.sim import FRAME_HEADER, FRAME_MAGIC, MAX_LINE, SIM_CAMERA_PORT
from ..render import DEFAULT_SCENE, SCENE_CAMERA, WRIST_CAMERA, CameraModel, Scene, render
from .listener import Listener

__all__ = ["CameraServer", "SIM_CAMERA_PORT", "MAX_CLIENTS", "SEND_TIMEOUT_S"]

log = logging.getLogger(__name__)

MAX_CLIENTS = 16                # open connections; more are closed at once
SEND_TIMEOUT_S = 1.0            # a subscriber that takes no bytes for this long is dropped
QUEUE_FRAMES = 2                # frames a subscriber may lag behind (older ones are skipped), + the delay's
MAX_PIXELS = 480 * 640          # largest resolution a subscribe may ask (rendering cost grows with it)
_LIMIT_M = 10.0                 # scene coordinates beyond this are refused


class _Subscriber:
    """One subscribed connection: its queue of (due time, frame bytes), filled by the render thread."""

    def __init__(self, sock, addr, camera: str, key, interval: float):
        self.sock, self.addr, self.camera, self.key = sock, addr, camera, key
        self.interval = interval            # at most one frame per this many seconds (0: every tick)
        self.cond = threading.Condition()
        self.queue: collections.deque = collections.deque()
        self.closed = False
        self.last_t = -math.inf             # t_capture of the last frame queued
        self.queued = self.sent = self.skipped = 0

    def wants(self, t: float, period: float) -> bool:
        # Half a tick of slack: a client asking 15 fps of a 30 fps server gets every other tick.
        if t - self.last_t >= self.interval - period / 2:
            self.last_t = t
            return True
        return False

    def push(self, due: float, payload: bytes, limit: int) -> None:
        with self.cond:
            if self.closed:
                return
            self.queue.append((due, payload))
            self.queued += 1
            while len(self.queue) > limit:
                self.queue.popleft()
                self.skipped += 1
            self.cond.notify()

    def take(self, timeout: float):
        """The head frame once it is due, or None after timeout (or once closed)."""
        with self.cond:
            deadline = time.monotonic() + timeout
            while not self.closed:
                now = time.monotonic()
                if self.queue and self.queue[0][0] <= now:
                    return self.queue.popleft()[1]
                if now >= deadline:
                    return None
                wake = deadline if not self.queue else min(deadline, self.queue[0][0])
                self.cond.wait(wake - now)
            return None

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.queue.clear()
            self.cond.notify_all()


class CameraServer(Listener):
    """The emulator's rendered cameras on one TCP port (see the module docstring).

    state: a callable returning (q (6,) rad, gripper width m), read consistently (the emulator
    reads both under its lock). cameras: name -> CameraModel (default scene + wrist at 96x96).
    scene: what the cell shows besides the arm (default: the reach task's obstacle, no goal).
    port=0 binds a free port (read .port after start()). The lifecycle (start, stop, port,
    drop_connections) and the accept loop are Listener's.
    """

    thread_prefix = "ursim-cameras-"
    max_clients = MAX_CLIENTS
    client_timeout_s = 0.1          # request reads wake up to notice stop(); _stream sets its own

    def __init__(self, state: Callable[[], tuple[np.ndarray, float]],
                 cameras: dict[str, CameraModel] | None = None, scene: Scene | None = None,
                 host: str = "127.0.0.1", port: int = 0, fps: float = 30.0):
        if not callable(state):
            raise TypeError("state must be a callable returning (q, gripper_width)")
        cameras = {"scene": SCENE_CAMERA, "wrist": WRIST_CAMERA} if cameras is None else dict(cameras)
        if not cameras or not all(isinstance(k, str) and k and isinstance(v, CameraModel) for k, v in cameras.items()):
            raise ValueError("cameras: a non-empty dict of name -> CameraModel")
        if not (isinstance(fps, (int, float)) and 0 < fps <= 240):
            raise ValueError(f"fps must be in (0, 240], got {fps!r}")
        scene = DEFAULT_SCENE if scene is None else self._check_scene(scene)
        super().__init__(host, port)
        self._state, self.cameras, self.fps, self._scene = state, cameras, float(fps), scene
        self._subs: list[_Subscriber] = []
        self._frozen_until = {name: 0.0 for name in cameras}
        self._delay = {name: 0.0 for name in cameras}
        self._models: dict = {}              # (camera, (h, w)) -> CameraModel at that resolution
        self._index: dict = collections.Counter()
        self._render_ms: dict = {}
        self._last_error: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def _on_stop(self) -> None:
        # Listener.stop() calls this before it shuts the connections down: a closed subscriber
        # wakes its sender now, not at its next take() timeout.
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            sub.close()

    # ------------------------------------------------------------------ side channel
    def set_scene(self, scene: Scene) -> None:
        """What the cameras show from the next tick on."""
        scene = self._check_scene(scene)
        with self._lock:
            self._scene = scene

    @property
    def scene(self) -> Scene:
        with self._lock:
            return self._scene

    def freeze(self, camera: str, seconds: float | None = None) -> None:
        """Fault injection: `camera` renders and sends nothing for `seconds` (None: until unfrozen;
        0 or less: unfreeze). Connections stay open; frames already queued still go out."""
        self._check_camera(camera)
        if seconds is not None and not (isinstance(seconds, (int, float)) and not math.isnan(seconds)):
            raise ValueError(f"freeze: seconds must be a number or None, got {seconds!r}")
        with self._lock:
            self._frozen_until[camera] = (math.inf if seconds is None else
                                          0.0 if seconds <= 0 else time.monotonic() + seconds)

    def unfreeze(self, camera: str) -> None:
        self.freeze(camera, 0.0)

    def set_delay(self, camera: str, seconds: float) -> None:
        """Fault injection: `camera`'s frames are sent `seconds` after their capture (their stamp
        stays the capture time; 0: no delay)."""
        self._check_camera(camera)
        if not (isinstance(seconds, (int, float)) and 0 <= seconds <= 10):
            raise ValueError(f"set_delay: seconds must be in [0, 10], got {seconds!r}")
        with self._lock:
            self._delay[camera] = float(seconds)

    def stats(self) -> dict:
        """Counters (JSON-safe): ticks, frames rendered and render ms per camera, clients, frames
        sent / skipped, drops, errors, the frozen cameras and delays."""
        now = time.monotonic()
        with self._lock:
            subs = list(self._subs)
            out = {"port": self._port, "fps": self.fps, "clients": len(self._clients),
                   "subscribers": dict(collections.Counter(s.camera for s in subs)),
                   "frames": {f"{c}@{h}x{w}": n for (c, (h, w)), n in self._index.items()},
                   "render_ms": {f"{c}@{h}x{w}": round(v, 3) for (c, (h, w)), v in self._render_ms.items()},
                   "frozen": sorted(c for c, t in self._frozen_until.items() if now < t),
                   "delay_s": dict(self._delay), "last_error": self._last_error, **self._counts}
        out["sent"] = out.get("sent", 0) + sum(s.sent for s in subs)
        out["skipped"] = out.get("skipped", 0) + sum(s.skipped for s in subs)
        return out

    # ------------------------------------------------------------------ render thread
    def _loop(self) -> None:
        """The render thread (Listener's background thread): one _tick every 1/fps s."""
        period = 1.0 / self.fps
        next_t = time.monotonic()
        while not self._stopping.is_set():
            next_t += period
            now = time.monotonic()
            if next_t < now - period:       # fell behind (a loaded machine): skip, never burst
                self._count("late_ticks")
                next_t = now
            if self._stopping.wait(max(0.0, next_t - now)):
                break
            try:
                self._tick()
            except Exception as e:          # one bad tick must not end the stream
                self._error(f"tick: {type(e).__name__}: {e}")

    def _tick(self) -> None:
        with self._lock:
            subs = [s for s in self._subs if not s.closed]
            if not subs:
                return
            now = time.monotonic()
            frozen = {c for c, until in self._frozen_until.items() if now < until}
            delays, scene = dict(self._delay), self._scene
        groups: dict = {}
        for s in subs:
            if s.camera not in frozen:
                groups.setdefault(s.key, []).append(s)
        if not groups:
            return
        q, width = self._state()
        t = time.monotonic()                # t_capture: the moment the state was read
        q = np.asarray(q, dtype=float).reshape(6)
        self._count("ticks")
        period = 1.0 / self.fps
        for key, members in groups.items():
            want = [s for s in members if s.wants(t, period)]
            if not want:
                continue
            camera, (h, w) = key
            t0 = time.perf_counter()
            img = render(self._models[key], q, float(width), scene)
            ms = (time.perf_counter() - t0) * 1e3
            with self._lock:
                index = self._index[key]
                self._index[key] += 1
                self._render_ms[key] = ms if key not in self._render_ms else 0.9 * self._render_ms[key] + 0.1 * ms
            payload = FRAME_HEADER.pack(FRAME_MAGIC, index, t, h, w, 3) + img.tobytes()
            delay = delays.get(camera, 0.0)
            limit = QUEUE_FRAMES + math.ceil(delay * self.fps)
            for s in want:
                s.push(t + delay, payload, limit)

    # ------------------------------------------------------------------ connections
    def _serve(self, sock, addr) -> None:
        """One connection: requests, then its frames once it subscribes."""
        sub = None
        try:
            sub = self._requests(sock, addr)
            if sub is not None:
                self._stream(sub)
        except OSError:
            raise                       # the peer went away: Listener closes it, nothing to report
        except Exception as e:          # an input nobody foresaw: it closes this connection only
            self._error(f"client {addr[0]}:{addr[1]}: {type(e).__name__}: {e}")
        finally:
            if sub is not None:
                with self._lock:        # its frame counts outlive it in stats()
                    if sub in self._subs:
                        self._subs.remove(sub)
                        self._counts["sent"] += sub.sent
                        self._counts["skipped"] += sub.skipped
                sub.close()

    def _requests(self, sock, addr) -> _Subscriber | None:
        """Answer request lines until a subscribe succeeds (its subscriber) or the client goes (None)."""
        buf = bytearray()
        while not self._stopping.is_set():
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                return None
            buf += chunk
            while True:
                i = buf.find(b"\n")
                if i < 0 or i > MAX_LINE:
                    if len(buf) > MAX_LINE:
                        self._count("dropped_long_line")
                        return None
                    break
                line = bytes(buf[:i])
                del buf[:i + 1]
                self._count("requests")
                reply, sub = self._handle(line, sock, addr)
                sock.sendall(json.dumps(reply).encode() + b"\n")
                if sub is not None:
                    with self._lock:
                        if self._stopping.is_set():
                            return None
                        self._subs.append(sub)
                    return sub
        return None

    def _stream(self, sub: _Subscriber) -> None:
        """Send the subscriber's frames when due; notice the peer closing. Input is ignored."""
        sock = sub.sock
        h, w = sub.key[1]
        # A small kernel buffer (a few frames): a client that stops reading is noticed within
        # SEND_TIMEOUT_S of its buffers filling, not after megabytes of stale frames.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(1 << 16, 2 * (FRAME_HEADER.size + h * w * 3)))
        sock.settimeout(SEND_TIMEOUT_S)
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while not self._stopping.is_set() and not sub.closed:
            payload = sub.take(0.1)
            if payload is not None:
                try:
                    sock.sendall(payload)
                except socket.timeout:
                    self._count("dropped_not_reading")
                    return
                sub.sent += 1
            if poller.poll(0):
                if not sock.recv(65536):
                    return              # the client closed; what it sends after subscribing is ignored

    def _handle(self, line: bytes, sock, addr):
        """(reply, subscriber or None) for one request line."""
        try:
            msg = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            return self._refuse("bad_json", f"bad JSON: {e}"), None
        if not isinstance(msg, dict):
            return self._refuse("bad_request", "a request is a JSON object with an \"op\""), None
        op = msg.get("op")
        if op == "info":
            return self._info(), None
        if op == "scene":
            try:
                scene = _scene_from(msg, self.scene)
            except (ValueError, TypeError) as e:
                return self._refuse("bad_request", f"scene: {e}"), None
            self.set_scene(scene)
            return {"ok": True, "scene": scene_dict(scene)}, None
        if op == "subscribe":
            try:
                camera, key, interval = self._subscription(msg)
            except ValueError as e:
                return self._refuse("bad_request", f"subscribe: {e}"), None
            (h, w) = key[1]
            reply = {"ok": True, "camera": camera, "height": h, "width": w,
                     "fps": 1.0 / interval if interval > 0 else self.fps}
            return reply, _Subscriber(sock, addr, camera, key, interval)
        return self._refuse("bad_request", f"unknown op {op!r}; ops: info, scene, subscribe"), None

    def _subscription(self, msg):
        extra = set(msg) - {"op", "camera", "fps", "resolution"}
        if extra:
            raise ValueError(f"unknown keys {sorted(extra)}")
        camera = msg.get("camera")
        if not isinstance(camera, str) or camera not in self.cameras:
            raise ValueError(f"unknown camera {camera!r}; cameras: {', '.join(self.cameras)}")
        model = self.cameras[camera]
        fps = msg.get("fps")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < math.inf):
            raise ValueError(f"fps must be a number > 0, got {fps!r}")
        interval = 0.0 if fps is None or fps >= self.fps else 1.0 / fps
        res = msg.get("resolution")
        if res is None:
            hw = (model.height, model.width)
        else:
            if (not isinstance(res, list) or len(res) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 8 for v in res)
                    or res[0] * res[1] > MAX_PIXELS):
                raise ValueError(f"resolution is [height, width], each >= 8, at most {MAX_PIXELS} pixels; got {res!r}")
            hw = (res[0], res[1])
        key = (camera, hw)
        with self._lock:
            if key not in self._models:
                self._models[key] = model if hw == (model.height, model.width) else model.resized(*hw)
        return camera, key, interval

    def _info(self) -> dict:
        return {"ok": True, "fps": self.fps,
                "cameras": {name: {"height": m.height, "width": m.width, "mount": m.mount,
                                   "fx": m.fx, "fy": m.fy, "cx": m.cx, "cy": m.cy}
                            for name, m in self.cameras.items()},
                "header": {"struct": FRAME_HEADER.format, "magic": FRAME_MAGIC.decode()},
                "scene": scene_dict(self.scene)}

    def _refuse(self, what: str, error: str) -> dict:
        self._count(what)
        return {"ok": False, "error": error}

    def _error(self, what: str) -> None:
        self._count("errors")
        if what != self._last_error:
            log.warning("ursim cameras: %s", what)
        self._last_error = what

    def _check_camera(self, camera) -> None:
        if camera not in self.cameras:
            raise ValueError(f"unknown camera {camera!r}; cameras: {', '.join(self.cameras)}")

    @staticmethod
    def _check_scene(scene) -> Scene:
        if not isinstance(scene, Scene):
            raise TypeError(f"scene must be a dpag_engine.render.Scene, got {type(scene).__name__}")
        return scene


# ---------------------------------------------------------------------- scene <-> JSON
def scene_dict(scene: Scene) -> dict:
    """The JSON form of a scene's goal, obstacle and block (as the "scene" op takes them)."""
    return {"goal": None if scene.goal is None else list(scene.goal.center),
            "obstacle": None if scene.obstacle is None else {"center": list(scene.obstacle.center),
                                                             "radius": scene.obstacle.radius},
            "block": None if scene.block is None else {"center": list(scene.block.center),
                                                       "size": list(scene.block.size), "yaw": scene.block.yaw}}


def _point(v, what: str) -> tuple[float, float, float]:
    if (not isinstance(v, list) or len(v) != 3
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                       and abs(x) <= _LIMIT_M for x in v)):
        raise ValueError(f"{what} is [x, y, z], finite, metres (|.| <= {_LIMIT_M:g}), got {v!r}")
    return tuple(float(x) for x in v)


def _length(v, what: str, default: float) -> float:
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1.0:
        raise ValueError(f"{what} must be in (0, 1] m, got {v!r}")
    return float(v)


def _scene_from(msg: dict, current: Scene) -> Scene:
    extra = set(msg) - {"op", "goal", "obstacle", "block", "reset"}
    if extra:
        raise ValueError(f"unknown keys {sorted(extra)}; keys: goal, obstacle, block, reset")
    reset = msg.get("reset", False)
    if not isinstance(reset, bool):
        raise ValueError(f"reset is true or false, got {reset!r}")
    scene = DEFAULT_SCENE if reset else current
    if "goal" in msg:
        g = msg["goal"]
        scene = scene.with_goal(None if g is None else _point(g, "goal"))
    if "obstacle" in msg:
        o = msg["obstacle"]
        if o is None or isinstance(o, list):
            scene = scene.with_obstacle(None if o is None else _point(o, "obstacle"))
        elif isinstance(o, dict):
            if set(o) - {"center", "radius"}:
                raise ValueError(f"obstacle keys are center, radius; got {sorted(o)}")
            scene = scene.with_obstacle(_point(o.get("center"), "obstacle center"),
                                        _length(o.get("radius"), "obstacle radius", 0.06))
        else:
            raise ValueError(f"obstacle is {{\"center\": [x, y, z], \"radius\": r}}, [x, y, z] or null, got {o!r}")
    if "block" in msg:
        b = msg["block"]
        if b is None:
            scene = scene.with_block(None)
        elif isinstance(b, dict):
            if set(b) - {"center", "size", "yaw"}:
                raise ValueError(f"block keys are center, size, yaw; got {sorted(b)}")
            size = b.get("size", [0.05, 0.05, 0.05])
            if not isinstance(size, list) or len(size) != 3:
                raise ValueError(f"block size is [sx, sy, sz], got {size!r}")
            size = tuple(_length(s, "block size", 0.05) for s in size)
            yaw = b.get("yaw", 0.0)
            if isinstance(yaw, bool) or not isinstance(yaw, (int, float)) or not math.isfinite(yaw):
                raise ValueError(f"block yaw must be a finite number (rad), got {yaw!r}")
            scene = scene.with_block(_point(b.get("center"), "block center"), size, float(yaw))
        else:
            raise ValueError(f"block is {{\"center\": [...], \"size\": [...], \"yaw\": rad}} or null, got {b!r}")
    return scene
