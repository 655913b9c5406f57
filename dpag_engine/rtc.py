"""Real-time chunking (RTC): plan chunk n+1 while chunk n executes, consistent with what is committed.

A plan takes d seconds. The observation of plan n+1 is taken at t_obs; its chunk cannot start before
t_obs + d, so the actions due in [t_obs, t_obs + d) still come from chunk n: they are committed.
The sampler is told so by inpainting (`Planner.predict_action(..., prefix=, prefix_weight=)` on any
runtime): after every denoising step the committed rows of the
noisy sample are replaced by the committed actions forward-noised to the level the step landed on,
so the rest of the chunk is denoised around them and continues them instead of jumping.

Grid convention. The new chunk's action grid has index 0 at the first action the plan would execute,
horizon index n_obs_steps - 1 of the prediction (the action at the current step, see docs/method.md §7),
with one action per dt. A prefix row j is inpainted into horizon index n_obs_steps - 1 + j.
Horizon indices before n_obs_steps - 1 (the "past" actions DP predicts alongside) are never
inpainted: they are never executed, and the caller would need the executed history to fill them
(not available at the first plan, and different from chunk n's own past rows).

Weights. Rows with weight 1 are hard-inpainted (and equal the committed actions at the end, up to the
sampler's clip of normalised actions to [-clip, clip]); rows with weight w in (0, 1) are blended,
x = w * noised + (1 - w) * x, e.g. chunk n's actions right after the committed ones, with a weight
that decays (`prefix_weights`): the new plan is pulled towards the old one where they overlap,
but less and less, as in Black et al. 2025 ("Real-Time Execution of Action Chunking Flow Policies").
Use the soft rows: hard replacement alone constrains the committed rows but does not harmonise the
rest of the chunk with them (the known weakness of replacement inpainting; the mode of a chunk is
decided in the first, noisiest steps, where a few noised rows carry little evidence). Measured on a
policy with 8 equally likely constant-chunk modes (tests/test_rtc.py, H=16, DDIM 8 steps, mean
normalised boundary jump): no RTC 1.39; 3 hard rows 1.09; 8 hard rows 0.09; 3 hard + 8 soft 0.004.

Holding the mode. Inpainting pulls the new chunk towards chunk n, but where the demonstrations split
(round an obstacle left or right) one sample in a few still switches side mid-way, and a chunk that
switches near the obstacle clips it. `most_coherent` is the second guard, backward coherence from
Liu et al. 2025 ("Bidirectional Decoding"): sample K chunks for the same observation in one batch and
keep the one closest to chunk n where they overlap. Measured on the demo's reach policy in
bench/rtc_delay.py (bench/RTC.md, 400 served-goal episodes, 100 ms delay, 5 Hz planning): jerk
3.2 -> 2.1 rad/s^3 with RTC, 15.6 -> 7.1 without; collisions were 0 of 400 either way there.

Helpers here: `committed_prefix` (the prefix from chunk n's timeline), `prefix_weights`, the input
check shared by every backend (`check_prefix`), `most_coherent`, and `DelayEstimator` (a high
quantile of recent plan latencies, the d to plan for).
"""
from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple

import torch

_TOL = 1e-6  # in units of dt: times closer than this to a grid point are on it


class CommittedPrefix(NamedTuple):
    actions: torch.Tensor   # (B, P + S, Da) or (P + S, Da), raw; row 0 = first action of the new chunk
    weights: torch.Tensor   # (P + S,) float32: 1 for the P committed rows, then the soft decay
    n_committed: int        # P


def prefix_weights(n_committed: int, soft_steps: int = 0) -> torch.Tensor:
    """(P + s,) float32: P ones, then s weights decaying linearly from 1 to 0 (exclusive at both ends):
    w_j = 1 - (j + 1) / (s + 1) for the j-th soft row."""
    if n_committed < 0 or soft_steps < 0:
        raise ValueError(f"prefix_weights: counts must be >= 0, got {n_committed}, {soft_steps}")
    soft = [1.0 - (j + 1) / (soft_steps + 1) for j in range(soft_steps)]
    return torch.tensor([1.0] * n_committed + soft, dtype=torch.float32)


def committed_prefix(prev_actions: torch.Tensor, t_prev_first: float, dt: float, t_now_obs: float,
                     delay_s: float, soft_steps: int = 0, max_len: int | None = None) -> CommittedPrefix:
    """The actions of the previous chunk that execute while the next one is planned.

    prev_actions: (N, Da) or (B, N, Da) raw actions of the executing chunk; its row j is due at
    t_prev_first + j * dt. The new chunk's row i is due at t_now_obs + i * dt and can only be taken
    from the new plan once it exists, at t_now_obs + delay_s: rows with t_now_obs + i dt < t_now_obs +
    delay_s, i.e. i < delay_s / dt, are committed, P = ceil(delay_s / dt) of them (as many as the
    previous chunk still has). Row i reads the previous chunk at (t_now_obs - t_prev_first) / dt + i,
    linearly interpolated when the observation time is off the previous chunk's grid.

    soft_steps: also return up to this many of the previous chunk's next rows, with weights decaying
    from 1 to 0 (`prefix_weights`); max_len: cap on P + S (the chunk length from n_obs_steps - 1;
    soft rows are dropped first, a P above it is a ValueError).
    """
    if not isinstance(prev_actions, torch.Tensor) or prev_actions.dim() not in (2, 3):
        raise ValueError(f"prev_actions: expected a (N, Da) or (B, N, Da) tensor, got "
                         f"{tuple(prev_actions.shape) if isinstance(prev_actions, torch.Tensor) else type(prev_actions).__name__}")
    if not dt > 0 or not delay_s >= 0 or soft_steps < 0:
        raise ValueError(f"committed_prefix: need dt > 0, delay_s >= 0, soft_steps >= 0; got {dt}, {delay_s}, {soft_steps}")
    n_prev = prev_actions.shape[-2]
    offset = (t_now_obs - t_prev_first) / dt          # previous-chunk index of the new row 0
    if offset < -_TOL:
        raise ValueError(f"committed_prefix: t_now_obs={t_now_obs} is before the previous chunk's first "
                         f"action (t_prev_first={t_prev_first})")
    available = max(0, math.floor(n_prev - 1 - offset + _TOL) + 1)  # rows i with offset + i <= N - 1
    p = min(max(0, math.ceil(delay_s / dt - _TOL)), available)
    s = min(soft_steps, available - p)
    if max_len is not None:
        if p > max_len:
            raise ValueError(f"committed_prefix: {p} committed actions (delay {delay_s} s at dt {dt} s) "
                             f"exceed max_len={max_len}")
        s = min(s, max_len - p)
    idx = offset + torch.arange(p + s, dtype=torch.float64)
    lo = idx.floor()
    near = (idx - idx.round()).abs() <= _TOL
    lo = torch.where(near, idx.round(), lo).long().clamp(0, max(n_prev - 1, 0))
    hi = (lo + 1).clamp(max=max(n_prev - 1, 0))
    frac = torch.where(near, torch.zeros_like(idx), idx - idx.floor()).to(prev_actions.dtype)
    a_lo, a_hi = prev_actions.index_select(-2, lo), prev_actions.index_select(-2, hi)
    actions = a_lo + frac.unsqueeze(-1) * (a_hi - a_lo)
    return CommittedPrefix(actions, prefix_weights(p, soft_steps)[:p + s], p)


def check_prefix(prefix, prefix_weight, *, batch: int, action_dim: int,
                 max_len: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Validate a prefix and its weights; returns None for "no inpainting" (prefix None or P = 0),
    else (prefix (B, P, Da), weights (P,) float32). Bad input raises ValueError naming the argument."""
    if prefix is None:
        if prefix_weight is not None:
            raise ValueError("prefix_weight: given without a prefix")
        return None
    if not isinstance(prefix, torch.Tensor) or prefix.dim() != 3 or prefix.shape[0] != batch \
            or prefix.shape[2] != action_dim:
        got = tuple(prefix.shape) if isinstance(prefix, torch.Tensor) else type(prefix).__name__
        raise ValueError(f"prefix: expected shape ({batch}, P, {action_dim}) (committed raw actions from the "
                         f"first executed one on), got {got}")
    if not prefix.is_floating_point():
        raise ValueError(f"prefix: expected a floating tensor, got {prefix.dtype}")
    p = prefix.shape[1]
    if p > max_len:
        raise ValueError(f"prefix: {p} actions do not fit the {max_len} horizon rows from n_obs_steps - 1 on")
    if not torch.isfinite(prefix).all():
        raise ValueError("prefix: contains NaN or inf")
    if prefix_weight is None:
        weight = torch.ones(p, dtype=torch.float32)
    else:
        weight = torch.as_tensor(prefix_weight, dtype=torch.float32).detach().cpu()
        if tuple(weight.shape) != (p,):
            raise ValueError(f"prefix_weight: expected shape ({p},) (one weight per prefix row), got {tuple(weight.shape)}")
        if not torch.isfinite(weight).all() or (weight < 0).any() or (weight > 1).any():
            raise ValueError("prefix_weight: weights must be finite and in [0, 1]")
    if p == 0:
        return None
    return prefix, weight


def most_coherent(candidates, reference) -> int:
    """The index of the candidate chunk closest to `reference` where they overlap.

    candidates: (K, N, Da) chunks sampled for one observation; reference: (M, Da) the executing chunk
    on the same grid (row 0 = the candidates' row 0, e.g. `committed_prefix(..., delay_s=0,
    soft_steps=len(chunk)).actions`). Distance: the sum of squared differences over the first
    min(N, M) rows, in the actions' own units. No overlap (M = 0) -> 0.
    """
    cand, ref = torch.as_tensor(candidates, dtype=torch.float64), torch.as_tensor(reference, dtype=torch.float64)
    if cand.dim() != 3 or ref.dim() != 2 or cand.shape[0] < 1 or ref.shape[1] != cand.shape[2]:
        raise ValueError(f"most_coherent: expected candidates (K, N, Da) and reference (M, Da), got "
                         f"{tuple(cand.shape)} and {tuple(ref.shape)}")
    m = min(cand.shape[1], ref.shape[0])
    if m == 0:
        return 0
    distance = (cand[:, :m] - ref[None, :m]).square().sum(dim=(1, 2))
    if not torch.isfinite(distance).all():
        raise ValueError("most_coherent: candidates or reference contain NaN or inf")
    return int(torch.argmin(distance))


class DelayEstimator:
    """The inference delay to plan for: a high quantile of the last `window` plan latencies.

    Conservative on purpose: too short a d leaves actions uncommitted that the arm executes from the
    old chunk anyway (a jump when the new chunk takes over); too long only commits one more action.
    """

    def __init__(self, window: int = 50, quantile: float = 0.95, initial_s: float = 0.1):
        if window < 1 or not 0 < quantile <= 1 or not initial_s >= 0:
            raise ValueError(f"DelayEstimator: need window >= 1, 0 < quantile <= 1, initial_s >= 0; "
                             f"got {window}, {quantile}, {initial_s}")
        self.quantile, self.initial_s = quantile, initial_s
        self._recent: deque[float] = deque(maxlen=window)

    def update(self, latency_s: float) -> None:
        if not math.isfinite(latency_s) or latency_s < 0:
            raise ValueError(f"DelayEstimator.update: latency must be finite and >= 0, got {latency_s}")
        self._recent.append(float(latency_s))

    def estimate(self) -> float:
        """The ceil(q n)-th smallest of the n recent latencies (no interpolation: an observed value);
        `initial_s` before any update."""
        if not self._recent:
            return self.initial_s
        ordered = sorted(self._recent)
        return ordered[max(0, math.ceil(self.quantile * len(ordered)) - 1)]

    def steps(self, dt: float) -> int:
        """The estimate in actions of dt seconds (what `committed_prefix` will commit)."""
        return math.ceil(self.estimate() / dt - _TOL)
