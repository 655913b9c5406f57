"""Convert demonstrations between formats: `python -m dpag_engine.data.convert SRC DST`.

    python -m dpag_engine.data.convert data/pusht/pusht_cchi_v7_replay.zarr data/pusht_lerobot --fps 10
    python -m dpag_engine.data.convert ~/data/ur5_lerobot ur5.zarr.zip

SRC is anything training reads (a zarr replay buffer, a LeRobot v3 directory, a robomimic hdf5),
told apart by content. DST ending in .zarr or .zarr.zip is written as a DP replay buffer; any other
DST as a LeRobotDataset v3.0 directory (cameras as AV1 video, or PNG images with --images).
Keys follow each format's conventions: state <-> observation.state, <camera> <->
observation.images.<camera>, other observations <-> observation.<key>, action(s) <-> action.
Multi-dimensional low-dim arrays (e.g. DP's keypoint (N, 9, 2)) are flattened for LeRobot, which
stores vectors; LeRobot's task strings and fps have no place in a zarr buffer and are dropped.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from .formats import detect_format, read_buffer, read_schema
from .lerobot import LeRobotWriter, load_info
from .replay_buffer import DataError, write_replay_buffer


def is_zarr_path(path: str | os.PathLike) -> bool:
    return str(path).rstrip("/").endswith((".zarr", ".zarr.zip"))


def lerobot_key(key: str, image: bool) -> str:
    if key in ("action", "actions"):
        return "action"
    if key.startswith("observation."):
        return key
    return f"observation.images.{key}" if image else f"observation.{key}"


def zarr_key(key: str) -> str:
    if key in ("action", "actions"):
        return "action"
    for prefix in ("observation.images.", "observation."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _renamed(schema: dict, rename) -> dict[str, str]:
    names = {k: rename(k, f.image) for k, f in schema.items()}
    seen: dict[str, str] = {}
    for src, dst in names.items():
        if dst in seen:
            raise DataError(f"{src}: would be written as {dst}, like {seen[dst]}")
        seen[dst] = src
    return names


def convert(src: str | os.PathLike, dst: str | os.PathLike, fps: int | None = None, task: str | None = None,
            robot_type: str | None = None, use_videos: bool = True, vcodec: str = "libsvtav1",
            overwrite: bool = False) -> Path:
    if Path(dst).exists() and not overwrite:
        raise FileExistsError(f"{dst}: exists (pass --overwrite to replace it)")
    fmt = detect_format(src)
    src_path = Path(os.path.expanduser(str(src)))
    schema = read_schema(src_path, fmt)
    buffer = read_buffer(src_path, fmt)  # every observation and action, frames as stored
    starts, ends = buffer.episode_starts, buffer.episode_ends
    if is_zarr_path(dst):
        names = _renamed(schema, lambda k, image: zarr_key(k))
        episodes = ({names[k]: v[s:e] for k, v in buffer.data.items()} for s, e in zip(starts, ends))
        return write_replay_buffer(dst, episodes, overwrite=overwrite)
    names = _renamed(schema, lerobot_key)
    if fmt == "lerobot":
        info = load_info(src_path)
        fps, robot_type = fps or int(info["fps"]), robot_type or info.get("robot_type")
    if fps is None:
        raise DataError(f"--fps: {src_path} does not say at what rate it was recorded; give --fps")
    task = src_path.name.split(".")[0] if task is None else task
    with LeRobotWriter(dst, fps=fps, robot_type=robot_type, use_videos=use_videos, vcodec=vcodec,
                       overwrite=overwrite) as writer:
        for s, e in zip(starts, ends):
            episode = {}
            for k, v in buffer.data.items():
                x = v[s:e]
                if schema[k].image and x.shape[-1] not in (1, 3, 4):
                    x = x.transpose(0, 2, 3, 1)  # CHW frames -> LeRobot's HWC
                elif not schema[k].image and x.ndim > 2:
                    x = x.reshape(len(x), -1)
                episode[names[k]] = np.ascontiguousarray(x)
            writer.add_episode(episode, task=task)
    return Path(dst)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpag_engine.data.convert", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="zarr replay buffer, LeRobot v3 directory or robomimic .hdf5")
    p.add_argument("dst", help="*.zarr / *.zarr.zip: a DP replay buffer; otherwise a LeRobot v3 directory")
    p.add_argument("--fps", type=int, help="frame rate for LeRobot (zarr and robomimic do not record one)")
    p.add_argument("--task", help="LeRobot task string of every episode (default: the source's name)")
    p.add_argument("--robot-type", help="LeRobot robot_type")
    p.add_argument("--images", action="store_true", help="LeRobot: cameras as PNG images in the parquet, not video")
    p.add_argument("--vcodec", default="libsvtav1", choices=["libsvtav1", "libx264"],
                   help="LeRobot video codec: AV1 (LeRobot's default) or H.264")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = p.parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.fps, args.task, args.robot_type, not args.images, args.vcodec,
                      args.overwrite)
    except (DataError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
