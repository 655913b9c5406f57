"""The conformance matrix: every runtime gives the reference's actions for the same seed.

runtime x mode (dp, guided) x real-time chunking (off, on) x sampler (DDIM eta 0, DDIM eta 0.7,
DDPM) x latent eta (0, 0.3): the same generator seed must give the same chunk as
`DPAGPolicy.predict_action` to 1e-5 in normalised action units. What a runtime cannot do is a
named skip from its capability table, never a silent pass; what this machine lacks (a GPU,
TensorRT) is a named skip too. `serve --mode guided` with RTC on (the default) on the C++ engine is
the cpp/guided/rtc-on rows.
"""
import pytest
import torch

from dpag_engine.config import LatentUpdateConfig, SchedulerConfig

from factories import make_obs, make_policy, normalised_error

TOL = 1e-5
SAMPLERS = {"ddim-eta0": SchedulerConfig(num_inference_steps=6),
            "ddim-eta0.7": SchedulerConfig(num_inference_steps=6, eta=0.7),
            "ddpm": SchedulerConfig(sampler="ddpm", num_train_timesteps=12, num_inference_steps=12)}
# What each runtime cannot do, by (mode, latent eta > 0); None = capable.
CAPABILITY = {
    "cpp": lambda mode, latent_eta: None,
    "onnxruntime": lambda mode, latent_eta: "exported graphs have no backward: dp mode only" if mode == "guided" else None,
    "cuda-graph": lambda mode, latent_eta: None,
    "tensorrt": lambda mode, latent_eta: "exported graphs have no backward: dp mode only" if mode == "guided" else None,
}


def machine_lacks(runtime: str) -> str | None:
    if runtime in ("cuda-graph", "tensorrt") and not torch.cuda.is_available():
        return "needs a CUDA GPU"
    module = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}.get(runtime)
    if module:
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed"
    return None


def build(runtime: str, policy, mode: str, prefix_len: int, tmp_path):
    """runtime -> plan(obs, generator, prefix, prefix_weight) -> action_pred."""
    if runtime == "cpp":
        from dpag_engine.runtime.cpu import CpuRuntime
        planner = CpuRuntime.planner(policy, guided=mode == "guided")
        return lambda obs, g, **rtc: planner.predict_action(obs, g, mode=mode, **rtc)["action_pred"]
    if runtime in ("onnxruntime", "tensorrt"):
        from dpag_engine.export import export_onnx
        from dpag_engine.runtime import load_planner
        export_onnx(policy, tmp_path / "export", batch=2)
        planner = load_planner(tmp_path / "export", runtime=runtime)
        return lambda obs, g, **rtc: planner.predict_action(obs, g, mode=mode, **rtc)["action_pred"]
    from dpag_engine.runtime.cuda_graph import CudaGraphRuntime
    graphed = CudaGraphRuntime.planner(policy.cuda(), batch=2, mode=mode, prefix_len=prefix_len)
    return lambda obs, g, **rtc: graphed.predict_action({k: v.cuda() for k, v in obs.items()}, g,
                                                        **{k: v.cuda() for k, v in rtc.items()})["action_pred"].cpu()


@pytest.mark.parametrize("latent_eta", [0.0, 0.3])
@pytest.mark.parametrize("sampler", [pytest.param(name, marks=[pytest.mark.slow] if name == "ddpm" else [])
                                     for name in SAMPLERS])
@pytest.mark.parametrize("rtc", ["rtc-off", "rtc-on"])
@pytest.mark.parametrize("mode", ["dp", "guided"])
@pytest.mark.parametrize("runtime", [pytest.param(name, marks=[pytest.mark.slow] if name != "cpp" else [])
                                     for name in CAPABILITY])
def test_runtime_matches_the_reference(runtime, mode, rtc, sampler, latent_eta, tmp_path):
    reason = machine_lacks(runtime) or CAPABILITY[runtime](mode, latent_eta)
    if reason:
        pytest.skip(f"{runtime}: {reason}")
    seed = int(torch.randint(0, 1 << 30, ()))
    policy = make_policy(seed=seed % 1000, scheduler=SAMPLERS[sampler],
                         guidance=LatentUpdateConfig(steps=2, gamma=0.5, eta=latent_eta)).eval()
    cfg = policy.cfg
    g = torch.Generator().manual_seed(seed)
    obs = make_obs(cfg, 2, g)
    inpaint = {}
    if rtc == "rtc-on":   # 3 committed rows and 2 decaying soft rows, in raw action units
        ref = policy.predict_action(obs, torch.Generator().manual_seed(seed + 1))["action_pred"]
        start = cfg.n_obs_steps - 1
        inpaint = {"prefix": ref[:, start:start + 5] + 0.1 * torch.randn(2, 5, cfg.action_dim, generator=g),
                   "prefix_weight": torch.tensor([1.0, 1.0, 1.0, 0.6, 0.3])}
    device = "cuda" if runtime == "cuda-graph" else "cpu"
    want = policy.predict_action(obs, torch.Generator().manual_seed(seed + 2), mode=mode, **inpaint)["action_pred"]
    plan = build(runtime, policy, mode, 5 if inpaint else 0, tmp_path)
    got = plan(obs, torch.Generator(device).manual_seed(seed + 2), **inpaint)
    err = normalised_error(policy, got, want)
    assert err <= TOL, f"{runtime} {mode} {rtc} {sampler} latent eta {latent_eta}: normalised error {err:.2e}"
