#include "unet_runtime.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <cstdlib>
#include <new>
#include <stdexcept>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "cpu_kernels.h"
#include "worker_pool.h"

namespace dpag {
namespace {

constexpr float kGroupNormEps = 1e-5f;  // torch.nn.GroupNorm default
// Below this many multiply-adds a layer runs on the calling thread: waking the pool costs more.
// Measured: at 1 << 15 the tiny recipe's guided plan took 7.3 ms on 2 threads vs 4.6 ms on one (its
// backward is many small layers); at 1 << 18 it takes 4.6 ms on 2, and the big recipes' layers
// (millions of MACs each) are unaffected.
constexpr std::size_t kParallelMinMacs = 1 << 18;

std::string shape_str(const std::vector<std::int64_t>& s) {
    std::string r = "(";
    for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
    return r + (s.size() == 1 ? ",)" : ")");
}

// A weight matrix in the layout the dense kernel streams: (rows, k_pad), zero padded.
struct Dense {
    int rows = 0, k = 0, k_pad = 0;
    std::vector<float> w32;
    std::vector<std::uint16_t> w16;
    cpu::WeightType wtype = cpu::WeightType::kF32;
    std::vector<float> bias;

    // row(r)[i] for i < k is filled by `at(r, i)`.
    template <typename F>
    void pack(int rows_, int k_, cpu::WeightType type, F at) {
        rows = rows_;
        k = k_;
        k_pad = cpu::pad_k(k_);
        wtype = type;
        const std::size_t n = static_cast<std::size_t>(rows) * k_pad;
        const bool half = type != cpu::WeightType::kF32;
        if (half) w16.assign(n, 0); else w32.assign(n, 0.0f);
        for (int r = 0; r < rows; ++r)
            for (int i = 0; i < k; ++i) {
                const float v = at(r, i);
                const std::size_t j = static_cast<std::size_t>(r) * k_pad + i;
                if (type == cpu::WeightType::kF32) {
                    w32[j] = v;
                } else if (type == cpu::WeightType::kBF16) {
                    w16[j] = cpu::to_bf16(v);
                } else {
                    if (!(std::fabs(v) <= 65504.0f))
                        throw std::invalid_argument("weights: a value (" + std::to_string(v) + ") is outside the fp16 range; use fp32 or bf16");
                    w16[j] = cpu::to_f16(v);
                }
            }
    }
    std::size_t stored_bytes = 0;  // set when the weights move to the arena
    std::size_t bytes() const { return stored_bytes ? stored_bytes : w32.size() * 4 + w16.size() * 2; }

    // Where the kernel reads the weights: the vectors above until the engine moves every conv's
    // weights into its huge-page arena (WeightArena), then there.
    const void* data = nullptr;
    const void* weights() const { return data ? data : (w32.empty() ? static_cast<const void*>(w16.data()) : w32.data()); }
};

// One contiguous allocation for all convolution weights, 2 MiB aligned and (on Linux) advised to use
// transparent huge pages: a step streams hundreds of MB, and with 4 KiB pages the hardware
// prefetchers stop at every page boundary and the TLB misses every 4 KiB (measured: about 1.5x
// slower on the lowdim recipe on this machine, where THP is madvise-only).
class WeightArena {
public:
    void build(const std::vector<Dense*>& layers) {
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
            d->stored_bytes = n;
            off += (n + 63) / 64 * 64;
        }
    }
    ~WeightArena() { std::free(base_); }

private:
    char* base_ = nullptr;
};

// A Conv1d or ConvTranspose1d lowered to im2col + Dense. Row co of the matrix holds the weights of
// output channel co over the (C_in, k) window, in the order im2col writes the window.
struct Conv {
    Dense d;
    Dense dt;  // guided mode only: the transposed matrix (C_in*k, C_out), for d(input) = W^T d(output)
    int c_in = 0, c_out = 0, ksize = 1, stride = 1, pad = 0;
    bool transposed = false;

    int t_out(int t_in) const {
        return transposed ? (t_in - 1) * stride - 2 * pad + ksize : (t_in + 2 * pad - ksize) / stride + 1;
    }
};

Conv make_conv(const float* w, const float* b, int c_in, int c_out, int k, int stride, int pad,
               bool transposed, cpu::WeightType wtype, bool backward = false) {
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

// Where a layer reads its input: element (b, c, t) is at ptr[b*bstride + c*cs + t*ts]. The U-Net's
// own activations are channels-first (cs = T, ts = 1); the sample enters as (B, H, Da) (cs = 1,
// ts = Da), so the transpose is free.
struct Src {
    const float* ptr;
    std::size_t bstride;
    int cs, ts;
};

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

// col[(b*T_out + t), ci*k + j] = the input value that weight (ci, j) meets at output position t.
void im2col(const Conv& c, const Src& s, int batch, int t_in, float* col) {
    const int t_out = c.t_out(t_in), k = c.ksize, kp = c.d.k_pad;
    for (int b = 0; b < batch; ++b) {
        const float* src = s.ptr + b * s.bstride;
        for (int t = 0; t < t_out; ++t) {
            float* row = col + (static_cast<std::size_t>(b) * t_out + t) * kp;
            for (int j = 0; j < k; ++j) {
                const int ti = source_index(c, t, j, t_in);
                if (ti < 0) {
                    for (int ci = 0; ci < c.c_in; ++ci) row[ci * k + j] = 0.0f;
                } else {
                    const float* p = src + static_cast<std::size_t>(ti) * s.ts;
                    for (int ci = 0; ci < c.c_in; ++ci) row[ci * k + j] = p[static_cast<std::size_t>(ci) * s.cs];
                }
            }
            std::fill(row + c.c_in * k, row + kp, 0.0f);
        }
    }
}

// The adjoint of im2col: din (B, C_in, T_in) += every col entry, sent back to the input position it came from.
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

struct Norm {
    std::vector<float> gamma, beta;
};

// What the backward needs of a GroupNorm+Mish forward: its input and per-(sample, group) statistics.
struct NormTape {
    std::vector<float> pre, mean, rstd;
};

// GroupNorm over (channels in group) x T, then Mish, in place on channels-first (B, C, T). With a
// tape, the input and the statistics are kept for group_norm_mish_backward.
void group_norm_mish(float* x, int batch, int C, int T, int groups, const Norm& n, NormTape* tape = nullptr) {
    if (tape) std::copy_n(x, static_cast<std::size_t>(batch) * C * T, tape->pre.data());
    const int cpg = C / groups;
    const std::size_t len = static_cast<std::size_t>(cpg) * T;
    for (int b = 0; b < batch; ++b) {
        for (int g = 0; g < groups; ++g) {
            float* p = x + (static_cast<std::size_t>(b) * C + g * cpg) * T;
            // Two passes in double: the statistics of at most a few thousand values, exactly enough.
            double sum = 0.0;
            for (std::size_t i = 0; i < len; ++i) sum += p[i];
            const double mean = sum / len;
            double sq = 0.0;
            for (std::size_t i = 0; i < len; ++i) sq += (p[i] - mean) * (p[i] - mean);
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
    }
    cpu::mish_inplace(x, static_cast<std::size_t>(batch) * C * T);
}

// dx = d(loss)/d(GroupNorm+Mish input) from dy = d(loss)/d(output), by the standard GroupNorm
// adjoint: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) over each group.
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
            double s1 = 0.0, s2 = 0.0;
            for (int c = 0; c < cpg; ++c) {
                const float gamma = n.gamma[g * cpg + c];
                for (int t = 0; t < T; ++t) {
                    const std::size_t i = off + static_cast<std::size_t>(c) * T + t;
                    const float xhat = (tape.pre[i] - m) * rs;
                    const float dxhat = dx[i] * gamma;
                    dx[i] = dxhat;
                    s1 += dxhat;
                    s2 += static_cast<double>(dxhat) * xhat;
                }
            }
            const float mean1 = static_cast<float>(s1 / len), mean2 = static_cast<float>(s2 / len);
            for (std::size_t i = off; i < off + len; ++i) dx[i] = rs * (dx[i] - mean1 - (tape.pre[i] - m) * rs * mean2);
        }
    }
}

struct ConvBlock {
    Conv conv;
    Norm norm;
    NormTape tape;  // guided mode: filled by a recording forward
};

struct ResBlock {
    ConvBlock b0, b1;
    bool has_res = false;
    Conv res;
    int c_in = 0, c_out = 0;
    std::vector<float> film_t;  // (K, 2*c_out): W_t Mish(t_emb_k) + bias, per sampler step
    Dense film_g;               // (2*c_out, G): the global-condition half of the FiLM Linear
    std::vector<float> film_g_out;  // (max_batch, 2*c_out), once per plan (per latent in guided mode)
    // Guided mode: the first conv block's output before FiLM (the tape), and d(loss)/d(scale, bias).
    std::vector<float> y0, dfilm;
};

struct DenseJob {
    cpu::DenseArgs a;
    int rows;
};

void dense_job(void* ctx, int tid, int n_threads) {
    const auto& job = *static_cast<const DenseJob*>(ctx);
    // Even-sized contiguous slices: each thread streams its own half of the weight matrix.
    const int chunk = ((job.rows + n_threads - 1) / n_threads + 1) & ~1;
    const int r0 = std::min(job.rows, tid * chunk), r1 = std::min(job.rows, r0 + chunk);
    if (r0 < r1) cpu::dense_rows(job.a, r0, r1);
}

}  // namespace

struct PolicyEngine::Impl {
    const PolicyEngineConfig& cfg;
    WorkerPool pool;
    // plan() and unet_forward() share the buffers: two Python threads (the GIL is released) calling
    // one engine take turns instead of corrupting each other.
    std::mutex busy;
    int K, G, Gp, H, Da, levels;
    std::size_t n_params = 0;

    std::vector<ResBlock> down_res;   // 2 per level
    std::vector<Conv> down_sample;    // levels - 1
    std::vector<ResBlock> mid_res;    // 2
    std::vector<ResBlock> up_res;     // 2 per up level
    std::vector<Conv> up_sample;      // levels - 1
    ConvBlock final_block;
    Conv final_out;
    WeightArena arena;

    // Buffers, all sized for max_batch at construction.
    std::size_t max_col = 0, max_act = 0;
    std::vector<float> col, act_a, act_b, act_x, h, r, gcol;
    std::vector<std::vector<float>> skips;
    std::vector<float> eps_cf, eps, x, prev, x0;
    // Guided mode: the backward's buffers and the latent (z, force, log_var), all (B, G) but dcol.
    bool recording = false;  // forward() fills the tapes
    std::vector<float> dcol, grad_a, grad_b, grad_c, grad_h, grad_y, z, force;
    std::vector<std::vector<float>> dskips;

    Impl(const PolicyEngineConfig& c, const WeightMap& weights);

    // ---- construction helpers ----
    const float* get(const WeightMap& w, const std::string& name, std::vector<std::int64_t> shape) {
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

    Conv conv(const WeightMap& w, const std::string& p, int c_in, int c_out, int k, int stride, int pad,
              bool transposed, int t_in) {
        const std::vector<std::int64_t> shape = transposed ? std::vector<std::int64_t>{c_in, c_out, k}
                                                           : std::vector<std::int64_t>{c_out, c_in, k};
        Conv c = make_conv(get(w, p + ".weight", shape), get(w, p + ".bias", {c_out}), c_in, c_out, k,
                           stride, pad, transposed, cfg.weights, cfg.guided);
        // The backward uses col for d(output) as rows of C_out (padded).
        max_col = std::max(max_col, static_cast<std::size_t>(c.t_out(t_in)) * std::max(c.d.k_pad, c.dt.k_pad));
        return c;
    }

    ConvBlock conv_block(const WeightMap& w, const std::string& p, int c_in, int c_out, int t_in) {
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

    ResBlock res_block(const WeightMap& w, const std::string& p, int c_in, int c_out, int t,
                       const std::vector<float>& mish_temb) {
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

    // out (n, d.rows) = in (n, d.k) @ W^T + bias; construction time only (allocates).
    std::vector<float> linear(const Dense& d, const std::vector<float>& in, int n) {
        std::vector<float> padded(static_cast<std::size_t>(n) * d.k_pad, 0.0f), out(static_cast<std::size_t>(n) * d.rows);
        for (int i = 0; i < n; ++i)
            std::copy_n(in.data() + static_cast<std::size_t>(i) * d.k, d.k, padded.data() + static_cast<std::size_t>(i) * d.k_pad);
        cpu::DenseArgs a;
        a.w32 = d.w32.data();
        a.bias = d.bias.data();
        a.k_pad = d.k_pad;
        a.x = padded.data();
        a.n_cols = n;
        a.out = out.data();
        a.T = 1;
        a.out_bstride = d.rows;
        cpu::dense_rows(a, 0, d.rows);
        return out;
    }

    // Mish(MLP(sinusoidal(t_k))) for the K sampler timesteps: (K, dsed), the input of every FiLM time half.
    std::vector<float> timestep_features(const WeightMap& w) {
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

    // Every convolution, in the order a forward runs them.
    std::vector<Conv*> all_convs() {
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

    // ---- forward ----
    void dense(const Dense& d, const float* col, int n_cols, float* out, int T, std::size_t bstride) {
        DenseJob job;
        job.a.w32 = static_cast<const float*>(d.weights());
        job.a.w16 = static_cast<const std::uint16_t*>(d.weights());
        job.a.wtype = d.wtype;
        job.a.bias = d.bias.empty() ? nullptr : d.bias.data();
        job.a.k_pad = d.k_pad;
        job.a.x = col;
        job.a.n_cols = n_cols;
        job.a.out = out;
        job.a.T = T;
        job.a.out_bstride = bstride;
        job.rows = d.rows;
        if (pool.size() == 1 || static_cast<std::size_t>(d.rows) * d.k_pad * n_cols < kParallelMinMacs) {
            cpu::dense_rows(job.a, 0, d.rows);
        } else {
            pool.run(&dense_job, &job);
        }
    }

    // out (B, c_out, T_out) channels-first; returns T_out.
    int run_conv(const Conv& c, const Src& s, int batch, int t_in, float* out) {
        const int t_out = c.t_out(t_in);
        im2col(c, s, batch, t_in, col.data());
        dense(c.d, col.data(), batch * t_out, out, t_out, static_cast<std::size_t>(c.c_out) * t_out);
        return t_out;
    }

    void run_conv_block(ConvBlock& b, const Src& s, int batch, int T, float* out) {
        run_conv(b.conv, s, batch, T, out);
        group_norm_mish(out, batch, b.conv.c_out, T, cfg.n_groups, b.norm, recording ? &b.tape : nullptr);
    }

    void run_res_block(ResBlock& rb, const Src& in, int batch, int T, int step, float* out) {
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

    // global_cond (B, G) normalised -> every site's observation half of FiLM.
    void set_global_cond(const float* g, int batch) {
        for (int b = 0; b < batch; ++b) {
            float* row = gcol.data() + static_cast<std::size_t>(b) * Gp;
            std::copy_n(g + static_cast<std::size_t>(b) * G, G, row);
            cpu::mish_inplace(row, G);
        }
        auto all = [&](std::vector<ResBlock>& v) {
            for (auto& rb : v) dense(rb.film_g, gcol.data(), batch, rb.film_g_out.data(), 1, 2 * rb.c_out);
        };
        all(down_res);
        all(mid_res);
        all(up_res);
    }

    // eps (B, H, Da) = unet(sample (B, H, Da), timesteps[step], the global cond last set).
    void forward(const float* sample, int batch, int step, float* eps_out) {
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

    // ---- backward (guided mode): d(0.5 ||eps||^2) / d(global cond), activations only ----

    // din (B, c_in, t_in) = (or +=) d/d(input) of conv c for dout (B, c_out, t_out), channels-first:
    // d(col) = d(out) W (the transposed weights, streamed once), then col2im.
    void conv_backward(const Conv& c, const float* dout, int batch, int t_in, float* din, bool accumulate) {
        const int t_out = c.t_out(t_in), kp = c.dt.k_pad;
        for (int b = 0; b < batch; ++b)
            for (int t = 0; t < t_out; ++t) {
                float* row = col.data() + (static_cast<std::size_t>(b) * t_out + t) * kp;
                const float* src = dout + static_cast<std::size_t>(b) * c.c_out * t_out + t;
                for (int co = 0; co < c.c_out; ++co) row[co] = src[static_cast<std::size_t>(co) * t_out];
                std::fill(row + c.c_out, row + kp, 0.0f);
            }
        dense(c.dt, col.data(), batch * t_out, dcol.data(), 1, c.dt.rows);
        if (!accumulate) std::fill_n(din, static_cast<std::size_t>(batch) * c.c_in * t_in, 0.0f);
        col2im_add(c, dcol.data(), batch, t_in, din);
    }

    // d(input) of a conv block (conv -> GroupNorm -> Mish) from d(output); scratch in grad_y.
    void conv_block_backward(const ConvBlock& b, const float* dout, int batch, int T, float* din) {
        group_norm_mish_backward(dout, batch, b.conv.c_out, T, cfg.n_groups, b.norm, b.tape, grad_y.data());
        conv_backward(b.conv, grad_y.data(), batch, T, din, false);
    }

    // Fills rb.dfilm = d(loss)/d(scale, bias) and, unless din is null (the first block, whose input
    // is the noisy sample: no path to z), din = d(loss)/d(block input). Scratch in grad_h, grad_y.
    void res_block_backward(ResBlock& rb, const float* dout, int batch, int T, int step, float* din) {
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

    // After a recording forward that returned eps (B, H, Da): every site's dfilm for the cotangent eps.
    void backward(const float* eps_in, int batch, int step) {
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

    // force (B, G) = d(0.5 ||eps||^2)/d z from every site's dfilm: back through each FiLM Linear's
    // condition half, then the Mish in front of it (z was the input of set_global_cond).
    void force_from_film(const float* z_in, int batch, float* out) {
        std::fill_n(out, static_cast<std::size_t>(batch) * G, 0.0f);
        auto site = [&](const ResBlock& rb) {
            const int two_c = 2 * rb.c_out;
            const float* w = static_cast<const float*>(rb.film_g.weights());
            for (int b = 0; b < batch; ++b)
                for (int r = 0; r < two_c; ++r) {
                    const float d = rb.dfilm[static_cast<std::size_t>(b) * two_c + r];
                    const float* wr = w + static_cast<std::size_t>(r) * Gp;
                    float* o = out + static_cast<std::size_t>(b) * G;
                    for (int i = 0; i < G; ++i) o[i] += d * wr[i];
                }
        };
        for (const auto& rb : down_res) site(rb);
        for (const auto& rb : mid_res) site(rb);
        for (const auto& rb : up_res) site(rb);
        cpu::mish_backward(z_in, out, out, static_cast<std::size_t>(batch) * G);
    }

    // force (B, G) at latent z (B, G) for the sample x: a recording forward, then the backward.
    void compute_force(const float* sample, int batch, int step, const float* z_in, float* out) {
        set_global_cond(z_in, batch);
        recording = true;
        forward(sample, batch, step, eps.data());
        recording = false;
        backward(eps.data(), batch, step);
        force_from_film(z_in, batch, out);
    }

    // One Euler-Maruyama step of the latent (ops.torch_ref.em_step), in place on z (B, To, Do):
    // z += gamma dt sigma n(g) + eta sqrt(dt) sigma xi, sigma = exp(log_var / 2), n() = unit L2 over Do.
    void latent_step(float* zz, const float* g, const float* lv, const float* xi, int batch) {
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
};

PolicyEngine::Impl::Impl(const PolicyEngineConfig& c, const WeightMap& w)
    : cfg(c), pool(c.threads) {
    K = static_cast<int>(cfg.timesteps.size());
    G = cfg.n_obs_steps * cfg.cond_dim;
    Gp = cpu::pad_k(G);
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
    gcol.assign(B * Gp, 0.0f);
    const std::size_t n = B * static_cast<std::size_t>(H) * Da;
    for (auto* v : {&eps_cf, &eps, &x, &prev, &x0}) v->assign(n, 0.0f);
    if (cfg.guided) {
        dcol.assign(B * max_col, 0.0f);
        for (auto* v : {&grad_a, &grad_b, &grad_c, &grad_h, &grad_y}) v->assign(B * max_act, 0.0f);
        for (const auto& sk : skips) dskips.emplace_back(sk.size(), 0.0f);
        for (auto* v : {&z, &force}) v->assign(B * G, 0.0f);
    }
}

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
}  // namespace

PolicyEngine::PolicyEngine(const PolicyEngineConfig& cfg, const WeightMap& weights) : cfg_(cfg) {
    validate(cfg_);
    impl_ = std::make_unique<Impl>(cfg_, weights);
}

PolicyEngine::~PolicyEngine() = default;

std::size_t PolicyEngine::num_params() const { return impl_->n_params; }

std::size_t PolicyEngine::weight_bytes_per_step() const {
    std::size_t n = 0;
    for (const Conv* c : impl_->all_convs()) n += c->d.bytes();
    return n;
}

namespace {
void check_batch(int batch, int max_batch) {
    if (batch < 1 || batch > max_batch)
        throw std::invalid_argument("batch: must be in [1, max_batch=" + std::to_string(max_batch) + "], got " + std::to_string(batch));
}
}  // namespace

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

int conv1d_forward(const float* x, int batch, int c_in, int t_in, const float* weight, const float* bias,
                   int c_out, int k, int stride, int padding, bool transposed, cpu::WeightType wtype, float* out,
                   int t_out_capacity) {
    if (batch < 1 || c_in < 1 || c_out < 1 || t_in < 1 || k < 1 || stride < 1 || padding < 0)
        throw std::invalid_argument("conv1d: sizes must be positive (padding >= 0)");
    const Conv c = make_conv(weight, bias, c_in, c_out, k, stride, padding, transposed, wtype);
    const int t_out = c.t_out(t_in);
    if (t_out < 1 || t_out > t_out_capacity) throw std::invalid_argument("conv1d: output length " + std::to_string(t_out) + " does not fit");
    std::vector<float> col(static_cast<std::size_t>(batch) * t_out * c.d.k_pad);
    im2col(c, Src{x, static_cast<std::size_t>(c_in) * t_in, t_in, 1}, batch, t_in, col.data());
    cpu::DenseArgs a;
    a.w32 = c.d.w32.empty() ? nullptr : c.d.w32.data();
    a.w16 = c.d.w16.empty() ? nullptr : c.d.w16.data();
    a.wtype = wtype;
    a.bias = c.d.bias.data();
    a.k_pad = c.d.k_pad;
    a.x = col.data();
    a.n_cols = batch * t_out;
    a.out = out;
    a.T = t_out;
    a.out_bstride = static_cast<std::size_t>(c_out) * t_out;
    cpu::dense_rows(a, 0, c_out);
    return t_out;
}

}  // namespace dpag
