"""CpuPolicy: `DPAGPolicy.predict_action` (dp and guided modes) as one C++ call per plan.

The engine (csrc/unet_runtime.h, bound as `dpag_engine._C.PolicyEngine`) runs the K U-Net forwards,
in guided mode the latent update's activation-only backward at every step, the sampler steps and
un-normalisation without Python in the loop and with the GIL released. Low-dim policies (identity
posterior) are encoded in C++ too (normalise; log_var Linear). Image policies, and the "mlp"
posterior, are encoded by torch first, once per plan: the ResNet-18 is compute-bound 2-D
convolution, which oneDNN already runs near peak, and then the C++ sampler takes (mu, log_var).

This wrapper exports the policy's weights once, draws the random numbers exactly as predict_action
does (so a shared generator gives the same actions), and slices the receding horizon.

    engine = CpuPolicy.from_policy(policy)                 # fp32; weights="fp16"/"bf16" halve the bytes
    out = engine.step(obs, generator)                      # == policy.predict_action(obs, generator)
    out = engine.step(obs, generator, mode="guided")       # the latent update at every step
    out = engine.step(obs, generator, prefix=committed)    # real-time chunking, as predict_action's
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from .policy import (DPAGPolicy, check_actions, check_network_inputs, check_normalized, check_observation,
                     draw_plan_noise, resolve_mode)
from .rtc import check_prefix

try:
    from . import _C
except ImportError as err:  # a source checkout that was never built
    raise ImportError("dpag_engine._C is not built: run `pip install -e .` (needs a C++17 compiler)") from err


class TorchEncoder(nn.Module):
    """A float32 snapshot of a policy's normaliser, observation encoder and posterior: obs -> (mu, log_var).

    For the policies whose encoder the engine does not run (images, the "mlp" posterior). Encoding is
    DPAGPolicy.encode itself (it only reads cfg, normalizer and encoder), so the two cannot drift.
    """

    def __init__(self, policy: DPAGPolicy):
        super().__init__()
        self.cfg = policy.cfg
        self.obs_shapes = policy.obs_shapes()
        self.normalizer = copy.deepcopy(policy.normalizer).float()
        self.encoder = copy.deepcopy(policy.encoder).float()
        self.posterior = copy.deepcopy(policy.posterior).float() if policy.posterior is not None else None
        self.eval()

    @torch.inference_mode()
    def forward(self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        obs, _ = check_observation(obs, self.obs_shapes)
        obs = {k: v.detach().cpu() for k, v in obs.items()}
        check_network_inputs(self.normalizer, obs)
        features = DPAGPolicy.encode(self, obs, generator)
        if self.posterior is None:
            return features, None
        return self.posterior(features)


class CpuPolicy:
    """A C++ CPU engine built from a DPAGPolicy; the policy itself is not kept or modified."""

    def __init__(self, engine: "_C.PolicyEngine", cfg, config: dict, encoder: TorchEncoder | None = None):
        self.engine = engine
        self.cfg = cfg
        self._encoder = encoder  # None: the engine encodes raw state itself
        # For real-time chunking: the prefix is normalised (and clipped) here, as predict_action does.
        self._action_scale = torch.as_tensor(config["action_scale"], dtype=torch.float32)
        self._action_offset = torch.as_tensor(config["action_offset"], dtype=torch.float32)
        self._state_scale = torch.as_tensor(config["state_scale"], dtype=torch.float32)
        self._state_offset = torch.as_tensor(config["state_offset"], dtype=torch.float32)
        self._clip = config["clip"]

    @classmethod
    def from_policy(cls, policy: DPAGPolicy, weights: str = "fp32", threads: int | None = None,
                    max_batch: int = 8, guided: bool | None = None) -> "CpuPolicy":
        """Export weights, normaliser and sampler table (a snapshot: later training is not seen).

        weights: storage of the convolution weights, "fp32", "bf16" or "fp16"; the 16-bit ones halve
        the bytes a step streams (accumulation stays fp32). fp16 rounds 8x finer than bf16: see
        tests/test_cpu_runtime.py for the measured action differences.
        threads: worker threads (default: torch.get_num_threads()).
        max_batch: buffers are allocated once for up to this batch size.
        guided: build the backward for mode="guided" (a transposed copy of every conv weight, so
        twice the memory). Default: for DP-AG policies.
        """
        guided = policy.posterior is not None if guided is None else guided
        config = engine_config(policy, weights, threads, max_batch, guided)
        engine = _C.PolicyEngine(config, unet_weights(policy))
        encoder = None if engine_encodes_state(policy) else TorchEncoder(policy)
        return cls(engine, policy.cfg, config, encoder)

    @property
    def weight_bytes_per_step(self) -> int:
        return self.engine.weight_bytes_per_step

    def _state(self, obs: dict) -> np.ndarray:
        """The raw state as the engine takes it, checked by the rules of every runtime (policy.py)."""
        obs, _ = check_observation(obs, {"state": (self.cfg.n_obs_steps, self.cfg.state_dim)})
        state = obs["state"].detach().cpu().contiguous()
        # The engine normalises in C++; the same affine map here is the check of what it will see.
        check_normalized("state", state * self._state_scale + self._state_offset)
        return state.numpy()

    def _condition(self, obs: dict, generator: torch.Generator | None, guided: bool) -> dict:
        """The engine's conditioning inputs: the raw state, or (mu, log_var) from the torch encoder."""
        if self._encoder is None:
            return {"state": self._state(obs)}
        mu, log_var = self._encoder(obs, generator)
        cond = {"state": None, "mu": mu.contiguous().numpy()}
        if guided:
            cond["log_var"] = log_var.contiguous().numpy()
        return cond

    def step(self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None,
             mode: str | None = None, prefix: torch.Tensor | None = None,
             prefix_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """As DPAGPolicy.predict_action: {"action": (B, Na, Da), "action_pred": (B, H, Da)}, raw units, CPU float32.

        prefix / prefix_weight: real-time chunking, exactly as in predict_action (same checks, same
        draws); the engine inpaints after every step inside its C++ loop.
        """
        cfg = self.cfg
        guided = resolve_mode(cfg, mode) == "guided"
        if guided and not self.engine.guided:
            raise ValueError("mode='guided': this engine was built without the backward; use "
                             "CpuPolicy.from_policy(policy, guided=True)")
        cond = self._condition(obs, generator, guided)
        b = next(v for v in cond.values() if v is not None).shape[0]
        if not 1 <= b <= self.engine.max_batch:
            raise ValueError(f"obs: batch {b} outside [1, max_batch={self.engine.max_batch}] "
                             "(build with a larger max_batch)")
        start = cfg.n_obs_steps - 1
        rtc = check_prefix(prefix, prefix_weight, batch=b, action_dim=cfg.action_dim, max_len=cfg.horizon - start)
        # The draws of predict_action, the latent update's Brownian draws included.
        noise = draw_plan_noise(cfg, self.engine.num_steps, b, generator, 0 if rtc is None else rtc[0].shape[1])
        inpaint = {}
        if rtc is not None:
            inpaint = {"prefix": self._normalized_prefix(rtc[0]).numpy(), "prefix_weight": rtc[1].contiguous().numpy(),
                       "prefix_noise": noise.prefix.numpy()}
        latent = {}
        if guided and noise.latent is not None:
            latent["latent_noise"] = noise.latent.contiguous().numpy()
        action_pred = torch.empty_like(noise.x)
        state = cond.pop("state")
        steps = noise.steps.numpy() if noise.steps is not None else None
        self.engine.plan(state, noise.x.numpy(), steps, action_pred.numpy(), guided=guided, **cond, **latent, **inpaint)
        check_actions(action_pred)
        return {"action": action_pred[:, start:start + cfg.n_action_steps], "action_pred": action_pred}

    def _normalized_prefix(self, prefix: torch.Tensor) -> torch.Tensor:
        """DPAGPolicy.normalized_prefix on the engine's snapshot of the normaliser and clip."""
        pre = prefix.detach().to("cpu", torch.float32) * self._action_scale + self._action_offset
        if self._clip is not None:
            pre = pre.clamp(-self._clip, self._clip)
        return pre.contiguous()

    __call__ = step


def engine_encodes_state(policy: DPAGPolicy) -> bool:
    """Whether the C++ engine encodes the observation itself: low-dim state through the identity
    encoder (mu = normalised state; the identity posterior's log_var Linear for guided mode)."""
    cfg = policy.cfg
    return cfg.image is None and (policy.posterior is None or cfg.posterior == "identity")


def engine_config(policy: DPAGPolicy, weights: str = "fp32", threads: int | None = None,
                  max_batch: int = 8, guided: bool = False) -> dict:
    """The `_C.PolicyEngine` config dict of a policy."""
    cfg = policy.cfg
    if guided and policy.posterior is None:
        raise ValueError("guided: needs a DP-AG policy (method='dpag'); a plain Diffusion Policy has no latent")
    if not policy.normalizer.is_fitted:
        raise RuntimeError("policy.normalizer is not fitted: fit it (or load a checkpoint) first")
    sched = policy.schedule
    like = torch.zeros((), dtype=torch.float32)
    s_scale, s_off = policy.normalizer._scale_offset("state", like) if cfg.state_dim > 0 else (like[:0], like[:0])
    a_scale, a_off = policy.normalizer._scale_offset("action", like)
    config = {
        "action_dim": cfg.action_dim, "state_dim": cfg.state_dim, "cond_dim": cfg.obs_feature_dim,
        "n_obs_steps": cfg.n_obs_steps,
        "horizon": cfg.horizon, "down_dims": list(cfg.unet.down_dims), "kernel_size": cfg.unet.kernel_size,
        "diffusion_step_embed_dim": cfg.unet.diffusion_step_embed_dim, "n_groups": cfg.unet.n_groups,
        "timesteps": [int(t) for t in sched.timesteps.tolist()],
        # predict_action uses the float32 table buffer, so the engine gets the same rounded rows.
        "coefs": sched.coefs.cpu().to(torch.float32).tolist(),
        "clip": sched.clip,
        "stochastic": cfg.scheduler.sampler == "ddpm" or cfg.scheduler.eta > 0,
        "inpaint_coefs": sched.inpaint_coefs.cpu().to(torch.float32).tolist(),  # real-time chunking
        "state_scale": s_scale.tolist(), "state_offset": s_off.tolist(),
        "action_scale": a_scale.tolist(), "action_offset": a_off.tolist(),
        "max_batch": int(max_batch), "weights": weights,
        "threads": int(threads or torch.get_num_threads()),
        "guided": bool(guided),
        "latent": {"steps": cfg.latent.steps, "dt": cfg.latent.dt, "gamma": cfg.latent.gamma,
                   "eta": cfg.latent.eta, "normalize": cfg.latent.normalize},
    }
    if guided and engine_encodes_state(policy):
        linear = policy.posterior.log_var
        config["log_var_weight"] = linear.weight.detach().to("cpu", torch.float32).flatten().tolist()
        config["log_var_bias"] = linear.bias.detach().to("cpu", torch.float32).tolist()
    return config


def unet_weights(policy: DPAGPolicy) -> dict:
    """The U-Net state_dict as float32 numpy arrays (names are the engine's keys)."""
    return {name: t.detach().to("cpu", torch.float32).contiguous().numpy()
            for name, t in policy.unet.state_dict().items()}
