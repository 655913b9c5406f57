"""Which windows we train on, which episodes we validate on, and in what order batches come.

Sequence windows follow Diffusion Policy's `create_indices` / `SequenceSampler` exactly: a window of
`horizon` steps may start up to `pad_before = To - 1` steps before an episode and end up to
`pad_after = Na - 1` steps after it; out-of-episode steps repeat the first / last step of the
episode. Repeating the edge value is the same as clamping the time index into the episode, which
is how we gather (vectorised, one numpy take per batch).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np


def sequence_windows(episode_ends: np.ndarray, horizon: int, pad_before: int = 0, pad_after: int = 0,
                     episode_mask: np.ndarray | None = None) -> np.ndarray:
    """All training windows as rows (t0, ep_start, ep_end): the window covers t0 .. t0+horizon-1,
    clamped into [ep_start, ep_end - 1]. Same windows, in the same order, as DP's create_indices."""
    ends = np.asarray(episode_ends, dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    mask = np.ones(len(ends), dtype=bool) if episode_mask is None else np.asarray(episode_mask, dtype=bool)
    if mask.shape != ends.shape:
        raise ValueError(f"episode_mask: shape {mask.shape} does not match episode_ends {ends.shape}")
    rows = []
    for start, end, keep in zip(starts, ends, mask):
        if not keep:
            continue
        length = end - start
        # DP: idx runs from -pad_before to length - horizon + pad_after (inclusive).
        first, last = -pad_before, length - horizon + pad_after
        if last < first:  # episode too short for even one window
            continue
        t0 = start + np.arange(first, last + 1)
        rows.append(np.stack([t0, np.full_like(t0, start), np.full_like(t0, end)], axis=1))
    if not rows:
        return np.zeros((0, 3), dtype=np.int64)
    return np.concatenate(rows).astype(np.int64)


def window_rows(windows: np.ndarray, length: int) -> np.ndarray:
    """(M, 3) windows -> (M, length) row indices into the buffer, with DP's edge padding."""
    t0, lo, hi = windows[:, 0:1], windows[:, 1:2], windows[:, 2:3]
    return np.clip(t0 + np.arange(length), lo, hi - 1)


def split_episodes(n_episodes: int, val_ratio: float = 0.0, seed: int = 42,
                   max_train_episodes: int | None = None,
                   given: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train_mask, val_mask) over episodes, as DP's get_val_mask + downsample_mask.

    At least one validation episode when val_ratio > 0, and always at least one training episode.
    `given` (a dataset's own train/val masks, e.g. robomimic's mask/) replaces the random draw.
    """
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"data.val_ratio: must be in [0, 1), got {val_ratio}")
    val_mask = np.zeros(n_episodes, dtype=bool)
    if given is not None:
        train_mask, val_mask = np.array(given[0], dtype=bool), np.array(given[1], dtype=bool)
    elif val_ratio > 0 and n_episodes > 1:
        n_val = min(max(1, round(n_episodes * val_ratio)), n_episodes - 1)
        rng = np.random.default_rng(seed=seed)
        val_mask[rng.choice(n_episodes, size=n_val, replace=False)] = True
    if given is None:
        train_mask = ~val_mask
    if max_train_episodes is not None and train_mask.sum() > max_train_episodes:
        keep = np.random.default_rng(seed=seed).choice(np.flatnonzero(train_mask), max_train_episodes, replace=False)
        train_mask = np.zeros(n_episodes, dtype=bool)
        train_mask[keep] = True
    return train_mask, val_mask


class GlobalBatchSampler:
    """Deterministic, resumable, shardable batch order.

    The sample stream is the concatenation of per-epoch permutations (epoch e shuffled with seed
    (seed, e)). Optimiser step s consumes stream items [s*G, (s+1)*G) for the global batch G, which
    is split into G / micro_batch chunks; chunk j goes to rank j // grad_accum. So:
      * the data order depends only on (seed, step), never on the world size: a 2-process run sees
        the same global batches as a 1-process run with gradient accumulation;
      * resuming at step s needs no saved sampler state;
      * every rank sees a disjoint shard (the role of DistributedSampler) without padding.
    Yields one list of dataset indices per micro-batch, grad_accum of them per step.
    """

    def __init__(self, n_samples: int, micro_batch: int, grad_accum: int = 1, rank: int = 0,
                 world_size: int = 1, seed: int = 0, start_step: int = 0, num_steps: int | None = None):
        if n_samples <= 0:
            raise ValueError("GlobalBatchSampler: the dataset has no training windows")
        self.n, self.b, self.accum = n_samples, micro_batch, grad_accum
        self.rank, self.world, self.seed = rank, world_size, seed
        self.start_step, self.num_steps = start_step, num_steps
        self._epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    @property
    def global_batch(self) -> int:
        return self.b * self.accum * self.world

    def chunk_ids(self) -> range:
        """Global chunk indices this rank handles at every step."""
        return range(self.rank * self.accum, (self.rank + 1) * self.accum)

    def _items(self, pos: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            epoch, offset = divmod(pos + filled, self.n)
            if epoch != self._epoch:
                self._epoch = epoch
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            take = min(count - filled, self.n - offset)
            out[filled:filled + take] = self._perm[offset:offset + take]
            filled += take
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while self.num_steps is None or step < self.num_steps:
            base = step * self.global_batch
            for chunk in self.chunk_ids():
                yield self._items(base + chunk * self.b, self.b).tolist()
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("GlobalBatchSampler: infinite (num_steps=None)")
        return max(0, self.num_steps - self.start_step) * self.accum
