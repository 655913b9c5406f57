"""A checkpoint's spec applied to a cell: observations assembled from what the cell measures, and
action chunks decoded into joint targets and gripper commands.

One `Snapshot` is taken per policy step (serve and record take them the same way): the arm's
newest state, the gripper's newest width, each camera's frame nearest to the snapshot time (as
Diffusion Policy's real environment aligns camera frames and robot states to one observation
time), and the task's inputs. `ObservationBuilder` turns a window of snapshots into the policy's
tensors exactly as training built them from the dataset (state parts concatenated in the spec's
order, frames resized to the stored resolution, CHW in [0, 1]); `ActionDecoder` turns a chunk
into joint targets (TCP targets through inverse kinematics, so the scheduler's joint limits hold
for every action space) and gripper widths.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .cell import Binding
from .kinematics import flange_pose, inverse_kinematics, tcp_pose, tcp_speed
from .spec import TCP_COMPONENTS, PolicySpec


@dataclass
class Snapshot:
    """What the cell measured for one policy step."""

    t: float                                   # the observation time (time.monotonic())
    q: np.ndarray                              # (6,) measured joints
    qd: np.ndarray                             # (6,) measured joint velocities
    gripper_width: float | None = None         # m
    frames: dict = field(default_factory=dict)  # camera name -> cameras.Frame
    task: dict = field(default_factory=dict)    # task input name -> values


class ObservationBuilder:
    def __init__(self, spec: PolicySpec, bindings: list[Binding], tcp_offset=None):
        self.spec, self.tcp_offset = spec, None if tcp_offset is None or not np.any(tcp_offset) else np.asarray(tcp_offset)
        self.state_bindings = [b for b in bindings if b.field.kind != "camera"]
        self.camera_bindings = [b for b in bindings if b.field.kind == "camera"]

    def source(self, name: str, snap: Snapshot) -> np.ndarray:
        if name == "robot.joint_pos":
            return snap.q
        if name == "robot.joint_vel":
            return snap.qd
        if name == "robot.tcp_pose":
            return tcp_pose(snap.q, self.tcp_offset)
        if name == "robot.tcp_speed":
            return tcp_speed(snap.q, snap.qd, self.tcp_offset)
        if name == "gripper.width":
            return np.array([snap.gripper_width], dtype=np.float64)
        return np.asarray(snap.task[name[5:]], dtype=np.float64).reshape(-1)   # task.<input>

    def state(self, snap: Snapshot) -> np.ndarray:
        """The policy's low-dim state for one step, (Ds,) float64."""
        parts = []
        for b in self.state_bindings:
            values = np.concatenate([self.source(s, snap) for s in b.sources])
            a, b_ = b.field.part if b.field.part is not None else (0, len(values))
            parts.append(values[a:b_])
        return np.concatenate(parts) if parts else np.zeros(0)

    def images(self, snap: Snapshot) -> dict[str, np.ndarray]:
        """Each policy camera's frame as stored in training: (C, H, W) uint8 at the spec's resolution."""
        from .data.formats import resize_frames   # the resize training applied to frames of another size
        out = {}
        for b in self.camera_bindings:
            image = snap.frames[b.sources[0][7:]].image
            c, h, w = b.field.shape
            if image.shape[:2] != (h, w):
                image = resize_frames(image[None], (h, w))[0]
            if c == 1 and image.shape[2] == 3:
                raise ValueError(f"camera for {b.field.key!r}: the policy takes 1 channel, the camera delivers RGB")
            out[b.field.camera] = np.ascontiguousarray(image.transpose(2, 0, 1))
        return out

    def policy_obs(self, window: list[tuple[np.ndarray, dict[str, np.ndarray]]]) -> dict[str, torch.Tensor]:
        """(state, images) of the last To steps, oldest first -> the policy's batch of one."""
        obs: dict[str, torch.Tensor] = {}
        if self.state_bindings:
            obs["state"] = torch.from_numpy(np.stack([s for s, _ in window]).astype(np.float32))[None]
        for b in self.camera_bindings:
            frames = np.stack([imgs[b.field.camera] for _, imgs in window])
            obs[b.field.camera] = (torch.from_numpy(frames).float() / 255.0)[None]
        return obs


class ActionDecoder:
    """A chunk (rows, Da) in the policy's units -> (joint targets (rows, 6), gripper widths (rows,) | None)."""

    def __init__(self, spec: PolicySpec, tcp_offset=None):
        self.action, self.tcp_offset = spec.action, None if tcp_offset is None or not np.any(tcp_offset) else np.asarray(tcp_offset)
        a = self.action
        if a.kind == "tcp_pose":
            self.columns = [a.dims.index(c) if c in a.dims else -1 for c in TCP_COMPONENTS]
            self.fixed = np.array([a.fixed.get(c, 0.0) for c in TCP_COMPONENTS])

    def __call__(self, actions: np.ndarray, snap: Snapshot) -> tuple[np.ndarray, np.ndarray | None]:
        a = self.action
        n_arm = len(a.dims)
        actions = np.asarray(actions)
        if actions.ndim != 2 or actions.shape[1] != a.dim:
            raise ValueError(f"action chunk: shape {actions.shape}, the spec's actions are (rows, {a.dim}) "
                             f"({', '.join(a.dims)}{', gripper' if a.gripper else ''})")
        arm = np.asarray(actions[:, :n_arm], dtype=np.float64)
        gripper = np.asarray(actions[:, n_arm], dtype=np.float64) if a.gripper else None
        if a.kind == "joint_pos":
            return (arm if a.absolute else arm + snap.q), gripper
        poses = np.where(np.array(self.columns) >= 0, arm[:, np.maximum(self.columns, 0)], self.fixed)
        if not a.absolute:
            poses = poses + tcp_pose(snap.q, self.tcp_offset)
        joints, q_near = np.empty((len(poses), 6)), snap.q
        for i, pose in enumerate(poses):
            # Warm-started from the previous row's solution: a continuous path stays on one IK branch.
            q = inverse_kinematics(flange_pose(pose, self.tcp_offset), q_near)
            if q is None:
                raise ValueError(f"action row {i}: TCP target {np.round(pose, 4).tolist()} is out of the arm's reach "
                                 f"(inverse kinematics found no joints)")
            joints[i] = q_near = q
        return joints, gripper
