"""The `triton` backend of `dpag_engine.ops`: fused Triton kernels for DP-AG's hot operations.

Same functions, signatures and semantics as `dpag_engine.ops.torch_ref` (the oracle):
  - sampler_step(sample, eps, coefs, step, noise, clip) -> (prev_sample, x0)   one fused DDIM/DDPM step
  - sampler_step_inpaint(sample, eps, coefs, step, noise, clip, prefix, prefix_noise, prefix_weight,
                         inpaint_coefs, start) -> (prev_sample, x0)   the step fused with the RTC inpaint
  - q_sample(x0, noise, t, sqrt_ac, sqrt_1m_ac) -> x_t                         differentiable in x0, noise
  - em_step(z, g, log_var, gamma, dt, eta, normalize, xi) -> z                 differentiable in z, log_var
plus the batched FiLM vector-Jacobian product used for the action-guided force:
  - film_vjp(dys, hs, w_cat, cond) -> d cond                                   (FilmLayout, film_weight_cat)
  - unet_film_vjp(model, sample, k, global_cond) -> (eps, g)   g = grad of 0.5||eps||^2 w.r.t. global_cond

On a machine without a GPU, set TRITON_INTERPRET=1 before importing triton (tests do, in conftest).
"""
from .film import FilmLayout, film_sum_over_time, film_vjp, film_weight_cat
from .latent import em_step
from .sampler import q_sample, sampler_step, sampler_step_inpaint
from .unet_vjp import global_film_weights, unet_film_vjp


def unet_force(unet, sample, t, global_cond):
    """The dispatcher's force op: the U-Net VJP with the fused FiLM backward (see unet_vjp)."""
    return unet_film_vjp(unet, sample, t, global_cond)[1]

__all__ = ["sampler_step", "sampler_step_inpaint", "q_sample", "em_step", "film_vjp", "film_sum_over_time",
           "film_weight_cat", "FilmLayout", "unet_film_vjp", "global_film_weights", "unet_force"]
