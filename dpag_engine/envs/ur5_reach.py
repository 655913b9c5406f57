"""An embedded UR5 reach task: move the tool past a spherical obstacle to a goal, from demonstrations.

    python -m dpag_engine.tasks --task ur5_reach --out data/ur5_reach.zarr --episodes 100   # (tasks/reach.py)
    python -m dpag_engine.train --config configs/ur5_reach.toml
    python -m dpag_engine.tasks --task ur5_reach --eval outputs/ur5_reach/model.pt --episodes 100 (tasks/rollout.py)

The UR5 starts at a table-top pose with the tool pointing down, and must bring its TCP (the flange;
no tool offset) to a goal on the far side of a sphere at the same height, keeping the tool
orientation (pointing down, tilted 14 deg). A scripted expert passes the sphere on the left or on the right (a coin flip per
episode), so the demonstrations are bimodal: a policy that averages them drives into the obstacle.
That is the point of the task: it separates a multimodal policy (DP, DP-AG) from a regressor.

Conventions (the serve command uses exactly these, so keep them in sync with `observe` / `rollout`):
  * control at 10 Hz (dt = 0.1 s); step t is time t * dt;
  * state  s_t = concat(q_t (6, rad), goal (3, m, base frame)) as float32: state_dim 9;
  * action a_t = absolute joint position target (6, rad) for time (t + 1) * dt, i.e. a_t = q_{t+1}
    in the demonstrations (as `data.synthetic`: the action is the position reached at the next step);
  * the policy's chunk starts at the current step (DPAGPolicy slices action_pred from To - 1), so
    action i of a chunk predicted at step t is the target for time t + (i + 1) * dt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..kinematics import UR5_LIMITS, forward_kinematics, frame_origins, inverse_kinematics

STATE_DIM = 9   # q (6) + goal (3)
ACTION_DIM = 6  # absolute joint targets
# Held-out evaluation goals come from seeds this far above the generator's (as Push-T's test seeds).
EVAL_SEED = 100_000


def _tool_down_home() -> tuple[float, ...]:
    # A table-top pose: FK puts the TCP at about (-0.384, -0.109, 0.240) m, in front of the base (the
    # -x side, where a UR5 with q1 = 0 reaches), well inside the 0.85 m reach and away from the
    # wrist and shoulder singularities. The tool points down, tilted 0.25 rad (14 deg) back towards
    # the base (shoulder + elbow + wrist1 = -pi/2 + 0.25): with a perfectly vertical tool, wrist 2
    # would sit at exactly -pi/2 in every demonstration, and a joint that never moves in the data is
    # one the min/max normaliser cannot scale (it passes the model's error through in radians, which
    # made an undertrained policy shake the wrist by ~1 rad). With the tilt, keeping the orientation
    # fixed while the base turns moves wrist 2 by ~0.12 rad over the data set.
    # (Found by IK of that TCP at that orientation, rounded to 0.1 mrad.)
    return (0.0, -1.6683, 2.1137, -1.7662, -1.5709, 0.0)


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReachTask:
    """Geometry, timing and tolerances of the reach task (all lengths in metres, base frame)."""

    q_home: tuple[float, ...] = field(default_factory=_tool_down_home)
    # The sphere sits on the straight line from the home TCP (-0.384, -0.109) towards the goals, 14 cm
    # out, at TCP height: every straight reach would hit it, so the arm must go round.
    obstacle_center: tuple[float, float, float] = (-0.52, -0.109, 0.24)
    obstacle_radius: float = 0.06
    # Goals: a box of TCP positions 12-18 cm beyond the sphere, +-8 cm to either side of its centre
    # line, at the start's height (a planar task keeps the expert simple and the modes clean).
    goal_low: tuple[float, float, float] = (-0.70, -0.189, 0.24)
    goal_high: tuple[float, float, float] = (-0.64, -0.029, 0.24)
    start_jitter: float = 0.015     # +- metres on the start TCP x/y, so the data is not one path per side
    dt: float = 0.1                 # 10 Hz control
    episode_steps: int = 70         # actions per episode (7 s); the expert moves for <= 5.8 s, then rests
    success_tol: float = 0.02       # final TCP within 2 cm of the goal
    # Demonstrations stay far below the UR5's 180 deg/s so a 125/500 Hz servo loop tracks them with
    # little lag; the expert slows down if a plan would exceed this.
    max_demo_joint_speed: float = 1.0   # rad/s
    # The closed-loop rollout's arm: reaches each target, but no faster than the real joint limit.
    max_joint_speed: float = UR5_LIMITS.v_max

    @property
    def tool_rotvec(self) -> np.ndarray:
        """The tool orientation kept for the whole task: the home pose's (pointing down)."""
        return forward_kinematics(np.asarray(self.q_home))[3:]

    @property
    def home_tcp(self) -> np.ndarray:
        return forward_kinematics(np.asarray(self.q_home))[:3]

    def sample_goal(self, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(self.goal_low, self.goal_high)

    def sample_start(self, rng: np.random.Generator) -> np.ndarray:
        """A start configuration near home: the home TCP moved a little in x/y, same orientation."""
        xyz = self.home_tcp + np.append(rng.uniform(-self.start_jitter, self.start_jitter, 2), 0.0)
        return ik(xyz, self, np.asarray(self.q_home))


def ik(xyz: np.ndarray, task: ReachTask, q_near: np.ndarray) -> np.ndarray:
    """Joints putting the TCP at `xyz` with the task's tool orientation, nearest to q_near."""
    q = inverse_kinematics(np.concatenate([xyz, task.tool_rotvec]), q_near)
    if q is None:
        raise ValueError(f"inverse kinematics failed for TCP {np.round(xyz, 4).tolist()} (unreachable?)")
    return q


def observe(q: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """The policy's state for one step: concat(q (6), goal (3)) as float32, shape (9,)."""
    return np.concatenate([np.asarray(q, dtype=np.float64).reshape(6),
                           np.asarray(goal, dtype=np.float64).reshape(3)]).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Collision-check geometry (the link frames come from dpag_engine.kinematics.frame_origins)
# ----------------------------------------------------------------------------------------------
def _segment_distance(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Distance from point c to each segment a[k] -> b[k] (arrays (..., 3))."""
    ab = b - a
    denom = np.maximum(np.sum(ab * ab, axis=-1), 1e-18)
    s = np.clip(np.sum((c - a) * ab, axis=-1) / denom, 0.0, 1.0)
    return np.linalg.norm(a + s[..., None] * ab - c, axis=-1)


def _densify(q_traj: np.ndarray, substeps: int) -> np.ndarray:
    # Linear in joint space, because that is how the arm moves between two joint targets.
    q = np.asarray(q_traj, dtype=float)
    if len(q) < 2:
        return q
    s = np.arange(substeps) / substeps
    dense = q[:-1, None, :] + s[None, :, None] * (q[1:] - q[:-1])[:, None, :]
    return np.concatenate([dense.reshape(-1, q.shape[1]), q[-1:]])


# ----------------------------------------------------------------------------------------------
# Scripted expert
# ----------------------------------------------------------------------------------------------
def _left_normal(start: np.ndarray, goal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit direction of travel start -> goal in the x/y plane, and its left normal (CCW seen from +z)."""
    d = np.asarray(goal[:2], float) - np.asarray(start[:2], float)
    d = d / max(np.linalg.norm(d), 1e-12)
    return np.array([d[0], d[1], 0.0]), np.array([-d[1], d[0], 0.0])


def min_jerk(s: np.ndarray) -> np.ndarray:
    """Minimum-jerk time scaling 10 s^3 - 15 s^4 + 6 s^5: zero velocity and acceleration at both ends."""
    return s ** 3 * (10 - 15 * s + 6 * s * s)


@dataclass
class ReachExpert:
    """Goes round the obstacle on a random side via a Cartesian waypoint, then rests at the goal."""

    task: ReachTask = field(default_factory=ReachTask)
    # Generous clearance: a small policy trained for minutes cuts corners by a few cm, and with the
    # expert 3.5 cm off the sphere most imitations hit it (measured: 60% collisions vs 40% with these).
    margin: tuple[float, float] = (0.07, 0.10)      # waypoint clearance beyond the radius, drawn per episode
    min_clearance: float = 0.05                     # the planned TCP path keeps at least this off the sphere
    peak_speed: tuple[float, float] = (0.12, 0.17)  # m/s at the middle of the min-jerk profile

    def plan_path(self, start: np.ndarray, goal: np.ndarray, side: str, margin: float) -> Callable:
        """A quadratic Bezier start -> goal passing the waypoint beside the sphere at its midpoint.

        The waypoint is the obstacle centre pushed sideways by radius + margin; the Bezier control
        point 2 W - (P0 + P2) / 2 makes the curve go through W at s = 0.5. A curve is smooth (no corner
        at the waypoint, so no velocity jump to time-scale around). If the curve cuts the corner
        closer than min_clearance, the waypoint moves further out until it does not.
        """
        task = self.task
        c = np.asarray(task.obstacle_center, float)
        _, left = _left_normal(start, goal)
        sign = 1.0 if side == "left" else -1.0
        s = np.linspace(0.0, 1.0, 201)[:, None]
        for _ in range(20):
            w = c + sign * left * (task.obstacle_radius + margin)
            ctrl = 2 * w - (start + goal) / 2
            curve = (1 - s) ** 2 * start + 2 * s * (1 - s) * ctrl + s ** 2 * goal
            if np.min(np.linalg.norm(curve - c, axis=1)) - task.obstacle_radius >= self.min_clearance:
                break
            margin += 0.01
        else:
            raise RuntimeError("expert: no clear waypoint found")
        return lambda u: ((1 - u) ** 2)[:, None] * start + (2 * u * (1 - u))[:, None] * ctrl + (u ** 2)[:, None] * goal

    def run(self, rng: np.random.Generator, goal: np.ndarray, q0: np.ndarray | None = None,
            side: str | None = None) -> tuple[np.ndarray, str]:
        """Joint trajectory (episode_steps + 1, 6) at 10 Hz from q0 to rest at goal, and the side taken."""
        task = self.task
        q0 = np.asarray(task.q_home if q0 is None else q0, dtype=float)
        side = side or ("left" if rng.random() < 0.5 else "right")
        start = forward_kinematics(q0)[:3]
        goal = np.asarray(goal, dtype=float)
        path = self.plan_path(start, goal, side, rng.uniform(*self.margin))
        length = float(np.sum(np.linalg.norm(np.diff(path(np.linspace(0, 1, 201)), axis=0), axis=1)))
        # Min-jerk peaks at 1.875 x the mean speed; pick the duration from the drawn peak speed, and
        # leave at least a second of rest at the end so the policy also learns to stop.
        duration = 1.875 * length / rng.uniform(*self.peak_speed)
        max_motion_steps = task.episode_steps - int(round(1.0 / task.dt))
        for _ in range(10):
            n_move = int(min(max(math.ceil(duration / task.dt), 10), max_motion_steps))
            u = min_jerk(np.minimum(np.arange(task.episode_steps + 1) / n_move, 1.0))
            traj = [q0]
            for p in path(u)[1:]:  # warm-started IK keeps the solution on the same branch, step to step
                traj.append(ik(p, task, traj[-1]))
            traj = np.asarray(traj)
            speed = np.max(np.abs(np.diff(traj, axis=0))) / task.dt
            if speed <= task.max_demo_joint_speed or n_move >= max_motion_steps:
                break
            duration = n_move * task.dt * speed / task.max_demo_joint_speed * 1.05
        return traj, side


# ----------------------------------------------------------------------------------------------
# Evaluation of a joint trajectory
# ----------------------------------------------------------------------------------------------
def mean_jerk(q_traj: np.ndarray, dt: float) -> float:
    """Mean over time steps and joints of |third finite difference of q| / dt^3, in rad/s^3.

    The third forward difference q[t+3] - 3 q[t+2] + 3 q[t+1] - q[t] over dt^3 is the usual discrete
    jerk; it is exact for a cubic (6 times its leading coefficient). 0 for fewer than 4 samples.
    """
    q = np.asarray(q_traj, dtype=float)
    if len(q) < 4:
        return 0.0
    return float(np.mean(np.abs(np.diff(q, n=3, axis=0))) / dt ** 3)


def evaluate(q_traj: np.ndarray, goal: np.ndarray, task: ReachTask | None = None, substeps: int = 10,
             check_links: bool = True) -> dict:
    """Score a joint trajectory sampled at task.dt.

    success: final TCP within success_tol of the goal and no collision. collided: some point of the
    TCP path (consecutive dense samples joined by segments), or with check_links of the forearm and
    wrist link centre lines, came closer than the radius to the obstacle centre; the trajectory is
    interpolated linearly in joint space with `substeps` per step, so a fast step cannot jump over
    the sphere. min_clearance_m: the smallest such distance minus the radius (negative = inside).
    path_side: where the TCP was, seen from above relative to the start -> goal direction, when it
    first reached the obstacle's position along that direction: "left", "right", or None if it never
    got that far or went through the sphere.
    """
    task = task or ReachTask()
    q = np.asarray(q_traj, dtype=float)
    goal = np.asarray(goal, dtype=float)
    c = np.asarray(task.obstacle_center, float)
    r = task.obstacle_radius
    origins = frame_origins(_densify(q, substeps))           # (M, 7, 3)
    tcp = origins[:, 6]
    if len(tcp) > 1:
        tcp_dist = float(np.min(_segment_distance(tcp[:-1], tcp[1:], c)))
    else:
        tcp_dist = float(np.linalg.norm(tcp[0] - c))
    dist = tcp_dist
    if check_links:  # forearm (elbow -> wrist 1) and the wrist links down to the flange
        dist = min(dist, float(np.min(_segment_distance(origins[:, 2:6], origins[:, 3:7], c))))
    collided = dist < r
    final_error = float(np.linalg.norm(tcp[-1] - goal))

    direction, left = _left_normal(tcp[0], goal)
    along = (tcp - tcp[0]) @ direction
    past = np.flatnonzero(along >= (c - tcp[0]) @ direction)
    side = None
    if len(past):
        lateral = float((tcp[past[0]] - c) @ left)
        if abs(lateral) >= r:
            side = "left" if lateral > 0 else "right"
    return {"success": bool(final_error <= task.success_tol and not collided), "collided": bool(collided),
            "final_error_m": final_error, "min_clearance_m": dist - r, "tcp_clearance_m": tcp_dist - r,
            "mean_jerk": mean_jerk(q, task.dt), "path_side": side}


# ----------------------------------------------------------------------------------------------
# Closed loop without the emulator
# ----------------------------------------------------------------------------------------------
PolicyFn = Callable[[np.ndarray], np.ndarray]


def rollout(policy_fn: PolicyFn, task: ReachTask | None, goal: np.ndarray, q0: np.ndarray | None = None,
            steps: int | None = None, n_obs_steps: int = 2) -> np.ndarray:
    """Run a policy at 10 Hz on a kinematic arm; returns the joint trajectory (steps + 1, 6).

    policy_fn(state_history (To, 9) float32, oldest first) -> actions (Na, 6). The whole returned
    chunk is executed (receding horizon: observe, predict Na targets, execute them, observe again).
    Each step the arm moves to the target, but at most max_joint_speed * dt per joint - an ideal
    servo with the UR5's velocity limit. Before To observations exist, the history repeats the first
    one, as the training windows' padding does.
    """
    task = task or ReachTask()
    steps = task.episode_steps if steps is None else steps
    q = np.asarray(task.q_home if q0 is None else q0, dtype=float).copy()
    max_step = task.max_joint_speed * task.dt
    traj = [q.copy()]
    history = [observe(q, goal)] * n_obs_steps
    while len(traj) <= steps:
        actions = np.asarray(policy_fn(np.stack(history[-n_obs_steps:])), dtype=float).reshape(-1, 6)
        if len(actions) == 0:
            raise ValueError("policy_fn returned no actions")
        for target in actions:
            if len(traj) > steps:
                break
            q = q + np.clip(target - q, -max_step, max_step)
            traj.append(q.copy())
            history.append(observe(q, goal))
    return np.asarray(traj)

