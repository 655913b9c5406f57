"""The trainer: configuration, learning on both methods, exact resume, DDP equivalence, the CLI."""
from __future__ import annotations

import dataclasses
import io
import os
import random
import re
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dpag_engine.checkpoint import load_policy
from dpag_engine.config import ConfigError
from dpag_engine.data import DataConfig, DataError, write_synthetic
from dpag_engine.training.cli import main, make_parser
from dpag_engine.training.config import SECTIONS, TrainConfig, apply_overrides, build_configs, parse_value
from dpag_engine.training.ema import EMA
from dpag_engine.training.lr import lr_factor
from dpag_engine.training.trainer import Trainer

TINY = {"recipe": "tiny", "horizon": 8, "n_action_steps": 4}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """A small learnable dataset, written with the project's zarr writer."""
    path = tmp_path_factory.mktemp("data") / "demo.zarr"
    write_synthetic(path, n_episodes=12, episode_length=40, action_dim=2, state_dim=6, seed=0)
    return str(path)


def make_trainer(dataset, out_dir, method="dpag", resume_dir=None, **train):
    train = {"steps": 20, "batch_size": 16, "warmup_steps": 5, "lr": 1e-3, "eval_every": 0, "save_every": 0,
             "log_every": 5, "progress": False, "out_dir": str(out_dir), **train}
    data = DataConfig(path=dataset, val_ratio=0.1)
    return Trainer({**TINY, "method": method}, data, TrainConfig(**train), resume_dir=resume_dir)


# ---------------------------------------------------------------- configuration
def test_parse_value_and_overrides():
    assert parse_value("1e-4") == 1e-4 and parse_value("true") is True and parse_value("null") is None
    assert parse_value("[64,128]") == [64, 128] and parse_value("tiny") == "tiny"
    assert parse_value('[keypoint, "state[:2]"]') == ["keypoint", "state[:2]"]
    assert parse_value("{image: img}") == {"image": "img"}
    d = apply_overrides({"train": {"steps": 5}}, ["policy.recipe=tiny", "policy.unet.down_dims=[16,32]", "train.steps=7"])
    assert d == {"train": {"steps": 7}, "policy": {"recipe": "tiny", "unet": {"down_dims": [16, 32]}}}
    with pytest.raises(ConfigError, match="bogus"):
        apply_overrides({}, ["bogus.x=1"])


def test_config_validation_names_fields(tmp_path):
    policy, data, train = build_configs({"train": {"lr": "1e-4", "steps": 3.0}, "policy": {"loss": {"tau": 1}}})
    assert train.lr == 1e-4 and isinstance(train.steps, int) and policy["loss"]["tau"] == 1.0
    for bad, match in [({"train": {"lr_rate": 1}}, "train.lr_rate: unknown field"),
                       ({"policy": {"scheduler": {"nope": 1}}}, "policy.scheduler.nope: unknown field"),
                       ({"train": {"ema": "yes"}}, "train.ema: expected true or false"),
                       ({"train": {"batch_size": 0}}, "train.batch_size: must be >= 1"),
                       ({"data": {"val_ratio": "x"}}, "data.val_ratio: expected a number")]:
        with pytest.raises(ConfigError, match=match):
            build_configs(bad)


@pytest.mark.parametrize("override, match", [
    ("train.lr=1e400", "train.lr: must be a finite number, got inf"),      # JSON reads 1e400 as inf
    ("train.lr=true", "train.lr: expected a number, got True"),
    ("train.steps=2.7", "train.steps: expected an integer, got 2.7"),
    ("train.steps=true", "train.steps: expected an integer, got True"),
    ("train.device=0", "train.device: expected a string, got 0"),
    ("data.val_ratio=2", r"data.val_ratio: must be in \[0, 1\)"),
    ("data.max_train_episodes=2.5", "data.max_train_episodes: expected an integer"),
    ("policy.horizon=16.5", "policy.horizon: expected an integer"),
    ("policy.latent.dt=-inf", "policy.latent.dt: must be a finite number"),
])
def test_numeric_fields_are_validated(override, match, capsys):
    with pytest.raises(ConfigError, match=f"^{match}"):
        build_configs(apply_overrides({}, [override]))
    assert main(["--synthetic", override, "--print-config"]) == 2  # an error line, not a traceback
    assert re.search(f"error: {match}", capsys.readouterr().err)

def test_yaml_and_toml_configs_in_repo_parse():
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml")) + sorted(root.glob("*.toml"))
    assert files
    for f in files:
        assert main(["--config", str(f), "--print-config"]) == 0


def test_help_documents_every_option():
    text = make_parser().format_help()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name not in ("unet", "image", "scheduler", "latent", "guidance", "loss"):
                assert f"{section}.{f.name} = " in text, f"{section}.{f.name} missing from --help"
    for option in ("--config", "--method", "--resume", "--synthetic", "--data", "--out-dir"):
        assert option in text


def test_lr_schedule_and_ema_decay():
    cfg = TrainConfig(steps=100, warmup_steps=10)
    assert lr_factor(0, cfg) == 0 and lr_factor(5, cfg) == 0.5 and lr_factor(10, cfg) == 1.0
    assert abs(lr_factor(55, cfg) - 0.5) < 1e-12 and lr_factor(100, cfg) == 0.0
    ema = EMA(torch.nn.Linear(2, 2))
    decays = []
    for _ in range(4):
        decays.append(ema.decay())
        ema.step += 1
    assert decays[:2] == [0.0, 0.0] and abs(decays[2] - (1 - 2 ** -0.75)) < 1e-12  # DP's EMAModel
    ema.step = 10**9
    assert ema.decay() == 0.9999


def test_data_dims_must_agree(dataset, tmp_path):
    with pytest.raises(ConfigError, match="policy.state_dim: config says 5, but data.state_keys give 6"):
        Trainer({**TINY, "state_dim": 5}, DataConfig(path=dataset), TrainConfig(out_dir=str(tmp_path)))
    with pytest.raises(DataError, match="data/nope: missing"):
        Trainer(TINY, DataConfig(path=dataset, state_keys=["nope"]), TrainConfig(out_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="train.batch_size: 10 is not divisible"):
        Trainer(TINY, DataConfig(path=dataset), TrainConfig(out_dir=str(tmp_path), batch_size=10, grad_accum=3))


# ---------------------------------------------------------------- learning
@pytest.mark.slow
@pytest.mark.parametrize("method", ["dp", "dpag"])
def test_loss_goes_down(dataset, tmp_path, method):
    trainer = make_trainer(dataset, tmp_path, method, steps=300, batch_size=32, warmup_steps=20, log_every=20)
    losses = trainer.train()["losses"]
    # The diffusion loss starts near 1 (unit-variance noise); DP-AG adds InfoNCE (~ln B) and KL.
    assert losses[-1] < 0.75 * losses[0], losses
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000


def test_short_run_writes_everything_and_loss_falls(dataset, tmp_path):
    result = make_trainer(dataset, tmp_path, "dp", steps=60, batch_size=32, eval_every=30, save_every=30,
                          log_every=10).train()
    assert result["losses"][-1] < result["losses"][0]
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines[0].startswith("step,split,epoch,lr,loss,loss_diff") and any(",val," in ln for ln in lines)
    assert (tmp_path / "loss_curve.png").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000030", "step_0000060"]
    policy = load_policy(tmp_path / "model.pt")
    assert policy.checkpoint_step == 60 and policy.cfg.method == "dp"


# ---------------------------------------------------------------- resume
@pytest.mark.parametrize("method", ["dpag"])
def test_resume_is_exact(dataset, tmp_path, method):
    full = make_trainer(dataset, tmp_path / "a", method, steps=16, save_every=8, keep_checkpoints=0, log_every=4)
    full.train()
    resumed = make_trainer(dataset, tmp_path / "b", method, steps=16, log_every=4,
                           resume_dir=tmp_path / "a" / "checkpoints" / "step_0000008")
    assert resumed.step == 8
    resumed.train()
    for name, a, b in [("raw", full.policy, resumed.policy), ("ema", full.ema.model, resumed.ema.model)]:
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), f"{name} {k}"
    sa, sb = full.optimizer.state_dict(), resumed.optimizer.state_dict()
    for x, y in zip(sa["state"].values(), sb["state"].values()):
        assert torch.equal(x["exp_avg_sq"], y["exp_avg_sq"]) and torch.equal(x["step"], y["step"])
    assert full.scheduler.state_dict() == resumed.scheduler.state_dict() and full.ema.step == resumed.ema.step
    # The log carries the first half over and matches the second (log windows aligned with the save step).
    strip = lambda p: [ln.split(",")[:9] for ln in p.read_text().splitlines()]  # drop timings
    assert strip(tmp_path / "a" / "log.csv") == strip(tmp_path / "b" / "log.csv")


def test_resume_refuses_other_data(dataset, tmp_path):
    make_trainer(dataset, tmp_path / "a", steps=4, save_every=2).train()
    other = tmp_path / "other.zarr"
    write_synthetic(other, n_episodes=12, episode_length=40, action_dim=2, state_dim=6, seed=1)
    with pytest.raises(DataError, match="training data differs"):
        make_trainer(str(other), tmp_path / "b", steps=4, resume_dir=tmp_path / "a" / "checkpoints" / "step_0000002")



def _opened_for_writing(monkeypatch, name: str) -> list[str]:
    """Records every open() of a file called `name` in a mode that truncates it."""
    seen: list[str] = []
    real = io.open

    def spy(file, mode="r", *args, **kwargs):
        if os.path.basename(str(file)) == name and "w" in mode:
            seen.append(str(file))
        return real(file, mode, *args, **kwargs)
    monkeypatch.setattr(io, "open", spy)
    monkeypatch.setattr("builtins.open", spy)
    return seen


def test_log_csv_is_appended_across_a_resume(dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    make_trainer(dataset, run, steps=16, save_every=8, keep_checkpoints=0, log_every=4).train()
    lines = (run / "log.csv").read_bytes().splitlines(keepends=True)
    kept = b"".join(ln for ln in lines if not ln[:1].isdigit() or int(ln.split(b",")[0]) <= 8)
    truncating = _opened_for_writing(monkeypatch, "log.csv")
    make_trainer(dataset, run, steps=16, log_every=4, resume_dir=run / "checkpoints" / "step_0000008").train()
    after = (run / "log.csv").read_bytes()
    assert after.startswith(kept)  # earlier rows byte-identical
    steps = [ln.split(b",")[0] for ln in after.splitlines()[1:]]
    assert steps == [b"4", b"8", b"12", b"16"]  # the rows after step 8 recomputed, not duplicated
    assert truncating == []  # appended, never rewritten


def test_final_model_pt_is_replaced_atomically(dataset, tmp_path, monkeypatch):
    make_trainer(dataset, tmp_path, steps=2).train()
    in_place = _opened_for_writing(monkeypatch, "model.pt")
    make_trainer(dataset, tmp_path, steps=4).train()
    assert in_place == [] and load_policy(tmp_path / "model.pt").checkpoint_step == 4


def test_resume_falls_back_past_a_corrupt_newest_checkpoint(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    make_trainer(dataset, run, steps=12, save_every=4, keep_checkpoints=0).train()
    ckpts = run / "checkpoints"
    (ckpts / "step_0000012" / "training_state.pt").write_bytes(random.Random(0).randbytes(1000))
    model = ckpts / "step_0000008" / "model.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 4  # a flipped bit in the tensor data
    model.write_bytes(bytes(data))
    assert main(["--resume", str(run), "train.progress=false"]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"step_0000012.*training_state.pt.*truncated or corrupted", err)
    assert re.search(r"step_0000008.*model.pt.*checksum mismatch", err)
    assert "resuming from " + str(ckpts / "step_0000004") in err
    assert "resuming at step 4" in out and load_policy(run / "model.pt").checkpoint_step == 12
    # Named explicitly, a damaged checkpoint is an error (not a silent substitute), and no traceback.
    (ckpts / "step_0000004" / "training_state.pt").write_bytes(b"\x01")
    assert main(["--resume", str(ckpts / "step_0000004")]) == 2
    assert re.search(r"error: .*step_0000004.*training_state.pt.*truncated or corrupted", capsys.readouterr().err)


def _nan_after(trainer, step: int) -> None:
    """Make the loss NaN from optimiser step `step` on."""
    real = trainer.policy.compute_loss

    def compute_loss(batch, generator=None):
        loss, metrics = real(batch, generator)
        if trainer.step >= step:
            loss, metrics = loss * float("nan"), {**metrics, "loss": float("nan")}
        return loss, metrics
    trainer.policy.compute_loss = compute_loss


def test_nan_abort_names_only_a_checkpoint_that_exists(dataset, tmp_path):
    trainer = make_trainer(dataset, tmp_path / "a", steps=10)
    _nan_after(trainer, 0)
    with pytest.raises(FloatingPointError, match="step 0: loss is nan") as e:
        trainer.train()
    assert "no checkpoint" in str(e.value) and "checkpoints" not in str(e.value), str(e.value)
    trainer = make_trainer(dataset, tmp_path / "b", steps=10, save_every=3)
    _nan_after(trainer, 7)
    with pytest.raises(FloatingPointError, match="step 7: loss is nan") as e:
        trainer.train()
    named = Path(re.search(r"last good checkpoint: (\S+?)\)", str(e.value)).group(1))
    assert named == tmp_path / "b" / "checkpoints" / "step_0000006" and named.is_dir()

# ---------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, dataset: str, out_dir: str, method: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = make_trainer(dataset, out_dir, method, steps=4, batch_size=16)
    trainer.train()
    torch.save(trainer.policy.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("method", ["dp", "dpag"])
def test_ddp_two_ranks_match_single_process(dataset, tmp_path, method):
    """2 gloo ranks x 8 == 1 process x 2 micro-batches of 8 (same global batch of 16, same noise)."""
    mp.start_processes(_ddp_worker, args=(2, _free_port(), dataset, str(tmp_path / "ddp"), method), nprocs=2,
                       start_method="spawn")
    r0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks diverged at {k}"
    single = make_trainer(dataset, tmp_path / "single", method, steps=4, batch_size=16, grad_accum=2)
    single.train()
    moved = 0.0
    init = make_trainer(dataset, tmp_path / "init", method, steps=4, batch_size=16).policy.state_dict()
    for k, v in single.policy.state_dict().items():
        assert torch.allclose(v, r0[k], rtol=0, atol=1e-5), f"{k}: {float((v - r0[k]).abs().max())}"
        if v.is_floating_point():
            moved = max(moved, float((v - init[k]).abs().max()))
    assert moved > 1e-3  # the weights really changed, so the comparison means something
    # Rank 0 alone wrote the checkpoint and the log.
    assert (tmp_path / "ddp" / "model.pt").is_file() and (tmp_path / "ddp" / "log.csv").is_file()


# ---------------------------------------------------------------- command line
def test_cli_synthetic_demo(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["--synthetic", "--method", "dp", "policy.recipe=tiny", "train.steps=6", "train.batch_size=8",
               "train.warmup_steps=2", "train.eval_every=3", "train.log_every=2", "train.progress=false",
               "data.synthetic_episodes=8", "data.synthetic_episode_length=30", "--out-dir", str(out)])
    assert rc == 0
    assert {"log.csv", "loss_curve.png", "model.pt", "synthetic.zarr", "checkpoints"} <= {p.name for p in out.iterdir()}
    assert "done: step 6" in capsys.readouterr().out
    # Resume from the run directory with more steps.
    assert main(["--resume", str(out), "train.steps=8", "train.progress=false"]) == 0
    assert load_policy(out / "model.pt").checkpoint_step == 8
    assert main(["--config", "missing.yaml"]) == 2
    assert "error: --config: missing.yaml does not exist" in capsys.readouterr().err


def test_image_recipe_trains_from_hwc_uint8_frames(tmp_path):
    """Camera frames stored as DP does (HWC uint8) reach the policy as CHW floats and train."""
    out = tmp_path / "img"
    rc = main(["--synthetic", "policy.recipe=tiny", 'policy.image={"image_shape": [3, 32, 32], "crop_shape": [28, 28]}',
               "policy.state_dim=2", "train.steps=2", "train.batch_size=4", "train.eval_every=2", "train.progress=false",
               "data.synthetic_episodes=4", "data.synthetic_episode_length=24", "--out-dir", str(out)])
    assert rc == 0
    policy = load_policy(out)
    assert policy.cfg.image.cameras == ("image",) and policy.cfg.state_dim == 2
