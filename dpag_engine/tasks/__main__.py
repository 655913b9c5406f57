"""Expert demonstrations of a task plug-in (zarr, with the spec hints), or a policy evaluated on it:

    python -m dpag_engine.tasks --task ur5_reach_image --out data/ur5_reach_image.zarr --episodes 100
    python -m dpag_engine.train --config configs/ur5_reach_image.toml
    python -m dpag_engine.tasks --task ur5_reach_image --eval outputs/ur5_reach_image/model.pt --episodes 100
"""
from __future__ import annotations

import argparse
import dataclasses
import time

from ..runtime import ENGINE_WEIGHTS
from . import TASKS, get_task


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpag_engine.tasks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--out", help="write demonstrations here (.zarr directory or .zarr.zip)")
    p.add_argument("--eval", metavar="MODEL_PT", help="instead: roll a trained policy out on held-out episodes "
                                                      "(the kinematic cell, tasks/rollout.py)")
    p.add_argument("--mode", default="dp", choices=["dp", "guided"], help="--eval: inference mode")
    p.add_argument("--guidance", default="", metavar="gamma=G,steps=S,eta=E",
                   help="--eval --mode guided: the latent update's settings (default: the checkpoint's policy.guidance)")
    p.add_argument("--runtime", default="cpp", choices=["cpp", "torch"],
                   help="--eval: plan on the C++ engine (as serving does) or the PyTorch reference")
    p.add_argument("--weights", default="fp32", choices=ENGINE_WEIGHTS,
                   help="--eval --runtime cpp: how the engine stores the U-Net's convolution weights")
    p.add_argument("--json", metavar="PATH", help="--eval: write the rates and per-episode results here")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="generation seed (serving and evaluation draw from held-out seeds)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error("--episodes: at least 1")
    if bool(args.out) == bool(args.eval):
        p.error("give exactly one of --out (demonstrations) or --eval (a model.pt)")
    if args.weights != "fp32" and args.runtime != "cpp":
        p.error("--weights: only the C++ engine (--runtime cpp) stores reduced-precision weights")
    t0 = time.perf_counter()
    if args.eval:
        import json
        from pathlib import Path

        from ..checkpoint import load_policy
        from ..config import ConfigError, latent_overrides
        from .rollout import evaluate_policy
        policy = load_policy(args.eval)
        try:
            policy.set_guidance(latent_overrides(policy.cfg.guidance, args.guidance))
        except ConfigError as e:
            p.error(str(e))
        r = evaluate_policy(get_task(args.task), policy, args.episodes, args.mode, runtime=args.runtime,
                            weights=args.weights)
        r.update(ckpt=args.eval, guidance=dataclasses.asdict(policy.cfg.guidance), seconds=round(time.perf_counter() - t0, 1))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(r, indent=1, default=float))
        print(f"{args.task} {args.mode} ({args.runtime}, {args.weights} weights): success {r['success_rate']:.0%}, collisions {r['collision_rate']:.0%}, "
              f"mean jerk {r['mean_jerk']:.1f} rad/s^3 over {args.episodes} held-out episodes "
              f"({time.perf_counter() - t0:.0f} s)")
        return 0
    s = get_task(args.task).write_demonstrations(args.out, args.episodes, args.seed, overwrite=args.overwrite,
                                                  progress=True)
    print(f"{s['path']}: {s['written']} episodes written; expert success {s['success_rate']:.1%}, sides left "
          f"{s['left']} / right {s['right']}, min clearance {s['min_clearance_m'] * 100:.1f} cm, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
