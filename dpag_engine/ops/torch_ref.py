"""Plain-PyTorch reference of every dispatched op: readable, differentiable, the test oracle."""
from __future__ import annotations

import torch

from ..diffusion import C_EPS, C_X, C_X0, IN_S1MA, IN_SA, R_EPS, R_X, STD


def sampler_step(sample: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor,
                 step: int | torch.Tensor, noise: torch.Tensor | None = None,
                 clip: float | None = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDPM/DDIM step from the (K, 6) table of `dpag_engine.diffusion`; `step` may be a device scalar."""
    row = coefs[step].to(sample.dtype)
    x0 = row[R_X] * sample - row[R_EPS] * eps
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    prev = row[C_X0] * x0 + row[C_X] * sample + row[C_EPS] * eps
    if noise is not None:
        prev = prev + row[STD] * noise
    return prev, x0


def inpaint(sample: torch.Tensor, prefix: torch.Tensor, prefix_noise: torch.Tensor,
            prefix_weight: torch.Tensor, inpaint_coefs: torch.Tensor, step: int | torch.Tensor,
            start: int) -> torch.Tensor:
    """Real-time-chunking inpainting of a sample that a sampler step just produced (out of place).

    Rows start .. start+W-1 of sample (B, H, Da) become w * target + (1 - w) * sample with
    target = sqrt(a) prefix + sqrt(1 - a) prefix_noise[step], (sqrt(a), sqrt(1 - a)) =
    inpaint_coefs[step] (the level the step landed on), prefix (B, W, Da), prefix_noise (K, B, W, Da),
    prefix_weight (W,). A weight of 1 writes the target exactly (1 * t + 0 * x == t).
    """
    row = inpaint_coefs[step].to(sample.dtype)
    target = row[IN_SA] * prefix + row[IN_S1MA] * prefix_noise[step].to(sample.dtype)
    w = prefix_weight.to(sample.dtype).view(-1, 1)
    end = start + prefix.shape[1]
    out = sample.clone()
    out[:, start:end] = w * target + (1 - w) * sample[:, start:end]
    return out


def sampler_step_inpaint(sample: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor,
                         step: int | torch.Tensor, noise: torch.Tensor | None, clip: float | None,
                         prefix: torch.Tensor, prefix_noise: torch.Tensor, prefix_weight: torch.Tensor,
                         inpaint_coefs: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`sampler_step`, then `inpaint` of its prev_sample (x0 is the model's, not inpainted)."""
    prev, x0 = sampler_step(sample, eps, coefs, step, noise, clip)
    return inpaint(prev, prefix, prefix_noise, prefix_weight, inpaint_coefs, step, start), x0


def q_sample(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
             sqrt_ac: torch.Tensor, sqrt_1m_ac: torch.Tensor) -> torch.Tensor:
    """Forward noising x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, t of shape (B,)."""
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return sqrt_ac[t].view(shape).to(x0.dtype) * x0 + sqrt_1m_ac[t].view(shape).to(x0.dtype) * noise


def unet_force(unet: torch.nn.Module, sample: torch.Tensor, t: torch.Tensor,
               global_cond: torch.Tensor) -> torch.Tensor:
    """g = (d eps / d global_cond)^T eps: one forward, then an activation-only backward (no weight
    gradients are requested, so autograd computes none)."""
    with torch.enable_grad():
        cond = global_cond.detach().requires_grad_(True)
        eps = unet(sample.detach(), t, cond)
        (g,) = torch.autograd.grad(0.5 * eps.square().sum(), cond)
    return g


def normalized_force(g: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Unit-L2 normalisation over the feature (last) dim, eps 1e-6 as in the released code."""
    return g / (g.norm(dim=-1, keepdim=True) + 1e-6) if normalize else g


def em_step(z: torch.Tensor, g: torch.Tensor, log_var: torch.Tensor, gamma: float, dt: float,
            eta: float, normalize: bool, xi: torch.Tensor | None = None) -> torch.Tensor:
    """One Euler-Maruyama step z + gamma sigma n(g) dt + eta sigma sqrt(dt) xi (docs/method.md §5).

    `g` is treated as a constant (detached), as in the method. `xi` are the Brownian draws, N(0, I)
    shaped like z, needed only when eta > 0: the caller draws them (one generator owns every random
    number of a plan), so every backend steps with the same numbers.
    """
    check_brownian(z, eta, xi)
    sigma = torch.exp(0.5 * log_var)
    z = z + gamma * dt * sigma * normalized_force(g.detach(), normalize)
    if eta > 0:
        z = z + eta * (dt ** 0.5) * sigma * xi.to(z.dtype)
    return z


def check_brownian(z: torch.Tensor, eta: float, xi: torch.Tensor | None) -> None:
    if eta > 0 and (xi is None or tuple(xi.shape) != tuple(z.shape)):
        got = None if xi is None else tuple(xi.shape)
        raise ValueError(f"em_step: eta > 0 needs xi, the Brownian draws shaped like z {tuple(z.shape)}, got {got}")
