"""The exponential moving average of the weights (Diffusion Policy's EMAModel): what is evaluated and served."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Diffusion Policy's EMAModel: decay = 1 - (1 + step / inv_gamma) ** -power, capped at max_decay.

    The first update copies the weights (decay 0). Buffers (normaliser statistics) are copied.
    """

    def __init__(self, model: nn.Module, power: float = 0.75, max_decay: float = 0.9999,
                 inv_gamma: float = 1.0, update_after_step: int = 0):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.power, self.max_decay, self.inv_gamma, self.update_after_step = power, max_decay, inv_gamma, update_after_step
        self.step = 0

    def decay(self) -> float:
        step = max(0, self.step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        return max(0.0, min(1 - (1 + step / self.inv_gamma) ** -self.power, self.max_decay))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay()
        ema_params, params = [], []
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            if p.requires_grad:
                ema_params.append(ema_p)
                params.append(p.detach())
            else:
                ema_p.copy_(p)
        if ema_params:  # ema = d * ema + (1 - d) * p, in the same two ops as DP (bitwise reproducible)
            torch._foreach_mul_(ema_params, d)
            torch._foreach_add_(ema_params, params, alpha=1 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)
        self.step += 1
