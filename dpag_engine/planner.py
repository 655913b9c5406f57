"""The plan contract: raw observation in, the actions to execute out, the same for every runtime.

    planner = Planner(cfg, affine, runtime)      # what DPAGPolicy.predict_action and every runtime use
    out = planner.predict_action(obs, generator, mode="guided", prefix=committed, prefix_weight=w)
    out["action"]        # (B, Na, Da) raw units, to execute now
    out["action_pred"]   # (B, H, Da) raw units, the whole predicted chunk

Written once here, for every runtime: the observation rule (keys, shapes, one dtype rule,
finiteness before and after normalisation), every random draw of a plan from the caller's
generator (`PlanNoise`, drawn on the runtime's device with no read back to the host), the
real-time-chunking prefix (checked, normalised, clipped), un-normalisation, the finiteness check
of what is returned, and the receding-horizon slice. A runtime supplies only

    encode(obs)                                -> (mu, log_var or None), (B, To, Do)
    denoise(mu, log_var, noise, mode, rtc)     -> the sampled chunk (B, H, Da), NORMALISED

plus `name`, `modes` (what it can sample, and `modes_note`, why not more), `num_steps`, `device`,
`dtype` and `max_batch` (None: any).
The runtimes: `TorchRuntime` (policy.py, the reference), `CpuRuntime` (runtime/cpu.py, the C++
engine), `ExportedRuntime` (runtime/: ONNX Runtime, TensorRT) and `CudaGraphRuntime`
(runtime/cuda_graph.py).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .config import PolicyConfig
from .guidance import draw_latent_noise
from .normalize import Affine
from .rtc import check_prefix

# Normalised observations span [-1, 1] over the training data. Far beyond it the U-Net's
# GroupNorm statistics overflow float32 (1e30 in one state element gave all-NaN actions): a value
# 10^4 training ranges out is a sensor or unit error, never something the policy can act on.
MAX_NORMALIZED_OBS = 1e4
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# ---- the observation rule ----
def obs_shapes(cfg: PolicyConfig) -> dict[str, tuple[int, ...]]:
    """Every observation key with its per-sample shape (To, ...)."""
    shapes: dict[str, tuple[int, ...]] = {}
    if cfg.state_dim > 0:
        shapes["state"] = (cfg.n_obs_steps, cfg.state_dim)
    if cfg.image is not None:
        shapes.update({cam: (cfg.n_obs_steps, *cfg.image.image_shape) for cam in cfg.image.cameras})
    return shapes


def check_observation(obs: dict, shapes: dict[str, tuple[int, ...]],
                      dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], int]:
    """Each key of `shapes` present as a (B, *shape) tensor (or array), one batch size, real numbers
    (any float or integer dtype, cast to `dtype`; bool, complex and others are refused), all
    finite. Returns (the cast dict, B)."""
    if not isinstance(obs, dict):
        raise TypeError(f"obs: expected a dict of tensors, got {type(obs).__name__}")
    out, batch = {}, None
    for key, tail in shapes.items():
        if key not in obs:
            raise KeyError(f"obs: missing key {key!r} (expected keys {sorted(shapes)})")
        x = obs[key]
        if not isinstance(x, torch.Tensor):
            try:
                x = torch.as_tensor(np.asarray(x))
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"obs[{key!r}]: expected a tensor or array, got {type(x).__name__}") from None
        if x.dim() != len(tail) + 1 or tuple(x.shape[1:]) != tail:
            raise ValueError(f"obs[{key!r}]: expected shape (B, {', '.join(map(str, tail))}), got {tuple(x.shape)}")
        if batch is not None and x.shape[0] != batch:
            raise ValueError(f"obs[{key!r}]: batch size {x.shape[0]} differs from the other keys ({batch})")
        batch = x.shape[0]
        if x.dtype == torch.bool or x.is_complex() or not (x.is_floating_point() or x.dtype in _INTEGER_DTYPES):
            raise TypeError(f"obs[{key!r}]: expected real numbers (a float or integer dtype), got {x.dtype}")
        x = x.to(dtype)
        if not torch.isfinite(x).all():
            raise ValueError(f"obs[{key!r}]: contains NaN or inf")
        out[key] = x
    assert batch is not None  # the config guarantees at least one key
    return out, batch


def check_normalized(key: str, x: torch.Tensor) -> None:
    """Refuse an observation, by name, that the network would turn into NaN (see MAX_NORMALIZED_OBS)."""
    magnitude = x.detach().abs()
    worst = float(magnitude.amax()) if x.numel() else 0.0
    if worst > MAX_NORMALIZED_OBS:
        where = tuple(int(i) for i in np.unravel_index(int(magnitude.argmax()), tuple(x.shape)))
        raise ValueError(f"obs[{key!r}]: the value at index {where} lies {worst:.3g} training ranges from the data "
                         f"the policy was trained on (limit {MAX_NORMALIZED_OBS:g}): a sensor or unit error?")


def check_actions(action_pred: torch.Tensor) -> torch.Tensor:
    """The last check of every plan: a plan never hands NaN or inf to the arm."""
    if not bool(torch.isfinite(action_pred).all()):
        raise FloatingPointError("the policy produced non-finite actions from a finite observation "
                                 "(corrupt weights or normaliser?)")
    return action_pred


def resolve_mode(cfg: PolicyConfig, mode: str | None) -> str:
    """The inference mode to run: `mode`, else the config's; raises for an unknown one."""
    mode = mode or cfg.inference_mode
    if mode not in ("dp", "guided") or (mode == "guided" and cfg.method != "dpag"):
        raise ValueError(f"mode: must be 'dp' or 'guided' (guided needs method='dpag'), got {mode!r}")
    return mode


# ---- the random numbers ----
@dataclass
class PlanNoise:
    """Every random number one plan uses, drawn from the caller's generator by `draw_plan_noise`."""

    x: torch.Tensor              # (B, H, Da) the initial sample
    prefix: torch.Tensor | None  # (K, B, P, Da) real-time chunking: the forward-noised prefix, P > 0 only
    steps: torch.Tensor | None   # (K, B, H, Da) stochastic samplers (DDPM, DDIM eta > 0) only
    latent: torch.Tensor | None  # (K, S, B, To, Do) the latent update's Brownian draws, latent eta > 0 only


def draw_plan_noise(cfg: PolicyConfig, num_steps: int, batch: int, generator: torch.Generator | None,
                    prefix_len: int = 0, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> PlanNoise:
    """The draws of one plan, in a fixed order: the initial sample, the prefix noise (one
    (K, B, P, Da) draw, only when P > 0, so the plain sampler's draws are untouched), one draw per
    step for stochastic samplers, then the latent update's Brownian draws (DP-AG with latent eta > 0;
    drawn in dp mode too, so both modes consume the generator alike)."""
    shape = (batch, cfg.horizon, cfg.action_dim)
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    prefix = None
    if prefix_len > 0:
        prefix = torch.randn((num_steps, batch, prefix_len, cfg.action_dim), generator=generator,
                             device=device, dtype=dtype)
    steps = None
    if cfg.scheduler.sampler == "ddpm" or cfg.scheduler.eta > 0:
        steps = torch.stack([torch.randn(shape, generator=generator, device=device, dtype=dtype)
                             for _ in range(num_steps)])
    latent = None
    if cfg.method == "dpag":
        latent = draw_latent_noise(cfg.guidance, (batch, cfg.n_obs_steps, cfg.obs_feature_dim), generator,
                                   num_steps, device, dtype)
    return PlanNoise(x, prefix, steps, latent)


# ---- the contract ----
@contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to n inside the block (None: as they are)."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Planner:
    """One plan, the same way for every runtime (module docstring)."""

    def __init__(self, cfg: PolicyConfig, state: Affine | None, action: Affine, runtime, clip: float | None):
        """state/action: the normaliser's maps (state None: no low-dim state, or a runtime whose
        export predates the state table; then only the images and the actions are checked).
        clip: the sampler's x0 range, which the prefix is clipped to. Observations and draws are in
        the runtime's dtype, on its device."""
        self.cfg, self.state, self.action, self.runtime = cfg, state, action, runtime
        self.clip, self.dtype = clip, runtime.dtype
        self.shapes = obs_shapes(cfg)

    def predict_action(self, obs: dict, generator: torch.Generator | None = None, mode: str | None = None,
                       prefix: torch.Tensor | None = None,
                       prefix_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Sample an action chunk. mode: "dp" conditions every denoising step on mu; "guided" evolves
        z from mu by the latent update at every step. Default: cfg.inference_mode.

        Real-time chunking (rtc.py): prefix (B, P, Da) raw actions already committed to the arm, row
        j aligned to horizon index n_obs_steps - 1 + j (row 0 = the first executed action);
        prefix_weight (P,) in [0, 1], default all ones. prefix None or P = 0: the plain sampler,
        same draws, same output.
        """
        # A runtime with threads of its own may ask for the plan's torch work on fewer threads
        # (runtime/cpu.py: OpenMP workers woken by a tiny op spin for ~1 ms on the engine's cores).
        with torch_threads(getattr(self.runtime, "torch_threads", None)):
            return self._predict_action(obs, generator, mode, prefix, prefix_weight)

    def _predict_action(self, obs, generator, mode, prefix, prefix_weight) -> dict[str, torch.Tensor]:
        cfg, runtime = self.cfg, self.runtime
        mode = resolve_mode(cfg, mode)
        if mode not in runtime.modes:
            raise ValueError(f"mode={mode!r}: the {runtime.name} runtime samples only {' and '.join(runtime.modes)}"
                             f" ({runtime.modes_note})")
        obs, b = check_observation(obs, self.shapes, self.dtype)
        for key, x in obs.items():
            check_normalized(key, self.state.forward(x) if key == "state" and self.state is not None else x)
        if runtime.max_batch is not None and not 1 <= b <= runtime.max_batch:
            raise ValueError(f"obs: batch {b} outside [1, max_batch={runtime.max_batch}] of the {runtime.name} runtime")
        start = cfg.n_obs_steps - 1  # receding horizon: the first action is at the current step
        rtc = check_prefix(prefix, prefix_weight, batch=b, action_dim=cfg.action_dim, max_len=cfg.horizon - start)
        device = runtime.device
        mu, log_var = runtime.encode({k: v.to(device) for k, v in obs.items()})
        noise = draw_plan_noise(cfg, runtime.num_steps, b, generator, 0 if rtc is None else rtc[0].shape[1],
                                device, self.dtype)
        if rtc is not None:
            rtc = self.normalized_prefix(rtc, device)
        x = runtime.denoise(mu, log_var if mode == "guided" else None, noise, mode, rtc)
        action_pred = check_actions(self.action.inverse(x))
        return {"action": action_pred[:, start:start + cfg.n_action_steps], "action_pred": action_pred}

    def normalized_prefix(self, rtc: tuple[torch.Tensor, torch.Tensor],
                          device) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised prefix (B, P, Da), weights (P,)) for the sampler, on the runtime's device.

        Clipped to the sampler's x0 range: the sampler never produces actions outside it, and the
        model never saw any. Its noise (PlanNoise.prefix) is one fresh draw per step, as RePaint
        does; the last step lands on the clean level, so its draw is multiplied by zero.
        """
        prefix, weight = rtc
        pre = self.action.forward(prefix.to(device=device, dtype=self.dtype))
        if self.clip is not None:
            pre = pre.clamp(-self.clip, self.clip)
        return pre, weight.to(device=device, dtype=self.dtype)
