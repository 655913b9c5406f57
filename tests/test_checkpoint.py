"""model.pt: round trip, weights-only loading, and every way a file can be wrong."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

from dpag_engine import checkpoint as ck
from dpag_engine.checkpoint import CheckpointError, load_checkpoint, load_policy, save_checkpoint

from factories import make_obs, make_policy


@pytest.fixture
def saved(tmp_path):
    policy = make_policy(method="dpag")
    ema = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)  # EMA and raw weights differ, so we can tell which one was loaded
    path = save_checkpoint(tmp_path / "model.pt", policy, ema, step=123, metadata={"note": "test", "v": [1, 2.5]})
    return path, policy, ema


def test_round_trip_and_plain_weights_only_load(saved):
    path, policy, ema = saved
    raw = torch.load(path, weights_only=True)  # what any other tool can do with the file
    assert raw["format_version"] == ck.FORMAT_VERSION and raw["step"] == 123
    assert raw["config"] == policy.cfg.to_dict() and raw["metadata"]["v"] == [1, 2.5]
    assert "normalizer.action_min" in raw["state_dict"]

    loaded = load_policy(path)
    assert not loaded.training and loaded.checkpoint_step == 123 and loaded.cfg == policy.cfg
    for (k, a), b in zip(ema.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    raw_loaded = load_policy(path, weights="raw")
    for (k, a), b in zip(policy.state_dict().items(), raw_loaded.state_dict().values()):
        assert torch.equal(a, b), k

    obs = make_obs(policy.cfg, 3, torch.Generator().manual_seed(0))
    want = ema.eval().predict_action(obs, generator=torch.Generator().manual_seed(1))["action"]
    got = loaded.predict_action(obs, generator=torch.Generator().manual_seed(1))["action"]
    assert torch.equal(want, got)


def test_directory_and_no_ema(tmp_path):
    policy = make_policy(method="dp")
    save_checkpoint(tmp_path / "model.pt", policy, None, step=5)
    assert "raw_state_dict" not in torch.load(tmp_path / "model.pt", weights_only=True)
    loaded = load_policy(tmp_path, weights="raw")  # a directory holding model.pt; raw == the only weights
    for (k, a), b in zip(policy.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_refuses_non_builtin_metadata(tmp_path):
    with pytest.raises(TypeError, match="metadata.bad"):
        save_checkpoint(tmp_path / "m.pt", make_policy(), metadata={"bad": object()})


def test_truncated_file(saved):
    path = saved[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_policy(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(path)


def _rewrite(path, edit):
    """Write an edited checkpoint as a buggy writer would: with a checksum of the edited content, so
    the checks below see the bad content itself (a damaged file is refused earlier, by its checksum)."""
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    ck.atomic_save(ckpt, path)


def test_wrong_shape_is_named(saved):
    path = saved[0]
    key = next(k for k, v in torch.load(path, weights_only=True)["state_dict"].items() if v.dim() == 3)
    _rewrite(path, lambda c: c["state_dict"].__setitem__(key, torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match=rf"state_dict\['{key}'\]: shape \(2, 2\) in the file, the model expects"):
        load_policy(path)


def test_missing_and_unexpected_keys(saved):
    path = saved[0]
    _rewrite(path, lambda c: (c["raw_state_dict"].pop("normalizer.action_min"), c["raw_state_dict"].update(extra=torch.ones(1))))
    with pytest.raises(CheckpointError, match=r"raw_state_dict: .*missing \['normalizer.action_min'\], unexpected \['extra'\]"):
        load_checkpoint(path)


def test_nan_weights_are_named(saved):
    path = saved[0]
    key = next(k for k, v in torch.load(path, weights_only=True)["raw_state_dict"].items() if v.is_floating_point() and v.numel() > 3)

    def poison(c):
        c["raw_state_dict"][key][..., 0] = float("nan")
    _rewrite(path, poison)
    with pytest.raises(CheckpointError, match=rf"raw_state_dict\['{key}'\]: \d+ of \d+ values are NaN or inf"):
        load_policy(path)


def test_bad_config_is_named(saved):
    path = saved[0]
    _rewrite(path, lambda c: c["config"].update(method="bogus"))
    with pytest.raises(CheckpointError, match="config is invalid: method"):
        load_policy(path)


def test_unfitted_normaliser_refused(tmp_path):
    from dpag_engine.config import PolicyConfig
    from dpag_engine.policy import DPAGPolicy
    policy = DPAGPolicy(PolicyConfig(recipe="tiny", state_dim=3))
    save_checkpoint(tmp_path / "m.pt", policy)
    with pytest.raises(CheckpointError, match="normaliser was never fitted"):
        load_policy(tmp_path / "m.pt")


class _RunsCode:
    """Unpickling this calls exec(), which would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_that_runs_code_is_refused(saved, tmp_path, writer):
    path = saved[0]
    marker = tmp_path / "pwned.txt"
    payload = {"format_version": ck.FORMAT_VERSION, "kind": ck.KIND, "config": {}, "state_dict": {}, "step": 0,
               "metadata": _RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError, match="refused - the file contains Python objects"):
        load_policy(path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists(), "the payload ran"


def test_pickle_payload_really_runs_without_weights_only(tmp_path):
    """Proves the payload above is live: unrestricted unpickling runs it (this is what we refuse)."""
    marker = tmp_path / "ran.txt"
    pickle.loads(pickle.dumps(_RunsCode(marker)))
    assert marker.read_text() == "pwned"


def test_format_versions(saved, monkeypatch):
    path = saved[0]
    _rewrite(path, lambda c: c.update(format_version=99))
    with pytest.raises(CheckpointError, match="format_version 99 is newer.*upgrade dpag_engine"):
        load_policy(path)
    _rewrite(path, lambda c: c.update(format_version=0))
    with pytest.raises(CheckpointError, match="format_version 0 cannot be loaded.*pre-release layout"):
        load_policy(path)
    _rewrite(path, lambda c: c.pop("format_version"))
    with pytest.raises(CheckpointError, match="not a dpag_engine checkpoint"):
        load_checkpoint(path)

    # An older *supported* version walks up through the migrations: pretend the current format is 2,
    # whose only change renamed "step" (written here as version 1's "train_step").
    def v1_to_v2(c):
        c["step"] = c.pop("train_step")
        return c
    _rewrite(path, lambda c: (c.update(format_version=1), c.__setitem__("train_step", 7), c.pop("step", None)))
    monkeypatch.setattr(ck, "FORMAT_VERSION", 2)
    monkeypatch.setitem(ck.MIGRATIONS, 1, v1_to_v2)
    assert load_policy(path).checkpoint_step == 7


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_policy(tmp_path / "absent.pt")


# ---------------------------------------------------------------- checksum, normaliser, durable writes
def test_checksum_detects_a_changed_tensor(saved):
    path = saved[0]
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt["checksum"]["crc32"]) == set(ckpt) - {"checksum"}  # every part of the file is covered
    key = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and v.numel() > 3)
    ckpt["state_dict"][key].view(-1)[1] *= 1.0001  # finite, right shape: only the checksum can tell
    torch.save(ckpt, path)  # the stored checksum is the original one
    with pytest.raises(CheckpointError, match=rf"{path}: checksum mismatch in state_dict"):
        load_policy(path)


def test_checkpoint_without_checksum_still_loads(saved):
    """Files written before checksums existed (format 1 had none) load unverified."""
    path, _, ema = saved
    ckpt = torch.load(path, weights_only=True)
    del ckpt["checksum"]
    torch.save(ckpt, path)
    loaded = load_policy(path)
    for (k, a), b in zip(ema.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_normaliser_with_min_above_max_refused(saved):
    path = saved[0]

    def swap(c):
        sd = c["state_dict"]
        sd["normalizer.action_min"][1], sd["normalizer.action_max"][1] = (
            float(sd["normalizer.action_max"][1]), float(sd["normalizer.action_min"][1]))
    _rewrite(path, swap)
    with pytest.raises(CheckpointError, match=r"state_dict\['normalizer.action_min'\]: .*above.* dims \[1\]"):
        load_policy(path)


def test_atomic_save_syncs_the_data_before_the_rename(tmp_path, monkeypatch):
    """A crash (power loss) right after the rename must not leave a name pointing at unwritten data."""
    import os
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    def replace(src, dst):
        renamed.append((os.stat(src).st_ino in synced, str(dst)))
        real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ck.atomic_save({"a": torch.ones(3)}, tmp_path / "x.pt")
    assert renamed == [(True, str(tmp_path / "x.pt"))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]  # no temporary left behind
