"""Triton backend (dpag_engine.kernels) vs the PyTorch reference: sampler_step, q_sample, em_step.

Runs on the GPU when there is one, else under TRITON_INTERPRET=1 (set in conftest.py).
Oracle = dpag_engine.ops.torch_ref evaluated in float64 on the same (rounded) inputs.
Tolerances: fp32 outputs rtol 1e-5 (plus a small atol scaled to the values' size); fp16 outputs
rtol 2e-3 / atol 2e-3 (half-ulp rounding of the stored result, fp32 math inside). bfloat16 is not
tested: the interpreter's bf16 support is incomplete (its tl.dot is wrong), fp16 is the half type.
"""
from __future__ import annotations

import math

import pytest
import torch

from dpag_engine import kernels as K
from dpag_engine.config import SchedulerConfig
from dpag_engine.diffusion import make_alphas_cumprod, sampler_coefficients, sampler_timesteps
from dpag_engine.kernels import _utils, latent
from dpag_engine.ops import torch_ref as R

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}
DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every output buffer the kernels' wrappers allocate starts as NaN: an element a kernel forgot
    to write fails the comparison (NaN != anything) instead of passing by luck."""
    monkeypatch.setattr(_utils, "POISON_OUTPUTS", True)


def rand(*shape, dtype=torch.float32, scale=1.0, gen=None):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def assert_close(out, ref, dtype, scale=1.0):
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "output not fully written (NaN poison survived) or overflowed"
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol["rtol"], atol=tol["atol"] * scale)


# ------------------------------------------------------------------------------------------------
# sampler_step
# ------------------------------------------------------------------------------------------------

COEFS = {s: sampler_coefficients(SchedulerConfig(sampler=s, eta=e)).to(DEVICE)
         for s, e in (("ddim", 0.0), ("ddpm", 0.0))}
COEFS["ddim_eta"] = sampler_coefficients(SchedulerConfig(eta=1.0, use_clipped_eps=True)).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8, 2), (3, 16, 7), (64, 16, 2)])
@pytest.mark.parametrize("table", ["ddim", "ddpm", "ddim_eta"])
def test_sampler_step_matches_reference(shape, dtype, table):
    g = torch.Generator().manual_seed(sum(shape))
    coefs = COEFS[table]
    x, eps, noise = (rand(*shape, dtype=dtype, gen=g) for _ in range(3))
    K_ = coefs.shape[0]
    cases = [(0, noise, 1.0), (K_ // 2, None, None), (-1, noise, 1.0),
             (torch.tensor(K_ - 2, device=DEVICE), noise, 0.5)]
    for step, nz, clip in cases:
        prev, x0 = K.sampler_step(x, eps, coefs.float(), step, nz, clip)
        ref_prev, ref_x0 = R.sampler_step(x.double(), eps.double(), coefs, step,
                                          None if nz is None else nz.double(), clip)
        # x0 = x / sqrt(a_t) - ...: values up to ~1/sqrt(a_T) = O(100) when unclipped.
        scale = float(ref_x0.abs().max()) + 1.0
        assert_close(x0, ref_x0, dtype, scale)
        assert_close(prev, ref_prev, dtype, scale)


def test_sampler_step_float64_table_and_validation():
    x = rand(2, 8, 3)
    prev, _ = K.sampler_step(x, x, COEFS["ddim"], 3)  # a float64 table is accepted too
    torch.testing.assert_close(prev, R.sampler_step(x, x, COEFS["ddim"].float(), 3)[0])
    with pytest.raises(IndexError):
        K.sampler_step(x, x, COEFS["ddim"], COEFS["ddim"].shape[0])
    with pytest.raises(ValueError):
        K.sampler_step(x, x[:1], COEFS["ddim"], 0)


@pytest.mark.parametrize("k_steps", [8, 16])
def test_sampler_step_matches_diffusers_ddim(k_steps):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                    clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                                    prediction_type="epsilon")
    sched.set_timesteps(k_steps)
    cfg = SchedulerConfig(num_inference_steps=k_steps)
    assert sched.timesteps.tolist() == sampler_timesteps(cfg).tolist()
    coefs = sampler_coefficients(cfg).float().to(DEVICE)
    g = torch.Generator().manual_seed(k_steps)
    x = rand(3, 16, 2, gen=g)
    ours = x.clone()
    step = torch.zeros((), dtype=torch.long, device=DEVICE)  # device counter: the graph-capture path
    for i, t in enumerate(sched.timesteps):
        eps = torch.tanh(ours) * 0.7 + 0.3 * rand(3, 16, 2, gen=g)  # any deterministic "model"
        ref = sched.step(eps.cpu(), t, x.cpu(), eta=0.0)
        ours, x0 = K.sampler_step(ours, eps, coefs, step)
        x = ref.prev_sample.to(DEVICE)
        torch.testing.assert_close(x0.cpu(), ref.pred_original_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.cpu(), ref.prev_sample, rtol=1e-5, atol=1e-5)
        step += 1
        ours = x  # re-sync so the comparison is per step (no drift accumulation hiding errors)


# ------------------------------------------------------------------------------------------------
# q_sample
# ------------------------------------------------------------------------------------------------

AC = make_alphas_cumprod(SchedulerConfig())
SQRT_AC, SQRT_1M = AC.sqrt().to(DEVICE), (1 - AC).sqrt().to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8, 2), (3, 16, 7), (64, 16, 2), (5, 137)])
def test_q_sample_forward_backward(shape, dtype):
    g = torch.Generator().manual_seed(len(shape) * 100 + shape[0])
    x0 = rand(*shape, dtype=dtype, gen=g).requires_grad_()
    noise = rand(*shape, dtype=dtype, gen=g).requires_grad_()
    t = torch.randint(0, 100, (shape[0],), generator=g).to(DEVICE)
    out = K.q_sample(x0, noise, t, SQRT_AC.float(), SQRT_1M.float())
    x0r, nr = x0.detach().double().requires_grad_(), noise.detach().double().requires_grad_()
    ref = R.q_sample(x0r, nr, t, SQRT_AC, SQRT_1M)
    assert_close(out, ref, dtype)
    dy = rand(*shape, dtype=dtype, gen=g)
    dx0, dn = torch.autograd.grad(out, [x0, noise], dy)
    rdx0, rdn = torch.autograd.grad(ref, [x0r, nr], dy.double())
    assert_close(dx0, rdx0, dtype)
    assert_close(dn, rdn, dtype)


def test_q_sample_gradcheck_float64():
    x0 = torch.randn(3, 8, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    noise = torch.randn(3, 8, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    t = torch.tensor([0, 57, 99], device=DEVICE)
    assert torch.autograd.gradcheck(lambda a, b: K.q_sample(a, b, t, SQRT_AC, SQRT_1M), (x0, noise))
    # Only one input differentiable: the other gradient is not requested.
    (d,) = torch.autograd.grad(K.q_sample(x0, noise.detach(), t, SQRT_AC, SQRT_1M).sum(), [x0])
    torch.testing.assert_close(d, SQRT_AC[t].view(-1, 1, 1).expand_as(d))


# ------------------------------------------------------------------------------------------------
# em_step
# ------------------------------------------------------------------------------------------------

EM_SHAPES = [(1, 2, 2), (3, 2, 66), (64, 2, 137), (3, 1, 137), (64, 66)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", EM_SHAPES)
@pytest.mark.parametrize("normalize,gamma,dt", [(True, 1.0, 1.0), (False, 0.1, 0.25)])
def test_em_step_matches_reference(shape, dtype, normalize, gamma, dt):
    g_ = torch.Generator().manual_seed(shape[-1] + shape[0])
    z = rand(*shape, dtype=dtype, gen=g_).requires_grad_()
    g = rand(*shape, dtype=dtype, gen=g_, scale=3.0)
    lv = rand(*shape, dtype=dtype, gen=g_, scale=0.5).requires_grad_()
    xi = rand(*shape, dtype=dtype, gen=g_)
    out = K.em_step(z, g, lv, gamma, dt, 0.6, normalize, xi)
    zr, lvr = z.detach().double().requires_grad_(), lv.detach().double().requires_grad_()
    ref = R.em_step(zr, g.double(), lvr, gamma, dt, 0.6, normalize, xi.double())
    scale = float(ref.detach().abs().max())
    assert_close(out, ref, dtype, scale)
    dy = rand(*shape, dtype=dtype, gen=g_)
    dz, dlv = torch.autograd.grad(out, [z, lv], dy)
    rdz, rdlv = torch.autograd.grad(ref, [zr, lvr], dy.double())
    assert_close(dz, rdz, dtype)
    assert_close(dlv, rdlv, dtype, float(rdlv.abs().max()))


def test_em_step_gradcheck_float64_with_noise():
    # The Brownian draws are a constant input, so the step is a smooth function of (z, log_var).
    # Small odd shape: full gradcheck is 2 x numel kernel launches under the interpreter.
    z = torch.randn(2, 2, 9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    lv = torch.randn(2, 2, 9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    g, xi = (torch.randn(2, 2, 9, dtype=torch.float64, device=DEVICE) for _ in range(2))
    for eta in (0.0, 0.7):
        assert torch.autograd.gradcheck(lambda a, b: K.em_step(a, g, b, 0.5, 0.3, eta, True, xi), (z, lv))


def test_em_step_broadcast_log_var_grad():
    z = rand(3, 2, 66).requires_grad_()
    g = rand(3, 2, 66)
    lv = rand(3, 1, 66).requires_grad_()  # one log-variance per sample, shared over obs steps
    xi = rand(3, 2, 66)
    out = K.em_step(z, g, lv, 1.0, 1.0, 0.4, True, xi)
    ref = R.em_step(z, g, lv, 1.0, 1.0, 0.4, True, xi)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), lv)[0],
                               torch.autograd.grad(ref.sum(), lv)[0], rtol=1e-5, atol=1e-5)


def test_em_step_noise_is_the_callers_draws_on_any_launch_grid(monkeypatch):
    """The Brownian term is exactly eta sqrt(dt) sigma xi with the xi given (the backend draws
    nothing itself, so a plan's numbers are the same on every backend), whatever the grid."""
    z, g, lv, xi = rand(64, 2, 137), rand(64, 2, 137), rand(64, 2, 137, scale=0.5), rand(64, 2, 137)
    gamma, dt, eta = 0.3, 0.25, 0.8
    out = K.em_step(z, g, lv, gamma, dt, eta, True, xi)
    drift = R.em_step(z.double(), g.double(), lv.double(), gamma, dt, 0.0, True)
    noise = eta * math.sqrt(dt) * torch.exp(0.5 * lv.double()) * xi.double()
    torch.testing.assert_close(out.double(), drift + noise, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(latent, "ROW_TILE_ELEMS", 256)  # 1 row per program instead of 16
    assert torch.equal(out, K.em_step(z, g, lv, gamma, dt, eta, True, xi))
    with pytest.raises(ValueError, match="eta > 0 needs xi"):
        K.em_step(z, g, lv, gamma, dt, eta, True)
    with pytest.raises(ValueError, match="eta > 0 needs xi"):
        K.em_step(z, g, lv, gamma, dt, eta, True, xi[:, :1])


def test_em_step_noise_gradient_uses_the_forward_draws():
    # d out / d log_var = 0.5 (out - z): the backward kernel sees the forward's noise.
    z = rand(3, 2, 66, dtype=torch.float64)
    lv = rand(3, 2, 66, dtype=torch.float64).requires_grad_()
    out = K.em_step(z, rand(3, 2, 66, dtype=torch.float64), lv, 1.0, 0.5, 2.0, True, rand(3, 2, 66, dtype=torch.float64))
    (dlv,) = torch.autograd.grad(out.sum(), lv)
    torch.testing.assert_close(dlv, 0.5 * (out.detach() - z), rtol=1e-12, atol=1e-12)


def test_backend_dispatch_uses_kernels():
    from dpag_engine import ops
    x = rand(2, 8, 2)
    with ops.use_backend("triton"):
        assert ops.backend_module() is K
        prev, _ = ops.sampler_step(x, x, COEFS["ddim"].float(), 0)
    torch.testing.assert_close(prev, R.sampler_step(x, x, COEFS["ddim"].float(), 0)[0])
