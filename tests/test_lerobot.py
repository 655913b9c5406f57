"""LeRobotDataset v3: the reader and the writer against datasets written and read back by lerobot 0.4.4.

The oracles live in shared/fixtures/lerobot_v3/ beside the repository (see its README): ur5_video/
and ur5_images/ were written by lerobot's own LeRobotDataset.create/add_frame/save_episode/finalize
(make_fixture.py there), and expected_frames.npz is what lerobot itself reads back from them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dpag_engine.data import (DataConfig, DataError, LeRobotWriter, load_datasets, prepare_data, read_lerobot,
                              read_replay_buffer, write_replay_buffer)
from dpag_engine.data import lerobot as lr
from dpag_engine.data import video
from dpag_engine.data.convert import convert
from dpag_engine.data.convert import main as convert_main

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "lerobot_v3"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"reference fixtures not found at {FIXTURES} "
                                    "(shared/ beside the repository holds them)")
TASK = "reach past the sphere"
FEATURES = {  # exactly what make_fixture.py declared to lerobot
    "observation.state": {"dtype": "float32", "shape": (9,), "names": [f"s{i}" for i in range(9)]},
    "action": {"dtype": "float32", "shape": (6,), "names": [f"j{i}" for i in range(6)]},
    "observation.images.scene": {"dtype": "video", "shape": (96, 96, 3), "names": ["height", "width", "channels"]},
}


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path, monkeypatch):
    """data.cache_dir defaults to ~/.cache/dpag_engine: keep the tests' decoded frames out of it."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def fixture_episodes():
    """The frames make_fixture.py fed lerobot, episode by episode."""
    for ep in range(4):
        n = 20 + 5 * ep
        t = np.arange(n)
        img = np.zeros((n, 96, 96, 3), np.uint8)
        img[..., 0] = ((t * 10) % 256)[:, None, None]
        for i in t:
            img[i, 10 + ep * 5: 30 + ep * 5, 20 + i:40 + i, 1] = 255
        yield {"observation.state": (np.arange(9) * 0.1 + t[:, None] * 0.01 + ep).astype(np.float32),
               "action": (np.arange(6) * 0.2 + t[:, None] * 0.01 + ep).astype(np.float32),
               "observation.images.scene": img}


def write_like_fixture(root: Path, use_videos: bool) -> Path:
    features = {k: {**v, "dtype": "video" if use_videos else "image"} if "images" in k else v for k, v in FEATURES.items()}
    with LeRobotWriter(root, fps=10, features=features, robot_type="ur5", use_videos=use_videos) as w:
        for ep in fixture_episodes():
            w.add_episode(ep, task=TASK)
    return root


def _pq(path):
    import pyarrow.parquet as pq
    return pq.read_table(path)


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------- reader vs the reference library
@needs_fixtures
@pytest.mark.parametrize("name", ["ur5_video", "ur5_images"])
def test_reader_matches_what_lerobot_reads_back(name, tmp_path):
    expected = np.load(FIXTURES / "expected_frames.npz")
    buf = read_lerobot(FIXTURES / name, cache_dir=tmp_path)
    assert set(buf.data) == {"observation.state", "action", "observation.images.scene"}
    np.testing.assert_array_equal(buf.data["observation.state"], expected["state"])
    np.testing.assert_array_equal(buf.data["action"], expected["action"])
    lengths = buf.episode_lengths()
    np.testing.assert_array_equal(np.repeat(np.arange(buf.n_episodes), lengths), expected["episode_index"])
    np.testing.assert_array_equal(np.concatenate([np.arange(n) for n in lengths]), expected["frame_index"])
    frames = buf.data["observation.images.scene"]
    assert frames.shape == (110, 96, 96, 3) and frames.dtype == np.uint8
    err = np.abs(frames.transpose(0, 3, 1, 2).astype(int) - expected["image_chw_uint8"])
    if name == "ur5_images":
        assert err.max() == 0                      # PNG: lossless
    else:
        # AV1 at CRF 30 is lossy: the README measures 1.07 per pixel with PyAV; a frame taken from
        # the wrong timestamp would be ~10 off (the red channel steps by 10 per frame).
        assert err.mean() < 2.0 and err.reshape(110, -1).mean(axis=1).max() < 3.0


@needs_fixtures
def test_av1_decodes_with_the_pyav_wheel():
    import av
    av.codec.Codec("libdav1d", "r")  # the AV1 decoder bundled in PyAV's wheels
    with av.open(str(FIXTURES / "ur5_video/videos/observation.images.scene/chunk-000/file-000.mp4")) as c:
        assert c.streams.video[0].codec_context.name in ("libdav1d", "av1")


@needs_fixtures
def test_video_is_decoded_once_into_the_cache(tmp_path, monkeypatch):
    first = read_lerobot(FIXTURES / "ur5_video", cache_dir=tmp_path)
    assert len(list((tmp_path / "frames").glob("*.npy"))) == 1

    def no_decode(*a, **k):
        raise AssertionError("decoded again despite a cache entry")
    monkeypatch.setattr(lr, "decode_at", no_decode)
    second = read_lerobot(FIXTURES / "ur5_video", cache_dir=tmp_path)
    assert isinstance(second.data["observation.images.scene"], np.memmap)
    np.testing.assert_array_equal(second.data["observation.images.scene"], first.data["observation.images.scene"])
    # Only the requested keys are loaded: no camera requested, nothing decoded.
    assert set(read_lerobot(FIXTURES / "ur5_video", ["action"], cache_dir=None).data) == {"action"}


@needs_fixtures
def test_standard_names_map_without_configuration(tmp_path):
    cfg = DataConfig(path=str(FIXTURES / "ur5_video"), cache_dir=str(tmp_path))
    buf, image = prepare_data(cfg, {})                     # policy.image={} and nothing else
    assert (cfg.action_key, cfg.state_keys, cfg.cameras) == ("action", ["observation.state"],
                                                             {"scene": "observation.images.scene"})
    assert image == {"cameras": ["scene"], "image_shape": [3, 96, 96], "crop_shape": [84, 84]}
    train, _ = load_datasets(cfg, 2, 8, 4, tuple(image["image_shape"]), buffer=buf)
    batch = train[[0, 1]]
    assert batch["obs"]["state"].shape == (2, 2, 9) and batch["action"].shape == (2, 8, 6)
    assert batch["obs"]["scene"].shape == (2, 2, 3, 96, 96)


@needs_fixtures
def test_windows_and_padding_are_the_zarr_paths(tmp_path):
    """The same episodes from LeRobot and from a zarr buffer give identical batches."""
    zarr_path = convert(FIXTURES / "ur5_images", tmp_path / "same.zarr")
    a = DataConfig(path=str(FIXTURES / "ur5_images"), cameras={"scene": "scene"}, val_ratio=0.25)
    b = DataConfig(path=str(zarr_path), cameras={"scene": "scene"}, val_ratio=0.25)
    train_a, val_a = load_datasets(a, 2, 16, 8, (3, 96, 96))
    train_b, val_b = load_datasets(b, 2, 16, 8, (3, 96, 96))
    assert b.state_keys == ["state"] and a.state_keys == ["observation.state"]
    idx = list(range(len(train_a)))
    assert len(train_a) == len(train_b) and (train_a.episode_mask == train_b.episode_mask).all()
    xa, xb = train_a[idx], train_b[idx]
    for k in ("state", "scene"):
        assert np.array_equal(xa["obs"][k].numpy(), xb["obs"][k].numpy())
    assert np.array_equal(xa["action"].numpy(), xb["action"].numpy())


# ---------------------------------------------------------------- writer vs the reference library
@needs_fixtures
@pytest.mark.parametrize("name,use_videos", [("ur5_video", True), ("ur5_images", False)])
def test_writer_lays_out_types_and_describes_like_lerobot(name, use_videos, tmp_path):
    ref, mine = FIXTURES / name, write_like_fixture(tmp_path / name, use_videos)
    assert _files(mine) == _files(ref)
    assert (mine / "meta/info.json").read_text() == (ref / "meta/info.json").read_text()  # byte for byte
    for f in ("data/chunk-000/file-000.parquet", "meta/episodes/chunk-000/file-000.parquet", "meta/tasks.parquet"):
        a, b = _pq(mine / f), _pq(ref / f)
        assert a.schema.equals(b.schema), f                 # column names, order, types, fixed list sizes
        if f.startswith("data/"):                           # `datasets` features; the fingerprint differs
            meta = [json.loads(t.schema.metadata[b"huggingface"]) for t in (a, b)]
            assert meta[0]["info"] == meta[1]["info"]
        else:
            assert a.schema.equals(b.schema, check_metadata=True), f
        import pyarrow.parquet as pq
        groups = [[m.row_group(i).num_rows for i in range(m.num_row_groups)] for m in map(pq.read_metadata, (mine / f, ref / f))]
        assert groups[0] == groups[1], f                    # one row group per episode, as lerobot
    data, ref_data = _pq(mine / "data/chunk-000/file-000.parquet"), _pq(ref / "data/chunk-000/file-000.parquet")
    for col in ("observation.state", "action", "timestamp", "frame_index", "episode_index", "index", "task_index"):
        assert data.column(col).equals(ref_data.column(col)), col
    if not use_videos:  # the PNGs themselves are byte-identical
        assert data.column("observation.images.scene").equals(ref_data.column("observation.images.scene"))
    assert _pq(mine / "meta/tasks.parquet").equals(_pq(ref / "meta/tasks.parquet"))

    # Episode metadata: every non-stats column equal; stats as lerobot computes them, except the
    # image std, which lerobot 0.4.4 computes with uint8 overflow (see lerobot._stats).
    eps, ref_eps = _pq(mine / "meta/episodes/chunk-000/file-000.parquet"), _pq(ref / "meta/episodes/chunk-000/file-000.parquet")
    for col in ref_eps.column_names:
        if col == "stats/observation.images.scene/std":
            continue
        x, y = eps.column(col).to_pylist(), ref_eps.column(col).to_pylist()
        if col.startswith("stats/"):
            np.testing.assert_allclose(np.array(x, float), np.array(y, float), rtol=1e-6, atol=1e-12, err_msg=col)
        else:
            assert x == y, col
    stats, ref_stats = (json.loads((r / "meta/stats.json").read_text()) for r in (mine, ref))
    assert set(stats) == set(ref_stats)
    for key, st in ref_stats.items():
        assert list(stats[key]) == list(st)
        for s, v in st.items():
            if (key, s) != ("observation.images.scene", "std"):
                np.testing.assert_allclose(np.array(stats[key][s], float), np.array(v, float), rtol=1e-6, atol=1e-12,
                                           err_msg=f"{key}/{s}")
    if use_videos:
        import av
        path = "videos/observation.images.scene/chunk-000/file-000.mp4"
        props = []
        for root in (mine, ref):
            with av.open(str(root / path)) as c:
                s = c.streams.video[0]
                props.append((s.codec.canonical_name, s.pix_fmt, s.width, s.height, s.time_base, s.duration, s.frames,
                              sum(p.is_keyframe for p in c.demux(s) if p.pts is not None)))
        assert props[0] == props[1]

    # Read back through our reader: what was written.
    back = read_lerobot(mine, cache_dir=None)
    episodes = list(fixture_episodes())
    assert back.episode_lengths().tolist() == [len(e["action"]) for e in episodes]
    for key in ("observation.state", "action", "observation.images.scene"):
        want = np.concatenate([e[key] for e in episodes])
        got = back.data[key]
        if key.startswith("observation.images") and use_videos:
            assert np.abs(got.astype(int) - want).mean() < 2.0
        else:
            np.testing.assert_array_equal(got, want)


def test_image_std_is_the_true_std(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(30, 16, 16, 3), dtype=np.uint8)
    stats = lr.episode_stats({"cam": frames}, {"cam": {"dtype": "image", "shape": [16, 16, 3]}})["cam"]
    assert stats["mean"].shape == (3, 1, 1) and stats["count"].tolist() == [30]
    px = frames.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(stats["std"].ravel(), px.std(axis=0), rtol=1e-9)
    np.testing.assert_allclose(stats["mean"].ravel(), px.mean(axis=0), rtol=1e-9)


def _episodes(n=5, seed=0, cams=((64, 64),)):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        T = 12 + i
        ep = {"observation.state": rng.normal(size=(T, 3)).astype(np.float32),
              "action": rng.normal(size=(T, 2)).astype(np.float32)}
        for c, (h, w) in enumerate(cams):
            ep[f"observation.images.cam{c}"] = rng.integers(0, 256, size=(T, h, w, 3), dtype=np.uint8)
        out.append(ep)
    return out


def test_many_files_and_chunks_read_back(tmp_path):
    """Episodes spread over several data/video files and chunks (tiny size limits) read back in order."""
    eps = _episodes(6, cams=((32, 32),))
    with LeRobotWriter(tmp_path / "d", fps=15, chunks_size=2, data_files_size_in_mb=0.0005,
                       video_files_size_in_mb=0.01) as w:
        for e in eps:
            w.add_episode(e, task="t")
    files = _files(tmp_path / "d")
    assert len([f for f in files if f.startswith("data/")]) > 2 and any("chunk-001" in f for f in files)
    assert len([f for f in files if f.startswith("videos/")]) > 1
    back = read_lerobot(tmp_path / "d")
    for k in ("observation.state", "action"):
        np.testing.assert_array_equal(back.data[k], np.concatenate([e[k] for e in eps]))
    err = np.abs(back.data["observation.images.cam0"].astype(int) - np.concatenate([e["observation.images.cam0"] for e in eps]))
    assert err.mean() < 60  # random noise compresses badly; the rows are in the right order (see below)
    # Frame order: a per-frame constant colour survives compression, so each row must match its own.
    flat = [dict(e, **{"observation.images.cam0": np.broadcast_to((np.arange(len(e["action"])) * 9 + 7 * i)[:, None, None, None] % 256,
                                                                   e["observation.images.cam0"].shape).astype(np.uint8)})
            for i, e in enumerate(eps)]
    with LeRobotWriter(tmp_path / "c", fps=15, chunks_size=2, video_files_size_in_mb=0.001) as w:
        for e in flat:
            w.add_episode(e)
    got = read_lerobot(tmp_path / "c").data["observation.images.cam0"].astype(int)
    want = np.concatenate([e["observation.images.cam0"] for e in flat]).astype(int)
    assert np.abs(got - want).max() <= 3


def test_cameras_smaller_than_the_crop_and_of_different_sizes(tmp_path):
    with LeRobotWriter(tmp_path / "d", fps=10, use_videos=False) as w:
        for e in _episodes(3, cams=((48, 64), (64, 64))):
            w.add_episode(e)
    cfg = DataConfig(path=str(tmp_path / "d"), val_ratio=0)
    buf, image = prepare_data(cfg, {})
    # One image_shape for the policy: the smaller camera's; the other is resized to it on load.
    assert image == {"cameras": ["cam0", "cam1"], "image_shape": [3, 48, 64], "crop_shape": [42, 56]}
    assert buf.data["observation.images.cam1"].shape[1:] == (48, 64, 3)
    train, _ = load_datasets(cfg, 2, 8, 4, (3, 48, 64), buffer=buf)
    assert train[[0]]["obs"]["cam1"].shape == (1, 2, 3, 48, 64)


def test_other_names_through_the_mapping(tmp_path):
    rng = np.random.default_rng(1)
    with LeRobotWriter(tmp_path / "d", fps=10, use_videos=False) as w:
        for T in (10, 12):
            w.add_episode({"observation.joints": rng.normal(size=(T, 4)).astype(np.float32),
                           "observation.gripper": rng.normal(size=(T,)).astype(np.float32),
                           "observation.images.top": rng.integers(0, 256, (T, 32, 32, 3), dtype=np.uint8),
                           "cmd": rng.normal(size=(T, 3)).astype(np.float32)})
    cfg = DataConfig(path=str(tmp_path / "d"), action_key="cmd", state_keys=["joints[:2]", "gripper"],
                     cameras={"front": "top"}, val_ratio=0)
    buf, image = prepare_data(cfg, {"crop_shape": [28, 28]})
    assert cfg.state_keys == ["observation.joints[:2]", "observation.gripper"]
    assert cfg.cameras == {"front": "observation.images.top"} and image["image_shape"] == [3, 32, 32]
    train, _ = load_datasets(cfg, 1, 4, 2, (3, 32, 32), buffer=buf)
    assert train.state_dim == 3 and train.action_dim == 3
    # Without `state`, the default state is every low-dim observation.
    cfg = DataConfig(path=str(tmp_path / "d"), action_key="cmd")
    prepare_data(cfg)
    assert cfg.state_keys == ["observation.joints", "observation.gripper"]


# ---------------------------------------------------------------- malformed datasets
def _small(tmp_path, **kw) -> Path:
    with LeRobotWriter(tmp_path / "d", fps=10, **kw) as w:
        for e in _episodes(2):
            w.add_episode(e)
    return tmp_path / "d"


def test_a_hub_id_or_an_old_version_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"^lerobot/pusht: no such directory; it looks like a Hugging Face Hub dataset id.*only local paths"):
        prepare_data(DataConfig(path="lerobot/pusht"))
    with pytest.raises(DataError, match=r"no such file or directory"):  # a missing local file is just missing
        prepare_data(DataConfig(path="data/pusht.zarr"))
    root = _small(tmp_path, use_videos=False)
    info = json.loads((root / "meta/info.json").read_text())
    (root / "meta/info.json").write_text(json.dumps({**info, "codebase_version": "v2.1"}))
    with pytest.raises(DataError, match=r"info.json: codebase_version v2.1; only LeRobotDataset v3.x.*convert_dataset_v21_to_v30"):
        read_lerobot(root)


@pytest.mark.parametrize("breakage,match", [
    ("no_info", r"meta/info.json: missing"),
    ("no_data", r"data/chunk-000/file-000.parquet: data file missing"),
    ("no_video", r"file-000.mp4: video file missing"),
    ("no_episodes", r"meta/episodes: no chunk-\*/file-\*.parquet"),
    ("bad_json", r"meta/info.json: not valid JSON"),
    ("short_episode", r"episode 1 has 12 frames, meta/episodes says 13"),
    ("nan_state", r"^features/observation.state: contains NaN or inf .*first at row 3"),
    ("wrong_shape", r"column 'action' holds 2 values per frame, meta/info.json says shape \[5\]"),
    ("bad_timestamps", r"no frame within 0.0001 s of timestamp"),
])
def test_malformed_datasets_name_the_file_or_key(tmp_path, breakage, match):
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = _small(tmp_path)
    data = root / "data/chunk-000/file-000.parquet"
    info_path = root / "meta/info.json"
    info = json.loads(info_path.read_text())
    if breakage == "no_info":
        info_path.unlink()
    elif breakage == "no_data":
        data.unlink()
    elif breakage == "no_video":
        next(root.glob("videos/*/chunk-000/file-000.mp4")).unlink()
    elif breakage == "no_episodes":
        shutil.rmtree(root / "meta/episodes")
    elif breakage == "bad_json":
        info_path.write_text("{")
    elif breakage in ("short_episode", "nan_state", "bad_timestamps"):
        t = pq.read_table(data)
        if breakage == "short_episode":
            t = t.slice(0, t.num_rows - 1)
        elif breakage == "nan_state":
            s = t.column("observation.state").combine_chunks()
            v = s.flatten().to_numpy().copy()
            v[3 * 3 + 1] = np.nan
            t = t.set_column(0, "observation.state", pa.FixedSizeListArray.from_arrays(pa.array(v), 3))
        else:
            t = t.set_column(t.column_names.index("timestamp"), "timestamp",
                             pa.array(t.column("timestamp").to_numpy() + np.float32(0.03)))
        pq.write_table(t, data)
    elif breakage == "wrong_shape":
        info["features"]["action"]["shape"] = [5]
        info_path.write_text(json.dumps(info))
    with pytest.raises(DataError, match=match):
        read_lerobot(root)


def test_unknown_keys_are_named_with_what_exists(tmp_path):
    root = _small(tmp_path, use_videos=False)
    with pytest.raises(DataError, match=r"^features/nope: not in .*available: observation.state, action"):
        read_lerobot(root, ["nope"])
    with pytest.raises(DataError, match=r"^wrist: missing .*policy.image.cameras; tried wrist, "
                                        r"observation.images.wrist"):
        prepare_data(DataConfig(path=str(root)), {"cameras": ["wrist"]})
    with pytest.raises(DataError, match=r"^observation.state: holds low-dim values, but data.cameras.c needs camera"):
        prepare_data(DataConfig(path=str(root), cameras={"c": "observation.state"}), {})


def test_writer_refuses_bad_episodes(tmp_path):
    w = LeRobotWriter(tmp_path / "d", fps=10)
    ep = _episodes(1)[0]
    with pytest.raises(DataError, match=r"^action: episode has 3 steps"):
        w.add_episode({**ep, "action": ep["action"][:3]})
    w.add_episode(ep)
    with pytest.raises(DataError, match=r"^observation.state: per-step shape \(4,\)"):
        w.add_episode({**ep, "observation.state": np.zeros((len(ep["action"]), 4), np.float32)})
    bad = ep["action"].copy()
    bad[2, 0] = np.inf
    with pytest.raises(DataError, match=r"^action: contains NaN or inf"):
        w.add_episode({**ep, "action": bad})
    w.close()
    with pytest.raises(FileExistsError):
        LeRobotWriter(tmp_path / "d", fps=10)


# ---------------------------------------------------------------- convert
@pytest.mark.parametrize("images", [False, True])
def test_convert_zarr_lerobot_zarr(tmp_path, images, capsys):
    rng = np.random.default_rng(3)
    eps = [{"action": rng.normal(size=(T, 2)).astype(np.float32), "state": rng.normal(size=(T, 5)).astype(np.float32),
            "keypoint": rng.normal(size=(T, 3, 2)).astype(np.float32),
            "img": rng.integers(0, 256, (T, 32, 32, 3), dtype=np.uint8)} for T in (9, 14, 11)]
    write_replay_buffer(tmp_path / "a.zarr", eps)
    args = [str(tmp_path / "a.zarr"), str(tmp_path / "lr"), "--fps", "10"] + (["--images"] if images else [])
    assert convert_main(args) == 0
    info = json.loads((tmp_path / "lr/meta/info.json").read_text())
    assert set(info["features"]) >= {"action", "observation.state", "observation.keypoint", "observation.images.img"}
    assert info["features"]["observation.images.img"]["dtype"] == ("image" if images else "video")
    assert convert_main([str(tmp_path / "lr"), str(tmp_path / "b.zarr.zip")]) == 0
    back = read_replay_buffer(tmp_path / "b.zarr.zip")
    assert set(back.data) == {"action", "state", "keypoint", "img"}
    for k in ("action", "state"):
        np.testing.assert_array_equal(back.data[k], np.concatenate([e[k] for e in eps]))
    np.testing.assert_array_equal(back.data["keypoint"], np.concatenate([e["keypoint"].reshape(-1, 6) for e in eps]))
    img_err = np.abs(back.data["img"].astype(int) - np.concatenate([e["img"] for e in eps])).mean()
    assert img_err == 0 if images else img_err < 60
    assert convert_main([str(tmp_path / "a.zarr"), str(tmp_path / "lr")]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err


def test_decode_at_matches_timestamps_not_order(tmp_path):
    """Queries in any order, repeated, or across files each get the frame at their timestamp."""
    frames = np.broadcast_to((np.arange(8) * 30)[:, None, None, None], (8, 32, 32, 3)).astype(np.uint8)
    path = tmp_path / "v.mp4"
    assert video.encode_frames(frames, path, fps=4) == pytest.approx(2.0)
    times = np.array([1.75, 0.0, 0.25, 0.25, 1.0])
    got = video.decode_at([(path, np.arange(5), times)], 5, (32, 32, 3))
    assert np.abs(got[:, 0, 0, 0].astype(int) - (times * 4 * 30).astype(int)).max() <= 3
