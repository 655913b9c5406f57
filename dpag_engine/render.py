"""A CPU renderer of the emulated UR5 cell: analytic ray casting of a few primitives, in numpy.

    img = render(SCENE_CAMERA, q, gripper_width, Scene().with_goal(goal))   # uint8 (96, 96, 3) RGB
    uv = project(SCENE_CAMERA, q, points)                                   # (..., 2) [col, row]

What is drawn (base frame, metres, z = 0 the table top):
  * the table: the plane z = 0 inside Scene.table_extent, a faint checker (Scene.checker metres a
    square) so motion over it is visible; beyond it the background colour;
  * the arm: a capsule per link between the DH frame origins of kinematics.frame_origins (base
    column, upper arm, forearm, the three wrist links) and a short capsule per joint housing along
    the joint's axis, UR-style (grey links, blue joints);
  * the gripper at the flange: a palm box and two finger boxes whose inner faces are the gripper
    width apart (0..0.085 m) along the flange's x axis;
  * the scene: an obstacle sphere, a goal marker sphere (GOAL_COLOR, radius GOAL_RADIUS) and a
    yaw-rotated block, each optional (None).
Lambert shading with one fixed directional light plus ambient; no shadows, no anti-aliasing. An
image is a deterministic function of (camera, q, gripper_width, scene): same inputs, same bytes.

Cameras are pinhole (CameraModel): a pose fixed in the base frame (SCENE_CAMERA) or fixed to the
flange (WRIST_CAMERA). Pixel (row r, col c) looks through image coordinates (u, v) = (c, r), so
project() returns coordinates directly comparable to pixel indices (the centre of pixel [r, c] is
(c, r)). Camera axes are OpenCV's: x right, y down, z forward.

Cost: the pixel rays of each camera are computed once (and, for a fixed camera, the whole table
background); each primitive is intersected only with the pixels inside the screen rectangle of its
bounding sphere, and shading is deferred to the pixels each primitive finally owns. About 1-2 ms a
96x96 frame on one core (see tests/test_render.py). numpy only; imports only dpag_engine.kinematics.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np

from .kinematics import frame_transforms

__all__ = ["Sphere", "Block", "Scene", "CameraModel", "SCENE_CAMERA", "WRIST_CAMERA", "render",
           "project", "camera_pose", "GOAL_COLOR", "GOAL_RADIUS", "OBSTACLE_COLOR", "GRIPPER_MAX",
           "DEFAULT_SCENE"]

GOAL_RADIUS = 0.03                  # 6 cm: about 4 pixels across in a 64x64 scene view
GOAL_COLOR = (40, 200, 70)          # the only green thing in the cell
OBSTACLE_COLOR = (205, 55, 45)
BLOCK_COLOR = (235, 160, 30)
GRIPPER_MAX = 0.085                 # finger gap range 0..GRIPPER_MAX metres (a Robotiq 2F-85)

_NEAR = 1e-3                        # rays hit nothing closer than this (metres)
_AMBIENT, _DIFFUSE = 0.38, 0.62


def _vec(v, n=3) -> tuple[float, ...]:
    a = np.asarray(v, dtype=float).reshape(-1)
    if a.shape != (n,) or not np.all(np.isfinite(a)):
        raise ValueError(f"expected {n} finite numbers, got {v!r}")
    return tuple(float(x) for x in a)


def _color(c) -> tuple[int, int, int]:
    a = np.asarray(c).reshape(-1)
    if a.shape != (3,) or not np.all((a >= 0) & (a <= 255)):
        raise ValueError(f"a colour is 3 values in 0..255, got {c!r}")
    return tuple(int(x) for x in a)


# ----------------------------------------------------------------------------------------------
# Scene
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sphere:
    center: tuple[float, float, float]
    radius: float
    color: tuple[int, int, int]

    def __post_init__(self):
        object.__setattr__(self, "center", _vec(self.center))
        object.__setattr__(self, "color", _color(self.color))
        if not (math.isfinite(self.radius) and self.radius > 0):
            raise ValueError(f"sphere radius must be > 0, got {self.radius!r}")
        object.__setattr__(self, "radius", float(self.radius))


@dataclass(frozen=True)
class Block:
    """A box of `size` (x, y, z extents, metres) centred at `center`, turned `yaw` rad about z."""
    center: tuple[float, float, float]
    size: tuple[float, float, float] = (0.05, 0.05, 0.05)
    yaw: float = 0.0
    color: tuple[int, int, int] = BLOCK_COLOR

    def __post_init__(self):
        object.__setattr__(self, "center", _vec(self.center))
        object.__setattr__(self, "size", _vec(self.size))
        object.__setattr__(self, "color", _color(self.color))
        if not all(s > 0 for s in self.size):
            raise ValueError(f"block size must be > 0, got {self.size!r}")
        if not math.isfinite(self.yaw):
            raise ValueError(f"block yaw must be finite, got {self.yaw!r}")
        object.__setattr__(self, "yaw", float(self.yaw))


@dataclass(frozen=True)
class Scene:
    """What is in the cell besides the arm. Frozen: change it with the with_* methods."""
    obstacle: Sphere | None = Sphere((-0.52, -0.109, 0.24), 0.06, OBSTACLE_COLOR)
    goal: Sphere | None = None
    block: Block | None = None
    table_color: tuple[int, int, int] = (186, 178, 164)
    table_color2: tuple[int, int, int] = (166, 158, 146)    # the other checker square
    checker: float = 0.08                                   # square size, metres (0: plain table)
    table_extent: tuple[float, float, float, float] = (-1.0, 0.45, -0.75, 0.75)  # x0, x1, y0, y1
    background: tuple[int, int, int] = (58, 62, 70)
    arm_color: tuple[int, int, int] = (200, 203, 208)
    joint_color: tuple[int, int, int] = (70, 120, 190)
    gripper_color: tuple[int, int, int] = (96, 96, 102)
    light: tuple[float, float, float] = (0.35, 0.45, 1.0)   # towards the light (normalised on use)

    def __post_init__(self):
        for f in ("table_color", "table_color2", "background", "arm_color", "joint_color", "gripper_color"):
            object.__setattr__(self, f, _color(getattr(self, f)))
        object.__setattr__(self, "table_extent", _vec(self.table_extent, 4))
        object.__setattr__(self, "light", _vec(self.light))
        if np.linalg.norm(self.light) == 0:
            raise ValueError("light direction must be non-zero")
        if not (math.isfinite(self.checker) and self.checker >= 0):
            raise ValueError(f"checker must be >= 0, got {self.checker!r}")
        for f, kind in (("obstacle", Sphere), ("goal", Sphere), ("block", Block)):
            v = getattr(self, f)
            if v is not None and not isinstance(v, kind):
                raise TypeError(f"Scene.{f} must be a {kind.__name__} or None, got {type(v).__name__}")

    def with_goal(self, position, radius: float = GOAL_RADIUS) -> "Scene":
        """The goal marker at `position` (None: no marker)."""
        return replace(self, goal=None if position is None else Sphere(position, radius, GOAL_COLOR))

    def with_obstacle(self, center, radius: float = 0.06) -> "Scene":
        """The obstacle sphere at `center` (None: no obstacle)."""
        return replace(self, obstacle=None if center is None else Sphere(center, radius, OBSTACLE_COLOR))

    def with_block(self, center, size=(0.05, 0.05, 0.05), yaw: float = 0.0) -> "Scene":
        """A block at `center` (None: no block)."""
        return replace(self, block=None if center is None else Block(center, size, yaw))


DEFAULT_SCENE = Scene()


# ----------------------------------------------------------------------------------------------
# Cameras
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CameraModel:
    """A pinhole camera: intrinsics for (height, width) and a pose in its mount's frame.

    rotation: 3x3 row-major, whose columns are the camera's x (right), y (down), z (forward) axes
    in the mount frame; position: the optical centre in the mount frame. mount: "base" (a fixed
    camera, pose in the base frame) or "flange" (pose in the flange frame, moves with the arm).
    """
    height: int
    width: int
    fx: float
    fy: float
    cx: float
    cy: float
    rotation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    position: tuple[float, float, float] = (0.0, 0.0, 0.0)
    mount: str = "base"

    def __post_init__(self):
        if not (int(self.height) > 0 and int(self.width) > 0):
            raise ValueError(f"camera size must be > 0, got {self.height}x{self.width}")
        object.__setattr__(self, "height", int(self.height))
        object.__setattr__(self, "width", int(self.width))
        for f in ("fx", "fy", "cx", "cy"):
            object.__setattr__(self, f, float(getattr(self, f)))
        if not (self.fx > 0 and self.fy > 0):
            raise ValueError("fx, fy must be > 0")
        r = np.asarray(self.rotation, dtype=float).reshape(3, 3)
        if not np.allclose(r.T @ r, np.eye(3), atol=1e-6) or np.linalg.det(r) < 0:
            raise ValueError("rotation must be a proper rotation matrix")
        object.__setattr__(self, "rotation", tuple(float(x) for x in r.reshape(-1)))
        object.__setattr__(self, "position", _vec(self.position))
        if self.mount not in ("base", "flange"):
            raise ValueError(f"mount is 'base' or 'flange', got {self.mount!r}")

    @classmethod
    def from_fov(cls, fov_deg: float, height: int = 96, width: int = 96, **pose) -> "CameraModel":
        """Square pixels, horizontal field of view fov_deg, principal point at the image centre."""
        f = (width / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
        return cls(height, width, f, f, (width - 1) / 2.0, (height - 1) / 2.0, **pose)

    @classmethod
    def look_at(cls, eye, target, up=(0.0, 0.0, 1.0), fov_deg: float = 60.0, height: int = 96,
                width: int = 96, mount: str = "base") -> "CameraModel":
        """A camera at `eye` looking at `target` (both in the mount frame), `up` pointing up in the image."""
        return cls.from_fov(fov_deg, height, width, rotation=_look_rotation(eye, target, up),
                            position=_vec(eye), mount=mount)

    def resized(self, height: int, width: int) -> "CameraModel":
        """The same camera at another resolution (intrinsics scaled, same field of view)."""
        sx, sy = width / self.width, height / self.height
        return replace(self, height=height, width=width, fx=self.fx * sx, fy=self.fy * sy,
                       cx=(self.cx + 0.5) * sx - 0.5, cy=(self.cy + 0.5) * sy - 0.5)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)


def _look_rotation(eye, target, up) -> tuple[float, ...]:
    z = np.asarray(target, float) - np.asarray(eye, float)
    z /= np.linalg.norm(z)
    x = np.cross(z, np.asarray(up, float))
    if np.linalg.norm(x) < 1e-9:
        raise ValueError("look_at: up is parallel to the viewing direction")
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    return tuple(float(v) for v in np.stack([x, y, z], axis=1).reshape(-1))


# The scene camera: in front of the arm and to its right (the -x, -y corner of the workspace), 0.6 m
# above the table, looking down about 37 deg towards the base over the goal box and the obstacle.
# The arm from the elbow on, the start pose (TCP and gripper), the obstacle and the whole goal box are
# in view at every goal; the goal box's corners are >= 10 px apart at 96x96.
SCENE_CAMERA = CameraModel.look_at(eye=(-0.7, -0.4, 0.6), target=(-0.4, -0.05, 0.25), fov_deg=68.0)


def _wrist_camera(fov_deg: float = 75.0, offset=(0.0, 0.08, -0.01), tilt_deg: float = 15.0) -> CameraModel:
    # On the flange, 8 cm off the tool axis along flange +y (beside the palm; at the reach task's
    # tool orientation that is the side towards the base, away from the obstacle and the goals),
    # 1 cm behind the flange, looking along the tool axis (flange z) tilted 15 deg towards it: the
    # palm and the fingers sit at the image bottom, the table below and ahead of the tool (flange -y)
    # fills the rest. Image "down" is flange -y, image "right" flange -x.
    t = math.radians(tilt_deg)
    x = np.array([-1.0, 0.0, 0.0])
    y = np.array([0.0, -math.cos(t), -math.sin(t)])
    z = np.array([0.0, -math.sin(t), math.cos(t)])
    rot = tuple(float(v) for v in np.stack([x, y, z], axis=1).reshape(-1))
    return CameraModel.from_fov(fov_deg, 96, 96, rotation=rot, position=offset, mount="flange")


WRIST_CAMERA = _wrist_camera()


def camera_pose(camera: CameraModel, q=None) -> tuple[np.ndarray, np.ndarray]:
    """(R, o): the camera's axes (columns) and optical centre in the base frame (q for a flange camera)."""
    r = np.asarray(camera.rotation, dtype=float).reshape(3, 3)
    o = np.asarray(camera.position, dtype=float)
    if camera.mount == "flange":
        if q is None:
            raise ValueError("a flange camera needs q")
        t = frame_transforms(np.asarray(q, dtype=float).reshape(6))[6]
        return t[:3, :3] @ r, t[:3, :3] @ o + t[:3, 3]
    return r, o


def project(camera: CameraModel, q, points) -> np.ndarray:
    """Base-frame points (..., 3) -> image coordinates (..., 2) as [col, row] (u, v); points at or
    behind the camera plane are NaN. Comparable to pixel indices: pixel [r, c] is centred at (c, r)."""
    r, o = camera_pose(camera, q)
    p = (np.asarray(points, dtype=float) - o) @ r     # camera-frame coordinates
    z = p[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = camera.fx * p[..., 0] / z + camera.cx
        v = camera.fy * p[..., 1] / z + camera.cy
    out = np.stack([u, v], axis=-1)
    out[z <= _NEAR] = np.nan
    return out


@functools.lru_cache(maxsize=32)
def _camera_rays(camera: CameraModel) -> np.ndarray:
    """Unit ray directions (3, H, W) float32 in the camera frame, pixel [r, c] through (u, v) = (c, r)."""
    u = (np.arange(camera.width) - camera.cx) / camera.fx
    v = (np.arange(camera.height) - camera.cy) / camera.fy
    d = np.empty((3, camera.height, camera.width))
    d[0], d[1], d[2] = u[None, :], v[:, None], 1.0
    d /= np.linalg.norm(d, axis=0)
    return d.astype(np.float32)


def _world_rays(camera: CameraModel, r: np.ndarray) -> np.ndarray:
    d = _camera_rays(camera)
    return np.ascontiguousarray(np.einsum("ij,jhw->ihw", r.astype(np.float32), d))


@functools.lru_cache(maxsize=32)
def _fixed_camera(camera: CameraModel, scene_table: tuple):
    """For a base-mounted camera: world rays and the table background (depth, image) computed once."""
    r, o = camera_pose(camera)
    d = _world_rays(camera, r)
    depth, img = _table(o, d, *scene_table)
    for a in (d, depth, img):
        a.flags.writeable = False
    return d, depth, img


def _table(o, d, table_color, table_color2, checker, extent, background, light):
    """Depth (H, W) float32 (inf: no table) and the lit background image (H, W, 3) float32."""
    h, w = d.shape[1:]
    o = [float(v) for v in o]
    dz = d[2]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(dz < -1e-9, -o[2] / dz, np.inf).astype(np.float32)
    if o[2] <= 0:
        t[:] = np.inf
    px = o[0] + t * d[0]
    py = o[1] + t * d[1]
    x0, x1, y0, y1 = extent
    on = np.isfinite(t) & (px >= x0) & (px <= x1) & (py >= y0) & (py <= y1)
    t = np.where(on, t, np.float32(np.inf)).astype(np.float32)
    lz = light[2] / np.linalg.norm(light)
    shade = _AMBIENT + _DIFFUSE * max(lz, 0.0)
    img = np.empty((h, w, 3), dtype=np.float32)
    img[:] = np.asarray(background, np.float32)
    if checker > 0:
        with np.errstate(invalid="ignore"):
            odd = ((np.floor(np.where(on, px, 0) / checker) + np.floor(np.where(on, py, 0) / checker)) % 2) == 1
        c1 = np.asarray(table_color, np.float32) * shade
        c2 = np.asarray(table_color2, np.float32) * shade
        img[on & ~odd] = c1
        img[on & odd] = c2
    else:
        img[on] = np.asarray(table_color, np.float32) * shade
    return t, img


# ----------------------------------------------------------------------------------------------
# Geometry of the arm and gripper
# ----------------------------------------------------------------------------------------------
# Links: (frame a, frame b, radius). Frame 0 is the base, 6 the flange (kinematics.frame_origins).
_LINKS = ((0, 1, 0.062), (1, 2, 0.054), (2, 3, 0.045), (3, 4, 0.04), (4, 5, 0.04), (5, 6, 0.038))
# Joint housings: joint i+1 turns about z of frame i, at frame i's origin: (frame, half length, radius).
_JOINTS = ((1, 0.06, 0.062), (2, 0.05, 0.055), (3, 0.045, 0.046), (4, 0.045, 0.046), (5, 0.04, 0.044))
# Gripper, in the flange frame (z = tool axis, fingers open along x).
_PALM_CENTER, _PALM_HALF = (0.0, 0.0, 0.032), (0.046, 0.022, 0.032)
_FINGER_HALF = (0.007, 0.011, 0.026)
_FINGER_Z = 0.064 + 0.026


class _Prims:
    """Everything but the table, as arrays: "round" primitives (capsules; a sphere is a capsule with
    a == b) and oriented boxes. Primitive k (1-based, the id in the id buffer) is round k - 1 for
    k <= n_round, else box k - 1 - n_round. Bounding spheres (pts, rads) come grouped per primitive
    (2 per round one: its end spheres; 8 per box: its corners, radius 0) from offsets `starts`;
    each primitive lies in the convex hull of its group."""

    def __init__(self, q: np.ndarray, gripper_width: float, scene: Scene):
        tf = frame_transforms(q)
        p = tf[:, :3, 3]
        a = [p[i] for i, _, _ in _LINKS]
        b = [p[j] for _, j, _ in _LINKS]
        a[0] = np.array([0.0, 0.0, -0.02])      # the base column starts in the table
        rad = [r for _, _, r in _LINKS]
        col = [scene.arm_color] * len(_LINKS)
        for f, half, r in _JOINTS:
            axis = tf[f, :3, 2]
            a.append(p[f] - half * axis)
            b.append(p[f] + half * axis)
            rad.append(r)
            col.append(scene.joint_color)
        for sph in (scene.obstacle, scene.goal):
            if sph is not None:
                c = np.asarray(sph.center)
                a.append(c)
                b.append(c)
                rad.append(sph.radius)
                col.append(sph.color)
        self.a, self.b, self.rad = np.array(a), np.array(b), np.array(rad)
        self.n_round = len(rad)
        rot = tf[6, :3, :3]
        w = float(np.clip(gripper_width, 0.0, GRIPPER_MAX))
        fx = w / 2 + _FINGER_HALF[0]
        local = np.array([_PALM_CENTER, (-fx, 0.0, _FINGER_Z), (fx, 0.0, _FINGER_Z)])
        centers = list(p[6] + local @ rot.T)
        rots = [rot, rot, rot]
        halves = [_PALM_HALF, _FINGER_HALF, _FINGER_HALF]
        col += [scene.gripper_color] * 3
        if scene.block is not None:
            blk = scene.block
            cy, sy = math.cos(blk.yaw), math.sin(blk.yaw)
            centers.append(np.asarray(blk.center))
            rots.append(np.array([[cy, -sy, 0.0], [sy, cy, 0.0], [0.0, 0.0, 1.0]]))
            halves.append(tuple(v / 2 for v in blk.size))
            col.append(blk.color)
        self.c, self.rot, self.half = np.array(centers), np.array(rots), np.array(halves, dtype=float)
        self.n = self.n_round + len(centers)
        self.colors = np.array([(0, 0, 0)] + col, dtype=np.float32)    # by id; 0 is the table's
        corners = self.c[:, None, :] + np.einsum("kj,bij->bki", _CORNERS, self.rot * self.half[:, None, :])
        self.pts = np.concatenate([np.stack([self.a, self.b], axis=1).reshape(-1, 3), corners.reshape(-1, 3)])
        self.rads = np.concatenate([np.repeat(self.rad, 2), np.zeros(8 * len(centers))])
        self.starts = np.concatenate([np.arange(self.n_round) * 2, 2 * self.n_round + 8 * np.arange(len(centers))])


_CORNERS = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)


@functools.lru_cache(maxsize=32)
def _frustum(camera: CameraModel) -> np.ndarray:
    """(4, 3) inward unit normals of the side planes (through the optical centre), camera frame."""
    m = 1.0      # pixels of margin beyond the outermost pixel centres
    xl, xr = (-m - camera.cx) / camera.fx, (camera.width - 1 + m - camera.cx) / camera.fx
    yt, yb = (-m - camera.cy) / camera.fy, (camera.height - 1 + m - camera.cy) / camera.fy
    n = np.array([[1.0, 0.0, -xl], [-1.0, 0.0, xr], [0.0, 1.0, -yt], [0.0, -1.0, yb]])
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def _screen_rects(camera: CameraModel, r, o, pr: _Prims) -> list:
    """Per primitive: pixel slices (rows, cols) covering it, or None where it is out of view.

    Perspective keeps convexity, so the image box of a hull of spheres is the union of the spheres'
    image boxes. A group is culled when all its spheres are behind the camera or all outside one
    side plane of the frustum; a group reaching the camera plane gets the whole image."""
    pc = (pr.pts - o) @ r                       # camera frame
    rads, starts = pr.rads, pr.starts
    x, y, z = pc[:, 0], pc[:, 1], pc[:, 2]
    zl, zh = z - rads, z + rads
    outside = (pc @ _frustum(camera).T) < -rads[:, None]
    culled = (np.logical_and.reduceat(zh <= _NEAR, starts)
              | np.logical_and.reduceat(outside, starts, axis=0).any(axis=1))
    full = np.logical_or.reduceat(zl <= 10 * _NEAR, starts)
    zl = np.where(zl > 10 * _NEAR, zl, 1.0)

    def bounds(s):
        lo = np.where(s - rads < 0, (s - rads) / zl, (s - rads) / zh)
        hi = np.where(s + rads > 0, (s + rads) / zl, (s + rads) / zh)
        return np.minimum.reduceat(lo, starts), np.maximum.reduceat(hi, starts)

    (xl, xh), (yl, yh) = bounds(x), bounds(y)
    c0 = np.clip(np.floor(camera.fx * xl + camera.cx), 0, camera.width).astype(int).tolist()
    c1 = np.clip(np.ceil(camera.fx * xh + camera.cx) + 1, 0, camera.width).astype(int).tolist()
    r0 = np.clip(np.floor(camera.fy * yl + camera.cy), 0, camera.height).astype(int).tolist()
    r1 = np.clip(np.ceil(camera.fy * yh + camera.cy) + 1, 0, camera.height).astype(int).tolist()
    whole = (slice(0, camera.height), slice(0, camera.width))
    out = []
    for k, (cull, f) in enumerate(zip(culled.tolist(), full.tolist())):
        if cull:
            out.append(None)
        elif f:
            out.append(whole)
        elif c0[k] >= c1[k] or r0[k] >= r1[k]:
            out.append(None)
        else:
            out.append((slice(r0[k], r1[k]), slice(c0[k], c1[k])))
    return out


# ----------------------------------------------------------------------------------------------
# Ray intersections: every ray starts at o; (dx, dy, dz) are float32 views of one screen rectangle
# of the ray directions. Each returns t (float32, inf where there is no hit). Scalars go in as
# python floats so the arrays stay float32 (NEP 50). render() runs them under errstate(all="ignore").
# ----------------------------------------------------------------------------------------------
_INF = np.float32(np.inf)


def _hit_sphere(o, dx, dy, dz, c, rad):
    ocx, ocy, ocz = (o - c).tolist()
    b = dx * ocx + dy * ocy + dz * ocz
    h = b * b - (ocx * ocx + ocy * ocy + ocz * ocz - rad * rad)
    t = -b - np.sqrt(h)                         # nan where h < 0: fails t > _NEAR
    return np.where(t > _NEAR, t, _INF)


def _hit_capsule(o, dx, dy, dz, a, b, rad):
    # Inigo Quilez's capsule: the infinite cylinder's entry point; if it lies beyond an end, the
    # ray enters the capsule through that end's sphere (the disc at each end is inside its sphere).
    ba, oa = b - a, o - a
    baba = float(ba @ ba)
    if baba < 1e-12:
        return _hit_sphere(o, dx, dy, dz, a, rad)
    baoa, oaoa = float(ba @ oa), float(oa @ oa)
    bax, bay, baz = ba.tolist()
    oax, oay, oaz = oa.tolist()
    bard = dx * bax + dy * bay + dz * baz
    rdoa = dx * oax + dy * oay + dz * oaz
    k2 = baba - bard * bard
    k1 = baba * rdoa - baoa * bard
    k0 = baba * oaoa - baoa * baoa - rad * rad * baba
    h = k1 * k1 - k2 * k0                       # < 0: misses the infinite cylinder, so the capsule
    t = (-k1 - np.sqrt(h)) / k2
    y = baoa + t * bard
    below = y <= 0
    bc = np.where(below, rdoa, rdoa - bard)     # the end sphere's b and c
    ob = o - b
    cc = np.where(below, oaoa - rad * rad, float(ob @ ob) - rad * rad)
    tc = -bc - np.sqrt(bc * bc - cc)
    t = np.where(below | (y >= baba), tc, t)
    return np.where((h >= 0) & (t > _NEAR), t, _INF)


def _hit_box(o, dx, dy, dz, c, rot, half):
    ol = (rot.T @ (o - c)).tolist()
    rl = rot.tolist()
    hl = half.tolist()
    tn = tf = None
    for k in range(3):
        inv = np.float32(1.0) / (dx * rl[0][k] + dy * rl[1][k] + dz * rl[2][k])   # +-inf: parallel
        t1 = (-hl[k] - ol[k]) * inv
        t2 = (hl[k] - ol[k]) * inv
        lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
        tn = lo if tn is None else np.maximum(tn, lo)
        tf = hi if tf is None else np.minimum(tf, hi)
    return np.where((tn <= tf) & (tn > _NEAR), tn, _INF)


def _shade(pr: _Prims, o, d, depth, ids, img, light):
    """Lambert-shade every pixel a primitive owns (ids > 0) into img, all primitives at once."""
    obj = ids > 0
    if not obj.any():
        return
    k = ids[obj].astype(np.intp)
    p = o + depth[obj][:, None].astype(float) * d[:, obj].T.astype(float)
    n = np.empty_like(p)
    rnd = k <= pr.n_round
    if rnd.any():
        i = k[rnd] - 1
        a, ba = pr.a[i], pr.b[i] - pr.a[i]
        pa = p[rnd] - a
        s = np.clip(np.einsum("ij,ij->i", pa, ba) / np.maximum(np.einsum("ij,ij->i", ba, ba), 1e-12), 0.0, 1.0)
        n[rnd] = pa - s[:, None] * ba
    box = ~rnd
    if box.any():
        j = k[box] - 1 - pr.n_round
        rot = pr.rot[j]
        pl = np.einsum("ni,nik->nk", p[box] - pr.c[j], rot) / pr.half[j]   # the face: largest |.|
        ax = np.argmax(np.abs(pl), axis=1)
        rows = np.arange(len(ax))
        n[box] = rot[rows, :, ax] * np.sign(pl[rows, ax])[:, None]
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    shade = (_AMBIENT + _DIFFUSE * np.clip(n @ light, 0.0, None)).astype(np.float32)
    img[obj] = pr.colors[k] * shade[:, None]


# ----------------------------------------------------------------------------------------------
# render
# ----------------------------------------------------------------------------------------------
def render(camera: CameraModel, q, gripper_width: float, scene: Scene = DEFAULT_SCENE) -> np.ndarray:
    """The camera's image of the cell with the arm at joint vector q (6,) and the gripper open
    gripper_width metres (clipped to 0..GRIPPER_MAX): uint8 (H, W, 3) RGB, C-contiguous."""
    q = np.asarray(q, dtype=float).reshape(6)
    if not np.all(np.isfinite(q)):
        raise ValueError(f"render: q must be finite, got {q.tolist()}")
    gripper_width = float(gripper_width)
    if not math.isfinite(gripper_width):
        raise ValueError(f"render: gripper_width must be finite, got {gripper_width!r}")
    table = (scene.table_color, scene.table_color2, scene.checker, scene.table_extent,
             scene.background, scene.light)
    r, o = camera_pose(camera, q)
    with np.errstate(all="ignore"):     # nan / inf in misses are expected and compare false
        if camera.mount == "base":
            d, depth0, img0 = _fixed_camera(camera, table)
            depth, img = depth0.copy(), img0.copy()
        else:
            d = _world_rays(camera, r)
            depth, img = _table(o, d, *table)
        dxa, dya, dza = d[0], d[1], d[2]
        ids = np.zeros(depth.shape, dtype=np.int16)      # 0: table / background, k: primitive k
        pr = _Prims(q, gripper_width, scene)
        for k, rect in enumerate(_screen_rects(camera, r, o, pr), start=1):
            if rect is None:
                continue
            dx, dy, dz = dxa[rect], dya[rect], dza[rect]
            if k <= pr.n_round:
                i = k - 1
                t = _hit_capsule(o, dx, dy, dz, pr.a[i], pr.b[i], float(pr.rad[i]))
            else:
                j = k - 1 - pr.n_round
                t = _hit_box(o, dx, dy, dz, pr.c[j], pr.rot[j], pr.half[j])
            dv = depth[rect]
            win = t < dv
            np.copyto(dv, t, where=win)
            np.copyto(ids[rect], np.int16(k), where=win)
        light = np.asarray(scene.light) / np.linalg.norm(scene.light)
        _shade(pr, o, d, depth, ids, img, light)
    return (img + np.float32(0.5)).astype(np.uint8)
