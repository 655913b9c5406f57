"""From a replay buffer to the policy's batches: key mapping, windows, split and normaliser data.

A batch is exactly what `DPAGPolicy.compute_loss` takes, in raw units:
    {"obs": {"state": (B, To, Ds), <camera>: (B, To, C, H, W) in [0, 1]}, "action": (B, H, Da)}
Only the first To steps of the observation window are gathered (DP's `key_first_k`): the policy
never looks at later observations, and for images that is most of the memory traffic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .formats import parse_key_spec, prepare_data
from .replay_buffer import DataError, ReplayBuffer
from .sampler import sequence_windows, split_episodes, window_rows


@dataclass
class DataConfig:
    """Where the demonstrations are and how dataset keys map to policy inputs."""

    path: str | None = None                 # a zarr replay buffer (.zarr dir or .zarr.zip), a LeRobot v3 dataset dir or a robomimic .hdf5
    action_key: str = "action"              # dataset key of the actions, (N, Da); "action" also finds robomimic's "actions"
    # Dataset keys concatenated in this order into the policy's `state`, each flattened per step;
    # "key[a:b]" takes a slice, e.g. DP's Push-T keypoints: ["keypoint", "state[:2]"].
    # LeRobot's "observation.<key>" is found as "<key>"; with the default and no such key, every
    # low-dim observation of a LeRobot or robomimic dataset is used.
    state_keys: list[str] = field(default_factory=lambda: ["state"])  # concatenated into state; "key[a:b]" slices; "state" finds LeRobot's observation.state
    # Policy camera name -> dataset key, e.g. {"image": "img"}. Frames may be HWC (DP) or CHW, uint8 or
    # float in [0, 1] or [0, 255]; they reach the policy as CHW floats in [0, 1].
    # LeRobot's "observation.images.<cam>" is found as "<cam>". Empty with policy.image set: the
    # cameras named in policy.image.cameras, or every camera of the dataset.
    cameras: dict[str, str] = field(default_factory=dict)  # policy camera -> dataset key, e.g. {image: img}; empty: from policy.image or the data
    val_ratio: float = 0.02                 # fraction of episodes held out for validation (DP's default); 0: none. A robomimic mask/valid split wins
    split_seed: int = 42                    # seed of the episode split (and of max_train_episodes)
    max_train_episodes: int | None = None   # train on a random subset of this many episodes (DP); null: all
    num_workers: int = 0                    # DataLoader workers; batches are gathered vectorised, 0 is fine
    cache_dir: str | None = "~/.cache/dpag_engine"  # LeRobot frames decode once into memory-mapped files here; null: into RAM every run
    # What the data means in robot terms where the file does not say (dpag_engine/spec.py): task,
    # dt or fps, kinds {key: joint_pos|joint_vel|tcp_pose|tcp_speed|gripper_width|task}, action
    # {kind: joint_pos|tcp_pose, absolute, dims, fixed, gripper}. Wins over the dataset's own hints.
    spec: dict[str, Any] = field(default_factory=dict)
    synthetic: bool = False                 # ignore path: generate a small point-reaching dataset (demo/tests)
    synthetic_episodes: int = 64            # episodes in the synthetic dataset
    synthetic_episode_length: int = 80      # steps per synthetic episode


def _image_layout(key: str, shape: tuple[int, ...], chw: tuple[int, int, int]) -> bool:
    """True if the stored frames are HWC (DP's layout) and need a transpose to the policy's CHW."""
    if tuple(shape) == tuple(chw):
        return False
    if tuple(shape) == (chw[1], chw[2], chw[0]):
        return True
    raise DataError(f"data/{key}: frames of shape {tuple(shape)} match neither the policy's image_shape "
                    f"(C, H, W) = {tuple(chw)} nor its HWC form")


class SequenceDataset(torch.utils.data.Dataset):
    """Windows of one split of a replay buffer. Index with a list of ints to get a whole batch."""

    def __init__(self, buffer: ReplayBuffer, cfg: DataConfig, n_obs_steps: int, horizon: int,
                 n_action_steps: int, episode_mask: np.ndarray | None = None,
                 image_shape: tuple[int, int, int] | None = None):
        self.buffer, self.cfg, self.n_obs_steps, self.horizon = buffer, cfg, n_obs_steps, horizon
        self.windows = sequence_windows(buffer.episode_ends, horizon, pad_before=n_obs_steps - 1,
                                        pad_after=n_action_steps - 1, episode_mask=episode_mask)
        self.episode_mask = episode_mask
        self.action = self._lowdim(cfg.action_key)
        if self.action.ndim != 2:
            raise DataError(f"data/{cfg.action_key}: actions must be (N, Da), got {buffer.data[cfg.action_key].shape}")
        parts = []
        for spec in cfg.state_keys:
            key, sl = parse_key_spec(spec)
            part = self._lowdim(key)[:, sl]
            if part.shape[1] == 0:
                raise DataError(f"data/{key}: slice {spec!r} selects no features")
            parts.append(part)
        self.state = np.concatenate(parts, axis=1) if parts else None
        self.images: dict[str, tuple[np.ndarray, bool, float]] = {}
        for cam, key in cfg.cameras.items():
            if image_shape is None:
                raise DataError(f"data.cameras: {cam!r} given but the policy has no image encoder (policy.image)")
            frames = self._array(key)
            hwc = _image_layout(key, frames.shape[1:], image_shape)
            # uint8 and 0..255 floats become [0, 1]; the policy expects that range.
            scale = 1 / 255 if frames.dtype == np.uint8 or (frames.size and float(frames.max()) > 1.0) else 1.0
            self.images[cam] = (frames, hwc, scale)

    def _array(self, key: str) -> np.ndarray:
        if key not in self.buffer.data:
            raise DataError(f"data/{key}: missing in {self.buffer.path} "
                            f"(loaded: {', '.join('data/' + k for k in self.buffer.data)})")
        return self.buffer.data[key]

    def _lowdim(self, key: str) -> np.ndarray:
        x = self._array(key)
        return x.reshape(len(x), -1).astype(np.float32, copy=False)

    @property
    def action_dim(self) -> int:
        return self.action.shape[1]

    @property
    def state_dim(self) -> int:
        return 0 if self.state is None else self.state.shape[1]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index):
        """An int gives one sample (no batch dim); a list of ints gives a batch."""
        if isinstance(index, (int, np.integer)):
            batch = self.__getitems__([int(index)])
            return {"obs": {k: v[0] for k, v in batch["obs"].items()}, "action": batch["action"][0]}
        return self.__getitems__(list(index))

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        # torch's DataLoader calls this with a whole batch of indices when it exists.
        rows = window_rows(self.windows[np.asarray(indices, dtype=np.int64)], self.horizon)
        obs_rows = rows[:, :self.n_obs_steps]
        obs: dict[str, torch.Tensor] = {}
        if self.state is not None:
            obs["state"] = torch.from_numpy(self.state[obs_rows])
        for cam, (frames, hwc, scale) in self.images.items():
            x = torch.from_numpy(frames[obs_rows]).float()
            if hwc:
                x = x.permute(0, 1, 4, 2, 3)
            obs[cam] = (x * scale).contiguous()
        return {"obs": obs, "action": torch.from_numpy(self.action[rows])}

    def normalizer_data(self) -> dict[str, torch.Tensor]:
        """Every row of this split's episodes, per normalised key (fit the normaliser on train only)."""
        mask = np.ones(self.buffer.n_episodes, bool) if self.episode_mask is None else self.episode_mask
        rows = np.concatenate([np.arange(s, e) for s, e, m in
                               zip(self.buffer.episode_starts, self.buffer.episode_ends, mask) if m])
        out = {"action": torch.from_numpy(self.action[rows])}
        if self.state is not None:
            out["state"] = torch.from_numpy(self.state[rows])
        return out


def collate_batch(batch):
    """The dataset already returns whole batches (`__getitems__`); nothing to stack."""
    return batch


def load_datasets(cfg: DataConfig, n_obs_steps: int, horizon: int, n_action_steps: int,
                  image_shape: tuple[int, int, int] | None = None,
                  buffer: ReplayBuffer | None = None) -> tuple[SequenceDataset, SequenceDataset | None]:
    """(train, val) datasets split by episode; val is None when data.val_ratio is 0."""
    if buffer is None:
        # any format; prepare_data resolves cfg's keys against the data in place
        buffer, _ = prepare_data(cfg, {"image_shape": list(image_shape)} if image_shape and cfg.cameras else None)
    given = buffer.split if cfg.val_ratio > 0 else None  # the dataset's own split, unless validation is off
    train_mask, val_mask = split_episodes(buffer.n_episodes, cfg.val_ratio, cfg.split_seed, cfg.max_train_episodes,
                                          given)
    args = (cfg, n_obs_steps, horizon, n_action_steps)
    train = SequenceDataset(buffer, *args, episode_mask=train_mask, image_shape=image_shape)
    if len(train) == 0:
        raise DataError(f"{buffer.path}: no training windows (episodes shorter than the horizon {horizon} "
                        f"minus padding?)")
    val = SequenceDataset(buffer, *args, episode_mask=val_mask, image_shape=image_shape) if val_mask.any() else None
    if val is not None and len(val) == 0:
        val = None
    return train, val
