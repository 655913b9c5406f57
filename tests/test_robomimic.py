"""robomimic hdf5: the reader, its key mapping and split, and bad files.

The files are built here with h5py following robomimic's documented layout (robomimic
docs/datasets/overview.md, "Dataset Structure" and "Filter Keys"): data/ with attrs total and
env_args, data/demo_<i>/ with attr num_samples and datasets actions (N, A), rewards, dones, states,
obs/<key> and next_obs/<key> (images uint8 channel-last), and mask/<filter key> holding demo names
(split_train_val.py writes mask/train and mask/valid).
"""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from dpag_engine.data import DataConfig, DataError, load_datasets, prepare_data, read_robomimic
from dpag_engine.data.formats import detect_format

LOWDIM = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2, "object": 10}


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path, monkeypatch):
    """data.cache_dir defaults to ~/.cache/dpag_engine: keep the tests' decoded frames out of it."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def make_demos(n=5, seed=0, image=None):
    rng = np.random.default_rng(seed)
    demos = []
    for i in range(n):
        T = 15 + 3 * i
        obs = {k: rng.normal(size=(T, d)) for k, d in LOWDIM.items()}  # float64, as robomimic stores them
        if image:
            obs["agentview_image"] = rng.integers(0, 256, size=(T, *image, 3), dtype=np.uint8)
        demos.append({"actions": rng.uniform(-1, 1, size=(T, 7)), "obs": obs})
    return demos


def write_robomimic(path, demos, mask=None, order=None):
    """robomimic's layout, written with h5py (see the module docstring for the source)."""
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["total"] = sum(len(d["actions"]) for d in demos)
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "env_type": 1, "env_kwargs": {}})
        for i in (order or range(len(demos))):
            d = demos[i]
            g = data.create_group(f"demo_{i}")
            T = len(d["actions"])
            g.attrs["num_samples"] = T
            g.create_dataset("actions", data=d["actions"])
            g.create_dataset("rewards", data=np.zeros(T))
            g.create_dataset("dones", data=np.r_[np.zeros(T - 1), 1].astype(np.int64))
            g.create_dataset("states", data=np.zeros((T, 32)))
            for k, v in d["obs"].items():
                g.create_dataset(f"obs/{k}", data=v)
                g.create_dataset(f"next_obs/{k}", data=np.concatenate([v[1:], v[-1:]]))
        for key, names in (mask or {}).items():
            f.create_dataset(f"mask/{key}", data=np.array(names, dtype="S"))
    return path


def test_reads_demos_in_robomimics_order(tmp_path):
    demos = make_demos(12)
    # Written out of order: robomimic sorts demos by their number (demo_2 before demo_10).
    path = write_robomimic(tmp_path / "low_dim.hdf5", demos, order=[10, 2, 0, 11, 1, 3, 4, 5, 6, 7, 8, 9])
    assert detect_format(path) == "robomimic"
    buf = read_robomimic(path)
    assert set(buf.data) == {"actions", *LOWDIM}
    assert buf.episode_lengths().tolist() == [len(d["actions"]) for d in demos]
    for k in LOWDIM:
        np.testing.assert_array_equal(buf.data[k], np.concatenate([d["obs"][k] for d in demos]))
    np.testing.assert_array_equal(buf.data["actions"], np.concatenate([d["actions"] for d in demos]))
    assert buf.split is None


def test_default_mapping_and_the_files_split(tmp_path):
    demos = make_demos(6, image=(64, 64))
    path = write_robomimic(tmp_path / "image.hdf5", demos,
                           mask={"train": ["demo_0", "demo_1", "demo_2", "demo_4"], "valid": ["demo_3", "demo_5"]})
    cfg = DataConfig(path=str(path), val_ratio=0.02)
    buf, image = prepare_data(cfg, {})
    assert cfg.action_key == "actions"
    assert cfg.state_keys == ["object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]  # all low-dim obs
    assert cfg.cameras == {"agentview_image": "agentview_image"}
    assert image == {"cameras": ["agentview_image"], "image_shape": [3, 64, 64], "crop_shape": [56, 56]}
    train, val = load_datasets(cfg, 2, 8, 4, (3, 64, 64), buffer=buf)
    # mask/train and mask/valid decide the split, not data.val_ratio.
    assert train.episode_mask.tolist() == [True, True, True, False, True, False]
    assert val.episode_mask.tolist() == [False, False, False, True, False, True]
    batch = train[[0, 1]]
    assert batch["obs"]["state"].shape == (2, 2, 19) and batch["obs"]["state"].dtype.is_floating_point
    assert batch["obs"]["agentview_image"].shape == (2, 2, 3, 64, 64) and batch["action"].shape == (2, 8, 7)
    # The same mapping, named explicitly, as DP's robomimic configs do; "agentview" finds agentview_image.
    cfg = DataConfig(path=str(path), action_key="action", state_keys=["robot0_eef_pos", "robot0_gripper_qpos"])
    prepare_data(cfg, {"cameras": ["agentview"]})
    assert cfg.cameras == {"agentview": "agentview_image"} and cfg.action_key == "actions"
    # val_ratio=0 turns validation off even when the file has a split.
    cfg = DataConfig(path=str(path), val_ratio=0)
    train, val = load_datasets(cfg, 2, 8, 4)
    assert val is None and train.episode_mask.all()


@pytest.mark.parametrize("breakage,match", [
    ("nan", r"^data/demo_2/obs/robot0_eef_pos: contains NaN or inf .*first at row 4"),
    ("num_samples", r"^data/demo_1: attribute num_samples = 99 but actions has 18 rows"),
    ("ragged", r"^data/demo_3/obs/object: has 23 rows but actions has 24"),
    ("shape", r"^data/demo_4/obs/object: per-step shape \(11,\) differs from data/demo_0 \(\(10,\)\)"),
    ("missing_obs", r"^data/demo_1/obs/object: missing"),
    ("no_data", r"no 'data' group"),
    ("bad_mask", r"^mask/valid: lists 'demo_9', which is not a demo"),
    ("bad_name", r"^data/trajectory_0: not a demo group"),
])
def test_bad_files_name_the_demo_and_key(tmp_path, breakage, match):
    demos = make_demos(5)
    mask = None
    if breakage == "nan":
        demos[2]["obs"]["robot0_eef_pos"][4, 1] = np.nan
    elif breakage == "ragged":
        demos[3]["obs"]["object"] = demos[3]["obs"]["object"][:-1]
    elif breakage == "shape":
        demos[4]["obs"]["object"] = np.zeros((len(demos[4]["actions"]), 11))
    elif breakage == "missing_obs":
        del demos[1]["obs"]["object"]
    elif breakage == "bad_mask":
        mask = {"train": ["demo_0"], "valid": ["demo_9"]}
    path = write_robomimic(tmp_path / "d.hdf5", demos, mask=mask)
    with h5py.File(path, "a") as f:
        if breakage == "num_samples":
            f["data/demo_1"].attrs["num_samples"] = 99
        elif breakage == "no_data":
            f.move("data", "demos")
        elif breakage == "bad_name":
            f.move("data/demo_0", "data/trajectory_0")
    with pytest.raises(DataError, match=match):
        read_robomimic(path)


def test_unknown_obs_key_lists_the_ones_there(tmp_path):
    path = write_robomimic(tmp_path / "d.hdf5", make_demos(2))
    with pytest.raises(DataError, match=r"^obs/robot0_joint_pos: missing .*available: actions, obs/object, obs/robot0_eef_pos"):
        prepare_data(DataConfig(path=str(path), state_keys=["robot0_joint_pos"]))
