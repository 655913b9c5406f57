"""The Euler-Maruyama step of the action-guided latent update (docs/method.md §5), fused.

    z' = z + gamma * dt * sigma * n(g) + eta * sqrt(dt) * sigma * xi,   sigma = exp(log_var / 2)

with n(g) = g / (||g||_2 + 1e-6) over the last (feature) dim when `normalize`, and xi ~ N(0, I)
the Brownian draws the caller made (one generator owns every random number of a plan, so this
backend steps with exactly the reference's numbers; drawing in-kernel would make "same seed, same
actions" false across backends).

The reference does: norm (1 pass + reduction), divide, exp, 3-4 muls/adds, more muls/adds; here it
is one read of z, g, log_var (and xi when eta > 0) and one write of z'.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dpag_engine.ops.torch_ref import check_brownian

from . import _utils as U

MAX_FEATURE_DIM = 65536  # the whole feature row lives in registers (one block); latents are ~10^2-10^3
ROW_TILE_ELEMS = 4096    # rows per program = ROW_TILE_ELEMS // BLOCK_D: enough work per program


@triton.jit
def _drift_and_noise(g_ptr, lv_ptr, xi_ptr, offs, mask, c_drift, c_noise,
                     NORMALIZE: tl.constexpr, HAS_NOISE: tl.constexpr, CDT: tl.constexpr):
    """(sigma, u) for a (BLOCK_R, BLOCK_D) tile, where z' - z = sigma * u. Shared by both passes."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(CDT)
    if NORMALIZE:
        # Masked lanes loaded 0, so they do not contribute to the row norm.
        norm = tl.sqrt(tl.sum(g * g, axis=1))
        g = g / (norm + 1e-6)[:, None]
    u = c_drift * g
    if HAS_NOISE:
        u += c_noise * tl.load(xi_ptr + offs, mask=mask, other=0.0).to(CDT)
    sigma = tl.exp(0.5 * tl.load(lv_ptr + offs, mask=mask, other=0.0).to(CDT))
    return sigma, u


@triton.jit
def _em_fwd_kernel(z_ptr, g_ptr, lv_ptr, xi_ptr, out_ptr, R, D, c_drift, c_noise,
                   NORMALIZE: tl.constexpr, HAS_NOISE: tl.constexpr, CDT: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    sigma, u = _drift_and_noise(g_ptr, lv_ptr, xi_ptr, offs, mask, c_drift, c_noise,
                                NORMALIZE, HAS_NOISE, CDT)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(CDT)
    tl.store(out_ptr + offs, (z + sigma * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _em_bwd_kernel(dy_ptr, g_ptr, lv_ptr, xi_ptr, dlv_ptr, R, D, c_drift, c_noise,
                   NORMALIZE: tl.constexpr, HAS_NOISE: tl.constexpr, CDT: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # d z'/d log_var = 0.5 * sigma * u. Recomputing u (norm + noise) from g and xi costs their reads;
    # saving z' - z instead would cost a write in forward plus a read here, and would lose precision
    # to cancellation when |z| >> |sigma u|.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    sigma, u = _drift_and_noise(g_ptr, lv_ptr, xi_ptr, offs, mask, c_drift, c_noise,
                                NORMALIZE, HAS_NOISE, CDT)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(CDT)
    tl.store(dlv_ptr + offs, (0.5 * dy * sigma * u).to(dlv_ptr.dtype.element_ty), mask=mask)


def _launch_cfg(R: int, D: int) -> tuple[tuple[int], dict]:
    block_d = U.next_power_of_2(D)
    block_r = max(1, min(U.next_power_of_2(R), ROW_TILE_ELEMS // block_d))
    num_warps = 4 if block_r * block_d <= 4096 else 8
    return (triton.cdiv(R, block_r),), dict(BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps)


class EMStepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, g, log_var, xi, c_drift, c_noise, normalize):
        D = z.shape[-1]
        R = z.numel() // D
        zc, gc, lvc = z.contiguous(), g.detach().to(z.dtype).contiguous(), log_var.to(z.dtype).contiguous()
        # Without noise the kernel never reads xi: any tensor stands in for the pointer.
        xic = xi.detach().to(z.dtype).contiguous() if xi is not None else gc
        out = U.empty_like(zc)
        grid, cfg = _launch_cfg(R, D)
        flags = dict(NORMALIZE=bool(normalize), HAS_NOISE=xi is not None, CDT=U.compute_dtype(zc.dtype))
        _em_fwd_kernel[grid](zc, gc, lvc, xic, out, R, D, c_drift, c_noise, **flags, **cfg)
        ctx.save_for_backward(gc, lvc, xic)
        ctx.args = (R, D, c_drift, c_noise, flags, grid, cfg, log_var.dtype)
        return out

    @staticmethod
    def backward(ctx, dy):
        gc, lvc, xic = ctx.saved_tensors
        R, D, c_drift, c_noise, flags, grid, cfg, lv_dtype = ctx.args
        dlv = None
        if ctx.needs_input_grad[2]:
            dyc = dy.contiguous()
            dlv = U.empty_like(lvc)
            _em_bwd_kernel[grid](dyc, gc, lvc, xic, dlv, R, D, c_drift, c_noise, **flags, **cfg)
            dlv = dlv.to(lv_dtype)
        # z' = z + (terms without z): dz is dy itself, no kernel (and no copy) needed.
        dz = dy if ctx.needs_input_grad[0] else None
        return dz, None, dlv, None, None, None, None


def em_step(z: torch.Tensor, g: torch.Tensor, log_var: torch.Tensor, gamma: float, dt: float,
            eta: float, normalize: bool, xi: torch.Tensor | None = None) -> torch.Tensor:
    """One Euler-Maruyama step z + gamma sigma n(g) dt + eta sigma sqrt(dt) xi (docs/method.md §5).

    Same signature and semantics as `dpag_engine.ops.torch_ref.em_step`: `g` is detached, gradients
    flow to `z` and `log_var` (which may broadcast against z); `xi`, the Brownian draws shaped like
    z, is needed only when eta > 0, and is a constant.
    """
    if g.shape != z.shape:
        raise ValueError(f"em_step: g {tuple(g.shape)} must match z {tuple(z.shape)}")
    if z.dim() == 0 or z.shape[-1] == 0:
        raise ValueError(f"em_step: z needs a non-empty feature (last) dim, got {tuple(z.shape)}")
    if z.shape[-1] > MAX_FEATURE_DIM:
        raise ValueError(f"em_step: feature dim {z.shape[-1]} > {MAX_FEATURE_DIM} (one row per block)")
    if eta < 0 or dt <= 0:
        raise ValueError(f"em_step: need eta >= 0 and dt > 0, got eta={eta}, dt={dt}")
    check_brownian(z, eta, xi)
    U.check_float("em_step: z", z)
    U.check_int32_numel("em_step: z", z)
    if log_var.shape != z.shape:
        log_var = log_var.expand_as(z)  # autograd sums the gradient back over broadcast dims
    if z.numel() == 0:
        return z.clone()
    return EMStepFunction.apply(z, g, log_var, xi if eta > 0 else None, float(gamma) * float(dt),
                                float(eta) * math.sqrt(float(dt)), bool(normalize))
