// The U-Net engine's layer building blocks (unet_runtime.h, design notes there): packed weight
// matrices and their huge-page arena, convolutions lowered to im2col + the dense kernel
// (cpu_kernels.h) with col2im as im2col's adjoint, and GroupNorm+Mish with its backward.
// Stateless free functions over raw buffers; the U-Net itself (unet_impl.h) strings them together.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_kernels.h"

namespace dpag::unet {

// A weight matrix in the layout the dense kernel streams: panels of 16 rows, the reduction index
// outermost (cpu::panel_index), rows zero padded to a multiple of 16.
struct Dense {
    int rows = 0, k = 0;
    std::vector<float> w32;
    std::vector<std::uint16_t> w16;
    std::vector<std::int8_t> w8;
    std::vector<float> scale;  // kI8: scale[r] = max_i |W[r, i]| / 127 (0 for an all-zero or padding row)
    cpu::WeightType wtype = cpu::WeightType::kF32;
    std::vector<float> bias;

    // W[r, i] for i < k is filled by `at(r, i)`.
    template <typename F>
    void pack(int rows_, int k_, cpu::WeightType type, F at) {
        rows = rows_;
        k = k_;
        wtype = type;
        const std::size_t n = static_cast<std::size_t>(cpu::pad_rows(rows)) * k;
        switch (type) {
            case cpu::WeightType::kF32: w32.assign(n, 0.0f); break;
            case cpu::WeightType::kBF16: case cpu::WeightType::kF16: w16.assign(n, 0); break;
            case cpu::WeightType::kI8: w8.assign(n, 0); scale.assign(cpu::pad_rows(rows), 0.0f); break;
        }
        for (int r = 0; r < rows; ++r) {
            if (type == cpu::WeightType::kI8) {  // per-row symmetric: the largest |W[r, i]| maps to 127
                double amax = 0.0;
                for (int i = 0; i < k; ++i) {
                    const float v = at(r, i);
                    if (!std::isfinite(v)) throw std::invalid_argument("weights: a value is not finite; int8 needs finite weights");
                    amax = std::max(amax, static_cast<double>(std::fabs(v)));
                }
                scale[r] = static_cast<float>(amax / 127.0);
            }
            for (int i = 0; i < k; ++i) {
                const float v = at(r, i);
                const std::size_t j = cpu::panel_index(r, i, k);
                if (type == cpu::WeightType::kF32) {
                    w32[j] = v;
                } else if (type == cpu::WeightType::kBF16) {
                    w16[j] = cpu::to_bf16(v);
                } else if (type == cpu::WeightType::kF16) {
                    if (!(std::fabs(v) <= 65504.0f))
                        throw std::invalid_argument("weights: a value (" + std::to_string(v) + ") is outside the fp16 range; use fp32 or bf16");
                    w16[j] = cpu::to_f16(v);
                } else if (scale[r] > 0.0f) {  // round half to even, as numpy's rint (tests/test_dense_kernel.py)
                    const double q = std::nearbyint(static_cast<double>(v) / static_cast<double>(scale[r]));
                    w8[j] = static_cast<std::int8_t>(std::clamp(q, -127.0, 127.0));
                }
            }
        }
    }
    std::size_t stored_bytes = 0;  // set when the weights move to the arena
    std::size_t bytes() const { return stored_bytes ? stored_bytes : w32.size() * 4 + w16.size() * 2 + w8.size(); }

    // Where the kernel reads the weights: the vectors above until the engine moves every conv's
    // weights into its huge-page arena (WeightArena), then there.
    const void* data = nullptr;
    const void* weights() const {
        if (data) return data;
        if (!w32.empty()) return w32.data();
        if (!w16.empty()) return w16.data();
        return w8.data();
    }
    // The kernel's arguments for this matrix (weights, type, int8 scales, bias).
    cpu::DenseArgs args() const {
        cpu::DenseArgs a;
        a.w = weights();
        a.wtype = wtype;
        a.scale = scale.empty() ? nullptr : scale.data();
        a.bias = bias.empty() ? nullptr : bias.data();
        a.k = k;
        return a;
    }
};

// One contiguous allocation for all convolution weights, 2 MiB aligned and (on Linux) advised to use
// transparent huge pages: a step streams hundreds of MB, and with 4 KiB pages the hardware
// prefetchers stop at every page boundary and the TLB misses every 4 KiB (measured: about 1.5x
// slower on the lowdim recipe on this machine, where THP is madvise-only).
class WeightArena {
public:
    // Moves the weights of every layer into the arena (in this order) and frees the packed copies.
    void build(const std::vector<Dense*>& layers);
    ~WeightArena();

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

// w: Conv1d weight (C_out, C_in, k), or ConvTranspose1d weight (C_in, C_out, k); b: (C_out,).
// backward: also pack the transposed matrix dt.
Conv make_conv(const float* w, const float* b, int c_in, int c_out, int k, int stride, int pad,
               bool transposed, cpu::WeightType wtype, bool backward = false);

// Where a layer reads its input: element (b, c, t) is at ptr[b*bstride + c*cs + t*ts]. The U-Net's
// own activations are channels-first (cs = T, ts = 1); the sample enters as (B, H, Da) (cs = 1,
// ts = Da), so the transpose is free.
struct Src {
    const float* ptr;
    std::size_t bstride;
    int cs, ts;
};

// col[ci*k + j, b*T_out + t] = the input value that weight (ci, j) meets at output position t
// (the dense kernel's (k, n_cols) X).
void im2col(const Conv& c, const Src& s, int batch, int t_in, float* col);
// The adjoint of im2col, for col laid out (b*T_out + t, ci*k + j) (the backward's product, T = 1):
// din (B, C_in, T_in) += every col entry, sent back to the input position it came from.
void col2im_add(const Conv& c, const float* col, int batch, int t_in, float* din);

struct Norm {
    std::vector<float> gamma, beta;
};

// What the backward needs of a GroupNorm+Mish forward: its input and per-(sample, group) statistics.
struct NormTape {
    std::vector<float> pre, mean, rstd;
};

// GroupNorm over (channels in group) x T, then Mish, in place on channels-first (B, C, T). With a
// tape, the input and the statistics are kept for group_norm_mish_backward.
// Only groups [g0, g1) (g1 < 0: all) are touched, so threads can share a layer by disjoint groups.
void group_norm_mish(float* x, int batch, int C, int T, int groups, const Norm& n, NormTape* tape = nullptr,
                     int g0 = 0, int g1 = -1);
// dx = d(loss)/d(GroupNorm+Mish input) from dy = d(loss)/d(output), by the standard GroupNorm
// adjoint: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) over each group.
void group_norm_mish_backward(const float* dy, int batch, int C, int T, int groups, const Norm& n,
                              const NormTape& tape, float* dx);

}  // namespace dpag::unet
