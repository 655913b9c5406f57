"""Observation encoders and the Gaussian posterior q(z | o) (docs/method.md §2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ImageEncoderConfig, PolicyConfig


def group_norm(channels: int) -> nn.GroupNorm:
    # GroupNorm instead of BatchNorm: statistics per sample, so training with EMA weights and
    # inference at batch 1 behave the same (Diffusion Policy's choice). Groups = C / 16.
    return nn.GroupNorm(channels // 16, channels)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = group_norm(c_out)
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), group_norm(c_out))
                         if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(h)) + self.shortcut(x))


class ResNet18Trunk(nn.Sequential):
    """ResNet-18 without its pooling and classifier: (N, C, H, W) -> (N, 512, H/32, W/32)."""

    def __init__(self, in_channels: int = 3):
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), group_norm(64),
                                   nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        c = 64
        for width, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [BasicBlock(c, width, stride), BasicBlock(width, width, 1)]
            c = width
        super().__init__(*layers)


class SmallTrunk(nn.Sequential):
    """A CPU-sized trunk: four 3x3 convolutions (stride 2, 2, 1, 1), GroupNorm + ReLU:
    (N, C, H, W) -> (N, 64, H/4, W/4). At 64x64 it keeps a 16x16 map, fine enough for the spatial
    softmax to place a goal marker to a pixel; ~0.1 M parameters against ResNet-18's 11 M."""

    channels = 64

    def __init__(self, in_channels: int = 3):
        layers: list[nn.Module] = []
        c = in_channels
        for width, stride in [(32, 2), (32, 2), (64, 1), (64, 1)]:
            layers += [nn.Conv2d(c, width, 3, stride, 1, bias=False), group_norm(width), nn.ReLU()]
            c = width
        super().__init__(*layers)


class SpatialSoftmax(nn.Module):
    """Keypoints as the softmax-weighted mean (x, y) of learned 1x1-conv heat maps, in [-1, 1]."""

    def __init__(self, channels: int, num_keypoints: int):
        super().__init__()
        self.heatmaps = nn.Conv2d(channels, num_keypoints, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        attention = self.heatmaps(x).flatten(2).softmax(dim=-1)            # (N, K, H*W)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype),
                                torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype), indexing="ij")
        grid = torch.stack([xs.flatten(), ys.flatten()], dim=-1)           # (H*W, 2)
        return (attention @ grid).flatten(1)                               # (N, 2K)


def crop(images: torch.Tensor, size: tuple[int, int], random: bool,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (one offset per image) in training, centre crop in evaluation."""
    n, _, h, w = images.shape
    ch, cw = size
    if (ch, cw) == (h, w):
        return images
    if not random:
        top, left = (h - ch) // 2, (w - cw) // 2
        return images[:, :, top:top + ch, left:left + cw]
    tops = torch.randint(0, h - ch + 1, (n,), generator=generator, device=images.device)
    lefts = torch.randint(0, w - cw + 1, (n,), generator=generator, device=images.device)
    rows = tops[:, None] + torch.arange(ch, device=images.device)          # (N, ch)
    cols = lefts[:, None] + torch.arange(cw, device=images.device)         # (N, cw)
    idx = torch.arange(n, device=images.device)[:, None, None, None]
    chan = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return images[idx, chan, rows[:, None, :, None], cols[:, None, None, :]]


class CameraEncoder(nn.Module):
    """One camera: crop -> trunk (ResNet-18 or the small CNN, GroupNorm) -> spatial softmax -> Linear."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.crop_shape = cfg.crop_shape
        if cfg.backbone == "small":
            self.trunk, channels = SmallTrunk(cfg.image_shape[0]), SmallTrunk.channels
        else:
            self.trunk, channels = ResNet18Trunk(cfg.image_shape[0]), 512
        self.keypoints = SpatialSoftmax(channels, cfg.num_keypoints)
        self.project = nn.Linear(2 * cfg.num_keypoints, cfg.feature_dim)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = crop(images, self.crop_shape, random=self.training, generator=generator)
        # NHWC: oneDNN's CPU convolutions (and cuDNN's tensor-core ones) run it natively; on a
        # 2-core CPU the small trunk's forward + backward at 128 x 84 x 84 drops from 283 to 211 ms.
        x = x.contiguous(memory_format=torch.channels_last)
        return self.project(self.keypoints(self.trunk(x)))


class ObservationEncoder(nn.Module):
    """obs dict -> per-step features (B, To, Do): camera features (in config order), then state."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.image_cfg = cfg.image
        self.cameras = nn.ModuleDict(
            {} if cfg.image is None else {name: CameraEncoder(cfg.image) for name in cfg.image.cameras})
        self.state_dim = cfg.state_dim

    def forward(self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        parts = []
        for name, encoder in self.cameras.items():
            images = obs[name]
            b, to = images.shape[:2]
            parts.append(encoder(images.flatten(0, 1), generator).view(b, to, -1))
        if self.state_dim > 0:
            parts.append(obs["state"])
        return torch.cat(parts, dim=-1)


class GaussianPosterior(nn.Module):
    """q(z | o) = N(mu, sigma^2) with z of the feature size Do.

    "identity" (released code): mu = features, log_var = Linear(features).
    "mlp" (the paper's figure): a shared hidden layer, then separate mu and log_var heads.
    log_var is clamped to [-10, 2] in both.
    """

    def __init__(self, dim: int, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "identity":
            self.log_var = nn.Linear(dim, dim)
        else:
            self.hidden = nn.Sequential(nn.Linear(dim, dim), nn.Mish())
            self.mu = nn.Linear(dim, dim)
            self.log_var = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "identity":
            return features, self.log_var(features).clamp(-10.0, 2.0)
        h = self.hidden(features)
        return self.mu(h), self.log_var(h).clamp(-10.0, 2.0)
