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
