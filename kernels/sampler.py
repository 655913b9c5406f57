"""The diffusion-side elementwise ops: one DDIM/DDPM sampler step, and the forward noising q_sample.

Both are memory-bound affine maps; fusing them into one pass reads each input once and writes each
output once, where the PyTorch reference makes 6-10 separate passes (one per `*`, `+`, `clamp`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils as U

BLOCK = 1024  # elements per program: 4 warps x 32 lanes x 8 elements (two 128-bit fp32 vectors)
NUM_COEFS = 6  # must match dpag_engine.diffusion.NUM_COEFS (checked on import below)

# ---------------------------------------------------------------------------------------------------
# sampler_step
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _affine_step(
    x_ptr, eps_ptr, noise_ptr, coefs_ptr, step_ptr, N, K, step_val, clip,
    R_X: tl.constexpr, R_EPS: tl.constexpr, C_X0: tl.constexpr, C_X: tl.constexpr,
    C_EPS: tl.constexpr, STD: tl.constexpr,
    STEP_FROM_PTR: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_CLIP: tl.constexpr,
    CDT: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program's block of the sampler step: returns (prev, x0, offs, mask, step)."""
    # The step index is read on the device: the host never needs its value, so a K-step loop
    # (with `step` a device counter) can be captured in one CUDA graph.
    if STEP_FROM_PTR:
        step = tl.load(step_ptr).to(tl.int32)
    else:
        step = step_val
    step = tl.where(step < 0, step + K, step)  # python-style negative index, like coefs[step]
    row = coefs_ptr + step * 6
    # Six scalar loads per program; all programs hit the same 48 bytes, which stay in L1/L2.
    r_x = tl.load(row + R_X).to(CDT)
    r_eps = tl.load(row + R_EPS).to(CDT)
    c_x0 = tl.load(row + C_X0).to(CDT)
    c_x = tl.load(row + C_X).to(CDT)
    c_eps = tl.load(row + C_EPS).to(CDT)

    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(CDT)
    eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(CDT)

    x0 = r_x * x - r_eps * eps
    if HAS_CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip), clip)
    prev = c_x0 * x0 + c_x * x + c_eps * eps
    if HAS_NOISE:
        std = tl.load(row + STD).to(CDT)
        prev += std * tl.load(noise_ptr + offs, mask=mask, other=0.0).to(CDT)
    return prev, x0, offs, mask, step


@triton.jit(do_not_specialize=["step_val"])  # a python-int step loop compiles once, not per value
def _sampler_step_kernel(
    x_ptr, eps_ptr, noise_ptr,          # (N,) current sample x_t, predicted epsilon, optional noise
    coefs_ptr, step_ptr,                # (K, 6) coefficient table, 0-d int step tensor (if STEP_FROM_PTR)
    prev_ptr, x0_ptr,                   # (N,) outputs
    N, K, step_val, clip,               # step_val is used when the step is a host int
    R_X: tl.constexpr, R_EPS: tl.constexpr, C_X0: tl.constexpr, C_X: tl.constexpr,
    C_EPS: tl.constexpr, STD: tl.constexpr,
    STEP_FROM_PTR: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_CLIP: tl.constexpr,
    CDT: tl.constexpr, BLOCK: tl.constexpr,
):
    prev, x0, offs, mask, step = _affine_step(
        x_ptr, eps_ptr, noise_ptr, coefs_ptr, step_ptr, N, K, step_val, clip,
        R_X, R_EPS, C_X0, C_X, C_EPS, STD, STEP_FROM_PTR, HAS_NOISE, HAS_CLIP, CDT, BLOCK)
    tl.store(prev_ptr + offs, prev.to(prev_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def _coef_columns() -> dict:
    from dpag_engine.diffusion import C_EPS, C_X, C_X0, NUM_COEFS as N, R_EPS, R_X, STD
    assert N == NUM_COEFS, "coefficient table layout changed: update kernels/sampler.py"
    return dict(R_X=R_X, R_EPS=R_EPS, C_X0=C_X0, C_X=C_X, C_EPS=C_EPS, STD=STD)


COEF_COLUMNS = _coef_columns()


def _step_arg(name: str, step: int | torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """(step tensor, host step, STEP_FROM_PTR) for a kernel launch: a 0-d device step is read by the
    kernel (no host sync); a host int is range-checked here and passed by value."""
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.is_floating_point():
            raise ValueError(f"{name}: a tensor step must be a single integer")
        return step.reshape(()).to(c.device, non_blocking=True), 0, True
    step_val = int(step)
    if not -c.shape[0] <= step_val < c.shape[0]:
        raise IndexError(f"{name}: step {step_val} out of range for {c.shape[0]} steps")
    return c, step_val, False  # the tensor is unused: any pointer will do


def sampler_step(sample: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor,
                 step: int | torch.Tensor, noise: torch.Tensor | None = None,
                 clip: float | None = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDPM/DDIM step from the (K, 6) table of `dpag_engine.diffusion`; `step` may be a 0-d
    device tensor (no host sync). Returns (prev_sample, x0_clipped), same shape/dtype as `sample`.

    Inference-only: no autograd (the sampler loop runs under no_grad). Arithmetic is float32 for
    fp32/fp16/bf16 samples (the reference rounds the coefficients to the sample dtype; we do not).
    """
    if eps.shape != sample.shape or (noise is not None and noise.shape != sample.shape):
        raise ValueError(f"sampler_step: eps {tuple(eps.shape)} / noise must match sample {tuple(sample.shape)}")
    if coefs.dim() != 2 or coefs.shape[1] != NUM_COEFS:
        raise ValueError(f"sampler_step: coefs must be (K, {NUM_COEFS}), got {tuple(coefs.shape)}")
    U.check_float("sampler_step: sample", sample)
    U.check_int32_numel("sampler_step: sample", sample)
    x = sample.contiguous()
    e = eps.to(x.dtype).contiguous()
    n = noise.to(x.dtype).contiguous() if noise is not None else x  # dummy pointer when unused
    c = coefs.contiguous()
    prev, x0 = U.empty_like(x), U.empty_like(x)
    step_t, step_val, from_ptr = _step_arg("sampler_step", step, c)
    N = x.numel()
    grid = (triton.cdiv(N, BLOCK),)
    _sampler_step_kernel[grid](
        x, e, n, c, step_t, prev, x0, N, c.shape[0], step_val,
        float(clip) if clip is not None else 0.0,
        **COEF_COLUMNS,
        STEP_FROM_PTR=from_ptr, HAS_NOISE=noise is not None, HAS_CLIP=clip is not None,
        CDT=U.compute_dtype(x.dtype), BLOCK=BLOCK, num_warps=4,
    )
    return prev, x0


# ---------------------------------------------------------------------------------------------------
# sampler_step_inpaint: one sampler step fused with the real-time-chunking inpaint of its output
# ---------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["step_val"])
def _sampler_step_inpaint_kernel(
    x_ptr, eps_ptr, noise_ptr,          # (B*H*Da,) sample x_t, predicted epsilon, optional step noise
    coefs_ptr, step_ptr,                # (K, 6) step table, 0-d int step tensor (if STEP_FROM_PTR)
    prev_ptr, x0_ptr,                   # (B*H*Da,) outputs
    pre_ptr, pnoise_ptr, w_ptr, icoefs_ptr,  # prefix (B, W, Da), its noise (K, B, W, Da), weights (W,), (K, 2) table
    N, K, step_val, clip,
    HD, Da, start, W, NP,               # H*Da, Da, first inpainted row, window rows, B*W*Da
    R_X: tl.constexpr, R_EPS: tl.constexpr, C_X0: tl.constexpr, C_X: tl.constexpr,
    C_EPS: tl.constexpr, STD: tl.constexpr, IN_SA: tl.constexpr, IN_S1MA: tl.constexpr,
    STEP_FROM_PTR: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_CLIP: tl.constexpr,
    CDT: tl.constexpr, BLOCK: tl.constexpr,
):
    prev, x0, offs, mask, step = _affine_step(
        x_ptr, eps_ptr, noise_ptr, coefs_ptr, step_ptr, N, K, step_val, clip,
        R_X, R_EPS, C_X0, C_X, C_EPS, STD, STEP_FROM_PTR, HAS_NOISE, HAS_CLIP, CDT, BLOCK)

    # The inpaint, in registers: no extra pass over the sample. Element (b, h, d) is in the window
    # when start <= h < start + W; its prefix element is (b, h - start, d). Elements outside the
    # window load nothing (masked) and keep prev.
    b = offs // HD
    r = offs - b * HD
    h = r // Da
    j = h - start
    inw = mask & (j >= 0) & (j < W)
    pidx = (b * W + j) * Da + (r - h * Da)
    sa = tl.load(icoefs_ptr + step * 2 + IN_SA).to(CDT)
    s1ma = tl.load(icoefs_ptr + step * 2 + IN_S1MA).to(CDT)
    w = tl.load(w_ptr + j, mask=inw, other=0.0).to(CDT)
    p = tl.load(pre_ptr + pidx, mask=inw, other=0.0).to(CDT)
    pn = tl.load(pnoise_ptr + step * NP + pidx, mask=inw, other=0.0).to(CDT)
    target = sa * p + s1ma * pn
    prev = tl.where(inw, w * target + (1.0 - w) * prev, prev)

    tl.store(prev_ptr + offs, prev.to(prev_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def _inpaint_columns() -> dict:
    from dpag_engine.diffusion import IN_S1MA, IN_SA
    return dict(IN_SA=IN_SA, IN_S1MA=IN_S1MA)


INPAINT_COLUMNS = _inpaint_columns()


def sampler_step_inpaint(sample: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor,
                         step: int | torch.Tensor, noise: torch.Tensor | None, clip: float | None,
                         prefix: torch.Tensor, prefix_noise: torch.Tensor, prefix_weight: torch.Tensor,
                         inpaint_coefs: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`sampler_step` fused with the real-time-chunking inpaint of its output (see
    `dpag_engine.ops.torch_ref.inpaint`): one launch, the step (and the rows of prefix_noise and
    inpaint_coefs) read from device memory when `step` is a device scalar.

    sample (B, H, Da); prefix (B, W, Da); prefix_noise (K, B, W, Da); prefix_weight (W,);
    inpaint_coefs (K, 2); rows start .. start+W-1 of the output are inpainted.
    """
    name = "sampler_step_inpaint"
    if sample.dim() != 3:
        raise ValueError(f"{name}: sample must be (B, H, Da), got {tuple(sample.shape)}")
    if eps.shape != sample.shape or (noise is not None and noise.shape != sample.shape):
        raise ValueError(f"{name}: eps {tuple(eps.shape)} / noise must match sample {tuple(sample.shape)}")
    if coefs.dim() != 2 or coefs.shape[1] != NUM_COEFS:
        raise ValueError(f"{name}: coefs must be (K, {NUM_COEFS}), got {tuple(coefs.shape)}")
    B, H, Da = sample.shape
    K = coefs.shape[0]
    W = prefix.shape[1] if prefix.dim() == 3 else -1
    if prefix.dim() != 3 or prefix.shape[0] != B or prefix.shape[2] != Da or not 0 <= start <= H - W:
        raise ValueError(f"{name}: prefix must be (B={B}, W, Da={Da}) with 0 <= start={start} <= H - W "
                         f"(H={H}), got {tuple(prefix.shape)}")
    if tuple(prefix_noise.shape) != (K, B, W, Da) or tuple(prefix_weight.shape) != (W,) \
            or tuple(inpaint_coefs.shape) != (K, 2):
        raise ValueError(f"{name}: expected prefix_noise ({K}, {B}, {W}, {Da}), prefix_weight ({W},), "
                         f"inpaint_coefs ({K}, 2); got {tuple(prefix_noise.shape)}, "
                         f"{tuple(prefix_weight.shape)}, {tuple(inpaint_coefs.shape)}")
    U.check_float(f"{name}: sample", sample)
    U.check_int32_numel(f"{name}: sample", sample)
    U.check_int32_numel(f"{name}: prefix_noise", prefix_noise)
    x = sample.contiguous()
    e = eps.to(x.dtype).contiguous()
    n = noise.to(x.dtype).contiguous() if noise is not None else x  # dummy pointer when unused
    c = coefs.contiguous()
    pre = prefix.to(x.dtype).contiguous()
    pn = prefix_noise.to(x.dtype).contiguous()
    w = prefix_weight.to(x.dtype).contiguous()
    ic = inpaint_coefs.to(c.device).contiguous()
    prev, x0 = U.empty_like(x), U.empty_like(x)
    step_t, step_val, from_ptr = _step_arg(name, step, c)
    N = x.numel()
    _sampler_step_inpaint_kernel[(triton.cdiv(N, BLOCK),)](
        x, e, n, c, step_t, prev, x0, pre, pn, w, ic, N, K, step_val,
        float(clip) if clip is not None else 0.0, H * Da, Da, int(start), W, B * W * Da,
        **COEF_COLUMNS, **INPAINT_COLUMNS,
        STEP_FROM_PTR=from_ptr, HAS_NOISE=noise is not None, HAS_CLIP=clip is not None,
        CDT=U.compute_dtype(x.dtype), BLOCK=BLOCK, num_warps=4,
    )
    return prev, x0


# ---------------------------------------------------------------------------------------------------
# q_sample
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _q_sample_fwd_kernel(x0_ptr, noise_ptr, t_ptr, sa_ptr, s1ma_ptr, out_ptr, N, M,
                         CDT: tl.constexpr, BLOCK: tl.constexpr):
    # Flat 1-D grid over all B*M elements; the batch row of an element is offs // M. Gathering
    # t[row] and the two table entries per element costs nothing extra in DRAM (same few cache
    # lines for a whole block) and keeps the grid independent of B (no 65535 limit on any axis).
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    t = tl.load(t_ptr + offs // M, mask=mask, other=0)
    a = tl.load(sa_ptr + t, mask=mask, other=0.0).to(CDT)
    s = tl.load(s1ma_ptr + t, mask=mask, other=0.0).to(CDT)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(CDT)
    nz = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(CDT)
    tl.store(out_ptr + offs, (a * x0 + s * nz).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _q_sample_bwd_kernel(dy_ptr, t_ptr, sa_ptr, s1ma_ptr, dx0_ptr, dnoise_ptr, N, M,
                         CDT: tl.constexpr, BLOCK: tl.constexpr):
    # x_t is linear in (x0, noise): both gradients come from one read of dy.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    t = tl.load(t_ptr + offs // M, mask=mask, other=0)
    a = tl.load(sa_ptr + t, mask=mask, other=0.0).to(CDT)
    s = tl.load(s1ma_ptr + t, mask=mask, other=0.0).to(CDT)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(CDT)
    tl.store(dx0_ptr + offs, (a * dy).to(dx0_ptr.dtype.element_ty), mask=mask)
    tl.store(dnoise_ptr + offs, (s * dy).to(dnoise_ptr.dtype.element_ty), mask=mask)


class QSampleFunction(torch.autograd.Function):
    """x_t = sqrt_ac[t] x0 + sqrt_1m_ac[t] noise; differentiable in x0 and noise (not in t / tables)."""

    @staticmethod
    def forward(ctx, x0, noise, t, sqrt_ac, sqrt_1m_ac):
        x0c, nc, tc = x0.contiguous(), noise.to(x0.dtype).contiguous(), t.contiguous()
        out = U.empty_like(x0c)
        N = x0c.numel()
        _q_sample_fwd_kernel[(triton.cdiv(N, BLOCK),)](
            x0c, nc, tc, sqrt_ac, sqrt_1m_ac, out, N, N // x0c.shape[0],
            CDT=U.compute_dtype(x0c.dtype), BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(tc, sqrt_ac, sqrt_1m_ac)
        ctx.noise_dtype = noise.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        t, sqrt_ac, sqrt_1m_ac = ctx.saved_tensors
        dy = dy.contiguous()
        dx0, dnoise = U.empty_like(dy), U.empty_like(dy)
        N = dy.numel()
        _q_sample_bwd_kernel[(triton.cdiv(N, BLOCK),)](
            dy, t, sqrt_ac, sqrt_1m_ac, dx0, dnoise, N, N // dy.shape[0],
            CDT=U.compute_dtype(dy.dtype), BLOCK=BLOCK, num_warps=4)
        dx0 = dx0 if ctx.needs_input_grad[0] else None
        dnoise = dnoise.to(ctx.noise_dtype) if ctx.needs_input_grad[1] else None
        return dx0, dnoise, None, None, None


def q_sample(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
             sqrt_ac: torch.Tensor, sqrt_1m_ac: torch.Tensor) -> torch.Tensor:
    """Forward noising x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, t of shape (B,) (any int dtype)."""
    if noise.shape != x0.shape:
        raise ValueError(f"q_sample: noise {tuple(noise.shape)} must match x0 {tuple(x0.shape)}")
    if t.dim() != 1 or t.shape[0] != x0.shape[0] or t.is_floating_point():
        raise ValueError(f"q_sample: t must be an integer (B,) tensor with B={x0.shape[0]}, got {tuple(t.shape)}")
    U.check_float("q_sample: x0", x0)
    U.check_int32_numel("q_sample: x0", x0)
    if x0.numel() == 0:
        return x0 + noise  # nothing to launch; keeps autograd semantics
    return QSampleFunction.apply(x0, noise, t, sqrt_ac.contiguous(), sqrt_1m_ac.contiguous())
