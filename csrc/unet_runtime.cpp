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
constexpr std::size_t kParallelMinMacs = 1 << 15;

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
    int c_in = 0, c_out = 0, ksize = 1, stride = 1, pad = 0;
    bool transposed = false;

    int t_out(int t_in) const {
        return transposed ? (t_in - 1) * stride - 2 * pad + ksize : (t_in + 2 * pad - ksize) / stride + 1;
    }
};

Conv make_conv(const float* w, const float* b, int c_in, int c_out, int k, int stride, int pad,
               bool transposed, cpu::WeightType wtype) {
    Conv c;
    c.c_in = c_in;
    c.c_out = c_out;
    c.ksize = k;
    c.stride = stride;
    c.pad = pad;
    c.transposed = transposed;
    c.d.pack(c_out, c_in * k, wtype, [&](int co, int i) {
        const int ci = i / k, j = i % k;
        // Conv1d weight (C_out, C_in, k); ConvTranspose1d weight (C_in, C_out, k).
        return transposed ? w[(static_cast<std::size_t>(ci) * c_out + co) * k + j]
                          : w[(static_cast<std::size_t>(co) * c_in + ci) * k + j];
    });
    c.d.bias.assign(b, b + c_out);
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

// col[(b*T_out + t), ci*k + j] = the input value that weight (ci, j) meets at output position t.
void im2col(const Conv& c, const Src& s, int batch, int t_in, float* col) {
    const int t_out = c.t_out(t_in), k = c.ksize, kp = c.d.k_pad;
    for (int b = 0; b < batch; ++b) {
        const float* src = s.ptr + b * s.bstride;
        for (int t = 0; t < t_out; ++t) {
            float* row = col + (static_cast<std::size_t>(b) * t_out + t) * kp;
            for (int j = 0; j < k; ++j) {
                int ti;
                if (!c.transposed) {
                    ti = t * c.stride + j - c.pad;
                } else {
                    // out[t] gathers in[ti] * w[j] for t = ti*stride - pad + j.
                    const int num = t + c.pad - j;
                    ti = (num >= 0 && num % c.stride == 0) ? num / c.stride : -1;
                }
                if (ti < 0 || ti >= t_in) {
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

struct Norm {
    std::vector<float> gamma, beta;
};

// GroupNorm over (channels in group) x T, then Mish, in place on channels-first (B, C, T).
void group_norm_mish(float* x, int batch, int C, int T, int groups, const Norm& n) {
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

struct ConvBlock {
    Conv conv;
    Norm norm;
};

struct ResBlock {
    ConvBlock b0, b1;
    bool has_res = false;
    Conv res;
    int c_in = 0, c_out = 0;
    std::vector<float> film_t;  // (K, 2*c_out): W_t Mish(t_emb_k) + bias, per sampler step
    Dense film_g;               // (2*c_out, G): the global-condition half of the FiLM Linear
    std::vector<float> film_g_out;  // (max_batch, 2*c_out), once per plan
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
    std::vector<float> col, act_a, act_b, act_x, h, r, gnorm, gcol;
    std::vector<std::vector<float>> skips;
    std::vector<float> eps_cf, eps, x, prev, x0;

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
                           stride, pad, transposed, cfg.weights);
        max_col = std::max(max_col, static_cast<std::size_t>(c.t_out(t_in)) * c.d.k_pad);
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

    void run_conv_block(const ConvBlock& b, const Src& s, int batch, int T, float* out) {
        run_conv(b.conv, s, batch, T, out);
        group_norm_mish(out, batch, b.conv.c_out, T, cfg.n_groups, b.norm);
    }

    void run_res_block(const ResBlock& rb, const Src& in, int batch, int T, int step, float* out) {
        const int C = rb.c_out;
        run_conv_block(rb.b0, in, batch, T, h.data());
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
            const ResBlock& r1 = down_res[2 * l];
            const ResBlock& r2 = down_res[2 * l + 1];
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
            const ResBlock& r1 = up_res[2 * u];
            const ResBlock& r2 = up_res[2 * u + 1];
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
};

PolicyEngine::Impl::Impl(const PolicyEngineConfig& c, const WeightMap& w)
    : cfg(c), pool(c.threads) {
    K = static_cast<int>(cfg.timesteps.size());
    G = cfg.n_obs_steps * cfg.state_dim;
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

    // Every conv's weights, in the order a forward reads them, into one huge-page arena.
    std::vector<Dense*> order;
    auto add_res = [&](ResBlock& rb) {
        order.push_back(&rb.b0.conv.d);
        order.push_back(&rb.b1.conv.d);
        if (rb.has_res) order.push_back(&rb.res.d);
    };
    for (int l = 0; l < levels; ++l) {
        add_res(down_res[2 * l]);
        add_res(down_res[2 * l + 1]);
        if (l < levels - 1) order.push_back(&down_sample[l].d);
    }
    for (auto& rb : mid_res) add_res(rb);
    for (int u = 0; u < levels - 1; ++u) {
        add_res(up_res[2 * u]);
        add_res(up_res[2 * u + 1]);
        order.push_back(&up_sample[u].d);
    }
    order.push_back(&final_block.conv.d);
    order.push_back(&final_out.d);
    arena.build(order);

    const std::size_t B = cfg.max_batch;
    col.assign(B * max_col, 0.0f);
    for (auto* v : {&act_a, &act_b, &act_x, &h, &r}) v->assign(B * max_act, 0.0f);
    for (int l = 0; l < levels; ++l) skips.emplace_back(B * static_cast<std::size_t>(dd[l]) * (H >> l), 0.0f);
    gnorm.assign(B * G, 0.0f);
    gcol.assign(B * Gp, 0.0f);
    const std::size_t n = B * static_cast<std::size_t>(H) * Da;
    for (auto* v : {&eps_cf, &eps, &x, &prev, &x0}) v->assign(n, 0.0f);
}

namespace {
void validate(const PolicyEngineConfig& c) {
    auto need = [](bool ok, const std::string& msg) {
        if (!ok) throw std::invalid_argument(msg);
    };
    need(c.action_dim >= 1 && c.state_dim >= 1 && c.n_obs_steps >= 1, "action_dim, state_dim, n_obs_steps: must be >= 1");
    need(!c.down_dims.empty(), "down_dims: needs at least one level");
    for (int d : c.down_dims) need(d > 0 && c.n_groups > 0 && d % c.n_groups == 0, "down_dims: every width must be a multiple of n_groups");
    need(c.kernel_size % 2 == 1, "kernel_size: must be odd");
    need(c.diffusion_step_embed_dim >= 4 && c.diffusion_step_embed_dim % 2 == 0, "diffusion_step_embed_dim: must be even and >= 4");
    need(c.horizon >= 1 && c.horizon % (1 << (c.down_dims.size() - 1)) == 0, "horizon: must be a multiple of 2**(levels-1)");
    need(!c.timesteps.empty() && c.coefs.size() == c.timesteps.size(), "coefs: need one row per timestep (K >= 1)");
    need(c.state_scale.size() == static_cast<std::size_t>(c.state_dim) && c.state_offset.size() == c.state_scale.size(),
         "state_scale/state_offset: need state_dim values");
    need(c.action_scale.size() == static_cast<std::size_t>(c.action_dim) && c.action_offset.size() == c.action_scale.size(),
         "action_scale/action_offset: need action_dim values");
    need(c.max_batch >= 1, "max_batch: must be >= 1");
    need(c.threads >= 1 && c.threads <= 64, "threads: must be in [1, 64]");
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
    auto rb = [&](const std::vector<ResBlock>& v) {
        for (const auto& b : v) n += b.b0.conv.d.bytes() + b.b1.conv.d.bytes() + (b.has_res ? b.res.d.bytes() : 0);
    };
    rb(impl_->down_res);
    rb(impl_->mid_res);
    rb(impl_->up_res);
    for (const auto& c : impl_->down_sample) n += c.d.bytes();
    for (const auto& c : impl_->up_sample) n += c.d.bytes();
    return n + impl_->final_block.conv.d.bytes() + impl_->final_out.d.bytes();
}

void PolicyEngine::unet_forward(const float* sample, int batch, int step, const float* global_cond, float* eps) {
    if (batch < 1 || batch > cfg_.max_batch)
        throw std::invalid_argument("batch: must be in [1, max_batch=" + std::to_string(cfg_.max_batch) + "], got " + std::to_string(batch));
    if (step < 0 || step >= num_steps())
        throw std::invalid_argument("step: must be in [0, K=" + std::to_string(num_steps()) + "), got " + std::to_string(step));
    std::lock_guard<std::mutex> lock(impl_->busy);
    impl_->set_global_cond(global_cond, batch);
    impl_->forward(sample, batch, step, eps);
}

void PolicyEngine::plan(const float* state, int batch, const float* x_init, const float* step_noise, float* action_pred,
                        const InpaintArgs* inpaint) {
    Impl& m = *impl_;
    if (batch < 1 || batch > cfg_.max_batch)
        throw std::invalid_argument("batch: must be in [1, max_batch=" + std::to_string(cfg_.max_batch) + "], got " + std::to_string(batch));
    if (cfg_.stochastic && !step_noise)
        throw std::invalid_argument("step_noise: this sampler is stochastic (DDPM or eta > 0) and needs (K, B, H, Da) noise");
    const int G = m.G, Ds = cfg_.state_dim;
    const std::size_t n = static_cast<std::size_t>(batch) * m.H * m.Da;
    for (std::size_t i = 0; i < static_cast<std::size_t>(batch) * G; ++i)
        if (!std::isfinite(state[i])) throw std::invalid_argument("obs['state']: contains NaN or inf");
    const InpaintArgs* inp = inpaint && inpaint->width > 0 ? inpaint : nullptr;
    const std::size_t n_pre = inp ? static_cast<std::size_t>(batch) * inp->width * m.Da : 0;  // B*W*Da
    if (inp) {
        if (inp->start < 0 || inp->start + inp->width > m.H)
            throw std::invalid_argument("prefix: rows [" + std::to_string(inp->start) + ", " +
                                        std::to_string(inp->start + inp->width) + ") outside the horizon " + std::to_string(m.H));
        if (!inp->prefix || !inp->weights || !inp->noise)
            throw std::invalid_argument("prefix: needs prefix, weights and per-step noise");
        if (cfg_.inpaint_coefs.size() != static_cast<std::size_t>(num_steps()))
            throw std::invalid_argument("prefix: the engine config has no inpaint_coefs (one row per step)");
        for (std::size_t i = 0; i < n_pre; ++i)
            if (!std::isfinite(inp->prefix[i])) throw std::invalid_argument("prefix: contains NaN or inf");
        for (int j = 0; j < inp->width; ++j)
            if (!(inp->weights[j] >= 0.0f && inp->weights[j] <= 1.0f))
                throw std::invalid_argument("prefix_weight: weights must be finite and in [0, 1]");
    }

    std::lock_guard<std::mutex> lock(m.busy);
    // Normalise (as Normalizer.normalize: x * scale + offset); the identity encoder makes this mu.
    float* g = m.gnorm.data();
    for (int b = 0; b < batch; ++b)
        for (int i = 0; i < G; ++i) {
            const std::size_t j = static_cast<std::size_t>(b) * G + i;
            g[j] = state[j] * cfg_.state_scale[i % Ds] + cfg_.state_offset[i % Ds];
        }
    m.set_global_cond(g, batch);

    std::copy_n(x_init, n, m.x.data());
    for (int k = 0; k < num_steps(); ++k) {
        m.forward(m.x.data(), batch, k, m.eps.data());
        const float* noise = cfg_.stochastic ? step_noise + k * n : nullptr;
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
    // Un-normalise (as Normalizer.unnormalize: (x - offset) / scale).
    for (std::size_t i = 0; i < n; ++i) {
        const int c = static_cast<int>(i % m.Da);
        action_pred[i] = (m.x[i] - cfg_.action_offset[c]) / cfg_.action_scale[c];
    }
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
