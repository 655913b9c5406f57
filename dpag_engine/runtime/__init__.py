"""Runtimes over an exported policy (see `dpag_engine.export`), selectable at serve time.

`load_planner(path, runtime)` returns the plan contract (planner.py) over the runtime asked for:
the same `predict_action` and the same action chunk for the same generator as the reference.
Imports are lazy: onnxruntime and TensorRT are optional dependencies, and importing dpag_engine must
work without either.
"""
from __future__ import annotations

import os

RUNTIMES = ("torch", "onnxruntime", "tensorrt")


def load_planner(path: str | os.PathLike, runtime: str = "torch", **kwargs):
    """A planner to serve. "torch": `path` is model.pt (the reference policy via load_policy);
    "onnxruntime" and "tensorrt": `path` is the folder written by `python -m dpag_engine.export`.
    kwargs go to the runtime's constructor (e.g. providers=..., precision="fp16")."""
    if runtime == "torch":
        from ..checkpoint import load_policy
        return load_policy(path, **kwargs).planner()
    if runtime == "onnxruntime":
        from .onnx_policy import OnnxRuntime
        return OnnxRuntime(path, **kwargs).planner()
    if runtime == "tensorrt":
        from .tensorrt_policy import TensorRTRuntime
        return TensorRTRuntime(path, **kwargs).planner()
    raise ValueError(f"runtime: must be one of {RUNTIMES}, got {runtime!r}")
