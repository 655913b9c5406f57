// The CPU policy engine: the whole K-step DDIM/DDPM sampler of a DP-AG / Diffusion Policy
// (dpag_engine/policy.py DPAGPolicy.denoise, "dp" and "guided" modes) in one call, no Python inside.
// It only denoises: the caller (dpag_engine/planner.py) checks and encodes the observation, draws
// every random number and un-normalises the result, as for every other runtime.
//
//   mu (B, To, Do) [and log_var for guided mode], encoded by the caller
//   x = x_init (B, H, Da); for k < K:
//       z = mu                                          (dp mode), or in guided mode (docs/method.md §5)
//       z = mu; S times: g = (d eps / d z)^T eps at (x, t_k, z); z += gamma dt sigma n(g) + eta sqrt(dt) sigma xi
//       eps = unet(x, t_k, z); x = sampler_step(x, eps, coefs[k], noise_k)
//   x_out = x (normalised)
//
// Guided mode needs the force g: an activation-only backward of the U-Net w.r.t. its global
// condition. z reaches the U-Net only through the FiLM sites, so the backward runs the body in
// reverse (every conv as its transposed product, GroupNorm+Mish from a tape of the forward) down to
// the first FiLM site, collects d(scale, bias) at every site, and maps them back through the FiLM
// Linears and the leading Mish. The transposed conv weights are a second packed copy (built only
// when the config asks for guided mode), so the backward streams the weights once, like a forward.
//
// Real-time chunking (dpag_engine/rtc.py): with an InpaintArgs, after every step k the rows
// [start, start + W) of x become w_j * (sa_k * prefix + s1ma_k * prefix_noise_k) + (1 - w_j) * x, with
// (sa_k, s1ma_k) = inpaint_coefs[k] the level step k landed on; in place, nothing allocated.
//
// Design (docs/method.md §3; targets in bench/RESULTS.md):
// - Every convolution (k=5/3 same padding, the stride-2 down conv, the ConvTranspose1d up conv, the
//   1x1 residual and output convs) is an im2col into a small (B*T, C_in*k) matrix followed by one
//   weight-streaming product (cpu_kernels.h): at batch 1 the U-Net is weight-bandwidth bound, so
//   each weight is read exactly once per denoising step, split by output rows across the threads.
// - FiLM: Linear(Mish(cat(t_emb, g))) = W_t Mish(t_emb) + b  +  W_g Mish(g). The first half is a
//   constant of the model and schedule, precomputed for every step at construction (K x 2C per
//   site, with the whole timestep MLP); the second is computed once per plan. A denoising step only
//   adds the two: no FiLM weights are read inside the K loop.
// - All buffers are sized for max_batch at construction; plan() does not allocate.
// - Optional 16-bit convolution weights (bf16 or IEEE fp16, widened to fp32 in the kernel) halve
//   the bytes each step streams; activations, accumulation, biases, norms and FiLM stay fp32.
//   fp16 keeps 3 more mantissa bits than bf16 (8x smaller rounding error) at the same cost.
//
// The implementation is split by job over several files; unet_impl.h (the private Impl) lists them.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "cpu_kernels.h"
#include "sampler_step.h"

namespace dpag {

// A borrowed float32 tensor (C-contiguous), as found in a torch state_dict.
struct TensorView {
    const float* data = nullptr;
    std::vector<std::int64_t> shape;
};
// Keys are the names of ConditionalUnet1D.state_dict() (e.g. "down_modules.0.0.blocks.0.0.weight").
using WeightMap = std::unordered_map<std::string, TensorView>;

struct PolicyEngineConfig {
    // U-Net (dpag_engine/config.py UNetConfig) and policy shapes.
    int action_dim = 0;              // Da
    int cond_dim = 0;                // Do, the per-step feature size; global_cond_dim = To * Do.
    int n_obs_steps = 0;             // To
    int horizon = 0;                 // H
    std::vector<int> down_dims;
    int kernel_size = 5;
    int diffusion_step_embed_dim = 256;
    int n_groups = 8;
    // Sampler: training timesteps visited and the (K, 6) affine step table (dpag_engine/diffusion.py).
    std::vector<std::int64_t> timesteps;
    std::vector<StepCoefs> coefs;
    std::optional<float> clip;
    bool stochastic = false;         // DDPM or DDIM eta > 0: plan() then needs per-step noise
    // (sqrt(a_prev), sqrt(1 - a_prev)) per step (dpag_engine.diffusion.inpaint_coefficients); only
    // needed by plan() with an InpaintArgs. Empty: the engine cannot inpaint.
    std::vector<std::array<float, 2>> inpaint_coefs;
    // Guided mode (docs/method.md §5): build the backward (transposed conv weights, a tape of the
    // forward); the latent update's parameters.
    bool guided = false;
    int latent_steps = 1;
    float latent_dt = 1.0f, latent_gamma = 1.0f, latent_eta = 0.0f;
    bool latent_normalize = true;
    // Engine.
    int max_batch = 1;
    cpu::WeightType weights = cpu::WeightType::kF32;
    int threads = 2;
};

// The committed prefix of a real-time-chunking plan (all borrowed, float32, C-contiguous).
struct InpaintArgs {
    const float* prefix = nullptr;   // (B, W, Da) normalised (and clipped) committed actions
    const float* weights = nullptr;  // (W,) in [0, 1]: 1 = hard inpainting
    const float* noise = nullptr;    // (K, B, W, Da) per-step noise of the forward-noised prefix
    int start = 0;                   // first inpainted horizon row (n_obs_steps - 1: first executed action)
    int width = 0;                   // W; 0 = no inpainting
};

// One plan's inputs and output (all borrowed, float32, C-contiguous).
struct PlanArgs {
    int batch = 1;
    const float* mu = nullptr;           // (B, To, Do) the encoded observation
    const float* log_var = nullptr;      // (B, To, Do), needed in guided mode
    const float* x_init = nullptr;       // (B, H, Da) initial noise
    const float* step_noise = nullptr;   // (K, B, H, Da) when cfg.stochastic
    bool guided = false;
    const float* latent_noise = nullptr; // (K, S, B, To, Do) Brownian draws, guided with latent_eta > 0
    InpaintArgs inpaint;                 // width 0: no real-time chunking
    float* x_out = nullptr;              // (B, H, Da) the sampled chunk, normalised
};

class PolicyEngine {
public:
    // Copies (and repacks) every weight; the views may be freed afterwards. Throws
    // std::invalid_argument naming the first missing or mis-shaped tensor.
    PolicyEngine(const PolicyEngineConfig& cfg, const WeightMap& weights);
    ~PolicyEngine();
    PolicyEngine(const PolicyEngine&) = delete;
    PolicyEngine& operator=(const PolicyEngine&) = delete;

    // One plan (see PlanArgs). Throws std::invalid_argument for B outside [1, max_batch], a missing
    // or non-finite input, guided mode on an engine built without it, or an inpainting prefix
    // outside the horizon. Allocates nothing. Concurrent calls on one engine are serialised (one
    // set of buffers); use one engine per planning thread.
    void plan(const PlanArgs& args);

    // eps = unet(sample, timesteps[step], global_cond) for sample (B, H, Da) and global_cond
    // (B, To*Do) already encoded (i.e. mu); eps (B, H, Da). For tests against the torch U-Net.
    void unet_forward(const float* sample, int batch, int step, const float* global_cond, float* eps);
    // force (B, To*Do) = (d eps / d global_cond)^T eps at the same point: one forward with a tape,
    // one activation-only backward. Needs cfg.guided. For tests against torch.autograd.
    void unet_force(const float* sample, int batch, int step, const float* global_cond, float* force);

    const PolicyEngineConfig& config() const { return cfg_; }
    int num_steps() const { return static_cast<int>(cfg_.timesteps.size()); }
    std::size_t weight_bytes_per_step() const;  // conv weights streamed by one U-Net forward (or backward)
    std::size_t num_params() const;             // U-Net parameters as imported

    struct Impl;

private:
    PolicyEngineConfig cfg_;
    std::unique_ptr<Impl> impl_;
};

// One standalone (transposed) Conv1d through the engine's im2col + dense kernel, for layer tests:
// x (B, C_in, T_in); weight (C_out, C_in, k), or (C_in, C_out, k) when transposed; out (B, C_out, T_out).
// Returns T_out.
int conv1d_forward(const float* x, int batch, int c_in, int t_in, const float* weight, const float* bias,
                   int c_out, int k, int stride, int padding, bool transposed, cpu::WeightType wtype, float* out,
                   int t_out_capacity);

}  // namespace dpag
