// The binders of `dpag_engine._C`, one per bound area; module.cpp (PYBIND11_MODULE) calls each once.
#pragma once

#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace dpag_py {

// ActionScheduler, RobotSink / RecordingSink / MailboxSink, ControlLoop, monotonic, ur5_tcp_position.
void bind_control(py::module_& m);  // bind_control.cpp
// EngineConfig, PolicyEngine, conv1d, cpu_kernel_isa.
void bind_engine(py::module_& m);   // bind_engine.cpp

}  // namespace dpag_py
