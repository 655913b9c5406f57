"""The "cpp" backend: ops run by the `dpag_engine._C` C++ CPU runtime (csrc/, python/).

`_C` works on numpy buffers, not torch tensors, so the extension does not depend on the installed
torch's ABI; the tensors are handed over as zero-copy `.numpy()` views. Only CPU float32 is served.
"""
from __future__ import annotations

import torch

from . import torch_ref

try:
    from .. import _C
except ImportError as err:  # a source checkout that was never built
    raise ImportError("dpag_engine._C is not built: run `pip install -e .` (needs a C++17 compiler)") from err

# Not accelerated here: training-time ops, where the reference is already one fused-enough autograd
# graph and gradients are needed. The dispatcher contract says a backend re-exports them explicitly.
q_sample = torch_ref.q_sample
em_step = torch_ref.em_step
unet_force = torch_ref.unet_force


def _as_buffer(t: torch.Tensor, name: str, shape: torch.Size):
    """A C-contiguous numpy view of `t` (copying only if `t` is strided), after checking what `_C` needs."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name}: the cpp backend runs on CPU tensors, got device {t.device}")
    if t.dtype != torch.float32:
        raise ValueError(f"{name}: the cpp backend needs float32, got {t.dtype}")
    if t.shape != shape:
        raise ValueError(f"{name}: expected shape {tuple(shape)} (as sample), got {tuple(t.shape)}")
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name}: the cpp sampler step is not differentiable; call it under torch.no_grad()")
    return t.detach().contiguous().numpy()


def sampler_step(sample: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor,
                 step: int | torch.Tensor, noise: torch.Tensor | None = None,
                 clip: float | None = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDPM/DDIM step from the (K, 6) table, as `torch_ref.sampler_step` (CPU float32 only).

    Unlike the reference, eps and noise must have sample's shape (no broadcasting).
    """
    shape = sample.shape if isinstance(sample, torch.Tensor) else None
    x = _as_buffer(sample, "sample", shape)
    e = _as_buffer(eps, "eps", shape)
    n = None if noise is None else _as_buffer(noise, "noise", shape)
    # Round the row to float32 first, as the reference does before multiplying.
    row = coefs[step].to(torch.float32).tolist()
    prev = torch.empty(shape, dtype=torch.float32)
    x0 = torch.empty(shape, dtype=torch.float32)
    _C.sampler_step(x, e, row, n, None if clip is None else float(clip), prev.numpy(), x0.numpy())
    return prev, x0


def sampler_step_inpaint(sample: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor,
                         step: int | torch.Tensor, noise: torch.Tensor | None, clip: float | None,
                         prefix: torch.Tensor, prefix_noise: torch.Tensor, prefix_weight: torch.Tensor,
                         inpaint_coefs: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ step, then the reference inpaint of its output. The whole-plan C++ loop with inpainting
    is `_C.PolicyEngine.plan` (dpag_engine.runtime.cpu.CpuRuntime); this op only keeps the dispatcher
    contract for the `cpp` backend, where one step is a few hundred bytes of elementwise work."""
    prev, x0 = sampler_step(sample, eps, coefs, step, noise, clip)
    return torch_ref.inpaint(prev, prefix, prefix_noise, prefix_weight, inpaint_coefs, step, start), x0
