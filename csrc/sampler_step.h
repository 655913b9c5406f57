// One DDPM/DDIM sampler step over flat float32 buffers (see dpag_engine/diffusion.py):
//
//   x0   = r_x * x - r_eps * eps,  then clamp(x0, -clip, clip) when clipping
//   prev = c_x0 * x0 + c_x * x + c_eps * eps + std * noise   (noise term only when noise is given)
//
// Plain C++17, no torch or Python, so the same core serves the Python extension and any native
// runtime (control loop, policy server) without tying them to one torch ABI.
#pragma once

#include <cstddef>
#include <optional>

namespace dpag {

// One row of the (K, 6) coefficient table, in the table's column order.
struct StepCoefs {
    float r_x;
    float r_eps;
    float c_x0;
    float c_x;
    float c_eps;
    float std;
};

// Writes prev[i] and x0[i] for i < n. `noise` may be null (deterministic step); `clip` empty means
// no clamp. Outputs must not overlap the inputs or each other: the loop is written for vectorising.
void sampler_step(const float* x, const float* eps, const float* noise, std::size_t n,
                  const StepCoefs& c, std::optional<float> clip, float* prev, float* x0);

}  // namespace dpag
