"""Serving backends for an exported policy (see `dpag_engine.export`), selectable at serve time.

Every backend has the interface of `DPAGPolicy.predict_action(obs, generator, mode)` and returns the
same action chunk for the same generator. Imports are lazy: onnxruntime and TensorRT are optional
dependencies, and importing dpag_engine must work without either.
"""
from __future__ import annotations

import os

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def load_backend(path: str | os.PathLike, backend: str = "torch", **kwargs):
    """A policy to serve. "torch": `path` is model.pt (DPAGPolicy via load_policy); "onnxruntime" and
    "tensorrt": `path` is the folder written by `python -m dpag_engine.export`. kwargs go to the
    backend's constructor (e.g. providers=..., precision="fp16")."""
    if backend == "torch":
        from ..checkpoint import load_policy
        return load_policy(path, **kwargs)
    if backend == "onnxruntime":
        from .onnx_policy import OnnxPolicy
        return OnnxPolicy(path, **kwargs)
    if backend == "tensorrt":
        from .tensorrt_policy import TensorRTPolicy
        return TensorRTPolicy(path, **kwargs)
    raise ValueError(f"backend: must be one of {BACKENDS}, got {backend!r}")
