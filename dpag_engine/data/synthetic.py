"""A small, learnable demonstration set for demos and tests: a point that reaches a goal.

Each episode: a 2-D point starts somewhere, a goal is drawn, and a proportional controller with a
little curl moves the point to the goal. The action is the next commanded position (as in DP's
Push-T, in pixel-like units so the normaliser has real work to do). The state is a fixed random
linear view of (position, goal, velocity) at the requested dimension, so any `state_dim` works and
the action stays a smooth function of the observation history. Cameras, when asked for, see a blob
at the point's position (HWC uint8, DP's storage layout).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .replay_buffer import ReplayBufferWriter


def _maps(state_dim: int, action_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed observation and action maps: the same for every seed, the data and the env."""
    fixed = np.random.default_rng(12345)
    return fixed.normal(size=(6, state_dim)) / np.sqrt(6), fixed.normal(size=(2, max(action_dim - 2, 0)))


def synthetic_state(pos: np.ndarray, goal: np.ndarray, vel: np.ndarray, state_map: np.ndarray) -> np.ndarray:
    """(..., 2) position, goal and velocity -> the raw state vector the policy sees."""
    goal = np.broadcast_to(goal, pos.shape)
    return ((np.concatenate([pos, goal, vel * 5], axis=-1) @ state_map) * 50 + 10).astype(np.float32)


def make_episodes(n_episodes: int = 64, episode_length: int = 80, action_dim: int = 2, state_dim: int = 20,
                  cameras: dict[str, str] | None = None, image_shape: tuple[int, int, int] = (3, 96, 96),
                  seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    state_map, action_map = _maps(state_dim, action_dim)
    episodes = []
    for _ in range(n_episodes):
        pos = rng.uniform(-1, 1, size=2)
        goal = rng.uniform(-1, 1, size=2)
        vel = np.zeros(2)
        curl = rng.uniform(-0.3, 0.3)
        positions, velocities = [], []
        for _ in range(episode_length + 1):
            positions.append(pos.copy())
            velocities.append(vel.copy())
            err = goal - pos
            vel = 0.12 * err + curl * 0.12 * np.array([-err[1], err[0]])
            pos = pos + vel
        p = np.asarray(positions)
        v = np.asarray(velocities)
        target = p[1:]                                   # commanded next position
        action = np.concatenate([target, target @ action_map], axis=1)[:, :action_dim]
        ep = {"action": (action * 200 + 256).astype(np.float32),   # pixel-like units, like Push-T
              "state": synthetic_state(p[:-1], goal, v[:-1], state_map)}
        for key in (cameras or {}).values():
            ep[key] = _render(p[:-1], image_shape)
        episodes.append(ep)
    return episodes


def _render(positions: np.ndarray, image_shape: tuple[int, int, int]) -> np.ndarray:
    """(T, 2) positions in [-1, 1] -> (T, H, W, C) uint8 frames with a Gaussian blob."""
    c, h, w = image_shape
    ys, xs = np.mgrid[0:h, 0:w]
    cy = (positions[:, 1] + 1) / 2 * (h - 1)
    cx = (positions[:, 0] + 1) / 2 * (w - 1)
    sigma = max(h, w) / 16
    blob = np.exp(-((ys[None] - cy[:, None, None]) ** 2 + (xs[None] - cx[:, None, None]) ** 2) / (2 * sigma ** 2))
    return np.repeat((blob * 255).astype(np.uint8)[..., None], c, axis=-1)


def write_synthetic(path: str | os.PathLike, overwrite: bool = True, **kwargs) -> Path:
    """Generate with `make_episodes(**kwargs)` and write a DP-layout replay buffer at `path`."""
    with ReplayBufferWriter(path, overwrite=overwrite) as writer:
        for episode in make_episodes(**kwargs):
            writer.add_episode(episode)
    return Path(path)
