"""What a policy sees and what it commands, in robot terms: the spec that travels with a checkpoint.

A policy's tensors are `{"state": (B, To, Ds), <camera>: (B, To, C, H, W)}` in, `(B, H, Da)` out.
The spec says what each number is, so a serving or recording session can build the observation
from a robot, cameras and a gripper, and turn the actions into commands, with no task code:

    obs     the dataset keys concatenated (in order) into `state`, and the cameras; each with its
            kind (joint_pos, joint_vel, tcp_pose, tcp_speed, gripper_width, camera, task) and shape
    action  joint position targets (servoJ) or TCP pose targets (servoL, position + rotation vector
            as UR and Diffusion Policy's real-world code use, or a subset such as x y with the rest
            fixed), absolute or relative to the state at the observation, plus an optional
            gripper channel (opening width, metres) as the last column
    dt      the policy's control period (s): observation i of the window is dt apart, action i of
            a chunk is the target for t_obs + (i + 1) dt

Training writes it from the dataset and the config (`spec_from_data`); checkpoints written before
it existed migrate to the reach task's spec (`reach_spec`). Plain data: to_dict / from_dict.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Low-dim kinds with a fixed size; "task" (an input the task supplies, e.g. a goal) and "unknown"
# (a key no name tells the meaning of: the robot config must map it) take the size of the data.
LOWDIM_KINDS = {"joint_pos": 6, "joint_vel": 6, "tcp_pose": 6, "tcp_speed": 6, "gripper_width": 1}
OBS_KINDS = (*LOWDIM_KINDS, "task", "unknown", "camera")
TCP_COMPONENTS = ("x", "y", "z", "rx", "ry", "rz")
ACTION_KINDS = ("joint_pos", "tcp_pose")

# Names that say what they are, so datasets written elsewhere need no mapping: Diffusion Policy's
# real-world keys, LeRobot's, and this project's own.
KNOWN_NAMES = {
    "robot_joint": "joint_pos", "robot_joint_vel": "joint_vel", "robot_eef_pose": "tcp_pose",
    "robot_eef_pose_vel": "tcp_speed", "q": "joint_pos", "qd": "joint_vel", "joint_pos": "joint_pos",
    "joint_vel": "joint_vel", "tcp_pose": "tcp_pose", "tcp_speed": "tcp_speed",
    "gripper_width": "gripper_width", "goal": "task",
}


class SpecError(ValueError):
    """A spec that does not describe its policy, or a value no robot could use; names the field."""


@dataclass(frozen=True)
class ObsField:
    """One observation key: `state` parts in concatenation order, then cameras."""

    key: str                         # the dataset key it was trained from (e.g. "q", "camera_0", "observation.state")
    kind: str                        # one of OBS_KINDS
    shape: tuple[int, ...]           # per step: (D,) low-dim (after the slice), (C, H, W) camera
    part: tuple[int, int] | None = None   # low-dim: the values [a, b) of the key that were used (e.g. x, y of a pose)
    camera: str | None = None        # camera: the policy's input name (a key of the obs dict)
    crop: tuple[int, int] | None = None   # camera: the centre crop the encoder takes (H, W)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.part is not None:
            object.__setattr__(self, "part", tuple(int(p) for p in self.part))
        if self.crop is not None:
            object.__setattr__(self, "crop", tuple(int(c) for c in self.crop))
        where = f"spec.obs[{self.key!r}]"
        if self.kind not in OBS_KINDS:
            raise SpecError(f"{where}.kind: {self.kind!r} is not one of {', '.join(OBS_KINDS)}")
        if self.kind == "camera":
            if len(self.shape) != 3 or self.shape[0] not in (1, 3) or min(self.shape) <= 0:
                raise SpecError(f"{where}.shape: a camera is (C, H, W) with C 1 or 3, got {self.shape}")
            if not self.camera:
                raise SpecError(f"{where}.camera: a camera field names the policy input it feeds")
        else:
            if len(self.shape) != 1 or self.shape[0] <= 0:
                raise SpecError(f"{where}.shape: a low-dim field is (D,), got {self.shape}")
            size = LOWDIM_KINDS.get(self.kind)
            a, b = self.part if self.part is not None else (0, self.shape[0])
            if b - a != self.shape[0] or a < 0 or (size is not None and b > size):
                raise SpecError(f"{where}: values [{a}, {b}) of a {self.kind} ({size or 'any'} values) do not make "
                                f"shape {self.shape}")

    @property
    def dim(self) -> int:
        return self.shape[0]


@dataclass(frozen=True)
class ActionSpec:
    """The columns of an action row, and how they become commands."""

    kind: str = "joint_pos"                 # joint position targets (servoJ) or TCP pose targets (servoL)
    absolute: bool = True                   # False: relative to the state at the observation time
    dims: tuple[str, ...] = ()              # tcp_pose: the components the policy outputs (subset of x..rz), in order
    fixed: dict[str, float] = field(default_factory=dict)   # tcp_pose: the value of every component not in dims
    gripper: bool = False                   # one more column: gripper opening width (m)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(self.dims))
        object.__setattr__(self, "fixed", {k: float(v) for k, v in dict(self.fixed).items()})
        for name in ("absolute", "gripper"):   # "false" from a text file is truthy: never guess
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"spec.action.{name}: expected true or false, got {getattr(self, name)!r}")
        if self.kind not in ACTION_KINDS:
            raise SpecError(f"spec.action.kind: {self.kind!r} is not one of {', '.join(ACTION_KINDS)}")
        if self.kind == "joint_pos":
            if self.dims not in ((), tuple(f"q{j}" for j in range(6))):
                raise SpecError("spec.action.dims: joint actions are all six joints")
            object.__setattr__(self, "dims", tuple(f"q{j}" for j in range(6)))
            if self.fixed:
                raise SpecError("spec.action.fixed: only TCP actions fix components")
            return
        dims = self.dims or TCP_COMPONENTS
        object.__setattr__(self, "dims", dims)
        bad = [d for d in dims if d not in TCP_COMPONENTS] + [d for d in self.fixed if d not in TCP_COMPONENTS]
        if bad or len(set(dims)) != len(dims):
            raise SpecError(f"spec.action.dims: components must be distinct names of {TCP_COMPONENTS}, got {dims}")
        both = [c for c in dims if c in self.fixed]
        if both:
            raise SpecError(f"spec.action.fixed: {both} are columns the policy outputs; fix only the others")
        missing = [c for c in TCP_COMPONENTS if c not in dims and c not in self.fixed]
        if missing:
            raise SpecError(f"spec.action.fixed: the components the policy does not output need a fixed value: "
                            f"{missing}")
        if self.absolute is False and self.fixed:
            raise SpecError("spec.action: relative TCP actions move every component; fixed values need absolute")
        if not all(math.isfinite(v) for v in self.fixed.values()):
            raise SpecError(f"spec.action.fixed: values must be finite, got {self.fixed}")

    @property
    def dim(self) -> int:
        return len(self.dims) + int(self.gripper)


@dataclass(frozen=True)
class PolicySpec:
    obs: tuple[ObsField, ...]
    action: ActionSpec
    dt: float                                # control period (s)
    task: str | None = None                  # the task plug-in it was trained on (dpag_engine.tasks), if any

    def __post_init__(self) -> None:
        object.__setattr__(self, "obs", tuple(self.obs))
        if not (isinstance(self.dt, (int, float)) and math.isfinite(self.dt) and 0.0 < self.dt <= 10.0):
            raise SpecError(f"spec.dt: the control period must be in (0, 10] s, got {self.dt!r}")
        keys = [f.key for f in self.obs]
        if len(set(keys)) != len(keys):
            raise SpecError(f"spec.obs: a key appears twice: {keys}")
        if not self.obs:
            raise SpecError("spec.obs: a policy observes something")
        cams = [f.camera for f in self.obs if f.kind == "camera"]
        if len(set(cams)) != len(cams):
            raise SpecError(f"spec.obs: two camera fields feed the same policy input: {cams}")

    @property
    def state_fields(self) -> tuple[ObsField, ...]:
        return tuple(f for f in self.obs if f.kind != "camera")

    @property
    def camera_fields(self) -> tuple[ObsField, ...]:
        return tuple(f for f in self.obs if f.kind == "camera")

    @property
    def state_dim(self) -> int:
        return sum(f.dim for f in self.state_fields)

    def describe(self) -> str:
        """One line: 'q (joint_pos) + goal (task) + camera scene 3x96x96 -> joint_pos absolute + gripper at 10 Hz'."""
        def part(f: ObsField) -> str:
            if f.kind == "camera":
                return f"camera {f.camera} {'x'.join(map(str, f.shape))}"
            return f"{f.key}{'[%d:%d]' % f.part if f.part else ''} ({f.kind})"
        a = self.action
        act = a.kind + ("" if a.kind == "joint_pos" else f" {' '.join(a.dims)}") + (" absolute" if a.absolute else " relative")
        return (f"{' + '.join(part(f) for f in self.obs)} -> {act}{' + gripper' if a.gripper else ''} at "
                f"{1 / self.dt:g} Hz" + (f", task {self.task}" if self.task else ""))

    def check_policy(self, cfg) -> None:
        """The spec describes exactly this PolicyConfig's tensors."""
        if self.state_dim != cfg.state_dim:
            raise SpecError(f"spec.obs: the state parts add up to {self.state_dim} values, the policy's state_dim "
                            f"is {cfg.state_dim}")
        if self.action.dim != cfg.action_dim:
            raise SpecError(f"spec.action: {self.action.dim} columns, the policy's action_dim is {cfg.action_dim}")
        cams = {f.camera: f for f in self.camera_fields}
        want = set(cfg.image.cameras) if cfg.image is not None else set()
        if set(cams) != want:
            raise SpecError(f"spec.obs: cameras {sorted(cams)}, the policy's encoder has {sorted(want)}")
        for f in cams.values():
            if f.shape != tuple(cfg.image.image_shape):
                raise SpecError(f"spec.obs[{f.key!r}]: shape {f.shape}, the policy's image_shape is "
                                f"{tuple(cfg.image.image_shape)}")

    def to_dict(self) -> dict[str, Any]:
        def obs(f: ObsField) -> dict[str, Any]:
            d = {"key": f.key, "kind": f.kind, "shape": list(f.shape)}
            d.update({k: list(v) if isinstance(v, tuple) else v for k, v in
                      (("part", f.part), ("camera", f.camera), ("crop", f.crop)) if v is not None})
            return d
        a = self.action
        return {"obs": [obs(f) for f in self.obs], "dt": float(self.dt), "task": self.task,
                "action": {"kind": a.kind, "absolute": a.absolute, "dims": list(a.dims), "fixed": dict(a.fixed),
                           "gripper": a.gripper}}

    @classmethod
    def from_dict(cls, d: Any) -> "PolicySpec":
        if not isinstance(d, dict):
            raise SpecError(f"spec: expected a mapping, got {type(d).__name__}")
        try:
            unknown = set(d) - {"obs", "action", "dt", "task"}
            if unknown:
                raise SpecError(f"spec: unknown fields {sorted(unknown)}")
            obs = tuple(ObsField(**{k: tuple(v) if isinstance(v, list) else v for k, v in f.items()}) for f in d["obs"])
            return cls(obs=obs, action=ActionSpec(**d["action"]), dt=d["dt"], task=d.get("task"))
        except SpecError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise SpecError(f"spec: malformed ({type(err).__name__}: {err})") from None


def kind_of(key: str) -> str:
    """What a dataset key is, from its name alone (LeRobot's prefixes stripped); "unknown" if no name says."""
    name = key.removeprefix("observation.")
    if key.startswith("observation.images.") or name.startswith("camera") or name in ("image", "img"):
        return "camera"
    return KNOWN_NAMES.get(name, "unknown")


def reach_spec() -> PolicySpec:
    """The embedded reach task's spec: checkpoints written before specs existed are this."""
    return PolicySpec(obs=(ObsField("q", "joint_pos", (6,)), ObsField("goal", "task", (3,))),
                      action=ActionSpec("joint_pos"), dt=0.1, task="ur5_reach")


def merge_hints(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Spec hints, later layers winning (the dataset's own, then the run config's `[data.spec]`);
    `kinds` and `action` merge key by key."""
    out: dict[str, Any] = {"kinds": {}, "action": {}}
    for layer in layers:
        layer = dict(layer or {})
        if "fps" in layer:
            fps = layer.pop("fps")
            if not (isinstance(fps, (int, float)) and not isinstance(fps, bool) and math.isfinite(fps) and fps > 0):
                raise SpecError(f"data.spec.fps: frames per second must be a positive number, got {fps!r}")
            layer.setdefault("dt", 1.0 / float(fps))
        for k, v in layer.items():
            if k in ("kinds", "action"):
                if not isinstance(v, dict):
                    raise SpecError(f"data.spec.{k}: expected a mapping, got {v!r}")
                out[k] = {**out[k], **v}
            elif k in ("task", "dt"):
                out[k] = v
            else:
                raise SpecError(f"data.spec.{k}: unknown (known: task, dt, fps, kinds, action)")
    return out


def build_spec(state_keys: list[tuple[str, tuple[int, int] | None, int]],
               cameras: list[tuple[str, str, tuple[int, ...]]], crop: tuple[int, int] | None,
               action_dim: int, hints: dict[str, Any]) -> tuple[PolicySpec | None, str]:
    """The spec of a policy trained on these inputs, or None with the reason when the data does not
    say enough (its control period, or what its action columns are).

    state_keys: (dataset key, slice (a, b) or None, values taken) in concatenation order;
    cameras: (policy camera name, dataset key, (C, H, W)); hints: `merge_hints(...)`."""
    kinds = hints.get("kinds", {})

    def lowdim_kind(key: str) -> str:
        # Hints may name a LeRobot key by its short name ("q" for "observation.q"); a state key named
        # like a camera ("camera_pose") is not one.
        kind = kind_of(key)
        return kinds.get(key, kinds.get(key.removeprefix("observation."), "unknown" if kind == "camera" else kind))
    obs = [ObsField(key, lowdim_kind(key), (dim,), part) for key, part, dim in state_keys]
    obs += [ObsField(key, "camera", shape, camera=cam, crop=crop) for cam, key, shape in cameras]
    dt = hints.get("dt")
    if dt is None:
        return None, "the data does not say its control period: set data.spec.dt (or data.spec.fps)"
    if not (isinstance(dt, (int, float)) and not isinstance(dt, bool)):
        raise SpecError(f"data.spec.dt: the control period in seconds, got {dt!r}")
    action = dict(hints.get("action", {}))
    unknown = sorted(set(action) - {"kind", "absolute", "dims", "fixed", "gripper"})
    if unknown:
        raise SpecError(f"data.spec.action.{unknown[0]}: unknown (known: kind, absolute, dims, fixed, gripper)")
    if not action:
        if action_dim not in (6, 7):
            return None, (f"the data does not say what its {action_dim} action columns are: set data.spec.action "
                          f"(kind joint_pos or tcp_pose, dims, fixed, gripper)")
        action = {"kind": "joint_pos", "gripper": action_dim == 7}   # six joint targets, then a gripper
    spec = PolicySpec(obs=tuple(obs), action=ActionSpec(**action), dt=float(dt), task=hints.get("task"))
    if spec.action.dim != action_dim:
        raise SpecError(f"data.spec.action: describes {spec.action.dim} columns, the data's actions have {action_dim}")
    return spec, "from the data" + (" and data.spec" if hints else "")

