"""CpuPolicy: `DPAGPolicy.predict_action` (dp mode, low-dim policies) as one C++ call per plan.

The engine (csrc/unet_runtime.h, bound as `dpag_engine._C.PolicyEngine`) runs normalisation, the
K U-Net forwards, the sampler steps and un-normalisation without Python in the loop and with the
GIL released. This wrapper exports the policy's weights once, draws the random numbers exactly as
predict_action does (so a shared generator gives the same actions), and slices the receding horizon.

    engine = CpuPolicy.from_policy(policy)                 # fp32; weights="fp16"/"bf16" halve the bytes
    out = engine.step({"state": state}, generator)         # == policy.predict_action(obs, generator)
    out = engine.step(obs, generator, prefix=committed)    # real-time chunking, as predict_action's
"""
from __future__ import annotations

import numpy as np
import torch

from .policy import DPAGPolicy, draw_seed
from .rtc import check_prefix

try:
    from . import _C
except ImportError as err:  # a source checkout that was never built
    raise ImportError("dpag_engine._C is not built: run `pip install -e .` (needs a C++17 compiler)") from err


class CpuPolicy:
    """A C++ CPU engine built from a DPAGPolicy; the policy itself is not kept or modified."""

    def __init__(self, engine: "_C.PolicyEngine", cfg, stochastic: bool, action_scale=None,
                 action_offset=None, clip: float | None = None):
        self.engine = engine
        self.cfg = cfg
        self._stochastic = stochastic
        # For real-time chunking: the prefix is normalised (and clipped) here, as predict_action does.
        self._action_scale = torch.as_tensor(action_scale if action_scale is not None else [1.0] * cfg.action_dim,
                                             dtype=torch.float32)
        self._action_offset = torch.as_tensor(action_offset if action_offset is not None else [0.0] * cfg.action_dim,
                                              dtype=torch.float32)
        self._clip = clip

    @classmethod
    def from_policy(cls, policy: DPAGPolicy, weights: str = "fp32", threads: int | None = None,
                    max_batch: int = 8) -> "CpuPolicy":
        """Export weights, normaliser and sampler table (a snapshot: later training is not seen).

        weights: storage of the convolution weights, "fp32", "bf16" or "fp16"; the 16-bit ones halve
        the bytes a step streams (accumulation stays fp32). fp16 rounds 8x finer than bf16: see
        tests/test_cpu_runtime.py for the measured action differences.
        threads: worker threads (default: torch.get_num_threads()).
        max_batch: buffers are allocated once for up to this batch size.
        """
        config = engine_config(policy, weights, threads, max_batch)
        engine = _C.PolicyEngine(config, unet_weights(policy))
        return cls(engine, policy.cfg, config["stochastic"], config["action_scale"], config["action_offset"],
                   config["clip"])

    @property
    def weight_bytes_per_step(self) -> int:
        return self.engine.weight_bytes_per_step

    def _state(self, obs: dict) -> np.ndarray:
        cfg = self.cfg
        if not isinstance(obs, dict) or "state" not in obs:
            raise KeyError("obs: missing key 'state' (expected keys ['state'])")
        x = obs["state"]
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or tuple(x.shape[1:]) != (cfg.n_obs_steps, cfg.state_dim):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"obs['state']: expected shape (B, {cfg.n_obs_steps}, {cfg.state_dim}), got {got}")
        if not 1 <= x.shape[0] <= self.engine.max_batch:
            raise ValueError(f"obs['state']: batch {x.shape[0]} outside [1, max_batch={self.engine.max_batch}] "
                             "(build with a larger max_batch)")
        # NaN/inf are rejected by the engine itself (ValueError), before any work.
        return x.detach().to("cpu", torch.float32).contiguous().numpy()

    def step(self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None,
             mode: str | None = None, prefix: torch.Tensor | None = None,
             prefix_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """As DPAGPolicy.predict_action: {"action": (B, Na, Da), "action_pred": (B, H, Da)}, raw units, CPU float32.

        prefix / prefix_weight: real-time chunking, exactly as in predict_action (same checks, same
        draws); the engine inpaints after every step inside its C++ loop.
        """
        cfg = self.cfg
        mode = mode or cfg.inference_mode
        if mode == "guided":
            raise NotImplementedError("CpuPolicy: guided mode is not implemented in the C++ engine yet (it needs an "
                                      "activation-only U-Net backward per step); use mode='dp' or DPAGPolicy")
        if mode != "dp":
            raise ValueError(f"mode: must be 'dp' or 'guided', got {mode!r}")
        state = self._state(obs)
        b = state.shape[0]
        start = cfg.n_obs_steps - 1
        rtc = check_prefix(prefix, prefix_weight, batch=b, action_dim=cfg.action_dim, max_len=cfg.horizon - start)
        # The same draws, in the same order, as predict_action: the latent-update seed, the initial
        # sample, [the prefix noise], then one noise tensor per step for stochastic samplers.
        draw_seed(generator)
        shape = (b, cfg.horizon, cfg.action_dim)
        x = torch.randn(shape, generator=generator, dtype=torch.float32)
        inpaint = {}
        if rtc is not None:
            pre, w, pre_noise = self._inpaint_inputs(rtc, generator)
            inpaint = {"prefix": pre.contiguous().numpy(), "prefix_weight": w.contiguous().numpy(),
                       "prefix_noise": pre_noise.numpy()}
        noise = None
        if self._stochastic:
            noise = torch.stack([torch.randn(shape, generator=generator, dtype=torch.float32)
                                 for _ in range(self.engine.num_steps)]).numpy()
        action_pred = torch.empty(shape, dtype=torch.float32)
        self.engine.plan(state, x.numpy(), noise, action_pred.numpy(), **inpaint)
        return {"action": action_pred[:, start:start + cfg.n_action_steps], "action_pred": action_pred}

    def _inpaint_inputs(self, rtc, generator):
        """DPAGPolicy.inpaint_inputs on the engine's snapshot of the normaliser and clip."""
        prefix, weight = rtc
        pre = prefix.detach().to("cpu", torch.float32) * self._action_scale + self._action_offset
        if self._clip is not None:
            pre = pre.clamp(-self._clip, self._clip)
        pre_noise = torch.randn((self.engine.num_steps, *pre.shape), generator=generator, dtype=torch.float32)
        return pre, weight, pre_noise

    __call__ = step


def engine_config(policy: DPAGPolicy, weights: str = "fp32", threads: int | None = None,
                  max_batch: int = 8) -> dict:
    """The `_C.PolicyEngine` config dict of a low-dim policy (raises for what the engine lacks)."""
    cfg = policy.cfg
    if cfg.image is not None:
        raise NotImplementedError("CpuPolicy: image observations are not supported yet (the C++ engine "
                                  "has no ResNet encoder); use DPAGPolicy.predict_action")
    if cfg.method == "dpag" and cfg.posterior != "identity":
        raise NotImplementedError("CpuPolicy: only the identity posterior (mu = state features) is "
                                  f"supported, got posterior={cfg.posterior!r}")
    if not policy.normalizer.is_fitted:
        raise RuntimeError("policy.normalizer is not fitted: fit it (or load a checkpoint) first")
    sched = policy.schedule
    like = torch.zeros((), dtype=torch.float32)
    s_scale, s_off = policy.normalizer._scale_offset("state", like)
    a_scale, a_off = policy.normalizer._scale_offset("action", like)
    return {
        "action_dim": cfg.action_dim, "state_dim": cfg.state_dim, "n_obs_steps": cfg.n_obs_steps,
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
    }


def unet_weights(policy: DPAGPolicy) -> dict:
    """The U-Net state_dict as float32 numpy arrays (names are the engine's keys)."""
    return {name: t.detach().to("cpu", torch.float32).contiguous().numpy()
            for name, t in policy.unet.state_dict().items()}
