"""DPAGPolicy: the plain-PyTorch reference DP-AG (and Diffusion Policy) every fast path is checked against.

Read top to bottom: construction, input checks, encoding, the training loss (docs/method.md §6), and
inference in `dp` and `guided` modes with receding-horizon slicing (docs/method.md §7). The policy
takes and returns raw (un-normalised) values; normalisation statistics are buffers of the policy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import ops
from .config import PolicyConfig
from .diffusion import NoiseSchedule
from .guidance import draw_latent_noise, latent_update, vjp_force
from .losses import diffusion_loss, info_nce, kl_to_standard_normal
from .model.encoders import GaussianPosterior, ObservationEncoder
from .model.unet import ConditionalUnet1D
from .normalize import Normalizer
from .rtc import check_prefix


def resolve_mode(cfg: PolicyConfig, mode: str | None) -> str:
    """The inference mode to run: `mode`, else the config's; raises for an unknown one."""
    mode = mode or cfg.inference_mode
    if mode not in ("dp", "guided") or (mode == "guided" and cfg.method != "dpag"):
        raise ValueError(f"mode: must be 'dp' or 'guided' (guided needs method='dpag'), got {mode!r}")
    return mode


# Normalised observations span [-1, 1] over the training data. Far beyond it the U-Net's
# GroupNorm statistics overflow float32 (1e30 in one state element gave all-NaN actions): a value
# 10^4 training ranges out is a sensor or unit error, never something the policy can act on.
MAX_NORMALIZED_OBS = 1e4


def check_observation(obs: dict, shapes: dict[str, tuple[int, ...]],
                      dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], int]:
    """The observation rule every runtime applies: each key of `shapes` present as a (B, *shape)
    tensor (or array), one batch size, real numbers (any float or integer dtype, cast to `dtype`;
    bool, complex and others are refused), all finite. Returns (the cast dict, B)."""
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


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_normalized(key: str, x: torch.Tensor) -> None:
    """Refuse an observation, by name, that the network would turn into NaN (see MAX_NORMALIZED_OBS)."""
    magnitude = x.detach().abs()
    worst = float(magnitude.amax()) if x.numel() else 0.0
    if worst > MAX_NORMALIZED_OBS:
        where = tuple(int(i) for i in np.unravel_index(int(magnitude.argmax()), tuple(x.shape)))
        raise ValueError(f"obs[{key!r}]: the value at index {where} lies {worst:.3g} training ranges from the data "
                         f"the policy was trained on (limit {MAX_NORMALIZED_OBS:g}): a sensor or unit error?")


def check_network_inputs(normalizer: Normalizer, obs: dict[str, torch.Tensor]) -> None:
    """`check_normalized` on what the networks will see: the normalised state, the images as given."""
    for key, x in obs.items():
        check_normalized(key, normalizer.normalize("state", x) if key == "state" else x)


def check_actions(action_pred: torch.Tensor) -> torch.Tensor:
    """The last check of every plan: a plan never hands NaN or inf to the arm."""
    if not bool(torch.isfinite(action_pred).all()):
        raise FloatingPointError("the policy produced non-finite actions from a finite observation "
                                 "(corrupt weights or normaliser?)")
    return action_pred


@dataclass
class PlanNoise:
    """Every random number one plan uses, drawn from the caller's generator by `draw_plan_noise`
    (on its device: no read back to the host). Every runtime takes them from here, so one seed gives
    the same actions on all of them."""

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
        latent = draw_latent_noise(cfg.latent, (batch, cfg.n_obs_steps, cfg.obs_feature_dim), generator,
                                   num_steps, device, dtype)
    return PlanNoise(x, prefix, steps, latent)


class DPAGPolicy(nn.Module):
    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.cfg = cfg
        dims = {"action": cfg.action_dim}
        if cfg.state_dim > 0:
            dims["state"] = cfg.state_dim
        self.normalizer = Normalizer(dims)
        self.encoder = ObservationEncoder(cfg)
        self.posterior = GaussianPosterior(cfg.obs_feature_dim, cfg.posterior) if cfg.method == "dpag" else None
        self.unet = ConditionalUnet1D(cfg.action_dim, cfg.global_cond_dim, cfg.unet)
        self.schedule = NoiseSchedule(cfg.scheduler)

    # ---- input checks: bad input fails here with a message, never deep inside a conv ----
    def obs_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every observation key with its per-sample shape (To, ...)."""
        cfg = self.cfg
        shapes: dict[str, tuple[int, ...]] = {}
        if cfg.state_dim > 0:
            shapes["state"] = (cfg.n_obs_steps, cfg.state_dim)
        if cfg.image is not None:
            shapes.update({cam: (cfg.n_obs_steps, *cfg.image.image_shape) for cam in cfg.image.cameras})
        return shapes

    def check_obs(self, obs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        """`check_observation` against this policy: (obs in the policy's dtype, batch size)."""
        return check_observation(obs, self.obs_shapes(), self.schedule.coefs.dtype)

    def _require_normalizer(self) -> None:
        if not self.normalizer.is_fitted:
            raise RuntimeError("policy.normalizer is not fitted: call policy.normalizer.fit(...) on the "
                               "training data (or load a checkpoint) before training or inference")

    # ---- encoding ----
    def encode(self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw observations -> per-step features (B, To, Do)."""
        if self.cfg.state_dim > 0:
            obs = {**obs, "state": self.normalizer.normalize("state", obs["state"])}
        return self.encoder(obs, generator)

    def predict_noise(self, a_k: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """eps_theta(a_k, t, z) with the latent z (B, To, Do) as the global conditioning."""
        return self.unet(a_k, t, z.flatten(1))

    # ---- training ----
    def compute_loss(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The DP-AG (or DP) training loss for a raw batch {"obs": {...}, "action": (B, H, Da)}, and its
        terms as detached 0-d tensors."""
        self._require_normalizer()
        cfg = self.cfg
        obs, b = self.check_obs(batch["obs"])
        action = batch["action"]
        if tuple(action.shape) != (b, cfg.horizon, cfg.action_dim):
            raise ValueError(f"action: expected shape ({b}, {cfg.horizon}, {cfg.action_dim}), got {tuple(action.shape)}")
        a_0 = self.normalizer.normalize("action", action)
        features = self.encode(obs, generator)
        device = a_0.device
        t = torch.randint(0, cfg.scheduler.num_train_timesteps, (b,), generator=generator, device=device)
        noise = torch.randn(a_0.shape, generator=generator, device=device, dtype=a_0.dtype)
        a_k = ops.q_sample(a_0, noise, t, self.schedule.sqrt_alphas_cumprod, self.schedule.sqrt_one_minus_alphas_cumprod)

        if self.posterior is None:  # plain Diffusion Policy
            loss = diffusion_loss(self.unet(a_k, t, features.flatten(1)), noise, cfg.loss.target_scale)
            return loss, {"loss": loss.detach(), "loss_diff": loss.detach()}

        mu, log_var = self.posterior(features)
        # The force needs d eps / d mu. When mu carries no graph (identity posterior on low-dim
        # state), make it a leaf that does; nothing upstream needs its gradient anyway.
        z_in = mu if mu.requires_grad else mu.detach().requires_grad_(True)
        eps_static = self.predict_noise(a_k, t, z_in)
        literal = cfg.loss.implementation == "literal"
        if literal:  # as released: a second-order graph for g, then thrown away
            (g,) = torch.autograd.grad(eps_static, z_in, grad_outputs=eps_static, create_graph=True)
            g = g.detach()
        else:        # activation-only VJP, graph kept for the loss backward
            g = vjp_force(eps_static, z_in, retain_graph=True)
        # The guided branch is only a target: the released code runs it with gradients and then
        # detaches; the efficient path never records the graph. Same values, same gradients.
        with torch.set_grad_enabled(literal and torch.is_grad_enabled()):
            xi = draw_latent_noise(cfg.latent, tuple(mu.shape), generator, device=device, dtype=mu.dtype)
            z_guided = latent_update(self.unet, a_k, t, z_in, log_var, cfg.latent, None if xi is None else xi[0],
                                     first_force=g)
            eps_guided = self.predict_noise(a_k, t, z_guided)
        eps_guided = eps_guided.detach()

        loss_diff = diffusion_loss(eps_static, noise, cfg.loss.target_scale)
        loss_cont = info_nce(eps_static, eps_guided, cfg.loss.tau)
        loss_kl = kl_to_standard_normal(mu, log_var)
        loss = loss_diff + cfg.loss.lambda_cont * loss_cont + cfg.loss.lambda_kl * loss_kl
        # Detached tensors, not floats: reading each back to the host here would sync a GPU four
        # times per micro-batch; the trainer reads them once per step.
        return loss, {"loss": loss.detach(), "loss_diff": loss_diff.detach(),
                      "loss_cont": loss_cont.detach(), "loss_kl": loss_kl.detach()}

    # ---- inference ----
    @torch.no_grad()
    def predict_action(self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None,
                       mode: str | None = None, prefix: torch.Tensor | None = None,
                       prefix_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Sample an action chunk. Returns raw "action" (B, Na, Da) to execute and "action_pred" (B, H, Da).

        mode: "dp" conditions every denoising step on mu; "guided" evolves z from mu by the latent
        update at every step, with the force taken at the current a_k. Default: cfg.inference_mode.

        Real-time chunking (dpag_engine/rtc.py): prefix (B, P, Da) raw actions already committed to
        the arm, row j aligned to horizon index n_obs_steps - 1 + j (row 0 = the first executed
        action); prefix_weight (P,) in [0, 1], default all ones. After every denoising step, rows
        n_obs_steps - 1 .. n_obs_steps - 2 + P of the sample become w * q_sample(prefix, level) +
        (1 - w) * sample, at the noise level the step landed on; weight-1 rows come out equal to the
        prefix (clipped to the sampler's range). In guided mode the latent update is unchanged (it
        sees the inpainted sample). prefix None or P = 0: the plain sampler, same draws, same output.
        """
        self._require_normalizer()
        cfg = self.cfg
        mode = resolve_mode(cfg, mode)
        obs, b = self.check_obs(obs)
        check_network_inputs(self.normalizer, obs)
        start = cfg.n_obs_steps - 1  # receding horizon: the first action is at the current step
        rtc = check_prefix(prefix, prefix_weight, batch=b, action_dim=cfg.action_dim, max_len=cfg.horizon - start)
        features = self.encode(obs, generator)
        noise = draw_plan_noise(cfg, self.schedule.num_steps, b, generator, 0 if rtc is None else rtc[0].shape[1],
                                features.device, features.dtype)
        action_pred = check_actions(self.denoise(features, noise, mode, rtc))
        return {"action": action_pred[:, start:start + cfg.n_action_steps], "action_pred": action_pred}

    def denoise(self, features: torch.Tensor, noise: PlanNoise, mode: str,
                rtc: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The sampler from encoded features to raw actions (B, H, Da): no input checks, no draws and
        no reads back to the host, so a CUDA graph can capture it (runtime_cuda.py). rtc: the
        (prefix, weights) of `check_prefix`, or None."""
        cfg, sched = self.cfg, self.schedule
        mu, log_var = self.posterior(features) if self.posterior is not None else (features, None)
        x = noise.x
        if rtc is not None:
            pre, w = self.normalized_prefix(rtc, x.dtype)
        for i, t in enumerate(sched.timesteps):
            z = mu
            if mode == "guided":
                z = latent_update(self.unet, x, t, mu, log_var, cfg.latent, None if noise.latent is None else noise.latent[i])
            eps = self.predict_noise(x, t, z)
            step_noise = noise.steps[i] if noise.steps is not None else None
            if rtc is None:
                x, _ = ops.sampler_step(x, eps, sched.coefs, i, step_noise, sched.clip)
            else:
                # Inpaint AFTER the step, at the level it landed on (t_{i+1}; clean after the last
                # step): every U-Net call then sees a prefix noised exactly as the rest of its input,
                # and the final sample's prefix IS the committed actions. Inpainting before the step
                # at t_i instead would leave the last step's model-made x0 in the prefix.
                x, _ = ops.sampler_step_inpaint(x, eps, sched.coefs, i, step_noise, sched.clip,
                                                pre, noise.prefix, w, sched.inpaint_coefs, cfg.n_obs_steps - 1)
        return self.normalizer.unnormalize("action", x)

    def normalized_prefix(self, rtc: tuple[torch.Tensor, torch.Tensor],
                          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised prefix (B, P, Da), weights (P,)) for the sampler, on the policy's device.

        The prefix is clipped to the sampler's x0 range: the sampler never produces actions outside
        it, and the model never saw any. Its noise (PlanNoise.prefix) is one fresh draw per step, as
        RePaint does; the last step lands on the clean level (sqrt(a) = 1, sqrt(1-a) = 0), so its
        draw is multiplied by zero: drawn anyway to keep one (K, ...) layout everywhere.
        """
        prefix, weight = rtc
        device = self.schedule.coefs.device
        pre = self.normalizer.normalize("action", prefix.to(device=device, dtype=dtype))
        clip = self.schedule.clip
        if clip is not None:
            pre = pre.clamp(-clip, clip)
        return pre, weight.to(device=device, dtype=dtype)
