"""Everything the project claims about GPU speed, measured in one command, as one markdown table.

    python bench/gpu_report.py              # GPU machine: < 8 min on an H100; paste the table into bench/RESULTS.md
    python bench/gpu_report.py --dry-run    # CPU, small sizes, no GPU-only parts, no meaningful timings (CI)

Rows: the fused Triton kernels vs their PyTorch references (bench_kernels' cases); the DP-AG training
step (loss + backward) with the triton backend vs the torch reference; and `predict_action` at B=1
(one plan = encode + K DDIM steps) for the lowdim and image recipes, dp and guided modes, fp32 and
bf16 (`policy.to(torch.bfloat16)`), through every runtime present: eager torch, eager with the triton
backend, torch.compile'd U-Net, the dp plan captured in one CUDA graph, onnxruntime and TensorRT.
Every row names its reference (measured in the same run) and, where one applies, its floor: the
bytes that must be read (U-Net weights x forwards per plan, or the kernel's compulsory traffic)
divided by the measured read bandwidth. Check columns compare each runtime's chunk with eager torch
from the same initial noise. A time budget (default 7 min of measuring) skips what is left, by name,
rather than overrun; a runtime that fails gets a row saying why instead of stopping the report.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (dry run on CPU)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers, whatever the working dir
import bench_kernels  # noqa: E402
from timing import median_ms, read_bandwidth_gbs  # noqa: E402

from dpag_engine import ops  # noqa: E402
from dpag_engine.config import ImageEncoderConfig, PolicyConfig, SchedulerConfig  # noqa: E402
from dpag_engine.ops import use_backend  # noqa: E402
from dpag_engine.policy import DPAGPolicy  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Report:
    device: str
    dry: bool
    deadline: float
    bandwidth_gbs: float = 0.0
    rows: list[str] = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def row(self, group: str, case: str, dtype: str, variant: str, ms: float | None = None,
            ref_ms: float | None = None, floor_ms: float | None = None, note: str = "") -> None:
        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}"
        speedup = f"{ref_ms / ms:.2f}x" if ms and ref_ms else "-"
        self.rows.append(f"| {group} | {case} | {dtype} | {variant} | {fmt(ms)} | {fmt(ref_ms)} | {speedup} | "
                         f"{fmt(floor_ms)} | {note} |")

    def time(self, fn: Callable[[], object]) -> float | None:
        """Median ms on the GPU; on a dry run one call, no number (CPU timings of tiny models mean nothing)."""
        if self.dry:
            fn()
            return None
        start = time.perf_counter()
        fn()  # first call: compiles / builds, and tells whether this runtime is slow (e.g. ORT on the CPU)
        torch.cuda.synchronize()
        slow = time.perf_counter() - start > 0.5
        return median_ms(fn, self.device, warmup=1 if slow else 3, iters=3 if slow else 10)

    def cell(self, needs_s: float, what: str, fn: Callable[[], None]) -> None:
        """Run one measurement unless the budget is spent; a failure becomes a row, not a crash."""
        if self.left() < needs_s:
            self.rows.append(f"| skipped | {what} | | | | | | | time budget spent |")
            return
        try:
            fn()
        except Exception as e:  # one broken runtime must not hide every other number
            traceback.print_exc(file=sys.stderr)
            self.rows.append(f"| error | {what} | | | | | | | {type(e).__name__}: {str(e).splitlines()[0][:120]} |")


# ---------------------------------------------------------------------------------------------------
# kernels and the training step
# ---------------------------------------------------------------------------------------------------
def kernel_rows(r: Report) -> None:
    bench = None if r.dry else __import__("triton.testing", fromlist=["do_bench"]).do_bench
    for c in bench_kernels.cases(r.device, small=r.dry):
        err = bench_kernels._check(c)  # also runs both once: the dry run's whole job
        fused = ref = None
        if bench is not None:
            fused, ref = bench(c.fused, return_mode="median"), bench(c.ref, return_mode="median")
        floor = c.bytes_moved / (r.bandwidth_gbs * 1e6) if c.bytes_moved else None
        r.row("kernel", f"{c.op} {c.shape}", "fp32", "triton vs torch op", fused, ref, floor, f"max rel err {err:.1e}")


def policy_config(recipe: str, dry: bool) -> PolicyConfig:
    """The two recipes at their real sizes; the dry run shrinks them (tiny U-Net, small images, K=4)."""
    sched = SchedulerConfig(num_inference_steps=4 if dry else 16)
    unet = "tiny" if dry else recipe
    if recipe == "image":
        image = ImageEncoderConfig(image_shape=(3, 72, 72), crop_shape=(64, 64)) if dry else ImageEncoderConfig()
        return PolicyConfig(recipe=unet, action_dim=2, state_dim=4, image=image, scheduler=sched)
    return PolicyConfig(recipe=unet, action_dim=2, state_dim=20, scheduler=sched)


def build(cfg: PolicyConfig, device: str, dtype: torch.dtype = torch.float32) -> DPAGPolicy:
    torch.manual_seed(0)
    policy = DPAGPolicy(cfg)
    g = torch.Generator().manual_seed(1)
    policy.normalizer.fit({"action": torch.randn(500, cfg.action_dim, generator=g),
                           "state": torch.randn(500, cfg.state_dim, generator=g)})
    return policy.to(device=device, dtype=dtype)


def make_obs(cfg: PolicyConfig, batch: int, device: str, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(2)
    obs = {"state": torch.randn(batch, cfg.n_obs_steps, cfg.state_dim, generator=g)}
    for cam in (cfg.image.cameras if cfg.image else ()):
        obs[cam] = torch.rand(batch, cfg.n_obs_steps, *cfg.image.image_shape, generator=g)
    return {k: v.to(device=device, dtype=dtype) for k, v in obs.items()}


def training_rows(r: Report, recipe: str) -> None:
    cfg = policy_config(recipe, r.dry)
    batch = 4 if r.dry else (256 if recipe == "lowdim" else 64)
    policy = build(cfg, r.device)
    g = torch.Generator().manual_seed(3)
    data = {"obs": make_obs(cfg, batch, r.device),
            "action": torch.randn(batch, cfg.horizon, cfg.action_dim, generator=g).to(r.device)}

    def step(backend: str) -> Callable[[], None]:
        def run() -> None:
            with use_backend(backend):
                policy.zero_grad(set_to_none=True)
                policy.compute_loss(data, torch.Generator(r.device).manual_seed(0))[0].backward()
        return run

    ref, fused = r.time(step("torch")), r.time(step("triton"))
    r.row("train step", f"{recipe} loss+backward B={batch}", "fp32", "triton backend vs torch", fused, ref)


# ---------------------------------------------------------------------------------------------------
# predict_action: one plan at B=1 through every runtime
# ---------------------------------------------------------------------------------------------------
def err_vs(ref: torch.Tensor, got: torch.Tensor) -> str:
    return f"max abs err vs eager {float((got.float().cpu() - ref.float().cpu()).abs().max()):.1e}"


class PlanBench:
    """One recipe and dtype: the policy, a B=1 observation, and per mode the eager reference chunk and ms."""

    def __init__(self, r: Report, recipe: str, dtype_name: str):
        self.r, self.recipe, self.dtype_name, self.dtype = r, recipe, dtype_name, DTYPES[dtype_name]
        cfg = policy_config(recipe, r.dry)
        self.policy = build(cfg, r.device, self.dtype).eval()
        self.obs = make_obs(cfg, 1, r.device, self.dtype)
        self.k = self.policy.schedule.num_steps
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.policy.unet.parameters())
        self.want: dict[str, torch.Tensor] = {}
        self.ref: dict[str, float | None] = {}

    def plan(self, mode: str, backend: str = "torch") -> Callable[[], dict]:
        def run() -> dict:
            with use_backend(backend):
                return self.policy.predict_action(self.obs, torch.Generator(self.r.device).manual_seed(0), mode=mode)
        return run

    def row(self, mode: str, runtime: str, ms: float | None, got: torch.Tensor | None = None, dtype: str = "") -> None:
        forwards = self.k if mode == "dp" else 3 * self.k  # guided: force forward + VJP + forward per step
        floor = self.weight_bytes * forwards / (self.r.bandwidth_gbs * 1e6)
        note = err_vs(self.want[mode], got) if got is not None else ""
        self.r.row("plan", f"{self.recipe} predict_action B=1 DDIM-{self.k} {mode}", dtype or self.dtype_name,
                   runtime, ms, self.ref[mode], floor, note)

    def reference(self, mode: str) -> None:
        self.want[mode] = self.plan(mode)()["action_pred"]
        self.ref[mode] = self.r.time(self.plan(mode))
        self.row(mode, "eager torch (reference)", self.ref[mode])

    def triton_eager(self, mode: str) -> None:
        got = self.plan(mode, "triton")()["action_pred"]
        self.row(mode, "eager, triton backend", self.r.time(self.plan(mode, "triton")), got)

    def compiled(self, mode: str) -> None:
        # The dry run checks the graph capture (dynamo) only: inductor's C++ build takes minutes on 2 cores.
        policy, eager_unet = self.policy, self.policy.unet
        policy.unet = torch.compile(eager_unet, backend="eager" if self.r.dry else "inductor")
        try:
            got = self.plan(mode)()["action_pred"]
            label = "torch.compile(unet)" + (" [eager backend]" if self.r.dry else "")
            self.row(mode, label, self.r.time(self.plan(mode)), got)
        finally:
            policy.unet = eager_unet

    def cuda_graph(self, mode: str) -> None:
        """The whole plan captured once as a CUDA graph (dpag_engine.runtime.cuda_graph), triton ops; a
        replay is one launch, with the same draws as predict_action."""
        from dpag_engine.runtime.cuda_graph import CudaGraphRuntime
        with use_backend("triton"):
            graphed = CudaGraphRuntime.planner(self.policy, batch=1, mode=mode)

        def run() -> dict:
            return graphed.predict_action(self.obs, torch.Generator(self.r.device).manual_seed(0))
        self.row(mode, "CUDA graph (whole plan, triton ops)", self.r.time(run), run()["action_pred"])

    def exported(self, out: Path) -> None:
        """onnxruntime and, where installed, TensorRT, from one fp32 export of this policy."""
        try:
            from dpag_engine.export import export_onnx
            from dpag_engine.runtime.onnx_runtime import OnnxRuntime
        except ImportError as e:
            self.r.row("plan", f"{self.recipe} predict_action B=1 DDIM-{self.k} dp", "fp32", "onnxruntime",
                       note=f"n/a: {e.name} not installed")
            return
        export_onnx(self.policy, out, batch=2)
        runtime = OnnxRuntime(out, threads=1 if self.r.dry else None)
        onnx = runtime.planner()
        # Its planner draws on the CPU (where onnxruntime's inputs live): a CPU generator, so the row's
        # error is taken against the reference on the same CPU draws, moved to this device.
        obs_cpu = {k: v.cpu() for k, v in self.obs.items()}
        got = onnx.predict_action(obs_cpu, torch.Generator().manual_seed(0))["action_pred"]
        want = copy.deepcopy(self.policy).cpu().predict_action(obs_cpu, torch.Generator().manual_seed(0))["action_pred"]
        self.r.row("plan", f"{self.recipe} predict_action B=1 DDIM-{self.k} dp", self.dtype_name,
                   f"onnxruntime ({runtime.providers[0]})",
                   self.r.time(lambda: onnx.predict_action(obs_cpu, torch.Generator().manual_seed(0))), self.ref["dp"],
                   self.weight_bytes * self.k / (self.r.bandwidth_gbs * 1e6), err_vs(want, got))
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            self.r.row("plan", f"{self.recipe} predict_action B=1 DDIM-{self.k} dp", "fp32/fp16/bf16", "TensorRT",
                       note="n/a: tensorrt not installed")
            return
        if self.r.dry:
            return
        from dpag_engine.runtime.tensorrt_runtime import TensorRTRuntime

        for precision in ("fp32", "fp16", "bf16"):
            def trt(precision: str = precision) -> None:
                engine = TensorRTRuntime(out, precision=precision, max_batch=1).planner()   # draws on the GPU

                def run() -> dict:
                    return engine.predict_action(self.obs, torch.Generator(self.r.device).manual_seed(0))
                self.row("dp", "TensorRT engine", self.r.time(run), run()["action_pred"], dtype=precision)
            self.r.cell(60, f"{self.recipe} dp TensorRT {precision}", trt)


def plan_rows(r: Report, bench: PlanBench, export_dir: Path) -> None:
    """Everything but torch.compile (slow to build: it runs last, in compile_rows)."""
    fp32, gpu = bench.dtype == torch.float32, not r.dry
    # The dry run takes each code path once: the image recipe differs from lowdim only in the encoder.
    for mode in ("dp",) if r.dry and bench.recipe == "image" else ("dp", "guided"):
        what = f"{bench.recipe} {bench.dtype_name} {mode}"
        r.cell(5, f"{what} eager", lambda mode=mode: bench.reference(mode))
        if mode not in bench.want:
            continue
        if gpu or fp32:  # the Triton interpreter on CPU: fp32 only, to keep CI short
            r.cell(5, f"{what} triton", lambda mode=mode: bench.triton_eager(mode))
        if gpu:
            r.cell(10, f"{what} CUDA graph", lambda mode=mode: bench.cuda_graph(mode))
        if mode == "dp" and fp32:
            r.cell(20 if r.dry else 120, f"{what} onnxruntime", lambda: bench.exported(export_dir))
        elif mode == "dp":
            r.row("plan", f"{bench.recipe} predict_action B=1 DDIM-{bench.k} dp", bench.dtype_name,
                  "onnxruntime / TensorRT", note="n/a: the export is fp32 (TensorRT's fp16/bf16 engines are in the fp32 rows)")


def compile_rows(r: Report, bench: PlanBench) -> None:
    for mode in list(bench.want):
        if r.dry and bench.dtype != torch.float32:
            continue  # same code path as fp32
        r.cell(20 if r.dry else 90, f"{bench.recipe} {bench.dtype_name} {mode} torch.compile",
               lambda mode=mode: bench.compiled(mode))


# ---------------------------------------------------------------------------------------------------
def report(dry: bool, budget_s: float) -> str:
    device = "cpu" if dry else "cuda"
    if dry:  # tiny sizes gain nothing from threads, and idle OpenMP/onnxruntime workers spin on a shared CI box
        torch.set_num_threads(1)
    r = Report(device, dry, time.monotonic() + budget_s)
    r.bandwidth_gbs = read_bandwidth_gbs(device, mib=32 if dry else 1024)
    name = torch.cuda.get_device_name() if not dry else f"{platform.processor() or 'CPU'} (dry run: no timings)"
    with tempfile.TemporaryDirectory() as tmp:
        r.cell(30, "kernels", lambda: kernel_rows(r))
        for recipe in ("lowdim", "image"):
            r.cell(30, f"{recipe} training step", lambda recipe=recipe: training_rows(r, recipe))
        benches: list[PlanBench] = []
        for recipe in ("lowdim", "image"):
            for dtype_name in DTYPES if not (dry and recipe == "image") else ["fp32"]:
                def run(recipe: str = recipe, dtype_name: str = dtype_name) -> None:
                    benches.append(PlanBench(r, recipe, dtype_name))
                    plan_rows(r, benches[-1], Path(tmp) / recipe)
                r.cell(30, f"{recipe} {dtype_name} plans", run)
        for bench in benches:  # compiling is the slowest part: last, so the budget cuts it first
            compile_rows(r, bench)
    header = (f"Card: {name}; torch {torch.__version__}; date {datetime.date.today()}; "
              f"read bandwidth {r.bandwidth_gbs:.0f} GB/s (floor = compulsory bytes / this). "
              "ms = median; speed-up = reference ms / ms.")
    table = ["| group | case | dtype | runtime | ms | reference ms | speed-up | floor ms | check / note |",
             "|---|---|---|---|---:|---:|---:|---:|---|", *r.rows]
    return "\n".join([header, "", *table])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, small sizes, no GPU-only parts (CI)")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting new measurements after this")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_report: no CUDA device; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    with contextlib.redirect_stdout(sys.stderr):  # library chatter on stderr; the table alone on stdout
        table = report(args.dry_run, args.budget_s)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
