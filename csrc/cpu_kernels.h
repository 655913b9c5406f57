// CPU kernels of the U-Net runtime (unet_runtime.h): a weight-streaming "dense" product, Mish,
// and bf16 packing. Plain C++17; the AVX2/FMA paths are picked at run time (function target
// attributes), so the library is built for baseline x86-64 and still loads on any CPU.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dpag::cpu {

// Every convolution of the U-Net is lowered to this product (unet_layers.cpp, unet_forward.cpp):
//
//   out[r, n] = bias[r] + sum_i W[r, i] * X[i, n]      for rows r in [r0, r1), columns n < n_cols, i < k
//
// X row i is at x + (i / taps) * x_stride + i % taps (default: taps 1, x_stride n_cols, i.e. X
// is (k, n_cols) row-major). taps > 1 reads a stride-1 convolution straight from its (zero-padded)
// input rows: for reduction index (ci, j), column t is in[ci][t + j], so no im2col copy is needed.
//
// W is stored in panels of kPanel = 16 consecutive rows with the reduction index outermost:
// w[(p * k + i) * 16 + j] = W[16 p + j, i] (panel_index below; rows padded to a multiple of 16 with
// zeros). The AVX-512 kernel keeps one accumulator register per (panel, column) and, per
// reduction index, loads one weight vector (16 rows) and broadcasts the columns' X values into it:
// no horizontal sums, and each weight is read once per block of up to 16 columns (at batch 1,
// where n_cols = T <= 16, once per call). Measured on the small recipe (Zen4): ~50 GMAC/s per core
// for fp32, fp16 and bf16 weights alike (FMA-bound once the weights stream from L3 only once).
//
// Column n is (sample b, time t) = (n / T, n % T) and lands at out[b * out_bstride + r * T + t],
// i.e. straight into the channels-first (B, C, T) activation layout (T = 1: out[n * out_bstride + r]).
// How the weights are stored: halving the bytes halves the time of a bandwidth-bound step. kI8 is
// weight-only int8 with one fp32 scale per output row (W[r, i] = scale[r] * q[r, i]): the kernel
// sums q * x in fp32 and scales each row's sum once, so the scale costs nothing per weight.
enum class WeightType { kF32, kBF16, kF16, kI8 };

constexpr int kPanel = 16;  // weight rows per panel: one AVX-512 register of fp32 (two AVX2 ones)

inline int pad_rows(int rows) { return (rows + kPanel - 1) / kPanel * kPanel; }
// Where W[r, i] of a (rows, k) matrix is stored.
inline std::size_t panel_index(int r, int i, int k) {
    return (static_cast<std::size_t>(r / kPanel) * k + i) * kPanel + r % kPanel;
}

struct DenseArgs {
    const void* w = nullptr;        // float (kF32), uint16 (kBF16: upper halves of fp32; kF16: IEEE
    WeightType wtype = WeightType::kF32;  // half) or int8 (kI8) values, in panels
    const float* scale = nullptr;   // kI8 only: one per padded row
    const float* bias = nullptr;    // rows, may be null
    int k = 0;                      // reduction length
    const float* x = nullptr;       // k x n_cols, addressed as above
    int n_cols = 0;
    int taps = 1;                   // divides k
    std::size_t x_stride = 0;       // 0: n_cols
    float* out = nullptr;
    int T = 1;
    std::size_t out_bstride = 0;
};

// Rows [r0, r1) of the product above; r0 must be a multiple of kPanel (r1 need not be: the last
// panel's extra rows are computed on the zero padding and not stored). Safe to call concurrently
// on disjoint panel-aligned row ranges; each output element is summed in the same order whatever
// the range, so results do not depend on how rows are split over threads.
void dense_rows(const DenseArgs& a, int r0, int r1);

// GroupNorm's statistics in double: sum_i x[i], and sum_i (x[i] - mean)^2.
double sum_f64(const float* x, std::size_t n);
double sum_sq_dev_f64(const float* x, std::size_t n, double mean);

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
