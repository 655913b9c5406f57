"""The learning-rate schedule: linear warm-up, then cosine to 0 at the last step or constant."""
from __future__ import annotations

import math

import torch

from .config import TrainConfig


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """diffusers' get_cosine_schedule_with_warmup (what DP uses), or constant after warm-up."""
    if step < cfg.warmup_steps:
        return step / max(1, cfg.warmup_steps)
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` as a scheduler, stepped once per optimiser step. A lambda, not a callable object,
    so the scheduler's state dict (saved in training_state.pt) holds no function state."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
