// The U-Net engine's layer building blocks (declared in unet_layers.h): the weight arena, conv
// packing, im2col / col2im, GroupNorm+Mish forward and backward; and conv1d_forward
// (unet_runtime.h), one standalone conv through the same path, for layer tests.
#include "unet_layers.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "unet_runtime.h"

namespace dpag {
namespace unet {
namespace {

constexpr float kGroupNormEps = 1e-5f;  // torch.nn.GroupNorm default

// The input position that weight tap j meets at output position t, or -1 (padding / no tap).
int source_index(const Conv& c, int t, int j, int t_in) {
    int ti;
    if (!c.transposed) {
        ti = t * c.stride + j - c.pad;
    } else {
        // out[t] gathers in[ti] * w[j] for t = ti*stride - pad + j.
        const int num = t + c.pad - j;
        ti = (num >= 0 && num % c.stride == 0) ? num / c.stride : -1;
    }
    return ti < t_in ? ti : -1;
}

// Sums in double over 8 interleaved lanes: 8 independent dependency chains (a single running sum
// waits an add latency per element; the vectoriser may not reorder it), then the lanes in order.
constexpr int kLanes = 8;
template <typename F>
double lane_sum(std::size_t n, F term) {
    double acc[kLanes] = {};
    std::size_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (int j = 0; j < kLanes; ++j) acc[j] += term(i + j);
    for (int j = 0; i < n; ++i, ++j) acc[j] += term(i);
    double s = 0.0;
    for (double a : acc) s += a;
    return s;
}

}  // namespace

void WeightArena::build(const std::vector<Dense*>& layers) {
    constexpr std::size_t kAlign = 2u << 20;
    std::size_t total = 0;
    for (const Dense* d : layers) total += (d->bytes() + 63) / 64 * 64;
    total = (total + kAlign - 1) / kAlign * kAlign;
    if (total == 0) return;
    base_ = static_cast<char*>(std::aligned_alloc(kAlign, total));
    if (!base_) throw std::bad_alloc();
#ifdef __linux__
    madvise(base_, total, MADV_HUGEPAGE);  // a hint: without THP it is just slower
#endif
    std::size_t off = 0;
    for (Dense* d : layers) {
        const std::size_t n = d->bytes();
        std::memcpy(base_ + off, d->weights(), n);
        d->data = base_ + off;
        // The packed copies are no longer needed; keep only their sizes (bytes() still works).
        d->w32.clear();
        d->w32.shrink_to_fit();
        d->w16.clear();
        d->w16.shrink_to_fit();
        d->w8.clear();
        d->w8.shrink_to_fit();
        d->stored_bytes = n;
        off += (n + 63) / 64 * 64;
    }
}

WeightArena::~WeightArena() { std::free(base_); }

Conv make_conv(const float* w, const float* b, int c_in, int c_out, int k, int stride, int pad,
               bool transposed, cpu::WeightType wtype, bool backward) {
    Conv c;
    c.c_in = c_in;
    c.c_out = c_out;
    c.ksize = k;
    c.stride = stride;
    c.pad = pad;
    c.transposed = transposed;
    auto at = [&](int co, int i) {
        const int ci = i / k, j = i % k;
        // Conv1d weight (C_out, C_in, k); ConvTranspose1d weight (C_in, C_out, k).
        return transposed ? w[(static_cast<std::size_t>(ci) * c_out + co) * k + j]
                          : w[(static_cast<std::size_t>(co) * c_in + ci) * k + j];
    };
    c.d.pack(c_out, c_in * k, wtype, at);
    c.d.bias.assign(b, b + c_out);
    if (backward) c.dt.pack(c_in * k, c_out, wtype, [&](int i, int co) { return at(co, i); });
    return c;
}

void im2col(const Conv& c, const Src& s, int batch, int t_in, float* col) {
    const int t_out = c.t_out(t_in), k = c.ksize;
    const std::size_t n_cols = static_cast<std::size_t>(batch) * t_out;
    // Where tap j at output t reads, once per call (source_index divides); -1: zero.
    constexpr int kMaxTable = 1024;
    int table[kMaxTable];
    const bool tabled = k * t_out <= kMaxTable;
    if (tabled)
        for (int j = 0; j < k; ++j)
            for (int t = 0; t < t_out; ++t) table[j * t_out + t] = source_index(c, t, j, t_in);
    for (int ci = 0; ci < c.c_in; ++ci)
        for (int j = 0; j < k; ++j) {
            float* row = col + (static_cast<std::size_t>(ci) * k + j) * n_cols;
            for (int b = 0; b < batch; ++b) {
                const float* src = s.ptr + b * s.bstride + static_cast<std::size_t>(ci) * s.cs;
                float* dst = row + static_cast<std::size_t>(b) * t_out;
                if (!c.transposed && c.stride == 1 && s.ts == 1) {
                    // A shifted copy of the source row: t meets ti = t + j - pad, zero outside [0, t_in).
                    // Plain loops: rows are a few to a few tens of floats, too short for memcpy calls.
                    const int lo = std::clamp(c.pad - j, 0, t_out), hi = std::clamp(t_in + c.pad - j, lo, t_out);
                    const float* sp = src + j - c.pad;
                    for (int t = 0; t < lo; ++t) dst[t] = 0.0f;
                    for (int t = lo; t < hi; ++t) dst[t] = sp[t];
                    for (int t = hi; t < t_out; ++t) dst[t] = 0.0f;
                } else if (tabled) {
                    const int* ti = table + j * t_out;
                    for (int t = 0; t < t_out; ++t) dst[t] = ti[t] < 0 ? 0.0f : src[static_cast<std::size_t>(ti[t]) * s.ts];
                } else {
                    for (int t = 0; t < t_out; ++t) {
                        const int ti = source_index(c, t, j, t_in);
                        dst[t] = ti < 0 ? 0.0f : src[static_cast<std::size_t>(ti) * s.ts];
                    }
                }
            }
        }
}

void col2im_add(const Conv& c, const float* col, int batch, int t_in, float* din) {
    const int t_out = c.t_out(t_in), k = c.ksize, width = c.c_in * k;
    for (int b = 0; b < batch; ++b) {
        float* dst = din + static_cast<std::size_t>(b) * c.c_in * t_in;
        for (int t = 0; t < t_out; ++t) {
            const float* row = col + (static_cast<std::size_t>(b) * t_out + t) * width;
            for (int j = 0; j < k; ++j) {
                const int ti = source_index(c, t, j, t_in);
                if (ti < 0) continue;
                for (int ci = 0; ci < c.c_in; ++ci) dst[static_cast<std::size_t>(ci) * t_in + ti] += row[ci * k + j];
            }
        }
    }
}

void group_norm_mish(float* x, int batch, int C, int T, int groups, const Norm& n, NormTape* tape, int g0, int g1) {
    if (g1 < 0) g1 = groups;
    const int cpg = C / groups;
    const std::size_t len = static_cast<std::size_t>(cpg) * T, span = len * (g1 - g0);
    for (int b = 0; b < batch; ++b) {
        float* first = x + (static_cast<std::size_t>(b) * C + static_cast<std::size_t>(g0) * cpg) * T;
        if (tape) std::copy_n(first, span, tape->pre.data() + (first - x));
        for (int g = g0; g < g1; ++g) {
            float* p = x + (static_cast<std::size_t>(b) * C + g * cpg) * T;
            // Two passes in double: the statistics of at most a few thousand values, exactly enough.
            const double mean = cpu::sum_f64(p, len) / len;
            const double sq = cpu::sum_sq_dev_f64(p, len, mean);
            const float rstd = static_cast<float>(1.0 / std::sqrt(sq / len + kGroupNormEps));
            const float m = static_cast<float>(mean);
            if (tape) {
                tape->mean[b * groups + g] = m;
                tape->rstd[b * groups + g] = rstd;
            }
            for (int c = 0; c < cpg; ++c) {
                const float a = rstd * n.gamma[g * cpg + c];
                const float s = n.beta[g * cpg + c] - m * a;
                float* row = p + static_cast<std::size_t>(c) * T;
                for (int t = 0; t < T; ++t) row[t] = row[t] * a + s;
            }
        }
        cpu::mish_inplace(first, span);
    }
}

void group_norm_mish_backward(const float* dy, int batch, int C, int T, int groups, const Norm& n,
                              const NormTape& tape, float* dx) {
    const int cpg = C / groups;
    const std::size_t len = static_cast<std::size_t>(cpg) * T;
    // dx <- the Mish input u = xhat * gamma + beta, then d(u) = dy * Mish'(u) (vectorised, in place).
    for (int b = 0; b < batch; ++b)
        for (int g = 0; g < groups; ++g) {
            const std::size_t off = (static_cast<std::size_t>(b) * C + g * cpg) * T;
            const float m = tape.mean[b * groups + g], rs = tape.rstd[b * groups + g];
            for (int c = 0; c < cpg; ++c)
                for (int t = 0; t < T; ++t) {
                    const std::size_t i = off + static_cast<std::size_t>(c) * T + t;
                    dx[i] = (tape.pre[i] - m) * rs * n.gamma[g * cpg + c] + n.beta[g * cpg + c];
                }
        }
    cpu::mish_backward(dx, dy, dx, static_cast<std::size_t>(batch) * C * T);
    for (int b = 0; b < batch; ++b) {
        for (int g = 0; g < groups; ++g) {
            const std::size_t off = (static_cast<std::size_t>(b) * C + g * cpg) * T;
            const float m = tape.mean[b * groups + g], rs = tape.rstd[b * groups + g];
            for (int c = 0; c < cpg; ++c) {
                const float gamma = n.gamma[g * cpg + c];
                float* row = dx + off + static_cast<std::size_t>(c) * T;
                for (int t = 0; t < T; ++t) row[t] *= gamma;  // now d(xhat)
            }
            const float* dxh = dx + off;
            const float* pre = tape.pre.data() + off;
            const double s1 = lane_sum(len, [&](std::size_t i) { return static_cast<double>(dxh[i]); });
            const double s2 = lane_sum(len, [&](std::size_t i) { return static_cast<double>(dxh[i]) * ((pre[i] - m) * rs); });
            const float mean1 = static_cast<float>(s1 / len), mean2 = static_cast<float>(s2 / len);
            for (std::size_t i = off; i < off + len; ++i) dx[i] = rs * (dx[i] - mean1 - (tape.pre[i] - m) * rs * mean2);
        }
    }
}

}  // namespace unet

int conv1d_forward(const float* x, int batch, int c_in, int t_in, const float* weight, const float* bias,
                   int c_out, int k, int stride, int padding, bool transposed, cpu::WeightType wtype, float* out,
                   int t_out_capacity) {
    if (batch < 1 || c_in < 1 || c_out < 1 || t_in < 1 || k < 1 || stride < 1 || padding < 0)
        throw std::invalid_argument("conv1d: sizes must be positive (padding >= 0)");
    const unet::Conv c = unet::make_conv(weight, bias, c_in, c_out, k, stride, padding, transposed, wtype);
    const int t_out = c.t_out(t_in);
    if (t_out < 1 || t_out > t_out_capacity) throw std::invalid_argument("conv1d: output length " + std::to_string(t_out) + " does not fit");
    std::vector<float> col(static_cast<std::size_t>(batch) * t_out * c.d.k);
    unet::im2col(c, unet::Src{x, static_cast<std::size_t>(c_in) * t_in, t_in, 1}, batch, t_in, col.data());
    cpu::DenseArgs a = c.d.args();
    a.x = col.data();
    a.n_cols = batch * t_out;
    a.out = out;
    a.T = t_out;
    a.out_bstride = static_cast<std::size_t>(c_out) * t_out;
    cpu::dense_rows(a, 0, c_out);
    return t_out;
}

}  // namespace dpag
