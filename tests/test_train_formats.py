"""`train --data PATH` from each format: a zarr buffer, a LeRobot v3 directory, a robomimic hdf5.

The same episodes written in the three formats must train identically (same data, same windows,
same split, so the same losses step for step): the readers differ, everything after them is shared.
"""
from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest

from dpag_engine.checkpoint import load_policy
from dpag_engine.data import LeRobotWriter, make_episodes, write_replay_buffer
from dpag_engine.training.cli import main
from test_lerobot import FIXTURES, needs_fixtures
from test_robomimic import write_robomimic

STEPS = ["train.batch_size=8", "train.log_every=10", "train.eval_every=25", "train.eval_batches=1",
         "train.warmup_steps=5", "train.lr=1e-3", "train.progress=false", "policy.recipe=tiny", "policy.horizon=8",
         "policy.n_action_steps=4", "data.val_ratio=0.2"]


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path, monkeypatch):
    """data.cache_dir defaults to ~/.cache/dpag_engine: keep the tests' decoded frames out of it."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def write_all_formats(root: Path) -> dict[str, Path]:
    """One set of episodes, as zarr, LeRobot and robomimic (state split into two obs keys there)."""
    eps = make_episodes(n_episodes=10, episode_length=30, action_dim=2, state_dim=6, seed=1)
    paths = {"zarr": write_replay_buffer(root / "demo.zarr", eps)}
    with LeRobotWriter(root / "demo_lerobot", fps=10) as w:
        for e in eps:
            w.add_episode({"observation.state": e["state"], "action": e["action"]}, task="reach")
    paths["lerobot"] = root / "demo_lerobot"
    # robomimic's default state is every low-dim obs key in the file's (sorted) order: object, then eef.
    demos = [{"actions": e["action"], "obs": {"object": e["state"][:, :4], "robot0_eef_pos": e["state"][:, 4:]}}
             for e in eps]
    paths["robomimic"] = write_robomimic(root / "demo.hdf5", demos)
    return paths


def losses(run: Path) -> list[tuple[str, str, str]]:
    with (run / "log.csv").open() as f:
        return [(r["step"], r["split"], r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("steps,method", [(6, "dp"), pytest.param(50, "dpag", marks=pytest.mark.slow)])
def test_each_format_trains_identically(tmp_path, capsys, steps, method):
    paths = write_all_formats(tmp_path)
    runs = {}
    for fmt, path in paths.items():
        out = tmp_path / f"run_{fmt}"
        assert main(["--data", str(path), "--out-dir", str(out), f"train.steps={steps}", f"--method={method}",
                     *STEPS]) == 0, fmt
        assert f"data: {fmt} " in capsys.readouterr().out
        assert load_policy(out / "model.pt").checkpoint_step == steps
        runs[fmt] = losses(out)
    assert len(runs["zarr"]) == {6: 2, 50: 7}[steps]  # train rows every 10 steps and at the end, val at 25 and the end
    assert runs["lerobot"] == runs["zarr"] and runs["robomimic"] == runs["zarr"]


@needs_fixtures
@pytest.mark.slow
def test_fifty_image_steps_from_the_lerobot_video_fixture(tmp_path):
    """Cameras from the AV1 video (decoded once into the cache), no camera configuration at all."""
    out = tmp_path / "run"
    assert main(["--data", str(FIXTURES / "ur5_video"), "--out-dir", str(out), "policy.image={}",
                 f"data.cache_dir={tmp_path / 'cache'}", "train.steps=50", *STEPS, "train.batch_size=4", "policy.method=dp"]) == 0
    policy = load_policy(out / "model.pt")
    assert policy.cfg.image.cameras == ("scene",) and policy.cfg.image.image_shape == (3, 96, 96)
    assert policy.cfg.state_dim == 9 and policy.cfg.action_dim == 6
    assert len(list((tmp_path / "cache" / "frames").glob("*.npy"))) == 1


@pytest.mark.slow
def test_fifty_image_steps_from_robomimic(tmp_path):
    rng = np.random.default_rng(0)
    demos = [{"actions": rng.uniform(-1, 1, (20, 3)),
              "obs": {"robot0_eef_pos": rng.normal(size=(20, 3)),
                      "agentview_image": rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)}} for _ in range(4)]
    path = write_robomimic(tmp_path / "image.hdf5", demos)
    with h5py.File(path, "a") as f:  # robomimic's split_train_val.py output
        f.create_dataset("mask/train", data=np.array([b"demo_0", b"demo_1", b"demo_2"]))
        f.create_dataset("mask/valid", data=np.array([b"demo_3"]))
    out = tmp_path / "run"
    assert main(["--data", str(path), "--out-dir", str(out), "policy.image={}", "train.steps=50", *STEPS, "train.batch_size=4",
                 "policy.method=dp"]) == 0
    policy = load_policy(out / "model.pt")
    assert policy.cfg.image.cameras == ("agentview_image",) and policy.cfg.image.crop_shape == (28, 28)
