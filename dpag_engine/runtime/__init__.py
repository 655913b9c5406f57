"""The runtimes: what runs a plan's encode and denoise under the plan contract (planner.py).

| runtime | file | modes |
|---|---|---|
| torch (the reference) | policy.py `TorchRuntime` (beside the model it runs) | dp, guided |
| cpp (the C++ engine) | cpu.py `CpuRuntime` | dp, guided |
| cuda-graph | cuda_graph.py `CudaGraphRuntime` | the one it was captured for |
| onnxruntime, tensorrt (exported graphs) | exported.py + onnx_runtime.py, tensorrt_runtime.py | dp |

`load_planner(path, runtime)` returns the plan contract over a saved policy or an export folder:
the same `predict_action` and the same action chunk for the same generator as the reference.
Imports are lazy: onnxruntime and TensorRT are optional dependencies, and importing dpag_engine must
work without either.
"""
from __future__ import annotations

import os

RUNTIMES = ("torch", "onnxruntime", "tensorrt")
POLICY_RUNTIMES = ("cpp", "torch")


ENGINE_WEIGHTS = ("fp32", "fp16", "bf16", "int8")


def policy_planner(policy, runtime: str = "cpp", mode: str = "dp", threads: int | None = None,
                   weights: str = "fp32"):
    """The plan contract over a loaded policy: "cpp" the C++ engine (what serving runs; its weights,
    latent-update settings and thread count are snapshot now), "torch" the PyTorch reference.
    weights: how the engine stores the convolution weights (ENGINE_WEIGHTS; "cpp" only)."""
    if weights not in ENGINE_WEIGHTS:
        raise ValueError(f"weights: must be one of {ENGINE_WEIGHTS}, got {weights!r}")
    if runtime == "cpp":
        from .cpu import CpuRuntime
        return CpuRuntime.planner(policy, threads=threads, guided=mode == "guided", weights=weights)
    if runtime == "torch":
        if weights != "fp32":
            raise ValueError(f"weights={weights!r}: only the C++ engine (runtime 'cpp') stores reduced-precision weights")
        return policy.planner()
    raise ValueError(f"runtime: must be one of {POLICY_RUNTIMES}, got {runtime!r}")


def load_planner(path: str | os.PathLike, runtime: str = "torch", **kwargs):
    """A planner to serve. "torch": `path` is model.pt (the reference policy via load_policy);
    "onnxruntime" and "tensorrt": `path` is the folder written by `python -m dpag_engine.export`.
    kwargs go to the runtime's constructor (e.g. providers=..., precision="fp16")."""
    if runtime == "torch":
        from ..checkpoint import load_policy
        return load_policy(path, **kwargs).planner()
    if runtime == "onnxruntime":
        from .onnx_runtime import OnnxRuntime
        return OnnxRuntime(path, **kwargs).planner()
    if runtime == "tensorrt":
        from .tensorrt_runtime import TensorRTRuntime
        return TensorRTRuntime(path, **kwargs).planner()
    raise ValueError(f"runtime: must be one of {RUNTIMES}, got {runtime!r}")
