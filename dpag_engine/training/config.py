"""The run's configuration: TrainConfig, and a config file plus `section.key=value` overrides turned
into a plain dict, then into validated dataclasses (policy, data, train)."""
from __future__ import annotations

import ast
import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, PolicyConfig, checked_fields, require
import numpy as np

from ..data import DataConfig
from ..data.formats import parse_key_spec
from ..spec import PolicySpec, SpecError, build_spec, merge_hints


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


def spec_of(buffer, data: DataConfig, policy: PolicyConfig) -> tuple[PolicySpec | None, str]:
    """The checkpoint's spec (dpag_engine/spec.py) from the resolved data keys, the dataset's own
    hints and data.spec; None with the reason when the data does not say enough to serve it."""
    state = []
    for item in data.state_keys:
        key, part = parse_key_spec(item)
        width = int(np.prod(buffer.data[key].shape[1:], dtype=np.int64))
        a, b, _ = part.indices(width)
        state.append((key, None if (a, b) == (0, width) else (a, b), b - a))
    image = policy.image
    cameras = [(cam, key, tuple(image.image_shape)) for cam, key in data.cameras.items()] if image else []
    try:
        return build_spec(state, cameras, tuple(image.crop_shape) if image else None, policy.action_dim,
                          merge_hints(buffer.spec_hints, data.spec))
    except SpecError as err:
        raise ConfigError(str(err)) from None


def run_config_dict(policy_cfg: PolicyConfig, data: DataConfig, train: TrainConfig) -> dict[str, Any]:
    return {"policy": policy_cfg.to_dict(), "data": dataclasses.asdict(data), "train": dataclasses.asdict(train)}
