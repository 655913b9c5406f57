"""Train a DP-AG (or plain Diffusion Policy) policy: `python -m dpag_engine.train --help`.

    python -m dpag_engine.train --synthetic policy.recipe=tiny train.steps=300        # demo, no data needed
    python -m dpag_engine.train --config configs/pusht_lowdim.yaml --method dp        # DP baseline
    torchrun --nproc_per_node=4 -m dpag_engine.train --config configs/pusht_image.yaml  # DDP, same command
    python -m dpag_engine.train --resume outputs/run                                  # continue exactly

One code path for both methods (`--method dp|dpag`), so they are compared with the same data order,
optimiser, schedule, EMA and evaluation. Recipe as in Diffusion Policy / the DP-AG release: AdamW
(lr 1e-4, betas 0.95/0.999, wd 1e-6), cosine schedule with warm-up, EMA (power 0.75, max 0.9999).

Reproducibility, and why resume is exact with no sampler state:
  * the batch order is a pure function of (seed, step) (data.sampler.GlobalBatchSampler);
  * the loss's randomness (timesteps, noise, crops, Brownian seed) comes from a generator reseeded
    for every (seed, step, chunk), where a chunk is one micro-batch of the global batch;
  * so step s computes the same thing whether it runs first, after a resume, or split over ranks.

Distributed: `train.batch_size` is the global batch per optimiser step. Under torchrun each rank gets
batch_size / (world * grad_accum) samples per micro-batch. The policy is wrapped as a module whose
forward *is* `compute_loss`, and that module is what DDP wraps: every U-Net call of a step (static
branch, the VJP for the force, the no-grad guided branch) happens inside one DDP forward and one
`backward()`, so each parameter's gradient is all-reduced exactly once per step. The force VJP is
`torch.autograd.grad` w.r.t. the latent only: it never reaches a parameter's gradient accumulator,
so DDP's hooks do not fire for it. Gradient accumulation uses `no_sync` on all but the last
micro-batch. Note that DP-AG's InfoNCE takes its negatives within a micro-batch, so a 2-rank run
equals a 1-rank run with grad_accum=2 (tested to 1e-5), not one with a single micro-batch of 2B.
"""
from __future__ import annotations

import argparse
import ast
import copy
import csv
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import CheckpointError, atomic_copy, atomic_save, load_checkpoint, safe_load, save_checkpoint
from .config import POLICY_SECTIONS, ConfigError, ImageEncoderConfig, PolicyConfig, checked_fields, require
from .data import (DataConfig, DataError, GlobalBatchSampler, collate_batch, load_datasets, prepare_data,
                   write_synthetic)
from .progress import progress_bar

TRAIN_STATE_VERSION = 1


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing."""

    steps: int = 10_000                    # optimiser steps in total (not epochs: the global batch sets the pace)
    batch_size: int = 64                   # global batch per optimiser step, over all ranks and accumulation
    grad_accum: int = 1                    # micro-batches per step and rank (same update, less memory)
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    weight_decay: float = 1e-6
    lr_schedule: str = "cosine"            # "cosine" (with warm-up, to 0 at `steps`) or "constant" (after warm-up)
    warmup_steps: int = 500
    grad_clip_norm: float = 0.0            # clip the global gradient norm to this; 0 disables (DP does not clip)
    ema: bool = True                       # keep an EMA of the weights; it is evaluated and served
    ema_power: float = 0.75                # decay = 1 - (1 + step / inv_gamma) ** -power, as DP's EMAModel
    ema_max_decay: float = 0.9999
    ema_inv_gamma: float = 1.0
    ema_update_after_step: int = 0
    seed: int = 42                         # model init, batch order and loss noise
    device: str = "auto"                   # "auto" (cuda if available), "cpu", "cuda"
    deterministic: bool = False            # torch.use_deterministic_algorithms (slower on GPU; CPU is already)
    log_every: int = 10                    # CSV row and progress-bar update, metrics averaged over ranks
    eval_every: int = 500                  # val loss + action MSE with the EMA weights; 0 disables
    eval_batches: int = 4                  # validation micro-batches per evaluation
    save_every: int = 1000                 # periodic checkpoint; 0: only the final one
    keep_checkpoints: int = 2              # most recent periodic checkpoints kept; 0 keeps all
    out_dir: str = "outputs/dpag"          # log.csv, loss_curve.png, model.pt, checkpoints/
    progress: bool = True                  # tqdm progress bar (rank 0)
    tensorboard: bool = True               # the log.csv scalars as TensorBoard events in out_dir (tensorboard --logdir)
    wandb: bool = False                    # also log to Weights & Biases, offline (out_dir/wandb; `wandb sync` to upload)
    find_unused_parameters: bool = False   # DDP option, only for policies with parameters a step may skip

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            require(ok, f"train.{name}", msg)
        need(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        need(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        need(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", f"must be two numbers in [0, 1), got {self.betas}")
        need(self.lr_schedule in ("cosine", "constant"), "lr_schedule", f"must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.grad_clip_norm >= 0, "grad_clip_norm", "must be >= 0 (0 disables)")
        need(0 < self.ema_max_decay < 1, "ema_max_decay", "must be in (0, 1)")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
             f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        need(self.log_every >= 1, "log_every", "must be >= 1")
        for name in ("eval_every", "save_every", "keep_checkpoints", "eval_batches"):
            need(getattr(self, name) >= 0, name, "must be >= 0")


SECTIONS = {"policy": PolicyConfig, "data": DataConfig, "train": TrainConfig}


# ----------------------------------------------------------------------------------------------
# Configuration: file + dotted overrides -> plain dict -> validated dataclasses
# ----------------------------------------------------------------------------------------------
def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib
        d = tomllib.loads(text)
    elif path.suffix == ".json":
        d = json.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ConfigError(f"--config: {path} is YAML but PyYAML is not installed "
                              f"(pip install pyyaml, or use a .toml config)") from e
        d = yaml.safe_load(text) or {}
    else:
        raise ConfigError(f"--config: {path}: use .yaml, .yml, .toml or .json")
    if not isinstance(d, dict):
        raise ConfigError(f"--config: {path} must hold a mapping with sections {sorted(SECTIONS)}")
    unknown = set(d) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown section in {path} (sections: {sorted(SECTIONS)})")
    return d


def parse_value(text: str) -> Any:
    """Command-line value -> Python: JSON/Python literals first (1e-4, true, [64, 128], None), then
    YAML flow style for unquoted strings in lists/maps ([a, b], {image: img}), else the raw string."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    if text[:1] in "[{":
        try:
            import yaml
            return yaml.safe_load(text)
        except Exception:  # noqa: BLE001 - fall through to the raw string
            pass
    return text


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`section.key=value` and `section.sub.key=value` into a nested dict (copied)."""
    d = copy.deepcopy(d)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides look like section.key=value (e.g. train.steps=200)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] not in SECTIONS or len(parts) < 2:
            raise ConfigError(f"{key}: overrides start with one of {sorted(SECTIONS)}, then a field")
        node = d
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = parse_value(value)
    return d


def build_configs(d: dict[str, Any]) -> tuple[dict[str, Any], DataConfig, TrainConfig]:
    """Validate the data and train sections; the policy section stays a dict until the data fixes
    its dimensions (see `resolve_policy_config`), but unknown or mistyped fields fail now."""
    policy = checked_fields(PolicyConfig, d.get("policy") or {}, "policy")
    try:
        data = DataConfig(**checked_fields(DataConfig, d.get("data") or {}, "data"))
        train = TrainConfig(**checked_fields(TrainConfig, d.get("train") or {}, "train"))
    except TypeError as e:
        raise ConfigError(str(e)) from e
    check_data_ranges(data)
    return policy, data, train


def check_data_ranges(data: DataConfig) -> None:
    """The ranges of the data section, checked with the others before anything is loaded (DataConfig
    lives with the readers in dpag_engine.data and checks none itself; these failed deep in loading)."""
    require(0 <= data.val_ratio < 1, "data.val_ratio", f"must be in [0, 1) (a fraction of the episodes), got {data.val_ratio}")
    require(data.max_train_episodes is None or data.max_train_episodes >= 1, "data.max_train_episodes",
            f"must be >= 1 or null, got {data.max_train_episodes}")
    require(data.num_workers >= 0, "data.num_workers", f"must be >= 0, got {data.num_workers}")


def resolve_policy_config(policy: dict[str, Any], action_dim: int, state_dim: int) -> PolicyConfig:
    """Fill Da and Ds from the data; a config that states them differently fails with both numbers."""
    policy = dict(policy)
    for key, actual in (("action_dim", action_dim), ("state_dim", state_dim)):
        given = policy.get(key)
        if given is not None and int(given) != actual:
            src = "data.action_key" if key == "action_dim" else "data.state_keys"
            raise ConfigError(f"policy.{key}: config says {given}, but {src} give {actual} features per step")
        policy[key] = actual
    return PolicyConfig.from_dict(policy)


def run_config_dict(policy_cfg: PolicyConfig, data: DataConfig, train: TrainConfig) -> dict[str, Any]:
    return {"policy": policy_cfg.to_dict(), "data": dataclasses.asdict(data), "train": dataclasses.asdict(train)}


# ----------------------------------------------------------------------------------------------
# Pieces of the training loop
# ----------------------------------------------------------------------------------------------
class LossModule(nn.Module):
    """forward == policy.compute_loss, so DDP sees all of a step's U-Net calls as one forward."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, batch: dict, generator: torch.Generator | None = None):
        return self.policy.compute_loss(batch, generator)


class EMA:
    """Diffusion Policy's EMAModel: decay = 1 - (1 + step / inv_gamma) ** -power, capped at max_decay.

    The first update copies the weights (decay 0). Buffers (normaliser statistics) are copied.
    """

    def __init__(self, model: nn.Module, power: float = 0.75, max_decay: float = 0.9999,
                 inv_gamma: float = 1.0, update_after_step: int = 0):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.power, self.max_decay, self.inv_gamma, self.update_after_step = power, max_decay, inv_gamma, update_after_step
        self.step = 0

    def decay(self) -> float:
        step = max(0, self.step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        return max(0.0, min(1 - (1 + step / self.inv_gamma) ** -self.power, self.max_decay))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay()
        ema_params, params = [], []
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            if p.requires_grad:
                ema_params.append(ema_p)
                params.append(p.detach())
            else:
                ema_p.copy_(p)
        if ema_params:  # ema = d * ema + (1 - d) * p, in the same two ops as DP (bitwise reproducible)
            torch._foreach_mul_(ema_params, d)
            torch._foreach_add_(ema_params, params, alpha=1 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)
        self.step += 1


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """diffusers' get_cosine_schedule_with_warmup (what DP uses), or constant after warm-up."""
    if step < cfg.warmup_steps:
        return step / max(1, cfg.warmup_steps)
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


TRAIN_STREAM, EVAL_LOSS_STREAM, EVAL_SAMPLE_STREAM = 0, 1, 2


def chunk_generator(seed: int, step: int, chunk: int, device: torch.device, stream: int = TRAIN_STREAM) -> torch.Generator:
    """The loss's randomness for micro-batch `chunk` of step `step`; independent of rank and history."""
    state = np.random.SeedSequence([seed, stream, step, chunk]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state >> np.uint64(1)))


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def rng_state() -> dict[str, Any]:
    """Global RNGs, as weights-only-loadable values. The loop does not draw from them (every draw uses
    a reseeded generator), but a policy or a user hook might: restore them anyway."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [random.getstate()[0], list(random.getstate()[1])],
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python"][0], tuple(state["python"][1]), None))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


# ----------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL when each rank has a GPU, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {device!r} requested but CUDA is not available")
        dev = torch.device(f"cuda:{local_rank}") if world > 1 or device in ("auto", "cuda") else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank, dev)


def all_reduce_mean(values: list[float], d: Dist, device: torch.device) -> list[float]:
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / d.world).tolist()


# ----------------------------------------------------------------------------------------------
# Logging: CSV, TensorBoard / wandb, loss curve
# ----------------------------------------------------------------------------------------------
class CsvLog:
    """log.csv, one row per log interval (split=train) or evaluation (split=val).

    Only ever appended to, so a crash cannot lose what was logged. On resume the rows up to the resume
    step stay byte for byte; rows after it (a run that went on past its last checkpoint) are cut off
    the end, to be recomputed identically. A fresh run starts a new file.
    """

    def __init__(self, path: Path, metric_names: list[str], resume_step: int | None, previous: Path | None = None):
        self.path = path
        self.columns = ["step", "split", "epoch", "lr", *metric_names, "grad_norm", "action_mse", "steps_per_s", "elapsed_s"]
        source = path if path.exists() else previous  # resuming into a new directory starts from the old log
        if resume_step is None or source is None or not source.is_file() or source.stat().st_size == 0:
            with path.open("w", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writeheader()
            return
        lines = source.read_bytes().splitlines(keepends=True)
        self.columns = next(csv.reader([lines[0].decode()]))  # the file's own columns, so rows line up
        end = len(lines[0])
        for line in lines[1:]:  # rows are in step order; a torn last line (no newline) goes too
            step = line.split(b",", 1)[0]
            if not (line.endswith(b"\n") and step.isdigit() and int(step) <= resume_step):
                break
            end += len(line)
        if source == path:
            os.truncate(path, end)
        else:
            with path.open("xb") as f:
                f.write(b"".join(lines)[:end])

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


class EventLog:
    """The rows of log.csv as TensorBoard scalars (train/<column>, val/<column>), and optionally in
    Weights & Biases (offline: nothing leaves the machine until `wandb sync`).

    On resume, `purge_step` makes TensorBoard drop what the previous run wrote after the resume step
    (those steps are recomputed identically), as CsvLog drops those rows.
    """

    def __init__(self, out_dir: Path, tensorboard: bool, use_wandb: bool, resume_step: int, config: dict):
        self.tb = self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("train.tensorboard: needs the tensorboard package (pip install tensorboard), "
                                  "or set train.tensorboard=false") from e
            self.tb = SummaryWriter(str(out_dir), purge_step=resume_step + 1 if resume_step else None)
        if use_wandb:
            try:
                import wandb
            except ImportError as e:
                raise ConfigError("train.wandb: needs the wandb package (pip install wandb)") from e
            self.wandb = wandb.init(project="dpag_engine", name=out_dir.name, dir=str(out_dir), mode="offline",
                                    config=config)

    def write(self, row: dict[str, Any]) -> None:
        split = row.get("split", "train")
        scalars = {f"{split}/{k}": float(v) for k, v in row.items()
                   if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])
            self.tb.flush()  # a few rows per minute: cheap, and a crash loses nothing
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_losses(csv_path: Path, png_path: Path, title: str = "") -> Path | None:
    """Loss curve PNG from log.csv: total and component losses (train), val loss, and the lr."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None

    def series(split: str, col: str):
        pts = [(int(r["step"]), float(r[col])) for r in rows if r["split"] == split and r.get(col) not in (None, "")]
        return ([p[0] for p in pts], [p[1] for p in pts]) if pts else None

    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for col, style in (("loss", "-"), ("loss_diff", "--"), ("loss_cont", ":"), ("loss_kl", "-.")):
        s = series("train", col)
        if s:
            ax.plot(*s, style, label=f"train {col}")
    s = series("val", "loss")
    if s:
        ax.plot(*s, "o-", label="val loss (EMA)")
    ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title)
    s = series("train", "lr")
    if s:
        ax_lr.plot(*s)
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


# ----------------------------------------------------------------------------------------------
# Checkpoints of a run
# ----------------------------------------------------------------------------------------------
def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete periodic checkpoints (both files written), oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [p for p in root.glob("step_*") if (p / "model.pt").is_file() and (p / "training_state.pt").is_file()]
    return sorted(dirs, key=lambda p: int(p.name.split("_")[1]))


TRAIN_STATE_KEYS = ("step", "run_config", "optimizer", "lr_scheduler", "ema_step", "rng", "data_fingerprint")


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


class Trainer:
    def __init__(self, policy_dict: dict[str, Any], data_cfg: DataConfig, train_cfg: TrainConfig,
                 resume_dir: Path | None = None, d: Dist | None = None):
        self.data_cfg, self.cfg = data_cfg, train_cfg
        self.d = d or setup_distributed(train_cfg.device)
        self.device = self.d.device
        self.out_dir = Path(train_cfg.out_dir)
        if self.d.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if train_cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False

        per_step = self.d.world * train_cfg.grad_accum
        if train_cfg.batch_size % per_step:
            raise ConfigError(f"train.batch_size: {train_cfg.batch_size} is not divisible by world size x grad_accum "
                              f"= {self.d.world} x {train_cfg.grad_accum}")
        self.micro_batch = train_cfg.batch_size // per_step

        # ---- data: a zarr buffer, a LeRobot v3 directory or a robomimic hdf5, told apart by content ----
        image = policy_dict.get("image")
        if isinstance(image, ImageEncoderConfig):
            image = dataclasses.asdict(image)
        if data_cfg.synthetic:
            image_cfg = ImageEncoderConfig(**image) if image is not None else None
            if image_cfg is not None and not data_cfg.cameras:
                data_cfg.cameras = {cam: cam for cam in image_cfg.cameras}  # same names in the dataset
            data_cfg.path = str(self._synthetic_data(policy_dict, image_cfg))
        # Keys resolve against the dataset (LeRobot/robomimic names need no config) and the camera
        # spec (cameras, image_shape, crop) comes from the frames where the config leaves it out.
        # Rank 0 goes first so a LeRobot video is decoded into the cache once, not once per rank.
        if self.d.enabled and not self.d.main:
            dist.barrier()
        buffer, image = prepare_data(data_cfg, image, log=print if self.d.main else None)
        if self.d.enabled and self.d.main:
            dist.barrier()
        if image is not None:
            policy_dict = {**policy_dict, "image": image}
        image_shape = tuple(ImageEncoderConfig(**image).image_shape) if image is not None else None
        n_obs, horizon, n_act = (policy_dict.get(k, getattr(PolicyConfig, k)) for k in
                                 ("n_obs_steps", "horizon", "n_action_steps"))
        self.train_set, self.val_set = load_datasets(data_cfg, int(n_obs), int(horizon), int(n_act), image_shape,
                                                     buffer=buffer)
        self.policy_cfg = resolve_policy_config(policy_dict, self.train_set.action_dim, self.train_set.state_dim)
        self.fingerprint = data_fingerprint(self.train_set)

        # ---- model, optimiser, schedule, EMA ----
        from .policy import DPAGPolicy

        seed_everything(train_cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
        self.policy = DPAGPolicy(self.policy_cfg)
        self.policy.normalizer.fit(self.train_set.normalizer_data())  # train split only
        self.policy.to(self.device)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=train_cfg.lr, betas=tuple(train_cfg.betas),
                                           weight_decay=train_cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, self.cfg))
        self.ema = EMA(self.policy, train_cfg.ema_power, train_cfg.ema_max_decay, train_cfg.ema_inv_gamma,
                       train_cfg.ema_update_after_step) if train_cfg.ema else None
        self.step = 0
        self.resumed_from: Path | None = None  # the run directory we resumed from
        self.resume_dir = resume_dir           # and the checkpoint in it
        if resume_dir is not None:
            self._load(resume_dir)
            self.resumed_from = resume_dir.parent.parent if resume_dir.parent.name == "checkpoints" else resume_dir

        self.loss_module: nn.Module = LossModule(self.policy)
        if self.d.enabled:
            # No per-step buffer sync: the only buffers are the normaliser statistics and diffusion
            # tables, identical on every rank by construction (DDP still syncs them once at init).
            # The option was renamed in recent torch; use whichever this version has.
            no_sync_buffers = ({"forward_sync_buffers": False}
                               if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                               else {"broadcast_buffers": False})
            self.loss_module = nn.parallel.DistributedDataParallel(
                self.loss_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=train_cfg.find_unused_parameters, **no_sync_buffers)

    # ---- setup helpers ----
    def _synthetic_data(self, policy_dict: dict[str, Any], image_cfg: ImageEncoderConfig | None) -> Path:
        path = self.out_dir / "synthetic.zarr"
        if self.d.main and not path.exists():
            write_synthetic(path, n_episodes=self.data_cfg.synthetic_episodes,
                            episode_length=self.data_cfg.synthetic_episode_length,
                            action_dim=int(policy_dict.get("action_dim") or PolicyConfig.action_dim),
                            state_dim=int(policy_dict.get("state_dim", PolicyConfig.state_dim)),
                            cameras=self.data_cfg.cameras,
                            image_shape=image_cfg.image_shape if image_cfg else (3, 96, 96), seed=self.cfg.seed)
        if self.d.enabled:
            dist.barrier()  # the other ranks read what rank 0 wrote
        return path

    def _load(self, ckpt_dir: Path) -> None:
        state = load_training_state(ckpt_dir)
        if state["data_fingerprint"] != self.fingerprint:
            raise DataError("data.path: the training data differs from the data this run was trained on "
                            "(fingerprint mismatch); an exact resume needs the same data and split")
        model = load_checkpoint(ckpt_dir / "model.pt")
        if model["config"] != self.policy_cfg.to_dict():
            raise ConfigError("policy: the resolved policy config differs from the checkpoint's; "
                              "overrides of policy.* are not allowed when resuming")
        raw = model.get("raw_state_dict", model["state_dict"])
        self.policy.load_state_dict(raw)
        if self.ema is not None:
            self.ema.model.load_state_dict(model["state_dict"])
            self.ema.step = int(state["ema_step"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])

    def _save(self, final: bool = False) -> Path | None:
        if not self.d.main:
            return None
        run_cfg = run_config_dict(self.policy_cfg, self.data_cfg, self.cfg)
        meta = {"run_config": run_cfg, "data_fingerprint": self.fingerprint, "world_size": self.d.world,
                "torch_version": torch.__version__}
        ckpt_dir = self.out_dir / "checkpoints" / f"step_{self.step:07d}"
        state = {"format_version": TRAIN_STATE_VERSION, "step": self.step, "run_config": run_cfg,
                 "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.scheduler.state_dict(),
                 "ema_step": self.ema.step if self.ema else 0, "rng": rng_state(),
                 "data_fingerprint": self.fingerprint}
        atomic_save(state, ckpt_dir / "training_state.pt")
        ema_model = self.ema.model if self.ema else None
        save_checkpoint(ckpt_dir / "model.pt", self.policy, ema_model, self.step, meta)
        if final:
            atomic_copy(ckpt_dir / "model.pt", self.out_dir / "model.pt")
        if self.cfg.keep_checkpoints > 0:
            for old in checkpoint_dirs(self.out_dir)[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        return ckpt_dir

    # ---- evaluation ----
    def evaluate(self) -> dict[str, float]:
        """Validation loss and sampled-action MSE over the full horizon (as DP) with the EMA weights."""
        model = self.ema.model if self.ema else self.policy
        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        dataset = self.val_set or self.train_set
        n = min(len(dataset), self.micro_batch * max(1, self.cfg.eval_batches))
        order = np.random.default_rng([self.cfg.seed, 7]).permutation(len(dataset))[:n]
        chunks = [order[i:i + self.micro_batch] for i in range(0, n, self.micro_batch)]
        if self.val_set is not None and self.cfg.eval_batches > 0:
            sums: dict[str, float] = {}
            for i, idx in enumerate(chunks):
                batch = to_device(dataset[idx.tolist()], self.device)
                # DP-AG's loss takes a VJP inside, so it needs autograd even here; nothing is stepped.
                with torch.enable_grad():
                    _, metrics = model.compute_loss(batch, chunk_generator(self.cfg.seed, 0, i, self.device, EVAL_LOSS_STREAM))
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v / len(chunks)
            out.update({k: float(v) for k, v in sums.items()})
        batch = to_device(dataset[chunks[0].tolist()], self.device)
        pred = model.predict_action(batch["obs"], generator=chunk_generator(self.cfg.seed, 0, 0, self.device, EVAL_SAMPLE_STREAM))
        # In normalised units ([-1, 1] per dimension), so the number reads the same for any dataset.
        norm = model.normalizer.normalize
        out["action_mse"] = float(torch.mean((norm("action", pred["action_pred"]) - norm("action", batch["action"])) ** 2))
        model.train(was_training)
        return out

    # ---- the loop ----
    def train(self) -> dict[str, Any]:
        cfg, d = self.cfg, self.d
        sampler = GlobalBatchSampler(len(self.train_set), self.micro_batch, cfg.grad_accum, d.rank, d.world,
                                     seed=cfg.seed, start_step=self.step, num_steps=cfg.steps)
        loader = torch.utils.data.DataLoader(
            self.train_set, batch_sampler=sampler, collate_fn=collate_batch, num_workers=self.data_cfg.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False)
        batches = iter(loader)
        chunks = list(sampler.chunk_ids())
        params = [p for p in self.policy.parameters() if p.requires_grad]
        log = events = None
        window: dict[str, float] = {}
        window_n, t_window, t0 = 0, time.perf_counter(), time.perf_counter()
        start_step = self.step
        bar = progress_bar(total=cfg.steps, initial=self.step, disable=not (d.main and cfg.progress),
                           desc=f"{self.policy_cfg.method}/{self.policy_cfg.recipe}", unit="step")
        history: list[float] = []
        self.policy.train()
        while self.step < cfg.steps:
            self.optimizer.zero_grad(set_to_none=True)
            step_terms: dict[str, torch.Tensor] = {}   # on the device until read once below
            for a, chunk in enumerate(chunks):
                batch = to_device(next(batches), self.device)
                gen = chunk_generator(cfg.seed, self.step, chunk, self.device)
                last = a == len(chunks) - 1
                sync = nullcontext() if (last or not d.enabled) else self.loss_module.no_sync()
                with sync:
                    loss, metrics = self.loss_module(batch, gen)
                    (loss / len(chunks)).backward()
                for k, v in metrics.items():
                    step_terms[k] = step_terms.get(k, 0.0) + v / len(chunks)
            terms = torch.stack([torch.as_tensor(v, device=self.device, dtype=torch.float32) for v in step_terms.values()])
            step_metrics = dict(zip(step_terms, terms.tolist()))   # one read back to the host per step
            log_now = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.steps
            grad_norm = None
            if cfg.grad_clip_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm))
            elif log_now:
                grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
            if not math.isfinite(step_metrics.get("loss", 0.0)):
                last = (checkpoint_dirs(self.out_dir) or [self.resume_dir])[-1]
                raise FloatingPointError(f"step {self.step}: loss is {step_metrics.get('loss')}; stopping "
                                         + (f"(last good checkpoint: {last})" if last else
                                            f"(no checkpoint saved yet; train.save_every={cfg.save_every})"))
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.policy)
            self.step += 1
            bar.update(1)

            if log is None and d.main:
                log = CsvLog(self.out_dir / "log.csv", list(step_metrics), start_step if start_step > 0 else None,
                             previous=self.resumed_from / "log.csv" if self.resumed_from else None)
                events = EventLog(self.out_dir, cfg.tensorboard, cfg.wandb, start_step,
                                  run_config_dict(self.policy_cfg, self.data_cfg, cfg))
            for k, v in step_metrics.items():
                window[k] = window.get(k, 0.0) + v
            window_n += 1
            if log_now:
                names = list(window)
                avg = all_reduce_mean([window[k] / window_n for k in names], d, self.device)
                now = time.perf_counter()
                row = {"step": self.step, "split": "train", "epoch": sampler.epoch_of(self.step), "lr": lr,
                       **dict(zip(names, avg)), "grad_norm": grad_norm,
                       "steps_per_s": window_n / (now - t_window), "elapsed_s": now - t0}
                history.append(row["loss"])
                if d.main:
                    log.write(row)
                    events.write(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
                window, window_n, t_window = {}, 0, now
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps) and d.main:
                t_eval = time.perf_counter()
                metrics = self.evaluate()
                log.write({"step": self.step, "split": "val", "epoch": sampler.epoch_of(self.step), **metrics})
                events.write({"step": self.step, "split": "val", **metrics})
                bar.write(f"step {self.step}: " + ", ".join(f"val {k} {v:.4g}" for k, v in metrics.items()))
                t_window += time.perf_counter() - t_eval  # steps/s measures training only
            if self.step < cfg.steps and cfg.save_every and self.step % cfg.save_every == 0:
                self._save()
        bar.close()
        if events is not None:
            events.close()
        final_dir = self._save(final=True)
        png = None
        if d.main and log is not None:
            png = plot_losses(log.path, self.out_dir / "loss_curve.png",
                              f"{self.policy_cfg.method} / {self.policy_cfg.recipe} ({self.out_dir.name})")
        if d.enabled:
            dist.barrier()
        return {"step": self.step, "losses": history, "checkpoint": final_dir, "loss_curve": png,
                "model": self.out_dir / "model.pt"}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _field_comments(cls) -> dict[str, str]:
    """`name: type = default  # comment` -> {name: comment}, read from the dataclass source so the
    --help text and the code cannot drift apart."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.+)$", src, re.M)}


def describe_options() -> str:
    lines = ["configuration (set in --config files as sections, or on the command line as section.key=value):"]

    def walk(cls, prefix: str, defaults: Any) -> None:
        comments = _field_comments(cls)
        for f in dataclasses.fields(cls):
            value = getattr(defaults, f.name) if defaults is not None else None
            name = f"{prefix}.{f.name}"
            nested = POLICY_SECTIONS.get(f.name) if cls is PolicyConfig else None
            if nested is not None:
                walk(nested, name, value if value is not None else nested())
                continue
            text = f"  {name} = {json.dumps(value) if value is None or isinstance(value, (bool, list, tuple, dict)) else value}"
            comment = comments.get(f.name, "")
            lines.append(f"{text:<52} {comment}".rstrip())

    policy_defaults = PolicyConfig()
    walk(PolicyConfig, "policy", policy_defaults)
    lines.append("    (policy.unet.* applies with policy.recipe=custom; policy.image.* enables cameras:"
                 " defaults shown when policy.image={})")
    walk(DataConfig, "data", DataConfig())
    walk(TrainConfig, "train", TrainConfig())
    lines.append("\npolicy.action_dim / policy.state_dim are taken from the data when not given.")
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dpag_engine.train",
        description="Train a DP-AG or Diffusion Policy from a zarr replay buffer, a LeRobot v3 dataset or a "
                    "robomimic hdf5 file. Writes log.csv, "
                    "loss_curve.png, model.pt and checkpoints/ into train.out_dir. Run under "
                    "`torchrun --nproc_per_node=N` for DDP (NCCL on GPU, gloo on CPU).",
        epilog=describe_options() + "\n\nexamples:\n"
               "  python -m dpag_engine.train --synthetic policy.recipe=tiny train.steps=300\n"
               "  python -m dpag_engine.train --config configs/pusht_lowdim.yaml --method dp train.out_dir=runs/dp\n"
               "  python -m dpag_engine.train --resume runs/dp\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override any configuration value below, e.g. policy.recipe=tiny train.steps=200 "
                        "'policy.unet.down_dims=[64,128]' 'data.state_keys=[keypoint,\"state[:2]\"]'")
    p.add_argument("--config", help="YAML (.yaml/.yml), TOML (.toml) or JSON file with sections policy, data, train")
    p.add_argument("--method", choices=["dpag", "dp"], help="DP-AG, or plain Diffusion Policy (same as policy.method)")
    p.add_argument("--data", metavar="PATH", help="a zarr replay buffer (.zarr directory or .zarr.zip), a LeRobot v3 "
                        "dataset directory or a robomimic .hdf5 file, told apart by content (same as data.path)")
    p.add_argument("--synthetic", action="store_true",
                   help="train on a small generated dataset written to OUT_DIR/synthetic.zarr (data.synthetic=true)")
    p.add_argument("--out-dir", help="output directory (same as train.out_dir)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue exactly from a run directory (its latest checkpoint) or a checkpoints/step_N "
                        "directory; the saved configuration is used, overrides on top (e.g. train.steps)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    return p


def resolve_cli(args: argparse.Namespace) -> tuple[dict[str, Any], Path | None]:
    """Command line -> (config dict, resume checkpoint dir)."""
    resume_dir = None
    if args.resume:
        if args.config:
            raise ConfigError("--config: not allowed with --resume (the run's saved configuration is used)")
        resume_dir, state = find_resume_dir(args.resume)
        d = copy.deepcopy(state["run_config"])
        d["train"]["out_dir"] = str(resume_dir.parent.parent) if resume_dir.parent.name == "checkpoints" else d["train"]["out_dir"]
    else:
        d = load_config_file(args.config) if args.config else {}
    flags = []
    if args.method:
        flags.append(f"policy.method={args.method}")
    if args.data:
        flags.append(f"data.path={json.dumps(args.data)}")
    if args.synthetic:
        flags.append("data.synthetic=true")
    if args.out_dir:
        flags.append(f"train.out_dir={json.dumps(args.out_dir)}")
    return apply_overrides(d, flags + list(args.overrides)), resume_dir


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_intermixed_args(argv)  # overrides may come before or after flags
    try:
        d, resume_dir = resolve_cli(args)
        policy, data_cfg, train_cfg = build_configs(d)
        if args.print_config:
            print(json.dumps({"policy": policy, "data": dataclasses.asdict(data_cfg),
                              "train": dataclasses.asdict(train_cfg)}, indent=2))
            return 0
        trainer = Trainer(policy, data_cfg, train_cfg, resume_dir)
        if trainer.d.main:
            n_params = sum(p.numel() for p in trainer.policy.parameters())
            print(f"{trainer.policy_cfg.method} / {trainer.policy_cfg.recipe}: {n_params / 1e6:.2f} M parameters, "
                  f"{len(trainer.train_set)} training windows"
                  f"{f', {len(trainer.val_set)} validation windows' if trainer.val_set else ''}, "
                  f"global batch {train_cfg.batch_size} = {trainer.d.world} rank(s) x {train_cfg.grad_accum} x "
                  f"{trainer.micro_batch}, device {trainer.device}"
                  f"{f', resuming at step {trainer.step}' if resume_dir else ''}", flush=True)
        result = trainer.train()
        if trainer.d.main:
            print(f"done: step {result['step']}, model {result['model']}, log {trainer.out_dir / 'log.csv'}, "
                  f"loss curve {result['loss_curve']}")
    except (ConfigError, DataError, CheckpointError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
