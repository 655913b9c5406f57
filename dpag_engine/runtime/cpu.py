"""CpuRuntime: the C++ engine as a plan runtime, `DPAGPolicy.denoise` (dp and guided) in one C++ call.

The engine (csrc/unet_runtime.h, bound as `dpag_engine._C.PolicyEngine`) runs the K U-Net forwards,
in guided mode the latent update's activation-only backward at every step, and the sampler steps,
without Python in the loop and with the GIL released. It only denoises: the observation is checked,
encoded and the result un-normalised by the planner (planner.py), as for every runtime. Encoding
runs on a float32 torch snapshot of the policy's normaliser, encoder and posterior, once per plan:
for low-dim policies that is a normalisation and one small Linear; for image policies the ResNet-18,
compute-bound 2-D convolution that oneDNN already runs near peak.

    planner = CpuRuntime.planner(policy)                       # fp32; weights="fp16"/"bf16"/"int8" shrink the bytes
    out = planner.predict_action(obs, generator)               # == policy.predict_action(obs, generator)
    out = planner.predict_action(obs, generator, mode="guided", prefix=committed)
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..planner import PlanNoise, Planner
from ..policy import DPAGPolicy, encode_latent

try:
    from .. import _C
except ImportError as err:  # a source checkout that was never built
    raise ImportError("dpag_engine._C is not built: run `pip install -e .` (needs a C++17 compiler)") from err


class TorchEncoder(nn.Module):
    """A float32 snapshot of a policy's normaliser, observation encoder and posterior: obs -> (mu, log_var),
    through the same `encode_latent` the policy uses, so the two cannot drift."""

    def __init__(self, policy: DPAGPolicy):
        super().__init__()
        self.normalizer = copy.deepcopy(policy.normalizer).float()
        self.encoder = copy.deepcopy(policy.encoder).float()
        self.posterior = copy.deepcopy(policy.posterior).float() if policy.posterior is not None else None
        self.eval()

    @torch.inference_mode()
    def forward(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return encode_latent(self.normalizer, self.encoder, self.posterior, obs)


class CpuRuntime:
    """The C++ engine built from a DPAGPolicy (a snapshot: later training is not seen)."""

    name, device, dtype = "cpp", torch.device("cpu"), torch.float32

    def __init__(self, engine: "_C.PolicyEngine", encoder: TorchEncoder, has_cameras: bool = False):
        self.engine, self.encoder = engine, encoder
        # The plan's torch work (checks, draws, the low-dim posterior) is a few tiny ops: on one
        # thread they never wake OpenMP's pool, whose workers then spin for ~1 ms on the cores the
        # engine's own threads need (small recipe, 2 engine threads: p50 7.3 -> 6.4 ms, p99 14 -> 8 ms,
        # bench/RESULTS.md). A camera encoder is real work and keeps torch's threads.
        self.torch_threads = None if has_cameras else 1
        self.modes = ("dp", "guided") if engine.guided else ("dp",)
        self.modes_note = "" if engine.guided else "built without the backward: CpuRuntime.planner(policy, guided=True)"
        self.num_steps, self.max_batch = engine.num_steps, engine.max_batch

    @classmethod
    def from_policy(cls, policy: DPAGPolicy, weights: str = "fp32", threads: int | None = None,
                    max_batch: int = 8, guided: bool | None = None) -> "CpuRuntime":
        """weights: storage of the convolution weights, "fp32", "bf16", "fp16" or "int8"; the 16-bit
        ones halve the bytes a step streams, int8 (one fp32 scale per output channel) quarters them;
        accumulation stays fp32. fp16 rounds 8x finer than bf16 and is the only one within 1e-2 of
        fp32: see tests/test_cpu_runtime.py and bench/RESULTS.md for the measured action differences.
        threads: worker threads (default: torch.get_num_threads()).
        max_batch: buffers are allocated once for up to this batch size.
        guided: build the backward for mode="guided" (a transposed copy of every conv weight, so
        twice the memory). Default: for DP-AG policies."""
        guided = policy.posterior is not None if guided is None else guided
        engine = _C.PolicyEngine(engine_config(policy, weights, threads, max_batch, guided), unet_weights(policy))
        return cls(engine, TorchEncoder(policy), has_cameras=policy.cfg.image is not None)

    @classmethod
    def planner(cls, policy: DPAGPolicy, **engine_options) -> Planner:
        """The plan contract over a new engine: `planner.predict_action(...)` as the policy's own."""
        return policy.planner(cls.from_policy(policy, **engine_options))

    @property
    def weight_bytes_per_step(self) -> int:
        return self.engine.weight_bytes_per_step

    def encode(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.encoder(obs)

    def denoise(self, mu: torch.Tensor, log_var: torch.Tensor | None, noise: PlanNoise, mode: str,
                rtc: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        guided = mode == "guided"
        x = torch.empty_like(noise.x)
        inpaint, latent = {}, {}
        if rtc is not None:
            inpaint = {"prefix": rtc[0].contiguous().numpy(), "prefix_weight": rtc[1].contiguous().numpy(),
                       "prefix_noise": noise.prefix.numpy()}
        if guided:
            latent["log_var"] = log_var.contiguous().numpy()
            if noise.latent is not None:
                latent["latent_noise"] = noise.latent.contiguous().numpy()
        steps = noise.steps.numpy() if noise.steps is not None else None
        self.engine.plan(mu.contiguous().numpy(), noise.x.numpy(), steps, x.numpy(), guided=guided, **latent, **inpaint)
        return x


def engine_config(policy: DPAGPolicy, weights: str = "fp32", threads: int | None = None,
                  max_batch: int = 8, guided: bool = False) -> "_C.EngineConfig":
    """The engine's config (the bound C++ struct) for a policy."""
    cfg = policy.cfg
    if guided and policy.posterior is None:
        raise ValueError("guided: needs a DP-AG policy (method='dpag'); a plain Diffusion Policy has no latent")
    sched = policy.schedule
    c = _C.EngineConfig()
    c.action_dim, c.cond_dim, c.n_obs_steps, c.horizon = cfg.action_dim, cfg.obs_feature_dim, cfg.n_obs_steps, cfg.horizon
    c.down_dims, c.kernel_size = list(cfg.unet.down_dims), cfg.unet.kernel_size
    c.diffusion_step_embed_dim, c.n_groups = cfg.unet.diffusion_step_embed_dim, cfg.unet.n_groups
    c.timesteps = [int(t) for t in sched.timesteps.tolist()]
    c.coefs = sched.coefs.cpu().to(torch.float32).tolist()   # the float32 table the reference steps with
    c.clip = sched.clip
    c.stochastic = cfg.scheduler.sampler == "ddpm" or cfg.scheduler.eta > 0
    c.inpaint_coefs = sched.inpaint_coefs.cpu().to(torch.float32).tolist()   # real-time chunking
    c.max_batch, c.weights, c.threads = int(max_batch), weights, int(threads or torch.get_num_threads())
    c.guided = bool(guided)
    latent = cfg.guidance
    c.latent_steps, c.latent_dt, c.latent_gamma = latent.steps, latent.dt, latent.gamma
    c.latent_eta, c.latent_normalize = latent.eta, latent.normalize
    return c


def unet_weights(policy: DPAGPolicy) -> dict:
    """The U-Net state_dict as float32 numpy arrays (names are the engine's keys)."""
    return {name: t.detach().to("cpu", torch.float32).contiguous().numpy()
            for name, t in policy.unet.state_dict().items()}
