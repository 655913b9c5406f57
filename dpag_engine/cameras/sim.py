"""The emulator's rendered cameras as a camera source ("sim:<camera>"), and its scene setter.

    cam = SimCamera("scene", address=("127.0.0.1", SIM_CAMERA_PORT))     # or open_camera("sim:scene", ...)
    cam.start(); frame = cam.latest(); cam.stop()
    SimScene(("127.0.0.1", SIM_CAMERA_PORT)).set(goal=[-0.67, -0.1, 0.24])

The emulator (dpag_engine/ursim/cameras.py, CameraServer) renders its cameras from the arm's state
and streams them over TCP; this module is the client side and the one definition of the wire
format (the server imports it from here: serving code never imports dpag_engine.ursim).

Protocol: the client sends JSON request lines (at most MAX_LINE bytes each, newline-terminated);
each is answered by one JSON line, {"ok": true, ...} or {"ok": false, "error": "..."}:
  {"op": "info"}                       -> {"ok": true, "fps": 30.0, "cameras": {"scene": {"height":
                                          96, "width": 96, "mount": "base"}, ...}, "header": ...}
  {"op": "scene", "goal": [x, y, z] | null, "obstacle": {"center": [x, y, z], "radius": r} | [x, y, z]
   | null, "block": {"center": [...], "size": [...], "yaw": rad} | null, "reset": false}
                                       -> {"ok": true, "scene": {...}}   (absent keys: unchanged;
                                          null: removed; reset: start from the default scene)
  {"op": "subscribe", "camera": "scene", "fps": 30 (optional, at most the server's),
   "resolution": [h, w] (optional)}    -> {"ok": true, "camera": ..., "height", "width", "fps"}
After a successful subscribe the connection carries frames only, server to client: FRAME_HEADER
(magic, frame index u64, t_capture f64 on the emulator's time.monotonic() clock, height u16,
width u16, channels u8; little-endian) followed by height * width * channels bytes of RGB. The
index counts the camera's renders: a gap is a frame this client skipped. Lines the client sends
after subscribing are ignored. The emulator runs on the same machine, so t_capture is directly
comparable with this process's time.monotonic().
"""
from __future__ import annotations

import json
import math
import socket
import struct
import time

import numpy as np

from .base import Camera

__all__ = ["SimCamera", "SimScene", "SimSceneError", "FRAME_HEADER", "FRAME_MAGIC", "SIM_CAMERA_PORT",
           "MAX_LINE", "request"]

SIM_CAMERA_PORT = 30200                     # the emulator's camera stream (python -m dpag_engine.ursim)
FRAME_MAGIC = b"DPCF"
FRAME_HEADER = struct.Struct("<4sQdHHB")    # magic, index, t_capture, height, width, channels
MAX_LINE = 4096                             # a request line longer than this drops the client
_MAX_REPLY = 1 << 16                        # a reply line longer than this is a broken server
_KEEP = object()                            # SimScene.set: leave this part of the scene as it is


def _read_line(sock: socket.socket, buf: bytearray, limit: int = _MAX_REPLY) -> bytes:
    """One line from sock (buf holds bytes read past earlier lines). ConnectionError on EOF."""
    while True:
        i = buf.find(b"\n")
        if i >= 0:
            line = bytes(buf[:i])
            del buf[:i + 1]
            return line
        if len(buf) > limit:
            raise ConnectionError(f"reply line over {limit} bytes")
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by the emulator")
        buf += chunk


def request(address: tuple[str, int], message: dict, timeout_s: float = 2.0) -> dict:
    """Send one request line on a fresh connection and return the decoded reply (ok or not).
    OSError / ConnectionError / ValueError (undecodable reply) when there is no proper answer."""
    with socket.create_connection(address, timeout=timeout_s) as sock:
        sock.sendall(json.dumps(message).encode() + b"\n")
        reply = json.loads(_read_line(sock, bytearray()))
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ValueError(f"not a reply: {reply!r}")
    return reply


class SimSceneError(RuntimeError):
    """The emulator's camera server refused a scene, or could not be reached."""


class SimScene:
    """Sets what the emulator's cameras show (goal marker, obstacle, block) over its socket."""

    def __init__(self, address: tuple[str, int], timeout_s: float = 2.0):
        self.address = (str(address[0]), int(address[1]))
        self.timeout_s = float(timeout_s)

    def set(self, *, goal=_KEEP, obstacle=_KEEP, block=_KEEP, reset: bool = False) -> dict:
        """Change the scene: each part given replaces that part (None removes it), parts not given
        stay as they are (reset=True: from the default scene). Returns the scene now, as the server
        describes it. goal: [x, y, z]; obstacle: {"center": [x, y, z], "radius": r} or [x, y, z];
        block: {"center": [x, y, z], "size": [sx, sy, sz], "yaw": rad}. Base frame, metres."""
        msg = {"op": "scene"}
        for key, value in (("goal", goal), ("obstacle", obstacle), ("block", block)):
            if value is not _KEEP:
                msg[key] = _jsonable(value)
        if reset:
            msg["reset"] = True
        return self._ask(msg)["scene"]

    def info(self) -> dict:
        """The server's cameras (name -> height, width, mount) and fps."""
        return self._ask({"op": "info"})

    def _ask(self, msg: dict) -> dict:
        try:
            reply = request(self.address, msg, self.timeout_s)
        except (OSError, ValueError) as e:
            raise SimSceneError(f"emulator cameras at {self.address[0]}:{self.address[1]}: "
                                f"{type(e).__name__}: {e}") from e
        if not reply.get("ok"):
            raise SimSceneError(f"emulator cameras at {self.address[0]}:{self.address[1]} refused "
                                f"{msg.get('op')}: {reply.get('error')}")
        return reply


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


class SimCamera(Camera):
    """One of the emulator's rendered cameras, streamed over its socket.

    camera: the server's camera name ("scene", "wrist"; default: name). fps: asked of the server
    (it sends at most this often, at most its own rate). resolution: (height, width) the server
    renders this stream at (None: the camera's own, 96x96 for the built-in ones). A read that gets
    nothing for read_timeout_s (default max(2 s, 4 x stall_timeout_s)) ends the stream with a
    CameraFault; shorter gaps only show as a stall (stall_timeout_s) until frames come again.
    """

    def __init__(self, name: str, camera: str | None = None, *, address: tuple[str, int], fps: float = 30.0,
                 resolution: tuple[int, int] | None = None, ring: int = 16, stall_timeout_s: float = 0.5,
                 connect_timeout_s: float = 2.0, read_timeout_s: float | None = None):
        super().__init__(name, fps=fps, resolution=resolution, ring=ring, stall_timeout_s=stall_timeout_s)
        try:
            self.address = (str(address[0]), int(address[1]))
        except (TypeError, ValueError, IndexError):
            raise ValueError(f"camera {name!r}: address is (host, port), got {address!r}") from None
        self.camera = camera or name
        self.connect_timeout_s = float(connect_timeout_s)
        self.read_timeout_s = float(read_timeout_s) if read_timeout_s is not None else max(2.0, 4 * self.stall_timeout_s)
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._frame = bytearray()
        self.served: dict | None = None       # the server's subscribe reply (height, width, fps)

    def _where(self) -> str:
        return f"emulator camera {self.camera!r} at {self.address[0]}:{self.address[1]}"

    def _open(self) -> None:
        try:
            sock = socket.create_connection(self.address, timeout=self.connect_timeout_s)
        except OSError as e:
            raise self._fault(f"cannot connect to the {self._where()}: {e}") from e
        try:
            msg = {"op": "subscribe", "camera": self.camera, "fps": self.fps}
            if self.resolution is not None:
                msg["resolution"] = list(self.resolution)
            sock.sendall(json.dumps(msg).encode() + b"\n")
            self._buf = bytearray()
            reply = json.loads(_read_line(sock, self._buf))
        except (OSError, ValueError) as e:
            sock.close()
            raise self._fault(f"cannot subscribe to the {self._where()}: {type(e).__name__}: {e}") from e
        if not isinstance(reply, dict) or not reply.get("ok"):
            sock.close()
            why = reply.get("error") if isinstance(reply, dict) else repr(reply)
            raise self._fault(f"the {self._where()} refused: {why}")
        sock.settimeout(0.1)        # reads wake up to notice stop()
        self.served = reply
        self._sock = sock

    def _recv_exact(self, n: int) -> bool:
        """Fill self._frame with n bytes (self._buf first). False if stop() came meanwhile."""
        out = self._frame
        out.clear()
        take = min(n, len(self._buf))
        if take:
            out += self._buf[:take]
            del self._buf[:take]
        deadline = time.monotonic() + self.read_timeout_s
        while len(out) < n:
            if self._stopping.is_set():
                return False
            try:
                chunk = self._sock.recv(max(n - len(out), 65536))
            except socket.timeout:
                if time.monotonic() > deadline:
                    raise self._fault(f"no frame from the {self._where()} for {self.read_timeout_s:g} s")
                continue
            except OSError as e:
                raise self._fault(f"the {self._where()} failed: {e}") from e
            if not chunk:
                raise self._fault(f"the {self._where()} closed the stream")
            out += chunk
        if len(out) > n:            # read past this frame: keep the rest for the next one
            self._buf += out[n:]
            del out[n:]
        return True

    def _grab(self):
        if not self._recv_exact(FRAME_HEADER.size):
            return None
        magic, _index, t_capture, h, w, c = FRAME_HEADER.unpack(bytes(self._frame))
        if magic != FRAME_MAGIC or c != 3 or h == 0 or w == 0 or not math.isfinite(t_capture):
            raise self._fault(f"the {self._where()} sent a bad frame header "
                              f"(magic {magic!r}, {h}x{w}x{c}, t {t_capture})")
        if not self._recv_exact(h * w * c):
            return None
        # A copy: a view would pin self._frame (a bytearray cannot resize while exported).
        return np.frombuffer(bytes(self._frame), dtype=np.uint8).reshape(h, w, c), t_capture

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
