"""CudaGraphPolicy: `DPAGPolicy.predict_action` on a GPU as one CUDA-graph replay per plan.

The whole plan (encode, posterior, K denoising steps with their latent updates in guided mode,
inpainting, un-normalise) is `DPAGPolicy.denoise` after `encode`: no host reads, no draws. It is
captured once on static buffers; a plan copies the observation and this plan's noise in (drawn by
`draw_plan_noise`, so the actions equal predict_action's for the same generator) and replays,
which releases the GIL (torch binds CUDAGraph.replay without it). Input checks run before the
replay, on the host, exactly as predict_action's.

    graphed = CudaGraphPolicy(policy.cuda().eval(), batch=1, mode="dp")
    out = graphed.step(obs, generator)          # == policy.predict_action(obs, generator, mode="dp")

Limits: batch and the real-time-chunking prefix length are fixed at capture (a graph has static
shapes: build one per shape). Every random number, the latent update's Brownian draws included, is
drawn outside the graph into its static buffers (PlanNoise), so any sampler and latent eta replay.
Not yet run on a
GPU: this project has not been lent one (tests/test_runtime_cuda.py runs where CUDA is present).
"""
from __future__ import annotations

import torch

from .policy import DPAGPolicy, PlanNoise, check_actions, check_network_inputs, draw_plan_noise, resolve_mode
from .rtc import check_prefix


class CudaGraphPolicy:
    def __init__(self, policy: DPAGPolicy, batch: int = 1, mode: str | None = None, prefix_len: int = 0,
                 warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("CudaGraphPolicy needs a CUDA GPU (torch.cuda.is_available() is False); "
                               "on a CPU use dpag_engine.runtime_cpu.CpuPolicy")
        device = policy.schedule.coefs.device
        if device.type != "cuda":
            raise ValueError(f"policy: move it to the GPU first (policy.cuda()), it is on {device}")
        policy._require_normalizer()
        self.policy, self.cfg = policy, policy.cfg
        self.mode = resolve_mode(policy.cfg, mode)
        cfg, dtype = self.cfg, policy.schedule.coefs.dtype
        self.batch, self.prefix_len = batch, prefix_len
        # Static inputs: every replay reads these buffers, every plan refills them.
        self.obs = {key: torch.zeros((batch, cfg.n_obs_steps, *tail), device=device, dtype=dtype)
                    for key, tail in self._obs_shapes().items()}
        self.noise = draw_plan_noise(cfg, policy.schedule.num_steps, batch, None, prefix_len, device, dtype)
        self.rtc = None
        if prefix_len > 0:
            self.rtc = (torch.zeros((batch, prefix_len, cfg.action_dim), device=device, dtype=dtype),
                        torch.ones(prefix_len, device=device, dtype=dtype))
        self.graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream (kernels compile, allocator settles)
            for _ in range(warmup):
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph):
            self.action_pred = self._body()

    def _obs_shapes(self) -> dict[str, tuple[int, ...]]:
        cfg = self.cfg
        shapes = {cam: tuple(cfg.image.image_shape) for cam in cfg.image.cameras} if cfg.image is not None else {}
        if cfg.state_dim > 0:
            shapes["state"] = (cfg.state_dim,)
        return shapes

    @torch.no_grad()
    def _body(self) -> torch.Tensor:
        return self.policy.denoise(self.policy.encode(self.obs), self.noise, self.mode, self.rtc)

    def step(self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None,
             prefix: torch.Tensor | None = None, prefix_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """As predict_action (same checks, same draws, same result); outputs are fresh tensors."""
        cfg = self.cfg
        obs, b = self.policy.check_obs(obs)
        check_network_inputs(self.policy.normalizer, obs)
        if b != self.batch:
            raise ValueError(f"obs: batch {b}, but this graph was captured for batch {self.batch}")
        start = cfg.n_obs_steps - 1
        rtc = check_prefix(prefix, prefix_weight, batch=b, action_dim=cfg.action_dim, max_len=cfg.horizon - start)
        width = 0 if rtc is None else rtc[0].shape[1]
        if width != self.prefix_len:
            raise ValueError(f"prefix: {width} rows, but this graph was captured for prefix_len={self.prefix_len}")
        for key, buf in self.obs.items():
            buf.copy_(obs[key], non_blocking=True)
        if rtc is not None:
            for buf, value in zip(self.rtc, rtc):
                buf.copy_(value, non_blocking=True)
        device = self.action_pred.device
        self._copy_noise(draw_plan_noise(cfg, self.policy.schedule.num_steps, b, generator, width, device,
                                         self.action_pred.dtype))
        self.graph.replay()
        action_pred = check_actions(self.action_pred.clone())
        return {"action": action_pred[:, start:start + cfg.n_action_steps], "action_pred": action_pred}

    def _copy_noise(self, noise: PlanNoise) -> None:
        for name in ("x", "prefix", "steps", "latent"):
            buf = getattr(self.noise, name)
            if buf is not None:
                buf.copy_(getattr(noise, name), non_blocking=True)

    __call__ = step
