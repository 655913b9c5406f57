"""CudaGraphRuntime (dpag_engine/runtime/cuda_graph.py): a plan as two CUDA-graph replays.

The graphs run DPAGPolicy.latent and DPAGPolicy.denoise, the bodies predict_action itself runs (tests/test_policy.py and
every backend test check that body); what only a GPU can check -- capture, replay with new inputs,
equality with predict_action -- runs where CUDA is present and is skipped here.
"""
from __future__ import annotations

import pytest
import torch

from dpag_engine.runtime.cuda_graph import CudaGraphRuntime

from factories import make_obs, make_policy, SMALL_IMAGE

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_needs_a_gpu():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*CpuRuntime"):
        CudaGraphRuntime(make_policy().eval())


@cuda
@pytest.mark.parametrize("overrides", [{}, SMALL_IMAGE], ids=["lowdim", "image"])
@pytest.mark.parametrize("mode,prefix_len", [("dp", 0), ("guided", 0), ("dp", 5)])
def test_replay_equals_predict_action(overrides, mode, prefix_len):
    policy = make_policy(**overrides).cuda().eval()
    graphed = CudaGraphRuntime.planner(policy, batch=2, mode=mode, prefix_len=prefix_len)
    for seed in range(3):  # fresh inputs each replay: the static buffers are refilled
        obs = {k: v.cuda() for k, v in make_obs(policy.cfg, 2, torch.Generator().manual_seed(seed)).items()}
        rtc = {}
        if prefix_len:
            rtc = {"prefix": torch.randn(2, prefix_len, policy.cfg.action_dim, generator=torch.Generator().manual_seed(seed)).cuda() * 3 + 2}
        want = policy.predict_action(obs, torch.Generator("cuda").manual_seed(seed), mode=mode, **rtc)
        got = graphed.predict_action(obs, torch.Generator("cuda").manual_seed(seed), **rtc)
        torch.testing.assert_close(got["action_pred"], want["action_pred"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["action"], want["action"], atol=1e-5, rtol=1e-5)


@cuda
def test_bad_input_before_replay():
    policy = make_policy().cuda().eval()
    graphed = CudaGraphRuntime.planner(policy, batch=1)
    obs = {k: v.cuda() for k, v in make_obs(policy.cfg, 2, torch.Generator().manual_seed(0)).items()}
    with pytest.raises(ValueError, match=r"batch 2 outside \[1, max_batch=1\]"):
        graphed.predict_action(obs)
    obs = {k: v[:1].clone() for k, v in obs.items()}
    obs["state"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        graphed.predict_action(obs)
    with pytest.raises(ValueError, match="prefix_len=0"):
        graphed.predict_action({k: v.nan_to_num() for k, v in obs.items()}, prefix=torch.zeros(1, 2, policy.cfg.action_dim).cuda())
