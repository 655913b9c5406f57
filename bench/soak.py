"""Soak: serve a policy on the emulated e-Series for minutes and watch memory and loop timing.

    python bench/soak.py                           # 10 min at 500 Hz, the demo's model
    python bench/soak.py --minutes 2 --ckpt model.pt

Runs `python -m dpag_engine.serve --robot ur5` (inference on the C++ engine, real-time chunking,
the real ur_rtde client) against an emulator process, samples the resident memory of both
processes every 2 s, and reports RSS at start/end, its slope after a 30 s warm-up, the servo loop's
p99 period error and late cycles, and plan latency. Writes bench/soak/soak.json and soak_rss.png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dpag_engine.ursim import EmulatorProcess

HOST, CONTROL_PORT = "127.0.0.61", 30161


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS")), None)
    except FileNotFoundError:
        return None


def slope_mb_per_min(t: np.ndarray, rss: np.ndarray) -> float:
    return float(np.polyfit(t, rss, 1)[0] * 60) if len(t) > 2 else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="outputs/demo/model.pt", help="a UR5 reach checkpoint (make demo writes this one)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--out", default="bench/soak")
    ap.add_argument("--mode", choices=("dp", "guided"), default="dp")
    args = ap.parse_args()
    if not Path(args.ckpt).is_file():
        raise SystemExit(f"{args.ckpt}: missing (run `make demo` first, or pass --ckpt)")
    out = Path(args.out)
    seconds = args.minutes * 60
    emulator = EmulatorProcess(HOST, "5.11", control_port=CONTROL_PORT).start()
    serve = subprocess.Popen([sys.executable, "-m", "dpag_engine.serve", "--ckpt", args.ckpt, "--robot", "ur5",
                              "--host", HOST, "--episodes", "1", "--duration", str(seconds), "--mode", args.mode,
                              "--threads", "1", "--log-dir", str(out / "serve")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = []   # (s since start, serve RSS, emulator RSS)
    t0 = time.monotonic()
    try:
        with tqdm(total=int(seconds), unit="s", desc="soak") as bar:
            while serve.poll() is None:
                time.sleep(2.0)
                now = time.monotonic() - t0
                serve_rss, emu_rss = rss_mb(serve.pid), rss_mb(emulator.proc.pid)
                if serve_rss is not None and emu_rss is not None:
                    samples.append((now, serve_rss, emu_rss))
                bar.n = min(int(now), int(seconds))
                bar.refresh()
    finally:
        serve.wait()
        emulator.stop()
    summary = json.loads((out / "serve" / "summary.json").read_text())
    t, serve_rss, emu_rss = np.array(samples).T
    # After warm-up and before the end of the episode (then the run log is folded into run.npz).
    steady = (t >= 30.0) & (t <= seconds - 5.0)
    loop = summary["loop"]
    result = {
        "minutes": args.minutes, "frequency_hz": summary["frequency_hz"], "exit_code": summary["exit_code"],
        "message": summary["message"], "mode": args.mode, "plans": summary["plans"],
        "plan_ms_p50": summary["plan_ms_p50"], "plan_ms_p99": summary["plan_ms_p99"],
        "period_error_p99_us": loop["period_error_p99_us"], "period_error_max_us": loop["period_error_max_us"],
        "late_cycles": loop["late_cycles"], "cycles": loop["cycles"],
        "serve_rss_mb": [float(serve_rss[steady][0]), float(serve_rss[steady][-1])],
        "serve_rss_slope_mb_per_min": slope_mb_per_min(t[steady], serve_rss[steady]),
        "emulator_rss_mb": [float(emu_rss[steady][0]), float(emu_rss[steady][-1])],
        "emulator_rss_slope_mb_per_min": slope_mb_per_min(t[steady], emu_rss[steady]),
    }
    (out / "soak.json").write_text(json.dumps(result, indent=2))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t / 60, serve_rss, label="serve")
    ax.plot(t / 60, emu_rss, label="emulator")
    ax.set(xlabel="minutes", ylabel="RSS (MB)", title=f"soak at {summary['frequency_hz']:.0f} Hz, {args.mode} mode")
    ax.legend()
    fig.savefig(out / "soak_rss.png", dpi=90)
    print(json.dumps(result, indent=2))
    return 0 if summary["exit_code"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
