"""Inference: dp and guided modes, seeding, receding horizon, normalisation, bad input."""
import json
from pathlib import Path

import pytest
import torch

from dpag_engine.config import LatentUpdateConfig, SchedulerConfig
from dpag_engine.policy import DPAGPolicy
from factories import make_batch, make_obs, make_policy, SMALL_IMAGE

GOLDEN = Path(__file__).parent / "golden" / "tiny_dpag_predict_action.json"


@pytest.fixture(scope="module")
def trained():
    """A tiny DP-AG briefly trained on a fixed batch, so the latent actually steers its predictions."""
    policy = make_policy(seed=7)
    batch = make_batch(policy.cfg, 8, torch.Generator().manual_seed(8))
    opt = torch.optim.Adam(policy.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(9)
    for _ in range(30):
        loss, _ = policy.compute_loss(batch, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy.eval(), batch["obs"]


def test_shapes_slicing_and_seeding(trained):
    policy, obs = trained
    cfg = policy.cfg
    out = policy.predict_action(obs, torch.Generator().manual_seed(0))
    assert out["action_pred"].shape == (8, cfg.horizon, cfg.action_dim)
    assert torch.equal(out["action"], out["action_pred"][:, cfg.n_obs_steps - 1:cfg.n_obs_steps - 1 + cfg.n_action_steps])
    again = policy.predict_action(obs, torch.Generator().manual_seed(0))
    assert torch.equal(out["action_pred"], again["action_pred"])
    other = policy.predict_action(obs, torch.Generator().manual_seed(1))
    assert not torch.allclose(out["action_pred"], other["action_pred"])


def test_actions_come_out_in_raw_units(trained):
    policy, obs = trained
    out = policy.predict_action(obs, torch.Generator().manual_seed(0))["action_pred"]
    lo, hi = policy.normalizer.action_min, policy.normalizer.action_max
    # The sampler clips x0 to [-1, 1]; DDIM with eta=0 ends on x0, so actions stay in the data range.
    assert (out >= lo - 1e-4).all() and (out <= hi + 1e-4).all()
    assert (out.amax(dim=(0, 1)) - out.amin(dim=(0, 1)) > 0.1 * (hi - lo)).all()  # and use it


def test_guided_mode_changes_the_result_and_reduces_to_dp_at_gamma_zero(trained):
    policy, obs = trained
    dp = policy.predict_action(obs, torch.Generator().manual_seed(0), mode="dp")["action_pred"]
    guided = policy.predict_action(obs, torch.Generator().manual_seed(0), mode="guided")["action_pred"]
    assert (guided - dp).abs().max() > 1e-3
    zero = DPAGPolicy(policy.cfg.replace(guidance=LatentUpdateConfig(gamma=0.0)))
    zero.load_state_dict(policy.state_dict())
    zero.eval()
    guided0 = zero.predict_action(obs, torch.Generator().manual_seed(0), mode="guided")["action_pred"]
    torch.testing.assert_close(guided0, dp, rtol=0, atol=0)


def test_stochastic_samplers_run():
    for sched in (SchedulerConfig(sampler="ddpm"), SchedulerConfig(eta=1.0, num_inference_steps=8)):
        policy = make_policy(scheduler=sched).eval()
        obs = make_obs(policy.cfg, 2, torch.Generator().manual_seed(0))
        a = policy.predict_action(obs, torch.Generator().manual_seed(0))["action"]
        b = policy.predict_action(obs, torch.Generator().manual_seed(0))["action"]
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_image_policy_trains_and_samples():
    policy = make_policy(seed=2, **SMALL_IMAGE)
    batch = make_batch(policy.cfg, 3, torch.Generator().manual_seed(1))
    loss, metrics = policy.compute_loss(batch, torch.Generator().manual_seed(2))
    loss.backward()
    assert policy.encoder.cameras["front"].trunk[0].weight.grad.abs().sum() > 0
    policy.eval()
    for mode in ("dp", "guided"):
        out = policy.predict_action(batch["obs"], torch.Generator().manual_seed(0), mode=mode)
        assert out["action"].shape == (3, 8, 2) and torch.isfinite(out["action"]).all()


def test_bad_input_fails_clearly():
    policy = make_policy().eval()
    obs = make_obs(policy.cfg, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"obs\['state'\]: contains NaN"):
        policy.predict_action({"state": obs["state"].clone().index_fill_(1, torch.tensor([0]), float("nan"))})
    with pytest.raises(ValueError, match=r"obs\['state'\]: expected shape \(B, 2, 5\)"):
        policy.predict_action({"state": obs["state"][:, :1]})
    with pytest.raises(KeyError, match="missing key 'state'"):
        policy.predict_action({"image": obs["state"]})
    with pytest.raises(ValueError, match="mode"):
        policy.predict_action(obs, mode="fast")
    batch = make_batch(policy.cfg, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"action: expected shape \(2, 16, 3\)"):
        policy.compute_loss({**batch, "action": batch["action"][:, :8]})
    unfitted = DPAGPolicy(policy.cfg)
    with pytest.raises(RuntimeError, match="normalizer is not fitted"):
        unfitted.predict_action(obs)


def golden_case():
    policy = make_policy(seed=123).eval()
    obs = make_obs(policy.cfg, 2, torch.Generator().manual_seed(124))
    return {mode: policy.predict_action(obs, torch.Generator().manual_seed(125), mode=mode)["action"]
            for mode in ("dp", "guided")}


def test_golden_outputs():
    """Regression pin: a change to the model, sampler or guidance that moves outputs must be deliberate.
    Regenerate with `python tests/test_policy.py` and say why in the commit."""
    expected = json.loads(GOLDEN.read_text())
    for mode, actions in golden_case().items():
        torch.testing.assert_close(actions, torch.tensor(expected[mode]), rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({k: v.tolist() for k, v in golden_case().items()}))
    print(f"wrote {GOLDEN}")

