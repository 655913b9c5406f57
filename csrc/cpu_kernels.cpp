#include "cpu_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

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
using WeightT = std::conditional_t<kW == WeightType::kF32, float,
                                   std::conditional_t<kW == WeightType::kI8, std::int8_t, std::uint16_t>>;

template <WeightType kW>
float widen(WeightT<kW> w) {
    if constexpr (kW == WeightType::kF32 || kW == WeightType::kI8) {
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

std::size_t x_stride(const DenseArgs& a) { return a.x_stride ? a.x_stride : static_cast<std::size_t>(a.n_cols); }
const float* x_row(const DenseArgs& a, int i) { return a.x + (i / a.taps) * x_stride(a) + i % a.taps; }

// Writes one panel's results: res[c * 16 + j] is row r + j of column n0 + c (before the int8 scale
// and the bias), for the rows below r1.
void store_panel(const DenseArgs& a, const float* res, int r, int r1, int n0, int nc) {
    const int nr = std::min(kPanel, r1 - r);
    for (int c = 0; c < nc; ++c) {
        const int n = n0 + c, b = n / a.T, t = n % a.T;
        float* o = a.out + static_cast<std::size_t>(b) * a.out_bstride + static_cast<std::size_t>(r) * a.T + t;
        for (int j = 0; j < nr; ++j) {
            const float sum = res[c * kPanel + j];
            o[static_cast<std::size_t>(j) * a.T] = (a.scale ? sum * a.scale[r + j] : sum) + (a.bias ? a.bias[r + j] : 0.0f);
        }
    }
}

// Portable fallback: the same order of summation as the vector kernels (each output summed over i
// in order, one accumulator), so every ISA gives the same bits up to FMA rounding.
template <WeightType kW>
void dense_scalar(const DenseArgs& a, const WeightT<kW>* w, int r0, int r1) {
    float res[kPanel * kPanel];
    for (int r = r0; r < r1; r += kPanel) {
        const WeightT<kW>* wp = w + static_cast<std::size_t>(r / kPanel) * a.k * kPanel;
        for (int n0 = 0; n0 < a.n_cols; n0 += kPanel) {
            const int nc = std::min(kPanel, a.n_cols - n0);
            std::fill(res, res + kPanel * kPanel, 0.0f);
            for (int i = 0; i < a.k; ++i) {
                const float* xr = x_row(a, i) + n0;
                const WeightT<kW>* wr = wp + static_cast<std::size_t>(i) * kPanel;
                for (int c = 0; c < nc; ++c)
                    for (int j = 0; j < kPanel; ++j) res[c * kPanel + j] += widen<kW>(wr[j]) * xr[c];
            }
            store_panel(a, res, r, r1, n0, nc);
        }
    }
}

#if DPAG_X86
template <WeightType kW>
DPAG_AVX2 inline __m256 load8(const WeightT<kW>* p) {
    if constexpr (kW == WeightType::kF32) {
        return _mm256_loadu_ps(p);
    } else if constexpr (kW == WeightType::kI8) {
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
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

// Software prefetch distance ahead of each weight panel stream (a panel is one contiguous stream).
constexpr int kPrefetchBytes = 1024;

// ---- AVX2: one panel (two ymm of 8 rows) x NC <= 4 columns: 8 accumulators, per reduction index
// two weight loads and NC broadcasts.
template <WeightType kW, int NC>
DPAG_AVX2 void micro_avx2(const DenseArgs& a, const WeightT<kW>* wp, int r, int r1, int n0) {
    __m256 acc[2][NC];
    for (int h = 0; h < 2; ++h)
        for (int c = 0; c < NC; ++c) acc[h][c] = _mm256_setzero_ps();
    const std::size_t xs = x_stride(a);
    for (int ci = 0; ci < a.k / a.taps; ++ci)
    for (const float *xr = a.x + ci * xs + n0, *xe = xr + a.taps; xr < xe; ++xr, wp += kPanel) {
        _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetchBytes, _MM_HINT_T0);
        const __m256 w0 = load8<kW>(wp), w1 = load8<kW>(wp + 8);
        for (int c = 0; c < NC; ++c) {
            const __m256 xb = _mm256_broadcast_ss(xr + c);
            acc[0][c] = _mm256_fmadd_ps(w0, xb, acc[0][c]);
            acc[1][c] = _mm256_fmadd_ps(w1, xb, acc[1][c]);
        }
    }
    alignas(32) float res[kPanel * NC];
    for (int c = 0; c < NC; ++c) {
        _mm256_store_ps(res + c * kPanel, acc[0][c]);
        _mm256_store_ps(res + c * kPanel + 8, acc[1][c]);
    }
    store_panel(a, res, r, r1, n0, NC);
}

template <WeightType kW>
DPAG_AVX2 void dense_avx2(const DenseArgs& a, const WeightT<kW>* w, int r0, int r1) {
    for (int r = r0; r < r1; r += kPanel) {
        const WeightT<kW>* wp = w + static_cast<std::size_t>(r / kPanel) * a.k * kPanel;
        int n = 0;
        for (; n + 4 <= a.n_cols; n += 4) micro_avx2<kW, 4>(a, wp, r, r1, n);
        switch (a.n_cols - n) {
            case 3: micro_avx2<kW, 3>(a, wp, r, r1, n); break;
            case 2: micro_avx2<kW, 2>(a, wp, r, r1, n); break;
            case 1: micro_avx2<kW, 1>(a, wp, r, r1, n); break;
            default: break;
        }
    }
}

// ---- AVX-512: P panels (16 rows each) x NC columns, P * NC <= 16 accumulators. Per reduction
// index: P weight-vector loads, NC broadcasts, P * NC FMAs. P = 4 / 2 / 1 for NC <= 4 / 8 / 16, so
// there are always enough independent accumulators to hide the FMA latency.
template <WeightType kW>
DPAG_AVX512 inline __m512 load16(const WeightT<kW>* p) {
    if constexpr (kW == WeightType::kF32) {
        return _mm512_loadu_ps(p);
    } else if constexpr (kW == WeightType::kI8) {
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    } else {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        if constexpr (kW == WeightType::kBF16) {
            return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        } else {
            return _mm512_cvtph_ps(h);
        }
    }
}

template <WeightType kW, int P, int NC>
DPAG_AVX512 void micro512(const DenseArgs& a, const WeightT<kW>* w, int r, int r1, int n0) {
    const std::size_t pstride = static_cast<std::size_t>(a.k) * kPanel;
    const WeightT<kW>* wp = w + static_cast<std::size_t>(r / kPanel) * pstride;
    __m512 acc[P][NC];
    for (int p = 0; p < P; ++p)
        for (int c = 0; c < NC; ++c) acc[p][c] = _mm512_setzero_ps();
    const std::size_t xs = x_stride(a);
    for (int ci = 0; ci < a.k / a.taps; ++ci)
    for (const float *xr = a.x + ci * xs + n0, *xe = xr + a.taps; xr < xe; ++xr, wp += kPanel) {
        if constexpr (P == 1) {
            _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetchBytes, _MM_HINT_T0);
            const __m512 wv = load16<kW>(wp);
            for (int c = 0; c < NC; ++c) acc[0][c] = _mm512_fmadd_ps(wv, _mm512_set1_ps(xr[c]), acc[0][c]);
        } else {
            __m512 xb[NC];
            for (int c = 0; c < NC; ++c) xb[c] = _mm512_set1_ps(xr[c]);
            for (int p = 0; p < P; ++p) {
                _mm_prefetch(reinterpret_cast<const char*>(wp + p * pstride) + kPrefetchBytes, _MM_HINT_T0);
                const __m512 wv = load16<kW>(wp + p * pstride);
                for (int c = 0; c < NC; ++c) acc[p][c] = _mm512_fmadd_ps(wv, xb[c], acc[p][c]);
            }
        }
    }
    for (int p = 0; p < P; ++p) {
        const int rp = r + p * kPanel;
        if (a.T == 1 && rp + kPanel <= r1) {  // columns are contiguous rows of out: vector stores
            const __m512 bv = a.bias ? _mm512_loadu_ps(a.bias + rp) : _mm512_setzero_ps();
            const __m512 sv = a.scale ? _mm512_loadu_ps(a.scale + rp) : _mm512_set1_ps(1.0f);
            for (int c = 0; c < NC; ++c)
                _mm512_storeu_ps(a.out + static_cast<std::size_t>(n0 + c) * a.out_bstride + rp,
                                 _mm512_add_ps(_mm512_mul_ps(acc[p][c], sv), bv));
        } else {
            alignas(64) float res[kPanel * NC];
            for (int c = 0; c < NC; ++c) _mm512_store_ps(res + c * kPanel, acc[p][c]);
            store_panel(a, res, rp, r1, n0, NC);
        }
    }
}

// The panel count per call for NC columns (P * NC <= 16), and the dispatch over NC = 1..16.
constexpr int panels_for(int nc) { return nc <= 4 ? 4 : nc <= 8 ? 2 : 1; }

template <WeightType kW, int NC>
DPAG_AVX512 void column_block512(const DenseArgs& a, const WeightT<kW>* w, int r, int r1, int n0, int np) {
    if constexpr (panels_for(NC) == 4) {
        if (np >= 4) return micro512<kW, 4, NC>(a, w, r, r1, n0);
    }
    if constexpr (panels_for(NC) >= 2) {
        if (np >= 2) return micro512<kW, 2, NC>(a, w, r, r1, n0);
    }
    micro512<kW, 1, NC>(a, w, r, r1, n0);
}

template <WeightType kW, int... NC>
DPAG_AVX512 void column_block512(const DenseArgs& a, const WeightT<kW>* w, int r, int r1, int n0, int np, int nc,
                                 std::integer_sequence<int, NC...>) {
    ((nc == NC + 1 ? column_block512<kW, NC + 1>(a, w, r, r1, n0, np) : void()), ...);
}

template <WeightType kW>
DPAG_AVX512 void dense_avx512(const DenseArgs& a, const WeightT<kW>* w, int r0, int r1) {
    // Column blocks of at most 16; at batch 1 (n_cols = T <= 16) there is one.
    const int n_blocks = (a.n_cols + kPanel - 1) / kPanel;
    const int nc = (a.n_cols + n_blocks - 1) / n_blocks;  // balanced: 17 columns -> 9 + 8, not 16 + 1
    const int step = panels_for(nc);
    for (int r = r0; r < r1;) {
        const int np = std::min(step, (r1 - r + kPanel - 1) / kPanel);
        const int used = np >= 4 && step == 4 ? 4 : np >= 2 && step >= 2 ? 2 : 1;
        for (int n0 = 0; n0 < a.n_cols; n0 += nc)
            column_block512<kW>(a, w, r, r1, n0, np, std::min(nc, a.n_cols - n0), std::make_integer_sequence<int, kPanel>{});
        r += used * kPanel;
    }
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
// ulp on the range Mish needs), then 2^n by building the exponent bits. The polynomial's
// coefficients (Horner order, highest first), shared by the 8- and 16-lane versions:
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
constexpr int kExpPolyLen = sizeof(kExpPoly) / sizeof(kExpPoly[0]);

DPAG_AVX2 inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
    __m256 p = _mm256_set1_ps(kExpPoly[0]);
    for (int c = 1; c < kExpPolyLen; ++c) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpPoly[c]));
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

// ---- AVX-512 Mish and GroupNorm statistics (the same formulas as the AVX2 ones, 16 lanes).
DPAG_AVX512 inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
    __m512 p = _mm512_set1_ps(kExpPoly[0]);
    for (int c = 1; c < kExpPolyLen; ++c) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExpPoly[c]));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

DPAG_AVX512 void mish_avx512(float* x, std::size_t n) {
    std::size_t i = 0;
    const __m512 two = _mm512_set1_ps(2.0f), big = _mm512_set1_ps(20.0f);
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        const __m512 e = exp16(v);
        const __m512 m = _mm512_mul_ps(e, _mm512_add_ps(e, two));
        const __m512 y = _mm512_mul_ps(v, _mm512_div_ps(m, _mm512_add_ps(m, two)));
        _mm512_storeu_ps(x + i, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, big, _CMP_GT_OQ), y, v));
    }
    mish_avx2(x + i, n - i);
}

// Two 8-lane double accumulators, summed lane by lane at the end, then the tail.
DPAG_AVX512 double finish512(__m512d a0, __m512d a1) {
    alignas(64) double l[8];
    _mm512_store_pd(l, _mm512_add_pd(a0, a1));
    double s = 0.0;
    for (double v : l) s += v;
    return s;
}
DPAG_AVX512 double sum_avx512(const float* x, std::size_t n) {
    __m512d a0 = _mm512_setzero_pd(), a1 = a0;
    std::size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm512_add_pd(a0, _mm512_cvtps_pd(_mm256_loadu_ps(x + i)));
        a1 = _mm512_add_pd(a1, _mm512_cvtps_pd(_mm256_loadu_ps(x + i + 8)));
    }
    double s = finish512(a0, a1);
    for (; i < n; ++i) s += x[i];
    return s;
}
DPAG_AVX512 double sum_sq_dev_avx512(const float* x, std::size_t n, double mean) {
    const __m512d m = _mm512_set1_pd(mean);
    __m512d a0 = _mm512_setzero_pd(), a1 = a0;
    std::size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512d d0 = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + i)), m);
        const __m512d d1 = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + i + 8)), m);
        a0 = _mm512_add_pd(a0, _mm512_mul_pd(d0, d0));
        a1 = _mm512_add_pd(a1, _mm512_mul_pd(d1, d1));
    }
    double s = finish512(a0, a1);
    for (; i < n; ++i) s += (x[i] - mean) * (x[i] - mean);
    return s;
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

namespace {
// Runs Kernel<kW> with the weights cast to their stored type.
template <template <WeightType> class Kernel>
void dispatch(const DenseArgs& a, int r0, int r1) {
    switch (a.wtype) {
        case WeightType::kF32: return Kernel<WeightType::kF32>::run(a, static_cast<const float*>(a.w), r0, r1);
        case WeightType::kBF16: return Kernel<WeightType::kBF16>::run(a, static_cast<const std::uint16_t*>(a.w), r0, r1);
        case WeightType::kF16: return Kernel<WeightType::kF16>::run(a, static_cast<const std::uint16_t*>(a.w), r0, r1);
        case WeightType::kI8: return Kernel<WeightType::kI8>::run(a, static_cast<const std::int8_t*>(a.w), r0, r1);
    }
}
template <WeightType kW> struct Scalar { static void run(const DenseArgs& a, const WeightT<kW>* w, int r0, int r1) { dense_scalar<kW>(a, w, r0, r1); } };
#if DPAG_X86
template <WeightType kW> struct Avx2 { static void run(const DenseArgs& a, const WeightT<kW>* w, int r0, int r1) { dense_avx2<kW>(a, w, r0, r1); } };
template <WeightType kW> struct Avx512 { static void run(const DenseArgs& a, const WeightT<kW>* w, int r0, int r1) { dense_avx512<kW>(a, w, r0, r1); } };
#endif
}  // namespace

void dense_rows(const DenseArgs& a, int r0, int r1) {
#if DPAG_X86
    if (kAvx512) return dispatch<Avx512>(a, r0, r1);
    if (kAvx2) return dispatch<Avx2>(a, r0, r1);
#endif
    dispatch<Scalar>(a, r0, r1);
}

double sum_f64(const float* x, std::size_t n) {
#if DPAG_X86
    if (kAvx512) return sum_avx512(x, n);
#endif
    double acc[8] = {};  // 8 independent chains: no add-latency wait per element
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; ++j) acc[j] += x[i + j];
    double s = 0.0;
    for (double a : acc) s += a;
    for (; i < n; ++i) s += x[i];
    return s;
}

double sum_sq_dev_f64(const float* x, std::size_t n, double mean) {
#if DPAG_X86
    if (kAvx512) return sum_sq_dev_avx512(x, n, mean);
#endif
    double acc[8] = {};
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; ++j) acc[j] += (x[i + j] - mean) * (x[i + j] - mean);
    double s = 0.0;
    for (double a : acc) s += a;
    for (; i < n; ++i) s += (x[i] - mean) * (x[i] - mean);
    return s;
}

void mish_inplace(float* x, std::size_t n) {
#if DPAG_X86
    if (kAvx512) return mish_avx512(x, n);
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
