"""Shared pytest setup.

Triton kernels run on a CPU-only machine only under its interpreter, and the switch is read when
triton (and each @triton.jit kernel) is imported, so it must be set here, at conftest import time,
before any test module imports triton or dpag_engine.kernels. On a CUDA machine the real GPU
compiler is used (set TRITON_INTERPRET=1 yourself to debug kernels on the GPU machine's CPU).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI sets DPAG_REQUIRE_BUILT=1: the C++ module and Triton (its interpreter here) must then import,
# so a broken build fails the run at once instead of turning into skipped tests.
if os.environ.get("DPAG_REQUIRE_BUILT") == "1":
    import triton  # noqa: F401

    from dpag_engine import _C  # noqa: F401
