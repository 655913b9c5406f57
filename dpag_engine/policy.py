"""DPAGPolicy: the plain-PyTorch reference DP-AG (and Diffusion Policy) every fast path is checked against.

Read top to bottom: construction, input checks, encoding, the training loss (docs/method.md §6), and
inference in `dp` and `guided` modes with receding-horizon slicing (docs/method.md §7). The policy
takes and returns raw (un-normalised) values; normalisation statistics are buffers of the policy.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from . import ops
from .config import LatentUpdateConfig, PolicyConfig
from .diffusion import NoiseSchedule
from .guidance import draw_latent_noise, latent_update, vjp_force
from .losses import diffusion_loss, info_nce, kl_to_unit_gaussian
from .model.encoders import GaussianPosterior, ObservationEncoder
from .model.unet import ConditionalUnet1D
from .normalize import Normalizer
from .planner import PlanNoise, Planner, check_observation, obs_shapes


def encode_features(normalizer: Normalizer, encoder: nn.Module, obs: dict[str, torch.Tensor],
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Raw observations -> per-step features (B, To, Do): the state normalised, then the encoder."""
    if "state" in obs:
        obs = {**obs, "state": normalizer.normalize("state", obs["state"])}
    return encoder(obs, generator)


def encode_latent(normalizer: Normalizer, encoder: nn.Module, posterior: nn.Module | None,
                  obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw observations -> (mu, log_var) (log_var None for plain DP). Module-level so that a runtime's
    float32 snapshot of these three modules (runtime_cpu.TorchEncoder) encodes exactly as the policy."""
    features = encode_features(normalizer, encoder, obs)
    return posterior(features) if posterior is not None else (features, None)


class DPAGPolicy(nn.Module):
    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.cfg = cfg
        # What the inputs and action columns are in robot terms (dpag_engine/spec.py); training and
        # load_policy set it, serving builds observations and commands from it.
        self.spec = None
        dims = {"action": cfg.action_dim}
        if cfg.state_dim > 0:
            dims["state"] = cfg.state_dim
        self.normalizer = Normalizer(dims)
        self.encoder = ObservationEncoder(cfg)
        self.posterior = GaussianPosterior(cfg.obs_feature_dim, cfg.posterior) if cfg.method == "dpag" else None
        self.unet = ConditionalUnet1D(cfg.action_dim, cfg.global_cond_dim, cfg.unet)
        self.schedule = NoiseSchedule(cfg.scheduler)

    # ---- input checks: bad input fails here with a message, never deep inside a conv ----
    def check_obs(self, obs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        """planner.check_observation against this policy: (obs in the policy's dtype, batch size)."""
        return check_observation(obs, obs_shapes(self.cfg), self.schedule.coefs.dtype)

    def _require_normalizer(self) -> None:
        if not self.normalizer.is_fitted:
            raise RuntimeError("policy.normalizer is not fitted: call policy.normalizer.fit(...) on the "
                               "training data (or load a checkpoint) before training or inference")

    # ---- encoding ----
    def encode(self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw observations -> per-step features (B, To, Do)."""
        return encode_features(self.normalizer, self.encoder, obs, generator)

    def latent(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw observations -> (mu, log_var), what the sampler conditions on (log_var None for plain DP)."""
        return encode_latent(self.normalizer, self.encoder, self.posterior, obs)

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
        loss_kl = kl_to_unit_gaussian(mu, log_var, features if cfg.loss.kl_prior == "observation" else None)
        loss = loss_diff + cfg.loss.lambda_cont * loss_cont + cfg.loss.lambda_kl * loss_kl
        terms = {"loss_diff": loss_diff.detach(), "loss_cont": loss_cont.detach(), "loss_kl": loss_kl.detach()}
        if cfg.loss.lambda_diff_guided > 0:
            # The guided latent as an input (detached: the latent update is a fixed map here), the
            # noise predictor trained on it like on mu.
            loss_diff_guided = diffusion_loss(self.predict_noise(a_k, t, z_guided.detach()), noise,
                                              cfg.loss.target_scale)
            loss = loss + cfg.loss.lambda_diff_guided * loss_diff_guided
            terms["loss_diff_guided"] = loss_diff_guided.detach()
        # Detached tensors, not floats: reading each back to the host here would sync a GPU four
        # times per micro-batch; the trainer reads them once per step.
        return loss, {"loss": loss.detach(), **terms}

    def set_inference_steps(self, k: int) -> None:
        """Sample with K = k DDIM steps from now on (the training schedule is unchanged)."""
        sched = dataclasses.replace(self.cfg.scheduler, num_inference_steps=k)
        self.cfg = self.cfg.replace(scheduler=sched)   # validates k against the training timesteps
        self.schedule = NoiseSchedule(sched).to(self.schedule.coefs.device)

    def set_guidance(self, latent: LatentUpdateConfig) -> None:
        """Guided sampling uses this latent update from now on (training's update is unchanged)."""
        self.cfg = self.cfg.replace(guidance=latent)

    # ---- inference ----
    @torch.no_grad()
    def predict_action(self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None,
                       mode: str | None = None, prefix: torch.Tensor | None = None,
                       prefix_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`Planner.predict_action` on this policy in PyTorch (the reference runtime): raw "action"
        (B, Na, Da) to execute and "action_pred" (B, H, Da); see planner.py for every argument."""
        return self.planner().predict_action(obs, generator, mode, prefix, prefix_weight)

    def planner(self, runtime=None) -> Planner:
        """The plan contract over this policy's normaliser and sampler, run by `runtime` (default: this
        policy in PyTorch). Runtimes with their own copy of the weights build it from the policy too."""
        self._require_normalizer()
        dtype = self.schedule.coefs.dtype
        state = self.normalizer.affine("state", dtype) if self.cfg.state_dim > 0 else None
        return Planner(self.cfg, state, self.normalizer.affine("action", dtype), runtime or TorchRuntime(self),
                       self.schedule.clip)

    def denoise(self, mu: torch.Tensor, log_var: torch.Tensor | None, noise: PlanNoise, mode: str,
                rtc: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The sampler from the encoded observation (mu, and log_var for guided mode) to the NORMALISED
        chunk (B, H, Da): no input checks, no draws and no reads back to the host, so a CUDA graph can
        capture it (runtime/cuda_graph.py). rtc: the normalised (prefix, weights) of `Planner.normalized_prefix`."""
        cfg, sched = self.cfg, self.schedule
        x = noise.x
        for i, t in enumerate(sched.timesteps):
            z = mu
            if mode == "guided":
                z = latent_update(self.unet, x, t, mu, log_var, cfg.guidance, None if noise.latent is None else noise.latent[i])
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
                                                rtc[0], noise.prefix, rtc[1], sched.inpaint_coefs, cfg.n_obs_steps - 1)
        return x


class TorchRuntime:
    """The reference runtime: the policy's own modules, in PyTorch, on the policy's device."""

    name, modes, modes_note, max_batch = "torch", ("dp", "guided"), "", None

    def __init__(self, policy: DPAGPolicy):
        self.policy = policy
        self.num_steps = policy.schedule.num_steps
        self.device, self.dtype = policy.schedule.coefs.device, policy.schedule.coefs.dtype

    @torch.no_grad()   # guided mode's force takes its own gradient inside (ops.unet_force)
    def encode(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.policy.latent(obs)

    @torch.no_grad()
    def denoise(self, mu, log_var, noise, mode, rtc) -> torch.Tensor:
        return self.policy.denoise(mu, log_var, noise, mode, rtc)
