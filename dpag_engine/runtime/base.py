"""What every exported-graph backend shares: the sidecar, input checks and the DDIM loop.

The loop is DPAGPolicy.predict_action in `dp` mode with the two network calls swapped for the
backend's (`_encode`, `predict_noise`). It keeps torch tensors (zero-copy views of the backend's
arrays on CPU, device tensors for TensorRT) and steps with the same `ops.sampler_step` and the same
random draws as the reference, so a backend's chunk can be compared with DPAGPolicy's number for number.
"""
from __future__ import annotations

import abc
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import ops
from ..config import PolicyConfig
from ..diffusion import inpaint_coefficients
from ..export import EXPORT_FORMAT, EXPORT_VERSION, MANIFEST, TABLES
from ..policy import check_actions, check_normalized, check_observation, draw_plan_noise
from ..rtc import check_prefix

GUIDED_UNSUPPORTED = (
    "mode 'guided' is not supported by exported backends: it needs the vector-Jacobian product "
    "d eps / d z at every denoising step, and the exported graph has no backward pass. Serve guided "
    "mode with DPAGPolicy or dpag_engine.runtime_cpu.CpuPolicy, or use mode='dp'.")


class ExportedPolicy(abc.ABC):
    device = torch.device("cpu")

    def __init__(self, export_dir: str | os.PathLike):
        self.dir = Path(export_dir)
        manifest_path = self.dir / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path}: missing - is {self.dir} a folder written by "
                                    f"`python -m dpag_engine.export`?")
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != EXPORT_FORMAT or self.manifest.get("version") != EXPORT_VERSION:
            raise ValueError(f"{manifest_path}: format {self.manifest.get('format')!r} version "
                             f"{self.manifest.get('version')!r}, expected {EXPORT_FORMAT!r} version {EXPORT_VERSION}")
        self.cfg = PolicyConfig.from_dict(self.manifest["config"])
        self.obs_shapes = {k: tuple(v) for k, v in self.manifest["encoder"]["inputs"].items()}
        with np.load(self.dir / TABLES) as t:
            self._tables = {k: torch.from_numpy(t[k]) for k in t.files}
        # Real-time chunking's per-step noise levels: a function of the scheduler config alone.
        self._tables["inpaint_coefs"] = inpaint_coefficients(self.cfg.scheduler).float()

    def _table(self, name: str) -> torch.Tensor:
        return self._tables[name].to(self.device)

    # ---- the two network calls a backend provides ----
    @abc.abstractmethod
    def _encode(self, obs: dict[str, np.ndarray]) -> list[torch.Tensor]:
        """Checked float32 observations -> the encoder's outputs (mu[, log_var]) on self.device."""

    @abc.abstractmethod
    def predict_noise(self, sample: torch.Tensor, timestep: int | torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        """eps for sample (B, H, Da), an int (or (B,) ints) training timestep, global_cond (B, To*Do)."""

    # ---- input checks: the rules of every runtime (policy.check_observation / check_normalized) ----
    def check_obs(self, obs: dict[str, Any]) -> tuple[dict[str, np.ndarray], int]:
        """Validate keys, shapes, dtypes and finiteness; returns contiguous float32 arrays and the batch size."""
        checked, batch = check_observation(obs, self.obs_shapes)
        checked = {k: v.detach().cpu() for k, v in checked.items()}
        if "state_scale" in self._tables:   # older exports lack it: there, only the actions are checked
            for key, x in checked.items():
                x = x * self._tables["state_scale"] + self._tables["state_offset"] if key == "state" else x
                check_normalized(key, x)
        return {k: np.ascontiguousarray(v.numpy()) for k, v in checked.items()}, batch

    def encode(self, obs: dict[str, Any]) -> list[torch.Tensor]:
        """Raw observations -> [mu, log_var] ([mu] for a plain-DP model), each (B, To, Do)."""
        return self._encode(self.check_obs(obs)[0])

    @torch.no_grad()
    def predict_action(self, obs: dict[str, Any], generator: torch.Generator | None = None,
                       mode: str | None = None, noise: torch.Tensor | None = None,
                       prefix: torch.Tensor | None = None, prefix_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """DPAGPolicy.predict_action in dp mode: "action" (B, Na, Da) and "action_pred" (B, H, Da), raw units.

        The random draws are the reference's, in its order, from `generator`; `noise` (B, H, Da), if
        given, replaces the initial sample instead (e.g. to feed the same noise to two backends).
        prefix / prefix_weight: real-time chunking, as in DPAGPolicy.predict_action.
        """
        cfg = self.cfg
        mode = mode or cfg.inference_mode
        if mode == "guided":
            raise NotImplementedError(GUIDED_UNSUPPORTED)
        if mode != "dp":
            raise ValueError(f"mode: must be 'dp' or 'guided', got {mode!r}")
        arrays, b = self.check_obs(obs)
        start = cfg.n_obs_steps - 1
        rtc = check_prefix(prefix, prefix_weight, batch=b, action_dim=cfg.action_dim, max_len=cfg.horizon - start)
        mu = self._encode(arrays)[0]
        shape = (b, cfg.horizon, cfg.action_dim)
        timesteps = self._tables["timesteps"].tolist()
        draws = draw_plan_noise(cfg, len(timesteps), b, generator, 0 if rtc is None else rtc[0].shape[1], self.device)
        x = draws.x
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise: expected shape {shape}, got {tuple(noise.shape)}")
            x = noise.to(self.device, torch.float32)
        coefs, cond = self._table("coefs"), mu.flatten(1)
        clip = cfg.scheduler.clip_sample_range if cfg.scheduler.clip_sample else None
        if rtc is not None:  # as DPAGPolicy.normalized_prefix
            pre = rtc[0].to(self.device, torch.float32) * self._table("action_scale") + self._table("action_offset")
            pre = pre.clamp(-clip, clip) if clip is not None else pre
            weight = rtc[1].to(self.device)
        for i, t in enumerate(timesteps):
            eps = self.predict_noise(x, t, cond)
            step_noise = draws.steps[i] if draws.steps is not None else None
            if rtc is None:
                x, _ = ops.sampler_step(x, eps, coefs, i, step_noise, clip)
            else:
                x, _ = ops.sampler_step_inpaint(x, eps, coefs, i, step_noise, clip, pre, draws.prefix, weight,
                                                self._table("inpaint_coefs"), start)
        action_pred = check_actions((x - self._table("action_offset")) / self._table("action_scale"))
        return {"action": action_pred[:, start:start + cfg.n_action_steps], "action_pred": action_pred}
