// The public PolicyEngine (unet_runtime.h): the config's validation, construction, the argument
// checks of every entry point, and plan(), the K-step sampler loop (the guided latent update before
// each step, the U-Net forward, the DDIM/DDPM step, and real-time-chunking inpainting after it).
#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "unet_impl.h"

namespace dpag {
namespace {

void validate(const PolicyEngineConfig& c) {
    auto need = [](bool ok, const std::string& msg) {
        if (!ok) throw std::invalid_argument(msg);
    };
    need(c.action_dim >= 1 && c.cond_dim >= 1 && c.n_obs_steps >= 1, "action_dim, cond_dim, n_obs_steps: must be >= 1");
    need(!c.down_dims.empty(), "down_dims: needs at least one level");
    for (int d : c.down_dims) need(d > 0 && c.n_groups > 0 && d % c.n_groups == 0, "down_dims: every width must be a multiple of n_groups");
    need(c.kernel_size % 2 == 1, "kernel_size: must be odd");
    need(c.diffusion_step_embed_dim >= 4 && c.diffusion_step_embed_dim % 2 == 0, "diffusion_step_embed_dim: must be even and >= 4");
    need(c.horizon >= 1 && c.horizon % (1 << (c.down_dims.size() - 1)) == 0, "horizon: must be a multiple of 2**(levels-1)");
    need(!c.timesteps.empty() && c.coefs.size() == c.timesteps.size(), "coefs: need one row per timestep (K >= 1)");
    need(c.max_batch >= 1, "max_batch: must be >= 1");
    need(c.threads >= 1 && c.threads <= 64, "threads: must be in [1, 64]");
    if (c.guided) {
        need(c.latent_steps >= 1 && c.latent_dt > 0.0f && c.latent_eta >= 0.0f,
             "latent: needs steps >= 1, dt > 0, eta >= 0");
    }
}

// Throws unless every one of the n values is finite.
void require_finite(const float* p, std::size_t n, const char* what) {
    for (std::size_t i = 0; i < n; ++i)
        if (!std::isfinite(p[i])) throw std::invalid_argument(std::string(what) + ": contains NaN or inf");
}

void check_batch(int batch, int max_batch) {
    if (batch < 1 || batch > max_batch)
        throw std::invalid_argument("batch: must be in [1, max_batch=" + std::to_string(max_batch) + "], got " + std::to_string(batch));
}

}  // namespace

PolicyEngine::PolicyEngine(const PolicyEngineConfig& cfg, const WeightMap& weights) : cfg_(cfg) {
    validate(cfg_);
    impl_ = std::make_unique<Impl>(cfg_, weights);
}

PolicyEngine::~PolicyEngine() = default;

std::size_t PolicyEngine::num_params() const { return impl_->n_params; }

std::size_t PolicyEngine::weight_bytes_per_step() const {
    std::size_t n = 0;
    for (const unet::Conv* c : impl_->all_convs()) n += c->d.bytes();
    return n;
}

void PolicyEngine::unet_forward(const float* sample, int batch, int step, const float* global_cond, float* eps) {
    check_batch(batch, cfg_.max_batch);
    if (step < 0 || step >= num_steps())
        throw std::invalid_argument("step: must be in [0, K=" + std::to_string(num_steps()) + "), got " + std::to_string(step));
    std::lock_guard<std::mutex> lock(impl_->busy);
    impl_->set_global_cond(global_cond, batch);
    impl_->forward(sample, batch, step, eps);
}

void PolicyEngine::unet_force(const float* sample, int batch, int step, const float* global_cond, float* force) {
    check_batch(batch, cfg_.max_batch);
    if (step < 0 || step >= num_steps())
        throw std::invalid_argument("step: must be in [0, K=" + std::to_string(num_steps()) + "), got " + std::to_string(step));
    if (!cfg_.guided) throw std::invalid_argument("unet_force: the engine was built without guided mode (config guided=False)");
    std::lock_guard<std::mutex> lock(impl_->busy);
    impl_->compute_force(sample, batch, step, global_cond, force);
}

void PolicyEngine::plan(const PlanArgs& a) {
    Impl& m = *impl_;
    const int batch = a.batch, G = m.G;
    check_batch(batch, cfg_.max_batch);
    if (!a.mu || !a.x_init || !a.x_out) throw std::invalid_argument("plan: mu, x_init and x_out are required");
    if (cfg_.stochastic && !a.step_noise)
        throw std::invalid_argument("step_noise: this sampler is stochastic (DDPM or eta > 0) and needs (K, B, H, Da) noise");
    const std::size_t n_cond = static_cast<std::size_t>(batch) * G;
    require_finite(a.mu, n_cond, "mu");
    if (a.guided) {
        if (!cfg_.guided) throw std::invalid_argument("guided: the engine was built without guided mode (config guided=False)");
        if (!a.log_var) throw std::invalid_argument("guided: needs log_var with mu");
        require_finite(a.log_var, n_cond, "log_var");
        if (cfg_.latent_eta > 0.0f && !a.latent_noise)
            throw std::invalid_argument("latent_noise: latent eta > 0 needs (K, S, B, To, Do) Brownian draws");
    }
    const std::size_t n = static_cast<std::size_t>(batch) * m.H * m.Da;
    const InpaintArgs* inp = a.inpaint.width > 0 ? &a.inpaint : nullptr;
    const std::size_t n_pre = inp ? static_cast<std::size_t>(batch) * inp->width * m.Da : 0;  // B*W*Da
    if (inp) {
        if (inp->start < 0 || inp->start + inp->width > m.H)
            throw std::invalid_argument("prefix: rows [" + std::to_string(inp->start) + ", " +
                                        std::to_string(inp->start + inp->width) + ") outside the horizon " + std::to_string(m.H));
        if (!inp->prefix || !inp->weights || !inp->noise)
            throw std::invalid_argument("prefix: needs prefix, weights and per-step noise");
        if (cfg_.inpaint_coefs.size() != static_cast<std::size_t>(num_steps()))
            throw std::invalid_argument("prefix: the engine config has no inpaint_coefs (one row per step)");
        require_finite(inp->prefix, n_pre, "prefix");
        for (int j = 0; j < inp->width; ++j)
            if (!(inp->weights[j] >= 0.0f && inp->weights[j] <= 1.0f))
                throw std::invalid_argument("prefix_weight: weights must be finite and in [0, 1]");
    }

    std::lock_guard<std::mutex> lock(m.busy);
    const float* mu = a.mu;
    const float* log_var = a.log_var;
    if (!a.guided) m.set_global_cond(mu, batch);

    const int S = cfg_.latent_steps;
    std::copy_n(a.x_init, n, m.x.data());
    for (int k = 0; k < num_steps(); ++k) {
        if (a.guided) {
            // The latent update at the current sample, always from mu (docs/method.md §7, "guided").
            std::copy_n(mu, n_cond, m.z.data());
            for (int s = 0; s < S; ++s) {
                m.compute_force(m.x.data(), batch, k, m.z.data(), m.force.data());
                const float* xi = a.latent_noise ? a.latent_noise + (static_cast<std::size_t>(k) * S + s) * n_cond : nullptr;
                m.latent_step(m.z.data(), m.force.data(), log_var, cfg_.latent_eta > 0.0f ? xi : nullptr, batch);
            }
            m.set_global_cond(m.z.data(), batch);
        }
        m.forward(m.x.data(), batch, k, m.eps.data());
        const float* noise = cfg_.stochastic ? a.step_noise + k * n : nullptr;
        sampler_step(m.x.data(), m.eps.data(), noise, n, cfg_.coefs[k], cfg_.clip, m.prev.data(), m.x0.data());
        std::swap(m.x, m.prev);
        if (inp) {
            // Real-time chunking: the committed rows, forward-noised to the level this step landed on
            // (clean after the last step), blended in place: x = w * target + (1 - w) * x.
            const float sa = cfg_.inpaint_coefs[k][0], s1ma = cfg_.inpaint_coefs[k][1];
            const float* pn = inp->noise + k * n_pre;
            for (int b = 0; b < batch; ++b)
                for (int j = 0; j < inp->width; ++j) {
                    const float w = inp->weights[j];
                    const std::size_t pj = (static_cast<std::size_t>(b) * inp->width + j) * m.Da;
                    float* xr = m.x.data() + (static_cast<std::size_t>(b) * m.H + inp->start + j) * m.Da;
                    for (int d = 0; d < m.Da; ++d) {
                        const float target = sa * inp->prefix[pj + d] + s1ma * pn[pj + d];
                        xr[d] = w * target + (1.0f - w) * xr[d];
                    }
                }
        }
    }
    std::copy_n(m.x.data(), n, a.x_out);
}

}  // namespace dpag
