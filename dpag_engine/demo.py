"""The main job, end to end: demonstrations -> a small policy -> served on the emulated UR5.

    python -m dpag_engine.demo [--out-dir outputs/demo] [--steps 6000] [--goals 5] [--retrain]
    python -m dpag_engine.demo --task ur5_reach_image    # the image example: cameras + gripper

1. Demonstrations of an embedded UR5 task plug-in (`dpag_engine.tasks`; default ur5_reach: go round
   a sphere, left or right; ur5_reach_image: the same from the emulated scene and wrist cameras,
   closing the gripper at the goal) from the scripted expert, written to data/<task>.zarr if it is
   not there.
2. A small policy trained on them with configs/<task>.toml (plain DP with the small U-Net for the
   reach task: the measurements behind that choice are in the config), unless OUT_DIR/model.pt exists.
3. `python -m dpag_engine.serve --robot sim` on that model, twice: against an emulated CB3 (servo loop
   at 125 Hz) and an emulated e-Series (500 Hz), each for the same held-out goals, through the real
   ur_rtde client. Each run writes its log and plots under OUT_DIR/serve_{125,500}hz/.
4. One table: success rate, collisions, mean jerk, plan latency p50/p99 and the servo loop's period
   error p99 per controller.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .tasks import get_task
from .training.cli import main as train_main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CONTROLLERS = (("3.15", "CB3, 125 Hz", "serve_125hz"), ("5.11", "e-Series, 500 Hz", "serve_500hz"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="ur5_reach", choices=("ur5_reach", "ur5_reach_tcp", "ur5_reach_image"),
                        help="the task plug-in (its config is configs/<task>.toml)")
    parser.add_argument("--out-dir", default=None, help="run directory (model.pt, logs, plots; default "
                                                          "outputs/demo, or outputs/demo_<task>)")
    parser.add_argument("--data", default=None, help="demonstrations (generated if missing; default data/<task>.zarr)")
    parser.add_argument("--episodes", type=int, default=200, help="demonstrations to generate")
    parser.add_argument("--steps", type=int, default=None, help="training steps when a model must be trained "
                                                                  "(default: the config's)")
    parser.add_argument("--goals", type=int, default=5, help="held-out goals served per controller")
    parser.add_argument("--retrain", action="store_true", help="train even if OUT_DIR/model.pt exists")
    parser.add_argument("--serve-args", default="", help="extra arguments for dpag_engine.serve")
    args = parser.parse_args(argv)
    out = Path(args.out_dir or ("outputs/demo" if args.task == "ur5_reach" else f"outputs/demo_{args.task}"))
    data = Path(args.data or f"data/{args.task}.zarr")
    config = CONFIGS / f"{args.task}.toml"

    if not data.exists():
        print(f"== 1. {args.episodes} expert demonstrations -> {data} ==", flush=True)
        get_task(args.task).write_demonstrations(data, args.episodes, seed=0, progress=True)
    if args.retrain or not (out / "model.pt").exists():
        # Every core: nothing else runs in the demo.
        # (A machine that is busy should pass fewer: OpenMP's spinning barriers stall on a taken core.)
        torch.set_num_threads(os.cpu_count() or 1)
        steps = [f"train.steps={args.steps}"] if args.steps else []
        print(f"== 2. training a small policy ({config.name}) ==", flush=True)
        code = train_main(["--config", str(config), f"data.path={data}", *steps, f"--out-dir={out}"])
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
    cams = bool(rows[0][1]["cameras"])
    print("\n| controller | success | collisions | mean jerk (rad/s^3) | plan p50 / p99 (ms) | "
          + ("camera-to-command p50 / p99 (ms) | " if cams else "") + "loop period error p99 (us) | late cycles |")
    print("|---|---|---|---|---|" + ("---|" if cams else "") + "---|---|")
    for name, s in rows:
        loop = s["loop"]
        print(f"| {name} | {s['success_rate'] * 100:.0f}% of {s['episodes']} | {s['collision_rate'] * 100:.0f}% | "
              f"{s['mean_jerk']:.1f} | {s['plan_ms_p50']:.1f} / {s['plan_ms_p99']:.1f} | "
              + (f"{s['camera_to_command_ms_p50']:.0f} / {s['camera_to_command_ms_p99']:.0f} | " if cams else "")
              + f"{loop['period_error_p99_us']:.0f} | {loop['late_cycles']} |")
    print(f"\nplots and run logs: {out}/serve_125hz/, {out}/serve_500hz/; training curve: {out}/loss_curve.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
