"""DDPM / DDIM noise schedules and samplers (docs/method.md §4), in plain PyTorch.

Every sampler step, DDPM or DDIM, with or without re-derived epsilon, is the same affine map

    x0      = r_x * x_t - r_eps * eps                 (epsilon parameterisation)
    x0      = clamp(x0, -clip, clip)                  (optional)
    x_prev  = c_x0 * x0 + c_x * x_t + c_eps * eps + std * noise

with six scalars per step. They are computed here once, in float64, into a (K, 6) table that lives
on the device. The step itself (`dpag_engine.ops.sampler_step`) then needs no host-side scalars, so a
whole K-step loop can be captured in a CUDA graph, and the C++ and Triton steps are one formula.
The numbers match `diffusers`' DDPMScheduler / DDIMScheduler (tests use it as the oracle).
"""
from __future__ import annotations

import math

import torch

from .config import SchedulerConfig

# Column order of the per-step coefficient table.
R_X, R_EPS, C_X0, C_X, C_EPS, STD = range(6)
NUM_COEFS = 6
# Column order of the (K, 2) inpainting table (real-time chunking, see `inpaint_coefficients`).
IN_SA, IN_S1MA = range(2)


def make_betas(cfg: SchedulerConfig) -> torch.Tensor:
    """Float64 betas for T training steps (diffusers' definitions)."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
    # squaredcos_cap_v2: alpha_bar(t) = cos^2(((t + 0.008) / 1.008) * pi / 2), beta capped at 0.999.
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                        dtype=torch.float64)


def make_alphas_cumprod(cfg: SchedulerConfig) -> torch.Tensor:
    """Float64 cumulative products of (1 - beta). diffusers rounds betas to float32 first; so do we,
    so that our tables agree with the oracle to float64 precision rather than float32."""
    betas = make_betas(cfg).to(torch.float32).to(torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def sampler_timesteps(cfg: SchedulerConfig) -> torch.Tensor:
    """Training-time indices visited at inference, in order (diffusers' 'leading' spacing for DDIM)."""
    T = cfg.num_train_timesteps
    if cfg.sampler == "ddpm":
        return torch.arange(T - 1, -1, -1, dtype=torch.long)
    ratio = T // cfg.num_inference_steps
    return torch.arange(cfg.num_inference_steps - 1, -1, -1, dtype=torch.long) * ratio


def sampler_coefficients(cfg: SchedulerConfig) -> torch.Tensor:
    """The (K, 6) float64 table of the affine step above, one row per inference step."""
    ac = make_alphas_cumprod(cfg)
    T = cfg.num_train_timesteps
    timesteps = sampler_timesteps(cfg)
    stride = 1 if cfg.sampler == "ddpm" else T // cfg.num_inference_steps
    rows = []
    for t in timesteps.tolist():
        a_t = ac[t]
        a_prev = ac[t - stride] if t - stride >= 0 else torch.tensor(1.0, dtype=torch.float64)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        r_x, r_eps = 1 / a_t.sqrt(), b_t.sqrt() / a_t.sqrt()
        # Posterior variance of x_prev given (x_t, x0): the DDPM "fixed_small" variance.
        var = (b_prev / b_t * (1 - a_t / a_prev))
        if cfg.sampler == "ddpm":
            alpha_t = a_t / a_prev
            c_x0, c_x, c_eps = a_prev.sqrt() * (1 - alpha_t) / b_t, alpha_t.sqrt() * b_prev / b_t, 0.0
            std = var.clamp(min=1e-20).sqrt() if t > 0 else torch.tensor(0.0, dtype=torch.float64)
        else:
            std = cfg.eta * var.sqrt()
            direction = (b_prev - std ** 2).clamp(min=0).sqrt()  # weight of epsilon in x_prev
            if cfg.use_clipped_eps:
                # eps' = (x_t - sqrt(a_t) x0_clipped) / sqrt(1 - a_t), folded into the x and x0 terms.
                c_x0, c_x, c_eps = a_prev.sqrt() - direction * a_t.sqrt() / b_t.sqrt(), direction / b_t.sqrt(), 0.0
            else:
                c_x0, c_x, c_eps = a_prev.sqrt(), 0.0, direction
        rows.append([float(r_x), float(r_eps), float(c_x0), float(c_x), float(c_eps), float(std)])
    return torch.tensor(rows, dtype=torch.float64)


def inpaint_coefficients(cfg: SchedulerConfig) -> torch.Tensor:
    """The (K, 2) float64 table (sqrt(a_prev), sqrt(1 - a_prev)) of the noise level a step LANDS on.

    Real-time chunking (dpag_engine/rtc.py) replaces the committed prefix of the sample after step k
    with q_sample(prefix, t_prev_k): the level the step produced, i.e. the level step k+1 reads
    (row k+1's a_t), and a_prev = 1 (the clean prefix itself) after the last step. Same a_prev as
    `sampler_coefficients`, rounded to float32 the same way as `NoiseSchedule.sqrt_alphas_cumprod`.
    """
    ac = make_alphas_cumprod(cfg)
    stride = 1 if cfg.sampler == "ddpm" else cfg.num_train_timesteps // cfg.num_inference_steps
    rows = []
    for t in sampler_timesteps(cfg).tolist():
        a_prev = ac[t - stride] if t - stride >= 0 else torch.tensor(1.0, dtype=torch.float64)
        rows.append([float(a_prev.sqrt()), float((1 - a_prev).sqrt())])
    return torch.tensor(rows, dtype=torch.float64)


class NoiseSchedule(torch.nn.Module):
    """Device-resident tables for training (q_sample) and for one inference sampler.

    Buffers are float32 (what the model computes in); the float64 originals are one call away.
    """

    def __init__(self, cfg: SchedulerConfig):
        super().__init__()
        self.cfg = cfg
        ac = make_alphas_cumprod(cfg)
        self.register_buffer("sqrt_alphas_cumprod", ac.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - ac).sqrt().float(), persistent=False)
        self.register_buffer("timesteps", sampler_timesteps(cfg), persistent=False)
        self.register_buffer("coefs", sampler_coefficients(cfg).float(), persistent=False)
        self.register_buffer("inpaint_coefs", inpaint_coefficients(cfg).float(), persistent=False)

    @property
    def clip(self) -> float | None:
        return self.cfg.clip_sample_range if self.cfg.clip_sample else None

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())
