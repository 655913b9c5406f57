"""The policy and the DP-AG training step run unchanged on every backend and give the reference's numbers."""
import pytest
import torch

from dpag_engine.config import LatentUpdateConfig, SchedulerConfig
from dpag_engine.ops import use_backend
from factories import make_batch, make_obs, make_policy

FAST_BACKENDS = ["cpp", "triton"]  # each compared against "torch", the reference


def policy_for_backends(**overrides):
    # K = 8 keeps the Triton interpreter quick; S = 2 with noise exercises every latent-update op.
    return make_policy(seed=11, scheduler=SchedulerConfig(num_inference_steps=8),
                       guidance=LatentUpdateConfig(steps=2, dt=0.5, gamma=1.0, eta=0.0), **overrides)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("mode", ["dp", "guided"])
def test_predict_action_matches_reference(backend, mode):
    policy = policy_for_backends().eval()
    obs = make_obs(policy.cfg, 3, torch.Generator().manual_seed(1))
    ref = policy.predict_action(obs, torch.Generator().manual_seed(2), mode=mode)["action_pred"]
    with use_backend(backend):
        got = policy.predict_action(obs, torch.Generator().manual_seed(2), mode=mode)["action_pred"]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_training_step_matches_reference(backend):
    """Loss and every parameter gradient of the DP-AG step (q_sample, em_step and the force go
    through the backend). Tolerance: float32 with differently ordered reductions."""
    policy = policy_for_backends(posterior="mlp")
    batch = make_batch(policy.cfg, 6, torch.Generator().manual_seed(3))

    def step():
        policy.zero_grad(set_to_none=True)
        loss, _ = policy.compute_loss(batch, torch.Generator().manual_seed(4))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters()}

    loss_ref, grads_ref = step()
    with use_backend(backend):
        loss, grads = step()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
