#include "cpu_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's AVX-512 headers trip -W(maybe-)uninitialized on their own _mm512_undefined_* temporaries
// once inlined (GCC bug 105593, fixed in 13); nothing in this file is affected.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DPAG_X86 1
#include <immintrin.h>
#define DPAG_AVX2 __attribute__((target("avx2,fma,f16c")))
#define DPAG_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#else
#define DPAG_X86 0
#endif

namespace dpag::cpu {
namespace {

using cpu::WeightType;

template <WeightType kW>
using WeightT = std::conditional_t<kW == WeightType::kF32, float, std::uint16_t>;

template <WeightType kW>
float widen(WeightT<kW> w) {
    if constexpr (kW == WeightType::kF32) {
        return w;
    } else if constexpr (kW == WeightType::kBF16) {
        const std::uint32_t bits = static_cast<std::uint32_t>(w) << 16;
        float f;
        std::memcpy(&f, &bits, sizeof f);
        return f;
    } else {
        return from_f16(w);
    }
}

void store(const DenseArgs& a, int r, int n, float v) {
    const int b = n / a.T, t = n % a.T;
    a.out[static_cast<std::size_t>(b) * a.out_bstride + static_cast<std::size_t>(r) * a.T + t] =
        v + (a.bias ? a.bias[r] : 0.0f);
}

// Portable fallback: the same loop order as the vector kernel (one weight row against every column).
template <WeightType kW>
void dense_scalar(const DenseArgs& a, const WeightT<kW>* w, int r0, int r1) {
    for (int r = r0; r < r1; ++r) {
        const WeightT<kW>* wr = w + static_cast<std::size_t>(r) * a.k_pad;
        for (int n = 0; n < a.n_cols; ++n) {
            const float* xn = a.x + static_cast<std::size_t>(n) * a.k_pad;
            float s = 0.0f;
            for (int k = 0; k < a.k_pad; ++k) s += widen<kW>(wr[k]) * xn[k];
            store(a, r, n, s);
        }
    }
}

#if DPAG_X86
template <WeightType kW>
DPAG_AVX2 inline __m256 load8(const WeightT<kW>* p) {
    if constexpr (kW == WeightType::kF32) {
        return _mm256_loadu_ps(p);
    } else {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        if constexpr (kW == WeightType::kBF16) {
            // bf16 is the upper half of an fp32: zero-extend to 32 bits and shift into place.
            return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        } else {
            return _mm256_cvtph_ps(h);  // F16C
        }
    }
}

DPAG_AVX2 inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Software prefetch distance ahead of each weight row stream. One core's hardware prefetchers alone
// leave DRAM bandwidth unused; 1-2 KiB ahead measured best on this machine (bench/bench_step.py).
constexpr int kPrefetchBytes = 1024;

// RB weight rows x NC columns of X: RB*NC accumulators in registers; each weight vector is loaded
// once and used NC times. (With 16 ymm registers GCC re-loads X per row; the AVX-512 path avoids it.)
template <WeightType kW, int RB, int NC>
DPAG_AVX2 void micro(const DenseArgs& a, const WeightT<kW>* w, int r, int n) {
    const int kp = a.k_pad;
    const WeightT<kW>* wr[RB];
    const float* xn[NC];
    for (int i = 0; i < RB; ++i) wr[i] = w + static_cast<std::size_t>(r + i) * kp;
    for (int j = 0; j < NC; ++j) xn[j] = a.x + static_cast<std::size_t>(n + j) * kp;
    __m256 acc[RB][NC];
    for (int i = 0; i < RB; ++i)
        for (int j = 0; j < NC; ++j) acc[i][j] = _mm256_setzero_ps();
    for (int k = 0; k < kp; k += 8) {
        __m256 xv[NC];
        for (int j = 0; j < NC; ++j) xv[j] = _mm256_loadu_ps(xn[j] + k);
        for (int i = 0; i < RB; ++i) {
            _mm_prefetch(reinterpret_cast<const char*>(wr[i] + k) + kPrefetchBytes, _MM_HINT_T0);
            const __m256 wv = load8<kW>(wr[i] + k);
            for (int j = 0; j < NC; ++j) acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < RB; ++i)
        for (int j = 0; j < NC; ++j) store(a, r + i, n + j, hsum(acc[i][j]));
}

// 4 rows x 2 columns: 4 concurrent weight streams per thread (more memory parallelism than 2 rows,
// measured ~10% faster on the lowdim recipe), 8 accumulators.
template <WeightType kW, int RB>
DPAG_AVX2 void row_block(const DenseArgs& a, const WeightT<kW>* w, int r) {
    int n = 0;
    constexpr int NC = 2;
    for (; n + NC <= a.n_cols; n += NC) micro<kW, RB, NC>(a, w, r, n);
    switch (a.n_cols - n) {
        case 3: micro<kW, RB, 3>(a, w, r, n); break;
        case 2: micro<kW, RB, 2>(a, w, r, n); break;
        case 1: micro<kW, RB, 1>(a, w, r, n); break;
        default: break;
    }
}

template <WeightType kW>
DPAG_AVX2 void dense_avx2(const DenseArgs& a, const WeightT<kW>* w, int r0, int r1) {
    int r = r0;
    for (; r + 4 <= r1; r += 4) row_block<kW, 4>(a, w, r);
    for (; r < r1; ++r) row_block<kW, 1>(a, w, r);
}

// ---- AVX-512: 32 registers hold a 4 x 4 block of accumulators plus the 4 column vectors, so each
// weight vector and each X vector is loaded once per block. With 16 registers (AVX2) the compiler
// re-loads X for every row, and the kernel is bound by load ports rather than by memory.
template <WeightType kW>
DPAG_AVX512 inline __m512 load16(const WeightT<kW>* p) {
    if constexpr (kW == WeightType::kF32) {
        return _mm512_loadu_ps(p);
    } else {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        if constexpr (kW == WeightType::kBF16) {
            return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        } else {
            return _mm512_cvtph_ps(h);
        }
    }
}

// Not _mm512_reduce_add_ps / _mm512_extractf64x4_pd: GCC 12's headers warn about an uninitialised
// temporary inside them. A shuffle brings the upper 256 bits down instead.
DPAG_AVX512 inline float hsum512(__m512 v) {
    const __m256 hi = _mm512_castps512_ps256(_mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(3, 2, 3, 2)));
    return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), hi));
}

template <WeightType kW, int RB, int NC>
DPAG_AVX512 void micro512(const DenseArgs& a, const WeightT<kW>* w, int r, int n) {
    const int kp = a.k_pad;
    const WeightT<kW>* wr[RB];
    const float* xn[NC];
    for (int i = 0; i < RB; ++i) wr[i] = w + static_cast<std::size_t>(r + i) * kp;
    for (int j = 0; j < NC; ++j) xn[j] = a.x + static_cast<std::size_t>(n + j) * kp;
    __m512 acc[RB][NC];
    for (int i = 0; i < RB; ++i)
        for (int j = 0; j < NC; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int k = 0; k < kp; k += 16) {
        __m512 xv[NC];
        for (int j = 0; j < NC; ++j) xv[j] = _mm512_loadu_ps(xn[j] + k);
        for (int i = 0; i < RB; ++i) {
            _mm_prefetch(reinterpret_cast<const char*>(wr[i] + k) + kPrefetchBytes, _MM_HINT_T0);
            const __m512 wv = load16<kW>(wr[i] + k);
            for (int j = 0; j < NC; ++j) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < RB; ++i)
        for (int j = 0; j < NC; ++j) store(a, r + i, n + j, hsum512(acc[i][j]));
}

template <WeightType kW, int RB>
DPAG_AVX512 void row_block512(const DenseArgs& a, const WeightT<kW>* w, int r) {
    int n = 0;
    for (; n + 4 <= a.n_cols; n += 4) micro512<kW, RB, 4>(a, w, r, n);
    switch (a.n_cols - n) {
        case 3: micro512<kW, RB, 3>(a, w, r, n); break;
        case 2: micro512<kW, RB, 2>(a, w, r, n); break;
        case 1: micro512<kW, RB, 1>(a, w, r, n); break;
        default: break;
    }
}

template <WeightType kW>
DPAG_AVX512 void dense_avx512(const DenseArgs& a, const WeightT<kW>* w, int r0, int r1) {
    int r = r0;
    for (; r + 4 <= r1; r += 4) row_block512<kW, 4>(a, w, r);
    for (; r < r1; ++r) row_block512<kW, 1>(a, w, r);
}

void mish_backward_scalar(const float* u, const float* dy, float* du, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) {
        const float v = u[i];
        const float e = std::exp(std::min(v, 20.0f));
        const float m = e * (e + 2.0f), m2 = m + 2.0f;
        const float g = m / m2 + v * (e / (e + 1.0f)) * ((4.0f * m + 4.0f) / (m2 * m2));
        du[i] = dy[i] * (v > 20.0f ? 1.0f : g);
    }
}

// exp for Mish: Cephes-style range reduction x = n ln2 + f, degree-6 polynomial on f (about 1-2
// ulp on the range Mish needs), then 2^n by building the exponent bits.
DPAG_AVX2 inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(f, f), _mm256_add_ps(f, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Mish(x) = x tanh(log(1 + e^x)) = x * m / (m + 2) with m = e^x (e^x + 2): one exp, no cancellation
// for negative x. Above 20 the factor is 1 in float (and m would overflow), so x passes through.
DPAG_AVX2 void mish_avx2(float* x, std::size_t n) {
    std::size_t i = 0;
    const __m256 two = _mm256_set1_ps(2.0f), big = _mm256_set1_ps(20.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256 e = exp8(v);
        const __m256 m = _mm256_mul_ps(e, _mm256_add_ps(e, two));
        const __m256 y = _mm256_mul_ps(v, _mm256_div_ps(m, _mm256_add_ps(m, two)));
        _mm256_storeu_ps(x + i, _mm256_blendv_ps(y, v, _mm256_cmp_ps(v, big, _CMP_GT_OQ)));
    }
    for (; i < n; ++i) {
        const float v = x[i];
        const float e = std::exp(v);
        const float m = e * (e + 2.0f);
        x[i] = v > 20.0f ? v : v * (m / (m + 2.0f));
    }
}

// d Mish(u)/du = t + u sigmoid(u) (1 - t^2), t = tanh(softplus(u)) = m / (m + 2); with the same
// m = e^u (e^u + 2): 1 - t^2 = (4m + 4) / (m + 2)^2 and sigmoid(u) = e^u / (1 + e^u). Above 20 it is 1.
DPAG_AVX2 void mish_backward_avx2(const float* u, const float* dy, float* du, std::size_t n) {
    std::size_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f), four = _mm256_set1_ps(4.0f),
                 big = _mm256_set1_ps(20.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(u + i);
        const __m256 e = exp8(_mm256_min_ps(v, big));
        const __m256 m = _mm256_mul_ps(e, _mm256_add_ps(e, two));
        const __m256 m2 = _mm256_add_ps(m, two);
        const __m256 t = _mm256_div_ps(m, m2);
        const __m256 sig = _mm256_div_ps(e, _mm256_add_ps(e, one));
        const __m256 one_m_t2 = _mm256_div_ps(_mm256_fmadd_ps(four, m, four), _mm256_mul_ps(m2, m2));
        __m256 g = _mm256_fmadd_ps(_mm256_mul_ps(v, sig), one_m_t2, t);
        g = _mm256_blendv_ps(g, one, _mm256_cmp_ps(v, big, _CMP_GT_OQ));
        _mm256_storeu_ps(du + i, _mm256_mul_ps(_mm256_loadu_ps(dy + i), g));
    }
    mish_backward_scalar(u + i, dy + i, du + i, n - i);
}

// DPAG_CPU_ISA=avx2|scalar caps the kernels below what the CPU has, so every path can be tested on
// one machine (tests/test_cpu_runtime.py runs in a subprocess with each).
bool isa_allowed(const char* isa) {
    const char* cap = std::getenv("DPAG_CPU_ISA");
    if (!cap) return true;
    const std::string c(cap), i(isa);
    return c == i || (c == "avx512") || (c == "avx2" && i != "avx512");
}
bool detect_avx2() {
    __builtin_cpu_init();
    return isa_allowed("avx2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}
bool detect_avx512() {
    __builtin_cpu_init();
    return isa_allowed("avx512") && detect_avx2() && __builtin_cpu_supports("avx512f");
}
const bool kAvx2 = detect_avx2();
const bool kAvx512 = detect_avx512();
#else
const bool kAvx2 = false;
const bool kAvx512 = false;
#endif

void mish_scalar(float* x, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) {
        const float v = x[i];
        const float e = std::exp(v);
        const float m = e * (e + 2.0f);
        x[i] = v > 20.0f ? v : v * (m / (m + 2.0f));
    }
}

}  // namespace

const char* kernel_isa() { return kAvx512 ? "avx512" : kAvx2 ? "avx2" : "scalar"; }

void dense_rows(const DenseArgs& a, int r0, int r1) {
#if DPAG_X86
    if (kAvx512) {
        switch (a.wtype) {
            case WeightType::kF32: return dense_avx512<WeightType::kF32>(a, a.w32, r0, r1);
            case WeightType::kBF16: return dense_avx512<WeightType::kBF16>(a, a.w16, r0, r1);
            case WeightType::kF16: return dense_avx512<WeightType::kF16>(a, a.w16, r0, r1);
        }
    }
    if (kAvx2) {
        switch (a.wtype) {
            case WeightType::kF32: return dense_avx2<WeightType::kF32>(a, a.w32, r0, r1);
            case WeightType::kBF16: return dense_avx2<WeightType::kBF16>(a, a.w16, r0, r1);
            case WeightType::kF16: return dense_avx2<WeightType::kF16>(a, a.w16, r0, r1);
        }
    }
#endif
    switch (a.wtype) {
        case WeightType::kF32: return dense_scalar<WeightType::kF32>(a, a.w32, r0, r1);
        case WeightType::kBF16: return dense_scalar<WeightType::kBF16>(a, a.w16, r0, r1);
        case WeightType::kF16: return dense_scalar<WeightType::kF16>(a, a.w16, r0, r1);
    }
}

void mish_inplace(float* x, std::size_t n) {
#if DPAG_X86
    if (kAvx2) return mish_avx2(x, n);
#endif
    mish_scalar(x, n);
}

void mish_backward(const float* u, const float* dy, float* du, std::size_t n) {
#if DPAG_X86
    if (kAvx2) return mish_backward_avx2(u, dy, du, n);
#endif
    mish_backward_scalar(u, dy, du, n);
}

std::uint16_t to_bf16(float x) {
    std::uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    if (std::isnan(x)) return static_cast<std::uint16_t>((bits >> 16) | 0x40);  // keep it a NaN
    bits += 0x7FFF + ((bits >> 16) & 1);  // round to nearest, ties to even
    return static_cast<std::uint16_t>(bits >> 16);
}

std::uint16_t to_f16(float x) {
    std::uint32_t b;
    std::memcpy(&b, &x, sizeof b);
    const std::uint32_t sign = (b >> 16) & 0x8000;
    const std::uint32_t exp = (b >> 23) & 0xFF;
    std::uint32_t man = b & 0x7FFFFF;
    if (exp == 0xFF) return static_cast<std::uint16_t>(sign | 0x7C00 | (man ? 0x200 : 0));  // inf / NaN
    const int e = static_cast<int>(exp) - 127 + 15;
    if (e >= 31) return static_cast<std::uint16_t>(sign | 0x7C00);  // overflow
    if (e <= 0) {  // subnormal half (or zero): shift the implicit-1 mantissa into place, round to even
        if (e < -10) return static_cast<std::uint16_t>(sign);
        man |= 0x800000;
        const int shift = 14 - e;
        const std::uint32_t half = man >> shift, rest = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
        return static_cast<std::uint16_t>(sign | (half + (rest > mid || (rest == mid && (half & 1)))));
    }
    const std::uint32_t half = (static_cast<std::uint32_t>(e) << 10) | (man >> 13), rest = man & 0x1FFF;
    // A carry out of the mantissa correctly bumps the exponent (up to inf).
    return static_cast<std::uint16_t>(sign | (half + (rest > 0x1000 || (rest == 0x1000 && (half & 1)))));
}

float from_f16(std::uint16_t h) {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000) << 16;
    const int exp = (h >> 10) & 0x1F;
    const std::uint32_t man = h & 0x3FF;
    float f;
    if (exp == 0) {
        f = std::ldexp(static_cast<float>(man), -24);  // zero or subnormal
    } else if (exp == 31) {
        f = man ? std::nanf("") : INFINITY;
    } else {
        const std::uint32_t bits = (static_cast<std::uint32_t>(exp - 15 + 127) << 23) | (man << 13);
        std::memcpy(&f, &bits, sizeof f);
    }
    std::uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    bits |= sign;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

}  // namespace dpag::cpu
