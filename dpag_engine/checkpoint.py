"""`model.pt`: everything needed to rebuild and run a trained policy, and nothing that can run code.

A checkpoint is a plain dict saved with `torch.save` and read back only with
`torch.load(weights_only=True)`, whose unpickler accepts tensors and builtin containers/scalars and
refuses anything else (a pickle that would import and call a function is rejected before it runs):

    format_version  int            FORMAT_VERSION below; older files are migrated or refused with a reason
    kind            str            "dpag_engine.policy"
    config          dict           PolicyConfig.to_dict()
    state_dict      {str: Tensor}  EMA weights (what serving uses), normaliser buffers included
    raw_state_dict  {str: Tensor}  the optimiser's weights (absent when trained without EMA)
    step            int            optimiser steps taken
    metadata        dict           free-form builtins: train config, data info, library version

Resuming training needs more (optimiser, scheduler, RNG); that lives next to it in
`training_state.pt` (see dpag_engine.train), so a served `model.pt` stays small.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from .config import ConfigError, PolicyConfig

FORMAT_VERSION = 1
KIND = "dpag_engine.policy"

# Migrations upgrade a checkpoint dict from version v to v + 1, so any supported old file walks up
# to FORMAT_VERSION. A version with no path up is refused with the reason stored here.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}
UNSUPPORTED: dict[int, str] = {
    0: "format 0 was the pre-release layout (a bare state dict without config or normaliser); "
       "it cannot be rebuilt into a policy - retrain, or save it again with dpag_engine.checkpoint.save_checkpoint",
}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded safely; the message says which file, key or tensor is wrong."""


def _plain(value: Any, where: str) -> Any:
    """Refuse to *write* anything the weights-only loader would refuse to read."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    # Exact builtins only: subclasses (torch.__version__, numpy scalars) pickle as their own class.
    if value is None or isinstance(value, bool):
        return value
    for kind in (str, int, float):
        if isinstance(value, kind):
            return kind(value)
    raise TypeError(f"{where}: cannot store a {type(value).__name__} in a weights-only checkpoint")


def atomic_save(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """torch.save to a temporary name, then rename: a crash never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def save_checkpoint(path: str | os.PathLike, policy: torch.nn.Module, ema_policy: torch.nn.Module | None = None,
                    step: int = 0, metadata: dict[str, Any] | None = None) -> Path:
    """Write model.pt. `ema_policy` (if given) becomes `state_dict`; the trained weights are `raw_state_dict`."""
    cfg: PolicyConfig = policy.cfg
    serving = ema_policy if ema_policy is not None else policy
    ckpt = {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "config": cfg.to_dict(),
        "state_dict": _plain(dict(serving.state_dict()), "state_dict"),
        "step": int(step),
        "metadata": _plain(metadata or {}, "metadata"),
    }
    if ema_policy is not None:
        ckpt["raw_state_dict"] = _plain(dict(policy.state_dict()), "raw_state_dict")
    return atomic_save(ckpt, path)


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """torch.load(weights_only=True) with errors that say what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any global it does not know (functions, classes, arbitrary objects)
        # before calling it; say so plainly rather than suggesting weights_only=False.
        lines = str(e).splitlines()
        detail = next((ln.strip() for ln in lines if "Unsupported" in ln or "global" in ln.lower()), lines[0] if lines else "")
        raise CheckpointError(f"{path}: refused - the file contains Python objects other than tensors and "
                              f"plain containers, which could run code when loaded. Only weights-only "
                              f"checkpoints are accepted. ({detail})") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]  # an empty file raises with no message
        raise CheckpointError(f"{path}: unreadable (truncated or corrupted?): {first}") from e


def _migrate(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    version = ckpt.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: format_version missing or not an int - not a dpag_engine checkpoint "
                              f"(keys: {sorted(map(str, ckpt))[:8]})")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version} is newer than this dpag_engine understands "
                              f"({FORMAT_VERSION}); upgrade dpag_engine to load it")
    while version < FORMAT_VERSION:
        if version not in MIGRATIONS:
            reason = UNSUPPORTED.get(version, "no migration is defined from it")
            raise CheckpointError(f"{path}: format_version {version} cannot be loaded by this dpag_engine "
                                  f"(current {FORMAT_VERSION}): {reason}")
        ckpt = MIGRATIONS[version](dict(ckpt))
        version += 1
        ckpt["format_version"] = version
    return ckpt


def check_state_dict(name: str, state: Any, expected: dict[str, torch.Tensor]) -> None:
    """Keys, shapes, dtypes and finiteness against a freshly built model; the message names the tensor."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{name}: expected a dict of tensors, got {type(state).__name__}")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{name}: does not match the model built from its config - "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for key, ref in expected.items():
        t = state[key]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{name}[{key!r}]: expected a tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"{name}[{key!r}]: shape {tuple(t.shape)} in the file, the model expects "
                                  f"{tuple(ref.shape)}")
        if t.is_floating_point() != ref.is_floating_point():
            raise CheckpointError(f"{name}[{key!r}]: dtype {t.dtype} in the file, the model expects {ref.dtype}")
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise CheckpointError(f"{name}[{key!r}]: {bad} of {t.numel()} values are NaN or inf")


def _expected_state(cfg: PolicyConfig) -> dict[str, torch.Tensor]:
    """Shapes and dtypes a policy built from `cfg` has."""
    from .policy import DPAGPolicy  # here, not at the top: the policy pulls in the whole model

    try:
        with torch.device("meta"):  # shapes only: no memory for a 255 M-parameter reference
            return DPAGPolicy(cfg).state_dict()
    except (NotImplementedError, RuntimeError):  # parts that compute tables at build time need real data
        return DPAGPolicy(cfg).state_dict()


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / "model.pt" if path.is_dir() else path


def _validated(ckpt: Any, path: Path,
               build_expected: Callable[[PolicyConfig], dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Migrate and check a loaded checkpoint; adds "policy_config". `build_expected(cfg)` gives the
    state dict of a model built from the file's config, to compare keys and shapes against."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict at the top level, got {type(ckpt).__name__}")
    ckpt = _migrate(ckpt, path)
    if ckpt.get("kind") != KIND:
        raise CheckpointError(f"{path}: kind is {ckpt.get('kind')!r}, expected {KIND!r}")
    for key in ("config", "state_dict", "step"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: key {key!r} missing")
    if not isinstance(ckpt["config"], dict):
        raise CheckpointError(f"{path}: config must be a dict")
    try:
        cfg = PolicyConfig.from_dict(ckpt["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: config is invalid: {e}") from e
    expected = build_expected(cfg)
    for name in ("state_dict", "raw_state_dict"):
        if name in ckpt:
            check_state_dict(f"{path}: {name}", ckpt[name], expected)
    fitted = ckpt["state_dict"].get("normalizer.fitted")
    if fitted is not None and not bool(fitted):
        raise CheckpointError(f"{path}: state_dict['normalizer.fitted'] is False - the normaliser was never "
                              f"fitted, so actions would come out in the wrong units")
    ckpt["policy_config"] = cfg
    return ckpt


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and fully validate a model.pt (or a directory holding one); returns the dict plus
    "policy_config". See `load_policy` for the usual entry point."""
    path = _resolve(path)
    return _validated(safe_load(path, map_location), path, _expected_state)


def load_policy(path: str | os.PathLike, device: str | torch.device = "cpu", weights: str = "ema"):
    """Rebuild a DPAGPolicy from model.pt, in eval mode. weights: "ema" (serving default) or "raw"."""
    from .policy import DPAGPolicy

    if weights not in ("ema", "raw"):
        raise ValueError(f"weights: must be 'ema' or 'raw', got {weights!r}")
    path = _resolve(path)
    built: list[DPAGPolicy] = []

    def build(cfg: PolicyConfig) -> dict[str, torch.Tensor]:  # the model we load into is the reference
        built.append(DPAGPolicy(cfg))
        return built[0].state_dict()

    ckpt = _validated(safe_load(path), path, build)
    policy = built[0]
    # A run without EMA stores only the trained weights, under "state_dict".
    key = "raw_state_dict" if weights == "raw" and "raw_state_dict" in ckpt else "state_dict"
    policy.load_state_dict(ckpt[key])
    policy.checkpoint_step = int(ckpt["step"])
    return policy.to(device).eval()
