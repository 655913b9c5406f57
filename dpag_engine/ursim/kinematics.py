"""The emulated arm's joint tracker: how the emulator's joints follow a target within limits.

The UR5 geometry (DH forward kinematics, rotation vectors, inverse kinematics, JointLimits) is not
here but in dpag_engine/kinematics.py, shared with the robot driver and the reach task.
"""
import numpy as np


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
