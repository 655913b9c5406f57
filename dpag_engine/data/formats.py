"""Which format a path holds, and how its keys map onto the policy's inputs.

`prepare_data` is the one entry point training uses: it picks the reader by what the path holds
(a zarr replay buffer, a LeRobot v3 directory or a robomimic hdf5 file), resolves the data config's
key names against that dataset, completes the policy's camera spec from the frames (cameras, image
shape, crop), and loads a ReplayBuffer. Everything after it is format-blind.

Key names resolve by trying, in order (so each format's standard names need no configuration):
    action_key "action"       action, actions (robomimic)
    state_keys "state"        state, observation.state (LeRobot)
    camera "front"            front, observation.images.front, observation.front (LeRobot), front_image
With the default state_keys and no `state` key, the state is every low-dim observation (LeRobot
observation.* / robomimic obs/*), in the dataset's order. Without data.cameras or
policy.image.cameras, every camera of the dataset is used, named by its LeRobot suffix or its key.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from .replay_buffer import DataError, Feature, ReplayBuffer, read_replay_buffer, zarr_schema

FORMATS = ("zarr", "lerobot", "robomimic")
DEFAULT_STATE_KEYS = ["state"]
DP_CROP_RATIO = 84 / 96  # DP's crop of its 96x96 frames, kept for other sizes when the crop is not given
_SLICE = re.compile(r"^(?P<key>[^\[\]]+?)(\[(?P<a>-?\d*):(?P<b>-?\d*)\])?$")


def parse_key_spec(spec: str) -> tuple[str, slice]:
    """'state[:2]' -> ('state', slice(None, 2)); 'keypoint' -> ('keypoint', slice(None))."""
    m = _SLICE.match(spec.strip())
    if m is None:
        raise DataError(f"data.state_keys: cannot parse {spec!r} (use 'key' or 'key[a:b]')")
    a, b = m.group("a"), m.group("b")
    return m.group("key"), slice(int(a) if a else None, int(b) if b else None)


def needed_keys(cfg) -> list[str]:
    """The dataset keys a (resolved) data config reads: the action, the state keys, the cameras."""
    return [cfg.action_key, *(parse_key_spec(s)[0] for s in cfg.state_keys), *cfg.cameras.values()]


def detect_format(path: str | os.PathLike) -> str:
    """'zarr', 'lerobot' or 'robomimic', from the files at `path` (not its name)."""
    from .lerobot import hub_id_error, is_lerobot
    from .robomimic import is_hdf5
    err = hub_id_error(str(path))
    if err is not None:
        raise err
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if is_lerobot(p):
        return "lerobot"
    if is_hdf5(p):
        return "robomimic"
    if (p.is_dir() and any((p / f).exists() for f in ("zarr.json", ".zgroup", "data/.zgroup", "data/zarr.json"))) \
            or (p.is_file() and zipfile.is_zipfile(p)):
        return "zarr"
    if p.is_dir() and (p / "meta").is_dir():
        raise DataError(f"{p / 'meta/info.json'}: missing (a LeRobot dataset directory needs it)")
    raise DataError(f"{p}: not a zarr replay buffer (.zarr directory or .zarr.zip), a LeRobot v3 dataset "
                    f"directory (meta/info.json) or a robomimic hdf5 file")


def read_schema(path: Path, fmt: str) -> dict[str, Feature]:
    from . import lerobot, robomimic
    return {"zarr": zarr_schema, "lerobot": lerobot.schema, "robomimic": robomimic.schema}[fmt](path)


def read_buffer(path: Path, fmt: str, keys: list[str] | None = None, cache_dir: str | None = None) -> ReplayBuffer:
    from .lerobot import read_lerobot
    from .robomimic import read_robomimic
    if fmt == "lerobot":
        return read_lerobot(path, keys, cache_dir=cache_dir)
    if fmt == "robomimic":
        return read_robomimic(path, keys)
    return read_replay_buffer(path, keys)


# ---------------------------------------------------------------------------------------------
# Key mapping
# ---------------------------------------------------------------------------------------------
_CANDIDATES = {
    "action": lambda k: [k, f"{k}s"],
    "state": lambda k: [k, f"observation.{k}"],
    "camera": lambda k: [k, f"observation.images.{k}", f"observation.{k}", f"{k}_image"],
}


def _label(key: str, fmt: str) -> str:
    """A key as its format writes it: data/<key> in zarr, obs/<key> in robomimic, the feature name in LeRobot."""
    return {"zarr": f"data/{key}", "robomimic": key if key == "actions" else f"obs/{key}"}.get(fmt, key)


def _resolve(name: str, role: str, schema: dict[str, Feature], field: str, fmt: str, path: Path) -> str:
    tried = list(dict.fromkeys(_CANDIDATES[role](name)))
    for key in tried:
        if key in schema:
            if schema[key].image != (role == "camera"):
                kind = "camera frames" if schema[key].image else "low-dim values"
                raise DataError(f"{_label(key, fmt)}: holds {kind}, but {field} needs "
                                f"{'camera frames' if role == 'camera' else 'low-dim values'} ({path})")
            return key
    raise DataError(f"{_label(name, fmt)}: missing in {path} ({field}; tried {', '.join(_label(k, fmt) for k in tried)}; "
                    f"available: {', '.join(_label(k, fmt) for k in schema) or 'nothing'})")


def _is_observation(key: str, fmt: str) -> bool:
    return key.startswith("observation.") if fmt == "lerobot" else fmt == "robomimic" and key != "actions"


def _camera_name(key: str) -> str:
    for prefix in ("observation.images.", "observation."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def resolve_keys(cfg, schema: dict[str, Feature], fmt: str, path: Path, image: dict | None) -> None:
    """Rewrite cfg.action_key / state_keys / cameras (in place) as keys that exist in the dataset."""
    cfg.action_key = _resolve(cfg.action_key, "action", schema, "data.action_key", fmt, path)
    fallback = [k for k, f in schema.items() if not f.image and _is_observation(k, fmt)]
    state_keys = []
    for spec in cfg.state_keys:
        key, _ = parse_key_spec(spec)
        if list(cfg.state_keys) == DEFAULT_STATE_KEYS and fallback and not any(c in schema for c in _CANDIDATES["state"](key)):
            state_keys = fallback  # no `state`: every low-dim observation
            break
        state_keys.append(_resolve(key, "state", schema, "data.state_keys", fmt, path) + spec.strip()[len(key):])
    cfg.state_keys = state_keys
    if cfg.cameras:
        cfg.cameras = {cam: _resolve(key, "camera", schema, f"data.cameras.{cam}", fmt, path) for cam, key in cfg.cameras.items()}
    elif image is not None and image.get("cameras"):
        cfg.cameras = {cam: _resolve(cam, "camera", schema, "policy.image.cameras", fmt, path) for cam in image["cameras"]}
    elif image is not None:
        cfg.cameras = {_camera_name(k): k for k, f in schema.items() if f.image}
        if not cfg.cameras:
            raise DataError(f"policy.image: set, but {path} holds no camera frames (uint8 images or videos)")
    if image is not None and image.get("cameras") and set(image["cameras"]) != set(cfg.cameras):
        raise DataError(f"data.cameras: names {sorted(cfg.cameras)} differ from policy.image.cameras "
                        f"{sorted(image['cameras'])}")


def _chw(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Stored frame shape -> (C, H, W): HWC (DP, LeRobot, robomimic) unless it already is CHW."""
    return (shape[2], shape[0], shape[1]) if shape[-1] in (1, 3, 4) else tuple(shape)


def resize_frames(frames: np.ndarray, hw: tuple[int, int], chunk: int = 256) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, h, w, C) uint8, antialiased bilinear, a chunk at a time."""
    import torch
    import torch.nn.functional as F
    out = np.empty((len(frames), *hw, frames.shape[-1]), dtype=np.uint8)
    for i in range(0, len(frames), chunk):
        x = torch.from_numpy(np.array(frames[i:i + chunk])).permute(0, 3, 1, 2).float()  # a copy: frames may be a read-only map
        y = F.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)
        out[i:i + chunk] = y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def resolve_image(cfg, schema: dict[str, Feature], image: dict) -> tuple[dict, dict[str, tuple[int, int]]]:
    """policy.image with cameras, image_shape and crop_shape filled from the frames where not given.

    The policy takes one image_shape for all cameras: cameras of different resolutions are resized
    to the smallest height and width among them (returned as {camera: (H, W)} to resize).
    """
    image = dict(image)
    image["cameras"] = list(cfg.cameras)
    shapes = {cam: _chw(schema[key].shape) for cam, key in cfg.cameras.items()}
    resize: dict[str, tuple[int, int]] = {}
    if "image_shape" not in image:
        if len({s[0] for s in shapes.values()}) > 1:
            raise DataError(f"data.cameras: cameras have different channel counts "
                            f"({', '.join(f'{c} {s[0]}' for c, s in shapes.items())}); the policy takes one")
        c = next(iter(shapes.values()))[0]
        h, w = min(s[1] for s in shapes.values()), min(s[2] for s in shapes.values())
        image["image_shape"] = [c, h, w]
        resize = {cam: (h, w) for cam, s in shapes.items() if s[1:] != (h, w)}
        if "crop_shape" not in image:
            image["crop_shape"] = [max(1, round(h * DP_CROP_RATIO)), max(1, round(w * DP_CROP_RATIO))]
    return image, resize


def prepare_data(cfg, image: dict | None = None, log: Callable[[str], None] | None = None) -> tuple[ReplayBuffer, dict | None]:
    """Read cfg.path (any format) with cfg's keys resolved in place; returns (buffer, completed policy.image).

    `image` is the policy.image section as given (a dict of the fields set, or None for no cameras).
    """
    if not cfg.path:
        raise DataError("data.path: not set (give a .zarr directory or .zarr.zip, a LeRobot dataset directory, "
                        "a robomimic .hdf5 file, or use --synthetic)")
    fmt = detect_format(cfg.path)
    path = Path(os.path.expanduser(cfg.path))
    schema = read_schema(path, fmt)
    resolve_keys(cfg, schema, fmt, path, image)
    resize: dict[str, tuple[int, int]] = {}
    if image is not None:
        image, resize = resolve_image(cfg, schema, image)
    buffer = read_buffer(path, fmt, needed_keys(cfg), cfg.cache_dir)
    for cam, hw in resize.items():
        key = cfg.cameras[cam]
        if schema[key].shape[-1] not in (1, 3, 4):
            raise DataError(f"data.cameras.{cam}: {key} is stored channel-first; cannot resize it to {hw}")
        buffer.data[key] = resize_frames(buffer.data[key], hw)
    if log is not None:
        log(describe(buffer, cfg, fmt, image, resize))
    return buffer, image


def describe(buffer: ReplayBuffer, cfg, fmt: str, image: dict | None, resize: dict) -> str:
    def dims(key):
        return "x".join(map(str, buffer.data[key].shape[1:])) or "1"
    parts = [f"action <- {cfg.action_key} ({dims(cfg.action_key)})"]
    if cfg.state_keys:
        parts.append(f"state <- {' + '.join(cfg.state_keys)}")
    for cam, key in cfg.cameras.items():
        parts.append(f"camera {cam} <- {key} ({dims(key)}{', resized' if cam in resize else ''})")
    text = f"data: {fmt} {buffer.path}, {buffer.n_episodes} episodes, {buffer.n_steps} steps; " + "; ".join(parts)
    if image is not None:
        text += f"; image_shape {image['image_shape']}, crop {image.get('crop_shape', 'default')}"
    if buffer.split is not None:
        text += f"; split from the file ({int(buffer.split[1].sum())} validation episodes)"
    return text
