"""Replay buffer reader/writer, DP's sequence padding, the episode split, batches and bad data."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from dpag_engine.data import (DataConfig, DataError, GlobalBatchSampler, ReplayBufferWriter, SequenceDataset,
                              load_datasets, make_episodes, parse_key_spec, read_replay_buffer, sequence_windows,
                              split_episodes, write_replay_buffer)


def _episodes(n=6, length=30, seed=0):
    rng = np.random.default_rng(seed)
    return [{"action": rng.normal(size=(length + i, 2)).astype(np.float32),
             "state": rng.normal(size=(length + i, 5)).astype(np.float32),
             "keypoint": rng.normal(size=(length + i, 9, 2)).astype(np.float32),
             "img": rng.integers(0, 256, size=(length + i, 8, 8, 3), dtype=np.uint8)} for i in range(n)]


@pytest.mark.parametrize("name", ["demo.zarr", "demo.zarr.zip"])
def test_writer_reader_round_trip(tmp_path, name):
    eps = _episodes()
    write_replay_buffer(tmp_path / name, eps)
    buf = read_replay_buffer(tmp_path / name)
    lengths = [len(e["action"]) for e in eps]
    assert buf.episode_ends.tolist() == np.cumsum(lengths).tolist()
    assert buf.n_episodes == len(eps) and buf.n_steps == sum(lengths)
    for i, ep in enumerate(eps):
        got = buf.get_episode(i)
        for k in ep:
            np.testing.assert_array_equal(got[k], ep[k])
            assert got[k].dtype == ep[k].dtype
    # Only the requested keys are loaded.
    assert set(read_replay_buffer(tmp_path / name, ["action"]).data) == {"action"}


def test_written_buffer_is_dp_layout_zarr_v2(tmp_path):
    write_replay_buffer(tmp_path / "d.zarr", _episodes(2))
    root = zarr.open_group(str(tmp_path / "d.zarr"), mode="r")
    assert root.metadata.zarr_format == 2  # what DP's zarr 2.x code reads
    assert root["meta/episode_ends"].dtype == np.int64
    assert root["data/img"].shape[1:] == (8, 8, 3)


def _dp_create_indices(episode_ends, sequence_length, pad_before, pad_after):
    """Diffusion Policy's create_indices, transcribed as the oracle."""
    indices = []
    for i in range(len(episode_ends)):
        start_idx = 0 if i == 0 else episode_ends[i - 1]
        end_idx = episode_ends[i]
        episode_length = end_idx - start_idx
        for idx in range(-pad_before, episode_length - sequence_length + pad_after + 1):
            buffer_start_idx = max(idx, 0) + start_idx
            buffer_end_idx = min(idx + sequence_length, episode_length) + start_idx
            start_offset = buffer_start_idx - (idx + start_idx)
            end_offset = (idx + sequence_length + start_idx) - buffer_end_idx
            indices.append([buffer_start_idx, buffer_end_idx, start_offset, sequence_length - end_offset])
    return indices


def _dp_sample_sequence(data, sequence_length, buffer_start, buffer_end, sample_start, sample_end):
    sample = data[buffer_start:buffer_end]
    out = np.zeros((sequence_length, *data.shape[1:]), dtype=data.dtype)
    if sample_start > 0:
        out[:sample_start] = sample[0]
    if sample_end < sequence_length:
        out[sample_end:] = sample[-1]
    out[sample_start:sample_end] = sample
    return out


@pytest.mark.parametrize("horizon,n_obs,n_act", [(16, 2, 8), (8, 3, 4), (4, 1, 1)])
def test_windows_match_diffusion_policy_padding(horizon, n_obs, n_act):
    ends = np.array([10, 30, 37, 60])  # includes an episode shorter than the horizon
    data = np.arange(60, dtype=np.float32)[:, None] * np.array([[1.0, -1.0]], dtype=np.float32)
    ref = _dp_create_indices(ends, horizon, n_obs - 1, n_act - 1)
    from dpag_engine.data import ReplayBuffer
    buffer = ReplayBuffer({"action": data, "state": data}, ends)
    ds = SequenceDataset(buffer, DataConfig(state_keys=["state"]), n_obs, horizon, n_act)
    assert len(ds) == len(ref) == len(sequence_windows(ends, horizon, n_obs - 1, n_act - 1))
    batch = ds[list(range(len(ds)))]
    for i, r in enumerate(ref):
        want = _dp_sample_sequence(data, horizon, *r)
        np.testing.assert_array_equal(batch["action"][i].numpy(), want)
        np.testing.assert_array_equal(batch["obs"]["state"][i].numpy(), want[:n_obs])  # DP's key_first_k


def test_split_by_episode_like_dp():
    train, val = split_episodes(50, 0.1, seed=3)
    assert val.sum() == 5 and not (train & val).any() and (train | val).all()
    assert (split_episodes(50, 0.1, seed=3)[1] == val).all()         # deterministic
    assert split_episodes(3, 0.01)[1].sum() == 1                     # at least one val episode
    assert split_episodes(1, 0.5)[0].sum() == 1                      # never zero training episodes
    assert split_episodes(10, 0.0)[1].sum() == 0
    assert split_episodes(50, 0.1, max_train_episodes=7)[0].sum() == 7
    with pytest.raises(ValueError, match="val_ratio"):
        split_episodes(10, 1.5)


def test_dataset_key_mapping_images_and_train_only_stats(tmp_path):
    eps = _episodes(n=8)
    write_replay_buffer(tmp_path / "d.zarr.zip", eps)
    cfg = DataConfig(path=str(tmp_path / "d.zarr.zip"), state_keys=["keypoint", "state[:2]"],
                     cameras={"front": "img"}, val_ratio=0.25)
    train, val = load_datasets(cfg, n_obs_steps=2, horizon=8, n_action_steps=4, image_shape=(3, 8, 8))
    assert train.state_dim == 20 and train.action_dim == 2
    batch = train[[0, 5, 9]]
    assert batch["obs"]["state"].shape == (3, 2, 20) and batch["action"].shape == (3, 8, 2)
    img = batch["obs"]["front"]
    assert img.shape == (3, 2, 3, 8, 8) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    # Window 0 starts one step before episode 0 (pad_before = To - 1): both obs steps are frame 0.
    first_train_ep = int(np.flatnonzero(train.episode_mask)[0])
    ep = eps[first_train_ep]
    np.testing.assert_allclose(img[0, 0].numpy(), ep["img"][0].transpose(2, 0, 1) / 255, atol=1e-6)
    np.testing.assert_allclose(batch["obs"]["state"][0, 1].numpy(),
                               np.concatenate([ep["keypoint"][0].ravel(), ep["state"][0, :2]]), atol=1e-6)
    # The normaliser sees training episodes only.
    stats = train.normalizer_data()
    n_train_rows = sum(len(e["action"]) for e, m in zip(eps, train.episode_mask) if m)
    assert stats["action"].shape == (n_train_rows, 2) and stats["state"].shape == (n_train_rows, 20)
    assert val is not None and not (train.episode_mask & val.episode_mask).any()


def test_parse_key_spec():
    assert parse_key_spec("state[:2]") == ("state", slice(None, 2))
    assert parse_key_spec("a[1:-1]") == ("a", slice(1, -1))
    assert parse_key_spec("keypoint") == ("keypoint", slice(None))
    with pytest.raises(DataError, match="state_keys"):
        parse_key_spec("bad[[")


def test_global_batch_sampler_shards_and_resumes():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    single = take(GlobalBatchSampler(50, 4, grad_accum=2, seed=1), 14)        # 7 steps x 2 chunks
    r0 = take(GlobalBatchSampler(50, 4, rank=0, world_size=2, seed=1), 7)
    r1 = take(GlobalBatchSampler(50, 4, rank=1, world_size=2, seed=1), 7)
    assert r0 == single[0::2] and r1 == single[1::2]         # same data whatever the world size
    for a, b in zip(r0, r1):
        assert not set(a) & set(b)                           # disjoint shards
    flat = [i for chunk in single for i in chunk]
    assert sorted(flat[:50]) == list(range(50))              # an epoch is a permutation
    resumed = take(GlobalBatchSampler(50, 4, grad_accum=2, seed=1, start_step=3), 8)
    assert resumed == single[6:]                             # resume needs only the step


def test_synthetic_episodes_shapes():
    eps = make_episodes(n_episodes=3, episode_length=12, action_dim=3, state_dim=7, cameras={"cam": "rgb"},
                        image_shape=(3, 16, 16))
    assert eps[0]["action"].shape == (12, 3) and eps[0]["state"].shape == (12, 7)
    assert eps[0]["rgb"].shape == (12, 16, 16, 3) and eps[0]["rgb"].dtype == np.uint8


# ---------------------------------------------------------------- malformed data
def _raw_buffer(path, arrays: dict, ends):
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    for k, v in arrays.items():
        root.create_array(f"data/{k}", data=np.asarray(v))
    if ends is not None:
        root.create_array("meta/episode_ends", data=np.asarray(ends))
    return path


def test_missing_key_is_named(tmp_path):
    p = _raw_buffer(tmp_path / "b.zarr", {"state": np.zeros((10, 2), np.float32)}, [10])
    with pytest.raises(DataError, match=r"^data/action: missing .*available: data/state"):
        read_replay_buffer(p, ["action", "state"])
    p2 = _raw_buffer(tmp_path / "c.zarr", {"action": np.zeros((10, 2), np.float32)}, None)
    with pytest.raises(DataError, match=r"^meta/episode_ends: missing"):
        read_replay_buffer(p2)


def test_ragged_arrays_are_named(tmp_path):
    p = _raw_buffer(tmp_path / "b.zarr", {"action": np.zeros((10, 2), np.float32),
                                         "state": np.zeros((9, 2), np.float32)}, [4, 10])
    with pytest.raises(DataError, match=r"^data/state: has 9 rows but meta/episode_ends\[-1\] = 10"):
        read_replay_buffer(p, ["action"])  # broken even if we do not use it
    with ReplayBufferWriter(tmp_path / "w.zarr") as w:
        with pytest.raises(DataError, match=r"^data/state: episode has 3 steps"):
            w.add_episode({"action": np.zeros((4, 2)), "state": np.zeros((3, 2))})
        w.add_episode({"action": np.zeros((4, 2)), "state": np.zeros((4, 2))})


@pytest.mark.parametrize("ends,match", [([4, 4, 10], "strictly increasing, but entry 1"),
                                        ([6, 3, 10], "strictly increasing"),
                                        ([0, 10], "first episode end must be > 0"),
                                        ([[10]], "must be 1-D"),
                                        ([4.5, 10], "integers")])
def test_bad_episode_ends(tmp_path, ends, match):
    p = _raw_buffer(tmp_path / "b.zarr", {"action": np.zeros((10, 2), np.float32)}, ends)
    with pytest.raises(DataError, match=rf"^meta/episode_ends: .*{match}"):
        read_replay_buffer(p)


def test_nan_is_named_with_row(tmp_path):
    action = np.zeros((10, 2), np.float32)
    action[7, 1] = np.nan
    p = _raw_buffer(tmp_path / "b.zarr", {"action": action}, [10])
    with pytest.raises(DataError, match=r"^data/action: contains NaN or inf .*first at row 7"):
        read_replay_buffer(p)
    with pytest.raises(DataError, match=r"^data/action: contains NaN"):
        write_replay_buffer(tmp_path / "w.zarr", [{"action": action}])


def test_not_a_buffer(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_replay_buffer(tmp_path / "nope.zarr")
    (tmp_path / "x.zarr.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a zarr directory or a .zarr.zip"):
        read_replay_buffer(tmp_path / "x.zarr.zip")


def test_image_shape_mismatch_is_named(tmp_path):
    write_replay_buffer(tmp_path / "d.zarr", _episodes(2))
    cfg = DataConfig(path=str(tmp_path / "d.zarr"), cameras={"front": "img"}, val_ratio=0)
    with pytest.raises(DataError, match=r"^data/img: frames of shape \(8, 8, 3\)"):
        load_datasets(cfg, 2, 8, 4, image_shape=(3, 16, 16))
