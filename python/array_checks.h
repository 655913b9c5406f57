// The numpy checks the `dpag_engine._C` bindings share: the C++ core reads raw float32 buffers, so
// every array is checked for dtype, C-contiguity, size or shape, writeability and aliasing, and a
// failure names the argument. numpy would otherwise convert silently (a copy for outputs means
// results that never reach the caller).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

namespace py = pybind11;

namespace dpag_py {

// A float32 C-contiguous array of `size` elements (as many as the sampler's sample).
inline void check_buffer(const py::array& a, const char* name, py::ssize_t size, bool writeable) {
    if (!a.dtype().is(py::dtype::of<float>())) {
        throw py::value_error(std::string(name) + ": expected dtype float32, got " +
                              std::string(py::str(a.dtype())));
    }
    if (!(a.flags() & py::array::c_style)) {
        throw py::value_error(std::string(name) + ": expected a C-contiguous array");
    }
    if (a.size() != size) {
        throw py::value_error(std::string(name) + ": expected " + std::to_string(size) +
                              " elements (as many as sample), got " + std::to_string(a.size()));
    }
    if (writeable && !a.writeable()) {
        throw py::value_error(std::string(name) + ": output array is read-only");
    }
}

// Whether the two arrays' bytes overlap.
inline bool overlaps(const py::array& a, const py::array& b) {
    const auto a0 = reinterpret_cast<std::uintptr_t>(a.data());
    const auto b0 = reinterpret_cast<std::uintptr_t>(b.data());
    return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

// "(2, 3)", "(4,)": a shape as Python prints it.
inline std::string shape_of(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

// A float32 C-contiguous array of exactly `shape` (and writeable, for an output).
inline void expect_f32(const py::array& a, const char* name, const std::vector<py::ssize_t>& shape, bool writeable) {
    if (!a.dtype().is(py::dtype::of<float>()))
        throw py::value_error(std::string(name) + ": expected dtype float32, got " + std::string(py::str(a.dtype())));
    if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + ": expected a C-contiguous array");
    bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
    for (std::size_t i = 0; ok && i < shape.size(); ++i) ok = a.shape(i) == shape[i];
    if (!ok) {
        std::string want = "(";
        for (std::size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
        throw py::value_error(std::string(name) + ": expected shape " + want + (shape.size() == 1 ? ",)" : ")") +
                              ", got " + shape_of(a));
    }
    if (writeable && !a.writeable()) throw py::value_error(std::string(name) + ": output array is read-only");
}

}  // namespace dpag_py
