// CPU kernels of the U-Net runtime (unet_runtime.h): a weight-streaming "dense" product, Mish,
// and bf16 packing. Plain C++17; the AVX2/FMA paths are picked at run time (function target
// attributes), so the library is built for baseline x86-64 and still loads on any CPU.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dpag::cpu {

// Every convolution of the U-Net is lowered to this product (after an im2col: unet_layers.cpp, unet_forward.cpp):
//
//   out[r, n] = bias[r] + sum_k W[r, k] * X[n, k]      for rows r in [r0, r1), columns n < n_cols
//
// W is (rows, k_pad) row-major, X is (n_cols, k_pad) row-major: both rows are contiguous in the
// reduction index, so each weight row is streamed from memory once and reused for all columns
// (at batch 1 there are only T = 16, 8 or 4 columns). k_pad is a multiple of kKPad and the padding
// is zero in both W and X, so the vector loop needs no tail.
//
// Column n is (sample b, time t) = (n / T, n % T) and lands at out[b * out_bstride + r * T + t],
// i.e. straight into the channels-first (B, C, T) activation layout.
// How the weights are stored: halving the bytes halves the time of a bandwidth-bound step.
enum class WeightType { kF32, kBF16, kF16 };

struct DenseArgs {
    const float* w32 = nullptr;          // kF32 weights, or
    const std::uint16_t* w16 = nullptr;  // kBF16 (upper halves of fp32) / kF16 (IEEE half) weights
    WeightType wtype = WeightType::kF32;
    const float* bias = nullptr;    // rows, may be null
    int k_pad = 0;
    const float* x = nullptr;       // n_cols x k_pad
    int n_cols = 0;
    float* out = nullptr;
    int T = 1;
    std::size_t out_bstride = 0;
};

constexpr int kKPad = 16;  // one AVX-512 register of fp32 (two AVX2 ones)

inline int pad_k(int k) { return (k + kKPad - 1) / kKPad * kKPad; }

// Rows [r0, r1) of the product above. Safe to call concurrently on disjoint row ranges.
void dense_rows(const DenseArgs& a, int r0, int r1);

// x <- x * tanh(softplus(x)) in place (torch.nn.Mish).
void mish_inplace(float* x, std::size_t n);
// du = dy * Mish'(u), elementwise; du may alias u or dy.
void mish_backward(const float* u, const float* dy, float* du, std::size_t n);

// Round-to-nearest-even fp32 -> bf16 (NaN stays NaN).
std::uint16_t to_bf16(float x);
// Round-to-nearest-even fp32 -> IEEE fp16 (overflow -> inf: callers check the range first).
std::uint16_t to_f16(float x);
float from_f16(std::uint16_t h);

// Which kernels run on this CPU: "avx512", "avx2" (with FMA and F16C) or "scalar".
const char* kernel_isa();

}  // namespace dpag::cpu
