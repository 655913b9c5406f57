"""UR5 kinematics for the controller emulator: DH forward kinematics, a numerical
inverse kinematics good enough for servoL/moveJ_IK, and the limited joint tracker.

Poses follow the UR controller convention: [x, y, z, rx, ry, rz] in the DH base
frame (what RTDE reports as actual_TCP_pose), the rotation as a rotation vector.
"""
import math
from dataclasses import dataclass

import numpy as np

# UR5 (CB3 and e-Series "UR5e" differ; this is the classic UR5) standard DH parameters.
UR5_DH_A = (0.0, -0.425, -0.39225, 0.0, 0.0, 0.0)
UR5_DH_D = (0.089159, 0.0, 0.0, 0.10915, 0.09465, 0.0823)
UR5_DH_ALPHA = (math.pi / 2, 0.0, 0.0, math.pi / 2, -math.pi / 2, 0.0)


@dataclass(frozen=True)
class JointLimits:
    """Per-joint limits the emulated arm enforces (UR5 defaults).

    Velocity: the UR5 data sheet gives 180 deg/s for every joint. Acceleration is
    not in the data sheet; 25 rad/s^2 is a chosen value (generous for servo use).
    """
    q_min: float = -2 * math.pi
    q_max: float = 2 * math.pi
    v_max: float = math.pi
    a_max: float = 25.0


UR5_LIMITS = JointLimits()


def _dh(theta, d, a, alpha):
    ct, st, ca, sa = math.cos(theta), math.sin(theta), math.cos(alpha), math.sin(alpha)
    return np.array([[ct, -st * ca, st * sa, a * ct],
                     [st, ct * ca, -ct * sa, a * st],
                     [0.0, sa, ca, d],
                     [0.0, 0.0, 0.0, 1.0]])


def fk_matrix(q):
    """4x4 homogeneous transform of the tool flange in the base frame."""
    t = np.eye(4)
    for i in range(6):
        t = t @ _dh(q[i], UR5_DH_D[i], UR5_DH_A[i], UR5_DH_ALPHA[i])
    return t


def rotvec_from_matrix(r):
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


def matrix_from_rotvec(v):
    v = np.asarray(v, dtype=float)
    angle = float(np.linalg.norm(v))
    if angle < 1e-12:
        return np.eye(3)
    k = v / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


def forward_kinematics(q):
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
    except (ValueError, OverflowError, np.linalg.LinAlgError):     # math.cos(inf), singular solve
        return None
    return q if q is not None and np.all(np.isfinite(q)) else None


def _dls_iterations(t_target, q, iterations, tol, eps, damping):
    for _ in range(iterations):
        t = fk_matrix(q)
        err = _pose_error(t_target, t)
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


def track_step(q, v, target, dt, v_max, a_max):
    """One controller cycle of a joint moving toward `target` within limits.

    The desired velocity reaches the target in one cycle, capped by v_max and by
    sqrt(2 a_max |e|) so the joint can still brake to a stop at the target
    (no overshoot); the change of velocity is then capped by a_max * dt.
    All arguments are numpy arrays (v_max and a_max may be scalars). Returns (q, v).
    """
    e = target - q
    v_des = np.clip(e / dt, -v_max, v_max)
    brake = np.sqrt(2.0 * a_max * np.abs(e))
    v_des = np.clip(v_des, -brake, brake)
    v_new = np.clip(v_des, v - a_max * dt, v + a_max * dt)
    return q + v_new * dt, v_new


def velocity_step(v, v_target, dt, a_max):
    """One cycle of ramping velocity toward v_target at acceleration a_max."""
    return np.clip(v_target, v - a_max * dt, v + a_max * dt)
