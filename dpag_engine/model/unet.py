"""The noise predictor: Diffusion Policy's conditional 1-D temporal U-Net with FiLM (docs/method.md §3)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import UNetConfig


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(10000.0) / (half - 1)))
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class Conv1dBlock(nn.Sequential):
    """Conv1d (same length) -> GroupNorm -> Mish."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, n_groups: int):
        super().__init__(nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
                         nn.GroupNorm(n_groups, c_out), nn.Mish())


class ConditionalResidualBlock1D(nn.Module):
    """conv block -> FiLM -> conv block, plus a residual (1x1 conv when widths differ).

    FiLM is `scale * h + bias` with [scale, bias] = Linear(Mish(cond)) (`cond_encoder`), broadcast
    over time. The latent reaches the U-Net only through these sites, which is what the fused VJP
    kernel and the precomputed per-timestep FiLM terms exploit.
    """

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.out_channels = c_out
        self.blocks = nn.ModuleList([Conv1dBlock(c_in, c_out, kernel_size, n_groups),
                                     Conv1dBlock(c_out, c_out, kernel_size, n_groups)])
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.residual_conv = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        """film: (B, 2 C_out), this block's [scale, bias]."""
        scale, bias = film.unsqueeze(-1).chunk(2, dim=1)
        h = scale * self.blocks[0](x) + bias
        return self.blocks[1](h) + self.residual_conv(x)


class ConditionalUnet1D(nn.Module):
    """eps_theta(a_k, k, global_cond): (B, H, Da) x (B,) x (B, G) -> (B, H, Da)."""

    def __init__(self, action_dim: int, global_cond_dim: int, cfg: UNetConfig):
        super().__init__()
        dsed, k, groups = cfg.diffusion_step_embed_dim, cfg.kernel_size, cfg.n_groups
        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalPosEmb(dsed), nn.Linear(dsed, 4 * dsed), nn.Mish(), nn.Linear(4 * dsed, dsed))
        cond_dim = dsed + global_cond_dim
        widths = [action_dim, *cfg.down_dims]
        levels = list(zip(widths[:-1], widths[1:]))

        def block(c_in: int, c_out: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(c_in, c_out, cond_dim, k, groups)

        # Down: two residual blocks per level, then halve the time axis (not at the last level).
        self.down_modules = nn.ModuleList(
            nn.ModuleList([block(c_in, c_out), block(c_out, c_out),
                           nn.Conv1d(c_out, c_out, 3, stride=2, padding=1) if i < len(levels) - 1 else nn.Identity()])
            for i, (c_in, c_out) in enumerate(levels))
        mid = cfg.down_dims[-1]
        self.mid_modules = nn.ModuleList([block(mid, mid), block(mid, mid)])
        # Up: concatenate the skip, two residual blocks, then double the time axis. There is one up
        # level fewer than down levels, so every up level upsamples (as in Diffusion Policy).
        self.up_modules = nn.ModuleList(
            nn.ModuleList([block(2 * c_out, c_in), block(c_in, c_in),
                           nn.ConvTranspose1d(c_in, c_in, 4, stride=2, padding=1)])
            for c_in, c_out in reversed(levels[1:]))
        start = cfg.down_dims[0]
        self.final_conv = nn.Sequential(Conv1dBlock(start, start, k, groups), nn.Conv1d(start, action_dim, 1))

    def residual_blocks(self) -> list[ConditionalResidualBlock1D]:
        """Every FiLM site, in forward order."""
        return [m for m in self.modules() if isinstance(m, ConditionalResidualBlock1D)]

    def film_params(self, timestep: torch.Tensor | int, global_cond: torch.Tensor) -> list[torch.Tensor]:
        """Every site's [scale, bias] (B, 2 C_b), in forward order."""
        t = torch.as_tensor(timestep, device=global_cond.device)
        t = t.expand(global_cond.shape[0]) if t.dim() == 0 else t
        cond = torch.cat([self.diffusion_step_encoder(t), global_cond], dim=-1)
        return [block.cond_encoder(cond) for block in self.residual_blocks()]

    def forward_with_film(self, sample: torch.Tensor, films: list[torch.Tensor]) -> torch.Tensor:
        """The U-Net body given every site's FiLM parameters (from `film_params` or precomputed)."""
        films = iter(films)
        x = sample.transpose(1, 2)  # (B, Da, H): channels-first for Conv1d
        skips = []
        for res1, res2, down in self.down_modules:
            x = res2(res1(x, next(films)), next(films))
            skips.append(x)
            x = down(x)
        for res in self.mid_modules:
            x = res(x, next(films))
        for res1, res2, up in self.up_modules:
            x = torch.cat([x, skips.pop()], dim=1)
            x = up(res2(res1(x, next(films)), next(films)))
        return self.final_conv(x).transpose(1, 2)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, global_cond: torch.Tensor) -> torch.Tensor:
        return self.forward_with_film(sample, self.film_params(timestep, global_cond))
