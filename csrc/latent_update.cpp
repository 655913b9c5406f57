// Guided mode's latent update (docs/method.md §5), members of PolicyEngine::Impl (unet_impl.h):
// the force g = (d eps / d z)^T eps at the latent z (a recording forward, then the activation-only
// backward of unet_backward.cpp), and one Euler-Maruyama step of z along it.
#include <cmath>

#include "unet_impl.h"

namespace dpag {

void PolicyEngine::Impl::compute_force(const float* sample, int batch, int step, const float* z_in, float* out) {
    set_global_cond(z_in, batch);
    recording = true;
    forward(sample, batch, step, eps.data());
    recording = false;
    backward(eps.data(), batch, step);
    force_from_film(z_in, batch, out);
}

void PolicyEngine::Impl::latent_step(float* zz, const float* g, const float* lv, const float* xi, int batch) {
    const int Do = cfg.cond_dim;
    const float drift = cfg.latent_gamma * cfg.latent_dt, diffusion = cfg.latent_eta * std::sqrt(cfg.latent_dt);
    for (int row = 0; row < batch * cfg.n_obs_steps; ++row) {
        const std::size_t o = static_cast<std::size_t>(row) * Do;
        float inv = 1.0f;
        if (cfg.latent_normalize) {
            double sq = 0.0;
            for (int d = 0; d < Do; ++d) sq += static_cast<double>(g[o + d]) * g[o + d];
            inv = 1.0f / (static_cast<float>(std::sqrt(sq)) + 1e-6f);
        }
        for (int d = 0; d < Do; ++d) {
            const float sigma = std::exp(0.5f * lv[o + d]);
            zz[o + d] += drift * sigma * (g[o + d] * inv);
            if (xi) zz[o + d] += diffusion * sigma * xi[o + d];
        }
    }
}

}  // namespace dpag
