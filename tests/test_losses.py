"""Loss terms against independent formulas, and the literal vs efficient DP-AG loss."""
import time

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from dpag_engine.config import LatentUpdateConfig, LossConfig
from dpag_engine.losses import diffusion_loss, info_nce, kl_to_unit_gaussian
from factories import make_batch, make_policy


def test_info_nce_matches_an_explicit_loop():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 16, 2, generator=g), torch.randn(6, 16, 2, generator=g)
    tau = 0.8
    expected = 0.0
    for i in range(6):
        sims = torch.stack([torch.cosine_similarity(a[i].flatten(), b[j].flatten(), dim=0) for j in range(6)]) / tau
        expected += -(sims[i] - torch.logsumexp(sims, dim=0))
    torch.testing.assert_close(info_nce(a, b, tau), expected / 6)


def test_kl_and_diffusion_loss_match_their_definitions():
    g = torch.Generator().manual_seed(1)
    mu, log_var = torch.randn(4, 2, 7, generator=g), torch.randn(4, 2, 7, generator=g)
    kl = kl_divergence(Normal(mu, torch.exp(0.5 * log_var)), Normal(0.0, 1.0)).mean()
    torch.testing.assert_close(kl_to_unit_gaussian(mu, log_var), kl)
    center = torch.randn(4, 2, 7, generator=g)
    kl_obs = kl_divergence(Normal(mu, torch.exp(0.5 * log_var)), Normal(center, 1.0)).mean()
    torch.testing.assert_close(kl_to_unit_gaussian(mu, log_var, center), kl_obs)
    eps, noise = torch.randn(4, 16, 2, generator=g), torch.randn(4, 16, 2, generator=g)
    torch.testing.assert_close(diffusion_loss(eps, noise, 2.5), ((eps - 2.5 * noise) ** 2).mean())


@pytest.mark.parametrize("posterior", ["identity", "mlp"])
def test_observation_prior_and_guided_diffusion_loss(posterior):
    """kl_prior="observation" centres the KL on the features; lambda_diff_guided adds the diffusion
    loss at the guided latent, which is the static one exactly when the update does not move z."""
    batch_seed, loss_seed = 5, 11
    still = make_policy(torch.float64, seed=3, posterior=posterior, latent=LatentUpdateConfig(gamma=0.0),
                        loss=LossConfig(kl_prior="observation", lambda_diff_guided=0.5))
    batch = make_batch(still.cfg, 8, torch.Generator().manual_seed(batch_seed), torch.float64)
    loss, m = still.compute_loss(batch, torch.Generator().manual_seed(loss_seed))
    torch.testing.assert_close(m["loss_diff_guided"], m["loss_diff"])
    torch.testing.assert_close(loss, m["loss_diff"] * 1.5 + m["loss_cont"] + m["loss_kl"])
    features = still.encode(still.check_obs(batch["obs"])[0])
    mu, log_var = still.posterior(features)
    expected_kl = kl_divergence(Normal(mu, torch.exp(0.5 * log_var)), Normal(features, 1.0)).mean()
    torch.testing.assert_close(m["loss_kl"], expected_kl)
    if posterior == "identity":   # mu = features: only the variance is penalised
        assert torch.equal(mu, features)
    moving = make_policy(torch.float64, seed=3, posterior=posterior,
                         loss=LossConfig(kl_prior="observation", lambda_diff_guided=0.5))
    _, m2 = moving.compute_loss(batch, torch.Generator().manual_seed(loss_seed))
    torch.testing.assert_close(m2["loss_diff"], m["loss_diff"])
    assert abs(m2["loss_diff_guided"].item() - m2["loss_diff"].item()) > 1e-6   # z moved: another input


def loss_and_grads(policy, batch, seed):
    policy.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss, metrics = policy.compute_loss(batch, torch.Generator().manual_seed(seed))
    loss.backward()
    elapsed = time.perf_counter() - start
    return loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}, elapsed


@pytest.mark.parametrize("overrides", [
    dict(),                                                                    # released code
    dict(posterior="mlp", latent=LatentUpdateConfig(steps=2, dt=0.5, gamma=0.3, eta=0.2, normalize=False)),
], ids=["released", "mlp-posterior-sde"])
def test_literal_and_efficient_losses_agree_in_float64(overrides):
    literal = make_policy(torch.float64, seed=3, loss=LossConfig(implementation="literal", target_scale=2.5), **overrides)
    efficient = make_policy(torch.float64, seed=3, loss=LossConfig(implementation="efficient", target_scale=2.5), **overrides)
    efficient.load_state_dict(literal.state_dict())
    batch = make_batch(literal.cfg, 8, torch.Generator().manual_seed(4), torch.float64)
    loss_l, grads_l, t_l = loss_and_grads(literal, batch, seed=9)
    loss_e, grads_e, t_e = loss_and_grads(efficient, batch, seed=9)
    torch.testing.assert_close(loss_e, loss_l, rtol=1e-6, atol=1e-10)
    assert grads_l.keys() == grads_e.keys()
    assert any(n.startswith("posterior.") for n in grads_l)  # the KL reaches the posterior
    assert len(grads_l) == len([p for p in literal.parameters()])
    for name in grads_l:
        torch.testing.assert_close(grads_e[name], grads_l[name], rtol=1e-6, atol=1e-10, msg=name)
    print(f"\nloss+backward on the tiny recipe, B=8, float64: literal {t_l * 1e3:.1f} ms, efficient {t_e * 1e3:.1f} ms")


def test_plain_dp_has_no_posterior_terms():
    policy = make_policy(method="dp")
    assert policy.posterior is None
    batch = make_batch(policy.cfg, 4, torch.Generator().manual_seed(5))
    loss, metrics = policy.compute_loss(batch, torch.Generator().manual_seed(6))
    assert set(metrics) == {"loss", "loss_diff"} and metrics["loss"] == metrics["loss_diff"]
    loss.backward()
    assert all(p.grad is not None for p in policy.unet.parameters())
