#include "roofline.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cpu_kernels.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DPAG_X86 1
#include <immintrin.h>
#define DPAG_AVX2 __attribute__((target("avx2,fma")))
#define DPAG_AVX512 __attribute__((target("avx512f,avx2,fma")))
#else
#define DPAG_X86 0
#endif

namespace dpag::cpu {
namespace {

using Clock = std::chrono::steady_clock;

// Runs body(tid, ready, go) on `threads` threads; each calls wait_for_go once it is set up, and all
// are released together. Returns the seconds from the release to the last thread's end.
template <typename Body>
double run_together(int threads, Body body) {
    if (threads < 1 || threads > 1024) throw std::invalid_argument("threads: must be in [1, 1024]");
    std::atomic<int> ready{0};
    std::atomic<bool> go{false};
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { body(t, ready, go); });
    while (ready.load() < threads) std::this_thread::yield();
    const Clock::time_point start = Clock::now();
    go.store(true);
    for (auto& th : pool) th.join();
    return std::chrono::duration<double>(Clock::now() - start).count();
}

void wait_for_go(std::atomic<int>& ready, std::atomic<bool>& go) {
    ready.fetch_add(1);
    while (!go.load()) std::this_thread::yield();
}

// Sums a buffer with several independent accumulators (so the adds never wait on each other); the
// sum is returned so the compiler cannot drop the loads.
float sum_scalar(const float* x, std::size_t n) {
    float acc[8] = {};
    for (std::size_t i = 0; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; ++j) acc[j] += x[i + j];
    return acc[0] + acc[1] + acc[2] + acc[3] + acc[4] + acc[5] + acc[6] + acc[7];
}

#if DPAG_X86
constexpr int kPrefetchBytes = 1024;  // the dense kernel's distance (cpu_kernels.cpp)

// Software prefetch (as the dense kernel) helps streams from DRAM and costs issue slots on ones that
// hit in cache: each level is measured both ways and the faster counts.
template <bool kPrefetch>
DPAG_AVX2 float sum_avx2(const float* x, std::size_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (std::size_t i = 0; i + 32 <= n; i += 32) {
        if constexpr (kPrefetch)
            for (int line = 0; line < 2; ++line)
                _mm_prefetch(reinterpret_cast<const char*>(x + i) + kPrefetchBytes + 64 * line, _MM_HINT_T0);
        a0 = _mm256_add_ps(a0, _mm256_load_ps(x + i));
        a1 = _mm256_add_ps(a1, _mm256_load_ps(x + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_load_ps(x + i + 16));
        a3 = _mm256_add_ps(a3, _mm256_load_ps(x + i + 24));
    }
    alignas(32) float l[8];
    _mm256_store_ps(l, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    return l[0] + l[1] + l[2] + l[3] + l[4] + l[5] + l[6] + l[7];
}

template <bool kPrefetch>
DPAG_AVX512 float sum_avx512(const float* x, std::size_t n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (std::size_t i = 0; i + 64 <= n; i += 64) {
        if constexpr (kPrefetch)
            for (int line = 0; line < 4; ++line)
                _mm_prefetch(reinterpret_cast<const char*>(x + i) + kPrefetchBytes + 64 * line, _MM_HINT_T0);
        a0 = _mm512_add_ps(a0, _mm512_load_ps(x + i));
        a1 = _mm512_add_ps(a1, _mm512_load_ps(x + i + 16));
        a2 = _mm512_add_ps(a2, _mm512_load_ps(x + i + 32));
        a3 = _mm512_add_ps(a3, _mm512_load_ps(x + i + 48));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

// kChains independent FMA chains of one register each: FMA latency (4-5 cycles) x 2 FMA pipes needs
// at least 10 in flight; 12 leaves slack and, with the two constants, fits AVX2's 16 registers.
constexpr int kChains = 12;
constexpr long kFmaIters = 1 << 16;

DPAG_AVX512 double fma_avx512(Clock::time_point deadline) {
    __m512 acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(1.0f + c * 1e-3f);
    const __m512 m = _mm512_set1_ps(0.999999f), a = _mm512_set1_ps(1e-7f);
    double macs = 0;
    do {
        for (long i = 0; i < kFmaIters; ++i)
            for (int c = 0; c < kChains; ++c) acc[c] = _mm512_fmadd_ps(acc[c], m, a);
        macs += 16.0 * kChains * kFmaIters;
    } while (Clock::now() < deadline);
    __m512 s = acc[0];
    for (int c = 1; c < kChains; ++c) s = _mm512_add_ps(s, acc[c]);
    volatile float sink = _mm512_reduce_add_ps(s);
    (void)sink;
    return macs;
}

DPAG_AVX2 double fma_avx2(Clock::time_point deadline) {
    __m256 acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = _mm256_set1_ps(1.0f + c * 1e-3f);
    const __m256 m = _mm256_set1_ps(0.999999f), a = _mm256_set1_ps(1e-7f);
    double macs = 0;
    do {
        for (long i = 0; i < kFmaIters; ++i)
            for (int c = 0; c < kChains; ++c) acc[c] = _mm256_fmadd_ps(acc[c], m, a);
        macs += 8.0 * kChains * kFmaIters;
    } while (Clock::now() < deadline);
    __m256 s = acc[0];
    for (int c = 1; c < kChains; ++c) s = _mm256_add_ps(s, acc[c]);
    alignas(32) float l[8];
    _mm256_store_ps(l, s);
    volatile float sink = l[0];
    (void)sink;
    return macs;
}
#endif

double fma_scalar(Clock::time_point deadline) {
    float acc[8];
    for (int c = 0; c < 8; ++c) acc[c] = 1.0f + c * 1e-3f;
    double macs = 0;
    do {
        for (long i = 0; i < (1 << 16); ++i)
            for (int c = 0; c < 8; ++c) acc[c] = acc[c] * 0.999999f + 1e-7f;
        macs += 8.0 * (1 << 16);
    } while (Clock::now() < deadline);
    volatile float sink = acc[0] + acc[7];
    (void)sink;
    return macs;
}

void check_seconds(double seconds) {
    if (!(seconds > 0.0 && seconds <= 60.0)) throw std::invalid_argument("seconds: must be in (0, 60]");
}

// GB/s of `threads` threads each summing its own buffer with `sum`, repeatedly.
double read_gbs_with(float (*sum)(const float*, std::size_t), std::size_t bytes_per_thread, int threads, double seconds) {
    const std::size_t n = bytes_per_thread / 256 * 64;  // floats, a multiple of 64 (one AVX-512 unroll)
    if (n == 0) throw std::invalid_argument("bytes_per_thread: at least 256");
    std::vector<double> bytes(threads, 0.0);
    std::atomic<bool> failed{false};
    const double elapsed = run_together(threads, [&](int t, std::atomic<int>& ready, std::atomic<bool>& go) {
        // As the engine's weight arena (unet_layers.h): 2 MiB aligned, transparent huge pages advised,
        // so the hardware prefetchers are not stopped at every 4 KiB page.
        constexpr std::size_t kAlign = 2u << 20;
        const std::size_t alloc = (n * sizeof(float) + kAlign - 1) / kAlign * kAlign;
        float* x = static_cast<float*>(std::aligned_alloc(kAlign, alloc));
#ifdef __linux__
        if (x) madvise(x, alloc, MADV_HUGEPAGE);
#endif
        if (!x) {
            failed.store(true);
            wait_for_go(ready, go);
            return;
        }
        for (std::size_t i = 0; i < n; ++i) x[i] = 1.0f;  // first touch on this thread
        volatile float keep = sum(x, n);  // warm: the first pass pulls the buffer into the level it fits
        wait_for_go(ready, go);
        const Clock::time_point deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
        double done = 0;
        do {
            keep = keep + sum(x, n);  // volatile: the loads cannot be dropped
            done += static_cast<double>(n) * sizeof(float);
        } while (Clock::now() < deadline);
        bytes[t] = done;
        std::free(x);
    });
    if (failed.load()) throw std::bad_alloc();
    double total = 0;
    for (double b : bytes) total += b;
    return total / elapsed / 1e9;
}

}  // namespace

double read_bandwidth_gbs(std::size_t bytes_per_thread, int threads, double seconds) {
    check_seconds(seconds);
    const std::string isa = kernel_isa();
#if DPAG_X86
    if (isa == "avx512")
        return std::max(read_gbs_with(sum_avx512<false>, bytes_per_thread, threads, seconds),
                        read_gbs_with(sum_avx512<true>, bytes_per_thread, threads, seconds));
    if (isa == "avx2")
        return std::max(read_gbs_with(sum_avx2<false>, bytes_per_thread, threads, seconds),
                        read_gbs_with(sum_avx2<true>, bytes_per_thread, threads, seconds));
#endif
    return read_gbs_with(sum_scalar, bytes_per_thread, threads, seconds);
}

double fma_peak_gmacs(int threads, double seconds) {
    check_seconds(seconds);
    const std::string isa = kernel_isa();
    std::vector<double> macs(threads, 0.0);
    const double elapsed = run_together(threads, [&](int t, std::atomic<int>& ready, std::atomic<bool>& go) {
        wait_for_go(ready, go);
        const Clock::time_point deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
#if DPAG_X86
        if (isa == "avx512") { macs[t] = fma_avx512(deadline); return; }
        if (isa == "avx2") { macs[t] = fma_avx2(deadline); return; }
#endif
        macs[t] = fma_scalar(deadline);
    });
    double total = 0;
    for (double m : macs) total += m;
    return total / elapsed / 1e9;
}

}  // namespace dpag::cpu
