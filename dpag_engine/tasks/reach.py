"""The UR5 reach task (dpag_engine/envs/ur5_reach.py: go round a sphere to a goal) as plug-ins.

Three variants over the same geometry and expert, each a different way a lab would set it up:

    ur5_reach        state = joints + goal (a task input), actions = joint targets (servoJ)
    ur5_reach_tcp    state = TCP pose + goal, actions = TCP x, y targets with height and tool
                     orientation fixed at the home pose's (servoL)
    ur5_reach_image  state = joints + gripper width, cameras = the scene and wrist cameras; the goal
                     is shown only by a marker in the scene, never given as a number. Actions =
                     joint targets + gripper width: the arm goes round the sphere, then closes the
                     gripper at the goal. Success also needs the gripper closed at the end.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..data.replay_buffer import ReplayBufferWriter
from ..envs.ur5_reach import ReachExpert, ReachTask, evaluate
from ..gripper import GRIPPER_MODELS
from ..kinematics import forward_kinematics
from ..progress import progress_bar
from .base import Task, Trace

# The gripper of the image variant: a Robotiq 2F-85 at full speed (the emulator's model moves the same).
GRIPPER = GRIPPER_MODELS["2f85"]
GRIPPER_OPEN_M, GRIPPER_CLOSED_M, GRIPPER_SPEED_M_S = GRIPPER.stroke_m, 0.0, GRIPPER.speed_m_s
GRIPPER_CLOSED_TOL_M = 0.01   # "closed" at the end of an episode: at most this open
VARIANTS = ("joint", "tcp", "image")
IMAGE_HW = (64, 64)           # stored camera resolution of the image variant (a CPU-sized encoder's input)


def gripper_track(targets: np.ndarray, dt: float, width0: float = GRIPPER_OPEN_M) -> np.ndarray:
    """Measured widths under commanded targets: the width moves towards each at the gripper's speed."""
    widths, w = [], width0
    for target in targets:
        widths.append(w)
        w = w + float(np.clip(target - w, -GRIPPER_SPEED_M_S * dt, GRIPPER_SPEED_M_S * dt))
    return np.asarray(widths + [w])


@dataclass
class Reach(Task):
    variant: str = "joint"
    geometry: ReachTask = field(default_factory=ReachTask)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"reach variant: one of {VARIANTS}, got {self.variant!r}")
        g = self.geometry
        self.name = {"joint": "ur5_reach", "tcp": "ur5_reach_tcp", "image": "ur5_reach_image"}[self.variant]
        self.dt, self.episode_steps, self.q_home = g.dt, g.episode_steps, tuple(g.q_home)
        self.needs_scene = self.variant == "image"

    # ---- episodes ----
    def sample_episode(self, rng: np.random.Generator) -> dict:
        return {"goal": self.geometry.sample_goal(rng).tolist()}

    def inputs(self, episode: dict) -> dict[str, np.ndarray]:
        return {} if self.variant == "image" else {"goal": np.asarray(episode["goal"], dtype=np.float64)}

    def scene(self, episode: dict) -> dict:
        g = self.geometry
        return {"goal": list(episode["goal"]), "obstacle": {"center": list(g.obstacle_center), "radius": g.obstacle_radius}}

    def evaluate(self, trace: Trace, episode: dict) -> dict:
        m = evaluate(trace.q, np.asarray(episode["goal"]), self.geometry)
        if self.variant == "image":
            w = trace.gripper_width
            closed = w is not None and len(w) > 0 and float(w[-1]) <= GRIPPER_CLOSED_TOL_M
            m.update(gripper_closed=bool(closed), success=bool(m["success"] and closed))
        return m

    # ---- demonstrations ----
    def spec_hints(self) -> dict:
        """What its datasets hold, for the checkpoint's spec (dpag_engine/spec.py)."""
        hints = {"task": self.name, "dt": self.dt, "kinds": {"q": "joint_pos", "goal": "task",
                                                             "tcp_pose": "tcp_pose", "gripper_width": "gripper_width"}}
        if self.variant == "tcp":
            home = forward_kinematics(np.asarray(self.q_home))
            hints["action"] = {"kind": "tcp_pose", "dims": ["x", "y"],
                               "fixed": {c: float(v) for c, v in zip(("z", "rx", "ry", "rz"), home[2:])}}
        elif self.variant == "image":
            hints["action"] = {"kind": "joint_pos", "gripper": True}
        return hints

    def state_keys(self) -> list[str]:
        """data.state_keys for training on its datasets."""
        return {"joint": ["q", "goal"], "tcp": ["tcp_pose", "goal"], "image": ["q", "gripper_width"]}[self.variant]

    def make_episode(self, expert: ReachExpert, rng: np.random.Generator, renderer=None) -> tuple[dict, dict]:
        """One demonstration, rows t = 0 .. T-1: the observation at t, the action = target for t + 1."""
        g = self.geometry
        goal = g.sample_goal(rng)
        traj, side = expert.run(rng, goal, g.sample_start(rng))
        n = len(traj) - 1
        episode = {"q": traj[:-1].astype(np.float32)}
        if self.variant == "joint":
            episode.update(goal=np.repeat(goal[None].astype(np.float32), n, axis=0), action=traj[1:].astype(np.float32))
        elif self.variant == "tcp":
            poses = np.stack([forward_kinematics(q) for q in traj])
            episode.update(tcp_pose=poses[:-1].astype(np.float32), goal=np.repeat(goal[None].astype(np.float32), n, axis=0),
                           action=poses[1:, :2].astype(np.float32))
        else:
            # Close once the arm has arrived (the expert rests for its last second): the gripper
            # command is open while moving, closed from the first resting step on.
            moving = np.max(np.abs(np.diff(traj, axis=0)), axis=1) > 1e-6
            last_move = int(np.flatnonzero(moving)[-1]) if moving.any() else 0
            targets = np.where(np.arange(n) > last_move, GRIPPER_CLOSED_M, GRIPPER_OPEN_M)
            widths = gripper_track(targets, g.dt)
            episode.update(gripper_width=widths[:-1, None].astype(np.float32),
                           action=np.concatenate([traj[1:], targets[:, None]], axis=1).astype(np.float32))
            scene = renderer.scene(self.scene({"goal": goal.tolist()}))
            for cam in renderer.cameras:
                episode[cam] = np.stack([renderer.render(cam, q, w, scene) for q, w in zip(traj[:-1], widths[:-1])])
        trace = Trace(traj, gripper_track(episode["action"][:, 6], g.dt)[1:] if self.variant == "image" else None)
        score = self.evaluate(trace, {"goal": goal.tolist()})
        score["expert_side"] = side
        return episode, score

    def write_demonstrations(self, out, n_episodes: int, seed: int = 0, overwrite: bool = False,
                             progress: bool = False) -> dict:
        """Expert demonstrations in Diffusion Policy's zarr layout, with the spec hints as an attribute.
        Episode i draws from np.random.default_rng([seed, i]), so any one can be regenerated alone."""
        expert = ReachExpert(self.geometry)
        renderer = CellRenderer(IMAGE_HW) if self.variant == "image" else None
        scores, kept = [], 0
        with ReplayBufferWriter(out, overwrite=overwrite, spec_hints=self.spec_hints()) as writer:
            for i in progress_bar(range(n_episodes), desc=f"{self.name} expert", disable=not progress):
                episode, score = self.make_episode(expert, np.random.default_rng([seed, i]), renderer)
                scores.append(score)
                if score["success"]:   # the data shows the task done
                    writer.add_episode(episode)
                    kept += 1
            if kept == 0:
                raise RuntimeError(f"{self.name} expert: no successful episode to write")
        sides = [s["expert_side"] for s in scores]
        return {"path": str(out), "episodes": n_episodes, "written": kept,
                "success_rate": float(np.mean([s["success"] for s in scores])),
                "left": sides.count("left"), "right": sides.count("right"),
                "min_clearance_m": float(min(s["min_clearance_m"] for s in scores))}


class CellRenderer:
    """The emulated cell's cameras (dpag_engine/render.py) at a dataset's resolution: demonstrations
    are rendered by the same code, cameras and scene the emulator serves `sim:` frames from."""

    def __init__(self, hw: tuple[int, int]):
        from .. import render
        self._render = render
        self.cameras = {"scene": render.SCENE_CAMERA.resized(*hw), "wrist": render.WRIST_CAMERA.resized(*hw)}

    def scene(self, scene: dict):
        """The render.Scene of a task's scene dict, as the emulator's camera server builds it."""
        ob = scene.get("obstacle")
        s = self._render.Scene().with_goal(scene.get("goal"))
        return s.with_obstacle(ob["center"], ob["radius"]) if ob else s.with_obstacle(None)

    def render(self, camera: str, q: np.ndarray, width: float, scene) -> np.ndarray:
        return self._render.render(self.cameras[camera], np.asarray(q, dtype=float), float(width), scene)
