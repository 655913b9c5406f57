"""Damaged checkpoint files: every one is refused with a CheckpointError naming the file, or (a flip in
bytes nothing reads) loads exactly what was written. Seeded and bounded: a few seconds on a 2-core CPU."""
from __future__ import annotations

import copy
import io
import random
import zipfile

import pytest
import torch

from dpag_engine.checkpoint import CheckpointError, load_checkpoint, load_policy, save_checkpoint
from dpag_engine.config import UNetConfig

from factories import make_policy

# torch warns about the "pickle protocol" it reads from random bytes before it fails on them.
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """A real model.pt of a very small policy (62 kB), so a flip often lands outside the tensor data."""
    policy = make_policy(recipe="custom", unet=UNetConfig(down_dims=(8,), kernel_size=3, diffusion_step_embed_dim=8),
                         horizon=4, n_action_steps=2, state_dim=2, action_dim=2)
    ema = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", policy, ema, step=3,
                           metadata={"note": "fuzz"})
    return path.read_bytes(), load_checkpoint(path)


def _bits(t: torch.Tensor) -> bytes:
    """Exact bytes (so -0.0 != 0.0 and a flipped NaN payload counts as a change)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same_content(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():  # e.g. a renamed "raw_state_dict": the raw weights would be silently gone
        return False
    for name in ("state_dict", "raw_state_dict"):
        if a[name].keys() != b[name].keys():
            return False
        for k, t in a[name].items():
            u = b[name][k]
            if t.dtype != u.dtype or t.shape != u.shape or _bits(t) != _bits(u):
                return False
    return all(a[k] == b[k] for k in ("config", "step", "metadata", "format_version", "kind"))


def _outcome(path) -> str:
    """'refused' (CheckpointError naming the file) or 'loaded'; any other exception propagates."""
    try:
        load_checkpoint(path)
    except CheckpointError as e:
        assert str(path) in str(e), str(e)
        assert "run code" not in str(e), str(e)  # damage is not a pickle that refers to a Python object
        return "refused"
    return "loaded"


def test_random_bytes_are_refused_with_a_true_reason(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "model.pt"
    # Plain noise, and noise behind the first bytes of the two formats torch.load recognises (a zip
    # archive, a pickle), so the fuzz reaches past the first check of each parser.
    heads = [b"", b"", b"PK\x03\x04", b"\x80\x02"]
    for i in range(150):
        data = heads[i % 4] + rng.randbytes(1 if i == 0 else rng.randint(1, 2000))
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as e:
            load_policy(path)  # serve's entry point
        msg = str(e.value)
        assert str(path) in msg and "truncated or corrupted" in msg, (i, msg)
        assert "run code" not in msg, (i, msg)  # noise is not a pickle that refers to a Python object


def test_truncations_of_a_real_checkpoint_are_refused(small_ckpt, tmp_path):
    good, _ = small_ckpt
    path = tmp_path / "model.pt"
    offsets = sorted({0, 1, 2, 10, 100, len(good) - 1, *range(0, len(good), len(good) // 80)})
    for n in offsets:
        path.write_bytes(good[:n])
        assert _outcome(path) == "refused", n


def test_single_bit_flips_never_load_changed_weights(small_ckpt, tmp_path):
    good, ref = small_ckpt
    zf = zipfile.ZipFile(io.BytesIO(good))
    first_tensor = min(i.header_offset for i in zf.infolist() if "/data/" in i.filename)
    last_tensor = max(i.header_offset for i in zf.infolist() if "/data/" in i.filename)
    rng = random.Random(1)
    # 60 flips anywhere (mostly tensor bytes), 40 in the pickle and its zip header, 20 in the records
    # and directory after the tensors: both parsers and the data are exercised.
    positions = ([rng.randrange(len(good)) for _ in range(60)]
                 + [rng.randrange(first_tensor) for _ in range(40)]
                 + [rng.randrange(last_tensor, len(good)) for _ in range(20)])
    path = tmp_path / "model.pt"
    counts = {"refused": 0, "identical": 0}
    for pos in positions:
        data = bytearray(good)
        data[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        if _outcome(path) == "loaded":
            assert _same_content(load_checkpoint(path), ref), f"a flip at byte {pos} loaded changed content"
            counts["identical"] += 1
        else:
            counts["refused"] += 1
    assert counts["refused"] > 60, counts  # every flip in the tensor data is among these


@pytest.mark.parametrize("old, new, reason", [
    # Flips a wider fuzz found (3600 flips): a damaged name of a tensor class is damage, not "code";
    (b"FloatStorage", b"FloapStorage", "truncated or corrupted"),
    # and a renamed "checksum" must not turn a new file into an old, unverified one.
    (b"checksum", b"c(ecksum", r"unexpected top-level keys \['c\(ecksum'\]"),
])
def test_damaged_names_in_the_pickle(small_ckpt, tmp_path, old, new, reason):
    good, _ = small_ckpt
    path = tmp_path / "model.pt"
    assert good.count(old) == 1
    path.write_bytes(good.replace(old, new))
    with pytest.raises(CheckpointError, match=reason) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "run code" not in str(e.value)
