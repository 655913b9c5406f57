"""Export a trained policy to ONNX: the observation encoder and the noise predictor, plus a sidecar.

    python -m dpag_engine.export --ckpt model.pt --format onnx --out exported/

writes

    encoder.onnx       raw obs (one input per obs key) -> mu, log_var (B, To, Do); normalisation inside
                       (a plain-DP model has no posterior: its only output is mu = the features)
    unet.onnx          sample (B, H, Da) f32, timestep (B,) int32, global_cond (B, To*Do) f32 -> eps
    dpag_export.json   config, file and tensor names, versions, and the errors measured at export
    dpag_export.npz    action un-normalisation (scale, offset), the sampler's (K, 6) coefficient
                       table and its timesteps: everything the DDIM loop needs besides the two graphs

Both graphs have a dynamic batch axis. `dpag_engine.runtime` runs them (onnxruntime, TensorRT).

The noise predictor's FiLM conditioning `Linear(Mish(concat(t_emb, g)))` splits, because Mish is
elementwise, into W_t Mish(t_emb(t)) + W_g Mish(g) + b. The first term depends on the timestep only,
so it is precomputed here for all T training timesteps into one (T, P) constant table (P = the FiLM
widths of all residual blocks side by side) and gathered by `timestep` inside the graph. The exported
U-Net therefore has no step-embedding MLP and reads only the W_g columns of each FiLM matrix, fused
into one (P, G) matmul per call. Indexing by the training timestep rather than the DDIM step keeps
the graph independent of the sampler: any K (or DDPM) runs on the same files.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import PolicyConfig
from .model.unet import ConditionalUnet1D

EXPORT_FORMAT = "dpag_engine.onnx"
EXPORT_VERSION = 1
MANIFEST = "dpag_export.json"
TABLES = "dpag_export.npz"
OPSET = 17
# Above this many weight bytes a graph's initializers go to a side file (`<name>.onnx.data`): the
# protobuf limit is 2 GB, and a separate data file also lets TensorRT / onnxruntime mmap it.
EXTERNAL_DATA_BYTES = 1 << 30
UNET_INPUTS = ("sample", "timestep", "global_cond")


def obs_keys(cfg: PolicyConfig) -> list[str]:
    """Encoder input names, in order: the cameras (config order), then "state"."""
    keys = list(cfg.image.cameras) if cfg.image is not None else []
    return keys + (["state"] if cfg.state_dim > 0 else [])


def obs_shapes(cfg: PolicyConfig) -> dict[str, tuple[int, ...]]:
    """Per-key shape without the batch axis."""
    shapes = {cam: (cfg.n_obs_steps, *cfg.image.image_shape) for cam in (cfg.image.cameras if cfg.image else ())}
    if cfg.state_dim > 0:
        shapes["state"] = (cfg.n_obs_steps, cfg.state_dim)
    return {k: shapes[k] for k in obs_keys(cfg)}


class EncoderForExport(nn.Module):
    """Raw observations (positional, in `obs_keys` order) -> (mu, log_var), or mu alone for plain DP."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.keys = obs_keys(policy.cfg)

    def forward(self, *obs: torch.Tensor):
        features = self.policy.encode(dict(zip(self.keys, obs)))
        if self.policy.posterior is None:
            return features
        return self.policy.posterior(features)


class FilmPrecomputedUnet(nn.Module):
    """ConditionalUnet1D with the timestep half of every FiLM precomputed (see the module docstring).

    Same function as `unet(sample, t, global_cond)` for integer t in [0, T): the U-Net body with
    every residual block's FiLM taken from one fused vector.
    """

    def __init__(self, unet: ConditionalUnet1D, num_train_timesteps: int):
        super().__init__()
        self.unet = unet  # only its convolutions are traced; the step MLP and FiLM Linears are not used
        blocks = unet.residual_blocks()
        dsed = unet.diffusion_step_encoder[1].in_features
        with torch.no_grad():
            # float64 once here: the table is exact to fp32 rounding whatever the reference's summation order.
            step_mlp = copy.deepcopy(unet.diffusion_step_encoder).double()
            mish_t = F.mish(step_mlp(torch.arange(num_train_timesteps)))            # (T, dsed)
            linears = [blk.cond_encoder[1] for blk in blocks]
            table = torch.cat([mish_t @ lin.weight.double()[:, :dsed].T + lin.bias.double() for lin in linears], 1)
            w_g = torch.cat([lin.weight[:, dsed:] for lin in linears], 0)            # (P, G)
        self.register_buffer("film_t", table.to(w_g.dtype))                          # (T, P)
        self.film_g = nn.Linear(w_g.shape[1], w_g.shape[0], bias=False)
        self.film_g.weight = nn.Parameter(w_g.clone())
        self.widths = [lin.out_features for lin in linears]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        film = self.film_t[timestep] + self.film_g(F.mish(global_cond))             # (B, P)
        return self.unet.forward_with_film(sample, film.split(self.widths, dim=1))


def example_obs(cfg: PolicyConfig, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Plausible raw observations for tracing and checks: images in [0, 1], state around zero."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.rand(batch, *s, generator=g) if k != "state" else torch.randn(batch, *s, generator=g))
            for k, s in obs_shapes(cfg).items()}


def example_unet_inputs(cfg: PolicyConfig, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, cfg.horizon, cfg.action_dim, generator=g),
            torch.randint(0, cfg.scheduler.num_train_timesteps, (batch,), generator=g, dtype=torch.int32),
            torch.randn(batch, cfg.global_cond_dim, generator=g))


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _export_graph(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                  external_data: bool | None) -> None:
    """One graph with a dynamic batch axis, written as a single .onnx (+ one .onnx.data when external).

    The TorchScript exporter (dynamo=False): present and equivalent in torch 2.11 and 2.13, needs no
    onnxscript, and traces these static-shape models in about a second where the dynamo exporter
    takes several. It writes > 2 GB models as one file per tensor, so every graph is written to a
    scratch folder first and re-saved here in the one-file layout.
    """
    import onnx

    dynamic = {name: {0: "batch"} for name in [*input_names, *output_names]}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and tracer warnings on constants
        scratch = Path(tmp) / path.name
        torch.onnx.export(module, args, str(scratch), dynamo=False, opset_version=OPSET,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic)
        model = onnx.load(str(scratch))
    if external_data is None:
        external_data = _weight_bytes(module) > EXTERNAL_DATA_BYTES
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # a stale side file from an earlier export would be misleading
    if external_data:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _max_abs(a: Any, b: torch.Tensor) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - b.double().numpy()).max())


def _verify(out: Path, encoder: nn.Module, unet: nn.Module, cfg: PolicyConfig, batch: int) -> dict[str, float]:
    """onnxruntime on CPU against the PyTorch modules, at a batch size other than the traced one."""
    import onnxruntime as ort

    obs = example_obs(cfg, batch, seed=1)
    sess = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in obs.items()})
    with torch.no_grad():
        want = encoder(*obs.values())
    want = want if isinstance(want, tuple) else (want,)
    errors = {f"encoder.{name}": _max_abs(g, w) for name, g, w in zip(("mu", "log_var"), got, want)}
    args = example_unet_inputs(cfg, batch, seed=1)
    sess = ort.InferenceSession(str(out / "unet.onnx"), providers=["CPUExecutionProvider"])
    (eps,) = sess.run(None, dict(zip(UNET_INPUTS, (a.numpy() for a in args))))
    with torch.no_grad():
        errors["unet.eps"] = _max_abs(eps, unet(args[0], args[1].long(), args[2]))  # the original U-Net
    return errors


def export_onnx(policy: nn.Module, out: str | Path, batch: int = 2, external_data: bool | None = None,
                verify: bool = True, tolerance: float = 1e-4) -> dict[str, Any]:
    """Write the two graphs and the sidecar to `out`; returns the manifest (also in dpag_export.json).

    external_data: None = only above EXTERNAL_DATA_BYTES of weights. verify: run both graphs in
    onnxruntime against PyTorch and fail if any max abs error exceeds `tolerance`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    policy = copy.deepcopy(policy).cpu().float().eval()  # export fp32; TensorRT lowers precision itself
    if not policy.normalizer.is_fitted:
        raise RuntimeError("export: policy.normalizer is not fitted - the graphs would bake in the identity scaling")
    cfg: PolicyConfig = policy.cfg
    keys = obs_keys(cfg)
    # eval() on the wrappers too: the exporter restores each wrapper's own train/eval flag recursively
    # afterwards, which would put a default (training) wrapper's policy back into random-crop mode.
    encoder = EncoderForExport(policy).eval()
    enc_out = ["mu"] if policy.posterior is None else ["mu", "log_var"]
    with torch.no_grad():
        _export_graph(encoder, tuple(example_obs(cfg, batch).values()), out / "encoder.onnx", keys, enc_out, external_data)
        fast_unet = FilmPrecomputedUnet(policy.unet, cfg.scheduler.num_train_timesteps).eval()
        _export_graph(fast_unet, example_unet_inputs(cfg, batch), out / "unet.onnx", list(UNET_INPUTS), ["eps"], external_data)

    # Action un-normalisation as the policy computes it: (x - offset) / scale, in fp32.
    action = policy.normalizer.affine("action", torch.float32)
    # The state's normalisation too: the runtime checks what the networks will see (planner.check_normalized).
    state = policy.normalizer.affine("state", torch.float32) if cfg.state_dim > 0 else None
    np.savez(out / TABLES, action_scale=action.scale.numpy(), action_offset=action.offset.numpy(),
             coefs=policy.schedule.coefs.numpy(), timesteps=policy.schedule.timesteps.numpy(),
             **({"state_scale": state.scale.numpy(), "state_offset": state.offset.numpy()} if state else {}))
    manifest: dict[str, Any] = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "config": cfg.to_dict(),
        "encoder": {"file": "encoder.onnx", "inputs": {k: list(s) for k, s in obs_shapes(cfg).items()}, "outputs": enc_out},
        "unet": {"file": "unet.onnx", "inputs": list(UNET_INPUTS), "outputs": ["eps"],
                 "film_table": "per-timestep FiLM term for all T training timesteps, a constant indexed by `timestep`"},
        "opset": OPSET, "torch": torch.__version__,
        "checkpoint_step": int(getattr(policy, "checkpoint_step", 0)),
    }
    if verify:
        errors = _verify(out, encoder, policy.unet, cfg, batch + 1)
        manifest["max_abs_error_vs_torch"] = errors
        bad = {k: v for k, v in errors.items() if not v <= tolerance}
        if bad:
            raise RuntimeError(f"export: onnxruntime disagrees with PyTorch beyond {tolerance}: {bad}")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Export a trained dpag_engine policy (model.pt) to ONNX.")
    p.add_argument("--ckpt", required=True, help="model.pt, or a folder holding one")
    p.add_argument("--format", choices=["onnx"], default="onnx",
                   help="onnx only: TensorRT engines are built from it at serve time (dpag_engine.runtime.tensorrt_runtime)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema")
    p.add_argument("--batch", type=int, default=2, help="batch size traced (the batch axis stays dynamic)")
    p.add_argument("--external-data", action="store_true",
                   help=f"always write weights to <graph>.onnx.data (default: only above {EXTERNAL_DATA_BYTES >> 30} GiB)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-PyTorch check")
    args = p.parse_args(argv)
    from .checkpoint import CheckpointError, load_policy

    try:
        policy = load_policy(args.ckpt, weights=args.weights)
    except CheckpointError as e:  # one line naming the file and what is wrong, as serve prints it
        print(f"error: {e}", file=sys.stderr)
        return 1
    manifest = export_onnx(policy, args.out, batch=args.batch,
                           external_data=True if args.external_data else None, verify=not args.no_verify)
    print(f"wrote {args.out}: encoder.onnx, unet.onnx, {MANIFEST}, {TABLES}")
    for name, err in manifest.get("max_abs_error_vs_torch", {}).items():
        print(f"  onnxruntime vs PyTorch, max abs error {name}: {err:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
