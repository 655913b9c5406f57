"""CudaGraphRuntime: a plan on a GPU as two CUDA-graph replays, the encoder and the sampler.

`DPAGPolicy.latent` (encode, posterior) and `DPAGPolicy.denoise` (K denoising steps with their latent
updates in guided mode, inpainting) read no host values and draw nothing, so each is captured once
on static buffers. A plan copies the observation and this plan's noise in (drawn by the planner, so
the actions equal predict_action's for the same generator) and replays, which releases the GIL
(torch binds CUDAGraph.replay without it). The checks, the draws and un-normalisation are the
planner's (planner.py), as for every runtime.

    planner = CudaGraphRuntime.planner(policy.cuda().eval(), batch=1, mode="dp")
    out = planner.predict_action(obs, generator)      # == policy.predict_action(obs, generator, mode="dp")

Limits: batch, mode and the real-time-chunking prefix length are fixed at capture (a graph has
static shapes: build one per shape). Every random number, the latent update's Brownian draws
included, is drawn outside the graph into its static buffers (PlanNoise), so any sampler and latent
eta replay. Not yet run on a GPU: this project has not been lent one (tests/test_runtime_cuda.py
runs where CUDA is present).
"""
from __future__ import annotations

import torch

from ..planner import PlanNoise, Planner, draw_plan_noise, obs_shapes, resolve_mode
from ..policy import DPAGPolicy


class CudaGraphRuntime:
    name = "cuda-graph"

    def __init__(self, policy: DPAGPolicy, batch: int = 1, mode: str | None = None, prefix_len: int = 0,
                 warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("CudaGraphRuntime needs a CUDA GPU (torch.cuda.is_available() is False); "
                               "on a CPU use dpag_engine.runtime.cpu.CpuRuntime")
        device = policy.schedule.coefs.device
        if device.type != "cuda":
            raise ValueError(f"policy: move it to the GPU first (policy.cuda()), it is on {device}")
        cfg, self.dtype = policy.cfg, policy.schedule.coefs.dtype
        self.policy, self.device = policy, device
        self.mode = resolve_mode(cfg, mode)
        self.modes, self.max_batch, self.num_steps = (self.mode,), batch, policy.schedule.num_steps
        self.modes_note = f"captured for mode={self.mode!r}: capture another for the other mode"
        self.batch, self.prefix_len = batch, prefix_len
        # Static inputs: every replay reads these buffers, every plan refills them.
        self.obs = {key: torch.zeros((batch, *tail), device=device, dtype=self.dtype)
                    for key, tail in obs_shapes(cfg).items()}
        self.noise = draw_plan_noise(cfg, self.num_steps, batch, None, prefix_len, device, self.dtype)
        self.rtc = None
        if prefix_len > 0:
            self.rtc = (torch.zeros((batch, prefix_len, cfg.action_dim), device=device, dtype=self.dtype),
                        torch.ones(prefix_len, device=device, dtype=self.dtype))
        self.encode_graph, (self.mu, self.log_var) = self._capture(lambda: policy.latent(self.obs), warmup)
        self.denoise_graph, self.x = self._capture(
            lambda: policy.denoise(self.mu, self.log_var, self.noise, self.mode, self.rtc), warmup)

    @classmethod
    def planner(cls, policy: DPAGPolicy, **capture_options) -> Planner:
        return policy.planner(cls(policy, **capture_options))

    @staticmethod
    @torch.no_grad()
    def _capture(body, warmup: int):
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream (kernels compile, allocator settles)
            for _ in range(warmup):
                body()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            out = body()
        return graph, out

    def encode(self, obs: dict[str, torch.Tensor]):
        b = next(iter(obs.values())).shape[0]
        if b != self.batch:
            raise ValueError(f"obs: batch {b}, but this graph was captured for batch {self.batch}")
        for key, buf in self.obs.items():
            buf.copy_(obs[key], non_blocking=True)
        self.encode_graph.replay()
        return self.mu, self.log_var

    def denoise(self, mu, log_var, noise: PlanNoise, mode: str, rtc) -> torch.Tensor:
        width = 0 if rtc is None else rtc[0].shape[1]
        if width != self.prefix_len:
            raise ValueError(f"prefix: {width} rows, but this graph was captured for prefix_len={self.prefix_len}")
        if mu is not self.mu:   # encoded elsewhere: bring it into the graph's buffers
            self.mu.copy_(mu)
            if log_var is not None and self.log_var is not None:
                self.log_var.copy_(log_var)
        for name in ("x", "prefix", "steps", "latent"):
            buf = getattr(self.noise, name)
            if buf is not None:
                buf.copy_(getattr(noise, name), non_blocking=True)
        if rtc is not None:
            for buf, value in zip(self.rtc, rtc):
                buf.copy_(value, non_blocking=True)
        self.denoise_graph.replay()
        return self.x.clone()
