"""The onnxruntime runtime: the exported encoder and U-Net on CPU (or CUDA where onnxruntime-gpu is installed).

    planner = OnnxRuntime("exported/").planner()            # folder from `python -m dpag_engine.export`
    out = planner.predict_action({"state": s}, torch.Generator().manual_seed(0))
    out["action"]                                          # same chunk as DPAGPolicy, dp mode
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from .exported import ExportedRuntime


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always as the fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxRuntime(ExportedRuntime):
    """The exported encoder and U-Net on onnxruntime sessions (dp mode: the graphs have no backward)."""

    name = "onnxruntime"

    def __init__(self, export_dir: str | os.PathLike, providers: Sequence[str] | None = None,
                 threads: int | None = None, spin: bool = False):
        super().__init__(export_dir)
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # onnxruntime's workers busy-wait between calls by default. Between two U-Net calls this
        # process runs the sampler step, and a robot process its control loop: spinning workers
        # would steal those cores (measured: eager torch 4x slower beside a spinning session on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.providers = list(providers or default_providers())

        def session(part: str) -> "ort.InferenceSession":
            return ort.InferenceSession(str(self.dir / self.manifest[part]["file"]), options, providers=self.providers)

        self.encoder, self.unet = session("encoder"), session("unet")

    def _encode(self, obs: dict[str, np.ndarray]) -> list[torch.Tensor]:
        return [torch.from_numpy(o) for o in self.encoder.run(None, obs)]

    def predict_noise(self, sample: torch.Tensor, timestep: int | torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        b = sample.shape[0]
        t = np.broadcast_to(np.asarray(timestep, dtype=np.int32), (b,))
        (eps,) = self.unet.run(None, {"sample": np.ascontiguousarray(sample.numpy()),
                                      "timestep": np.ascontiguousarray(t),
                                      "global_cond": np.ascontiguousarray(global_cond.numpy())})
        return torch.from_numpy(eps)
