"""The one switch that selects how DP-AG's hot operations run.

Each backend is a module exposing the same functions (see `torch_ref`, the reference every other
backend is tested against):

- `sampler_step(sample, eps, coefs, step, noise, clip) -> (prev_sample, x0_clipped)`
- `sampler_step_inpaint(sample, eps, coefs, step, noise, clip, prefix, prefix_noise, prefix_weight,
   inpaint_coefs, start) -> (prev_sample, x0_clipped)`              (a step + real-time-chunking inpaint)
- `q_sample(x0, noise, t, sqrt_ac, sqrt_1m_ac) -> x_t`            (differentiable in x0 and noise)
- `em_step(z, g, log_var, gamma, dt, eta, normalize, xi) -> z`  (differentiable in z and log_var; xi:
   the Brownian draws, shaped like z, when eta > 0)
- `unet_force(unet, sample, t, global_cond) -> g`                  (the VJP force of docs/method.md §5)

Backends: "torch" (plain PyTorch, the reference), "cpp" (the `dpag_engine._C` CPU runtime),
"triton" (fused kernels in `dpag_engine.kernels`; on a CPU machine only under TRITON_INTERPRET=1).
A backend that does not accelerate an op re-exports the reference for it, explicitly.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType
from typing import Iterator

BACKENDS = {
    "torch": "dpag_engine.ops.torch_ref",
    "cpp": "dpag_engine.ops.cpp",
    "triton": "dpag_engine.kernels",
}

_current = os.environ.get("DPAG_BACKEND", "torch")


def get_backend() -> str:
    return _current


def set_backend(name: str) -> None:
    global _current
    if name not in BACKENDS:
        raise ValueError(f"backend: must be one of {sorted(BACKENDS)}, got {name!r}")
    _current = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def backend_module(name: str | None = None) -> ModuleType:
    name = name or _current
    if name not in BACKENDS:
        raise ValueError(f"backend: must be one of {sorted(BACKENDS)}, got {name!r}")
    return importlib.import_module(BACKENDS[name])


def sampler_step(*args, **kwargs):
    return backend_module().sampler_step(*args, **kwargs)


def sampler_step_inpaint(*args, **kwargs):
    return backend_module().sampler_step_inpaint(*args, **kwargs)


def q_sample(*args, **kwargs):
    return backend_module().q_sample(*args, **kwargs)


def em_step(*args, **kwargs):
    return backend_module().em_step(*args, **kwargs)


def unet_force(*args, **kwargs):
    return backend_module().unet_force(*args, **kwargs)
