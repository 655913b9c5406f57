// The activation-only U-Net backward of PolicyEngine::Impl (unet_impl.h), guided mode: after a
// recording forward, d(0.5 ||eps||^2) / d(global cond). It runs the body in reverse (every conv as
// the product with its transposed weight copy, then col2im; GroupNorm+Mish adjoints from the tape)
// down to the first FiLM site, collecting d(scale, bias) at every site, then maps those back
// through the FiLM Linears' condition halves and the Mish in front of them.
#include <algorithm>
#include <utility>

#include "unet_impl.h"

namespace dpag {

void PolicyEngine::Impl::conv_backward(const Conv& c, const float* dout, int batch, int t_in, float* din, bool accumulate) {
    const int t_out = c.t_out(t_in);
    const std::size_t n_cols = static_cast<std::size_t>(batch) * t_out;
    // The product's X is d(out) as (C_out, B*T_out): at batch 1 that is dout itself (channels-first).
    const float* x = dout;
    if (batch > 1) {
        for (int co = 0; co < c.c_out; ++co)
            for (int b = 0; b < batch; ++b)
                std::copy_n(dout + (static_cast<std::size_t>(b) * c.c_out + co) * t_out, t_out,
                            col.data() + co * n_cols + static_cast<std::size_t>(b) * t_out);
        x = col.data();
    }
    dense(c.dt, x, static_cast<int>(n_cols), dcol.data(), 1, c.dt.rows);
    if (!accumulate) std::fill_n(din, static_cast<std::size_t>(batch) * c.c_in * t_in, 0.0f);
    unet::col2im_add(c, dcol.data(), batch, t_in, din);
}

void PolicyEngine::Impl::conv_block_backward(const ConvBlock& b, const float* dout, int batch, int T, float* din) {
    unet::group_norm_mish_backward(dout, batch, b.conv.c_out, T, cfg.n_groups, b.norm, b.tape, grad_y.data());
    conv_backward(b.conv, grad_y.data(), batch, T, din, false);
}

void PolicyEngine::Impl::res_block_backward(ResBlock& rb, const float* dout, int batch, int T, int step, float* din) {
    const int C = rb.c_out;
    float* dh = grad_h.data();
    conv_block_backward(rb.b1, dout, batch, T, dh);
    const float* ft = rb.film_t.data() + static_cast<std::size_t>(step) * 2 * C;
    for (int b = 0; b < batch; ++b) {
        const float* fg = rb.film_g_out.data() + static_cast<std::size_t>(b) * 2 * C;
        float* df = rb.dfilm.data() + static_cast<std::size_t>(b) * 2 * C;
        for (int c = 0; c < C; ++c) {
            const std::size_t off = (static_cast<std::size_t>(b) * C + c) * T;
            const float scale = ft[c] + fg[c];
            float d_scale = 0.0f, d_bias = 0.0f;
            for (int t = 0; t < T; ++t) {
                d_scale += dh[off + t] * rb.y0[off + t];
                d_bias += dh[off + t];
                dh[off + t] *= scale;  // now d(first block output)
            }
            df[c] = d_scale;
            df[C + c] = d_bias;
        }
    }
    if (!din) return;
    conv_block_backward(rb.b0, dh, batch, T, din);
    const std::size_t n = static_cast<std::size_t>(batch) * C * T;
    if (rb.has_res) {
        conv_backward(rb.res, dout, batch, T, din, true);
    } else {
        for (std::size_t i = 0; i < n; ++i) din[i] += dout[i];
    }
}

void PolicyEngine::Impl::backward(const float* eps_in, int batch, int step) {
    float *ga = grad_a.data(), *gb = grad_b.data(), *gc = grad_c.data();
    for (int b = 0; b < batch; ++b)  // (B, H, Da) -> channels-first (B, Da, H)
        for (int t = 0; t < H; ++t)
            for (int c = 0; c < Da; ++c)
                ga[(static_cast<std::size_t>(b) * Da + c) * H + t] = eps_in[(static_cast<std::size_t>(b) * H + t) * Da + c];
    conv_backward(final_out, ga, batch, H, gb, false);
    conv_block_backward(final_block, gb, batch, H, ga);
    std::swap(ga, gb);  // gb: d(input of the final block)
    for (int l = 0; l < levels; ++l) std::fill(dskips[l].begin(), dskips[l].end(), 0.0f);
    for (int u = levels - 2; u >= 0; --u) {
        const int l = levels - 1 - u, T = H >> l, cx = cfg.down_dims[l];  // level l's width
        conv_backward(up_sample[u], gb, batch, T, ga, false);
        res_block_backward(up_res[2 * u + 1], ga, batch, T, step, gb);
        res_block_backward(up_res[2 * u], gb, batch, T, step, gc);
        // gc = d cat([x, skip]): the x half flows on, the skip half waits for the down path.
        const std::size_t half = static_cast<std::size_t>(cx) * T;
        for (int b = 0; b < batch; ++b) {
            std::copy_n(gc + 2 * half * b, half, gb + half * b);
            float* ds = dskips[l].data() + half * b;
            for (std::size_t i = 0; i < half; ++i) ds[i] += gc[2 * half * b + half + i];
        }
    }
    const int t_mid = H >> (levels - 1);
    res_block_backward(mid_res[1], gb, batch, t_mid, step, ga);
    res_block_backward(mid_res[0], ga, batch, t_mid, step, gb);  // gb: d(last skip) via the mid blocks
    for (int l = levels - 1; l >= 0; --l) {
        const int T = H >> l;
        const std::size_t n = static_cast<std::size_t>(batch) * cfg.down_dims[l] * T;
        if (l == levels - 1) std::copy_n(gb, n, ga);
        else conv_backward(down_sample[l], gb, batch, T, ga, false);  // gb: d(next level's input)
        for (std::size_t i = 0; i < n; ++i) ga[i] += dskips[l][i];
        res_block_backward(down_res[2 * l + 1], ga, batch, T, step, gc);
        res_block_backward(down_res[2 * l], gc, batch, T, step, l == 0 ? nullptr : gb);
    }
}

void PolicyEngine::Impl::force_from_film(const float* z_in, int batch, float* out) {
    std::fill_n(out, static_cast<std::size_t>(batch) * G, 0.0f);
    auto site = [&](const ResBlock& rb) {
        const int two_c = 2 * rb.c_out;
        // W_g (2C, G) in the kernel's panels (cpu::panel_index): rows r0..r0+15 of column i are contiguous.
        const float* w = static_cast<const float*>(rb.film_g.weights());
        for (int b = 0; b < batch; ++b) {
            const float* d = rb.dfilm.data() + static_cast<std::size_t>(b) * two_c;
            float* o = out + static_cast<std::size_t>(b) * G;
            for (int r0 = 0; r0 < two_c; r0 += cpu::kPanel) {
                const int nr = std::min(cpu::kPanel, two_c - r0);
                for (int i = 0; i < G; ++i) {
                    const float* wr = w + cpu::panel_index(r0, i, G);
                    float s = 0.0f;
                    for (int j = 0; j < nr; ++j) s += d[r0 + j] * wr[j];
                    o[i] += s;
                }
            }
        }
    };
    for (const auto& rb : down_res) site(rb);
    for (const auto& rb : mid_res) site(rb);
    for (const auto& rb : up_res) site(rb);
    cpu::mish_backward(z_in, out, out, static_cast<std::size_t>(batch) * G);
}

}  // namespace dpag
