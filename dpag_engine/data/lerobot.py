"""LeRobotDataset v3.0 on a local disk: read it into a ReplayBuffer, write one like the reference library.

Layout (LeRobot's codebase_version v3.0; `tests/test_lerobot.py` checks it against datasets written
by lerobot 0.4.4 itself):

    meta/info.json                           fps, features {key: dtype, shape, names[, info]}, paths
    meta/episodes/chunk-*/file-*.parquet     one row per episode: length, dataset_from/to_index, the
                                             data file, per camera the video file and from/to_timestamp,
                                             per-episode stats/<feature>/<stat>
    meta/tasks.parquet, meta/stats.json      task strings; stats aggregated over all episodes
    data/chunk-*/file-*.parquet              one row per frame, many episodes per file; vectors as
                                             fixed-size lists, `image` features as PNG bytes
    videos/<key>/chunk-*/file-*.mp4          `video` features, many episodes per file back to back:
                                             frame t of an episode is at from_timestamp + timestamp[t]

Reading produces exactly what the zarr path holds (`data[key]` (N, ...) numpy concatenated by
episode, `episode_ends`), so windowing, padding, splits and batches are shared. Frames stay as
stored, (N, H, W, C) uint8.

Crashes (LeRobotWriter): lerobot's packed files (a parquet file is only readable once its writer
closed it; videos are joined; info.json and stats.json cover all episodes) cannot be kept valid
episode by episode, so the writer keeps a journal, `<root>/.recording/`: each finished episode is
staged there, complete and synced (its data as a parquet file, its video per camera, its stats,
then a commit record), when add_episode returns; close() packs the journal into the layout above
and removes it. After a crash (SIGKILL, power loss, an exception inside `with`) the journal holds
every finished episode: `python -m dpag_engine.data.lerobot finalize <root>` (finalize_lerobot)
packs them into a normal dataset, and LeRobotWriter(root, fps, resume=True) goes on recording into
it. read_lerobot on an unfinalized dataset says so and names that command.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from .replay_buffer import DataError, Feature, ReplayBuffer, check_finite
from .video import cached_frames, concatenate, decode_at, encode_frames, video_info

CODEBASE_VERSION = "v3.0"
INFO = "meta/info.json"
# Per-frame bookkeeping columns every LeRobot dataset has (not observations or actions).
BOOKKEEPING = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
JOURNAL = ".recording"      # LeRobotWriter's staged episodes until close() (see the module notes)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_lerobot(path: Path) -> bool:
    """A LeRobot dataset directory, or one whose recording was not finalized (its journal)."""
    return path.is_dir() and ((path / INFO).is_file() or (path / JOURNAL / "writer.json").is_file())


def hub_id_error(path: str) -> DataError | None:
    """A missing path that looks like 'user/dataset' (no file suffix) is most likely a Hugging Face Hub id."""
    if not Path(os.path.expanduser(path)).exists() and _HUB_ID.match(path) \
            and not path.endswith((".zarr", ".zip", ".hdf5", ".h5", ".json", ".parquet")):
        return DataError(f"{path}: no such directory; it looks like a Hugging Face Hub dataset id, but only local paths are read "
                         f"(training needs no network). Download it first, e.g. `huggingface-cli download "
                         f"--repo-type dataset {path} --local-dir ~/data/{path.split('/')[-1]}`, and pass that "
                         f"directory")
    return None


def _parquet():
    import pyarrow as pa
    import pyarrow.parquet as pq
    return pa, pq


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def load_info(root: Path) -> dict:
    path = root / INFO
    if not path.is_file():
        if (root / JOURNAL / "writer.json").is_file():
            n = len(_committed(root / JOURNAL))
            raise DataError(f"{path}: missing: {root} is a recording that was not finalized (its writer stopped "
                            f"before close(): a crash or a kill); its {n} finished episodes are in {root / JOURNAL}. "
                            f"Finalize it: `python -m dpag_engine.data.lerobot finalize {root}`")
        raise DataError(f"{path}: missing (not a LeRobot dataset directory)")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    version = str(info.get("codebase_version", "?"))
    if not version.startswith("v3."):
        hint = (" (convert it with lerobot's `python -m lerobot.datasets.v30.convert_dataset_v21_to_v30`)"
                if version.startswith("v2") else "")
        raise DataError(f"{path}: codebase_version {version}; only LeRobotDataset v3.x is read{hint}")
    for key in ("fps", "features", "data_path"):
        if key not in info:
            raise DataError(f"{path}: no '{key}' entry")
    return info


def frame_shape(key: str, ft: dict) -> tuple[int, int, int]:
    """(H, W, C) of an image/video feature, from its shape and names (LeRobot writes HWC, v2 CHW)."""
    shape = tuple(int(s) for s in ft.get("shape", ()))
    names = list(ft.get("names") or [])
    if len(shape) != 3:
        raise DataError(f"features/{key}: image shape must have 3 entries, got {shape}")
    if names[:1] == ["channels"] or (not names and shape[0] in (1, 3, 4) and shape[2] not in (1, 3, 4)):
        return shape[1], shape[2], shape[0]
    return shape


def schema(root: Path) -> dict[str, Feature]:
    """Observation/action features of a dataset (bookkeeping columns left out), without loading data."""
    out = {}
    for key, ft in load_info(root)["features"].items():
        if key in BOOKKEEPING:
            continue
        if ft.get("dtype") in ("image", "video"):
            out[key] = Feature(frame_shape(key, ft), "uint8", True)
        elif ft.get("dtype") in ("string", "language"):
            continue
        else:
            out[key] = Feature(tuple(int(s) for s in ft.get("shape", (1,))), str(ft.get("dtype")), False)
    return out


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.glob(pattern) if p.is_file())


def load_episodes(root: Path, info: dict) -> dict[str, np.ndarray]:
    """The per-episode columns of meta/episodes/ (stats left out), sorted by episode_index."""
    pa, pq = _parquet()
    files = _files(root, "meta/episodes/chunk-*/file-*.parquet")
    if not files:
        raise DataError(f"{root / 'meta/episodes'}: no chunk-*/file-*.parquet episode metadata")
    tables = []
    for f in files:
        names = pq.read_schema(f).names
        tables.append(pq.read_table(f, columns=[n for n in names if not n.startswith("stats/") and n != "tasks"]))
    table = pa.concat_tables(tables, promote_options="permissive")
    need = ["episode_index", "length", "data/chunk_index", "data/file_index", "dataset_from_index", "dataset_to_index"]
    for key, ft in info["features"].items():
        if ft.get("dtype") == "video":
            need += [f"videos/{key}/{c}" for c in ("chunk_index", "file_index", "from_timestamp")]
    missing = [c for c in need if c not in table.column_names]
    if missing:
        raise DataError(f"{root / 'meta/episodes'}: column '{missing[0]}' missing")
    eps = {c: table.column(c).to_numpy() for c in need}
    order = np.argsort(eps["episode_index"], kind="stable")
    eps = {c: v[order] for c, v in eps.items()}
    if len(np.unique(eps["episode_index"])) != len(order):
        raise DataError(f"{root / 'meta/episodes'}: episode_index has duplicates")
    bad = np.flatnonzero((eps["length"] <= 0) | (eps["dataset_to_index"] - eps["dataset_from_index"] != eps["length"]))
    if len(bad):
        e = int(eps["episode_index"][bad[0]])
        raise DataError(f"{root / 'meta/episodes'}: episode {e}: length {eps['length'][bad[0]]} does not match "
                        f"dataset_to_index - dataset_from_index")
    return eps


def _column_to_numpy(column, key: str, shape: tuple[int, ...], n: int, where: Path) -> np.ndarray:
    """A parquet column of scalars or (nested, fixed- or variable-size) lists -> (n, *shape) numpy."""
    import pyarrow as pa
    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if isinstance(arr, pa.ExtensionArray):
        arr = arr.storage
    if arr.null_count:
        raise DataError(f"{where}: column '{key}' has {arr.null_count} nulls")
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
    values = arr.to_numpy(zero_copy_only=False)
    per_step = int(np.prod(shape)) if shape else 1
    if values.size != n * per_step:
        raise DataError(f"{where}: column '{key}' holds {values.size // max(n, 1)} values per frame, "
                        f"meta/info.json says shape {list(shape)}")
    return values.reshape(n, *shape) if shape not in ((), (1,)) else values.reshape(n)


def _decode_images(column, key: str, out: np.ndarray, where: Path) -> None:
    """`image` features: a struct<bytes, path> per frame holding an encoded image (PNG as LeRobot writes)."""
    from PIL import Image
    shape = out.shape[1:]
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[shape[2]]
    for i, item in enumerate(column.to_pylist()):
        if not item or item.get("bytes") is None:
            raise DataError(f"{where}: column '{key}' row {i} holds no image bytes (images stored as "
                            f"separate files are not supported)")
        img = np.asarray(Image.open(io.BytesIO(item["bytes"])).convert(mode))
        img = img[..., None] if img.ndim == 2 else img
        if img.shape != shape:
            raise DataError(f"{where}: column '{key}' row {i} is an image of shape {img.shape}, "
                            f"meta/info.json says {shape} (H, W, C)")
        out[i] = img


def read_lerobot(root: str | os.PathLike, keys: Iterable[str] | None = None,
                 cache_dir: str | os.PathLike | None = None) -> ReplayBuffer:
    """Load the requested features (all observations and actions when None) into a ReplayBuffer.

    Episodes are ordered by episode_index and frames by frame_index. Video features are decoded
    once per file (see `video.decode_at`), into `cache_dir` when given.
    """
    pa, pq = _parquet()
    root = Path(root)
    info = load_info(root)
    features = info["features"]
    available = schema(root)
    wanted = list(available) if keys is None else list(dict.fromkeys(keys))
    for k in wanted:
        if k not in available:
            raise DataError(f"features/{k}: not in {root / INFO} (available: {', '.join(available)})")
    eps = load_episodes(root, info)
    lengths = eps["length"].astype(np.int64)
    ends = np.cumsum(lengths)
    n = int(ends[-1])

    # Frame rows: every data file the episodes point at, read once.
    columns = [k for k in wanted if features[k]["dtype"] != "video"] + ["episode_index", "frame_index", "timestamp"]
    tables = []
    for chunk, file in dict.fromkeys(zip(eps["data/chunk_index"].tolist(), eps["data/file_index"].tolist())):
        path = root / info["data_path"].format(chunk_index=chunk, file_index=file)
        if not path.is_file():
            raise DataError(f"{path}: data file missing (listed in meta/episodes)")
        names = pq.read_schema(path).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{path}: column '{missing[0]}' missing")
        tables.append(pq.read_table(path, columns=columns))
    table = pa.concat_tables(tables)
    ep_col = table.column("episode_index").to_numpy()
    fi_col = table.column("frame_index").to_numpy()
    ep_rank = np.minimum(np.searchsorted(eps["episode_index"], ep_col), len(lengths) - 1)  # position in meta order
    unknown = eps["episode_index"][ep_rank] != ep_col
    if unknown.any():
        raise DataError(f"{root / 'data'}: rows of episode {int(ep_col[unknown][0])}, which meta/episodes does not list")
    order = np.lexsort((fi_col, ep_rank))  # by episode (meta order), then frame
    counts = np.bincount(ep_rank, minlength=len(lengths))
    bad = np.flatnonzero(counts != lengths)
    if len(bad):
        e = int(eps["episode_index"][bad[0]])
        raise DataError(f"{root / 'data'}: episode {e} has {counts[bad[0]]} frames, meta/episodes says {lengths[bad[0]]}")
    starts = ends - lengths
    expect = np.arange(n) - np.repeat(starts, lengths)
    if not np.array_equal(fi_col[order], expect):
        row = int(np.flatnonzero(fi_col[order] != expect)[0])
        raise DataError(f"{root / 'data'}: frame_index of episode {int(ep_col[order][row])} is not 0, 1, 2, ... "
                        f"(missing or repeated frames)")
    table = table.take(pa.array(order))
    timestamps = table.column("timestamp").to_numpy().astype(np.float64)

    data: dict[str, np.ndarray] = {}
    for k in wanted:
        ft = features[k]
        if ft["dtype"] == "image":
            identity = [str(root.resolve()), k, *(f"{p.relative_to(root)}:{_stamp(p)}" for p in _sources(root, []))]
            data[k] = cached_frames(cache_dir, identity, n, available[k].shape,
                                    lambda out, col=table.column(k), k=k: _decode_images(col, k, out, root / "data"))
        elif ft["dtype"] == "video":
            data[k] = _video_frames(root, info, eps, k, available[k].shape, timestamps, cache_dir)
        else:
            data[k] = _column_to_numpy(table.column(k), k, available[k].shape, n, root / "data")
            check_finite(f"features/{k}", data[k])
    # Spec hints: this project's recorder writes them into info.json as "dpag_spec"; the fps is LeRobot's own.
    hints = {**(info.get("dpag_spec") or {}), "fps": info["fps"]}
    return ReplayBuffer(data=data, episode_ends=ends, path=str(root), spec_hints=hints)


def _video_frames(root: Path, info: dict, eps: dict, key: str, shape: tuple[int, int, int],
                  timestamps: np.ndarray, cache_dir) -> np.ndarray:
    if not info.get("video_path"):
        raise DataError(f"{root / INFO}: feature {key} is a video but there is no video_path")
    lengths = eps["length"].astype(np.int64)
    episode_of_row = np.repeat(np.arange(len(lengths)), lengths)
    chunk = eps[f"videos/{key}/chunk_index"][episode_of_row]
    file = eps[f"videos/{key}/file_index"][episode_of_row]
    query = eps[f"videos/{key}/from_timestamp"][episode_of_row] + timestamps
    files = []
    for c, f in dict.fromkeys(zip(chunk.tolist(), file.tolist())):
        rows = np.flatnonzero((chunk == c) & (file == f))
        files.append((root / info["video_path"].format(video_key=key, chunk_index=c, file_index=f), rows, query[rows]))
    identity = [str(root.resolve()), key, *(f"{p.relative_to(root)}:{_stamp(p)}" for p in _sources(root, files))]
    return cached_frames(cache_dir, identity, len(timestamps), shape,
                         lambda out: decode_at(files, len(timestamps), shape, out=out))


def _sources(root: Path, videos: list) -> list[Path]:
    """The files decoded frames depend on: a cache entry is valid while each keeps its size and mtime."""
    return [root / INFO, *_files(root, "meta/episodes/chunk-*/file-*.parquet"), *_files(root, "data/chunk-*/*.parquet"),
            *(p for p, _, _ in videos)]


def _stamp(path: Path) -> str:
    st = path.stat() if path.exists() else None
    return f"{st.st_size}:{st.st_mtime_ns}" if st else "missing"


# ---------------------------------------------------------------------------------------------
# Statistics, computed as lerobot's compute_stats does (per episode, then aggregated)
# ---------------------------------------------------------------------------------------------
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
_BINS = 5000


def _quantiles(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> list[np.ndarray]:
    """LeRobot's histogram quantiles: 5000 bins over [min - 1e-10, max + 1e-10], linear inside a bin."""
    out = [np.empty(x.shape[1]) for _ in QUANTILES]
    for j in range(x.shape[1]):
        edges = np.linspace(lo[j] - 1e-10, hi[j] + 1e-10, _BINS + 1)
        cum = np.cumsum(np.histogram(x[:, j], bins=edges)[0])
        for q, res in zip(QUANTILES, out):
            target = q * len(x)
            i = int(np.searchsorted(cum, target))
            if i == 0:
                res[j] = edges[0]
            elif i >= len(cum):
                res[j] = edges[-1]
            else:
                in_bin = cum[i] - cum[i - 1]
                res[j] = edges[i] if in_bin == 0 else edges[i] + (target - cum[i - 1]) / in_bin * (edges[i + 1] - edges[i])
    return out


def _stats(x: np.ndarray, count: int) -> dict[str, np.ndarray]:
    """min/max/mean/std/count/q01..q99 over axis 0 of (n, d); moments in the data's float type.

    Integers (pixels included) are promoted to float64 before squaring: lerobot 0.4.4 squared uint8
    pixels in uint8, which wrapped and broke the image std (later lerobot versions promote too).
    """
    xf = x.astype(np.float64) if np.issubdtype(x.dtype, np.integer) else x
    mean = np.mean(xf, axis=0)
    std = np.sqrt(np.maximum(0, np.mean(xf ** 2, axis=0) - mean ** 2))
    lo, hi = x.min(axis=0), x.max(axis=0)
    out = {"min": lo, "max": hi, "mean": mean, "std": std, "count": np.array([count])}
    if len(x) < 2:  # lerobot: too few samples for a histogram, quantiles = mean
        out.update({f"q{int(q * 100):02d}": mean.copy() for q in QUANTILES})
    else:
        out.update({f"q{int(q * 100):02d}": v for q, v in zip(QUANTILES, _quantiles(x, lo, hi))})
    return out


def _sample_rows(n: int) -> np.ndarray:
    """Which frames of an episode image stats look at (lerobot's sample_indices)."""
    k = n if n < 100 else max(100, min(int(n ** 0.75), 10_000))
    return np.round(np.linspace(0, n - 1, k)).astype(int)


def episode_stats(arrays: Mapping[str, np.ndarray], features: Mapping[str, dict]) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for key, ft in features.items():
        x = np.asarray(arrays[key])
        if ft["dtype"] in ("image", "video"):
            imgs = x[_sample_rows(len(x))]                            # (k, H, W, C)
            if max(imgs.shape[1:3]) >= 300:                           # lerobot's auto_downsample_height_width
                step = int(max(imgs.shape[1:3]) / 150)
                imgs = imgs[:, ::step, ::step]
            s = _stats(imgs.reshape(-1, imgs.shape[-1]), len(imgs))
            out[key] = {k: v if k == "count" else (v / 255.0).reshape(-1, 1, 1) for k, v in s.items()}
        else:
            s = _stats(x.reshape(len(x), -1), len(x))
            out[key] = s
    return out


def aggregate_stats(per_episode: list[dict[str, dict[str, np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    """Count-weighted mean, pooled variance, min of mins, max of maxes, count-weighted quantiles (lerobot)."""
    out = {}
    for key in per_episode[0]:
        s = [e[key] for e in per_episode]
        counts = np.stack([x["count"] for x in s])                      # (E, 1)
        total = counts.sum(axis=0)
        means = np.stack([x["mean"] for x in s])
        w = counts.reshape(-1, *([1] * (means.ndim - 1)))
        mean = (means * w).sum(axis=0) / total
        var = ((np.stack([x["std"] for x in s]) ** 2 + (means - mean) ** 2) * w).sum(axis=0) / total
        agg = {"min": np.min(np.stack([x["min"] for x in s]), axis=0), "max": np.max(np.stack([x["max"] for x in s]), axis=0),
               "mean": mean, "std": np.sqrt(var), "count": total}
        for q in (k for k in s[0] if re.fullmatch(r"q\d+", k)):
            agg[q] = (np.stack([x[q] for x in s]) * w).sum(axis=0) / total
        out[key] = agg
    return out


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def infer_features(episode: Mapping[str, np.ndarray], use_videos: bool = True) -> dict[str, dict]:
    """LeRobot feature entries for arrays (T, ...): (T, H, W, 3) uint8 -> video (or image), else a vector."""
    features = {}
    for key, a in episode.items():
        a = np.asarray(a)
        if a.ndim == 4 and a.dtype == np.uint8 and a.shape[-1] == 3:
            features[key] = {"dtype": "video" if use_videos else "image", "shape": list(a.shape[1:]),
                             "names": ["height", "width", "channels"]}
        elif a.ndim in (1, 2):
            d = 1 if a.ndim == 1 else a.shape[1]
            dtype = "float32" if np.issubdtype(a.dtype, np.floating) else str(a.dtype)
            features[key] = {"dtype": dtype, "shape": [d],
                             "names": None if a.ndim == 1 else [f"{key.rsplit('.', 1)[-1]}_{i}" for i in range(d)]}
        else:
            raise DataError(f"{key}: per-step shape {a.shape[1:]} is neither a vector nor an RGB image "
                            f"(flatten it to (T, D) first)")
    return features


def _hf_feature(ft: dict) -> dict:
    """The `datasets` library's description of a column, which LeRobot's parquet files carry."""
    if ft["dtype"] == "image":
        return {"_type": "Image"}
    value = {"dtype": ft["dtype"], "_type": "Value"}
    return value if list(ft["shape"]) == [1] else {"feature": value, "length": int(ft["shape"][0]), "_type": "List"}


def _next_file(chunk: int, file: int, chunks_size: int) -> tuple[int, int]:
    return (chunk + 1, 0) if file == chunks_size - 1 else (chunk, file + 1)


def _size_mb(path: Path) -> float:
    return path.stat().st_size / 1024 ** 2 if path.exists() else 0.0


class LeRobotWriter:
    """Append episodes, then `close()`; writes a LeRobotDataset v3.0 directory as lerobot 0.4.4 does.

        with LeRobotWriter("demos", fps=10, robot_type="ur5") as w:
            w.add_episode({"observation.state": s, "action": a, "observation.images.front": rgb}, task="pick")

    Arrays are (T, ...) with equal T: vectors (T, D) or (T,), cameras (T, H, W, 3) uint8, stored as
    AV1 video (`use_videos`, lerobot's default) or PNG images inside the parquet. Features are
    inferred from the first episode unless given as LeRobot feature dicts. extra_info: more entries
    for meta/info.json (after lerobot's own), e.g. {"dpag_spec": hints}.

    Durable per episode: when add_episode returns, the episode is staged complete and synced in
    `<root>/.recording/`; close() packs the staged episodes into lerobot's layout (the same files,
    byte for byte, as when they were written directly). Killed before close(), or left by an
    exception inside `with`, the staged episodes stay: finalize_lerobot(root) packs them, and
    resume=True (fps and the other settings are then the recording's own) records more first.
    One process writes a dataset at a time (a lock in the journal; a dead process holds none).
    """

    def __init__(self, root: str | os.PathLike, fps: int | None = None, features: dict | None = None,
                 robot_type: str | None = None, use_videos: bool = True, vcodec: str = "libsvtav1",
                 overwrite: bool = False, chunks_size: int = 1000, data_files_size_in_mb: int = 100,
                 video_files_size_in_mb: int = 200, extra_info: dict | None = None, resume: bool = False):
        self.root = Path(root)
        self._journal = self.root / JOURNAL
        self._closed = False
        self._lock = None
        if resume:
            if overwrite:
                raise ValueError("LeRobotWriter: resume=True and overwrite=True exclude each other")
            self._resume(fps)
            return
        if self.root.exists():
            if not overwrite:
                raise FileExistsError(f"{self.root}: exists (pass overwrite=True to replace it)")
            shutil.rmtree(self.root) if self.root.is_dir() else self.root.unlink()
        self.root.mkdir(parents=True)
        self._journal.mkdir()
        self._take_lock()
        self.settings = {"fps": int(fps), "features": None, "robot_type": robot_type, "use_videos": use_videos,
                         "vcodec": vcodec, "chunks_size": chunks_size, "data_files_size_in_mb": data_files_size_in_mb,
                         "video_files_size_in_mb": video_files_size_in_mb, "extra_info": extra_info or {}}
        self._setup()
        if features is not None:
            self._set_features(features)
        self._save_settings()

    def _setup(self) -> None:
        st = self.settings
        self.fps, self.use_videos, self.vcodec = st["fps"], st["use_videos"], st["vcodec"]
        self.info = {"codebase_version": CODEBASE_VERSION, "robot_type": st["robot_type"], "total_episodes": 0,
                     "total_frames": 0, "total_tasks": 0, "chunks_size": st["chunks_size"],
                     "data_files_size_in_mb": st["data_files_size_in_mb"],
                     "video_files_size_in_mb": st["video_files_size_in_mb"],
                     "fps": self.fps, "splits": {}, "data_path": DATA_PATH,
                     "video_path": VIDEO_PATH if self.use_videos else None, "features": None}
        self.features: dict[str, dict] | None = None
        self.tasks: dict[str, int] = {}

    def _resume(self, fps) -> None:
        if not (self._journal / "writer.json").is_file():
            what = "a finalized dataset (resume continues an unfinalized recording only)" \
                if (self.root / INFO).is_file() else "no recording journal"
            raise DataError(f"{self._journal / 'writer.json'}: missing: {self.root} is {what}")
        self._take_lock()
        self.settings = json.loads((self._journal / "writer.json").read_text())
        if fps is not None and int(fps) != self.settings["fps"]:
            raise DataError(f"fps: {fps} given, the recording in {self.root} is at {self.settings['fps']}")
        self._setup()
        if self.settings["features"] is not None:
            self._set_features(self.settings["features"])
        for name in os.listdir(self._journal):      # what a killed episode left behind
            if name.endswith((".tmp", ".tmp.mp4")) or name == "pack":
                _remove(self._journal / name)
        records = _committed(self._journal)
        committed = {f"ep-{r['episode_index']:06d}" for r in records}
        for f in self._journal.glob("ep-*"):
            if f.name.split(".")[0] not in committed:
                f.unlink()
        for r in records:
            self._count(r["task"], r["length"])

    def _take_lock(self) -> None:
        self._lock = open(self._journal / "lock", "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise DataError(f"{self.root}: another process is writing this dataset (its journal is locked)") from None

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _save_settings(self) -> None:
        _atomic_write(self._journal / "writer.json", json.dumps(self.settings, indent=1).encode())

    def _set_features(self, features: dict) -> None:
        if not self.use_videos and any(ft["dtype"] == "video" for ft in features.values()):
            raise DataError("features: video features need use_videos=True")
        self.features = {k: {**ft, "shape": list(ft["shape"])} for k, ft in features.items()}
        self.info["features"] = {**self.features, **BOOKKEEPING}
        self.settings["features"] = {k: {**ft} for k, ft in self.features.items()}

    @property
    def n_frames(self) -> int:
        return self.info["total_frames"]

    @property
    def n_episodes(self) -> int:
        return self.info["total_episodes"]

    def _count(self, task: str, T: int) -> None:
        if task not in self.tasks:
            self.tasks[task] = len(self.tasks)
        self.info["total_episodes"] += 1
        self.info["total_frames"] += T
        self.info["total_tasks"] = len(self.tasks)
        self.info["splits"] = {"train": f"0:{self.info['total_episodes']}"}

    def add_episode(self, episode: Mapping[str, np.ndarray], task: str = "") -> None:
        """Stage one episode in the journal; when this returns it survives a crash (see the class notes)."""
        if self._closed:
            raise RuntimeError("LeRobotWriter: already closed")
        arrays = {k: np.asarray(v) for k, v in episode.items()}
        if self.features is None:
            self._set_features(infer_features(arrays, self.use_videos))
            self._save_settings()
        if set(arrays) != set(self.features):
            raise DataError(f"{sorted(set(arrays) ^ set(self.features))[0]}: episode keys differ from the features "
                            f"({sorted(self.features)})")
        T = len(next(iter(arrays.values())))
        if T == 0:
            raise DataError("episode: refusing an empty episode")
        for k, a in arrays.items():
            ft = self.features[k]
            if len(a) != T:
                raise DataError(f"{k}: episode has {len(a)} steps, other keys have {T} (ragged episode)")
            if ft["dtype"] in ("image", "video"):
                ok = a.shape[1:] == tuple(ft["shape"])
            else:
                ok = a.ndim <= 2 and int(np.prod(a.shape[1:])) == int(np.prod(ft["shape"]))
            if not ok:
                raise DataError(f"{k}: per-step shape {a.shape[1:]} differs from the feature shape {ft['shape']}")
            check_finite(k, a)
        ep = self.info["total_episodes"]
        task_index = self.tasks.get(task, len(self.tasks))
        start = self.n_frames
        frame_index = np.arange(T, dtype=np.int64)
        columns = {**arrays, "timestamp": (frame_index / self.fps).astype(np.float32), "frame_index": frame_index,
                   "episode_index": np.full(T, ep, np.int64), "index": np.arange(start, start + T, dtype=np.int64),
                   "task_index": np.full(T, task_index, np.int64)}
        # lerobot takes the stats before the parquet cast: its timestamps are still float64 then.
        stats = episode_stats({**columns, "timestamp": frame_index / self.fps}, self.info["features"])
        # The journal: every file whole and synced, the commit record last.
        _, pq = _parquet()
        name = f"ep-{ep:06d}"
        tmp = self._journal / f"{name}.parquet.tmp"
        pq.write_table(self._data_table(columns, T), tmp, compression="snappy", use_dictionary=True)
        _commit_file(tmp, self._journal / f"{name}.parquet")
        videos = {}
        for key, ft in self.features.items():
            if ft["dtype"] == "video":
                tmp = self._journal / f"{name}.{key}.tmp.mp4"      # (the container is named by its suffix)
                videos[key] = encode_frames(arrays[key], tmp, self.fps, self.vcodec)
                _commit_file(tmp, self._journal / f"{name}.{key}.mp4")
        with open(self._journal / f"{name}.stats.npz.tmp", "wb") as f:
            np.savez(f, **{f"{k}|{s}": v for k, st in stats.items() for s, v in st.items()})
        _commit_file(self._journal / f"{name}.stats.npz.tmp", self._journal / f"{name}.stats.npz")
        record = {"episode_index": ep, "task": task, "length": T, "videos": videos}
        _atomic_write(self._journal / f"{name}.json", json.dumps(record).encode())
        self._count(task, T)

    # ---- packing the journal into lerobot's layout ----
    def _pack(self) -> None:
        pa, pq = _parquet()
        for d in ("data", "videos", "meta"):        # what an interrupted pack wrote
            shutil.rmtree(self.root / d, ignore_errors=True)
        records = _committed(self._journal)
        self._tmp = self._journal / "pack"          # links to the staged videos, which joining consumes
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir()
        self._setup()
        self._set_features(self.settings["features"])
        self.episode_rows: list[dict] = []        # meta/episodes rows not yet flushed
        self.stats: list[dict] = []
        self._data = None                         # (pq.ParquetWriter, path, chunk, file, first frame)
        self._episodes_writer = None
        self._videos: dict[str, dict] = {}        # key -> {chunk, file, parts, duration}
        for r in records:
            name, ep, T, task = f"ep-{r['episode_index']:06d}", r["episode_index"], r["length"], r["task"]
            table = pq.read_table(self._journal / f"{name}.parquet")
            with np.load(self._journal / f"{name}.stats.npz") as z:
                stats: dict[str, dict] = {}
                for entry in z.files:
                    k, st = entry.rsplit("|", 1)
                    stats.setdefault(k, {})[st] = z[entry]
            row = {"episode_index": ep, "tasks": [task], "length": T, **self._write_data(table, T)}
            for key, ft in self.features.items():
                if ft["dtype"] == "video":
                    part = self._tmp / f"{key}-{ep:06d}.mp4"
                    try:
                        os.link(self._journal / f"{name}.{key}.mp4", part)
                    except OSError:     # a file system without hard links
                        shutil.copyfile(self._journal / f"{name}.{key}.mp4", part)
                    row.update(self._write_video(key, part, r["videos"][key]))
            row.update({f"stats/{k}/{s}": v.tolist() for k, st in stats.items() for s, v in st.items()})
            self.episode_rows.append(row)
            self.stats.append(stats)
            self._count(task, T)
            if len(self.episode_rows) >= 10:  # lerobot flushes its episode metadata every 10 episodes
                self._flush_episodes()
        if self._data is not None:
            self._data[0].close()
        for key in self._videos:
            self._finish_video(key)
        self._flush_episodes()
        self._episodes_writer.close()
        self._write_tasks()
        self.info["features"] = {**self.features, **BOOKKEEPING}
        self.info.update(self.settings.get("extra_info") or {})
        _write_json(self.root / "meta/stats.json", _plain(aggregate_stats(self.stats)))
        _write_json(self.root / INFO, self.info)     # last: a dataset with info.json is complete

    # ---- data/ ----
    def _data_table(self, columns: dict, T: int):
        pa, _ = _parquet()
        arrays, fields = [], {}
        for key, ft in self.info["features"].items():
            if ft["dtype"] == "video":
                continue
            a = columns[key]
            if ft["dtype"] == "image":
                arrays.append(pa.array([{"bytes": _png(img), "path": f"frame-{i:06d}.png"} for i, img in enumerate(a)],
                                       type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])))
            elif list(ft["shape"]) == [1]:
                arrays.append(pa.array(a.reshape(T).astype(ft["dtype"])))
            else:
                flat = pa.array(a.reshape(-1).astype(ft["dtype"]))
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, int(ft["shape"][0])))
            fields[key] = _hf_feature(ft)
        names = [k for k, ft in self.info["features"].items() if ft["dtype"] != "video"]
        table = pa.Table.from_arrays(arrays, names=names)
        # `datasets` stamps each file with a fingerprint of its content; any 16 hex digits will do.
        fingerprint = hashlib.sha1(f"{self.root.resolve()}:{self.n_frames}".encode()).hexdigest()[:16]
        meta = {"info": {"features": fields}, "fingerprint": fingerprint}
        return table.replace_schema_metadata({"huggingface": json.dumps(meta)})

    def _write_data(self, table, T: int) -> dict:
        _, pq = _parquet()
        start = self.n_frames
        if self._data is None:
            chunk, file, first = 0, 0, start
        else:
            writer, path, chunk, file, first = self._data
            per_frame = _size_mb(path) / max(start - first, 1)
            if _size_mb(path) + per_frame * T >= self.info["data_files_size_in_mb"]:
                writer.close()
                self._data = None
                (chunk, file), first = _next_file(chunk, file, self.info["chunks_size"]), start
        if self._data is None:
            path = self.root / DATA_PATH.format(chunk_index=chunk, file_index=file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._data = (pq.ParquetWriter(path, table.schema, compression="snappy", use_dictionary=True),
                          path, chunk, file, first)
        self._data[0].write_table(table)  # one row group per episode, as lerobot
        return {"data/chunk_index": chunk, "data/file_index": file, "dataset_from_index": start,
                "dataset_to_index": start + T}

    # ---- videos/ ----
    def _write_video(self, key: str, part: Path, duration: float) -> dict:
        v = self._videos.get(key)
        if v is None:
            v = self._videos[key] = {"chunk": 0, "file": 0, "parts": [], "duration": 0.0}
        elif sum(_size_mb(p) for p in v["parts"]) + _size_mb(part) >= self.info["video_files_size_in_mb"]:
            self._finish_video(key)
            v["chunk"], v["file"] = _next_file(v["chunk"], v["file"], self.info["chunks_size"])
            v["parts"], v["duration"] = [], 0.0
        v["parts"].append(part)
        start = v["duration"]
        v["duration"] += duration
        return {f"videos/{key}/chunk_index": v["chunk"], f"videos/{key}/file_index": v["file"],
                f"videos/{key}/from_timestamp": start, f"videos/{key}/to_timestamp": start + duration}

    def _finish_video(self, key: str) -> None:
        v = self._videos[key]
        if not v["parts"]:
            return
        dst = self.root / VIDEO_PATH.format(video_key=key, chunk_index=v["chunk"], file_index=v["file"])
        dst.parent.mkdir(parents=True, exist_ok=True)
        concatenate(v["parts"], dst)
        v["parts"] = []
        if "info" not in self.features[key]:  # lerobot describes the first file of each camera
            self.features[key]["info"] = video_info(dst)

    # ---- meta/ ----
    def _flush_episodes(self) -> None:
        pa, pq = _parquet()
        if not self.episode_rows:
            return
        rows = [{**r, "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0} for r in self.episode_rows]
        table = pa.Table.from_pylist(rows)
        if self._episodes_writer is None:
            path = self.root / EPISODES_PATH.format(chunk_index=0, file_index=0)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._episodes_writer = pq.ParquetWriter(path, table.schema, compression="snappy", use_dictionary=True)
        self._episodes_writer.write_table(table)
        self.episode_rows = []

    def _write_tasks(self) -> None:
        pa, pq = _parquet()
        names = sorted(self.tasks, key=self.tasks.get)
        table = pa.table({"task_index": pa.array([self.tasks[t] for t in names], pa.int64()),
                          "__index_level_0__": pa.array(names, pa.large_string())})
        # lerobot stores tasks as a pandas DataFrame indexed by the task string; this is the
        # metadata pandas writes for it, so pandas (and lerobot) read the index back.
        meta = {"index_columns": ["__index_level_0__"],
                "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "str",
                                    "metadata": {"encoding": "UTF-8"}}],
                "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                             "numpy_type": "int64", "metadata": None},
                            {"name": None, "field_name": "__index_level_0__", "pandas_type": "object",
                             "numpy_type": "str", "metadata": None}],
                "attributes": {}, "creator": {"library": "pyarrow", "version": pa.__version__},
                "pandas_version": "3.1.1"}
        pq.write_table(table.replace_schema_metadata({"pandas": json.dumps(meta)}), self.root / "meta/tasks.parquet",
                       compression="snappy")

    def close(self) -> Path:
        """Pack the staged episodes into the dataset and remove the journal."""
        if self._closed:
            return self.root
        self._closed = True
        try:
            if not _committed(self._journal):
                shutil.rmtree(self._journal, ignore_errors=True)
                raise DataError(f"{self.root}: no episodes were added")
            self._pack()
            shutil.rmtree(self._journal)
        finally:
            self._release_lock()
        return self.root

    def __enter__(self) -> "LeRobotWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:   # the finished episodes stay in the journal (finalize_lerobot, or resume=True)
            self._closed = True
            self._release_lock()


def _committed(journal: Path) -> list[dict]:
    """The journal's commit records, in episode order; they must be episodes 0, 1, 2, ..."""
    records = []
    for f in sorted(journal.glob("ep-*.json")):
        try:
            records.append(json.loads(f.read_text()))
        except (OSError, ValueError) as e:
            raise DataError(f"{f}: unreadable commit record ({e})") from e
    for i, r in enumerate(records):
        if r.get("episode_index") != i:
            raise DataError(f"{journal}: episode {i} has no commit record (records: "
                            f"{[r.get('episode_index') for r in records]})")
    return records


def finalize_lerobot(root: str | os.PathLike) -> Path:
    """Finish a recording whose LeRobotWriter never closed (a crash, a kill): pack the finished
    episodes of `<root>/.recording/` into a normal LeRobot v3 dataset (a half-written episode is
    dropped). A finalized dataset is left as it is. Refused while a writer still holds the journal."""
    root = Path(root)
    if (root / INFO).is_file() and not (root / JOURNAL).exists():
        return root
    return LeRobotWriter(root, resume=True).close()


def _commit_file(tmp: Path, dst: Path) -> None:
    """A finished journal file into place: synced, renamed, the directory synced."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    _commit_file(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _png(img: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=6)  # lerobot's level for image features
    return buf.getvalue()


def _plain(stats: dict) -> dict:
    return {k: {s: v.tolist() for s, v in st.items()} for k, st in stats.items()}


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=4, ensure_ascii=False)  # lerobot's write_json


def main(argv: list[str] | None = None) -> int:
    """python -m dpag_engine.data.lerobot finalize <root>: pack a recording that was not closed."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m dpag_engine.data.lerobot",
                                description="LeRobot v3 datasets: finish a recording whose writer was killed")
    sub = p.add_subparsers(dest="command", required=True)
    fin = sub.add_parser("finalize", help="pack the finished episodes of <root>/.recording/ into the dataset")
    fin.add_argument("root")
    args = p.parse_args(argv)
    try:
        out = finalize_lerobot(args.root)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = load_info(out)
    print(f"{out}: {info['total_episodes']} episodes, {info['total_frames']} frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
