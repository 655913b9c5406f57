// PolicyEngine::Impl's construction (unet_impl.h): checks every tensor of the ConditionalUnet1D
// state_dict against the config's shapes, repacks the conv weights for the dense kernel (and, in
// guided mode, their transposed copies) into one huge-page arena, precomputes the FiLM time halves
// of every sampler step (with the whole timestep MLP), and sizes every buffer for max_batch.
#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "unet_impl.h"

namespace dpag {
namespace {

std::string shape_str(const std::vector<std::int64_t>& s) {
    std::string r = "(";
    for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
    return r + (s.size() == 1 ? ",)" : ")");
}

}  // namespace

PolicyEngine::Impl::Impl(const PolicyEngineConfig& c, const WeightMap& w)
    : cfg(c), pool(c.threads) {
    K = static_cast<int>(cfg.timesteps.size());
    G = cfg.n_obs_steps * cfg.cond_dim;
    H = cfg.horizon;
    Da = cfg.action_dim;
    levels = static_cast<int>(cfg.down_dims.size());
    const std::vector<float> temb = timestep_features(w);
    const auto& dd = cfg.down_dims;

    std::vector<int> widths{Da};
    widths.insert(widths.end(), dd.begin(), dd.end());
    int T = H;
    for (int l = 0; l < levels; ++l) {
        const std::string p = "down_modules." + std::to_string(l);
        down_res.push_back(res_block(w, p + ".0", widths[l], widths[l + 1], T, temb));
        down_res.push_back(res_block(w, p + ".1", widths[l + 1], widths[l + 1], T, temb));
        max_act = std::max(max_act, static_cast<std::size_t>(2) * widths[l + 1] * T);  // 2x: the up path's concat
        if (l < levels - 1) {
            down_sample.push_back(conv(w, p + ".2", widths[l + 1], widths[l + 1], 3, 2, 1, false, T));
            T = down_sample.back().t_out(T);
        }
    }
    for (int i = 0; i < 2; ++i) mid_res.push_back(res_block(w, "mid_modules." + std::to_string(i), dd.back(), dd.back(), T, temb));
    for (int u = 0; u < levels - 1; ++u) {
        // reversed(levels[1:]): (c_in, c_out) = (widths[l], widths[l+1]) for l = levels-1 .. 1
        const int l = levels - 1 - u, c_in = widths[l], c_out = widths[l + 1];
        const std::string p = "up_modules." + std::to_string(u);
        up_res.push_back(res_block(w, p + ".0", 2 * c_out, c_in, T, temb));
        up_res.push_back(res_block(w, p + ".1", c_in, c_in, T, temb));
        up_sample.push_back(conv(w, p + ".2", c_in, c_in, 4, 2, 1, true, T));
        T = up_sample.back().t_out(T);
    }
    final_block = conv_block(w, "final_conv.0", dd[0], dd[0], T);
    final_out = conv(w, "final_conv.1", dd[0], Da, 1, 1, 0, false, T);
    if (T != H) throw std::invalid_argument("horizon: the U-Net does not map H=" + std::to_string(H) + " back to itself");
    max_act = std::max(max_act, static_cast<std::size_t>(H) * Da);

    // Every conv's weights, in the order a forward reads them, then (guided mode) the transposed
    // copies, into one huge-page arena.
    std::vector<Dense*> order;
    for (Conv* c : all_convs()) order.push_back(&c->d);
    if (cfg.guided)
        for (Conv* c : all_convs()) order.push_back(&c->dt);
    arena.build(order);

    const std::size_t B = cfg.max_batch;
    col.assign(B * max_col, 0.0f);
    for (auto* v : {&act_a, &act_b, &act_x, &h, &r}) v->assign(B * max_act, 0.0f);
    for (int l = 0; l < levels; ++l) skips.emplace_back(B * static_cast<std::size_t>(dd[l]) * (H >> l), 0.0f);
    gcol.assign(B * G, 0.0f);
    const std::size_t n = B * static_cast<std::size_t>(H) * Da;
    for (auto* v : {&eps_cf, &eps, &x, &prev, &x0}) v->assign(n, 0.0f);
    if (cfg.guided) {
        dcol.assign(B * max_col, 0.0f);
        for (auto* v : {&grad_a, &grad_b, &grad_c, &grad_h, &grad_y}) v->assign(B * max_act, 0.0f);
        for (const auto& sk : skips) dskips.emplace_back(sk.size(), 0.0f);
        for (auto* v : {&z, &force}) v->assign(B * G, 0.0f);
    }
}

const float* PolicyEngine::Impl::get(const WeightMap& w, const std::string& name,
                                      std::vector<std::int64_t> shape) {
    auto it = w.find(name);
    if (it == w.end()) throw std::invalid_argument("weights: missing " + name);
    if (it->second.shape != shape) {
        throw std::invalid_argument("weights: " + name + " has shape " + shape_str(it->second.shape) +
                                    ", expected " + shape_str(shape));
    }
    std::size_t n = 1;
    for (auto s : shape) n *= static_cast<std::size_t>(s);
    n_params += n;
    return it->second.data;
}

PolicyEngine::Impl::Conv PolicyEngine::Impl::conv(const WeightMap& w, const std::string& p, int c_in, int c_out,
                                                  int k, int stride, int pad, bool transposed, int t_in) {
    const std::vector<std::int64_t> shape = transposed ? std::vector<std::int64_t>{c_in, c_out, k}
                                                       : std::vector<std::int64_t>{c_out, c_in, k};
    Conv c = unet::make_conv(get(w, p + ".weight", shape), get(w, p + ".bias", {c_out}), c_in, c_out, k,
                             stride, pad, transposed, cfg.weights, cfg.guided);
    // Per output column: im2col's C_in * k; the backward's d(output) (C_out, batch > 1) in col and
    // d(col) (C_in * k) in dcol.
    max_col = std::max(max_col, static_cast<std::size_t>(c.t_out(t_in)) * std::max(c.d.k, c.dt.k));
    return c;
}

PolicyEngine::Impl::ConvBlock PolicyEngine::Impl::conv_block(const WeightMap& w, const std::string& p, int c_in,
                                                            int c_out, int t_in) {
    ConvBlock b;
    const int k = cfg.kernel_size;
    b.conv = conv(w, p + ".0", c_in, c_out, k, 1, k / 2, false, t_in);
    const float* g = get(w, p + ".1.weight", {c_out});
    const float* be = get(w, p + ".1.bias", {c_out});
    b.norm.gamma.assign(g, g + c_out);
    b.norm.beta.assign(be, be + c_out);
    if (cfg.guided) {
        const std::size_t B = cfg.max_batch;
        b.tape.pre.assign(B * c_out * t_in, 0.0f);
        b.tape.mean.assign(B * cfg.n_groups, 0.0f);
        b.tape.rstd.assign(B * cfg.n_groups, 0.0f);
    }
    return b;
}

PolicyEngine::Impl::ResBlock PolicyEngine::Impl::res_block(const WeightMap& w, const std::string& p, int c_in,
                                                          int c_out, int t, const std::vector<float>& mish_temb) {
    ResBlock rb;
    rb.c_in = c_in;
    rb.c_out = c_out;
    rb.b0 = conv_block(w, p + ".blocks.0", c_in, c_out, t);
    rb.b1 = conv_block(w, p + ".blocks.1", c_out, c_out, t);
    rb.has_res = c_in != c_out;
    if (rb.has_res) rb.res = conv(w, p + ".residual_conv", c_in, c_out, 1, 1, 0, false, t);
    const int dsed = cfg.diffusion_step_embed_dim, cond = dsed + G, two_c = 2 * c_out;
    const float* fw = get(w, p + ".cond_encoder.1.weight", {two_c, cond});
    const float* fb = get(w, p + ".cond_encoder.1.bias", {two_c});
    // The time half, evaluated now for every sampler step (always fp32: it is read once).
    Dense wt;
    wt.pack(two_c, dsed, cpu::WeightType::kF32, [&](int r, int i) { return fw[static_cast<std::size_t>(r) * cond + i]; });
    wt.bias.assign(fb, fb + two_c);
    rb.film_t = linear(wt, mish_temb, K);
    // Read once per plan, so kept fp32 whatever the conv weights are.
    rb.film_g.pack(two_c, G, cpu::WeightType::kF32, [&](int r, int i) { return fw[static_cast<std::size_t>(r) * cond + dsed + i]; });
    rb.film_g_out.assign(static_cast<std::size_t>(cfg.max_batch) * two_c, 0.0f);
    if (cfg.guided) {
        rb.y0.assign(static_cast<std::size_t>(cfg.max_batch) * c_out * t, 0.0f);
        rb.dfilm.assign(static_cast<std::size_t>(cfg.max_batch) * two_c, 0.0f);
    }
    return rb;
}

std::vector<float> PolicyEngine::Impl::linear(const Dense& d, const std::vector<float>& in, int n) {
    // The kernel's X is (k, n): the transpose of `in`.
    std::vector<float> xt(static_cast<std::size_t>(n) * d.k), out(static_cast<std::size_t>(n) * d.rows);
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < d.k; ++i) xt[static_cast<std::size_t>(i) * n + j] = in[static_cast<std::size_t>(j) * d.k + i];
    cpu::DenseArgs a = d.args();
    a.x = xt.data();
    a.n_cols = n;
    a.out = out.data();
    a.T = 1;
    a.out_bstride = d.rows;
    cpu::dense_rows(a, 0, d.rows);
    return out;
}

std::vector<float> PolicyEngine::Impl::timestep_features(const WeightMap& w) {
    const int d = cfg.diffusion_step_embed_dim, half = d / 2;
    std::vector<float> emb(static_cast<std::size_t>(K) * d);
    for (int s = 0; s < K; ++s) {
        const float t = static_cast<float>(cfg.timesteps[s]);
        for (int i = 0; i < half; ++i) {
            // As SinusoidalPosEmb: frequencies in float64, rounded to float32, then float32 math.
            const float f = static_cast<float>(std::exp(i * -(std::log(10000.0) / (half - 1))));
            const float arg = t * f;
            emb[static_cast<std::size_t>(s) * d + i] = std::sin(arg);
            emb[static_cast<std::size_t>(s) * d + half + i] = std::cos(arg);
        }
    }
    auto load = [&](const std::string& p, int out, int in) {
        Dense l;
        const float* lw = get(w, p + ".weight", {out, in});
        l.pack(out, in, cpu::WeightType::kF32, [&](int r, int i) { return lw[static_cast<std::size_t>(r) * in + i]; });
        const float* lb = get(w, p + ".bias", {out});
        l.bias.assign(lb, lb + out);
        return l;
    };
    const Dense l1 = load("diffusion_step_encoder.1", 4 * d, d);
    const Dense l3 = load("diffusion_step_encoder.3", d, 4 * d);
    std::vector<float> hid = linear(l1, emb, K);
    cpu::mish_inplace(hid.data(), hid.size());
    std::vector<float> out = linear(l3, hid, K);
    cpu::mish_inplace(out.data(), out.size());  // cond_encoder starts with Mish
    return out;
}

std::vector<PolicyEngine::Impl::Conv*> PolicyEngine::Impl::all_convs() {
    std::vector<Conv*> out;
    auto res = [&](ResBlock& rb) {
        out.push_back(&rb.b0.conv);
        out.push_back(&rb.b1.conv);
        if (rb.has_res) out.push_back(&rb.res);
    };
    for (int l = 0; l < levels; ++l) {
        res(down_res[2 * l]);
        res(down_res[2 * l + 1]);
        if (l < levels - 1) out.push_back(&down_sample[l]);
    }
    for (auto& rb : mid_res) res(rb);
    for (int u = 0; u < levels - 1; ++u) {
        res(up_res[2 * u]);
        res(up_res[2 * u + 1]);
        out.push_back(&up_sample[u]);
    }
    out.push_back(&final_block.conv);
    out.push_back(&final_out);
    return out;
}

}  // namespace dpag
