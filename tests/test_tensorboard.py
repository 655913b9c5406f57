"""Training's TensorBoard event logs: every log.csv scalar (train and val rows), the learning rate,
read back with TensorBoard's own EventAccumulator; a resume leaves one value per step."""
from __future__ import annotations

import csv
import shutil

import pytest

from dpag_engine.training.cli import main

RUN = ["--synthetic", "policy.recipe=tiny", "policy.horizon=8", "policy.n_action_steps=4", "train.batch_size=8",
       "train.log_every=2", "train.eval_every=3", "train.eval_batches=1", "train.warmup_steps=2",
       "train.progress=false", "data.synthetic_episodes=8", "data.synthetic_episode_length=24"]


def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def csv_rows(run_dir):
    with (run_dir / "log.csv").open() as f:
        return list(csv.DictReader(f))


def test_every_log_csv_scalar_is_an_event(tmp_path):
    out = tmp_path / "run"
    assert main(RUN + ["train.steps=6", "--out-dir", str(out)]) == 0
    assert list(out.glob("events.out.tfevents.*")), "no event file next to log.csv"
    ev = events(out)
    rows = csv_rows(out)
    checked = 0
    for row in rows:
        for col, text in row.items():
            if col in ("step", "split") or text in ("", None):
                continue
            if row["split"] == "val" and col == "epoch":
                continue
            values = dict(ev[f"{row['split']}/{col}"])
            assert values[int(row["step"])] == pytest.approx(float(text), rel=1e-5, abs=1e-12), (row["split"], col)
            checked += 1
    tags = set(ev)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/loss_diff", "val/loss", "val/action_mse"} <= tags
    assert [s for s, _ in ev["train/loss"]] == [2, 4, 6] and [s for s, _ in ev["val/loss"]] == [3, 6]
    assert checked >= 3 * 7 + 2 * 5


def test_resume_leaves_one_value_per_step(tmp_path):
    out = tmp_path / "run"
    assert main(RUN + ["train.steps=6", "train.save_every=4", "train.keep_checkpoints=0", "--out-dir", str(out)]) == 0
    shutil.rmtree(out / "checkpoints" / "step_0000006")  # as if the run had died after logging step 6
    assert main(["--resume", str(out)]) == 0             # from step 4: steps 5-6 again
    ev = events(out)
    assert [s for s, _ in ev["train/loss"]] == [2, 4, 6]
    assert [s for s, _ in ev["val/loss"]] == [3, 6]
    last = {int(r["step"]): float(r["loss"]) for r in csv_rows(out) if r["split"] == "train"}
    assert dict(ev["train/loss"])[6] == pytest.approx(last[6], rel=1e-5)


def test_tensorboard_off_writes_no_events(tmp_path):
    out = tmp_path / "run"
    assert main(RUN + ["train.steps=4", "train.tensorboard=false", "--out-dir", str(out)]) == 0
    assert not list(out.glob("events.out.tfevents.*")) and (out / "log.csv").is_file()


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is optional (pip install -e .[wandb])")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert main(RUN + ["train.steps=4", "train.wandb=true", "--out-dir", str(out)]) == 0
    assert list((out / "wandb").glob("offline-run-*"))
