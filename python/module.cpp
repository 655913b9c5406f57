// The `dpag_engine._C` module: numpy front door to the C++ core in csrc/.
//
// It takes numpy arrays rather than torch tensors so the binary has no link to libtorch: one build
// works with whatever torch the machine has. dpag_engine/ops/cpp.py hands it zero-copy views of
// CPU tensors. This file holds PYBIND11_MODULE (module doc, version and build info), the sampler
// step; each other area has its binder (bindings.h): bind_control.cpp, bind_engine.cpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <optional>
#include <string>

#include "array_checks.h"
#include "bindings.h"
#include "sampler_step.h"

namespace py = pybind11;

namespace {

using dpag_py::check_buffer;
using dpag_py::overlaps;

void sampler_step(const py::array& sample, const py::array& eps, const std::array<float, 6>& coefs,
                  const std::optional<py::array>& noise, std::optional<float> clip,
                  py::array prev, py::array x0) {
    const py::ssize_t n = sample.size();
    check_buffer(sample, "sample", n, false);
    check_buffer(eps, "eps", n, false);
    if (noise) check_buffer(*noise, "noise", n, false);
    check_buffer(prev, "prev", n, true);
    check_buffer(x0, "x0", n, true);
    // The core's pointers are restrict-qualified: an output sharing memory with any other argument
    // would be undefined behaviour, so refuse it here instead.
    struct Named { const py::array* array; const char* name; };
    const Named args[] = {{&sample, "sample"}, {&eps, "eps"}, {noise ? &*noise : nullptr, "noise"},
                          {&prev, "prev"}, {&x0, "x0"}};
    for (const Named& out : {args[3], args[4]}) {
        for (const Named& other : args) {
            if (other.array && other.array != out.array && overlaps(*out.array, *other.array)) {
                throw py::value_error(std::string(out.name) + ": must not share memory with " + other.name);
            }
        }
    }
    if (clip && !(*clip >= 0.0f)) {
        throw py::value_error("clip: must be >= 0 (or None for no clamp), got " + std::to_string(*clip));
    }

    const dpag::StepCoefs c{coefs[0], coefs[1], coefs[2], coefs[3], coefs[4], coefs[5]};
    const auto* x_ptr = static_cast<const float*>(sample.data());
    const auto* eps_ptr = static_cast<const float*>(eps.data());
    const float* noise_ptr = noise ? static_cast<const float*>(noise->data()) : nullptr;
    auto* prev_ptr = static_cast<float*>(prev.mutable_data());
    auto* x0_ptr = static_cast<float*>(x0.mutable_data());

    // The loop touches only raw buffers the caller keeps alive, so other Python threads may run.
    py::gil_scoped_release release;
    dpag::sampler_step(x_ptr, eps_ptr, noise_ptr, static_cast<std::size_t>(n), c, clip, prev_ptr,
                       x0_ptr);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() =
        "dpag_engine's C++ CPU runtime (csrc/), bound over numpy float32 arrays.\n\n"
        "Use it through dpag_engine.ops with the 'cpp' backend; the functions here take raw "
        "buffers and preallocated outputs.";

    m.def("sampler_step", &sampler_step, py::arg("sample"), py::arg("eps"), py::arg("coefs"),
          py::arg("noise"), py::arg("clip"), py::arg("prev"), py::arg("x0"),
          "One DDPM/DDIM step (dpag_engine/diffusion.py) into preallocated outputs.\n\n"
          "sample, eps, noise (or None), prev and x0 are C-contiguous float32 arrays with the same\n"
          "number of elements; coefs is one (r_x, r_eps, c_x0, c_x, c_eps, std) table row; clip is\n"
          "the clamp bound for x0, or None for no clamp. Writes prev and x0; returns None.");

    dpag_py::bind_control(m);
    dpag_py::bind_engine(m);

    m.attr("__version__") = DPAG_VERSION;
    py::dict info;
    info["compiler"] = DPAG_COMPILER;
    info["build_type"] = DPAG_BUILD_TYPE;
    info["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." +
                       std::to_string(PYBIND11_VERSION_MINOR) + "." +
                       std::to_string(PYBIND11_VERSION_PATCH);
    m.attr("build_info") = info;
}
