"""A run's checkpoints: checkpoints/step_N/{model.pt, training_state.pt}, saved, rotated and resumed from.

model.pt is dpag_engine.checkpoint's format (what serving loads); training_state.pt next to it holds
what an exact resume needs besides the weights: optimiser, LR scheduler, EMA step, the global RNGs,
the run's configuration and a fingerprint of the training data. There is no sampler state: the
batch order is a function of (seed, step) (see training.rng).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import CheckpointError, atomic_copy, atomic_save, load_checkpoint, safe_load, save_checkpoint
from ..config import ConfigError, PolicyConfig
from ..data import DataError
from .ema import EMA
from .rng import rng_state, set_rng_state

TRAIN_STATE_VERSION = 1
TRAIN_STATE_KEYS = ("step", "run_config", "optimizer", "lr_scheduler", "ema_step", "rng", "data_fingerprint")


def data_fingerprint(dataset) -> str:
    """Cheap identity of the training data, checked on resume (an exact resume needs the same data)."""
    h = hashlib.sha1()
    h.update(dataset.buffer.episode_ends.tobytes())
    h.update(np.ascontiguousarray(dataset.windows).tobytes())
    h.update(np.ascontiguousarray(dataset.action).tobytes())
    if dataset.state is not None:
        h.update(np.ascontiguousarray(dataset.state).tobytes())
    for cam, (frames, _, _) in sorted(dataset.images.items()):
        h.update(f"{cam}{frames.shape}{frames.dtype}".encode())
    return h.hexdigest()


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete periodic checkpoints (both files written), oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [p for p in root.glob("step_*") if (p / "model.pt").is_file() and (p / "training_state.pt").is_file()]
    return sorted(dirs, key=lambda p: int(p.name.split("_")[1]))


def run_dir_of(ckpt_dir: Path) -> Path | None:
    """The run directory holding checkpoints/<ckpt_dir>, or None for a checkpoint directory elsewhere."""
    return ckpt_dir.parent.parent if ckpt_dir.parent.name == "checkpoints" else None


def save_training_checkpoint(out_dir: Path, step: int, policy: nn.Module, ema: EMA | None,
                             optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                             run_config: dict[str, Any], fingerprint: str, world_size: int,
                             final: bool = False, keep: int = 0) -> Path:
    """checkpoints/step_N of `out_dir`; the final one is also copied to out_dir/model.pt. All but the
    `keep` newest checkpoints are then deleted (0 keeps all)."""
    meta = {"run_config": run_config, "data_fingerprint": fingerprint, "world_size": world_size,
            "torch_version": torch.__version__}
    ckpt_dir = out_dir / "checkpoints" / f"step_{step:07d}"
    state = {"format_version": TRAIN_STATE_VERSION, "step": step, "run_config": run_config,
             "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
             "ema_step": ema.step if ema else 0, "rng": rng_state(),
             "data_fingerprint": fingerprint}
    atomic_save(state, ckpt_dir / "training_state.pt")
    ema_model = ema.model if ema else None
    save_checkpoint(ckpt_dir / "model.pt", policy, ema_model, step, meta)
    if final:
        atomic_copy(ckpt_dir / "model.pt", out_dir / "model.pt")
    if keep > 0:
        for old in checkpoint_dirs(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return ckpt_dir


def load_training_state(ckpt_dir: Path) -> dict[str, Any]:
    """training_state.pt of a checkpoint directory, checked enough to resume from."""
    path = ckpt_dir / "training_state.pt"
    state = safe_load(path)
    if not isinstance(state, dict) or state.get("format_version") != TRAIN_STATE_VERSION:
        version = state.get("format_version") if isinstance(state, dict) else None
        raise CheckpointError(f"{path}: format_version {version} is not {TRAIN_STATE_VERSION}; cannot resume from it")
    missing = [k for k in TRAIN_STATE_KEYS if k not in state]
    unknown = sorted(set(map(str, state)) - {"format_version", *TRAIN_STATE_KEYS})
    if missing or unknown:
        raise CheckpointError(f"{path}: keys missing {missing}, unexpected {unknown} (corrupted?); cannot resume")
    if not isinstance(state["run_config"], dict) or not isinstance(state["run_config"].get("train"), dict):
        raise CheckpointError(f"{path}: run_config is malformed (corrupted?); cannot resume")
    return state


def find_resume_dir(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(checkpoint dir, its training state) to resume from. A run directory resumes from its newest
    intact checkpoint, saying which damaged ones it skipped; a checkpoint directory named directly is
    used or refused, never substituted."""
    path = Path(path)
    if (path / "training_state.pt").is_file():
        load_checkpoint(path / "model.pt")
        return path, load_training_state(path)
    dirs = checkpoint_dirs(path)
    if not dirs:
        raise CheckpointError(f"--resume: {path} holds neither training_state.pt nor checkpoints/step_*/ "
                              f"with model.pt + training_state.pt")
    skipped = []
    for ckpt_dir in reversed(dirs):
        try:
            load_checkpoint(ckpt_dir / "model.pt")  # intact and loadable, not merely present
            state = load_training_state(ckpt_dir)
        except CheckpointError as e:
            print(f"warning: --resume: skipping a damaged checkpoint: {e}", file=sys.stderr, flush=True)
            skipped.append(ckpt_dir.name)
            continue
        if skipped:
            print(f"warning: --resume: resuming from {ckpt_dir}, the newest intact checkpoint "
                  f"(skipped {', '.join(skipped)})", file=sys.stderr, flush=True)
        return ckpt_dir, state
    raise CheckpointError(f"--resume: no intact checkpoint in {path / 'checkpoints'} (all of {', '.join(skipped)} "
                          f"are damaged, see above)")


def restore_training_checkpoint(ckpt_dir: Path, fingerprint: str, policy_cfg: PolicyConfig, policy: nn.Module,
                                ema: EMA | None, optimizer: torch.optim.Optimizer,
                                scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Load checkpoint `ckpt_dir` into a freshly built run, which must have the same data (`fingerprint`)
    and policy config, and set the global RNGs as they were; returns the step to continue from."""
    state = load_training_state(ckpt_dir)
    if state["data_fingerprint"] != fingerprint:
        raise DataError("data.path: the training data differs from the data this run was trained on "
                        "(fingerprint mismatch); an exact resume needs the same data and split")
    model = load_checkpoint(ckpt_dir / "model.pt")
    if model["config"] != policy_cfg.to_dict():
        raise ConfigError("policy: the resolved policy config differs from the checkpoint's; "
                          "overrides of policy.* are not allowed when resuming")
    raw = model.get("raw_state_dict", model["state_dict"])
    policy.load_state_dict(raw)
    if ema is not None:
        ema.model.load_state_dict(model["state_dict"])
        ema.step = int(state["ema_step"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["lr_scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"])
