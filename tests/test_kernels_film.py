"""Fused FiLM vector-Jacobian product (dpag_engine.kernels.film) vs torch.autograd.

A standalone module mimics the U-Net's FiLM sites (Mish -> Linear -> scale * h + bias); the
oracle is torch.autograd.grad in float64. Tolerances: fp32 inputs rtol 1e-4 / atol 1e-4 x max|ref|
(reductions over T and a K = sum 2 C_b dot product, fp32 accumulation); fp16 inputs are compared
to the float64 result on the same fp16-rounded values, rtol/atol 5e-3 x max|ref| (fp16 output).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dpag_engine import kernels as K
from dpag_engine.kernels import _utils
from dpag_engine.kernels.film import FilmLayout, film_sum_over_time

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter converts a 1-element array to int for `range(0, K, BLOCK)` over a runtime bound.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(_utils, "POISON_OUTPUTS", True)


class FilmSites(nn.Module):
    """cond -> Mish -> Linear(cond_dim, 2 C_b) -> (scale_b, bias_b); y_b = scale_b h_b + bias_b."""

    def __init__(self, channels, dsed, gdim):
        super().__init__()
        self.dsed = dsed
        self.encoders = nn.ModuleList(nn.Sequential(nn.Mish(), nn.Linear(dsed + gdim, 2 * c)) for c in channels)

    def forward(self, step_emb, global_cond, hs):
        cond = torch.cat([step_emb, global_cond], dim=1)
        outs = []
        for enc, h in zip(self.encoders, hs):
            scale, bias = enc(cond).unsqueeze(-1).chunk(2, dim=1)
            outs.append(scale * h + bias)
        return outs


def make_case(B, channels, lengths, dsed, gdim, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mod = FilmSites(channels, dsed, gdim).double().to(DEVICE)
    step_emb = torch.randn(B, dsed, generator=g, dtype=torch.float64).to(DEVICE)
    # Spread over Mish's curved region and both tails (Mish' matters most around [-3, 3]).
    gc = (3 * torch.randn(B, gdim, generator=g, dtype=torch.float64)).to(DEVICE)
    hs = [torch.randn(B, c, t, generator=g, dtype=torch.float64).to(DEVICE) for c, t in zip(channels, lengths)]
    dys = [torch.randn(B, c, t, generator=g, dtype=torch.float64).to(DEVICE) for c, t in zip(channels, lengths)]
    return mod, step_emb, gc, hs, dys


def reference(mod, step_emb, gc, hs, dys):
    gc = gc.detach().double().requires_grad_()
    outs = mod(step_emb.double(), gc, [h.double() for h in hs])
    (d,) = torch.autograd.grad(outs, gc, [dy.double() for dy in dys])
    return d


SITES = [  # (channels, lengths): widths/horizons like a tiny U-Net (down, mid, up), plus odd sizes
    ([16, 16, 32, 32, 32, 32, 16, 16], [16, 16, 8, 8, 8, 8, 16, 16]),
    ([3, 17, 5], [8, 16, 1]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,gdim", [(1, 2), (3, 66), (64, 137)])
@pytest.mark.parametrize("sites", range(len(SITES)))
def test_film_vjp_matches_autograd(B, gdim, sites, dtype):
    channels, lengths = SITES[sites]
    mod, step_emb, gc, hs, dys = make_case(B, channels, lengths, dsed=8, gdim=gdim, seed=B + gdim + sites)
    # Round the inputs to the tested dtype first; the oracle sees the same rounded values.
    hs, dys, gc_t = [h.to(dtype) for h in hs], [d.to(dtype) for d in dys], gc.to(dtype)
    for enc in mod.encoders:
        enc[1].weight.data = enc[1].weight.data.to(dtype).double()
    ref = reference(mod, step_emb, gc_t, hs, dys)
    w_cat = K.film_weight_cat([enc[1].weight.detach().to(dtype) for enc in mod.encoders], slice(8, None))
    out = K.film_vjp(dys, hs, w_cat, gc_t)
    assert out.shape == (B, gdim) and out.dtype == dtype and torch.isfinite(out).all()
    tol = 1e-4 if dtype == torch.float32 else 5e-3
    scale = float(ref.abs().max())
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * scale)


def test_film_packed_views_and_sum_over_time():
    channels, lengths = SITES[1]
    B = 3
    mod, step_emb, gc, hs, dys = make_case(B, channels, lengths, dsed=4, gdim=66, seed=5)
    layout = FilmLayout(channels, lengths)
    dy_pack = layout.empty(B, torch.float32, DEVICE)
    h_pack = layout.empty(B, torch.float32, DEVICE)
    for v, x in zip(layout.views(dy_pack), dys):
        v.copy_(x)  # a producer writing straight into the pack
    for v, x in zip(layout.views(h_pack), hs):
        v.copy_(x)
    dsb = film_sum_over_time(dy_pack, h_pack, layout)
    expect = torch.cat([torch.cat([(d * h).sum(-1), d.sum(-1)], dim=1) for d, h in zip(dys, hs)], dim=1)
    torch.testing.assert_close(dsb.double(), expect, rtol=1e-5, atol=1e-5)
    w_cat = K.film_weight_cat([enc[1].weight.detach().float() for enc in mod.encoders], slice(4, None))
    out = K.film_vjp(dy_pack, h_pack, w_cat, gc.float(), layout)
    ref = reference(mod, step_emb, gc, hs, dys)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    with pytest.raises(ValueError):
        K.film_vjp(dy_pack, h_pack, w_cat[:-1], gc.float(), layout)


def test_mish_grad_extremes():
    # Large |x|: no overflow / NaN in Mish'; matches autograd of F.mish in float64.
    x = torch.tensor([[-100.0, -30.0, -5.0, -1.0, 0.0, 0.5, 3.0, 19.9, 25.0, 1e4]], dtype=torch.float64)
    xr = x.clone().requires_grad_()
    (ref,) = torch.autograd.grad(nn.functional.mish(xr).sum(), xr)
    layout = FilmLayout([1], [1])
    # A single site with C=1, T=1, h=0, dy=1: d_bias = 1 so d_cond = w_bias_row * Mish'(cond).
    w = torch.zeros(2, x.shape[1], dtype=torch.float32, device=DEVICE)
    w[1] = 1.0
    ones = torch.ones(1, 1, 1, device=DEVICE)
    out = K.film_vjp([ones], [ones * 0], w, x.float().to(DEVICE), layout)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("horizon", [8, 16])
def test_unet_film_vjp_equals_autograd(horizon):
    unet = pytest.importorskip("dpag_engine.model.unet")
    from dpag_engine.config import UNetConfig
    torch.manual_seed(horizon)
    cfg = UNetConfig(down_dims=(16, 32), kernel_size=3, diffusion_step_embed_dim=8, n_groups=8)
    B, Da, G = 3, 2, 66
    model = unet.ConditionalUnet1D(Da, G, cfg).double().to(DEVICE)
    sample = torch.randn(B, horizon, Da, dtype=torch.float64, device=DEVICE)
    k = torch.tensor([0, 41, 99], device=DEVICE)
    gc = torch.randn(B, G, dtype=torch.float64, device=DEVICE)
    gcr = gc.clone().requires_grad_()
    eps_ref = model(sample, k, gcr)
    (g_ref,) = torch.autograd.grad(0.5 * eps_ref.pow(2).sum(), gcr)
    eps, g = K.unet_film_vjp(model, sample, k, gc)
    torch.testing.assert_close(eps, eps_ref.detach())
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9 * float(g_ref.abs().max()))
    # fp32 model, frozen weights (the EMA copy at inference): same force to fp32 accuracy.
    model.float().requires_grad_(False)
    _, g32 = K.unet_film_vjp(model, sample.float(), k, gc.float())
    torch.testing.assert_close(g32.double(), g_ref, rtol=1e-4, atol=1e-4 * float(g_ref.abs().max()))
