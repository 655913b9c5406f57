"""Diffusion Policy's zarr replay buffer: read it, check it, write it.

Layout (Chi et al.'s `ReplayBuffer`): every time step of every episode is one row, episodes are
concatenated along axis 0, and `meta/episode_ends` holds the exclusive end row of each episode.

    <root>/data/action        (N, Da)
    <root>/data/<obs key>     (N, ...)        e.g. state (N, 5), keypoint (N, 9, 2), img (N, 96, 96, 3)
    <root>/meta/episode_ends  (E,) int        strictly increasing, last == N

The root is a directory (`foo.zarr`) or a zip of that directory (`foo.zarr.zip`), as DP ships them.
We write zarr format 2, which is what DP's own code (zarr 2.x) reads; zarr 3 reads both formats.
Malformed data raises `DataError` with a message that starts with the offending key.

Crashes (ReplayBufferWriter): into a directory, every episode is on disk when add_episode returns
(its rows, then meta/episode_ends, synced), so a crash, a SIGKILL or Ctrl-C loses at most the
episode being added. Its rows may already be in data/ past episode_ends[-1]: the reader ignores
exactly those (with a note), and an append (ReplayBufferWriter(path, append=True)) overwrites them.
A .zarr.zip is written whole at close (see ReplayBufferWriter): record into a directory.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import zarr

EPISODE_ENDS = "meta/episode_ends"
SPEC_ATTR = "dpag_spec"   # root attribute: spec hints (see ReplayBuffer.spec_hints)
# meta/episode_ends as the writer keeps it: uncompressed int64 chunks of ENDS_CHUNK entries, so that
# the writer can put each new end into its chunk file before the array's shape grows to show it
# (see ReplayBufferWriter._write_ends). Any zarr reader reads it as a plain int64 array.
ENDS_CHUNK = 4096
_CONVERTING = "meta/.episode_ends.new"   # an append converting another layout writes the new array here


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
    # What the reader noticed and repaired on the way (e.g. an unfinished episode's rows ignored).
    notes: list[str] = field(default_factory=list)

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

    One exception to "ragged": rows *past* episode_ends[-1] are the episode a writer was adding when
    it was killed (its rows are written before its end is). They are ignored, and said so in
    ReplayBuffer.notes and a warning. Fewer rows than episode_ends[-1] is a broken buffer.
    """
    root, store = _open_root(path)
    try:
        if "data" not in root:
            raise DataError(f"data: group missing in {path} (expected DP's layout data/<key>, meta/episode_ends)")
        if "meta" not in root or "episode_ends" not in root["meta"]:
            hint = ""
            if Path(path, _CONVERTING).is_dir():
                hint = (f" ({_CONVERTING} holds it: an append was converting its layout when it stopped; "
                        f"ReplayBufferWriter(path, append=True) finishes that)")
            raise DataError(f"{EPISODE_ENDS}: missing in {path}{hint}")
        ends_array = root[EPISODE_ENDS][:]
        if ends_array.ndim == 1 and len(ends_array) == 0:
            raise DataError(f"{EPISODE_ENDS}: is empty (no episodes; a recording that stopped during its "
                            f"first episode leaves this)")
        ends = check_episode_ends(ends_array)
        n = int(ends[-1])
        group = root["data"]
        available = sorted(group.array_keys())
        unfinished = []
        for k in available:
            shape = group[k].shape
            rows = shape[0] if shape else 0
            if rows < n:
                raise DataError(f"data/{k}: has {rows} rows but {EPISODE_ENDS}[-1] = {n} "
                                f"(ragged buffer: every data array needs one row per time step)")
            if rows > n:
                unfinished.append(f"data/{k} ({rows - n})")
        notes = []
        if unfinished:
            notes.append(f"{path}: rows past {EPISODE_ENDS}[-1] = {n} ignored in {', '.join(unfinished)}: an "
                         f"episode that was being written when the recording stopped (not a finished episode)")
            warnings.warn(notes[-1], stacklevel=2)
        wanted = available if keys is None else list(dict.fromkeys(keys))
        data = {}
        for k in wanted:
            if k not in available:
                raise DataError(f"data/{k}: missing in {path} (available: {', '.join('data/' + a for a in available)})")
            data[k] = np.asarray(group[k][:n])
            check_finite(f"data/{k}", data[k])
        hints = dict(root.attrs.get(SPEC_ATTR, {}) or {})
        return ReplayBuffer(data=data, episode_ends=ends, path=str(path), spec_hints=hints, notes=notes)
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

    The first episode fixes the keys, per-step shapes and dtypes; later episodes must match.

    Durable per episode (a directory): when add_episode returns, the episode's rows and then the new
    meta/episode_ends are written and synced to disk, so a crash (SIGKILL, power loss) or Ctrl-C
    keeps every finished episode and close() adds nothing. A killed add_episode may leave its rows
    past episode_ends[-1]; read_replay_buffer ignores them and an append overwrites them.

    append=True opens an existing directory buffer to add episodes to it (a new recording session
    on the same dataset): the new episodes must have its keys, per-step shapes and dtypes (a
    same-kind cast, e.g. float64 into float32, is allowed), checked on each add_episode; spec_hints,
    when given, must equal the buffer's. Rows of an unfinished episode are dropped first.

    A `.zarr.zip` is an export format: it is written through a staging directory and zipped at the
    end (zip members cannot be rewritten in place, and DP's zip files are plain uncompressed zips of
    the directory). The staging directory is durable like any directory buffer, so after a crash
    (a kill: no close, no __exit__) the finished episodes are in `<parent>/<name>.partial-*/buffer.zarr`,
    a directory buffer to read, append to or zip. An exception inside `with` removes it (a failed
    conversion leaves nothing half-made). For recording, write a directory: append needs one too.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False, spec_hints: dict | None = None,
                 append: bool = False):
        self.path = Path(path)
        self._zip = self.path.name.endswith(".zip")
        self._ends: list[int] = []
        self._spec: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None
        self._closed = False
        self._tmp = None
        self.notes: list[str] = []
        if append:
            if overwrite:
                raise ValueError("ReplayBufferWriter: append=True and overwrite=True exclude each other")
            self._open_for_append(spec_hints)
            return
        if self.path.exists():
            if not overwrite:
                raise FileExistsError(f"{self.path}: exists (pass overwrite=True to replace it, or append=True "
                                      f"to add episodes to it)")
            shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
        if self._zip:
            self._tmp = tempfile.mkdtemp(prefix=f"{self.path.name}.partial-", dir=self.path.parent)
        self._dir = Path(self._tmp) / "buffer.zarr" if self._zip else self.path
        self._root = zarr.open_group(str(self._dir), mode="w", zarr_format=2)
        self._data = self._root.require_group("data")
        self._root.require_group("meta").create_array(
            "episode_ends", shape=(0,), dtype=np.int64, chunks=(ENDS_CHUNK,), compressors=None, fill_value=0)
        if spec_hints:   # plain JSON: the task, dt, kinds of keys, the action space (dpag_engine/spec.py)
            self._root.attrs[SPEC_ATTR] = spec_hints

    # ---- append ----
    def _open_for_append(self, spec_hints: dict | None) -> None:
        path = self.path
        if self._zip or (path.exists() and not path.is_dir()):
            raise DataError(f"{path}: append needs a directory buffer (a .zarr.zip is written whole; record "
                            f"into a directory and zip it at the end)")
        if not path.is_dir():
            raise DataError(f"{path}: no such directory to append to")
        self._dir = path
        _remove_partial_files(path)
        converting = path / _CONVERTING
        if converting.is_dir() and not (path / EPISODE_ENDS).exists():
            os.rename(converting, path / EPISODE_ENDS)      # finish a conversion a crash interrupted
        try:
            self._root = zarr.open_group(str(path), mode="r+")
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: not a readable zarr group ({e})") from e
        if self._root.metadata.zarr_format != 2:
            raise DataError(f"{path}: zarr format {self._root.metadata.zarr_format}; append writes DP's format 2")
        if "data" not in self._root:
            raise DataError(f"data: group missing in {path} (expected DP's layout data/<key>, meta/episode_ends)")
        if "meta" not in self._root or "episode_ends" not in self._root["meta"]:
            raise DataError(f"{EPISODE_ENDS}: missing in {path}: its episodes are unknown, nothing can be "
                            f"appended (a buffer from a writer that was killed before it kept episode_ends?)")
        self._data = self._root["data"]
        ends = self._root[EPISODE_ENDS][:]
        self._ends = check_episode_ends(ends).tolist() if len(ends) else []
        n = self._ends[-1] if self._ends else 0
        self._spec = {}
        for k in sorted(self._data.array_keys()):
            arr = self._data[k]
            if arr.shape[0] < n:
                raise DataError(f"data/{k}: has {arr.shape[0]} rows but {EPISODE_ENDS}[-1] = {n} (ragged buffer)")
            if arr.shape[0] > n:
                self.notes.append(f"data/{k}: {arr.shape[0] - n} rows of an unfinished episode dropped")
                arr.resize((n, *arr.shape[1:]))
            self._spec[k] = (tuple(arr.shape[1:]), np.dtype(arr.dtype))
        if not self._spec:
            self._spec = None       # no arrays yet: the first episode fixes them
        existing = dict(self._root.attrs.get(SPEC_ATTR, {}) or {})
        if spec_hints:
            if existing and _plain_json(existing) != _plain_json(spec_hints):
                raise DataError(f"{SPEC_ATTR}: the buffer's spec hints differ from the ones given "
                                f"({existing} vs {spec_hints})")
            if not existing:
                self._root.attrs[SPEC_ATTR] = spec_hints
        if not _native_ends_layout(path / EPISODE_ENDS):
            self._convert_ends()

    def _convert_ends(self) -> None:
        """Rewrite meta/episode_ends of another layout (compressed, other chunks) as the writer keeps
        it: complete under a temporary name, then renamed into place."""
        tmp, dst, old = self._dir / _CONVERTING, self._dir / EPISODE_ENDS, self._dir / "meta/.episode_ends.old"
        for d in (tmp, old):
            shutil.rmtree(d, ignore_errors=True)
        group = zarr.open_group(str(self._dir / "meta"), mode="r+")
        arr = group.create_array(".episode_ends.new", shape=(len(self._ends),), dtype=np.int64,
                                 chunks=(ENDS_CHUNK,), compressors=None, fill_value=0)
        if self._ends:
            arr[:] = np.asarray(self._ends, np.int64)
        _sync_tree(tmp)
        os.rename(dst, old)
        os.rename(tmp, dst)
        _fsync(dst.parent)
        shutil.rmtree(old)

    # ---- episodes ----
    def add_episode(self, episode: Mapping[str, np.ndarray]) -> None:
        """Write one episode; when this returns it is on disk for good (see the class notes)."""
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
        spec = self._spec or {k: (a.shape[1:], a.dtype) for k, a in arrays.items()}
        if set(arrays) != set(spec):
            raise DataError(f"data/{sorted(set(arrays) ^ set(spec))[0]}: keys differ from the "
                            f"{'buffer' if self._ends else 'first episode'} ({sorted(spec)})")
        for k, a in arrays.items():     # everything checked before anything is written
            shape, dtype = spec[k]
            if a.shape[1:] != shape:
                raise DataError(f"data/{k}: per-step shape {a.shape[1:]} differs from the "
                                f"{'buffer' if self._ends else 'first episode'} {shape}")
            if not np.can_cast(a.dtype, dtype, casting="same_kind"):
                raise DataError(f"data/{k}: dtype {a.dtype} cannot be stored in the buffer's {dtype}")
        if self._spec is None:
            self._spec = spec
            for k, a in arrays.items():
                if k not in self._data:
                    self._data.create_array(k, shape=(0, *a.shape[1:]), dtype=a.dtype,
                                            chunks=_chunks(a.shape, a.dtype.itemsize))
        start = self._ends[-1] if self._ends else 0
        for k, a in arrays.items():
            shape, dtype = self._spec[k]
            arr = self._data[k]
            arr.resize((start + T, *shape))
            arr[start:start + T] = a.astype(dtype, copy=False)
            _sync_rows(self._dir / "data" / k, start, start + T)
        self._ends.append(start + T)
        self._write_ends()

    def _write_ends(self) -> None:
        """meta/episode_ends = self._ends, crash-safe: the chunk file holding the last end is
        rewritten first (a temporary file renamed over it), then .zarray's shape grows to include
        it. Killed in between, the file only holds an entry past the shape, which no reader sees."""
        folder = self._dir / EPISODE_ENDS
        meta = json.loads((folder / ".zarray").read_text())
        ends = np.asarray(self._ends, "<i8")
        if len(ends):
            k = (len(ends) - 1) // ENDS_CHUNK
            chunk = np.zeros(ENDS_CHUNK, "<i8")
            part = ends[k * ENDS_CHUNK:(k + 1) * ENDS_CHUNK]
            chunk[:len(part)] = part
            _atomic_write(folder / str(k), chunk.tobytes())
        meta["shape"] = [len(ends)]
        _atomic_write(folder / ".zarray", json.dumps(meta, indent=4).encode())

    @property
    def n_episodes(self) -> int:
        return len(self._ends)

    def close(self) -> Path:
        if self._closed:
            return self.path
        self._closed = True
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
            return
        self._closed = True     # a directory keeps every finished episode as it is
        if self._tmp is not None:  # a failed zip write leaves nothing half-made behind
            shutil.rmtree(self._tmp, ignore_errors=True)


def _native_ends_layout(folder: Path) -> bool:
    """meta/episode_ends is kept as the writer keeps it (uncompressed int64, ENDS_CHUNK chunks)."""
    try:
        meta = json.loads((folder / ".zarray").read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("compressor") is None and not meta.get("filters") and meta.get("dtype") == "<i8"
            and meta.get("order") == "C" and meta.get("chunks") == [ENDS_CHUNK] and meta.get("fill_value") == 0)


def _plain_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write a file whole or not at all (a temporary file, synced, renamed over it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_rows(folder: Path, start: int, stop: int) -> None:
    """Sync an array's metadata and the chunk files holding rows [start, stop) (zarr writes each file
    whole, through a temporary name, but does not sync)."""
    meta = json.loads((folder / ".zarray").read_text())
    sep = meta.get("dimension_separator") or "."
    shape, chunks = meta["shape"], meta["chunks"]
    ranges = [range(start // chunks[0], (stop - 1) // chunks[0] + 1)]
    ranges += [range(-(-s // c)) for s, c in zip(shape[1:], chunks[1:])]
    for index in itertools.product(*ranges):
        file = folder / sep.join(map(str, index))
        if file.exists():        # a chunk of fill values only is not written
            _fsync(file)
    _fsync(folder / ".zarray")
    _fsync(folder)


def _sync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        _fsync(file)
    _fsync(folder)


def _remove_partial_files(root: Path) -> None:
    """Temporary files a killed write left behind (zarr's *.partial, ours .*.tmp)."""
    for pattern in ("*.partial", ".*.tmp"):
        for file in root.rglob(pattern):
            if file.is_file():
                file.unlink()


def write_replay_buffer(path: str | os.PathLike, episodes: Iterable[Mapping[str, np.ndarray]],
                        overwrite: bool = False, spec_hints: dict | None = None) -> Path:
    """Write a list (or generator) of episodes in one call."""
    with ReplayBufferWriter(path, overwrite=overwrite, spec_hints=spec_hints) as writer:
        for episode in episodes:
            writer.add_episode(episode)
    return writer.path
