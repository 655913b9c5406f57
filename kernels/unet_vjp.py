"""The action-guided force g = (d eps / d global_cond)^T v through `ConditionalUnet1D`, with the
conditioning part of the backward done by the fused FiLM kernel (`film.film_vjp`).

How: forward hooks record, for every ConditionalResidualBlock1D b, h_b (output of blocks[0], the
FiLM input) and y_b (input of blocks[1], the FiLM output). One activation-only backward,
`torch.autograd.grad(<eps, v>, [y_b ...])`, gives every dy_b: autograd is asked for no weight
gradients, and does not walk the 2 x n_sites small cond-encoder graphs either. `film_vjp` then
turns (dy_b, h_b) for all sites and the whole batch into d global_cond in two launches.

global_cond enters the U-Net only through cond = [step_emb, global_cond] -> Mish -> Linear per
site, so the global columns of the FiLM weights and Mish'(global_cond) are all that is needed.
"""
from __future__ import annotations

import torch

from .film import FilmLayout, film_vjp, film_weight_cat


def film_sites(model) -> list:
    """The FiLM sites (ConditionalResidualBlock1D modules) of a ConditionalUnet1D, in forward order."""
    return model.residual_blocks()


def global_film_weights(model) -> torch.Tensor:
    """W_cat (sum_b 2 C_b, G): the FiLM Linear weights restricted to the global_cond columns.
    Rebuild after every optimiser step (it is a copy); cheap next to one U-Net forward."""
    dsed = model.diffusion_step_encoder[-1].out_features
    return film_weight_cat([blk.cond_encoder[-1].weight for blk in film_sites(model)], slice(dsed, None))


def unet_film_vjp(model, sample: torch.Tensor, timestep, global_cond: torch.Tensor,
                  cotangent: torch.Tensor | None = None, w_cat: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (eps, g): eps = model(sample, timestep, global_cond) (detached) and
    g = (d eps / d global_cond)^T v with v = `cotangent` (default: eps itself, i.e. the gradient of
    0.5 ||eps||^2, the DP-AG force of docs/method.md §5). g has global_cond's shape and dtype."""
    sites = film_sites(model)
    hs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    handles = []
    for blk in sites:
        handles.append(blk.blocks[0].register_forward_hook(lambda m, i, o: hs.append(o.detach())))
        handles.append(blk.blocks[1].register_forward_pre_hook(lambda m, i: ys.append(i[0])))
    try:
        with torch.enable_grad():
            # A sample that requires grad makes every activation part of the graph even when the
            # weights are frozen (an EMA copy at inference); only the ys are differentiated to.
            eps = model(sample.detach().requires_grad_(), timestep, global_cond.detach())
    finally:
        for h in handles:
            h.remove()
    if len(ys) != len(sites) or not all(y.requires_grad for y in ys):
        raise RuntimeError(f"unet_film_vjp: recorded {len(ys)} of {len(sites)} FiLM sites")
    v = eps.detach() if cotangent is None else cotangent
    dys = torch.autograd.grad(eps, ys, v)
    if w_cat is None:
        w_cat = global_film_weights(model).detach()
    g = film_vjp(list(dys), hs, w_cat, global_cond.detach(), FilmLayout.from_tensors(hs))
    return eps.detach(), g
