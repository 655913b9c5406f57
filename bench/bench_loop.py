"""Control-loop jitter: dpag_engine._C.ControlLoop at 125 and 500 Hz, with and without concurrent
CPU load (a numpy matmul loop on another thread standing in for policy inference), with and
without SCHED_FIFO, against the in-process RecordingSink while a 10 Hz planner submits chunks.

  python bench/bench_loop.py [--seconds 3]   markdown table + bench/out/loop_latency.png
  pytest bench/bench_loop.py --benchmark-only  one 500 Hz run under load, stats in extra_info

Period error = |start-to-start interval - period|; wake latency = wake time - deadline (cycles are
served at the deadline, so this is how late each command went out). Late cycles = slots skipped
because the loop was a whole period behind. Numbers depend on the machine and on what else runs.
"""
from __future__ import annotations

import argparse
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np

from dpag_engine import _C

DOF = 6
OUT = Path(__file__).resolve().parent / "out"


class Background(threading.Thread):
    """Runs fn() repeatedly until stopped."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.halt = fn, threading.Event()

    def run(self):
        while not self.halt.is_set():
            self.fn()


def inference_load():
    # numpy releases the GIL inside matmul, and BLAS may use every core: a fair stand-in for a
    # policy step running next to the loop.
    a = np.random.default_rng(0).standard_normal((384, 384)).astype(np.float32)
    return lambda: a @ a


def planner(sched):
    def plan():
        t_obs = _C.monotonic()
        t = t_obs + 0.1 * np.arange(16)
        sched.submit(0.3 * np.sin(2 * np.pi * 0.4 * t[:, None] + np.arange(DOF)), t_obs, 0.1)
        time.sleep(0.1)
    return plan


def run_once(rate_hz, load, rt, seconds):
    lim = np.full(DOF, 3.0)
    sched = _C.ActionScheduler(DOF, -lim, lim, np.full(DOF, 2.0), np.full(DOF, 10.0))
    sink = _C.RecordingSink(DOF, capacity=int(rate_hz * seconds) + 1000, q_initial=np.zeros(DOF))
    loop = _C.ControlLoop(sink, sched, rate_hz=rate_hz, rt_priority=rt)
    threads = [Background(planner(sched))] + ([Background(inference_load())] if load else [])
    for th in threads:
        th.start()
    with loop:
        time.sleep(seconds)
    for th in threads:
        th.halt.set()
        th.join()
    return loop.stats, loop.wake_latency_histogram(), loop.period_error_histogram()


def markdown(rows):
    head = ("| rate | load | RT | p50 period err (us) | p99 | max | p50 wake latency (us) | p99 | max "
            "| cycles | late cycles |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (rate, load, rt), st, _, _ in rows:
        rt_txt = ("yes" if st["rt_granted"] else "refused") if rt else "no"
        lines.append(
            f"| {rate:.0f} Hz | {'matmul' if load else 'none'} | {rt_txt} "
            f"| {st['period_error_p50_us']:.0f} | {st['period_error_p99_us']:.0f} "
            f"| {st['period_error_max_us']:.0f} | {st['wake_latency_p50_us']:.0f} "
            f"| {st['wake_latency_p99_us']:.0f} | {st['wake_latency_max_us']:.0f} "
            f"| {st['cycles']} | {st['late_cycles']} |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, rate in zip(axes, sorted({r[0][0] for r in rows})):
        for (r, load, rt), st, wake, _ in rows:
            if r != rate:
                continue
            hi = max(int(np.nonzero(wake)[0].max()) + 2, 10) if wake.any() else 10
            label = f"{'matmul load' if load else 'idle'}, {'RT' if rt and st['rt_granted'] else 'no RT'}"
            ax.step(np.arange(hi), wake[:hi], where="post", label=label)
        ax.set_yscale("log")
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(left=0)
        ax.set_xlabel("wake latency after deadline (us, 1 us bins)")
        ax.set_title(f"{rate:.0f} Hz")
        ax.legend()
    axes[0].set_ylabel("cycles")
    fig.suptitle(f"ControlLoop wake latency ({platform.node()}, {os.cpu_count()} CPUs)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per configuration")
    args = ap.parse_args()
    rows = []
    for rate in (125.0, 500.0):
        for load in (False, True):
            for rt in (False, True):
                st, wake, per = run_once(rate, load, rt, args.seconds)
                rows.append(((rate, load, rt), st, wake, per))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.seconds:.0f} s per row, loadavg {os.getloadavg()[0]:.2f}")
    print(markdown(rows))
    png = OUT / "loop_latency.png"
    plot(rows, png)
    print(f"\nhistogram: {png}")


def test_loop_jitter_500hz_under_load(benchmark):
    """pytest-benchmark view of one 500 Hz run under matmul load; jitter figures in extra_info."""
    st, _, _ = benchmark.pedantic(run_once, args=(500.0, True, True, 1.0), rounds=1, iterations=1)
    for key in ("cycles", "late_cycles", "period_error_p50_us", "period_error_p99_us",
                "period_error_max_us", "wake_latency_p99_us", "rt_granted"):
        benchmark.extra_info[key] = st[key]


if __name__ == "__main__":
    main()
