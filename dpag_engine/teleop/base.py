"""What every teleoperation device gives the recorder, and how a TCP velocity becomes joint targets.

A device (SpaceMouse, keyboard) reports six axes in [-1, 1] (x, y, z, roll, pitch, yaw) and gripper
requests; `TwistShaper` turns the axes into a TCP velocity (deadband, scaling to the maximum linear
and angular speeds, a slew limit so a full push does not ask for an acceleration step), and
`TcpTarget` integrates that velocity into a TCP pose target at the recording rate, in the base or
the tool frame, keeps it inside the workspace box, and solves it to joints by inverse kinematics
warm-started from the previous target. The joints go to the same ActionScheduler and C++ loop as a
served policy's (robot.py): the recorder never commands the arm around them.

Freedrive (teach mode) has no device: the operator moves the arm by hand (freedrive.py).
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field

import numpy as np

from ..kinematics import flange_pose, fk_matrix, inverse_kinematics, matrix_from_rotvec, matrix_pose, pose_matrix

AXES = ("x", "y", "z", "roll", "pitch", "yaw")
FRAMES = ("base", "tool")
OPEN, CLOSE, TOGGLE = "open", "close", "toggle"


class TeleopFault(RuntimeError):
    """The teleoperation device stopped delivering (unplugged, read error)."""


@dataclass
class DeviceInput:
    """One reading of a device: six axes in [-1, 1] and the gripper requests since the last one."""

    axes: np.ndarray = field(default_factory=lambda: np.zeros(6))
    gripper: list[str] = field(default_factory=list)   # OPEN / CLOSE / TOGGLE, oldest first


class Teleop(abc.ABC):
    """A device that steers the TCP. `read()` is called once per recording step."""

    name: str = "teleop"

    def open(self) -> None:
        """Find and open the device (before the arm connects: a missing device is a usage error)."""

    @abc.abstractmethod
    def read(self, now: float) -> DeviceInput:
        """The axes now and the gripper requests since the previous read; TeleopFault if it stopped."""

    def on_key(self, key: str, now: float) -> bool:
        """A key from the terminal; True when this device used it (the keyboard's motion keys)."""
        return False

    def stop_motion(self) -> None:
        """Forget every held axis (after homing, at an episode's end)."""

    def close(self) -> None:
        """Release the device; idempotent."""

    def describe(self) -> str:
        return self.name


def apply_deadband(axes: np.ndarray, deadband: float) -> np.ndarray:
    """|a| <= deadband -> 0, the rest rescaled so the output still reaches 1 at full deflection."""
    a = np.clip(np.asarray(axes, dtype=np.float64), -1.0, 1.0)
    if deadband <= 0:
        return a
    return np.sign(a) * np.maximum(np.abs(a) - deadband, 0.0) / (1.0 - deadband)


class TwistShaper:
    """Axes in [-1, 1] -> TCP velocity (vx, vy, vz m/s, wx, wy, wz rad/s).

    deadband: axis values at or below it count as zero (a SpaceMouse at rest reads a few percent);
    max_linear / max_angular: the speed at full deflection; ramp_s: the time from rest to full
    speed (the velocity's slew limit, per component)."""

    def __init__(self, max_linear: float, max_angular: float, deadband: float = 0.0, ramp_s: float = 0.3):
        self.scale = np.array([max_linear] * 3 + [max_angular] * 3, dtype=np.float64)
        self.deadband, self.ramp_s = float(deadband), float(ramp_s)
        self.twist = np.zeros(6)

    def reset(self) -> None:
        self.twist = np.zeros(6)

    def __call__(self, axes: np.ndarray, dt: float) -> np.ndarray:
        want = apply_deadband(axes, self.deadband) * self.scale
        step = self.scale * (dt / self.ramp_s) if self.ramp_s > 0 else np.full(6, np.inf)
        self.twist = self.twist + np.clip(want - self.twist, -step, step)
        return self.twist.copy()


def continuous_rotvec(rv: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
    """The rotation vector of the same rotation closest to `previous`: near a half turn (a tool
    pointing down) the shortest rotation vector flips sign between two nearly equal poses; a
    dataset's TCP poses keep one branch, so they stay continuous (any equivalent rotation vector
    means the same pose to the controller and to kinematics.matrix_from_rotvec)."""
    rv = np.asarray(rv, dtype=np.float64)
    if previous is None:
        return rv
    angle = float(np.linalg.norm(rv))
    if angle < 1e-9:
        return rv
    axis = rv / angle
    best = rv
    for k in (-2, -1, 1, 2):
        cand = axis * (angle + 2 * math.pi * k)
        if np.linalg.norm(cand - previous) < np.linalg.norm(best - previous):
            best = cand
    return best


@dataclass
class StepResult:
    q: np.ndarray            # the joint target for the next step (rad)
    tcp: np.ndarray          # its TCP pose (x y z rx ry rz)
    held: str = ""           # why the target did not move as asked ("" when it did)


class TcpTarget:
    """A TCP pose target moved by a velocity, kept in the box, solved to joints.

    workspace_lo/hi: the box the C++ sink enforces (robot.SafetyLimits) on the point `box_offset`
    (flange frame; the tool centre when the driver bounds the TCP, else 0: the flange); the target's
    TCP position is clipped to it, `margin` inside, and a target whose bounded point would leave it
    is not taken. v_max: per-joint speed limits; a step that would need more than
    `speed_fraction` of them is scaled down (the scheduler would clamp it, and the arm then lags
    its recorded targets). q_min/q_max: joint ranges, kept `margin_rad` inside."""

    def __init__(self, workspace_lo, workspace_hi, v_max, q_min, q_max, tcp_offset=None, box_offset=None,
                 margin: float = 0.01, speed_fraction: float = 0.8, margin_rad: float = 0.05):
        self.lo, self.hi = np.asarray(workspace_lo, float) + margin, np.asarray(workspace_hi, float) - margin
        self.box_lo, self.box_hi = np.asarray(workspace_lo, float) + 0.002, np.asarray(workspace_hi, float) - 0.002
        self.v_max = np.asarray(v_max, float)
        self.q_min, self.q_max = np.asarray(q_min, float) + margin_rad, np.asarray(q_max, float) - margin_rad
        self.offset = None if tcp_offset is None or not np.any(tcp_offset) else np.asarray(tcp_offset, float)
        self.box_point = np.append(np.zeros(3) if box_offset is None else np.asarray(box_offset, float)[:3], 1.0)
        self.speed_fraction = speed_fraction
        self.q: np.ndarray | None = None
        self.pose: np.ndarray | None = None   # 4x4 TCP

    def reset(self, q: np.ndarray) -> None:
        """Anchor the target at the arm's joints."""
        self.q = np.asarray(q, dtype=np.float64).copy()
        t = fk_matrix(self.q)
        self.pose = t if self.offset is None else t @ pose_matrix(self.offset)

    def tcp(self) -> np.ndarray:
        return matrix_pose(self.pose)

    def in_box(self, q: np.ndarray) -> bool:
        p = (fk_matrix(q) @ self.box_point)[:3]
        return bool(np.all(p >= self.box_lo) and np.all(p <= self.box_hi))

    def _moved(self, twist: np.ndarray, dt: float, frame: str) -> tuple[np.ndarray, bool]:
        """The target moved by twist * dt, its position clipped into the box; and whether it was clipped."""
        v, w = twist[:3] * dt, twist[3:] * dt
        t = self.pose.copy()
        r = t[:3, :3]
        if frame == "tool":
            t[:3, 3] = t[:3, 3] + r @ v
            t[:3, :3] = r @ matrix_from_rotvec(w)
        else:
            t[:3, 3] = t[:3, 3] + v
            t[:3, :3] = matrix_from_rotvec(w) @ r
        p = np.clip(t[:3, 3], self.lo, np.maximum(self.hi, self.lo))
        clipped = bool(np.any(p != t[:3, 3]))
        t[:3, 3] = p
        return t, clipped

    def _solve(self, t: np.ndarray) -> np.ndarray | None:
        return inverse_kinematics(flange_pose(matrix_pose(t), self.offset), self.q)

    def step(self, twist: np.ndarray, dt: float, frame: str = "base") -> StepResult:
        """Move the target by twist * dt; the joints for it (or the previous ones, with the reason)."""
        if not np.any(twist):
            return StepResult(self.q.copy(), self.tcp())
        t, clipped = self._moved(twist, dt, frame)
        q = self._solve(t)
        if q is None:
            return StepResult(self.q.copy(), self.tcp(), "out of reach (no IK solution)")
        worst = float(np.max(np.abs(q - self.q) / (self.speed_fraction * self.v_max * dt)))
        if worst > 1.0:   # near a singularity a small TCP step is a large joint step: go slower there
            t, clipped = self._moved(twist / worst, dt, frame)
            q = self._solve(t)
            if q is None or np.max(np.abs(q - self.q) / (self.speed_fraction * self.v_max * dt)) > 1.0 + 1e-6:
                return StepResult(self.q.copy(), self.tcp(), "joint speed limit (near a singularity?)")
        if np.any(q < self.q_min) or np.any(q > self.q_max):
            return StepResult(self.q.copy(), self.tcp(), "joint range")
        if not self.in_box(q):
            return StepResult(self.q.copy(), self.tcp(), "workspace box")
        self.q, self.pose = q, t
        return StepResult(q.copy(), self.tcp(), "workspace box" if clipped else "")

    def chunk(self, q_prev: np.ndarray, q_next: np.ndarray) -> np.ndarray:
        """The rows to submit for one step: the target, then one step more at the same joint velocity
        (so the scheduler's curve keeps its speed through the target instead of stopping at it),
        unless that step would leave the box or the joint ranges (then the target, held)."""
        ahead = q_next + (q_next - q_prev)
        if np.any(q_next != q_prev) and self.in_box(ahead) and np.all(ahead >= self.q_min) and np.all(ahead <= self.q_max):
            return np.stack([q_next, ahead])
        return np.stack([q_next, q_next])
