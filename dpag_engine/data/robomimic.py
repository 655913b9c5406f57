"""robomimic's hdf5 datasets (the DP-AG paper's simulation benchmarks) into a ReplayBuffer.

Layout (robomimic docs, docs/datasets/overview.md "Dataset Structure"):

    data/                          attrs: total, env_args (json)
      demo_<i>/                    attrs: num_samples
        actions      (N, A)
        obs/<key>    (N, ...)      low-dim vectors, or images (N, H, W, C) uint8 channel-last
        states, rewards, dones, next_obs/   (not used for imitation)
    mask/<filter key>              demo names, e.g. mask/train and mask/valid from split_train_val.py

Demos are concatenated in robomimic's order (by the number after demo_). Buffer keys are the obs
key names as robomimic writes them (e.g. robot0_eef_pos, agentview_image) and `actions`.
A train/valid split in mask/ becomes the buffer's own split, used instead of a random one.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from .replay_buffer import DataError, Feature, ReplayBuffer, check_finite

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ACTIONS = "actions"


def is_hdf5(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(8) == HDF5_SIGNATURE


def _open(path: Path):
    import h5py
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable hdf5 file ({e})") from e


def _demos(f, path: Path) -> list[str]:
    if "data" not in f:
        raise DataError(f"{path}: no 'data' group (expected robomimic's layout data/demo_<i>/...)")
    names = list(f["data"].keys())
    bad = [n for n in names if not re.fullmatch(r"demo_\d+", n)]
    if bad:
        raise DataError(f"data/{bad[0]}: not a demo group (robomimic names them demo_<i>)")
    if not names:
        raise DataError(f"{path}: 'data' holds no demos")
    return sorted(names, key=lambda n: int(n[5:]))


def schema(path: Path) -> dict:
    """{key: Feature} from the first demo, without loading the data."""
    with _open(path) as f:
        demo = f["data"][_demos(f, path)[0]]
        out = {}
        if ACTIONS in demo:
            out[ACTIONS] = Feature(tuple(demo[ACTIONS].shape[1:]), str(demo[ACTIONS].dtype), False)
        for key, ds in (demo["obs"].items() if "obs" in demo else ()):
            out[key] = Feature(tuple(ds.shape[1:]), str(ds.dtype), _is_image(ds.shape, ds.dtype))
    return out


def _is_image(shape, dtype) -> bool:
    # robomimic stores images uint8 channel-last (H, W, C); anything else is a low-dim observation.
    return len(shape) == 4 and np.dtype(dtype) == np.uint8 and shape[-1] in (1, 3, 4)


def read_robomimic(path: str | os.PathLike, keys: Iterable[str] | None = None) -> ReplayBuffer:
    """Load `actions` and the requested obs keys (everything when None) of every demo."""
    path = Path(path)
    with _open(path) as f:
        demos = _demos(f, path)
        available = schema(path)
        wanted = list(available) if keys is None else list(dict.fromkeys(keys))
        for k in wanted:
            if k not in available:
                raise DataError(f"data/{demos[0]}/obs/{k}: missing in {path} "
                                f"(obs keys: {', '.join(k for k in available if k != ACTIONS)})")
        parts: dict[str, list[np.ndarray]] = {k: [] for k in wanted}
        lengths = []
        for name in demos:
            demo = f["data"][name]
            if ACTIONS not in demo:
                raise DataError(f"data/{name}/actions: missing in {path}")
            n = len(demo[ACTIONS])
            if "num_samples" in demo.attrs and int(demo.attrs["num_samples"]) != n:
                raise DataError(f"data/{name}: attribute num_samples = {int(demo.attrs['num_samples'])} "
                                f"but actions has {n} rows")
            if n == 0:
                raise DataError(f"data/{name}: empty demo")
            for k in wanted:
                where = f"data/{name}/{k}" if k == ACTIONS else f"data/{name}/obs/{k}"
                ds = demo[ACTIONS] if k == ACTIONS else demo["obs"].get(k) if "obs" in demo else None
                if ds is None:
                    raise DataError(f"{where}: missing in {path}")
                a = np.asarray(ds[()])
                if len(a) != n:
                    raise DataError(f"{where}: has {len(a)} rows but actions has {n}")
                if a.shape[1:] != available[k].shape:
                    raise DataError(f"{where}: per-step shape {a.shape[1:]} differs from "
                                    f"data/{demos[0]} ({available[k].shape})")
                check_finite(where, a)
                parts[k].append(a)
            lengths.append(n)
        split = _split(f, demos, path)
    data = {k: np.concatenate(v) for k, v in parts.items()}
    return ReplayBuffer(data=data, episode_ends=np.cumsum(lengths).astype(np.int64), path=str(path), split=split)


def _split(f, demos: list[str], path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(train, val) episode masks from mask/train and mask/valid, if the file has them."""
    if "mask" not in f or not ({"train", "valid"} & set(f["mask"].keys())):
        return None
    index = {d: i for i, d in enumerate(demos)}

    def mask(key: str) -> np.ndarray | None:
        if key not in f["mask"]:
            return None
        m = np.zeros(len(demos), dtype=bool)
        for name in f["mask"][key][()]:
            name = name.decode() if isinstance(name, bytes) else str(name)
            if name not in index:
                raise DataError(f"mask/{key}: lists {name!r}, which is not a demo in {path}")
            m[index[name]] = True
        return m

    train, val = mask("train"), mask("valid")
    train = ~val if train is None else train
    val = ~train if val is None else val
    if (train & val).any():
        raise DataError(f"mask/train and mask/valid: both list {demos[int(np.flatnonzero(train & val)[0])]}")
    if not train.any():
        raise DataError("mask/train: selects no demos")
    return train, val
