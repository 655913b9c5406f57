"""Schedules and sampler steps against diffusers' DDPMScheduler / DDIMScheduler (the oracle)."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dpag_engine.config import SchedulerConfig
from dpag_engine.diffusion import NoiseSchedule, make_alphas_cumprod
from dpag_engine.ops import torch_ref

T = 100


def oracle(cfg: SchedulerConfig):
    common = dict(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                  beta_start=cfg.beta_start, beta_end=cfg.beta_end, clip_sample=cfg.clip_sample,
                  clip_sample_range=cfg.clip_sample_range, prediction_type="epsilon")
    if cfg.sampler == "ddpm":
        s = DDPMScheduler(variance_type="fixed_small", **common)
        s.set_timesteps(cfg.num_train_timesteps)
    else:
        s = DDIMScheduler(set_alpha_to_one=True, steps_offset=0, **common)
        s.set_timesteps(cfg.num_inference_steps)
    return s


@pytest.mark.parametrize("schedule", ["squaredcos_cap_v2", "linear"])
def test_alphas_cumprod_match(schedule):
    cfg = SchedulerConfig(beta_schedule=schedule)
    ours = make_alphas_cumprod(cfg)
    theirs = oracle(cfg).alphas_cumprod.double()
    # diffusers takes the cumulative product in float32; ours is float64 of the same float32 betas.
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-7)
    ns = NoiseSchedule(cfg)
    torch.testing.assert_close(ns.sqrt_alphas_cumprod.double() ** 2, theirs, rtol=1e-5, atol=1e-7)


SAMPLERS = [
    dict(sampler="ddim", num_inference_steps=16, eta=0.0),
    dict(sampler="ddim", num_inference_steps=8, eta=0.0),
    dict(sampler="ddim", num_inference_steps=16, eta=1.0),
    dict(sampler="ddim", num_inference_steps=10, eta=0.5, use_clipped_eps=True),
    dict(sampler="ddim", num_inference_steps=16, eta=0.0, clip_sample=False),
    dict(sampler="ddpm"),
    dict(sampler="ddpm", beta_schedule="linear", clip_sample=False),
]


@pytest.mark.parametrize("settings", SAMPLERS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_every_step_matches_diffusers(settings):
    cfg = SchedulerConfig(**settings)
    ns, ref = NoiseSchedule(cfg), oracle(cfg)
    assert torch.equal(ns.timesteps, ref.timesteps)
    ac = ref.alphas_cumprod
    x = torch.randn(4, 16, 3) * 1.5
    for i, t in enumerate(ref.timesteps.tolist()):
        eps = torch.randn_like(x)
        # Unclipped x0 from our table's first two columns vs the definition.
        x0 = ns.coefs[i, 0] * x - ns.coefs[i, 1] * eps
        expected = (x - (1 - ac[t]).sqrt() * eps) / ac[t].sqrt()  # up to ~150 x eps near t = T-1
        torch.testing.assert_close(x0, expected, rtol=1e-5, atol=2e-6 * (1 + expected.abs().max()))
        for with_noise in (False, True):
            noise = torch.randn_like(x)
            if cfg.sampler == "ddim":
                out = ref.step(eps, t, x, eta=cfg.eta, use_clipped_model_output=cfg.use_clipped_eps,
                               variance_noise=noise if with_noise else torch.zeros_like(x))
            else:  # DDPMScheduler draws its own noise from a generator: replay the same draw
                out = ref.step(eps, t, x, generator=torch.Generator().manual_seed(i))
                noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
                if not with_noise:
                    continue
            prev, x0c = torch_ref.sampler_step(x, eps, ns.coefs, i, noise if with_noise else None, ns.clip)
            # float32 on both sides, and x0 is a difference of two terms each ~150x its input near
            # t = T-1: the rounding error scales with those terms, not with x0. A wrong coefficient
            # is off by O(1).
            scale = 1 + ns.coefs[i, 0] * x.abs().max() + ns.coefs[i, 1] * eps.abs().max()
            torch.testing.assert_close(x0c, out.pred_original_sample, rtol=1e-4, atol=4e-7 * scale)
            if cfg.clip_sample:
                assert x0c.abs().max() <= cfg.clip_sample_range
            torch.testing.assert_close(prev, out.prev_sample, rtol=1e-4, atol=4e-7 * scale)
        x = out.prev_sample


def test_step_index_may_be_a_device_tensor():
    ns = NoiseSchedule(SchedulerConfig())
    x, eps = torch.randn(2, 16, 2), torch.randn(2, 16, 2)
    a = torch_ref.sampler_step(x, eps, ns.coefs, 5, None, 1.0)
    b = torch_ref.sampler_step(x, eps, ns.coefs, torch.tensor(5), None, 1.0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_q_sample_matches_diffusers_add_noise():
    cfg = SchedulerConfig()
    ns, ref = NoiseSchedule(cfg), oracle(cfg)
    x0, noise = torch.randn(64, 16, 2), torch.randn(64, 16, 2)
    t = torch.randint(0, T, (64,))
    ours = torch_ref.q_sample(x0, noise, t, ns.sqrt_alphas_cumprod, ns.sqrt_one_minus_alphas_cumprod)
    torch.testing.assert_close(ours, ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)
