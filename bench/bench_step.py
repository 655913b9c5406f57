"""Policy.step latency on the CPU: eager PyTorch vs torch.compile vs the C++ engine (issue 5, item 2).

    python bench/bench_step.py [--recipes tiny lowdim] [--rounds 3]   # markdown table
    pytest bench/bench_step.py --benchmark-only                      # pytest-benchmark, tiny recipe

B=1, DDIM-16, dp mode. Every variant is timed in the same run, in interleaved rounds (each round
takes bench/timing.median_ms of every variant; the table shows the median over rounds), because the
machine may be shared: a core taken by another process stalls torch's OpenMP barriers and the
engine's worker alike, and interleaving spreads that over all variants. Ratios are against the
faster of eager torch at its default thread count and at one thread, so contention cannot inflate
them. The floor is weight bytes streamed per forward x K / measured read bandwidth.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import time

import pytest
import torch

from dpag_engine import _C
from dpag_engine.config import PolicyConfig
from dpag_engine.policy import DPAGPolicy
from dpag_engine.runtime_cpu import CpuPolicy

try:
    from timing import median_ms, read_bandwidth_gbs
except ImportError:  # run as `python bench/bench_step.py` from the repo root
    from bench.timing import median_ms, read_bandwidth_gbs


def build(recipe: str) -> DPAGPolicy:
    """The policy of bench/bench_policy.py: random weights, normaliser fitted on random data."""
    torch.manual_seed(0)
    policy = DPAGPolicy(PolicyConfig(recipe=recipe, action_dim=2, state_dim=20)).eval()
    g = torch.Generator().manual_seed(1)
    policy.normalizer.fit({"action": torch.randn(500, 2, generator=g), "state": torch.randn(500, 20, generator=g)})
    return policy


def observation(policy: DPAGPolicy) -> dict:
    cfg = policy.cfg
    return {"state": torch.randn(1, cfg.n_obs_steps, cfg.state_dim, generator=torch.Generator().manual_seed(2))}


def with_threads(fn, n: int):
    def run():
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            fn()
        finally:
            torch.set_num_threads(old)
    return run


# ---- pytest-benchmark (tiny recipe) ----
@pytest.mark.parametrize("variant", ["eager", "engine-fp32", "engine-fp16"])
def test_step_tiny(benchmark, variant):
    policy = build("tiny")
    obs = observation(policy)
    benchmark.group = "Policy.step tiny B=1 DDIM-16 dp (CPU)"
    if variant == "eager":
        benchmark(lambda: policy.predict_action(obs, mode="dp"))
    else:
        engine = CpuPolicy.from_policy(policy, weights=variant.split("-")[1])
        benchmark(lambda: engine.step(obs))


# ---- the report ----
def report(recipes: list[str], rounds: int) -> str:
    threads = torch.get_num_threads()
    bandwidth = read_bandwidth_gbs()
    lines = [f"CPU: {platform.processor() or 'x86-64'}, {threads} torch threads, engine kernels "
             f"{_C.cpu_kernel_isa()}; torch {torch.__version__}; {datetime.date.today()}; "
             f"read bandwidth {bandwidth:.1f} GB/s (bench/timing.read_bandwidth_gbs)", "",
             "| recipe | variant | weight MB/forward | median ms | vs eager | floor ms |",
             "|---|---|---|---|---|---|"]
    summary = []
    for recipe in recipes:
        policy = build(recipe)
        obs = observation(policy)
        k = policy.schedule.num_steps
        unet_bytes = sum(p.numel() * p.element_size() for p in policy.unet.parameters())
        variants: dict[str, tuple[object, int]] = {
            f"eager torch ({threads} threads)": (lambda: policy.predict_action(obs, mode="dp"), unet_bytes),
            "eager torch (1 thread)": (with_threads(lambda: policy.predict_action(obs, mode="dp"), 1), unet_bytes),
        }
        compiled = copy.deepcopy(policy)
        compiled.unet = torch.compile(compiled.unet)  # mode="default"
        start = time.perf_counter()
        try:
            compiled.predict_action(obs, mode="dp")
            compile_s = time.perf_counter() - start
            variants["torch.compile(unet)"] = (lambda: compiled.predict_action(obs, mode="dp"), unet_bytes)
        except Exception as err:  # report, do not hide: the table says compile failed
            compile_s = None
            lines.append(f"| {recipe} | torch.compile failed: {type(err).__name__}: {err} | | | | |")
        engines = {}
        for weights in ("fp32", "fp16", "bf16"):
            engines[weights] = CpuPolicy.from_policy(policy, weights=weights)
            variants[f"engine {weights} ({threads} threads)"] = (lambda e=engines[weights]: e.step(obs),
                                                                 engines[weights].weight_bytes_per_step)
        one = CpuPolicy.from_policy(policy, weights="fp32", threads=1)
        variants["engine fp32 (1 thread)"] = (lambda: one.step(obs), one.weight_bytes_per_step)

        slow = recipe != "tiny"
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, (fn, _) in variants.items():
                samples[name].append(median_ms(fn, warmup=1, iters=3 if slow else 15))
        ms = {name: statistics.median(v) for name, v in samples.items()}
        eager = min(ms[f"eager torch ({threads} threads)"], ms["eager torch (1 thread)"])
        for name, (_, nbytes) in variants.items():
            floor = nbytes * k / (bandwidth * 1e9) * 1e3
            extra = f" (compile {compile_s:.0f} s)" if name.startswith("torch.compile") and compile_s else ""
            lines.append(f"| {recipe} | {name}{extra} | {nbytes / 1e6:.1f} | {ms[name]:.1f} | "
                         f"{eager / ms[name]:.2f}x | {floor:.1f} |")
        fp32 = ms[f"engine fp32 ({threads} threads)"]
        comp = ms.get("torch.compile(unet)")
        summary.append(f"- {recipe}: engine fp32 {eager / fp32:.2f}x vs eager (target 3x: "
                       f"{'met' if eager / fp32 >= 3 else 'not met'})" +
                       (f", {comp / fp32:.2f}x vs torch.compile (target 2x: {'met' if comp / fp32 >= 2 else 'not met'})"
                        if comp else ", torch.compile not measured") +
                       f"; fp16 {eager / ms[f'engine fp16 ({threads} threads)']:.2f}x vs eager")
    return "\n".join(lines + [""] + summary)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["tiny", "lowdim"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(report(args.recipes, args.rounds))
