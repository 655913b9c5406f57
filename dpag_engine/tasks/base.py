"""What a task plug-in provides: episodes, the inputs only the task knows, the scene, a score.

Serving and recording are task-blind: they build observations and commands from the checkpoint's
spec (dpag_engine/spec.py) and the robot config, and ask the task only for what a robot cannot
measure:

    sample_episode(rng)   the per-episode setup (e.g. a goal), JSON-safe
    inputs(episode)       values of the spec's "task" observation keys (e.g. {"goal": (3,)})
    scene(episode)        what the cell shows for it (the emulator renders it; on a real cell the
                          operator sets it up): {"goal": [x, y, z] | None, ...}
    evaluate(trace, episode)   success and task metrics from what the arm did
    write_demonstrations(...)  an expert's dataset, with the spec hints training turns into the spec

`OwnTask` is the plug-in for a lab's own task: nothing to sample, no inputs, no score but jerk.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from ..envs.ur5_reach import mean_jerk


@dataclass
class Trace:
    """What one episode did, sampled at the policy's rate."""

    q: np.ndarray                          # (T, 6) measured joint positions
    gripper_width: np.ndarray | None = None  # (T,) measured opening (m), None without a gripper


class Task(abc.ABC):
    name: str
    dt: float                 # control period of its demonstrations (s)
    episode_steps: int        # policy steps per episode
    q_home: tuple[float, ...]
    needs_scene: bool = False  # its goal is shown by the scene only (not a task input)

    def sample_episode(self, rng: np.random.Generator) -> dict:
        return {}

    def inputs(self, episode: dict) -> dict[str, np.ndarray]:
        return {}

    def scene(self, episode: dict) -> dict:
        return {}

    def evaluate(self, trace: Trace, episode: dict) -> dict:
        return {"success": None, "mean_jerk": mean_jerk(trace.q, self.dt)}

    def write_demonstrations(self, out, n_episodes: int, seed: int = 0, overwrite: bool = False,
                             progress: bool = False) -> dict:
        raise NotImplementedError(f"task {self.name}: has no scripted expert (record demonstrations instead)")


@dataclass
class OwnTask(Task):
    """A lab's own task: episodes of a fixed length from the cell's home pose, judged by the operator."""

    q_home: tuple[float, ...]
    dt: float
    episode_steps: int
    name: str = "own"
