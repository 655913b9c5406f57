"""Min/max normalisation of actions and low-dim observations to [-1, 1] (docs/method.md §1).

The statistics are buffers of the policy, so they travel inside every checkpoint and the model
always sees exactly the scaling it was trained with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# A dimension that never moves in the data (range below this) maps to 0 instead of dividing by ~0.
MIN_RANGE = 1e-4


class Normalizer(nn.Module):
    """Per-key, per-dimension affine map x -> 2 (x - min) / (max - min) - 1."""

    def __init__(self, dims: dict[str, int]):
        super().__init__()
        self.keys = tuple(dims)
        for key, dim in dims.items():
            # Until fitted the map is the identity on [-1, 1]; `is_fitted` says whether it was fitted.
            self.register_buffer(f"{key}_min", -torch.ones(dim))
            self.register_buffer(f"{key}_max", torch.ones(dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    def fit(self, data: dict[str, torch.Tensor]) -> None:
        """Fit every key from samples shaped (..., dim); all keys must be given."""
        missing = set(self.keys) - set(data)
        if missing:
            raise KeyError(f"normalizer.fit: missing data for {sorted(missing)}")
        for key in self.keys:
            x = torch.as_tensor(data[key], dtype=torch.float32)
            x = x.reshape(-1, x.shape[-1])
            lo, hi = getattr(self, f"{key}_min"), getattr(self, f"{key}_max")
            if x.shape[-1] != lo.numel():
                raise ValueError(f"normalizer.fit: {key} has {x.shape[-1]} dims, expected {lo.numel()}")
            if not torch.isfinite(x).all():
                raise ValueError(f"normalizer.fit: {key} contains NaN or inf")
            lo.copy_(x.min(dim=0).values)
            hi.copy_(x.max(dim=0).values)
        self.fitted.fill_(True)

    def affine(self, key: str, dtype: torch.dtype | None = None) -> "Affine":
        """The map of `key` as (scale, offset), detached: what runtimes that normalise outside
        torch (the C++ engine, exported graphs) are given."""
        lo, hi = getattr(self, f"{key}_min"), getattr(self, f"{key}_max")
        span = hi - lo
        scale = torch.where(span > MIN_RANGE, 2.0 / span.clamp(min=MIN_RANGE), torch.ones_like(span))
        offset = torch.where(span > MIN_RANGE, -1.0 - lo * scale, -(hi + lo) / 2)
        dtype = dtype or lo.dtype
        return Affine(scale.detach().to(dtype), offset.detach().to(dtype))

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        return self.affine(key, x.dtype).forward(x)

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        return self.affine(key, x.dtype).inverse(x)


@dataclass(frozen=True)
class Affine:
    """x -> x * scale + offset per (last) dimension, and back."""
    scale: torch.Tensor
    offset: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x) + self.offset.to(x)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.offset.to(x)) / self.scale.to(x)


def inverted_ranges(state: dict[str, torch.Tensor], prefix: str = "normalizer.") -> dict[str, list[int]]:
    """{"<prefix><key>_min": dims where min > max} over a state dict's normaliser buffers. `fit` never
    produces such a range, and `affine` would treat it as a constant dimension (no scaling)."""
    out = {}
    for name, lo in state.items():
        hi = state.get(name[:-len("_min")] + "_max")
        if name.startswith(prefix) and name.endswith("_min") and isinstance(hi, torch.Tensor) and hi.shape == lo.shape:
            dims = torch.nonzero(lo > hi).flatten().tolist()
            if dims:
                out[name] = dims
    return out
