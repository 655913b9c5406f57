"""The action-guided latent update (docs/method.md §5).

The force on the latent is the vector-Jacobian product g = (d eps / d z)^T eps, i.e. the gradient of
0.5 ||eps||^2 w.r.t. z. Only activation gradients are needed: `torch.autograd.grad` w.r.t. z alone
skips every weight gradient, so the VJP costs about one forward.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .config import LatentUpdateConfig


def vjp_force(eps: torch.Tensor, z: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
    """g = (d eps / d z)^T eps for a graph eps(z) already computed; one activation-only backward."""
    (g,) = torch.autograd.grad(0.5 * eps.square().sum(), z, retain_graph=retain_graph)
    return g


def force_at(unet: nn.Module, a_k: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The force at latent z (B, To, Do) for the noisy actions a_k: a fresh forward plus its VJP,
    through the selected backend (the triton one fuses the conditioning part of the backward)."""
    return ops.unet_force(unet, a_k, t, z.flatten(1)).view_as(z)


def latent_update(unet: nn.Module, a_k: torch.Tensor, t: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor,
                  cfg: LatentUpdateConfig, xi: torch.Tensor | None = None,
                  first_force: torch.Tensor | None = None) -> torch.Tensor:
    """Euler-Maruyama from z_0 = mu over cfg.steps steps; `first_force` reuses g(mu) if the caller has it.

    xi: the Brownian draws (S, *mu.shape), N(0, I), when cfg.eta > 0 (`draw_latent_noise`). The force
    is re-evaluated at every z_s. The result is differentiable w.r.t. mu and log_var (the forces are
    constants, as in the method).
    """
    z = mu
    for s in range(cfg.steps):
        g = first_force if (s == 0 and first_force is not None) else force_at(unet, a_k, t, z)
        z = ops.em_step(z, g, log_var, cfg.gamma, cfg.dt, cfg.eta, cfg.normalize, None if xi is None else xi[s])
    return z


def draw_latent_noise(cfg: LatentUpdateConfig, z_shape: tuple[int, ...], generator: torch.Generator | None,
                      steps: int = 1, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The Brownian draws of `steps` latent updates, (steps, S, *z_shape); None when eta = 0 (no draw,
    so a deterministic update leaves the caller's generator untouched)."""
    if cfg.eta <= 0:
        return None
    return torch.randn((steps, cfg.steps, *z_shape), generator=generator, device=device, dtype=dtype)
