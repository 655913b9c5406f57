"""Diffusion Policy's zarr replay buffer: read it, check it, write it.

Layout (Chi et al.'s `ReplayBuffer`): every time step of every episode is one row, episodes are
concatenated along axis 0, and `meta/episode_ends` holds the exclusive end row of each episode.

    <root>/data/action        (N, Da)
    <root>/data/<obs key>     (N, ...)        e.g. state (N, 5), keypoint (N, 9, 2), img (N, 96, 96, 3)
    <root>/meta/episode_ends  (E,) int        strictly increasing, last == N

The root is a directory (`foo.zarr`) or a zip of that directory (`foo.zarr.zip`), as DP ships them.
We write zarr format 2, which is what DP's own code (zarr 2.x) reads; zarr 3 reads both formats.
Malformed data raises `DataError` with a message that starts with the offending key.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import zarr

EPISODE_ENDS = "meta/episode_ends"
SPEC_ATTR = "dpag_spec"   # root attribute: spec hints (see ReplayBuffer.spec_hints)


class DataError(ValueError):
    """Malformed demonstration data; the message names the key (e.g. 'data/action: ...')."""


def _open_root(path: str | os.PathLike):
    """Open a replay buffer read-only. Returns (group, store_to_close_or_None)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path}: not a zarr directory or a .zarr.zip file")
        store = zarr.storage.ZipStore(path, mode="r")
        try:
            return zarr.open_group(store, mode="r"), store
        except Exception as e:  # noqa: BLE001 - any zarr failure means the same thing to a user
            store.close()
            raise DataError(f"{path}: not a readable zarr archive ({e})") from e
    try:
        return zarr.open_group(str(path), mode="r"), None
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not a readable zarr group ({e})") from e


@dataclass
class ReplayBuffer:
    """Episodes in memory: `data[key]` is (N, ...) numpy, `episode_ends` (E,) int64.

    Every format's reader (zarr, LeRobot, robomimic) produces one of these, so windows, splits and
    batches are built the same way whatever the data came from.
    """

    data: dict[str, np.ndarray]
    episode_ends: np.ndarray
    path: str = "<memory>"
    # The dataset's own (train, val) episode masks (robomimic's mask/train, mask/valid), used
    # instead of a random split; None: split at random (data.val_ratio).
    split: tuple[np.ndarray, np.ndarray] | None = None
    # What the data means in robot terms, as far as the file says (dpag_engine/spec.py merge_hints):
    # a zarr buffer's root attribute "dpag_spec" (written by this project's tasks and recorder),
    # a LeRobot dataset's fps. Training completes it into the checkpoint's spec.
    spec_hints: dict = field(default_factory=dict)

    @property
    def n_steps(self) -> int:
        return int(self.episode_ends[-1]) if len(self.episode_ends) else 0

    @property
    def n_episodes(self) -> int:
        return len(self.episode_ends)

    @property
    def episode_starts(self) -> np.ndarray:
        return np.concatenate([[0], self.episode_ends[:-1]]).astype(np.int64)

    def episode_lengths(self) -> np.ndarray:
        return np.diff(np.concatenate([[0], self.episode_ends]))

    def get_episode(self, i: int) -> dict[str, np.ndarray]:
        start, end = int(self.episode_starts[i]), int(self.episode_ends[i])
        return {k: v[start:end] for k, v in self.data.items()}


@dataclass
class Feature:
    """One key of a dataset as stored, known before loading it: per-step shape, dtype, camera or not."""

    shape: tuple[int, ...]
    dtype: str
    image: bool


def zarr_schema(path: str | os.PathLike) -> dict[str, Feature]:
    """data/<key> arrays of a replay buffer; cameras are uint8 frames, (H, W, C) as DP or (C, H, W)."""
    root, store = _open_root(path)
    try:
        if "data" not in root:
            raise DataError(f"data: group missing in {path} (expected DP's layout data/<key>, meta/episode_ends)")
        group = root["data"]
        out = {}
        for k in sorted(group.array_keys()):
            shape, dtype = tuple(group[k].shape[1:]), np.dtype(group[k].dtype)
            out[k] = Feature(shape, str(dtype), len(shape) == 3 and dtype == np.uint8
                             and (shape[-1] in (1, 3, 4) or shape[0] in (1, 3, 4)))
        return out
    finally:
        if store is not None:
            store.close()


def check_episode_ends(episode_ends: np.ndarray, key: str = EPISODE_ENDS) -> np.ndarray:
    """episode_ends must be a 1-D, positive, strictly increasing integer array."""
    ends = np.asarray(episode_ends)
    if ends.ndim != 1:
        raise DataError(f"{key}: must be 1-D (one end index per episode), got shape {ends.shape}")
    if len(ends) == 0:
        raise DataError(f"{key}: is empty (no episodes)")
    if not np.issubdtype(ends.dtype, np.integer):
        if not (np.issubdtype(ends.dtype, np.floating) and np.all(np.isfinite(ends)) and np.all(ends == np.round(ends))):
            raise DataError(f"{key}: must hold integers, got dtype {ends.dtype}")
    ends = ends.astype(np.int64)
    if ends[0] <= 0:
        raise DataError(f"{key}: first episode end must be > 0 (an empty first episode), got {ends[0]}")
    bad = np.flatnonzero(np.diff(ends) <= 0)
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{key}: must be strictly increasing, but entry {i + 1} ({ends[i + 1]}) "
                        f"<= entry {i} ({ends[i]})")
    return ends


def check_finite(key: str, x: np.ndarray) -> None:
    """NaN/inf in a float array fails with the first bad row (cheap on integer arrays: no-op)."""
    if not np.issubdtype(x.dtype, np.floating):
        return
    ok = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise DataError(f"{key}: contains NaN or inf ({int((~ok).sum())} bad rows, first at row {row})")


def read_replay_buffer(path: str | os.PathLike, keys: Iterable[str] | None = None) -> ReplayBuffer:
    """Load `data/<key>` for the requested keys (all when None) plus `meta/episode_ends` into memory.

    Every array under `data/` is checked against `episode_ends[-1]` (ragged buffers fail even for keys
    we do not load, because they mean the file is broken); the loaded keys are checked for NaN/inf.
    Loading into memory is what DP does: random sequence access into compressed chunks is slow.
    """
    root, store = _open_root(path)
    try:
        if "data" not in root:
            raise DataError(f"data: group missing in {path} (expected DP's layout data/<key>, meta/episode_ends)")
        if "meta" not in root or "episode_ends" not in root["meta"]:
            raise DataError(f"{EPISODE_ENDS}: missing in {path}")
        ends = check_episode_ends(root[EPISODE_ENDS][:])
        n = int(ends[-1])
        group = root["data"]
        available = sorted(group.array_keys())
        for k in available:
            shape = group[k].shape
            if len(shape) == 0 or shape[0] != n:
                raise DataError(f"data/{k}: has {shape[0] if shape else 0} rows but {EPISODE_ENDS}[-1] = {n} "
                                f"(ragged buffer: every data array needs one row per time step)")
        wanted = available if keys is None else list(dict.fromkeys(keys))
        data = {}
        for k in wanted:
            if k not in available:
                raise DataError(f"data/{k}: missing in {path} (available: {', '.join('data/' + a for a in available)})")
            data[k] = np.asarray(group[k][:])
            check_finite(f"data/{k}", data[k])
        hints = dict(root.attrs.get(SPEC_ATTR, {}) or {})
        return ReplayBuffer(data=data, episode_ends=ends, path=str(path), spec_hints=hints)
    finally:
        if store is not None:
            store.close()


def _chunks(shape: tuple[int, ...], itemsize: int, target_bytes: int = 2 << 20) -> tuple[int, ...]:
    """Chunk along time only, about `target_bytes` per chunk (whole frames, like DP)."""
    row = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    return (max(1, min(max(shape[0], 1), target_bytes // row)), *shape[1:])


class ReplayBufferWriter:
    """Append episodes, then `close()`; writes a DP-layout zarr directory or `.zarr.zip`.

        with ReplayBufferWriter("demos.zarr") as w:
            w.add_episode({"action": a, "state": s})   # arrays (T, ...) with equal T

    The first episode fixes the keys, per-step shapes and dtypes; later episodes must match. A zip is
    written through a temporary directory and zipped at the end (zip members cannot be rewritten in
    place, and DP's zip files are plain uncompressed zips of the directory).
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False, spec_hints: dict | None = None):
        self.path = Path(path)
        if self.path.exists():
            if not overwrite:
                raise FileExistsError(f"{self.path}: exists (pass overwrite=True to replace it)")
            shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
        self._zip = self.path.name.endswith(".zip")
        self._tmp = tempfile.mkdtemp(prefix="replay_", dir=self.path.parent) if self._zip else None
        self._dir = Path(self._tmp) / "buffer.zarr" if self._zip else self.path
        self._root = zarr.open_group(str(self._dir), mode="w", zarr_format=2)
        self._data = self._root.require_group("data")
        self._root.require_group("meta")
        if spec_hints:   # plain JSON: the task, dt, kinds of keys, the action space (dpag_engine/spec.py)
            self._root.attrs[SPEC_ATTR] = spec_hints
        self._ends: list[int] = []
        self._spec: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None
        self._closed = False

    def add_episode(self, episode: Mapping[str, np.ndarray]) -> None:
        if self._closed:
            raise RuntimeError("ReplayBufferWriter: already closed")
        arrays = {k: np.asarray(v) for k, v in episode.items()}
        if not arrays:
            raise DataError("episode: has no keys")
        lengths = {k: (a.shape[0] if a.ndim else 0) for k, a in arrays.items()}
        T = next(iter(lengths.values()))
        for k, a in arrays.items():
            if a.ndim == 0 or lengths[k] != T:
                raise DataError(f"data/{k}: episode has {lengths[k]} steps, other keys have {T} (ragged episode)")
            check_finite(f"data/{k}", a)
        if T == 0:
            raise DataError(f"{EPISODE_ENDS}: refusing an empty episode")
        if self._spec is None:
            self._spec = {k: (a.shape[1:], a.dtype) for k, a in arrays.items()}
            for k, a in arrays.items():
                self._data.create_array(k, shape=(0, *a.shape[1:]), dtype=a.dtype,
                                        chunks=_chunks(a.shape, a.dtype.itemsize))
        if set(arrays) != set(self._spec):
            raise DataError(f"data/{sorted(set(arrays) ^ set(self._spec))[0]}: keys differ from the first "
                            f"episode ({sorted(self._spec)})")
        start = self._ends[-1] if self._ends else 0
        for k, a in arrays.items():
            shape, dtype = self._spec[k]
            if a.shape[1:] != shape:
                raise DataError(f"data/{k}: per-step shape {a.shape[1:]} differs from the first episode {shape}")
            arr = self._data[k]
            arr.resize((start + T, *shape))
            arr[start:start + T] = a.astype(dtype, copy=False)
        self._ends.append(start + T)

    def close(self) -> Path:
        if self._closed:
            return self.path
        self._closed = True
        ends = np.asarray(self._ends, dtype=np.int64)
        self._root["meta"].create_array("episode_ends", shape=ends.shape, dtype=np.int64,
                                        chunks=(max(1, len(ends)),))
        if len(ends):
            self._root["meta/episode_ends"][:] = ends
        if self._zip:
            with zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED) as zf:
                for file in sorted(self._dir.rglob("*")):
                    if file.is_file():
                        zf.write(file, file.relative_to(self._dir).as_posix())
            shutil.rmtree(self._tmp)
        return self.path

    def __enter__(self) -> "ReplayBufferWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        elif self._tmp is not None:  # a failed zip write leaves nothing half-made behind
            shutil.rmtree(self._tmp, ignore_errors=True)


def write_replay_buffer(path: str | os.PathLike, episodes: Iterable[Mapping[str, np.ndarray]],
                        overwrite: bool = False, spec_hints: dict | None = None) -> Path:
    """Write a list (or generator) of episodes in one call."""
    with ReplayBufferWriter(path, overwrite=overwrite, spec_hints=spec_hints) as writer:
        for episode in episodes:
            writer.add_episode(episode)
    return writer.path
