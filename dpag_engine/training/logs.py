"""The run's logs: log.csv (one row per log interval or evaluation), the same rows as TensorBoard
scalars (and optionally Weights & Biases, offline), and the loss-curve PNG drawn from log.csv."""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from ..config import ConfigError


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
