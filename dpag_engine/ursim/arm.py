"""The emulated UR5's joints and motion model: how the joints follow servo, speed and move commands.

One Arm is the joint state (q, qd, qdd) and the motion in progress (`mode`):
  idle   standing still
  servo  tracking a servo target (servoJ/servoL) at the joints' v_max / a_max
  move   a synchronised joint move (moveJ) at the move's speed and acceleration
  speed  ramping to a joint velocity (speedJ)
  stop   braking to a stop (stopJ, the end of a program)
  teach  freedrive (teach mode): the operator's hand moves the arm, no command does
The arm only moves and checks its commands against the joint limits: a command it refuses
returns the reason, and the controller (controller.py) turns that into a protective stop.

The operator's hand, for tests: in teach mode, teach_path(path, dt, t0) is a list of joint vectors
the hand passes through at t0, t0 + dt, ... (controller time, the RTDE timestamp); between them it
moves in straight lines, and after the last it holds the arm there. The arm follows the hand within
its v_max / a_max (follow_step): on a path within the limits it is exactly where the hand is at every
cycle's timestamp; a hand faster than the limits is followed late, never faster.
"""
import math

import numpy as np

from ..kinematics import fk_matrix, forward_kinematics, matrix_from_rotvec, rotvec_from_matrix
from .kinematics import track_step, velocity_step

MAX_TEACH_PATH = 200_000        # points of one hand path (27 min at 125 Hz spacing)


def follow_step(q, v, hand_prev, hand_now, dt, v_max, a_max):
    """One cycle of a joint following a moving point (the hand) within limits.

    The hand moved from hand_prev to hand_now in dt: its velocity is fed forward, and the error the
    joint had from hand_prev is closed in the hand's moving frame as track_step closes it for a still
    target (at most sqrt(2 a_max |e|) toward it, so no overshoot); then v_max and a_max * dt cap the
    joint's velocity. On the hand and within the limits, the joint lands on hand_now. Returns (q, v)."""
    v_hand = (hand_now - hand_prev) / dt
    e = hand_prev - q
    u = np.clip(e / dt, -np.sqrt(2.0 * a_max * np.abs(e)), np.sqrt(2.0 * a_max * np.abs(e)))
    v_new = np.clip(np.clip(v_hand + u, -v_max, v_max), v - a_max * dt, v + a_max * dt)
    return q + v_new * dt, v_new


class Arm:
    """Joint state and motion of a UR5 within `limits` (a JointLimits), stepped every dt seconds.

    servo_horizon_s sets the servo rule: a servo target (servoJ/servoL) farther than
    v_max * servo_horizon_s from the actual position of any joint, or outside the joint
    position range, is refused.
    """

    def __init__(self, q0, limits, dt, servo_horizon_s):
        self.limits, self.dt, self.servo_horizon_s = limits, dt, servo_horizon_s
        self.q = np.array(q0 if q0 is not None else [0.0, -1.57, 1.57, -1.57, -1.57, 0.0], float)
        self.qd = np.zeros(6)
        self.qdd = np.zeros(6)
        self.mode = "idle"          # idle | servo | speed | move | stop | teach
        self.target = self.q.copy()
        self._vel_target = np.zeros(6)
        self._move_v = self._move_a = None
        self._acc = limits.a_max
        self._t = None              # controller time of the last step
        self._hand = None           # teach mode: (t0, dt, path (n, 6)) of the operator's hand

    def step(self, enabled, t=None):
        """One controller cycle at controller time t (None: one dt after the last). Not enabled
        (robot not running, or a safety stop): the joints stand still. Returns False if a speed or
        stop motion has left the joint range; the arm has then halted there (for the controller's
        protective stop)."""
        lim = self.limits
        qd_prev = self.qd.copy()
        in_range = True
        t_prev = self._t
        if t is None:
            t = self.dt if t_prev is None else t_prev + self.dt
        self._t = t
        h = self.dt
        if not enabled or self.mode == "idle":
            self.qd[:] = 0.0
        elif self.mode == "teach":
            # The hand moves the arm in controller time: the cycle spans what really elapsed since
            # the last one (a late cycle of a loaded machine is a longer step, not a lag).
            h = self.dt if t_prev is None else max(t - t_prev, 1e-4)
            self.q, self.qd = follow_step(self.q, self.qd, self._hand_at(t - h), self._hand_at(t), h,
                                          lim.v_max, lim.a_max)
        elif self.mode == "servo":
            self.q, self.qd = track_step(self.q, self.qd, self.target, self.dt, lim.v_max, lim.a_max)
        elif self.mode == "move":
            self.q, self.qd = track_step(self.q, self.qd, self.target, self.dt, self._move_v, self._move_a)
            if np.max(np.abs(self.q - self.target)) < 1e-9 and np.max(np.abs(self.qd)) < 1e-6:
                self.q, self.qd, self.mode = self.target.copy(), np.zeros(6), "idle"
        elif self.mode in ("speed", "stop"):
            goal = self._vel_target if self.mode == "speed" else np.zeros(6)
            self.qd = velocity_step(self.qd, goal, self.dt, self._acc)
            self.q = self.q + self.qd * self.dt
            if self.mode == "stop" and not np.any(self.qd):
                self.mode = "idle"
            if np.any(self.q < lim.q_min) or np.any(self.q > lim.q_max):
                self.halt()
                in_range = False
        self.qdd = (self.qd - qd_prev) / h
        return in_range

    def tcp(self):
        """(TCP pose, TCP speed) of the current joints: the pose by forward kinematics, the speed
        from the pose one cycle ahead."""
        pose = forward_kinematics(self.q)
        t = fk_matrix(self.q + self.qd * self.dt)
        lin = (t[:3, 3] - pose[:3]) / self.dt
        ang = rotvec_from_matrix(t[:3, :3] @ matrix_from_rotvec(pose[3:]).T) / self.dt
        return pose, np.concatenate([lin, ang])

    # ------------------------------------------------------------------ commands
    def servo(self, target):
        """Track `target` (joint positions); the reason if it is refused."""
        lim = self.limits
        reach = lim.v_max * self.servo_horizon_s
        if not np.all(np.isfinite(target)):
            return f"servo target {target.tolist()} not finite"
        if np.any(target < lim.q_min) or np.any(target > lim.q_max):
            return f"servo target {target.round(4).tolist()} outside joint range"
        if np.any(np.abs(target - self.q) > reach):
            dev = float(np.max(np.abs(target - self.q)))
            return f"servo target {dev:.4f} rad from actual q (> {reach:.4f})"
        self.mode, self.target = "servo", target
        return None

    def speed(self, qd, acc):
        """Ramp to joint velocity `qd` at `acc`; the reason if it is refused."""
        if not np.all(np.abs(qd) <= self.limits.v_max):     # (also catches NaN)
            return f"speedJ {qd.round(3).tolist()} exceeds joint speed limit"
        self.mode, self._vel_target = "speed", qd
        self._acc = self._capped(acc, self.limits.a_max)
        return None

    def move(self, target, speed, acc):
        """A joint move to `target` at `speed` and `acc`; the reason if it is refused."""
        lim = self.limits
        if not np.all((target >= lim.q_min) & (target <= lim.q_max)):    # (also catches NaN)
            return "moveJ target outside joint range"
        delta = np.abs(target - self.q)
        if np.max(delta) < 1e-12:
            return None
        # Synchronised joint move: every joint's limits scaled so they all arrive together.
        scale = delta / np.max(delta)
        speed, acc = self._capped(speed, lim.v_max), self._capped(acc, lim.a_max)
        self._move_v, self._move_a = speed * scale + 1e-12, acc * scale + 1e-12
        self.mode, self.target = "move", target
        return None

    def brake(self, acc=0.0):
        """Brake whatever motion is in progress to a stop at `acc` (0: the joints' a_max). Ends
        teach mode (the end of a program ends freedrive): the arm brakes from the hand's speed."""
        self._hand = None
        if self.mode != "idle":
            self.mode, self._acc = "stop", self._capped(acc, self.limits.a_max)

    def halt(self):
        """Stand still now (a safety stop: no braking ramp). Ends teach mode."""
        self.qd[:] = 0.0
        self.mode = "idle"
        self.target = self.q.copy()
        self._hand = None

    # ---------------------------------------------------------------- teach mode
    @property
    def teaching(self):
        return self.mode == "teach"

    def teach(self, on):
        """Teach mode (freedrive) on: the motion in progress ends and the hand holds the arm where it
        is, until a hand path moves it. Off: the arm stands still where the hand left it."""
        if on and not self.teaching:
            self.halt()
            self.mode = "teach"
            self._hand = (0.0, 1.0, self.q[None, :].copy())   # the hand holds the arm here
        elif not on and self.teaching:
            self.halt()

    def teach_path(self, path, dt, t0):
        """The operator's hand moves along `path` ((n, 6) joint vectors), one point every dt seconds
        from controller time t0. Returns the reason if it is refused (not in teach mode, a path that
        is not n x 6 finite joint vectors inside the joint range, a bad dt)."""
        if not self.teaching:
            return "teach_path refused: the arm is not in teach mode (teachMode() first); outside it no hand moves the arm"
        try:
            path = np.array(path, dtype=float)
        except (TypeError, ValueError):
            return "teach_path: q must be a list of 6-joint vectors"
        if path.ndim != 2 or path.shape[1] != 6 or not 1 <= len(path) <= MAX_TEACH_PATH:
            return f"teach_path: q must be 1..{MAX_TEACH_PATH} vectors of 6 joint positions, got shape {path.shape}"
        if not np.all(np.isfinite(path)):
            return "teach_path: q holds a non-finite joint position"
        lim = self.limits
        if np.any(path < lim.q_min) or np.any(path > lim.q_max):
            return f"teach_path: q leaves the joint range [{lim.q_min:.4f}, {lim.q_max:.4f}] rad"
        if not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
            return f"teach_path: dt must be a positive number of seconds, got {dt!r}"
        self._hand = (float(t0), float(dt), path)
        return None

    def teach_path_done(self, t):
        """True when no hand path is in progress: its last point's time has passed and the arm has
        reached it, or teach mode has ended (which drops the path)."""
        if not self.teaching or self._hand is None:
            return True
        t0, dt, path = self._hand
        return (t >= t0 + dt * (len(path) - 1) and bool(np.max(np.abs(self.q - path[-1])) < 1e-9)
                and bool(np.max(np.abs(self.qd)) < 1e-9))

    def _hand_at(self, t):
        """Where the hand is at controller time t: on the path's straight segments, its first point
        before t0, its last one after the end."""
        t0, dt, path = self._hand
        s = (t - t0) / dt
        if s <= 0 or len(path) == 1:
            return path[0]
        if s >= len(path) - 1:
            return path[-1]
        k = int(s)
        return path[k] + (s - k) * (path[k + 1] - path[k])

    def set_joint_positions(self, q):
        self.q = np.array(q, float)
        self.halt()

    @staticmethod
    def _capped(value, limit):
        """A client's speed or acceleration: at most `limit`, and `limit` when not positive."""
        return min(value, limit) if value > 0 else limit
