"""The TensorRT runtime: engines built from the exported ONNX with the standard TensorRT Python API.

    planner = TensorRTRuntime("exported/", precision="fp16").planner()   # builds (or reuses) the engines
    out = planner.predict_action({"state": s}, torch.Generator("cuda").manual_seed(0))

NOT VERIFIED: TensorRT is not installable on any machine this project runs on (no wheel on the
registries we reach, none on the GPU machine), so this file has never been executed; its test skips
when `tensorrt` is absent. It is kept to the plain API (builder -> network from the ONNX parser ->
builder config with precision flags and one optimisation profile -> serialized engine -> execution
context with set_input_shape / set_tensor_address / execute_async_v3) so it is easy to check later.
Targets TensorRT 10 (explicit batch by default); device buffers are torch CUDA tensors.

Engines are cached next to the ONNX as `<graph>.<precision>.b<max_batch>.engine`; delete them after
upgrading TensorRT or changing the card (an engine is specific to both).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .exported import ExportedRuntime

PRECISIONS = ("fp32", "fp16", "bf16")


def build_engine(onnx_path: str | os.PathLike, profile_shapes: dict[str, tuple[tuple[int, ...], ...]],
                 precision: str = "fp32", workspace_bytes: int = 4 << 30) -> bytes:
    """Serialized engine for one ONNX graph. profile_shapes: input name -> (min, opt, max) shapes.

    fp16 / bf16 allow TensorRT to choose lower-precision kernels layer by layer; the I/O stays fp32,
    so the sampler loop around the engine is the same for every precision.
    """
    import tensorrt as trt

    if precision not in PRECISIONS:
        raise ValueError(f"precision: must be one of {PRECISIONS}, got {precision!r}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: always explicit batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # also reads <graph>.onnx.data next to it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT failed to build a {precision} engine (see the log above)")
    return bytes(serialized)


class Engine:
    """One deserialized engine and its execution context; runs on torch's current CUDA stream."""

    def __init__(self, plan: bytes):
        import tensorrt as trt

        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        # trt.nptype maps the engine's dtype to numpy; torch takes it from there.
        self.out_dtypes = {n: torch.from_numpy(np.empty(0, trt.nptype(self.engine.get_tensor_dtype(n)))).dtype
                           for n in self.outputs}

    def __call__(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Contiguous CUDA tensors in, freshly allocated outputs back (in engine order)."""
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in self.outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.out_dtypes[name], device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        # The caching allocator orders frees on torch's current stream, so enqueueing there keeps
        # every input and output alive until the engine has finished with it.
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return outputs


class TensorRTRuntime(ExportedRuntime):
    """The exported encoder and U-Net as two TensorRT engines (dp mode: the graphs have no backward)."""

    name = "tensorrt"

    def __init__(self, export_dir: str | os.PathLike, precision: str = "fp32", max_batch: int = 8,
                 rebuild: bool = False):
        super().__init__(export_dir)
        self.device = torch.device("cuda")
        cfg = self.cfg

        def shapes(per_sample: dict[str, tuple[int, ...]]) -> dict[str, tuple[tuple[int, ...], ...]]:
            return {k: ((1, *s), (1, *s), (max_batch, *s)) for k, s in per_sample.items()}  # opt: B=1 serving

        unet_inputs = {"sample": (cfg.horizon, cfg.action_dim), "timestep": (), "global_cond": (cfg.global_cond_dim,)}
        self.encoder = self._engine("encoder", shapes(self.obs_shapes), precision, max_batch, rebuild)
        self.unet = self._engine("unet", shapes(unet_inputs), precision, max_batch, rebuild)

    def _engine(self, part: str, profile, precision: str, max_batch: int, rebuild: bool) -> Engine:
        onnx_path = self.dir / self.manifest[part]["file"]
        cached = Path(f"{onnx_path.with_suffix('')}.{precision}.b{max_batch}.engine")
        if rebuild or not cached.is_file():
            cached.write_bytes(build_engine(onnx_path, profile, precision))
        return Engine(cached.read_bytes())

    def _encode(self, obs: dict[str, np.ndarray]) -> list[torch.Tensor]:
        return self.encoder({k: torch.from_numpy(v).to(self.device) for k, v in obs.items()})

    def predict_noise(self, sample: torch.Tensor, timestep: int | torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        b = sample.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.int32, device=self.device).expand(b).contiguous()
        return self.unet({"sample": sample.contiguous(), "timestep": t, "global_cond": global_cond.contiguous()})[0]
