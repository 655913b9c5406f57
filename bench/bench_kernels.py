"""Fused Triton kernels vs the PyTorch reference, per op, at DP-AG's production shapes.

    pytest bench/bench_kernels.py --benchmark-group-by=param:case      # pytest-benchmark, CUDA only
    python bench/bench_kernels.py                                      # markdown table (do_bench medians)
    python bench/bench_kernels.py --dry-run                            # CPU: build every case, run once

On CPU the kernels only run under TRITON_INTERPRET=1 (a numpy emulator, ~1000x slower than the
reference), so timings there are meaningless: the benchmarks skip and `main` refuses, unless
--dry-run, which only checks that every case builds and agrees with its reference.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (dry run on CPU)

from dpag_engine import kernels as K  # noqa: E402
from dpag_engine.config import UNET_RECIPES, SchedulerConfig  # noqa: E402
from dpag_engine.diffusion import make_alphas_cumprod, sampler_coefficients  # noqa: E402
from dpag_engine.ops import torch_ref as R  # noqa: E402


@dataclass
class Case:
    op: str
    shape: str
    fused: Callable[[], object]
    ref: Callable[[], object]
    bytes_moved: int  # compulsory DRAM traffic of the fused op: every input read once, output written once


def _film_vjp_torch(dys, hs, w_cat, cond):
    """The same math as film_vjp in plain PyTorch ops (what autograd runs for the FiLM part)."""
    dsb = torch.cat([torch.cat([(d * h).sum(-1), d.sum(-1)], dim=1) for d, h in zip(dys, hs)], dim=1)
    sp = torch.nn.functional.softplus(cond)
    tsp = torch.tanh(sp)
    mish_grad = tsp + cond * (1 - tsp * tsp) * torch.sigmoid(cond)
    return (dsb @ w_cat) * mish_grad


def cases(device: str, small: bool = False) -> list[Case]:
    """Shapes: low-dim recipe (B=256 training, H=16, Da=2..10, To=2, Do=20) and image (B=64)."""
    f32 = dict(device=device, dtype=torch.float32)
    out: list[Case] = []
    batches = [3] if small else [64, 256]
    coefs = sampler_coefficients(SchedulerConfig(num_inference_steps=16)).float().to(device)
    ac = make_alphas_cumprod(SchedulerConfig())
    sa, s1 = ac.sqrt().float().to(device), (1 - ac).sqrt().float().to(device)
    for B in batches:
        H, Da = 16, 10
        x, eps, noise = (torch.randn(B, H, Da, **f32) for _ in range(3))
        step = torch.tensor(5, device=device)
        n = x.numel() * 4
        out.append(Case("sampler_step", f"{B}x{H}x{Da}", lambda x=x, e=eps, s=step: K.sampler_step(x, e, coefs, s),
                        lambda x=x, e=eps, s=step: R.sampler_step(x, e, coefs, s), 4 * n))
        t = torch.randint(0, 100, (B,), device=device)
        out.append(Case("q_sample", f"{B}x{H}x{Da}", lambda x=x, nz=noise, t=t: K.q_sample(x, nz, t, sa, s1),
                        lambda x=x, nz=noise, t=t: R.q_sample(x, nz, t, sa, s1), 3 * n))
        for D in ([66] if small else [40, 1024]):
            z, g, lv, xi = (torch.randn(B, 2, D, **f32) for _ in range(4))
            m = z.numel() * 4
            out.append(Case("em_step (eta=0)", f"{B}x2x{D}", lambda z=z, g=g, lv=lv: K.em_step(z, g, lv, 1, 1, 0, True),
                            lambda z=z, g=g, lv=lv: R.em_step(z, g, lv, 1, 1, 0, True), 4 * m))
            # With noise the step also reads the caller's Brownian draws xi: 5 tensors of traffic.
            out.append(Case("em_step (eta=0.5)", f"{B}x2x{D}", lambda z=z, g=g, lv=lv, xi=xi: K.em_step(z, g, lv, 1, 1, .5, True, xi),
                            lambda z=z, g=g, lv=lv, xi=xi: R.em_step(z, g, lv, 1, 1, .5, True, xi), 5 * m))
    # FiLM VJP at the U-Net's real site shapes (collected from the model with forward hooks).
    from dpag_engine.model.unet import ConditionalUnet1D
    recipe = UNET_RECIPES["tiny" if small else "lowdim"]
    G, H, Da = 40, 16, 2
    model = ConditionalUnet1D(Da, G, recipe).to(device)
    for B in batches:
        sample, gc = torch.randn(B, H, Da, **f32), torch.randn(B, G, **f32)
        k = torch.randint(0, 100, (B,), device=device)
        hs: list[torch.Tensor] = []
        hooks = [blk.blocks[0].register_forward_hook(lambda m, i, o: hs.append(o.detach()))
                 for blk in model.residual_blocks()]
        with torch.no_grad():
            model(sample, k, gc)
        for h in hooks:
            h.remove()
        dys = [torch.randn_like(h) for h in hs]
        w_cat = K.global_film_weights(model).detach()
        layout = K.FilmLayout.from_tensors(hs)
        dyp, hp = layout.pack(dys), layout.pack(hs)
        nbytes = 2 * dyp.numel() * 4 + w_cat.numel() * 4 + 2 * gc.numel() * 4
        out.append(Case("film_vjp (packed)", f"B={B} sites={len(hs)} P={layout.P} G={G}",
                        lambda dyp=dyp, hp=hp, w=w_cat, gc=gc, L=layout: K.film_vjp(dyp, hp, w, gc, L),
                        lambda dys=dys, hs=hs, w=w_cat, gc=gc: _film_vjp_torch(dys, hs, w, gc), nbytes))

        def autograd_force(sample=sample, k=k, gc=gc):
            gcr = gc.detach().requires_grad_()
            eps = model(sample, k, gcr)
            return torch.autograd.grad(eps, gcr, eps.detach())[0]

        out.append(Case("guidance force g (U-Net)", f"B={B} lowdim H={H}" if not small else f"B={B} tiny",
                        lambda sample=sample, k=k, gc=gc: K.unet_film_vjp(model, sample, k, gc)[1],
                        autograd_force, 0))
    return out


# ---------------------------------------------------------------------------------------------------
# pytest-benchmark (CUDA only)
# ---------------------------------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # running as a script without pytest installed
    pytest = None

if pytest is not None:
    requires_cuda = pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="CUDA not available: on CPU the Triton kernels run in the numpy interpreter, timings are meaningless")
    _CASES = cases("cuda") if torch.cuda.is_available() else []
    _IDS = [f"{c.op}|{c.shape}" for c in _CASES]

    def _timed(benchmark, fn):
        fn()  # compile / warm up outside the measurement
        torch.cuda.synchronize()

        def run():
            fn()
            torch.cuda.synchronize()
        benchmark(run)

    @requires_cuda
    @pytest.mark.parametrize("case", _CASES or [None], ids=_IDS or ["none"])
    def test_fused(benchmark, case):
        benchmark.group = f"{case.op} {case.shape}"
        _timed(benchmark, case.fused)

    @requires_cuda
    @pytest.mark.parametrize("case", _CASES or [None], ids=_IDS or ["none"])
    def test_reference(benchmark, case):
        benchmark.group = f"{case.op} {case.shape}"
        _timed(benchmark, case.ref)


# ---------------------------------------------------------------------------------------------------
# markdown table (triton.testing.do_bench medians)
# ---------------------------------------------------------------------------------------------------


def _check(case: Case) -> float:
    a, b = case.fused(), case.ref()
    a = a[0] if isinstance(a, tuple) else a
    b = b[0] if isinstance(b, tuple) else b
    if "eta=0.5" in case.op:
        return float("nan")  # different generators: same distribution, not the same numbers
    return float((a.double() - b.double()).abs().max() / (b.double().abs().max() + 1e-30))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Fused Triton kernels vs PyTorch reference (markdown table)")
    p.add_argument("--dry-run", action="store_true", help="CPU: build every case and run it once (no timing)")
    args = p.parse_args(argv)
    if args.dry_run:
        for c in cases("cpu", small=True):
            print(f"{c.op:28s} {c.shape:40s} max rel err vs reference {_check(c):.2e}")
        return 0
    if not torch.cuda.is_available():
        print("bench_kernels: CUDA not available; timings under the Triton interpreter are meaningless "
              "(use --dry-run to check the cases build).", file=sys.stderr)
        return 0
    import triton.testing
    card = torch.cuda.get_device_name()
    print(f"Card: {card}; torch {torch.__version__}; date {datetime.date.today()}; "
          "median of triton.testing.do_bench (ms)\n")
    print("| op | shape | fused ms | reference ms | speed-up | bytes-moved floor | fused GB/s | max rel err |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for c in cases("cuda"):
        err = _check(c)
        tf = triton.testing.do_bench(c.fused, return_mode="median")
        tr = triton.testing.do_bench(c.ref, return_mode="median")
        floor = f"{c.bytes_moved / 1e6:.3f} MB" if c.bytes_moved else "-"
        bw = f"{c.bytes_moved / tf / 1e6:.0f}" if c.bytes_moved else "-"
        print(f"| {c.op} | {c.shape} | {tf:.4f} | {tr:.4f} | {tr / tf:.2f}x | {floor} | {bw} | {err:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
