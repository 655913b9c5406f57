"""Expert demonstrations of a task plug-in, in Diffusion Policy's zarr layout with the spec hints:

    python -m dpag_engine.tasks --task ur5_reach_image --out data/ur5_reach_image.zarr --episodes 100
    python -m dpag_engine.train --config configs/ur5_reach_image.toml
"""
from __future__ import annotations

import argparse
import time

from . import TASKS, get_task


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpag_engine.tasks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--out", required=True, help="output .zarr directory or .zarr.zip")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="generation seed (serving and evaluation draw from held-out seeds)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error("--episodes: at least 1")
    t0 = time.perf_counter()
    s = get_task(args.task).write_demonstrations(args.out, args.episodes, args.seed, overwrite=args.overwrite,
                                                  progress=True)
    print(f"{s['path']}: {s['written']} episodes written; expert success {s['success_rate']:.1%}, sides left "
          f"{s['left']} / right {s['right']}, min clearance {s['min_clearance_m'] * 100:.1f} cm, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
