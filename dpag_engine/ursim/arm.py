"""The emulated UR5's joints and motion model: how the joints follow servo, speed and move commands.

One Arm is the joint state (q, qd, qdd) and the motion in progress (`mode`):
  idle   standing still
  servo  tracking a servo target (servoJ/servoL) at the joints' v_max / a_max
  move   a synchronised joint move (moveJ) at the move's speed and acceleration
  speed  ramping to a joint velocity (speedJ)
  stop   braking to a stop (stopJ, the end of a program)
The arm only moves and checks its commands against the joint limits: a command it refuses
returns the reason, and the controller (controller.py) turns that into a protective stop.
"""
import numpy as np

from ..kinematics import fk_matrix, forward_kinematics, matrix_from_rotvec, rotvec_from_matrix
from .kinematics import track_step, velocity_step


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
        self.mode = "idle"          # idle | servo | speed | move | stop
        self.target = self.q.copy()
        self._vel_target = np.zeros(6)
        self._move_v = self._move_a = None
        self._acc = limits.a_max

    def step(self, enabled):
        """One controller cycle. Not enabled (robot not running, or a safety stop): the joints
        stand still. Returns False if a speed or stop motion has left the joint range; the arm
        has then halted there (for the controller's protective stop)."""
        lim = self.limits
        qd_prev = self.qd.copy()
        in_range = True
        if not enabled or self.mode == "idle":
            self.qd[:] = 0.0
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
        self.qdd = (self.qd - qd_prev) / self.dt
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
        """Brake whatever motion is in progress to a stop at `acc` (0: the joints' a_max)."""
        if self.mode != "idle":
            self.mode, self._acc = "stop", self._capped(acc, self.limits.a_max)

    def halt(self):
        """Stand still now (a safety stop: no braking ramp)."""
        self.qd[:] = 0.0
        self.mode = "idle"
        self.target = self.q.copy()

    def set_joint_positions(self, q):
        self.q = np.array(q, float)
        self.halt()

    @staticmethod
    def _capped(value, limit):
        """A client's speed or acceleration: at most `limit`, and `limit` when not positive."""
        return min(value, limit) if value > 0 else limit
