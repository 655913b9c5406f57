"""Write scripted-expert demonstrations in Diffusion Policy's zarr layout.

    python -m dpag_engine.envs.generate --out data/pusht/expert.zarr --episodes 200 [--task dynamic_pusht]
        [--image] [--workers 2] [--seed 0] [--keep-failed]

Keys: data/action (N, 2), data/state (N, 5), data/keypoint (N, 9, 2), data/img (N, 96, 96, 3) with
--image, data/ball (N, 4) on dynamic_pusht; meta/episode_ends. Episode i uses reset seed
seed + i (training seeds stay far below the test seeds 100000+). Failed episodes are dropped
unless --keep-failed: like DP's human demonstrations, the data shows the task being done.

The episodes go to a staging sibling (`.partial-<name>`) that is renamed to --out only when all of
them are done: a killed run leaves no --out, so nothing mistakes a third of a dataset for all of it.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

from ..data.replay_buffer import ReplayBufferWriter
from ..progress import progress_bar
from .dynamic_pusht import make_task
from .expert import run_expert_episode


def _episode(args: tuple[str, int, bool]):
    task_name, seed, image = args
    task = make_task(task_name, render=image)
    t0 = time.perf_counter()
    episode = run_expert_episode(task, seed)
    return seed, episode, task.success, task.max_coverage, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output .zarr directory or .zarr.zip")
    p.add_argument("--task", default="pusht", choices=["pusht", "dynamic_pusht"])
    p.add_argument("--episodes", type=int, default=200, help="expert episodes to run")
    p.add_argument("--seed", type=int, default=0, help="reset seed of the first episode")
    p.add_argument("--image", action="store_true", help="also render data/img (96x96 RGB)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--keep-failed", action="store_true", help="also write episodes below 0.95 coverage")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        p.error(f"--out {out}: exists (pass --overwrite to replace it)")
    staging = out.with_name(f".partial-{out.name}")   # same suffix: the writer picks the format by it
    jobs = [(args.task, args.seed + i, args.image) for i in range(args.episodes)]
    t0, kept, succeeded, times = time.perf_counter(), 0, 0, []
    pool = mp.get_context("spawn").Pool(args.workers) if args.workers > 1 else None
    results = pool.imap(_episode, jobs) if pool else map(_episode, jobs)
    with ReplayBufferWriter(staging, overwrite=True) as writer:
        # imap yields in seed order, so the file is reproducible
        for seed, episode, success, cov, seconds in progress_bar(results, total=len(jobs), desc="episodes"):
            succeeded += success
            times.append(seconds)
            if success or args.keep_failed:
                keys = ["action", "state", "keypoint"] + [k for k in ("img", "ball") if k in episode]
                writer.add_episode({k: episode[k] for k in keys})
                kept += 1
    if pool:
        pool.close()
    if kept == 0:
        shutil.rmtree(staging) if staging.is_dir() else staging.unlink()
        print("no episode was written")
        return 1
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(staging, out)
    n = args.episodes
    print(f"{args.out}: {kept} episodes written; expert success {succeeded}/{n} = {succeeded / n:.1%}, "
          f"{sum(times) / n:.2f} s per episode, {time.perf_counter() - t0:.0f} s wall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
