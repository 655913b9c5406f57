// `dpag_engine._C` bindings of the CPU policy engine (csrc/unet_runtime.h): EngineConfig (the C++
// config struct, field by field), PolicyEngine (plan, unet_forward, unet_force), the standalone
// conv1d layer and cpu_kernel_isa.
//
// Float32 C-contiguous arrays only, checked with the argument's name and expected shape
// (array_checks.h): a silent numpy conversion of an output would write into a copy the caller never sees.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "array_checks.h"
#include "bindings.h"
#include "cpu_kernels.h"
#include "roofline.h"
#include "unet_runtime.h"

namespace dpag_py {
namespace {

dpag::cpu::WeightType weight_type(const std::string& s) {
    if (s == "fp32") return dpag::cpu::WeightType::kF32;
    if (s == "bf16") return dpag::cpu::WeightType::kBF16;
    if (s == "fp16") return dpag::cpu::WeightType::kF16;
    if (s == "int8") return dpag::cpu::WeightType::kI8;
    throw py::value_error("weights: must be 'fp32', 'bf16', 'fp16' or 'int8', got '" + s + "'");
}

std::string weight_name(dpag::cpu::WeightType t) {
    static const char* names[] = {"fp32", "bf16", "fp16", "int8"};   // in the enum's order (cpu_kernels.h)
    return names[static_cast<int>(t)];
}

std::shared_ptr<dpag::PolicyEngine> make_engine(const dpag::PolicyEngineConfig& cfg, const py::dict& weights) {
    // Views into the caller's arrays; the engine copies what it keeps before returning.
    dpag::WeightMap map;
    std::vector<py::array> keep;
    for (const auto& item : weights) {
        py::array a = py::array::ensure(item.second, py::array::c_style);
        const std::string name = item.first.cast<std::string>();
        if (!a || !a.dtype().is(py::dtype::of<float>()))
            throw py::value_error("weights: " + name + " must be a float32 array");
        map[name] = dpag::TensorView{static_cast<const float*>(a.data()),
                                     std::vector<std::int64_t>(a.shape(), a.shape() + a.ndim())};
        keep.push_back(a);
    }
    py::gil_scoped_release release;  // repacking the lowdim recipe takes a moment
    try {
        return std::make_shared<dpag::PolicyEngine>(cfg, map);
    } catch (const std::invalid_argument& e) {
        py::gil_scoped_acquire acquire;
        throw py::value_error(e.what());
    }
}

void engine_plan(dpag::PolicyEngine& e, const py::array& mu, const py::array& x_init,
                 const std::optional<py::array>& step_noise, py::array x_out, const std::optional<py::array>& log_var,
                 bool guided, const std::optional<py::array>& latent_noise, const std::optional<py::array>& prefix,
                 const std::optional<py::array>& prefix_weight, const std::optional<py::array>& prefix_noise) {
    const auto& c = e.config();
    if (mu.ndim() != 3) throw py::value_error("mu: expected a 3-d array, got " + shape_of(mu));
    const py::ssize_t b = mu.shape(0);
    auto ptr = [](const std::optional<py::array>& a) { return a ? static_cast<const float*>(a->data()) : nullptr; };
    dpag::PlanArgs args;
    args.batch = static_cast<int>(b);
    expect_f32(mu, "mu", {b, c.n_obs_steps, c.cond_dim}, false);
    if (log_var) expect_f32(*log_var, "log_var", {b, c.n_obs_steps, c.cond_dim}, false);
    if (latent_noise) expect_f32(*latent_noise, "latent_noise", {e.num_steps(), c.latent_steps, b, c.n_obs_steps, c.cond_dim}, false);
    expect_f32(x_init, "x_init", {b, c.horizon, c.action_dim}, false);
    if (step_noise) expect_f32(*step_noise, "step_noise", {e.num_steps(), b, c.horizon, c.action_dim}, false);
    expect_f32(x_out, "x_out", {b, c.horizon, c.action_dim}, true);
    // Real-time chunking: prefix (B, W, Da) normalised, inpainted from row n_obs_steps - 1 on.
    if (prefix) {
        if (!prefix_weight || !prefix_noise) throw py::value_error("prefix: needs prefix_weight and prefix_noise too");
        if (prefix->ndim() != 3) throw py::value_error("prefix: expected shape (B, W, Da), got " + shape_of(*prefix));
        const py::ssize_t w = prefix->shape(1);
        expect_f32(*prefix, "prefix", {b, w, c.action_dim}, false);
        expect_f32(*prefix_weight, "prefix_weight", {w}, false);
        expect_f32(*prefix_noise, "prefix_noise", {e.num_steps(), b, w, c.action_dim}, false);
        args.inpaint = {ptr(prefix), ptr(prefix_weight), ptr(prefix_noise), c.n_obs_steps - 1, static_cast<int>(w)};
    }
    args.mu = static_cast<const float*>(mu.data());
    args.log_var = ptr(log_var);
    args.x_init = static_cast<const float*>(x_init.data());
    args.step_noise = ptr(step_noise);
    args.guided = guided;
    args.latent_noise = ptr(latent_noise);
    args.x_out = static_cast<float*>(x_out.mutable_data());
    py::gil_scoped_release release;
    try {
        e.plan(args);
    } catch (const std::invalid_argument& err) {
        py::gil_scoped_acquire acquire;
        throw py::value_error(err.what());
    }
}

// out = eps (B, H, Da) = unet(sample, timesteps[step], global_cond), or with `force` the guided
// mode's force (B, To*Do) = (d eps / d global_cond)^T eps at the same point.
void engine_unet(dpag::PolicyEngine& e, const py::array& sample, int step, const py::array& global_cond,
                 py::array out, bool force) {
    const auto& c = e.config();
    if (sample.ndim() != 3) throw py::value_error("sample: expected shape (B, H, Da), got " + shape_of(sample));
    const py::ssize_t b = sample.shape(0), g = static_cast<py::ssize_t>(c.n_obs_steps) * c.cond_dim;
    expect_f32(sample, "sample", {b, c.horizon, c.action_dim}, false);
    expect_f32(global_cond, "global_cond", {b, g}, false);
    if (force) expect_f32(out, "force", {b, g}, true);
    else expect_f32(out, "eps", {b, c.horizon, c.action_dim}, true);
    const auto* x = static_cast<const float*>(sample.data());
    const auto* cond = static_cast<const float*>(global_cond.data());
    auto* dst = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release release;
    try {
        if (force) e.unet_force(x, static_cast<int>(b), step, cond, dst);
        else e.unet_forward(x, static_cast<int>(b), step, cond, dst);
    } catch (const std::invalid_argument& err) {
        py::gil_scoped_acquire acquire;
        throw py::value_error(err.what());
    }
}

py::array_t<float> conv1d(const py::array& x, const py::array& weight, const py::array& bias, int stride,
                          int padding, bool transposed, const std::string& weights) {
    if (x.ndim() != 3 || weight.ndim() != 3) throw py::value_error("conv1d: x and weight must be 3-d");
    const int b = static_cast<int>(x.shape(0)), c_in = static_cast<int>(x.shape(1)), t_in = static_cast<int>(x.shape(2));
    const int k = static_cast<int>(weight.shape(2));
    const int c_out = static_cast<int>(transposed ? weight.shape(1) : weight.shape(0));
    expect_f32(x, "x", {b, c_in, t_in}, false);
    expect_f32(weight, "weight", transposed ? std::vector<py::ssize_t>{c_in, c_out, k} : std::vector<py::ssize_t>{c_out, c_in, k}, false);
    expect_f32(bias, "bias", {c_out}, false);
    const int t_out = transposed ? (t_in - 1) * stride - 2 * padding + k : (t_in + 2 * padding - k) / stride + 1;
    if (t_out < 1) throw py::value_error("conv1d: empty output");
    // Poisoned so a position the kernel forgets to write shows up as NaN.
    py::array_t<float> out({b, c_out, t_out});
    std::fill(out.mutable_data(), out.mutable_data() + out.size(), std::nanf(""));
    try {
        dpag::conv1d_forward(static_cast<const float*>(x.data()), b, c_in, t_in, static_cast<const float*>(weight.data()),
                             static_cast<const float*>(bias.data()), c_out, k, stride, padding, transposed,
                             weight_type(weights), out.mutable_data(), t_out);
    } catch (const std::invalid_argument& err) {
        throw py::value_error(err.what());
    }
    return out;
}

}  // namespace

void bind_engine(py::module_& m) {
    // The engine's config is the C++ struct itself, bound field by field: one schema for C++ and
    // Python (dpag_engine/runtime/cpu.py fills it from a policy).
    using Cfg = dpag::PolicyEngineConfig;
    py::class_<Cfg>(m, "EngineConfig", "csrc/unet_runtime.h PolicyEngineConfig; fill with dpag_engine.runtime.cpu.engine_config.")
        .def(py::init<>())
        .def_readwrite("action_dim", &Cfg::action_dim)
        .def_readwrite("cond_dim", &Cfg::cond_dim)
        .def_readwrite("n_obs_steps", &Cfg::n_obs_steps)
        .def_readwrite("horizon", &Cfg::horizon)
        .def_readwrite("down_dims", &Cfg::down_dims)
        .def_readwrite("kernel_size", &Cfg::kernel_size)
        .def_readwrite("diffusion_step_embed_dim", &Cfg::diffusion_step_embed_dim)
        .def_readwrite("n_groups", &Cfg::n_groups)
        .def_readwrite("timesteps", &Cfg::timesteps)
        .def_property("coefs",
            [](const Cfg& c) {
                std::vector<std::array<float, 6>> rows;
                for (const auto& r : c.coefs) rows.push_back({r.r_x, r.r_eps, r.c_x0, r.c_x, r.c_eps, r.std});
                return rows;
            },
            [](Cfg& c, const std::vector<std::array<float, 6>>& rows) {
                c.coefs.clear();
                for (const auto& r : rows) c.coefs.push_back({r[0], r[1], r[2], r[3], r[4], r[5]});
            }, "(K, 6) sampler table rows (r_x, r_eps, c_x0, c_x, c_eps, std), dpag_engine/diffusion.py")
        .def_readwrite("clip", &Cfg::clip)
        .def_readwrite("stochastic", &Cfg::stochastic)
        .def_readwrite("inpaint_coefs", &Cfg::inpaint_coefs)
        .def_readwrite("guided", &Cfg::guided)
        .def_readwrite("latent_steps", &Cfg::latent_steps)
        .def_readwrite("latent_dt", &Cfg::latent_dt)
        .def_readwrite("latent_gamma", &Cfg::latent_gamma)
        .def_readwrite("latent_eta", &Cfg::latent_eta)
        .def_readwrite("latent_normalize", &Cfg::latent_normalize)
        .def_readwrite("max_batch", &Cfg::max_batch)
        .def_property("weights",
            [](const Cfg& c) { return weight_name(c.weights); },
            [](Cfg& c, const std::string& name) { c.weights = weight_type(name); }, "'fp32', 'bf16', 'fp16' or 'int8'")
        .def_readwrite("threads", &Cfg::threads);

    py::class_<dpag::PolicyEngine, std::shared_ptr<dpag::PolicyEngine>>(
        m, "PolicyEngine",
        "The whole sampler in C++, dp or guided mode (K U-Net forwards [+ the latent update's backward] +\n"
        "DDIM/DDPM steps, from the encoded mu to the normalised chunk); see csrc/unet_runtime.h. Build it\n"
        "with dpag_engine.runtime.cpu.CpuRuntime.")
        .def(py::init(&make_engine), py::arg("config"), py::arg("weights"),
             "config: EngineConfig; weights: the U-Net state_dict as float32 numpy arrays.")
        .def("plan", &engine_plan, py::arg("mu"), py::arg("x_init"), py::arg("step_noise"), py::arg("x_out"),
             py::kw_only(), py::arg("log_var") = py::none(), py::arg("guided") = false,
             py::arg("latent_noise") = py::none(),
             py::arg("prefix") = py::none(), py::arg("prefix_weight") = py::none(), py::arg("prefix_noise") = py::none(),
             "One plan into x_out (B, H, Da), normalised: mu (B, To, Do) the encoded observation, initial noise\n"
             "(B, H, Da), per-step noise (K, B, H, Da) or None (deterministic samplers).\n"
             "guided: the latent update at every step (log_var (B, To, Do); latent_noise (K, S, B, To, Do)\n"
             "when the latent eta > 0). Releases the GIL; allocates nothing.\n"
             "Real-time chunking: prefix (B, W, Da) normalised committed actions for horizon rows from\n"
             "n_obs_steps - 1 on, prefix_weight (W,), prefix_noise (K, B, W, Da); see dpag_engine/rtc.py.")
        .def("unet_forward", [](dpag::PolicyEngine& e, const py::array& sample, int step, const py::array& cond,
                                py::array eps) { engine_unet(e, sample, step, cond, eps, false); },
             py::arg("sample"), py::arg("step"), py::arg("global_cond"), py::arg("eps"),
             "eps (B, H, Da) = unet(sample, timesteps[step], global_cond) with an encoded global_cond (mu).")
        .def("unet_force", [](dpag::PolicyEngine& e, const py::array& sample, int step, const py::array& cond,
                              py::array force) { engine_unet(e, sample, step, cond, force, true); },
             py::arg("sample"), py::arg("step"), py::arg("global_cond"), py::arg("force"),
             "force (B, G) = (d eps / d global_cond)^T eps, one forward + one activation-only backward (guided engines).")
        .def_property_readonly("guided", [](const dpag::PolicyEngine& e) { return e.config().guided; })
        .def_property_readonly("num_steps", &dpag::PolicyEngine::num_steps)
        .def_property_readonly("num_params", &dpag::PolicyEngine::num_params)
        .def_property_readonly("weight_bytes_per_step", &dpag::PolicyEngine::weight_bytes_per_step,
                               "Convolution weight bytes one U-Net forward streams (FiLM halves excluded: precomputed).")
        .def_property_readonly("max_batch", [](const dpag::PolicyEngine& e) { return e.config().max_batch; })
        .def_property_readonly("weights", [](const dpag::PolicyEngine& e) { return weight_name(e.config().weights); })
        .def_property_readonly("threads", [](const dpag::PolicyEngine& e) { return e.config().threads; });

    m.def("conv1d", &conv1d, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("stride") = 1,
          py::arg("padding") = 0, py::arg("transposed") = false, py::arg("weights") = "fp32",
          "One Conv1d / ConvTranspose1d through the engine's im2col + dense kernel (for layer tests).");
    m.def("cpu_kernel_isa", &dpag::cpu::kernel_isa, "Which engine kernels run on this CPU: 'avx512', 'avx2' or 'scalar'.");
    m.def("cpu_read_bandwidth_gbs", [](std::size_t bytes_per_thread, int threads, double seconds) {
              py::gil_scoped_release release;
              return dpag::cpu::read_bandwidth_gbs(bytes_per_thread, threads, seconds);
          }, py::arg("bytes_per_thread"), py::arg("threads"), py::arg("seconds") = 0.2,
          "GB/s of `threads` threads each re-reading its own buffer of that size (the level it fits in).");
    m.def("cpu_fma_peak_gmacs", [](int threads, double seconds) {
              py::gil_scoped_release release;
              return dpag::cpu::fma_peak_gmacs(threads, seconds);
          }, py::arg("threads"), py::arg("seconds") = 0.2,
          "fp32 multiply-accumulates per second (G) of `threads` threads on the dense kernel's ISA.");
}

}  // namespace dpag_py
