"""UR5 kinematics, once for the whole package: DH forward kinematics (one pose or a batch, every
frame), rotation vector <-> matrix, a numerical inverse kinematics, and the arm's joint limits.

Used by the robot driver (robot.py: servoL targets), the controller emulator (ursim/: reported TCP
pose and speed, servoL / moveJ_IK) and the reach task (envs/ur5_reach.py: expert IK, collision
check of the links). numpy only: no torch, no emulator. The C++ loop has its own copy of the FK
(csrc/robot_bridge.cpp, `_C.ur5_tcp_position`, for the workspace box); tests/test_mailbox_sink.py
holds it equal to this one to 1e-12.

Poses follow the UR controller convention: [x, y, z, rx, ry, rz] in the DH base frame (what RTDE
reports as actual_TCP_pose), the rotation as a rotation vector. TCP = flange (no tool offset).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# UR5 (CB3 and e-Series "UR5e" differ; this is the classic UR5) standard DH parameters.
UR5_DH_A = (0.0, -0.425, -0.39225, 0.0, 0.0, 0.0)
UR5_DH_D = (0.089159, 0.0, 0.0, 0.10915, 0.09465, 0.0823)
UR5_DH_ALPHA = (math.pi / 2, 0.0, 0.0, math.pi / 2, -math.pi / 2, 0.0)

_A = np.array(UR5_DH_A)
_D = np.array(UR5_DH_D)
_COS_ALPHA = np.array([math.cos(x) for x in UR5_DH_ALPHA])
_SIN_ALPHA = np.array([math.sin(x) for x in UR5_DH_ALPHA])


@dataclass(frozen=True)
class JointLimits:
    """Per-joint limits of the UR5 (the same for every joint).

    The emulator's arm enforces all four (ursim); the reach task's kinematic rollout arm moves no
    faster than v_max. Range and velocity are from the UR5 data sheet (+-360 deg, 180 deg/s).
    Acceleration is not in the data sheet; 25 rad/s^2 is a chosen value (generous for servo use).
    """
    q_min: float = -2 * math.pi
    q_max: float = 2 * math.pi
    v_max: float = math.pi
    a_max: float = 25.0


UR5_LIMITS = JointLimits()


def _link_transforms(q: np.ndarray) -> np.ndarray:
    """(..., 6) joint vectors -> (..., 6, 4, 4): the DH transform of each link i-1 -> i."""
    ct, st = np.cos(q), np.sin(q)
    m = np.zeros(q.shape + (4, 4))
    m[..., 0, 0], m[..., 0, 1], m[..., 0, 2], m[..., 0, 3] = ct, -st * _COS_ALPHA, st * _SIN_ALPHA, _A * ct
    m[..., 1, 0], m[..., 1, 1], m[..., 1, 2], m[..., 1, 3] = st, ct * _COS_ALPHA, -ct * _SIN_ALPHA, _A * st
    m[..., 2, 1], m[..., 2, 2], m[..., 2, 3] = _SIN_ALPHA, _COS_ALPHA, _D
    m[..., 3, 3] = 1.0
    return m


def frame_transforms(q) -> np.ndarray:
    """(..., 6) joint vectors -> (..., 7, 4, 4): DH frames 0..6 in the base frame (0 = base, 6 = flange)."""
    m = _link_transforms(np.asarray(q, dtype=float))
    out = np.empty(m.shape[:-3] + (7, 4, 4))
    out[..., 0, :, :] = np.eye(4)
    t = out[..., 0, :, :]
    for i in range(6):
        t = out[..., i + 1, :, :] = t @ m[..., i, :, :]
    return out


def fk_matrix(q) -> np.ndarray:
    """4x4 homogeneous transform of the tool flange in the base frame ((..., 4, 4) for a batch).

    The product of the same link transforms as frame_transforms, without keeping the frames
    between (the emulator calls this every cycle and inverse_kinematics 7 times an iteration).
    """
    m = _link_transforms(np.asarray(q, dtype=float))
    t = np.eye(4) @ m[..., 0, :, :]
    for i in range(1, 6):
        t = t @ m[..., i, :, :]
    return t


def frame_origins(qs) -> np.ndarray:
    """(N, 6) joint vectors -> (N, 7, 3) origins of DH frames 0..6 (frame 6 = flange = TCP).

    Frames 2..6 are the elbow, wrist 1, wrist 2, wrist 3 and the flange; the segments between them
    are the centre lines of the forearm and wrist links (DH folds the UR5's lateral link offsets
    into d4, so these are approximations of the physical links, good enough for a clearance check).
    """
    return frame_transforms(np.asarray(qs, dtype=float).reshape(-1, 6))[:, :, :3, 3]


def rotvec_from_matrix(r) -> np.ndarray:
    """Rotation vector (axis * angle) of a rotation matrix, robust near 0 and pi."""
    cos_angle = max(-1.0, min(1.0, (np.trace(r) - 1.0) / 2.0))
    angle = math.acos(cos_angle)
    if angle < 1e-9:
        return np.zeros(3)
    if math.pi - angle < 1e-6:
        # sin(angle) ~ 0: take the axis from the diagonal of (R + I) / 2 = a a^T.
        m = (r + np.eye(3)) / 2.0
        i = int(np.argmax(np.diag(m)))
        axis = m[:, i] / math.sqrt(m[i, i])
        return axis * angle
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]]) / (2 * math.sin(angle))
    return axis * angle


def matrix_from_rotvec(v) -> np.ndarray:
    """Rotation matrix of a rotation vector (Rodrigues)."""
    v = np.asarray(v, dtype=float)
    angle = float(np.linalg.norm(v))
    if angle < 1e-12:
        return np.eye(3)
    k = v / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


def forward_kinematics(q) -> np.ndarray:
    """TCP pose [x, y, z, rx, ry, rz] of joint vector q (TCP = flange, no tool offset)."""
    t = fk_matrix(q)
    return np.concatenate([t[:3, 3], rotvec_from_matrix(t[:3, :3])])


def _pose_error(t_target, t_current):
    """6-vector (position error, rotation error as rotation vector), both in base frame."""
    dp = t_target[:3, 3] - t_current[:3, 3]
    dr = rotvec_from_matrix(t_target[:3, :3] @ t_current[:3, :3].T)
    return np.concatenate([dp, dr])


def inverse_kinematics(pose, q_near, iterations=50, tol=1e-7):
    """Joint vector reaching `pose`, found by damped least squares from `q_near`.

    Like URScript get_inverse_kin(pose, qnear) it returns the solution closest to
    q_near (the one a continuous servoL stream wants). Returns None if it does not
    converge (unreachable pose or a singularity), or for a pose no arm can reach (NaN,
    inf, or so far out that the iteration overflows: the emulator feeds it client data).
    """
    if not (np.all(np.isfinite(pose)) and np.all(np.isfinite(q_near))):
        return None
    try:
        with np.errstate(all="ignore"):     # overflow just means "no solution" here
            t_target = np.eye(4)
            t_target[:3, :3] = matrix_from_rotvec(pose[3:6])
            t_target[:3, 3] = pose[:3]
            q = _dls_iterations(t_target, np.array(q_near, dtype=float), iterations, tol,
                                eps=1e-6, damping=1e-4)
    except (ValueError, OverflowError, np.linalg.LinAlgError):     # singular solve
        return None
    return q if q is not None and np.all(np.isfinite(q)) else None


def _dls_iterations(t_target, q, iterations, tol, eps, damping):
    for _ in range(iterations):
        t = fk_matrix(q)
        err = _pose_error(t_target, t)
        if not np.all(np.isfinite(err)):    # the iteration overflowed (cos(inf) is nan here)
            return None
        if float(np.dot(err, err)) < tol * tol:
            return q
        jac = np.empty((6, 6))
        for j in range(6):
            dq = q.copy()
            dq[j] += eps
            jac[:, j] = _pose_error(fk_matrix(dq), t) / eps
        step = jac.T @ np.linalg.solve(jac @ jac.T + damping * np.eye(6), err)
        q = q + step
    return None


def pose_matrix(pose) -> np.ndarray:
    """[x, y, z, rx, ry, rz] -> 4x4."""
    t = np.eye(4)
    t[:3, :3] = matrix_from_rotvec(np.asarray(pose[3:6], dtype=float))
    t[:3, 3] = pose[:3]
    return t


def matrix_pose(t) -> np.ndarray:
    """4x4 -> [x, y, z, rx, ry, rz]."""
    return np.concatenate([t[:3, 3], rotvec_from_matrix(t[:3, :3])])


def tcp_pose(q, tcp_offset=None) -> np.ndarray:
    """The tool centre point's pose: the flange pose composed with the tool offset (flange frame),
    as the controller reports actual_TCP_pose with that TCP set."""
    t = fk_matrix(q)
    return matrix_pose(t if tcp_offset is None else t @ pose_matrix(tcp_offset))


def flange_pose(tcp, tcp_offset=None) -> np.ndarray:
    """Inverse of tcp_pose's composition: the flange pose that puts the TCP at `tcp`."""
    return np.asarray(tcp, dtype=float) if tcp_offset is None else \
        matrix_pose(pose_matrix(tcp) @ np.linalg.inv(pose_matrix(tcp_offset)))


def tcp_speed(q, qd, tcp_offset=None, eps: float = 1e-5) -> np.ndarray:
    """TCP velocity [vx, vy, vz, wx, wy, wz] (base frame) of joint velocity qd, by a forward difference."""
    q, qd = np.asarray(q, dtype=float), np.asarray(qd, dtype=float)
    t0 = fk_matrix(q)
    t1 = fk_matrix(q + eps * qd)
    if tcp_offset is not None:
        off = pose_matrix(tcp_offset)
        t0, t1 = t0 @ off, t1 @ off
    return np.concatenate([(t1[:3, 3] - t0[:3, 3]) / eps, rotvec_from_matrix(t1[:3, :3] @ t0[:3, :3].T) / eps])
