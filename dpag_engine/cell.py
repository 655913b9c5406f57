"""A robot cell, written once by its lab: the controller, limits, cameras, gripper, and which of them
feeds each observation key of a checkpoint's spec (dpag_engine/spec.py).

    python -m dpag_engine.serve --ckpt model.pt --robot ur5 --config cell.toml

    [robot]
    host = "192.168.1.10"
    tcp_offset = [0, 0, 0.15, 0, 0, 0]     # flange -> TCP (m, rotation vector), as set on the teach pendant
    home = [0, -1.57, 1.57, -1.57, -1.57, 0]   # joints (rad); default: the task's home pose
    [limits]                               # never above the UR5's own; every value checked on load
    v_max = 1.0                            # rad/s, one value or six
    a_max = 8.0                            # rad/s^2
    workspace_lo = [-0.8, -0.6, 0.02]      # TCP box (m, base frame)
    workspace_hi = [0.1, 0.6, 0.6]
    [cameras.scene]
    source = "realsense:135122075425"      # or "opencv:/dev/video0", "opencv:2", "sim:scene"
    fps = 30
    resolution = [480, 640]                # (height, width) asked of the device
    [gripper]
    kind = "robotiq"                       # a Robotiq 2F-85/140 on the URCap socket; "none": no gripper
    model = "2f85"
    [observation]                          # checkpoint key -> source(s); keys whose kind says it need no line
    camera_0 = "camera.scene"
    "observation.state" = ["robot.joint_pos", "gripper.width"]

Sources: robot.joint_pos (6), robot.joint_vel (6), robot.tcp_pose (6: x y z rx ry rz of the TCP),
robot.tcp_speed (6), gripper.width (1, m), camera.<name>, task.<input> (what the task plug-in
supplies, e.g. task.goal). A key of kind joint_pos, tcp_pose, ... (from its name, e.g. Diffusion
Policy's robot_eef_pose, or from the dataset's spec hints) maps to the matching source by itself;
a camera key maps to the cell's camera of the same name (a one-camera policy in a one-camera cell
to that camera).

`bind(spec, cell, task_inputs)` checks, before anything connects, that the cell provides every
source the spec needs with matching sizes, and names the missing or mismatched key.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .gripper import GRIPPER_MODELS
from .robot import LimitError, SafetyLimits
from .spec import LOWDIM_KINDS, ObsField, PolicySpec

SOURCE_SIZES = {"robot.joint_pos": 6, "robot.joint_vel": 6, "robot.tcp_pose": 6, "robot.tcp_speed": 6,
                "gripper.width": 1}
KIND_SOURCES = {"joint_pos": "robot.joint_pos", "joint_vel": "robot.joint_vel", "tcp_pose": "robot.tcp_pose",
                "tcp_speed": "robot.tcp_speed", "gripper_width": "gripper.width"}
CAMERA_KINDS = ("opencv", "realsense", "sim")


class CellError(ValueError):
    """A robot config the cell cannot be run with, or one that does not serve a policy's spec."""


@dataclass(frozen=True)
class CameraConfig:
    source: str                              # "opencv:...", "realsense:<serial>", "sim:<camera>"
    fps: float = 30.0
    resolution: tuple[int, int] | None = None   # (height, width) asked of the device

    @property
    def kind(self) -> str:
        return self.source.split(":", 1)[0]


@dataclass(frozen=True)
class GripperConfig:
    kind: str = "none"                       # "robotiq" or "none"
    model: str = "2f85"
    port: int = 63352
    speed: float = 1.0                       # fractions of the gripper's maximum
    force: float = 0.5


@dataclass(frozen=True)
class Cell:
    host: str = "sim"                        # "sim": the emulator on loopback
    version: str = "3.15"                    # sim: the controller the emulator plays (3.x CB3, 5.x e-Series)
    frequency: float | None = None
    tcp_offset: tuple[float, ...] = (0.0,) * 6
    home: tuple[float, ...] | None = None
    limits: SafetyLimits = field(default_factory=SafetyLimits)
    cameras: dict[str, CameraConfig] = field(default_factory=dict)
    gripper: GripperConfig = field(default_factory=GripperConfig)
    observation: dict[str, tuple[str, ...]] = field(default_factory=dict)
    path: str = "<built in>"

    @property
    def sim(self) -> bool:
        return self.host == "sim"


def sim_cell(version: str = "3.15") -> Cell:
    """The emulated cell `serve --robot sim` uses with no --config: both rendered cameras and the
    emulated Robotiq gripper."""
    return Cell(host="sim", version=version,
                cameras={"scene": CameraConfig("sim:scene"), "wrist": CameraConfig("sim:wrist")},
                gripper=GripperConfig("robotiq"))


def load_cell(path: str | Path) -> Cell:
    """Read and check a robot config TOML; CellError names the file, table and key of any problem."""
    path = Path(path)
    try:
        d = tomllib.loads(path.read_text())
    except OSError as err:
        raise CellError(f"{path}: cannot read ({err.strerror or err})") from None
    except tomllib.TOMLDecodeError as err:
        raise CellError(f"{path}: not valid TOML ({err})") from None
    return parse_cell(d, str(path))


def parse_cell(d: dict[str, Any], where: str = "<cell>") -> Cell:
    def fail(key: str, why: str):
        raise CellError(f"{where}: {key}: {why}")

    def table(name: str, known: set[str]) -> dict[str, Any]:
        t = d.get(name, {})
        if not isinstance(t, dict):
            fail(f"[{name}]", "must be a table")
        for k in t:
            if k not in known:
                fail(f"[{name}] {k}", f"unknown key (known: {', '.join(sorted(known))})")
        return t

    unknown = set(d) - {"robot", "limits", "cameras", "gripper", "observation"}
    if unknown:
        fail(f"[{sorted(unknown)[0]}]", "unknown table (known: robot, limits, cameras, gripper, observation)")

    def numbers(key: str, value: Any, n: int) -> tuple[float, ...]:
        v = [value] * n if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not (isinstance(v, list) and len(v) == n and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                          and math.isfinite(x) for x in v)):
            fail(key, f"expected {n} finite numbers, got {value!r}")
        return tuple(float(x) for x in v)

    robot = table("robot", {"host", "version", "frequency", "tcp_offset", "home"})
    host = robot.get("host", "sim")
    if not isinstance(host, str) or not host:
        fail("[robot] host", f"expected the controller's address or \"sim\", got {host!r}")
    version = str(robot.get("version", "3.15"))
    frequency = robot.get("frequency")
    if frequency is not None:
        frequency = numbers("[robot] frequency", frequency, 1)[0]
        if frequency <= 0:
            fail("[robot] frequency", f"the controller's RTDE rate in Hz must be > 0, got {frequency:g}")
    tcp_offset = numbers("[robot] tcp_offset", robot.get("tcp_offset", [0.0] * 6), 6)
    if np.linalg.norm(tcp_offset[:3]) > 0.5:
        fail("[robot] tcp_offset", f"a {np.linalg.norm(tcp_offset[:3]):.2f} m tool is not one a UR5 carries (<= 0.5 m)")
    home = numbers("[robot] home", robot["home"], 6) if "home" in robot else None

    lim = table("limits", {"v_max", "a_max", "q_min", "q_max", "workspace_lo", "workspace_hi", "state_timeout_s"})
    given = {k: numbers(f"[limits] {k}", v, 3 if k.startswith("workspace") else 6)
             for k, v in lim.items() if k != "state_timeout_s"}
    if "state_timeout_s" in lim:
        given["state_timeout_s"] = numbers("[limits] state_timeout_s", lim["state_timeout_s"], 1)[0]
    try:
        limits = SafetyLimits(**given)
    except LimitError as err:
        fail(f"[limits] {err.field}", err.reason)
    if home is not None and not all(lo <= q <= hi for lo, q, hi in zip(limits.q_min, home, limits.q_max)):
        fail("[robot] home", "outside [limits] q_min .. q_max")

    cams_t = d.get("cameras", {})
    if not isinstance(cams_t, dict):
        fail("[cameras]", "must be a table of cameras by name")
    cameras = {}
    for name, c in cams_t.items():
        c = {"source": c} if isinstance(c, str) else c
        if not isinstance(c, dict) or set(c) - {"source", "fps", "resolution"}:
            fail(f"[cameras.{name}]", "keys are source, fps, resolution")
        source = c.get("source")
        kind, _, target = source.partition(":") if isinstance(source, str) else ("", "", "")
        if kind not in CAMERA_KINDS or not target:
            fail(f"[cameras.{name}] source", f"expected opencv:<device|index|file>, realsense:<serial> or "
                                             f"sim:<camera>, got {source!r}")
        fps = numbers(f"[cameras.{name}] fps", c.get("fps", 30.0), 1)[0]
        if not 0 < fps <= 240:
            fail(f"[cameras.{name}] fps", f"must be in (0, 240], got {fps:g}")
        res = c.get("resolution")
        if res is not None:
            h, w = numbers(f"[cameras.{name}] resolution", res, 2)
            if not (h.is_integer() and w.is_integer() and 8 <= h <= 4096 and 8 <= w <= 4096):
                fail(f"[cameras.{name}] resolution", f"(height, width) in pixels, 8 .. 4096, got {res!r}")
            res = (int(h), int(w))
        cameras[name] = CameraConfig(source, fps, res)

    g = table("gripper", {"kind", "model", "port", "speed", "force"})
    gripper = GripperConfig(**g)
    if not isinstance(gripper.kind, str) or gripper.kind not in ("robotiq", "none"):
        fail("[gripper] kind", f"\"robotiq\" or \"none\", got {gripper.kind!r}")
    if not isinstance(gripper.model, str) or gripper.model not in GRIPPER_MODELS:
        fail("[gripper] model", f"one of {', '.join(GRIPPER_MODELS)}, got {gripper.model!r}")
    if not (isinstance(gripper.port, int) and not isinstance(gripper.port, bool) and 0 < gripper.port < 65536):
        fail("[gripper] port", f"a TCP port, got {gripper.port!r}")
    for k in ("speed", "force"):
        v = getattr(gripper, k)
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1):
            fail(f"[gripper] {k}", f"a fraction in (0, 1], got {v!r}")

    obs_t = d.get("observation", {})
    if not isinstance(obs_t, dict):
        fail("[observation]", "must be a table: checkpoint key = source or [sources]")
    observation = {}
    for key, src in obs_t.items():
        srcs = [src] if isinstance(src, str) else src
        if not (isinstance(srcs, list) and srcs and all(isinstance(s, str) for s in srcs)):
            fail(f"[observation] {key!r}", f"a source or a list of sources, got {src!r}")
        for s in srcs:
            if s not in SOURCE_SIZES and not s.startswith(("camera.", "task.")):
                fail(f"[observation] {key!r}", f"unknown source {s!r} (sources: {', '.join(SOURCE_SIZES)}, "
                                               f"camera.<name>, task.<input>)")
            if s.startswith("camera.") and s[7:] not in cameras:
                fail(f"[observation] {key!r}", f"{s}: no camera {s[7:]!r} in [cameras] ({', '.join(cameras) or 'none'})")
            if s == "gripper.width" and gripper.kind == "none":
                fail(f"[observation] {key!r}", "gripper.width: the cell has no gripper ([gripper] kind = \"none\")")
        observation[key] = tuple(srcs)
    return Cell(host=host, version=version, frequency=frequency, tcp_offset=tcp_offset, home=home, limits=limits,
                cameras=cameras, gripper=gripper, observation=observation, path=where)


@dataclass(frozen=True)
class Binding:
    """Where one spec field's values come from: low-dim sources concatenated, or one camera."""

    field: ObsField
    sources: tuple[str, ...]


def bind(spec: PolicySpec, cell: Cell, task_inputs: dict[str, np.ndarray]) -> list[Binding]:
    """Every spec field bound to the cell's sources, in spec order; CellError naming the first key the
    cell cannot provide, or provides with the wrong size. Nothing connects here."""
    where = f"{cell.path}"
    out = []
    for f in spec.obs:
        if f.key in cell.observation:
            sources = cell.observation[f.key]
        elif f.kind == "camera":
            # By name; a policy with one camera in a cell with one camera needs no mapping either.
            single = len(spec.camera_fields) == 1 and len(cell.cameras) == 1
            name = f.camera if f.camera in cell.cameras else (next(iter(cell.cameras)) if single else None)
            if name is None:
                raise CellError(f"{where}: the policy needs camera {f.key!r} ({'x'.join(map(str, f.shape))}); the cell has "
                                f"{', '.join(cell.cameras) or 'no cameras'}: add [observation] {f.key} = \"camera.<name>\"")
            sources = (f"camera.{name}",)
        elif f.kind in KIND_SOURCES:
            sources = (KIND_SOURCES[f.kind],)
        elif f.kind == "task":
            sources = (f"task.{f.key}",)
        else:
            raise CellError(f"{where}: the policy's observation {f.key!r} ({f.dim} values) has no known meaning: map it "
                            f"in [observation], e.g. {f.key!r} = [\"robot.joint_pos\", \"gripper.width\"]")
        if f.kind == "camera":
            if len(sources) != 1 or not sources[0].startswith("camera."):
                raise CellError(f"{where}: [observation] {f.key!r}: a camera key takes one camera.<name>, got {list(sources)}")
        else:
            sizes = []
            for s in sources:
                if s.startswith("camera."):
                    raise CellError(f"{where}: [observation] {f.key!r}: {s} is a camera; {f.key!r} holds low-dim values")
                if s == "gripper.width" and cell.gripper.kind == "none":
                    raise CellError(f"{where}: the policy observes the gripper ({f.key!r}), the cell has none: set [gripper]")
                if s.startswith("task."):
                    if s[5:] not in task_inputs:
                        raise CellError(f"{where}: the policy's {f.key!r} needs task input {s[5:]!r}, the task supplies "
                                        f"{', '.join(task_inputs) or 'none'} (--task)")
                    sizes.append(int(np.asarray(task_inputs[s[5:]]).size))
                else:
                    sizes.append(SOURCE_SIZES[s])
            size = sum(sizes)
            a, b = f.part if f.part is not None else (0, size)
            if f.part is None and size != f.dim or b > size:
                raise CellError(f"{where}: the policy's {f.key!r} has {f.dim} values"
                                f"{f' (values {a}..{b} of its key)' if f.part else ''}, "
                                f"{' + '.join(sources)} provide {size}")
        out.append(Binding(f, tuple(sources)))
    if spec.action.gripper and cell.gripper.kind == "none":
        raise CellError(f"{where}: the policy commands a gripper (its last action column), the cell has none: set [gripper]")
    return out


def needed_cameras(bindings: list[Binding]) -> list[str]:
    return list(dict.fromkeys(b.sources[0][7:] for b in bindings if b.field.kind == "camera"))


assert set(KIND_SOURCES) == set(LOWDIM_KINDS)
