// Private to the engine: PolicyEngine::Impl, the U-Net (its blocks, packed weights, FiLM halves and
// every buffer) and the member functions the engine's translation units define:
//   unet_weights.cpp    construction: checks and repacks the state_dict, precomputes FiLM time halves
//   unet_forward.cpp    the U-Net forward (optionally recording a tape for the backward)
//   unet_backward.cpp   the activation-only backward down to the FiLM sites, and through their Linears
//   latent_update.cpp   guided mode's latent update: the force at z, one Euler-Maruyama step
//   policy_engine.cpp   the public PolicyEngine (unet_runtime.h): argument checks and the plan loop
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "unet_layers.h"
#include "unet_runtime.h"
#include "worker_pool.h"

namespace dpag {
namespace unet {

struct ConvBlock {
    Conv conv;
    Norm norm;
    NormTape tape;  // guided mode: filled by a recording forward
};

struct ResBlock {
    ConvBlock b0, b1;
    bool has_res = false;
    Conv res;
    int c_in = 0, c_out = 0;
    std::vector<float> film_t;  // (K, 2*c_out): W_t Mish(t_emb_k) + bias, per sampler step
    Dense film_g;               // (2*c_out, G): the global-condition half of the FiLM Linear
    std::vector<float> film_g_out;  // (max_batch, 2*c_out), once per plan (per latent in guided mode)
    // Guided mode: the first conv block's output before FiLM (the tape), and d(loss)/d(scale, bias).
    std::vector<float> y0, dfilm;
};

}  // namespace unet

struct PolicyEngine::Impl {
    using Conv = unet::Conv;
    using ConvBlock = unet::ConvBlock;
    using Dense = unet::Dense;
    using ResBlock = unet::ResBlock;
    using Src = unet::Src;

    const PolicyEngineConfig& cfg;
    WorkerPool pool;
    // plan() and unet_forward() share the buffers: two Python threads (the GIL is released) calling
    // one engine take turns instead of corrupting each other.
    std::mutex busy;
    int K, G, H, Da, levels;
    std::size_t n_params = 0;

    std::vector<ResBlock> down_res;   // 2 per level
    std::vector<Conv> down_sample;    // levels - 1
    std::vector<ResBlock> mid_res;    // 2
    std::vector<ResBlock> up_res;     // 2 per up level
    std::vector<Conv> up_sample;      // levels - 1
    ConvBlock final_block;
    Conv final_out;
    unet::WeightArena arena;

    // Buffers, all sized for max_batch at construction.
    std::size_t max_col = 0, max_act = 0;
    std::vector<float> col, act_a, act_b, act_x, h, r;
    std::vector<float> gcol;  // (G, B): Mish(global cond), the X of every FiLM site's condition half
    std::vector<std::vector<float>> skips;
    std::vector<float> eps_cf, eps, x, prev, x0;
    // Guided mode: the backward's buffers and the latent (z, force, log_var), all (B, G) but dcol.
    bool recording = false;  // forward() fills the tapes
    std::vector<float> dcol, grad_a, grad_b, grad_c, grad_h, grad_y, z, force;
    std::vector<std::vector<float>> dskips;

    // ---- construction (unet_weights.cpp) ----
    Impl(const PolicyEngineConfig& c, const WeightMap& weights);
    // The tensor `name`, checked against `shape`; counts its parameters.
    const float* get(const WeightMap& w, const std::string& name, std::vector<std::int64_t> shape);
    Conv conv(const WeightMap& w, const std::string& p, int c_in, int c_out, int k, int stride, int pad,
              bool transposed, int t_in);
    ConvBlock conv_block(const WeightMap& w, const std::string& p, int c_in, int c_out, int t_in);
    ResBlock res_block(const WeightMap& w, const std::string& p, int c_in, int c_out, int t,
                       const std::vector<float>& mish_temb);
    // out (n, d.rows) = in (n, d.k) @ W^T + bias; construction time only (allocates).
    std::vector<float> linear(const Dense& d, const std::vector<float>& in, int n);
    // Mish(MLP(sinusoidal(t_k))) for the K sampler timesteps: (K, dsed), the input of every FiLM time half.
    std::vector<float> timestep_features(const WeightMap& w);
    // Every convolution, in the order a forward runs them.
    std::vector<Conv*> all_convs();

    // ---- forward (unet_forward.cpp) ----
    // out = d applied to the X col (k, n_cols), on the pool when the layer is big enough; taps and
    // x_stride as in cpu::DenseArgs (a stride-1 conv read straight from its padded input rows).
    // With a norm, each thread then applies GroupNorm+Mish (cfg.n_groups groups) to the rows it
    // computed (out is then (batch, d.rows, T)), so the pool also shares the normalisation.
    void dense(const Dense& d, const float* col, int n_cols, float* out, int T, std::size_t bstride,
               int taps = 1, std::size_t x_stride = 0, const unet::Norm* norm = nullptr,
               unet::NormTape* tape = nullptr);
    // out (B, c_out, T_out) channels-first; returns T_out. With a norm, GroupNorm+Mish follows.
    int run_conv(const Conv& c, const Src& s, int batch, int t_in, float* out, const unet::Norm* norm = nullptr,
                 unet::NormTape* tape = nullptr);
    void run_conv_block(ConvBlock& b, const Src& s, int batch, int T, float* out);
    void run_res_block(ResBlock& rb, const Src& in, int batch, int T, int step, float* out);
    // global_cond (B, G) normalised -> every site's observation half of FiLM.
    void set_global_cond(const float* g, int batch);
    // eps (B, H, Da) = unet(sample (B, H, Da), timesteps[step], the global cond last set).
    void forward(const float* sample, int batch, int step, float* eps_out);

    // ---- backward, guided mode (unet_backward.cpp): d(0.5 ||eps||^2) / d(global cond) ----
    // din (B, c_in, t_in) = (or +=) d/d(input) of conv c for dout (B, c_out, t_out), channels-first:
    // d(col) = d(out) W (the transposed weights, streamed once), then col2im.
    void conv_backward(const Conv& c, const float* dout, int batch, int t_in, float* din, bool accumulate);
    // d(input) of a conv block (conv -> GroupNorm -> Mish) from d(output); scratch in grad_y.
    void conv_block_backward(const ConvBlock& b, const float* dout, int batch, int T, float* din);
    // Fills rb.dfilm = d(loss)/d(scale, bias) and, unless din is null (the first block, whose input
    // is the noisy sample: no path to z), din = d(loss)/d(block input). Scratch in grad_h, grad_y.
    void res_block_backward(ResBlock& rb, const float* dout, int batch, int T, int step, float* din);
    // After a recording forward that returned eps (B, H, Da): every site's dfilm for the cotangent eps.
    void backward(const float* eps_in, int batch, int step);
    // force (B, G) = d(0.5 ||eps||^2)/d z from every site's dfilm: back through each FiLM Linear's
    // condition half, then the Mish in front of it (z was the input of set_global_cond).
    void force_from_film(const float* z_in, int batch, float* out);

    // ---- latent update, guided mode (latent_update.cpp) ----
    // force (B, G) at latent z (B, G) for the sample x: a recording forward, then the backward.
    void compute_force(const float* sample, int batch, int step, const float* z_in, float* out);
    // One Euler-Maruyama step of the latent (ops.torch_ref.em_step), in place on z (B, To, Do):
    // z += gamma dt sigma n(g) + eta sqrt(dt) sigma xi, sigma = exp(log_var / 2), n() = unit L2 over Do.
    void latent_step(float* zz, const float* g, const float* lv, const float* xi, int batch);
};

}  // namespace dpag
