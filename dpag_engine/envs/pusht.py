"""Push-T (gym-pusht's pymunk simulation) with Diffusion Policy's observations and coverage score.

We drive `gym_pusht.envs.pusht.PushTEnv` directly rather than through `gym.make`: the time limit
and checker wrappers add nothing here, and the scripted expert needs the bodies to copy state.

Observations per step, keyed like DP's replay buffer (`pusht_cchi_v7_replay.zarr`):
    keypoint (9, 2)       block keypoints in pixels: the 8 corners of the T's outline + its centre of mass
    state    (5,)         agent x, y, block x, y, block angle (radians, wrapped to [0, 2 pi))
    img      (96, 96, 3)  uint8 render (only when rendering is on)
DP's 9 keypoints were sampled from a mask by its keypoint manager; ours are fixed outline points of
the same T, so the layout (and the lowdim config's 9 x 2 + 2 = 20 dims) matches, not the values.

Scored as DP scores it: an episode runs up to 300 steps at 10 Hz and stops once coverage exceeds
0.95; `coverage` below is intersection(block, goal) / area(goal). DP's reward is not the coverage
but clip(coverage / 0.95, 0, 1), and the number its papers report (Push-T keypoints 0.95) is the
mean over episodes of each episode's max reward: `score` below. We also keep the raw `max_coverage`
(what a score of 1 hides: how far past 0.95 an episode got). Success is max coverage > 0.95. Test
seeds are DP's: 100000, 100001, ...
"""
from __future__ import annotations

import warnings

import numpy as np

with warnings.catch_warnings():  # pygame and pkg_resources announce themselves on import
    warnings.simplefilter("ignore")
    from gym_pusht.envs.pusht import PushTEnv

MAX_STEPS = 300
SUCCESS_COVERAGE = 0.95
TEST_START_SEED = 100000  # DP's test_start_seed for Push-T
GOAL_POSE = np.array([256.0, 256.0, np.pi / 4])

# The T in the block's local frame (gym-pusht's add_tee, scale 30): a 120 x 30 bar on top of a
# 30 x 90 stem. Outline corners in order around the shape, then the centre of mass.
T_OUTLINE = np.array([[-60, 0], [60, 0], [60, 30], [15, 30], [15, 120], [-15, 120], [-15, 30], [-60, 30]],
                     dtype=np.float64)
T_COM = np.array([0.0, 45.0])  # gym-pusht sets the centre of gravity to the mean of the two rectangles'
LOCAL_KEYPOINTS = np.vstack([T_OUTLINE, T_COM])


def rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def keypoints(block_pose: np.ndarray) -> np.ndarray:
    """(9, 2) world keypoints of a block at pose (x, y, angle); (x, y) is the body origin."""
    return LOCAL_KEYPOINTS @ rotation(block_pose[2]).T + block_pose[:2]


GOAL_KEYPOINTS = keypoints(GOAL_POSE)


def _polygons(block_pose: np.ndarray):
    import shapely.geometry as sg
    rot = rotation(block_pose[2]).T
    bar = np.array([[-60, 0], [60, 0], [60, 30], [-60, 30]]) @ rot + block_pose[:2]
    stem = np.array([[-15, 30], [15, 30], [15, 120], [-15, 120]]) @ rot + block_pose[:2]
    return sg.MultiPolygon([sg.Polygon(bar), sg.Polygon(stem)])


def coverage(block_pose: np.ndarray, goal_pose: np.ndarray = GOAL_POSE) -> float:
    """Fraction of the goal T's area covered by the block (gym-pusht's and DP's definition)."""
    goal = _polygons(np.asarray(goal_pose, dtype=np.float64))
    block = _polygons(np.asarray(block_pose, dtype=np.float64))
    return float(goal.intersection(block).area / goal.area)


class PushT:
    """One Push-T episode at a time: `reset(seed)`, then `step(action)` with a target position in
    pixels ([0, 512]^2) for the agent's PD controller; both return the observation dict."""

    def __init__(self, render: bool = False, image_size: int = 96):
        self.env = PushTEnv(obs_type="state", render_mode="rgb_array", observation_width=image_size,
                            observation_height=image_size)
        self.render_images = render
        self.steps = 0
        self.max_coverage = 0.0

    # ---- state ----
    @property
    def block_pose(self) -> np.ndarray:
        b = self.env.block
        return np.array([b.position.x, b.position.y, b.angle])

    @property
    def agent_pos(self) -> np.ndarray:
        return np.array(self.env.agent.position)

    def get_state(self) -> dict[str, np.ndarray]:
        """Everything the physics carries between steps (the block is quasi-static, see expert.py)."""
        a, b = self.env.agent, self.env.block
        return {"agent": np.array([*a.position, *a.velocity]),
                "block": np.array([*b.position, b.angle, *b.velocity, b.angular_velocity])}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        a, b = self.env.agent, self.env.block
        a.position, a.velocity = tuple(state["agent"][:2]), tuple(state["agent"][2:4])
        # Angle first: pymunk rotates about the centre of gravity, which would move the origin we set.
        b.angle = float(state["block"][2])
        b.position = tuple(state["block"][:2])
        b.velocity, b.angular_velocity = tuple(state["block"][3:5]), float(state["block"][5])

    # ---- episode ----
    def reset(self, seed: int) -> dict[str, np.ndarray]:
        self.env.reset(seed=int(seed))
        self.steps = 0
        # Over the states after each step, as DP's max reward: a start that already overlaps the
        # goal a little (a few percent at some seeds) is not the policy's coverage.
        self.max_coverage = 0.0
        return self.observe()

    def step(self, action) -> dict[str, np.ndarray]:
        action = np.clip(np.asarray(action, dtype=np.float64), 0.0, 512.0)
        self.env.step(action)  # its own coverage/reward bookkeeping is recomputed by us below
        self.steps += 1
        self.max_coverage = max(self.max_coverage, self.coverage())
        return self.observe()

    def coverage(self) -> float:
        return coverage(self.block_pose, self.env.goal_pose)

    @property
    def success(self) -> bool:
        return self.max_coverage > SUCCESS_COVERAGE

    @property
    def score(self) -> float:
        """DP's episode score: its max reward, reward = clip(coverage / 0.95, 0, 1) (DP's pusht_env.py)."""
        return min(1.0, self.max_coverage / SUCCESS_COVERAGE)

    @property
    def done(self) -> bool:
        """DP's runner stops an episode at success or after MAX_STEPS."""
        return self.success or self.steps >= MAX_STEPS

    def observe(self) -> dict[str, np.ndarray]:
        pose = self.block_pose
        obs = {"keypoint": keypoints(pose).astype(np.float32),
               "state": np.array([*self.agent_pos, pose[0], pose[1], pose[2] % (2 * np.pi)], dtype=np.float32)}
        obs.update(self.extra_obs())
        if self.render_images:
            obs["img"] = self.env._render(visualize=False)
        return obs

    def extra_obs(self) -> dict[str, np.ndarray]:
        """Task-specific observation keys (Dynamic Push-T adds the ball)."""
        return {}

    def render(self, size: int = 256) -> np.ndarray:
        """An RGB frame for videos, with the last action drawn as a cross."""
        self.env.visualization_width = self.env.visualization_height = size
        return self.env.render()
