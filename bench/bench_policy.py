"""DP-AG training loss (literal vs efficient) and Policy.step latency (eager, per backend), on CPU or GPU.

    pytest bench/bench_policy.py --benchmark-only      # pytest-benchmark, tiny recipe (quick)
    python bench/bench_policy.py [--recipes tiny lowdim] [--device cpu]   # markdown table

Every row compares against the plain PyTorch reference measured in the same run, and latency rows
carry the roofline floor: U-Net weight bytes x forwards per plan / measured read bandwidth.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import tempfile

import pytest
import torch

from dpag_engine.config import LossConfig, PolicyConfig
from dpag_engine.ops import use_backend
from dpag_engine.policy import DPAGPolicy

try:
    from timing import median_ms, read_bandwidth_gbs
except ImportError:  # run as `python bench/bench_policy.py` from the repo root
    from bench.timing import median_ms, read_bandwidth_gbs


def build(recipe: str, device: str, implementation: str = "efficient") -> DPAGPolicy:
    torch.manual_seed(0)
    policy = DPAGPolicy(PolicyConfig(recipe=recipe, action_dim=2, state_dim=20,
                                     loss=LossConfig(implementation=implementation))).to(device)
    g = torch.Generator().manual_seed(1)
    policy.normalizer.fit({"action": torch.randn(500, 2, generator=g), "state": torch.randn(500, 20, generator=g)})
    return policy


def batch(policy: DPAGPolicy, size: int, device: str) -> dict:
    cfg = policy.cfg
    g = torch.Generator().manual_seed(2)
    return {"obs": {"state": torch.randn(size, cfg.n_obs_steps, cfg.state_dim, generator=g).to(device)},
            "action": torch.randn(size, cfg.horizon, cfg.action_dim, generator=g).to(device)}


def loss_step(policy: DPAGPolicy, data: dict):
    def run():
        policy.zero_grad(set_to_none=True)
        loss, _ = policy.compute_loss(data)
        loss.backward()
    return run


def plan(policy: DPAGPolicy, obs: dict, mode: str, backend: str = "torch"):
    def run():
        with use_backend(backend):
            policy.predict_action(obs, mode=mode)
    return run


# ---- pytest-benchmark (tiny recipe: seconds, not minutes) ----
@pytest.mark.parametrize("implementation", ["literal", "efficient"])
def test_loss_step(benchmark, implementation):
    policy = build("tiny", "cpu", implementation)
    benchmark.group = "dpag loss+backward, tiny, B=64"
    benchmark(loss_step(policy, batch(policy, 64, "cpu")))


@pytest.mark.parametrize("mode", ["dp", "guided"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_policy_step(benchmark, mode, backend):
    policy = build("tiny", "cpu").eval()
    benchmark.group = f"predict_action tiny B=1 DDIM-16 {mode}"
    benchmark(plan(policy, batch(policy, 1, "cpu")["obs"], mode, backend))


# ---- the report ----
def report(recipes: list[str], device: str, train_batch: int) -> str:
    bandwidth = read_bandwidth_gbs(device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"{platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"
    lines = [f"Device: {name}; torch {torch.__version__}; {datetime.date.today()}; read bandwidth {bandwidth:.1f} GB/s",
             "", "| recipe | what | reference ms | engine ms | ratio | floor ms |", "|---|---|---|---|---|---|"]
    for recipe in recipes:
        literal, efficient = build(recipe, device, "literal"), build(recipe, device, "efficient")
        data = batch(literal, train_batch, device)
        ms_l = median_ms(loss_step(literal, data), device, warmup=1, iters=5)
        ms_e = median_ms(loss_step(efficient, data), device, warmup=1, iters=5)
        lines.append(f"| {recipe} | loss+backward B={train_batch}: literal (ref) vs efficient | {ms_l:.1f} | {ms_e:.1f} | {ms_l / ms_e:.2f}x | |")
        if device.startswith("cuda"):  # the fused kernels only run for real on a GPU
            with use_backend("triton"):
                ms_t = median_ms(loss_step(efficient, data), device, warmup=2, iters=10)
            lines.append(f"| {recipe} | loss+backward B={train_batch}: efficient torch (ref) vs triton | {ms_e:.1f} | {ms_t:.1f} | {ms_e / ms_t:.2f}x | |")
        policy = efficient.eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in policy.unet.parameters())
        obs = batch(policy, 1, device)["obs"]
        k = policy.schedule.num_steps
        for mode, forwards in (("dp", k), ("guided", 3 * k)):  # guided: force forward + backward + forward
            ref = median_ms(plan(policy, obs, mode, "torch"), device, warmup=1, iters=5)
            floor = weight_bytes * forwards / bandwidth / 1e6
            lines.append(f"| {recipe} | predict_action B=1 DDIM-{k} {mode}, eager torch | {ref:.1f} | | | {floor:.1f} |")
            backend = "cpp" if device == "cpu" else "triton"
            fast = median_ms(plan(policy, obs, mode, backend), device, warmup=1, iters=5)
            lines.append(f"| {recipe} | predict_action B=1 DDIM-{k} {mode}, {backend} backend | {ref:.1f} | {fast:.1f} | {ref / fast:.2f}x | {floor:.1f} |")
            if mode == "dp":  # exported graphs have no backward, so dp mode only
                from dpag_engine.export import export_onnx
                from dpag_engine.runtime.onnx_runtime import OnnxRuntime
                with tempfile.TemporaryDirectory() as d:
                    export_onnx(policy, d)
                    onnx = OnnxRuntime(d).planner()
                    ms = median_ms(lambda: onnx.predict_action({k: v.cpu() for k, v in obs.items()}), device,
                                   warmup=1, iters=5)
                lines.append(f"| {recipe} | predict_action B=1 DDIM-{k} dp, onnxruntime | {ref:.1f} | {ms:.1f} | {ref / ms:.2f}x | {floor:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["tiny", "lowdim"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-batch", type=int, default=32)
    args = parser.parse_args()
    print(report(args.recipes, args.device, args.train_batch))
