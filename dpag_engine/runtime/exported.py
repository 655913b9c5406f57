"""What every exported-graph runtime shares: the sidecar and the sampler loop.

The loop is DPAGPolicy.denoise in `dp` mode with the U-Net call swapped for the runtime's
(`predict_noise`); the checks, draws and un-normalisation are the planner's. It keeps torch tensors
(zero-copy views of the runtime's arrays on CPU, device tensors for TensorRT) and steps with the same
`ops.sampler_step` as the reference, so a runtime's chunk can be compared with DPAGPolicy's number
for number. Guided mode is not offered: it needs d eps / d z at every step, and an exported graph
has no backward pass (serve it with the torch or cpp runtime).
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
from ..normalize import Affine
from ..planner import PlanNoise, Planner

class ExportedRuntime(abc.ABC):
    """A runtime over an export folder (planner.py): encode through the exported encoder graph,
    denoise with the exported U-Net in the shared sampler loop below. Build its planner with
    `ExportedRuntime.planner()` or `dpag_engine.runtime.load_planner`."""

    device, dtype, modes, max_batch = torch.device("cpu"), torch.float32, ("dp",), None
    modes_note = "an exported graph has no backward for the latent update: serve guided mode on torch or cpp"

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
        self.num_steps = len(self._tables["timesteps"])

    def planner(self) -> Planner:
        """The plan contract over this export: its normaliser tables and the sampler's clip."""
        t, sched = self._tables, self.cfg.scheduler
        # Exports from before the state table: only the images and the actions are checked there.
        state = Affine(t["state_scale"], t["state_offset"]) if "state_scale" in t else None
        return Planner(self.cfg, state, Affine(t["action_scale"], t["action_offset"]), self,
                       sched.clip_sample_range if sched.clip_sample else None)

    def _table(self, name: str) -> torch.Tensor:
        return self._tables[name].to(self.device)

    # ---- the two network calls a backend provides ----
    @abc.abstractmethod
    def _encode(self, obs: dict[str, np.ndarray]) -> list[torch.Tensor]:
        """Checked float32 observations -> the encoder's outputs (mu[, log_var]) on self.device."""

    @abc.abstractmethod
    def predict_noise(self, sample: torch.Tensor, timestep: int | torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        """eps for sample (B, H, Da), an int (or (B,) ints) training timestep, global_cond (B, To*Do)."""

    # ---- the runtime ----
    def encode(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw observations (checked by the planner) -> (mu, log_var or None), each (B, To, Do)."""
        out = self._encode({k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in obs.items()})
        return out[0], (out[1] if len(out) > 1 else None)

    @torch.no_grad()
    def denoise(self, mu: torch.Tensor, log_var, noise: PlanNoise, mode: str, rtc) -> torch.Tensor:
        """DPAGPolicy.denoise in dp mode with the exported U-Net: the normalised chunk (B, H, Da)."""
        timesteps = self._tables["timesteps"].tolist()
        coefs, cond = self._table("coefs"), mu.flatten(1)
        sched = self.cfg.scheduler
        clip = sched.clip_sample_range if sched.clip_sample else None
        x = noise.x
        for i, t in enumerate(timesteps):
            eps = self.predict_noise(x, t, cond)
            step_noise = noise.steps[i] if noise.steps is not None else None
            if rtc is None:
                x, _ = ops.sampler_step(x, eps, coefs, i, step_noise, clip)
            else:
                x, _ = ops.sampler_step_inpaint(x, eps, coefs, i, step_noise, clip, rtc[0], noise.prefix, rtc[1],
                                                self._table("inpaint_coefs"), self.cfg.n_obs_steps - 1)
        return x
