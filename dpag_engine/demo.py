"""The main job, end to end: demonstrations -> a small DP-AG -> served on the emulated UR5.

    python -m dpag_engine.demo [--out-dir outputs/demo] [--steps 6000] [--goals 5] [--retrain]

1. Demonstrations of the embedded UR5 reach task (`dpag_engine.tasks`, ur5_reach: go round a sphere,
   left or right) from the scripted expert, written to data/ur5_reach.zarr if it is not there.
2. A small DP-AG trained on them with configs/ur5_reach.toml, unless OUT_DIR/model.pt exists.
3. `python -m dpag_engine.serve --robot sim` on that model, twice: against an emulated CB3 (servo loop
   at 125 Hz) and an emulated e-Series (500 Hz), each for the same held-out goals, through the real
   ur_rtde client. Each run writes its log and plots under OUT_DIR/serve_{125,500}hz/.
4. One table: success rate, collisions, mean jerk, plan latency p50/p99 and the servo loop's period
   error p99 per controller.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from .tasks import get_task
from .training.cli import main as train_main

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "ur5_reach.toml"
CONTROLLERS = (("3.15", "CB3, 125 Hz", "serve_125hz"), ("5.11", "e-Series, 500 Hz", "serve_500hz"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="outputs/demo", help="run directory (model.pt, logs, plots)")
    parser.add_argument("--data", default="data/ur5_reach.zarr", help="demonstrations (generated if missing)")
    parser.add_argument("--episodes", type=int, default=200, help="demonstrations to generate")
    parser.add_argument("--steps", type=int, default=6000, help="training steps when a model must be trained")
    parser.add_argument("--goals", type=int, default=5, help="held-out goals served per controller")
    parser.add_argument("--retrain", action="store_true", help="train even if OUT_DIR/model.pt exists")
    parser.add_argument("--serve-args", default="", help="extra arguments for dpag_engine.serve")
    args = parser.parse_args(argv)
    out, data = Path(args.out_dir), Path(args.data)

    if not data.exists():
        print(f"== 1. {args.episodes} expert demonstrations -> {data} ==", flush=True)
        get_task("ur5_reach").write_demonstrations(data, args.episodes, seed=0, progress=True)
    if args.retrain or not (out / "model.pt").exists():
        # One thread: the tiny U-Net gains little from a second one, and when another process holds
        # a core, OpenMP's spinning barriers slowed training ~100x (5 s/step) on a 2-core machine.
        torch.set_num_threads(1)
        print(f"== 2. training a small DP-AG ({args.steps} steps, {CONFIG.name}) ==", flush=True)
        code = train_main(["--config", str(CONFIG), f"data.path={data}", f"train.steps={args.steps}",
                           f"--out-dir={out}"])
        if code != 0:
            return code
    rows = []
    for version, name, sub in CONTROLLERS:
        print(f"== 3. serving on the emulated UR5 ({name}), {args.goals} goals ==", flush=True)
        cmd = [sys.executable, "-m", "dpag_engine.serve", "--ckpt", str(out / "model.pt"), "--robot", "sim",
               "--sim-version", version, "--episodes", str(args.goals), "--log-dir", str(out / sub),
               *args.serve_args.split()]
        print("   " + " ".join(cmd[1:]), flush=True)
        code = subprocess.run(cmd).returncode
        summary = json.loads((out / sub / "summary.json").read_text())
        rows.append((name, summary))
        if code != 0:
            print(f"serve exited with {code}: {summary['message']}", file=sys.stderr)
            return code
    print("\n| controller | success | collisions | mean jerk (rad/s^3) | plan p50 / p99 (ms) | "
          "loop period error p99 (us) | late cycles |")
    print("|---|---|---|---|---|---|---|")
    for name, s in rows:
        loop = s["loop"]
        print(f"| {name} | {s['success_rate'] * 100:.0f}% of {s['episodes']} | {s['collision_rate'] * 100:.0f}% | "
              f"{s['mean_jerk']:.1f} | {s['plan_ms_p50']:.1f} / {s['plan_ms_p99']:.1f} | "
              f"{loop['period_error_p99_us']:.0f} | {loop['late_cycles']} |")
    print(f"\nplots and run logs: {out}/serve_125hz/, {out}/serve_500hz/; training curve: {out}/loss_curve.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
