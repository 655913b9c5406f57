"""The VJP force and the Euler-Maruyama latent update against independent float64 computations."""
import pytest
import torch

from dpag_engine.config import LatentUpdateConfig
from dpag_engine.guidance import draw_latent_noise, force_at, latent_update
from dpag_engine.ops import torch_ref
from factories import make_policy


@pytest.fixture(scope="module")
def setup():
    policy = make_policy(torch.float64, seed=1)
    cfg = policy.cfg
    g = torch.Generator().manual_seed(2)
    b = 3
    a_k = torch.randn(b, cfg.horizon, cfg.action_dim, generator=g, dtype=torch.float64)
    t = torch.tensor([4, 50, 97])
    mu = torch.randn(b, cfg.n_obs_steps, cfg.obs_feature_dim, generator=g, dtype=torch.float64)
    log_var = torch.randn(mu.shape, generator=g, dtype=torch.float64).clamp(-2, 1)
    return policy, (policy.unet, a_k, t), mu, log_var


def policy_predict(net):
    unet, a_k, t = net
    return lambda z: unet(a_k, t, z.flatten(1))


def finite_difference_force(predict, z, h=1e-6):
    """g = J^T eps with J from central differences, per sample (float64)."""
    eps = predict(z).detach()
    g = torch.zeros_like(z)
    flat = z.reshape(z.shape[0], -1)
    for j in range(flat.shape[1]):
        dz = torch.zeros_like(flat)
        dz[:, j] = h
        d_eps = (predict((flat + dz).view_as(z)) - predict((flat - dz).view_as(z))) / (2 * h)  # column j of J
        g.view(z.shape[0], -1)[:, j] = (d_eps * eps).flatten(1).sum(dim=1)
    return g


def test_vjp_force_equals_finite_difference_jacobian(setup):
    _, net, mu, _ = setup
    with torch.no_grad():
        expected = finite_difference_force(policy_predict(net), mu)
    got = force_at(*net, mu)
    assert expected.abs().max() > 1e-3  # a real force, not a vacuous comparison
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)


def test_released_code_case_is_mu_plus_sigma_unit_force(setup):
    _, net, mu, log_var = setup
    z = latent_update(*net, mu, log_var, LatentUpdateConfig(steps=1, dt=1.0, gamma=1.0, eta=0.0, normalize=True))
    with torch.no_grad():
        g = finite_difference_force(policy_predict(net), mu)
    expected = mu + torch.exp(0.5 * log_var) * g / (g.norm(dim=-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(z, expected, rtol=1e-6, atol=1e-8)
    # normalised per sample and per observation step: each row moved by exactly sigma-weighted unit length
    step = (z - mu) / torch.exp(0.5 * log_var)
    torch.testing.assert_close(step.norm(dim=-1), torch.ones(step.shape[:-1], dtype=step.dtype), rtol=1e-5, atol=0)


def test_multi_step_reevaluates_the_force(setup):
    _, net, mu, log_var = setup
    cfg = LatentUpdateConfig(steps=3, dt=0.25, gamma=0.7, eta=0.0, normalize=False)
    z = latent_update(*net, mu, log_var, cfg)
    sigma = torch.exp(0.5 * log_var)
    expected = mu
    with torch.no_grad():
        for _ in range(3):
            expected = expected + 0.7 * 0.25 * sigma * finite_difference_force(policy_predict(net), expected)
    torch.testing.assert_close(z, expected, rtol=1e-6, atol=1e-8)


def test_brownian_term_is_the_callers_draws():
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(256, 2, 137, generator=gen, dtype=torch.float64)
    g = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    log_var = torch.randn(z.shape, generator=gen, dtype=torch.float64).clamp(-3, 1)
    xi = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    dt, gamma, eta = 0.3, 0.5, 0.8
    out = torch_ref.em_step(z, g, log_var, gamma, dt, eta, True, xi)
    sigma = torch.exp(0.5 * log_var)
    drift = gamma * dt * sigma * g / (g.norm(dim=-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(out, z + drift + eta * dt ** 0.5 * sigma * xi, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="eta > 0 needs xi"):
        torch_ref.em_step(z, g, log_var, gamma, dt, eta, True)


def test_latent_noise_is_drawn_only_when_used():
    """eta = 0 draws nothing (the caller's generator is untouched); eta > 0 draws (K, S, *z_shape)."""
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    assert draw_latent_noise(LatentUpdateConfig(eta=0.0), (2, 2, 5), g, steps=4) is None
    assert torch.equal(g.get_state(), state)
    xi = draw_latent_noise(LatentUpdateConfig(steps=3, eta=0.2), (2, 2, 5), g, steps=4)
    assert xi.shape == (4, 3, 2, 2, 5) and xi.std() > 0.5


def test_em_step_gradients():
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    log_var = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64)
    xi = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z, lv: torch_ref.em_step(z, g, lv, 0.9, 0.5, 0.3, True, xi), (z, log_var))
