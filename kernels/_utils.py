"""Small helpers shared by the kernel wrappers: output allocation, dtypes, block sizes."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Test hook: when True every output buffer a wrapper allocates is filled with NaN first, so a test
# can prove that a kernel wrote every element (an unwritten element stays NaN). Off in production:
# torch.empty is free, torch.full is a whole extra write pass.
POISON_OUTPUTS = False


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def empty_like(x: torch.Tensor) -> torch.Tensor:
    return empty(x.shape, x.dtype, x.device)


def compute_dtype(dtype: torch.dtype):
    """Arithmetic precision inside a kernel: float64 stays float64 (so gradcheck works), every other
    floating dtype (fp32, fp16, bf16) is upcast to float32 in registers. Loads and stores keep the
    storage dtype, so the memory traffic of a half-precision model is unchanged."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_float(name: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating tensor, got {x.dtype}")


def check_int32_numel(name: str, x: torch.Tensor) -> None:
    # Offsets inside the kernels are int32 (cheaper address math, and the Philox counter of the
    # latent update is the flat int32 element index).
    if x.numel() >= 2**31:
        raise ValueError(f"{name}: {x.numel()} elements; the kernels index with int32 (< 2**31)")


next_power_of_2 = triton.next_power_of_2
