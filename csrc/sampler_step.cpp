#include "sampler_step.h"

namespace dpag {
namespace {

// The clip and noise choices are template parameters, not branches in the loop, so each of the four
// variants is one straight-line loop the compiler turns into SIMD code.
//
// The arithmetic is spelled in the reference's order (every product rounded, sums left to right) and
// the build disables FMA contraction, so results match torch_ref bit for bit on any target.
template <bool kClip, bool kNoise>
void step_loop(const float* __restrict x, const float* __restrict eps,
               const float* __restrict noise, std::size_t n, StepCoefs c, float lo, float hi,
               float* __restrict prev, float* __restrict x0) {
    for (std::size_t i = 0; i < n; ++i) {
        float v = c.r_x * x[i] - c.r_eps * eps[i];
        if constexpr (kClip) {
            // Written so a NaN passes through, as in torch.clamp.
            v = v < lo ? lo : v;
            v = v > hi ? hi : v;
        }
        float p = c.c_x0 * v + c.c_x * x[i] + c.c_eps * eps[i];
        if constexpr (kNoise) {
            p = p + c.std * noise[i];
        }
        x0[i] = v;
        prev[i] = p;
    }
}

}  // namespace

void sampler_step(const float* x, const float* eps, const float* noise, std::size_t n,
                  const StepCoefs& c, std::optional<float> clip, float* prev, float* x0) {
    const float hi = clip.value_or(0.0f);
    const float lo = -hi;
    if (clip && noise) {
        step_loop<true, true>(x, eps, noise, n, c, lo, hi, prev, x0);
    } else if (clip) {
        step_loop<true, false>(x, eps, noise, n, c, lo, hi, prev, x0);
    } else if (noise) {
        step_loop<false, true>(x, eps, noise, n, c, lo, hi, prev, x0);
    } else {
        step_loop<false, false>(x, eps, noise, n, c, lo, hi, prev, x0);
    }
}

}  // namespace dpag
