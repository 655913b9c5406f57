"""DP-AG training losses (docs/method.md §6)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_loss(eps_pred: torch.Tensor, noise: torch.Tensor, target_scale: float = 1.0) -> torch.Tensor:
    """L_diff = mean((eps - target_scale * noise)^2); the released code uses target_scale = 1/0.4."""
    return F.mse_loss(eps_pred, noise * target_scale)


def info_nce(eps_static: torch.Tensor, eps_guided: torch.Tensor, tau: float) -> torch.Tensor:
    """Contrastive loss: row i of the static batch should match row i of the guided batch.

    logits[i, j] = cos(eps_static_i, eps_guided_j) / tau, cross-entropy with target i.
    """
    a = F.normalize(eps_static.flatten(1), dim=-1)
    b = F.normalize(eps_guided.flatten(1), dim=-1)
    logits = a @ b.T / tau
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


def kl_to_unit_gaussian(mu: torch.Tensor, log_var: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """mean over elements of KL(N(mu, exp(log_var)) || N(center, 1)); center None is N(0, 1) (the
    released code's prior), center = the observation's features is the paper's N(z, I)."""
    d = mu if center is None else mu - center
    return torch.mean(-0.5 * (1 + log_var - d.square() - log_var.exp()))
