"""Data-path throughput: samples/s of training batches from a zarr buffer, a LeRobot v3 dataset
(AV1 video, decoded once into the frame cache) and a robomimic hdf5 file holding the same episodes.

  python bench/bench_data.py [--episodes 50 --length 100 --batches 100]   markdown table
  pytest bench/bench_data.py --benchmark-only                            LeRobot batches, pytest-benchmark

What is timed is what `train` does for every micro-batch: `SequenceDataset.__getitems__` on
GlobalBatchSampler's indices (gather the obs/action windows, frames to CHW floats in [0, 1]), batch
64, To = 2, horizon 16, one 96x96 camera + a 20-d state. Load = reading the dataset into the
ReplayBuffer before training (for LeRobot: decoding every video frame once when the cache is cold,
opening the memory-mapped cache when warm). The last row times what a loader without a cache
would pay: a PyAV seek + decode of the To frames of each sample.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from dpag_engine.data import (DataConfig, GlobalBatchSampler, LeRobotWriter, load_datasets, make_episodes,
                              write_replay_buffer)

BATCH, TO, HORIZON, NA = 64, 2, 16, 8


def write_robomimic(path: Path, episodes) -> Path:
    """robomimic's layout (data/demo_i/actions, data/demo_i/obs/<key>), the same episodes."""
    import h5py
    with h5py.File(path, "w") as f:
        for i, e in enumerate(episodes):
            g = f.create_group(f"data/demo_{i}")
            g.attrs["num_samples"] = len(e["action"])
            g.create_dataset("actions", data=e["action"])
            g.create_dataset("obs/state", data=e["state"])
            g.create_dataset("obs/image", data=e["image"])
    return path


def write_all(root: Path, n_episodes: int, length: int) -> dict[str, Path]:
    eps = make_episodes(n_episodes=n_episodes, episode_length=length, action_dim=2, state_dim=20,
                        cameras={"image": "image"}, image_shape=(3, 96, 96), seed=0)
    paths = {"zarr": write_replay_buffer(root / "d.zarr", eps)}
    with LeRobotWriter(root / "lerobot", fps=10) as w:
        for e in eps:
            w.add_episode({"observation.state": e["state"], "action": e["action"], "observation.images.image": e["image"]})
    paths["lerobot"] = root / "lerobot"
    paths["robomimic"] = write_robomimic(root / "d.hdf5", eps)
    return paths


def loaded(path: Path, cache: Path | None, cameras: bool = True):
    cfg = DataConfig(path=str(path), cameras={"image": "image"} if cameras else {}, val_ratio=0,
                     cache_dir=str(cache) if cache else None)
    t = time.perf_counter()
    train, _ = load_datasets(cfg, TO, HORIZON, NA, (3, 96, 96) if cameras else None)
    return train, time.perf_counter() - t


def samples_per_s(dataset, batches: int, rounds: int = 5) -> float:
    """Median over rounds of `batches` batches, in training's order (a shared machine is noisy)."""
    it = iter(GlobalBatchSampler(len(dataset), BATCH, seed=0))
    for _ in range(5):  # warm the page cache and the allocator
        dataset[next(it)]
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(batches):
            dataset[next(it)]
        rates.append(batches * BATCH / (time.perf_counter() - t))
    return float(np.median(rates))


def per_sample_decode(video: Path, dataset, samples: int, fps: int = 10) -> float:
    """samples/s decoding each sample's To frames from the mp4: seek to the keyframe before, decode on.

    All episodes sit back to back in one file, so dataset row r is the frame at r / fps seconds.
    """
    import av
    from dpag_engine.data import window_rows
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    with av.open(str(video)) as c:
        s = c.streams.video[0]
        for i in rng.integers(0, len(dataset), samples):
            rows = window_rows(dataset.windows[i:i + 1], TO)[0]
            need = {round(r / fps / s.time_base) for r in rows.tolist()}
            c.seek(min(need), stream=s, backward=True)
            for frame in c.decode(s):
                if frame.pts in need:
                    frame.to_ndarray(format="rgb24")
                    need.discard(frame.pts)
                if not need:
                    break
    return samples / (time.perf_counter() - t)


def run(n_episodes: int, length: int, batches: int) -> list[tuple[str, str, str, str]]:
    root = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        paths = write_all(root, n_episodes, length)
        rows = []
        for name, path, cache in [("zarr (DP replay buffer, in RAM)", paths["zarr"], None),
                                  ("LeRobot v3, AV1, cold cache (decode once)", paths["lerobot"], root / "cache"),
                                  ("LeRobot v3, AV1, warm cache (memory-mapped)", paths["lerobot"], root / "cache"),
                                  ("robomimic hdf5 (in RAM)", paths["robomimic"], None)]:
            ds, load_s = loaded(path, cache)
            lowdim, _ = loaded(path, cache, cameras=False)
            rows.append((name, f"{load_s:.2f}", f"{samples_per_s(ds, batches):,.0f}", f"{samples_per_s(lowdim, batches):,.0f}"))
            if "cold" in name:
                rows[-1] = (name, f"{load_s:.2f} ({ds.buffer.n_steps / load_s:,.0f} frames/s)", *rows[-1][2:])
        video = next((paths["lerobot"] / "videos").rglob("*.mp4"))
        rows.append(("LeRobot v3, AV1, decode per sample (no cache)", "-",
                     f"{per_sample_decode(video, ds, 200):,.0f}", "-"))
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--length", type=int, default=100)
    p.add_argument("--batches", type=int, default=100)
    a = p.parse_args()
    rows = run(a.episodes, a.length, a.batches)
    print(f"{a.episodes} episodes x {a.length} steps, batch {BATCH}, To {TO}, horizon {HORIZON}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print("| data path | load (s) | samples/s, image + state | samples/s, state only |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def test_lerobot_batches(benchmark, tmp_path):
    paths = write_all(tmp_path, 10, 60)
    ds, _ = loaded(paths["lerobot"], tmp_path / "cache")
    idx = list(range(BATCH))
    benchmark(lambda: ds[idx])


if __name__ == "__main__":
    main()
