"""One observation rule for every runtime (the reference, the C++ engine with its torch encoder,
ONNX Runtime): the same dtypes cast or refused, absurd values refused by name before anything
runs, and a plan never returns NaN.

Found by a hostile-input pass (issue "Reliability", item 3): 1e30 in one state element gave all-NaN
actions from predict_action and finite ones from the engine; float64 and int inputs failed deep in
torch on one path and were cast silently on another.
"""
import numpy as np
import pytest
import torch

from dpag_engine.planner import MAX_NORMALIZED_OBS
from dpag_engine.runtime.cpu import CpuRuntime

from factories import SMALL_IMAGE, make_obs, make_policy


def runtimes(policy, tmp_path, verify_export=True):
    """name -> plan(obs, generator) for every runtime this machine has."""
    plans = {"reference": lambda obs, g: policy.predict_action(obs, g),
             "cpp": lambda obs, g, e=CpuRuntime.planner(policy, guided=False): e.predict_action(obs, g)}
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return plans
    from dpag_engine.export import export_onnx
    from dpag_engine.runtime.onnx_runtime import OnnxRuntime
    export_onnx(policy, tmp_path / "onnx", batch=1, verify=verify_export)
    onnx = OnnxRuntime(tmp_path / "onnx", providers=["CPUExecutionProvider"]).planner()
    plans["onnxruntime"] = lambda obs, g: onnx.predict_action(obs, g)
    return plans


@pytest.fixture(scope="module", params=["lowdim", "image"])
def case(request, tmp_path_factory):
    policy = (make_policy() if request.param == "lowdim" else make_policy(**SMALL_IMAGE, posterior="mlp")).eval()
    return policy, runtimes(policy, tmp_path_factory.mktemp(request.param))


def fresh_obs(policy, seed):
    return make_obs(policy.cfg, 1, torch.Generator().manual_seed(seed))


def test_huge_finite_state_is_refused_by_name_on_every_runtime(case):
    policy, plans = case
    obs = fresh_obs(policy, int(np.random.default_rng().integers(1 << 30)))
    obs["state"][0, -1, 2] = 1e30          # finite, but 1e30 / (training range) overflows GroupNorm
    for name, plan in plans.items():
        with pytest.raises(ValueError, match=r"obs\['state'\]: the value at index \(0, 1, 2\) lies .* training ranges"):
            plan(obs, torch.Generator().manual_seed(0))


def test_values_just_inside_the_limit_still_plan(case):
    policy, plans = case
    obs = fresh_obs(policy, 3)
    lo, hi = policy.normalizer.state_min[1], policy.normalizer.state_max[1]
    # 0.9 x the limit, in raw units: far outside the training data, but the networks stay finite.
    obs["state"][0, 0, 1] = float(hi + 0.45 * MAX_NORMALIZED_OBS * (hi - lo))
    for name, plan in plans.items():
        out = plan(obs, torch.Generator().manual_seed(0))["action"]
        assert torch.isfinite(out).all(), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int32])
def test_float_and_integer_inputs_are_cast_the_same_way_everywhere(case, dtype):
    """Every runtime gives the float32 input's actions for the same values in another real dtype."""
    policy, plans = case
    obs = fresh_obs(policy, 5)
    if dtype == torch.int32:
        obs = {k: v.round() for k, v in obs.items()}
    obs = {k: v.to(dtype).to(torch.float32) for k, v in obs.items()}   # values representable in dtype
    cast = {k: v.to(dtype) for k, v in obs.items()}
    for name, plan in plans.items():
        want = plan(obs, torch.Generator().manual_seed(7))["action"]
        got = plan(cast, torch.Generator().manual_seed(7))["action"]
        assert got.dtype == torch.float32 and torch.equal(got, want), name


@pytest.mark.parametrize("bad", [torch.bool, torch.complex64])
def test_non_real_dtypes_are_refused_everywhere(case, bad):
    policy, plans = case
    obs = {k: v.to(bad) for k, v in fresh_obs(policy, 6).items()}
    for name, plan in plans.items():
        with pytest.raises(TypeError, match=r"obs\['.*'\]: expected real numbers"):
            plan(obs, torch.Generator().manual_seed(0))


def test_a_plan_never_returns_nan(tmp_path):
    """Weights that overflow (here: one output bias at 3e38) give NaN from a finite observation:
    every runtime raises instead of handing the actions on."""
    policy = make_policy().eval()
    final = [m for m in policy.unet.modules() if isinstance(m, torch.nn.Conv1d)][-1]
    with torch.no_grad():
        final.bias.fill_(3e38)
        final.weight.fill_(3e38)
    for name, plan in runtimes(policy, tmp_path, verify_export=False).items():
        with pytest.raises(FloatingPointError, match="non-finite actions"):
            plan(fresh_obs(policy, 8), torch.Generator().manual_seed(0))
