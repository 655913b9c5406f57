"""Policy.step latency on the CPU: eager PyTorch vs torch.compile vs the C++ engine.

    python bench/bench_step.py [--recipes tiny lowdim image] [--modes dp guided] [--rounds 3] [--steps N]
    pytest bench/bench_step.py --benchmark-only      # pytest-benchmark, tiny recipe, dp and guided

B=1, DDIM-16. Recipes: `tiny`, `lowdim` (20 state features) and `image` (the Push-T image policy of
configs/pusht_image.yaml: one 3x96x96 camera, 84x84 centre crop, ResNet-18 encoder, agent position
as state); random weights, normaliser fitted on random data. Modes: `dp` and `guided` (the latent
update before every denoising step). Variants per (recipe, mode): eager `DPAGPolicy.predict_action`
at torch's default thread count and at one thread, the same with `torch.compile` on the U-Net, and
`CpuRuntime` (runtime/cpu.py) with fp32, fp16, bf16 and int8 weights, plus fp32 at one thread.

Every variant is timed in the same run, in interleaved rounds (each round runs one warm-up and
--steps timed steps of every variant in turn), because the machine may be shared: a core taken by
another process stalls torch's OpenMP barriers and the engine's worker alike, and interleaving
spreads that over all variants. p50 and p99 are over every timed step of every round (with few
steps the p99 is close to the maximum). "vs eager" is the p50 of the faster of the two eager rows
over the variant's p50, so contention cannot inflate it.

Floor (bench/roofline.py, measured at the start with the row's thread count) = the larger of
  * compute: U-Net convolution MACs per forward x passes x K / the fp32 FMA peak, and
  * streaming: (U-Net weight bytes per forward x passes x K + image-encoder weight bytes, read once
    per step) / the read bandwidth of the level the weights touched per step fit in (L2s, L3, DRAM).
dp: one pass (a forward). guided: 1 + 2 S passes for S latent-update steps (each is a forward and
an activation-only backward that streams the weights again and costs about a forward's MACs), so 3
at the default S = 1, with twice the weights touched (the backward's transposed copies).
"of floor" = floor / p50: how close the variant runs to its own floor.

"(compile N s)" is the first torch.compile call in that mode (less on a warm inductor disk cache).
"max abs err" is the largest |action_pred - the first eager row's| (raw action units) for the same
generator seed; for fp16/bf16 weights it is the drift. A variant that raises NotImplementedError
(the engine without guided mode or image observations) or whose torch.compile fails is printed as
"n/a (reason)" and the rest carries on, so rows fill in when support lands. On the 2-core VM eager
takes ~0.8 s per step (lowdim dp; ~3x that guided) and ~2.8 s (image dp; ~15 s guided): keep
--rounds and --steps small for those (default --steps: 15 for tiny, 2 otherwise). Default recipes:
tiny and lowdim (a few minutes); add image explicitly (one round of it takes several minutes).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import functools
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch

from dpag_engine import _C
from dpag_engine.config import ImageEncoderConfig, PolicyConfig
from dpag_engine.policy import DPAGPolicy
from dpag_engine.runtime.cpu import CpuRuntime

try:
    import roofline
    from timing import times_ms
except ImportError:  # run as `python bench/bench_step.py` from the repo root
    from bench import roofline
    from bench.timing import times_ms

RECIPES = {"tiny": dict(state_dim=20), "small": dict(state_dim=20), "lowdim": dict(state_dim=20),
           "image": dict(state_dim=2, image=ImageEncoderConfig())}  # ImageEncoderConfig's defaults = Push-T's
MODES = ("dp", "guided")


def build(recipe: str) -> DPAGPolicy:
    """Random weights, normaliser fitted on random data (as bench/bench_policy.py)."""
    torch.manual_seed(0)
    policy = DPAGPolicy(PolicyConfig(recipe=recipe, action_dim=2, **RECIPES[recipe])).eval()
    g = torch.Generator().manual_seed(1)
    policy.normalizer.fit({"action": torch.randn(500, 2, generator=g),
                           "state": torch.randn(500, policy.cfg.state_dim, generator=g)})
    return policy


def observation(policy: DPAGPolicy) -> dict:
    cfg = policy.cfg
    g = torch.Generator().manual_seed(2)
    obs = {"state": torch.randn(1, cfg.n_obs_steps, cfg.state_dim, generator=g)}
    for cam in cfg.image.cameras if cfg.image is not None else ():
        obs[cam] = torch.rand(1, cfg.n_obs_steps, *cfg.image.image_shape, generator=g)
    return obs


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ---- the variants: step(obs, generator, mode) -> predict_action's dict ----
def with_threads(fn, n: int):
    def run(*args):
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(old)
    return run


def eager_step(policy: DPAGPolicy):
    return lambda obs, generator, mode: policy.predict_action(obs, generator, mode=mode)


def compiled_step(policy: DPAGPolicy):
    """torch.compile(unet) (mode="default"); guided mode runs its forward and autograd backward."""
    compiled = copy.deepcopy(policy)
    compiled.unet = torch.compile(compiled.unet)
    return eager_step(compiled)


def engine_step(policy: DPAGPolicy, weights: str, threads: int | None = None):
    """(step, U-Net weight bytes per forward) of a CpuRuntime planner; raises NotImplementedError for what it lacks."""
    engine = CpuRuntime.planner(policy, weights=weights, threads=threads)
    return (lambda obs, generator, mode: engine.predict_action(obs, generator, mode=mode)), \
        engine.runtime.weight_bytes_per_step


def variants(policy: DPAGPolicy, threads: int) -> dict:
    """name -> (make() -> (step, U-Net weight bytes per forward), exceptions reported as n/a, threads).
    The first is the reference of the error column."""
    unet = param_bytes(policy.unet)
    table = {
        f"eager torch ({threads} threads)": (lambda: (eager_step(policy), unet), (), threads),
        "eager torch (1 thread)": (lambda: (with_threads(eager_step(policy), 1), unet), (), 1),
        "torch.compile(unet)": (lambda: (compiled_step(policy), unet), Exception, threads),  # the row says why
    }
    for weights in ("fp32", "fp16", "bf16", "int8"):
        table[f"engine {weights} ({threads} threads)"] = (functools.partial(engine_step, policy, weights),
                                                          NotImplementedError, threads)
    table["engine fp32 (1 thread)"] = (functools.partial(engine_step, policy, "fp32", 1), NotImplementedError, 1)
    return table


# ---- measuring ----
@dataclass
class Row:
    recipe: str
    mode: str
    name: str
    missing: str = ""                 # why the variant cannot run: printed as n/a
    weight_bytes: int = 0             # U-Net weights per forward
    floor_ms: float = 0.0
    error: float = 0.0                # max abs error of action_pred vs the reference, same seed
    first_s: float = 0.0              # the first call (includes torch.compile's compilation)
    run: Callable[[], object] | None = None
    times: list[float] = field(default_factory=list)

    def p(self, q: float) -> float:
        return float(np.percentile(self.times, q))


def why(err: Exception) -> str:
    """The exception's type and first clause, short enough for a table cell."""
    clause = re.split(r" \(|; ", " ".join(str(err).split()), maxsplit=1)[0]
    text = f"{type(err).__name__}: {clause}".replace("|", "/")
    return text if len(text) <= 100 else text[:97] + "..."


def unet_macs(policy: DPAGPolicy) -> int:
    """The U-Net's convolution MACs in one B=1 forward."""
    cfg = policy.cfg
    return roofline.conv_macs(policy.unet, torch.randn(1, cfg.horizon, cfg.action_dim), torch.tensor([1]),
                              torch.randn(1, cfg.global_cond_dim))


def measure(recipe: str, modes: list[str], rounds: int, steps: int, threads: int,
            rooflines: dict[int, roofline.Roofline]) -> list[list[Row]]:
    """One list of rows per mode; every variant of the recipe is built once and shared by the modes."""
    policy = build(recipe)
    obs = observation(policy)
    macs = unet_macs(policy)
    built = {}
    for name, (make, missing, n_threads) in variants(policy, threads).items():
        try:
            built[name] = (*make(), missing, rooflines[n_threads])
        except missing as err:
            built[name] = why(err)
    k = policy.schedule.num_steps
    encoder_bytes = param_bytes(policy.encoder)
    cells = []
    for mode in modes:
        passes = 1 if mode == "dp" else 1 + 2 * policy.cfg.guidance.steps
        rows, reference = [], None
        for name, made in built.items():
            row = Row(recipe, mode, name)
            rows.append(row)
            if isinstance(made, str):
                row.missing = made
                continue
            step, row.weight_bytes, missing, roof = made
            try:
                start = time.perf_counter()
                out = step(obs, torch.Generator().manual_seed(3), mode)["action_pred"]
                row.first_s = time.perf_counter() - start
            except missing as err:
                row.missing = why(err)
                continue
            reference = out if reference is None else reference
            row.error = (out - reference).abs().max().item()
            row.floor_ms = roof.floor_ms(macs=passes * k * macs, streamed_bytes=passes * k * row.weight_bytes + encoder_bytes,
                                         resident_bytes=row.weight_bytes * (1 if mode == "dp" else 2))
            row.run = functools.partial(step, obs, None, mode)
        for _ in range(rounds):
            for row in rows:
                if row.run is not None:
                    row.times += times_ms(row.run, warmup=1, iters=steps)
        cells.append(rows)
    return cells


# ---- pytest-benchmark (tiny recipe) ----
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["eager", "engine-fp32", "engine-fp16"])
def test_step_tiny(benchmark, variant, mode):
    policy = build("tiny")
    obs = observation(policy)
    benchmark.group = f"Policy.step tiny B=1 DDIM-16 {mode} (CPU)"
    step = eager_step(policy) if variant == "eager" else engine_step(policy, variant.split("-")[1])[0]
    try:
        step(obs, None, mode)
    except NotImplementedError as err:
        pytest.skip(f"{variant}, {mode} mode: {err}")
    benchmark(step, obs, None, mode)


# ---- the report ----
def table(cell: list[Row], threads: int) -> tuple[list[str], str]:
    """Markdown rows of one (recipe, mode) and its summary line."""
    p50 = {row.name: row.p(50) for row in cell if not row.missing}
    eager = min(p50[cell[0].name], p50["eager torch (1 thread)"])
    lines = []
    for row in cell:
        head = f"| {row.recipe} | {row.mode} | {row.name}"
        if row.missing:
            lines.append(f"{head} | | n/a ({row.missing}) | | | | | |")
            continue
        extra = f" (compile {row.first_s:.0f} s)" if row.name.startswith("torch.compile") else ""
        lines.append(f"{head}{extra} | {row.weight_bytes / 1e6:.1f} | {p50[row.name]:.1f} | {row.p(99):.1f} | "
                     f"{eager / p50[row.name]:.2f}x | {row.floor_ms:.1f} | {row.floor_ms / p50[row.name]:.0%} | "
                     f"{row.error:.1e} |")
    fp32, comp = p50.get(f"engine fp32 ({threads} threads)"), p50.get("torch.compile(unet)")
    summary = f"- {cell[0].recipe}, {cell[0].mode}: "
    if fp32 is None:
        return lines, summary + "engine n/a"
    summary += f"engine fp32 {eager / fp32:.2f}x vs eager (target 3x: {'met' if eager / fp32 >= 3 else 'not met'})"
    summary += (f", {comp / fp32:.2f}x vs torch.compile (target 2x: {'met' if comp / fp32 >= 2 else 'not met'})"
                if comp else ", torch.compile n/a")
    return lines, summary


def report(recipes: list[str], modes: list[str], rounds: int, steps: int | None):
    """The markdown table, yielded line by line as each (recipe, mode) finishes, then the summary."""
    threads = torch.get_num_threads()
    rooflines = {n: roofline.measure(n) for n in sorted({1, threads})}
    yield (f"CPU: {roofline.cpu_facts().describe()}; {threads} torch threads; torch {torch.__version__}; "
           f"{datetime.date.today()}; {rounds} rounds. Roofline (bench/roofline.py): "
           + "; ".join(r.describe() for r in rooflines.values()) + "\n")
    yield ("| recipe | mode | variant | weight MB/forward | p50 ms | p99 ms | vs eager (p50) | floor ms | of floor | "
           "max abs err vs eager |\n|---|---|---|---|---|---|---|---|---|---|")
    summary = []
    for recipe in recipes:
        n = steps or (15 if recipe == "tiny" else 2)
        for cell in measure(recipe, modes, rounds, n, threads, rooflines):
            rows, line = table(cell, threads)
            yield from rows
            summary.append(line)
    yield "\n" + "\n".join(summary)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=["tiny", "lowdim"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per variant per round (default 15 for tiny, 2 otherwise)")
    args = parser.parse_args()
    for text in report(args.recipes, args.modes, args.rounds, args.steps):
        print(text, flush=True)
