"""The C++ extension dpag_engine._C and the "cpp" ops backend built on it.

The cpp sampler step must equal the torch reference (ops.torch_ref) on every sampler configuration,
step after step over the whole schedule, and diffusers' DDIMScheduler directly.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dpag_engine import _C, ops  # no importorskip: an unbuilt extension is a failure, not a skip
from dpag_engine.config import SchedulerConfig
from dpag_engine.diffusion import STD, NoiseSchedule
from dpag_engine.ops import cpp, torch_ref

# Every sampler the config allows, DDIM at both K of the spec (DDPM always walks all T steps).
SAMPLERS = {
    "ddim-eta0": dict(sampler="ddim", eta=0.0),
    "ddim-eta1": dict(sampler="ddim", eta=1.0),
    "ddim-eta0-clipped-eps": dict(sampler="ddim", eta=0.0, use_clipped_eps=True),
    "ddim-eta1-clipped-eps": dict(sampler="ddim", eta=1.0, use_clipped_eps=True),
}
CONFIGS = [pytest.param(SchedulerConfig(num_inference_steps=k, **kw), id=f"{name}-K{k}")
           for name, kw in SAMPLERS.items() for k in (8, 16)]
CONFIGS.append(pytest.param(SchedulerConfig(sampler="ddpm"), id="ddpm-T100"))

# (batch, horizon, action_dim): 3*16*7 = 336 elements is no multiple of any SIMD width, so the
# vectorised loop's scalar tail is exercised too.
SHAPE = (3, 16, 7)
TOL = dict(rtol=1e-6, atol=1e-6)


def test_extension_imports_with_build_info():
    assert _C.__file__.endswith(".so") or _C.__file__.endswith(".pyd")
    assert _C.__version__
    assert _C.build_info["build_type"]
    assert callable(_C.sampler_step)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_cpp_matches_reference_over_schedule(cfg):
    sched = NoiseSchedule(cfg)
    gen = torch.Generator().manual_seed(0)
    x_cpp = x_ref = torch.randn(SHAPE, generator=gen)
    for k in range(sched.num_steps):
        eps = torch.randn(SHAPE, generator=gen)
        stochastic = bool(sched.coefs[k, STD] > 0)
        noise = torch.randn(SHAPE, generator=gen) if stochastic else None
        step = k if k % 2 == 0 else torch.tensor(k)  # the API takes an int or a 0-d tensor
        prev_cpp, x0_cpp = cpp.sampler_step(x_cpp, eps, sched.coefs, step, noise, sched.clip)
        prev_ref, x0_ref = torch_ref.sampler_step(x_ref, eps, sched.coefs, step, noise, sched.clip)
        torch.testing.assert_close(x0_cpp, x0_ref, **TOL, msg=f"x0 at step {k}")
        torch.testing.assert_close(prev_cpp, prev_ref, **TOL, msg=f"prev at step {k}")
        x_cpp, x_ref = prev_cpp, prev_ref


@pytest.mark.parametrize("clip", [1.0, 0.5, None])
@pytest.mark.parametrize("with_noise", [True, False])
def test_raw_extension_writes_every_output_element(clip, with_noise):
    # Outputs poisoned with NaN: any element the C++ loop skipped would show up.
    sched = NoiseSchedule(SchedulerConfig(num_inference_steps=8, eta=1.0))
    gen = torch.Generator().manual_seed(1)
    sample, eps, noise = (torch.randn(SHAPE, generator=gen) for _ in range(3))
    noise = noise if with_noise else None
    for k in range(sched.num_steps):
        prev = torch.empty(SHAPE).fill_(float("nan"))
        x0 = torch.empty(SHAPE).fill_(float("nan"))
        row = sched.coefs[k].tolist()
        _C.sampler_step(sample.numpy(), eps.numpy(), row, None if noise is None else noise.numpy(),
                        clip, prev.numpy(), x0.numpy())
        prev_ref, x0_ref = torch_ref.sampler_step(sample, eps, sched.coefs, k, noise, clip)
        torch.testing.assert_close(x0, x0_ref, **TOL)
        torch.testing.assert_close(prev, prev_ref, **TOL)


def test_clamp_lets_nan_through_like_torch():
    sched = NoiseSchedule(SchedulerConfig(num_inference_steps=8))
    sample = torch.tensor([float("nan"), 0.5, -3.0, 3.0])
    eps = torch.zeros(4)
    prev, x0 = cpp.sampler_step(sample, eps, sched.coefs, 0, None, 1.0)
    prev_ref, x0_ref = torch_ref.sampler_step(sample, eps, sched.coefs, 0, None, 1.0)
    torch.testing.assert_close(x0, x0_ref, equal_nan=True, **TOL)
    torch.testing.assert_close(prev, prev_ref, equal_nan=True, **TOL)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("use_clipped_eps", [False, True])
def test_cpp_step_matches_diffusers_ddim(eta, use_clipped_eps):
    diffusers = pytest.importorskip("diffusers")
    K = 16
    cfg = SchedulerConfig(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                          sampler="ddim", num_inference_steps=K, eta=eta, use_clipped_eps=use_clipped_eps)
    sched = NoiseSchedule(cfg)
    oracle = diffusers.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                     clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                                     prediction_type="epsilon")
    oracle.set_timesteps(K)
    assert oracle.timesteps.tolist() == sched.timesteps.tolist()
    gen = torch.Generator().manual_seed(2)
    for k, t in enumerate(oracle.timesteps.tolist()):
        # Fresh inputs per step: each step is compared on its own, not along a drifting trajectory.
        sample, eps, noise = (torch.randn(SHAPE, generator=gen) for _ in range(3))
        out = oracle.step(eps, t, sample, eta=eta, use_clipped_model_output=use_clipped_eps,
                          variance_noise=noise)
        prev, x0 = cpp.sampler_step(sample, eps, sched.coefs, k, noise if eta > 0 else None, sched.clip)
        # diffusers composes the step in float32 from other intermediates; float32 rounding, not 1e-6.
        torch.testing.assert_close(x0, out.pred_original_sample, rtol=1e-5, atol=1e-5, msg=f"x0 at t={t}")
        torch.testing.assert_close(prev, out.prev_sample, rtol=1e-5, atol=1e-5, msg=f"prev at t={t}")


def test_dispatcher_routes_to_cpp():
    sched = NoiseSchedule(SchedulerConfig(num_inference_steps=8, eta=1.0))
    gen = torch.Generator().manual_seed(3)
    sample, eps, noise = (torch.randn(SHAPE, generator=gen) for _ in range(3))
    with ops.use_backend("cpp"):
        assert ops.backend_module() is cpp
        got = ops.sampler_step(sample, eps, sched.coefs, torch.tensor(3), noise=noise, clip=sched.clip)
    want = torch_ref.sampler_step(sample, eps, sched.coefs, torch.tensor(3), noise=noise, clip=sched.clip)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
    # Ops the C++ runtime does not accelerate are the reference, re-exported.
    assert cpp.q_sample is torch_ref.q_sample and cpp.em_step is torch_ref.em_step


def test_cpp_backend_accepts_strided_inputs_and_float64_table():
    sched = NoiseSchedule(SchedulerConfig(num_inference_steps=8))
    coefs64 = sched.coefs.double()
    sample = torch.randn(7, 16, 3).transpose(0, 2)  # not contiguous
    eps = torch.randn(3, 16, 7)
    got = cpp.sampler_step(sample, eps, coefs64, 2)
    want = torch_ref.sampler_step(sample, eps, coefs64, 2)
    for g, w in zip(got, want):
        assert g.is_contiguous() and g.shape == sample.shape
        torch.testing.assert_close(g, w, **TOL)


# ---- error paths ----

def _arrays(n=12):
    return [np.zeros(n, dtype=np.float32) for _ in range(4)]


def test_raw_extension_rejects_wrong_dtype():
    sample, eps, prev, x0 = _arrays()
    with pytest.raises(ValueError, match="eps: expected dtype float32, got float64"):
        _C.sampler_step(sample, eps.astype(np.float64), [1.0] * 6, None, 1.0, prev, x0)


def test_raw_extension_rejects_mismatched_sizes():
    sample, eps, prev, x0 = _arrays()
    with pytest.raises(ValueError, match="noise: expected 12 elements"):
        _C.sampler_step(sample, eps, [1.0] * 6, np.zeros(11, np.float32), 1.0, prev, x0)
    with pytest.raises(ValueError, match="x0: expected 12 elements"):
        _C.sampler_step(sample, eps, [1.0] * 6, None, 1.0, prev, np.zeros(13, np.float32))


def test_raw_extension_rejects_non_contiguous():
    sample, eps, prev, x0 = _arrays()
    strided = np.zeros(24, dtype=np.float32)[::2]
    with pytest.raises(ValueError, match="sample: expected a C-contiguous array"):
        _C.sampler_step(strided, eps, [1.0] * 6, None, 1.0, prev, x0)
    with pytest.raises(ValueError, match="prev: expected a C-contiguous array"):
        _C.sampler_step(sample, eps, [1.0] * 6, None, 1.0, strided, x0)


def test_raw_extension_rejects_aliased_or_read_only_outputs():
    sample, eps, prev, x0 = _arrays()
    with pytest.raises(ValueError, match="prev: must not share memory with sample"):
        _C.sampler_step(sample, eps, [1.0] * 6, None, 1.0, sample, x0)
    with pytest.raises(ValueError, match="prev: must not share memory with x0"):
        _C.sampler_step(sample, eps, [1.0] * 6, None, 1.0, prev, prev)
    prev.flags.writeable = False
    with pytest.raises(ValueError, match="prev: output array is read-only"):
        _C.sampler_step(sample, eps, [1.0] * 6, None, 1.0, prev, x0)


def test_cpp_backend_errors_name_the_argument():
    coefs = NoiseSchedule(SchedulerConfig(num_inference_steps=8)).coefs
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="eps: the cpp backend needs float32, got torch.float64"):
        cpp.sampler_step(x, x.double(), coefs, 0)
    with pytest.raises(ValueError, match="sample: the cpp backend runs on CPU tensors, got device meta"):
        cpp.sampler_step(x.to("meta"), x, coefs, 0)
    with pytest.raises(ValueError, match=r"noise: expected shape \(3, 16, 7\)"):
        cpp.sampler_step(x, x, coefs, 0, noise=torch.randn(3, 16, 1))
    with pytest.raises(ValueError, match="sample: the cpp sampler step is not differentiable"):
        cpp.sampler_step(x.clone().requires_grad_(), x, coefs, 0)
