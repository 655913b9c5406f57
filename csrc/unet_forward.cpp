// The U-Net forward of PolicyEngine::Impl (unet_impl.h): every conv as one weight-streaming
// product (cpu_kernels.h) over an im2col, or at batch 1 for stride-1 convs straight over the
// (zero-padded) input rows; split by whole weight panels over the worker pool when the layer is big
// enough, with GroupNorm+Mish done by each thread on the groups it computed; FiLM as the
// precomputed time half plus the per-plan observation half; the skip concatenations of the up
// path. A recording forward (guided mode) also fills the tapes.
#include <algorithm>
#include <numeric>

#include "unet_impl.h"

namespace dpag {
namespace {

// Below this many multiply-adds a layer runs on the calling thread: waking the pool costs more.
// Measured: at 1 << 15 the tiny recipe's guided plan took 7.3 ms on 2 threads vs 4.6 ms on one (its
// backward is many small layers); at 1 << 18 it takes 4.6 ms on 2, and the big recipes' layers
// (millions of MACs each) are unaffected.
constexpr std::size_t kParallelMinMacs = 1 << 18;

struct DenseJob {
    cpu::DenseArgs a;
    int rows;
    int unit = cpu::kPanel;  // slices are multiples of this many rows (whole panels, whole groups)
    // Optional GroupNorm+Mish epilogue over the slice's groups.
    const unet::Norm* norm = nullptr;
    unet::NormTape* tape = nullptr;
    int batch = 1, T = 1, groups = 1;
};

void dense_job(void* ctx, int tid, int n_threads) {
    const auto& job = *static_cast<const DenseJob*>(ctx);
    // Contiguous slices of near-equal size: each thread streams its own part of the weight matrix
    // (the kernel's panels of 16 rows, and GroupNorm's groups, never straddle two threads).
    const int units = (job.rows + job.unit - 1) / job.unit;
    const int u0 = static_cast<int>(static_cast<long long>(units) * tid / n_threads);
    const int u1 = static_cast<int>(static_cast<long long>(units) * (tid + 1) / n_threads);
    const int r0 = u0 * job.unit, r1 = std::min(job.rows, u1 * job.unit);
    if (r0 >= r1) return;
    cpu::dense_rows(job.a, r0, r1);
    if (job.norm) {
        const int cpg = job.rows / job.groups;
        unet::group_norm_mish(job.a.out, job.batch, job.rows, job.T, job.groups, *job.norm, job.tape, r0 / cpg,
                              r1 == job.rows ? job.groups : r1 / cpg);
    }
}

}  // namespace

void PolicyEngine::Impl::dense(const Dense& d, const float* col, int n_cols, float* out, int T, std::size_t bstride,
                               int taps, std::size_t x_stride, const unet::Norm* norm, unet::NormTape* tape) {
    DenseJob job;
    job.a = d.args();
    job.a.x = col;
    job.a.n_cols = n_cols;
    job.a.taps = taps;
    job.a.x_stride = x_stride;
    job.a.out = out;
    job.a.T = T;
    job.a.out_bstride = bstride;
    job.rows = d.rows;
    if (norm) {
        job.norm = norm;
        job.tape = tape;
        job.batch = n_cols / T;
        job.T = T;
        job.groups = cfg.n_groups;
        job.unit = std::lcm(cpu::kPanel, d.rows / cfg.n_groups);
    }
    if (pool.size() == 1 || d.rows <= job.unit ||
        static_cast<std::size_t>(d.rows) * d.k * n_cols < kParallelMinMacs) {
        dense_job(&job, 0, 1);
    } else {
        pool.run(&dense_job, &job);
    }
}

int PolicyEngine::Impl::run_conv(const Conv& c, const Src& s, int batch, int t_in, float* out, const unet::Norm* norm,
                                 unet::NormTape* tape) {
    const int t_out = c.t_out(t_in);
    const std::size_t bstride = static_cast<std::size_t>(c.c_out) * t_out;
    if (batch == 1 && !c.transposed && c.stride == 1 && s.ts == 1) {
        // Batch 1, stride 1, contiguous input rows: the kernel reads the rows themselves (k taps
        // each), zero-padded into col when the conv pads; no im2col.
        if (c.pad == 0) {
            dense(c.d, s.ptr, t_out, out, t_out, bstride, c.ksize, s.cs, norm, tape);
        } else {
            // One memset for all the margins, then the rows: per-row zeroing of two floats at each
            // end compiled to two memset calls per channel (a tenth of a small plan, serial).
            const int len = t_in + 2 * c.pad;
            std::fill_n(col.data(), static_cast<std::size_t>(c.c_in) * len, 0.0f);
            for (int ci = 0; ci < c.c_in; ++ci) {
                float* row = col.data() + static_cast<std::size_t>(ci) * len + c.pad;
                const float* src = s.ptr + static_cast<std::size_t>(ci) * s.cs;
                for (int t = 0; t < t_in; ++t) row[t] = src[t];
            }
            dense(c.d, col.data(), t_out, out, t_out, bstride, c.ksize, static_cast<std::size_t>(len), norm, tape);
        }
        return t_out;
    }
    unet::im2col(c, s, batch, t_in, col.data());
    dense(c.d, col.data(), batch * t_out, out, t_out, bstride, 1, 0, norm, tape);
    return t_out;
}

void PolicyEngine::Impl::run_conv_block(ConvBlock& b, const Src& s, int batch, int T, float* out) {
    run_conv(b.conv, s, batch, T, out, &b.norm, recording ? &b.tape : nullptr);
}

void PolicyEngine::Impl::run_res_block(ResBlock& rb, const Src& in, int batch, int T, int step, float* out) {
    const int C = rb.c_out;
    run_conv_block(rb.b0, in, batch, T, h.data());
    if (recording) std::copy_n(h.data(), static_cast<std::size_t>(batch) * C * T, rb.y0.data());
    // FiLM: (scale, bias) = time half of step `step` + observation half of sample b.
    const float* ft = rb.film_t.data() + static_cast<std::size_t>(step) * 2 * C;
    for (int b = 0; b < batch; ++b) {
        const float* fg = rb.film_g_out.data() + static_cast<std::size_t>(b) * 2 * C;
        for (int c = 0; c < C; ++c) {
            const float scale = ft[c] + fg[c], bias = ft[C + c] + fg[C + c];
            float* row = h.data() + (static_cast<std::size_t>(b) * C + c) * T;
            for (int t = 0; t < T; ++t) row[t] = scale * row[t] + bias;
        }
    }
    run_conv_block(rb.b1, Src{h.data(), static_cast<std::size_t>(C) * T, T, 1}, batch, T, out);
    const std::size_t n = static_cast<std::size_t>(C) * T;
    if (rb.has_res) {
        run_conv(rb.res, in, batch, T, r.data());
        for (std::size_t i = 0; i < batch * n; ++i) out[i] += r[i];
    } else {  // identity residual, read through the input's strides
        for (int b = 0; b < batch; ++b)
            for (int c = 0; c < C; ++c)
                for (int t = 0; t < T; ++t)
                    out[b * n + static_cast<std::size_t>(c) * T + t] +=
                        in.ptr[b * in.bstride + static_cast<std::size_t>(c) * in.cs + static_cast<std::size_t>(t) * in.ts];
    }
}

void PolicyEngine::Impl::set_global_cond(const float* g, int batch) {
    // gcol is the kernel's (G, B) X: the transpose of Mish(g).
    for (int b = 0; b < batch; ++b)
        for (int i = 0; i < G; ++i) gcol[static_cast<std::size_t>(i) * batch + b] = g[static_cast<std::size_t>(b) * G + i];
    cpu::mish_inplace(gcol.data(), static_cast<std::size_t>(batch) * G);
    auto all = [&](std::vector<ResBlock>& v) {
        for (auto& rb : v) dense(rb.film_g, gcol.data(), batch, rb.film_g_out.data(), 1, 2 * rb.c_out);
    };
    all(down_res);
    all(mid_res);
    all(up_res);
}

void PolicyEngine::Impl::forward(const float* sample, int batch, int step, float* eps_out) {
    Src in{sample, static_cast<std::size_t>(H) * Da, 1, Da};
    int T = H;
    float* cur = act_x.data();
    for (int l = 0; l < levels; ++l) {
        ResBlock& r1 = down_res[2 * l];
        ResBlock& r2 = down_res[2 * l + 1];
        run_res_block(r1, in, batch, T, step, act_a.data());
        float* skip = skips[l].data();
        run_res_block(r2, Src{act_a.data(), static_cast<std::size_t>(r1.c_out) * T, T, 1}, batch, T, step, skip);
        if (l < levels - 1) {
            const int t2 = run_conv(down_sample[l], Src{skip, static_cast<std::size_t>(r2.c_out) * T, T, 1},
                                    batch, T, cur);
            T = t2;
            in = Src{cur, static_cast<std::size_t>(r2.c_out) * T, T, 1};
        } else {
            in = Src{skip, static_cast<std::size_t>(r2.c_out) * T, T, 1};
        }
    }
    for (int i = 0; i < 2; ++i) {
        float* out = i == 0 ? act_a.data() : act_b.data();
        run_res_block(mid_res[i], in, batch, T, step, out);
        in = Src{out, static_cast<std::size_t>(mid_res[i].c_out) * T, T, 1};
    }
    for (int u = 0; u < levels - 1; ++u) {
        // cat([x, skip]) along channels, per sample.
        const int l = levels - 1 - u;
        const int cx = down_res[2 * l + 1].c_out, cs = cx;  // mid / up output width == skip width
        const std::size_t nx = static_cast<std::size_t>(cx) * T, ns = static_cast<std::size_t>(cs) * T;
        float* cat = act_x.data();
        for (int b = 0; b < batch; ++b) {
            for (std::size_t i = 0; i < nx; ++i) cat[b * (nx + ns) + i] = in.ptr[b * in.bstride + i];
            std::copy_n(skips[l].data() + b * ns, ns, cat + b * (nx + ns) + nx);
        }
        ResBlock& r1 = up_res[2 * u];
        ResBlock& r2 = up_res[2 * u + 1];
        run_res_block(r1, Src{cat, nx + ns, T, 1}, batch, T, step, act_a.data());
        run_res_block(r2, Src{act_a.data(), static_cast<std::size_t>(r1.c_out) * T, T, 1}, batch, T, step, act_b.data());
        T = run_conv(up_sample[u], Src{act_b.data(), static_cast<std::size_t>(r2.c_out) * T, T, 1}, batch, T, act_a.data());
        in = Src{act_a.data(), static_cast<std::size_t>(r2.c_out) * T, T, 1};
    }
    const int c0 = cfg.down_dims[0];
    run_conv_block(final_block, in, batch, T, act_b.data());
    run_conv(final_out, Src{act_b.data(), static_cast<std::size_t>(c0) * T, T, 1}, batch, T, eps_cf.data());
    for (int b = 0; b < batch; ++b)  // (B, Da, H) -> (B, H, Da)
        for (int c = 0; c < Da; ++c)
            for (int t = 0; t < H; ++t)
                eps_out[(static_cast<std::size_t>(b) * H + t) * Da + c] = eps_cf[(static_cast<std::size_t>(b) * Da + c) * H + t];
}

}  // namespace dpag
