"""ONNX export and the exported-graph backends, checked against the PyTorch policy.

onnxruntime runs on CPU here; every comparison states its max abs error in the assertion message.
Action chunks are compared in normalised units ([-1, 1], where the model works), so one tolerance
fits every recipe whatever the data's raw range.
"""
from __future__ import annotations

import json

import pytest
import torch

from dpag_engine.checkpoint import save_checkpoint
from dpag_engine.config import PolicyConfig, SchedulerConfig
from dpag_engine.export import MANIFEST, FilmPrecomputedUnet, export_onnx, main
from dpag_engine.policy import DPAGPolicy
from dpag_engine.runtime import load_planner

from factories import make_obs, make_policy, SMALL_IMAGE

pytest.importorskip("onnx", reason="onnx not installed (pip install onnx onnxruntime)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install onnx onnxruntime)")
from dpag_engine.runtime.onnx_runtime import OnnxRuntime  # noqa: E402

TOL = 1e-4  # fp32
EXPORT_BATCH = 2


def lowdim_policy() -> DPAGPolicy:
    torch.manual_seed(0)
    policy = DPAGPolicy(PolicyConfig(recipe="lowdim", action_dim=2, state_dim=20))
    g = torch.Generator().manual_seed(1)
    policy.normalizer.fit({"action": torch.randn(300, 2, generator=g) * 4 + 1,
                           "state": torch.randn(300, 20, generator=g) * 2})
    return policy.eval()


@pytest.fixture(scope="module", params=["tiny", pytest.param("lowdim", marks=pytest.mark.slow)])
def exported(request, tmp_path_factory):
    policy = make_policy().eval() if request.param == "tiny" else lowdim_policy()
    out = tmp_path_factory.mktemp(f"onnx_{request.param}")
    export_onnx(policy, out, batch=EXPORT_BATCH)
    return policy, OnnxRuntime(out, providers=["CPUExecutionProvider"])


def max_err(a, b) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


def normalised(policy: DPAGPolicy, actions: torch.Tensor) -> torch.Tensor:
    return policy.normalizer.normalize("action", actions)


def test_film_precompute_is_the_same_function():
    """W_t Mish(t_emb) + W_g Mish(g) + b, with the first term from the table, at every timestep."""
    policy = make_policy().eval()
    fast = FilmPrecomputedUnet(policy.unet, policy.cfg.scheduler.num_train_timesteps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, policy.cfg.horizon, policy.cfg.action_dim, generator=g)
    cond = torch.randn(100, policy.cfg.global_cond_dim, generator=g)
    t = torch.arange(100)
    with torch.no_grad():
        err = max_err(fast(x, t, cond), policy.unet(x, t, cond))
    assert err <= 1e-5, f"max abs error {err:.2e}"


@pytest.mark.parametrize("batch", [1, 5])  # exported at B=2: the batch axis is dynamic
def test_encoder_and_unet_every_step_match_torch(exported, batch):
    policy, backend = exported
    obs = make_obs(policy.cfg, batch, torch.Generator().manual_seed(3))
    with torch.no_grad():
        mu, log_var = policy.posterior(policy.encode(obs))
    got_mu, got_log_var = backend.encode(obs)
    errs = {"mu": max_err(got_mu, mu), "log_var": max_err(got_log_var, log_var)}
    g = torch.Generator().manual_seed(4)
    x = torch.randn(batch, policy.cfg.horizon, policy.cfg.action_dim, generator=g)
    for t in policy.schedule.timesteps.tolist():  # the U-Net once per DDIM step of the schedule
        with torch.no_grad():
            want = policy.predict_noise(x, torch.tensor(t), mu)
        errs[f"eps@t={t}"] = max_err(backend.predict_noise(x, t, mu.flatten(1)), want)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= TOL, f"{policy.cfg.recipe} B={batch}: max abs error {errs[worst]:.2e} at {worst}"


@pytest.mark.parametrize("batch", [1, 5])
def test_predict_action_chunk_matches_torch(exported, batch):
    policy, backend = exported
    obs = make_obs(policy.cfg, batch, torch.Generator().manual_seed(5))
    want = policy.predict_action(obs, torch.Generator().manual_seed(6))
    got = backend.planner().predict_action(obs, torch.Generator().manual_seed(6))  # same generator: same noise
    assert got["action"].shape == want["action"].shape == (batch, policy.cfg.n_action_steps, policy.cfg.action_dim)
    err = max_err(normalised(policy, got["action_pred"]), normalised(policy, want["action_pred"]))
    raw = max_err(got["action_pred"], want["action_pred"])
    assert err <= TOL, f"{policy.cfg.recipe} B={batch}: chunk max abs error {err:.2e} normalised ({raw:.2e} raw)"
    # The generator is the only source of randomness: the same seed again is the same chunk, another is not.
    seeded = backend.planner().predict_action(obs, torch.Generator().manual_seed(6))["action_pred"]
    other = backend.planner().predict_action(obs, torch.Generator().manual_seed(7))["action_pred"]
    assert torch.equal(seeded, got["action_pred"]) and not torch.equal(other, seeded)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_real_time_chunking_matches_torch(tmp_path, eta):
    """The inpainting sampler (dpag_engine/rtc.py) on the exported graphs: the reference's chunk, and
    the committed rows come out as the prefix (clipped to the sampler's range)."""
    policy = make_policy(scheduler=SchedulerConfig(num_inference_steps=8, eta=eta)).eval()
    export_onnx(policy, tmp_path)
    backend = OnnxRuntime(tmp_path)
    obs = make_obs(policy.cfg, 2, torch.Generator().manual_seed(0))
    prefix = policy.predict_action(obs, torch.Generator().manual_seed(9))["action"][:, :5]  # reachable actions
    weight = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.2])
    want = policy.predict_action(obs, torch.Generator().manual_seed(1), prefix=prefix, prefix_weight=weight)
    got = backend.planner().predict_action(obs, torch.Generator().manual_seed(1), prefix=prefix, prefix_weight=weight)
    err = max_err(normalised(policy, got["action_pred"]), normalised(policy, want["action_pred"]))
    assert err <= TOL, f"RTC chunk max abs error {err:.2e}"
    assert max_err(normalised(policy, got["action"][:, :3]), normalised(policy, prefix[:, :3])) <= TOL
    with pytest.raises(ValueError, match="prefix_weight: weights must be finite"):
        backend.planner().predict_action(obs, prefix=prefix, prefix_weight=weight * 2)


def test_stochastic_sampler_follows_the_reference_noise_stream(tmp_path):
    policy = make_policy(scheduler=SchedulerConfig(num_inference_steps=10, eta=0.7)).eval()
    export_onnx(policy, tmp_path)
    backend = OnnxRuntime(tmp_path)
    obs = make_obs(policy.cfg, 2, torch.Generator().manual_seed(0))
    want = policy.predict_action(obs, torch.Generator().manual_seed(1))["action_pred"]
    got = backend.planner().predict_action(obs, torch.Generator().manual_seed(1))["action_pred"]
    err = max_err(normalised(policy, got), normalised(policy, want))
    assert err <= TOL, f"DDIM eta=0.7 chunk max abs error {err:.2e}"


def test_image_encoder_and_plain_dp_model(tmp_path):
    """Cameras (centre crop, ResNet, spatial softmax inside the graph) and a model with no posterior."""
    torch.manual_seed(0)
    policy = DPAGPolicy(PolicyConfig(recipe="tiny", method="dp", **SMALL_IMAGE)).eval()
    g = torch.Generator().manual_seed(1)
    policy.normalizer.fit({"action": torch.randn(50, 2, generator=g), "state": torch.randn(50, 4, generator=g)})
    manifest = export_onnx(policy, tmp_path)
    assert manifest["encoder"]["outputs"] == ["mu"] and list(manifest["encoder"]["inputs"]) == ["front", "wrist", "state"]
    backend = OnnxRuntime(tmp_path)
    obs = make_obs(policy.cfg, 3, torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = max_err(backend.encode(obs)[0], policy.encode(obs))
    assert err <= TOL, f"image encoder max abs error {err:.2e}"
    want = policy.predict_action(obs, torch.Generator().manual_seed(3))["action_pred"]
    got = backend.planner().predict_action(obs, torch.Generator().manual_seed(3))["action_pred"]
    err = max_err(normalised(policy, got), normalised(policy, want))
    assert err <= TOL, f"image chunk max abs error {err:.2e}"


def test_bad_input_fails_clearly(exported):
    policy, runtime = exported
    planner = runtime.planner()
    obs = make_obs(policy.cfg, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"obs\['state'\]: expected shape \(B, 2, "):
        planner.predict_action({"state": obs["state"][:, :1]})
    with pytest.raises(ValueError, match="NaN or inf"):
        planner.predict_action({"state": obs["state"].clone().index_fill_(0, torch.tensor([1]), float("nan"))})
    with pytest.raises(KeyError, match="missing key 'state'"):
        planner.predict_action({"image": obs["state"]})
    with pytest.raises(ValueError, match="the onnxruntime runtime samples only dp.*no backward"):
        planner.predict_action(obs, mode="guided")


def test_cli_external_data_and_serve_time_selection(tmp_path):
    policy = make_policy()
    ckpt = save_checkpoint(tmp_path / "model.pt", policy, step=7)
    out = tmp_path / "onnx"
    assert main(["--ckpt", str(ckpt), "--format", "onnx", "--out", str(out), "--external-data"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["checkpoint_step"] == 7 and max(manifest["max_abs_error_vs_torch"].values()) <= TOL
    assert (out / "unet.onnx.data").stat().st_size > (out / "unet.onnx").stat().st_size  # weights outside
    backend = load_planner(out, runtime="onnxruntime")
    reference = load_planner(ckpt, runtime="torch")
    obs = make_obs(policy.cfg, 1, torch.Generator().manual_seed(0))
    got = backend.predict_action(obs, torch.Generator().manual_seed(1))["action_pred"]
    want = reference.predict_action(obs, torch.Generator().manual_seed(1))["action_pred"]
    assert max_err(normalised(policy, got), normalised(policy, want)) <= TOL
    with pytest.raises(FileNotFoundError, match="dpag_engine.export"):
        OnnxRuntime(tmp_path)  # a folder with a checkpoint, not an export
    with pytest.raises(ValueError, match="runtime: must be one of"):
        load_planner(out, runtime="tflite")


def test_tensorrt_backend_matches_torch(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (no wheel on the registries or "
                        "GPU machine this project uses): the TensorRT backend is unverified")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA device")
    from dpag_engine.runtime.tensorrt_runtime import TensorRTRuntime

    policy = make_policy().eval()
    export_onnx(policy, tmp_path)
    obs = make_obs(policy.cfg, 2, torch.Generator().manual_seed(0))
    # The planner draws on the runtime's device: the reference runs there too, with the same generator.
    want = policy.cuda().predict_action({k: v.cuda() for k, v in obs.items()},
                                        torch.Generator("cuda").manual_seed(1))["action_pred"].cpu()
    policy.cpu()
    for precision, tol in (("fp32", TOL), ("fp16", 5e-2)):
        planner = TensorRTRuntime(tmp_path, precision=precision, max_batch=4).planner()
        got = planner.predict_action(obs, torch.Generator("cuda").manual_seed(1))["action_pred"].cpu()
        err = max_err(normalised(policy, got), normalised(policy, want))
        assert err <= tol, f"TensorRT {precision}: chunk max abs error {err:.2e}"
