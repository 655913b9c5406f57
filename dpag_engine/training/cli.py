"""The command line of `python -m dpag_engine.train`: options and --help (generated from the config
dataclasses), a config file or a run to resume plus overrides -> the configs, then the Trainer."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError
from ..config import POLICY_SECTIONS, ConfigError, PolicyConfig
from ..data import DataConfig, DataError
from .checkpoints import find_resume_dir, run_dir_of
from .config import TrainConfig, apply_overrides, build_configs, load_config_file
from .dist import shutdown_distributed
from .trainer import Trainer


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
        d["train"]["out_dir"] = str(run_dir_of(resume_dir) or d["train"]["out_dir"])
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
        shutdown_distributed()
    return 0
