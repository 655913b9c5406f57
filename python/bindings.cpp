// The `dpag_engine._C` module: numpy front door to the C++ core in csrc/.
//
// It takes numpy arrays rather than torch tensors so the binary has no link to libtorch: one build
// works with whatever torch the machine has. dpag_engine/ops/cpp.py hands it zero-copy views of
// CPU tensors.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "action_scheduler.h"
#include "control_loop.h"
#include "robot_bridge.h"
#include "sampler_step.h"
#include "unet_runtime.h"
#include "cpu_kernels.h"

namespace py = pybind11;

namespace {

// Checks what the C++ loop assumes and names the offending argument when it does not hold: numpy
// would otherwise convert silently (a copy for outputs means results that never reach the caller).
void check_buffer(const py::array& a, const char* name, py::ssize_t size, bool writeable) {
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

bool overlaps(const py::array& a, const py::array& b) {
    const auto a0 = reinterpret_cast<std::uintptr_t>(a.data());
    const auto b0 = reinterpret_cast<std::uintptr_t>(b.data());
    return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

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

// ---- Control loop and action scheduling ----
//
// Inputs arrive as any numeric array and are converted to float64 (forcecast): they are small, and
// the C++ side keeps its own copy. Outputs are fresh numpy arrays.

using F64 = py::array_t<double, py::array::c_style | py::array::forcecast>;

std::vector<double> joint_vector(const F64& a, std::size_t dof, const char* name) {
    if (a.ndim() != 1 || static_cast<std::size_t>(a.shape(0)) != dof) {
        throw py::value_error(std::string(name) + ": expected shape (" + std::to_string(dof) +
                              ",), got " + std::string(py::str(py::tuple(py::cast(std::vector<py::ssize_t>(
                                  a.shape(), a.shape() + a.ndim()))))));
    }
    return {a.data(), a.data() + dof};
}

py::array_t<double> to_numpy(const std::vector<double>& v) {
    return py::array_t<double>(static_cast<py::ssize_t>(v.size()), v.data());
}

// A scheduler being ticked by a running loop must not be ticked or reset from Python as well.
struct Exclusive {
    dpag::ActionScheduler& s;
    explicit Exclusive(dpag::ActionScheduler& sched) : s(sched) {
        if (!s.try_attach()) throw std::runtime_error("the scheduler is driven by a running ControlLoop");
    }
    ~Exclusive() { s.detach(); }
};

std::shared_ptr<dpag::ActionScheduler> make_scheduler(std::size_t dof, const F64& q_min, const F64& q_max,
                                                      const F64& v_max, const F64& a_max,
                                                      double blend_window) {
    if (dof == 0) throw py::value_error("dof: must be > 0");
    dpag::JointLimits l{joint_vector(q_min, dof, "q_min"), joint_vector(q_max, dof, "q_max"),
                        joint_vector(v_max, dof, "v_max"), joint_vector(a_max, dof, "a_max")};
    if (const std::string err = dpag::validate_limits(l, dof); !err.empty()) throw py::value_error(err);
    if (!(blend_window > 0.0) || !std::isfinite(blend_window)) {
        throw py::value_error("blend_window: must be a finite number of seconds > 0");
    }
    return std::make_shared<dpag::ActionScheduler>(dof, std::move(l), blend_window);
}

dpag::SubmitResult submit(dpag::ActionScheduler& s, const F64& actions, double t_obs, double dt,
                          std::optional<double> now) {
    const std::size_t dof = s.dof();
    if (actions.ndim() != 2 || static_cast<std::size_t>(actions.shape(1)) != dof || actions.shape(0) == 0) {
        std::string shape = "(";
        for (py::ssize_t i = 0; i < actions.ndim(); ++i) shape += (i ? ", " : "") + std::to_string(actions.shape(i));
        throw py::value_error("actions: expected shape (N, " + std::to_string(dof) + ") with N >= 1, got " +
                              shape + (actions.ndim() == 1 ? ",)" : ")"));
    }
    const double t_now = now ? *now : static_cast<double>(dpag::monotonic_ns()) * 1e-9;
    const double* data = actions.data();
    const auto n = static_cast<std::size_t>(actions.shape(0));
    dpag::SubmitResult r;
    {
        // Validation, copying and the tangent computation need no Python objects.
        py::gil_scoped_release release;
        r = s.submit(data, n, t_obs, dt, t_now);
    }
    // Bad input is the caller's bug; a chunk that arrived too late is a runtime condition.
    if (r.invalid) throw py::value_error("chunk rejected (the executing one is kept): " + r.reason);
    return r;
}

py::tuple tick(dpag::ActionScheduler& s, double t, const std::optional<F64>& q_measured) {
    Exclusive guard(s);
    std::vector<double> q(s.dof()), v(s.dof());
    if (q_measured) {
        q = joint_vector(*q_measured, s.dof(), "q_measured");
    } else if (!s.initialised()) {
        throw py::value_error("q_measured: required on the first tick unless reset(q) was called");
    }
    s.tick(t, q.data(), q.data(), v.data());
    return py::make_tuple(to_numpy(q), to_numpy(v));
}

py::dict scheduler_stats(const dpag::ActionScheduler& s) {
    const dpag::SchedulerStats st = s.stats();
    static const char* modes[] = {"idle", "tracking", "holding"};
    py::dict d;
    d["ticks"] = st.ticks;
    d["chunks_submitted"] = st.chunks_submitted;
    d["chunks_rejected"] = st.chunks_rejected;
    d["chunks_adopted"] = st.chunks_adopted;
    d["chunks_superseded"] = st.chunks_superseded;
    d["actions_dropped_stale"] = st.actions_dropped_stale;
    d["holds"] = st.holds;
    d["position_limited"] = st.position_limited;
    d["velocity_limited"] = st.velocity_limited;
    d["acceleration_limited"] = st.acceleration_limited;
    d["mode"] = modes[static_cast<int>(st.mode)];
    return d;
}

py::dict loop_stats(const dpag::ControlLoop& l) {
    const dpag::LoopStats st = l.stats();
    py::dict d;
    d["rate_hz"] = l.config().rate_hz;
    d["cycles"] = st.cycles;
    d["late_cycles"] = st.late_cycles;
    d["period_error_p50_us"] = st.period_error_p50_us;
    d["period_error_p99_us"] = st.period_error_p99_us;
    d["period_error_max_us"] = st.period_error_max_us;
    d["wake_latency_p50_us"] = st.wake_latency_p50_us;
    d["wake_latency_p99_us"] = st.wake_latency_p99_us;
    d["wake_latency_max_us"] = st.wake_latency_max_us;
    d["rt_requested"] = st.rt_requested;
    d["rt_granted"] = st.rt_granted;
    d["rt_message"] = st.rt_message;
    d["fault"] = st.fault;
    return d;
}

py::array_t<std::uint64_t> histogram(const dpag::LatencyHistogram& h) {
    const std::vector<std::uint64_t> c = h.counts();
    return py::array_t<std::uint64_t>(static_cast<py::ssize_t>(c.size()), c.data());
}

template <typename T>
py::array_t<T> copy_out(const T* data, std::size_t rows, std::size_t cols = 0) {
    if (cols == 0) return py::array_t<T>(static_cast<py::ssize_t>(rows), data);
    return py::array_t<T>({static_cast<py::ssize_t>(rows), static_cast<py::ssize_t>(cols)}, data);
}

py::dict records(const dpag::RecordingSink& s) {
    const std::size_t n = s.size();  // complete records only, even while a loop runs
    py::dict d;
    d["cycle"] = copy_out(s.cycles(), n);
    d["deadline_ns"] = copy_out(s.deadlines_ns(), n);
    d["wake_ns"] = copy_out(s.wakes_ns(), n);
    d["q"] = copy_out(s.q(), n, s.dof());
    d["v"] = copy_out(s.v(), n, s.dof());
    return d;
}

void bind_control(py::module_& m) {
    m.def("monotonic", [] { return static_cast<double>(dpag::monotonic_ns()) * 1e-9; },
          "Seconds on CLOCK_MONOTONIC: the loop's time base (the same clock as time.monotonic()).");

    py::class_<dpag::SubmitResult>(m, "SubmitResult")
        .def_readonly("accepted", &dpag::SubmitResult::accepted)
        .def_readonly("kept", &dpag::SubmitResult::kept)
        .def_readonly("dropped", &dpag::SubmitResult::dropped)
        .def_readonly("reason", &dpag::SubmitResult::reason)
        .def("__repr__", [](const dpag::SubmitResult& r) {
            return "SubmitResult(accepted=" + std::string(r.accepted ? "True" : "False") +
                   ", kept=" + std::to_string(r.kept) + ", dropped=" + std::to_string(r.dropped) +
                   (r.reason.empty() ? "" : ", reason='" + r.reason + "'") + ")";
        });

    py::class_<dpag::ActionScheduler, std::shared_ptr<dpag::ActionScheduler>>(
        m, "ActionScheduler",
        "Turns action chunks from an asynchronous planner into one limited joint command per loop\n"
        "cycle: latency-compensated, C1-interpolated, blended at chunk switches, held when plans\n"
        "stop. See csrc/action_scheduler.h.")
        .def(py::init(&make_scheduler), py::arg("dof"), py::arg("q_min"), py::arg("q_max"),
             py::arg("v_max"), py::arg("a_max"), py::arg("blend_window") = 0.1)
        .def("submit", &submit, py::arg("actions"), py::arg("t_obs"), py::arg("dt"),
             py::arg("now") = py::none(),
             "Schedules an (N, dof) chunk: action i is due at t_obs + i*dt (monotonic seconds).\n"
             "Actions already before `now` (default: the clock) are dropped; a chunk with none left\n"
             "returns accepted=False. NaN/inf values, dt <= 0 or a wrong shape raise ValueError, and\n"
             "the executing chunk is kept either way. Releases the GIL.")
        .def("reset", [](dpag::ActionScheduler& s, const F64& q) {
                 Exclusive guard(s);
                 const std::vector<double> v = joint_vector(q, s.dof(), "q");
                 s.reset(v.data());
             }, py::arg("q"), "Commanded state := rest at q; forgets all chunks. Not while a loop runs.")
        .def("tick", &tick, py::arg("t"), py::arg("q_measured") = py::none(),
             "One cycle at time t without a loop (offline use and tests): returns (q, v) commanded.")
        .def("commanded", [](const dpag::ActionScheduler& s) -> py::object {
                 std::vector<double> q, v;
                 if (!s.commanded(q, v)) return py::none();
                 return py::make_tuple(to_numpy(q), to_numpy(v));
             }, "The last (q, v) command, or None before the first; safe while a loop runs.")
        .def_property_readonly("dof", &dpag::ActionScheduler::dof)
        .def_property_readonly("blend_window", &dpag::ActionScheduler::blend_window)
        .def_property_readonly("limits", [](const dpag::ActionScheduler& s) {
            const dpag::JointLimits& l = s.limits();
            py::dict d;
            d["q_min"] = to_numpy(l.q_min);
            d["q_max"] = to_numpy(l.q_max);
            d["v_max"] = to_numpy(l.v_max);
            d["a_max"] = to_numpy(l.a_max);
            return d;
        })
        .def_property_readonly("stats", &scheduler_stats);

    py::class_<dpag::RobotSink, std::shared_ptr<dpag::RobotSink>>(
        m, "RobotSink", "A C++ arm interface the loop drives (RecordingSink, MailboxSink).");

    py::class_<dpag::RecordingSink, dpag::RobotSink, std::shared_ptr<dpag::RecordingSink>>(
        m, "RecordingSink",
        "In-process arm that follows every command exactly and records each cycle (up to capacity).")
        .def(py::init([](std::size_t dof, std::size_t capacity, const F64& q_initial) {
                 if (dof == 0) throw py::value_error("dof: must be > 0");
                 return std::make_shared<dpag::RecordingSink>(dof, capacity,
                                                              joint_vector(q_initial, dof, "q_initial"));
             }), py::arg("dof"), py::arg("capacity"), py::arg("q_initial"))
        .def("records", &records,
             "dict of numpy arrays, one row per recorded cycle: cycle (slot index), deadline_ns,\n"
             "wake_ns (int64, CLOCK_MONOTONIC), q and v (float64, (n, dof)).")
        .def("clear", &dpag::RecordingSink::clear)
        .def_property_readonly("dof", &dpag::RecordingSink::dof)
        .def_property_readonly("capacity", &dpag::RecordingSink::capacity)
        .def_property_readonly("size", &dpag::RecordingSink::size)
        .def_property_readonly("overflow", &dpag::RecordingSink::overflow)
        .def_property_readonly("fault", &dpag::RecordingSink::fault);

    py::class_<dpag::MailboxSink, dpag::RobotSink, std::shared_ptr<dpag::MailboxSink>>(
        m, "MailboxSink",
        "The sink for an arm driven from another thread (ur_rtde's Python client): the loop posts\n"
        "each command into a one-slot mailbox and reads the newest posted state, never waiting on\n"
        "that thread. The loop-side checks (finite commands, TCP inside the workspace box, state\n"
        "fresher than state_timeout) stop the loop with a fault. See csrc/robot_bridge.h.")
        .def(py::init([](std::size_t dof, const F64& q_initial, double state_timeout,
                         std::optional<std::pair<std::array<double, 3>, std::array<double, 3>>> box) {
                 if (dof == 0) throw py::value_error("dof: must be > 0");
                 dpag::WorkspaceBox b;
                 if (box) b = {box->first, box->second};
                 try {
                     return std::make_shared<dpag::MailboxSink>(dof, joint_vector(q_initial, dof, "q_initial"),
                                                                state_timeout, box.has_value(), b);
                 } catch (const std::invalid_argument& e) {
                     throw py::value_error(e.what());
                 }
             }), py::arg("dof"), py::arg("q_initial"), py::arg("state_timeout"),
             py::arg("workspace_box") = py::none(),
             "workspace_box: ((x_lo, y_lo, z_lo), (x_hi, y_hi, z_hi)) in m for a UR5, or None.")
        .def("wait_command", [](dpag::MailboxSink& s, double timeout) -> py::object {
                 dpag::MailboxCommand c;
                 bool got;
                 {
                     py::gil_scoped_release release;
                     got = s.wait_command(timeout, c);
                 }
                 if (!got) return py::none();
                 return py::make_tuple(c.seq, c.cycle, c.t_ns, c.wake_ns, to_numpy(c.q), to_numpy(c.v));
             }, py::arg("timeout"),
             "Blocks (GIL released) up to `timeout` s for a command newer than the last taken:\n"
             "(seq, cycle, t_ns, wake_ns, q, v), or None on timeout or once faulted (see .fault).")
        .def("post_state", [](dpag::MailboxSink& s, const F64& q) {
                 const std::vector<double> v = joint_vector(q, s.dof(), "q");
                 s.post_state(v.data());
             }, py::arg("q"), "The arm's measured joint positions, stamped now.")
        .def("post_fault", &dpag::MailboxSink::post_fault, py::arg("what"),
             "Stops the loop at its next cycle with this reason (the first fault wins).")
        .def("reset", [](dpag::MailboxSink& s, const F64& q) {
                 const std::vector<double> v = joint_vector(q, s.dof(), "q");
                 s.reset(v.data());
             }, py::arg("q"), "Clears the fault and restarts the state clock at q (between runs).")
        .def_property_readonly("fault", &dpag::MailboxSink::fault)
        .def_property_readonly("faulted", &dpag::MailboxSink::faulted)
        .def_property_readonly("dof", &dpag::MailboxSink::dof)
        .def_property_readonly("state_timeout", &dpag::MailboxSink::state_timeout_s)
        .def_property_readonly("stats", [](const dpag::MailboxSink& s) {
            const dpag::MailboxStats st = s.stats();
            py::dict d;
            d["posted"] = st.posted;
            d["taken"] = st.taken;
            d["overwritten"] = st.overwritten;
            d["state_updates"] = st.state_updates;
            return d;
        });

    m.def("ur5_tcp_position", [](const F64& q) {
              const std::vector<double> v = joint_vector(q, 6, "q");
              const std::array<double, 3> p = dpag::ur5_tcp_position(v.data());
              return py::make_tuple(p[0], p[1], p[2]);
          }, py::arg("q"), "UR5 tool-centre position (m) by the DH chain the MailboxSink's box check uses.");

    py::class_<dpag::ControlLoop, std::shared_ptr<dpag::ControlLoop>>(
        m, "ControlLoop",
        "Fixed-rate loop on its own thread (absolute deadlines, optional SCHED_FIFO) that ticks a\n"
        "scheduler and drives a C++ RobotSink every cycle. It never takes the GIL.")
        .def(py::init([](std::shared_ptr<dpag::RobotSink> sink,
                         std::shared_ptr<dpag::ActionScheduler> scheduler, double rate_hz,
                         bool rt_priority, int rt_priority_level, double spin_us) {
                 try {
                     return std::make_shared<dpag::ControlLoop>(
                         std::move(sink), std::move(scheduler),
                         dpag::LoopConfig{rate_hz, rt_priority, rt_priority_level, spin_us});
                 } catch (const std::invalid_argument& e) {
                     throw py::value_error(e.what());
                 }
             }), py::arg("sink"), py::arg("scheduler"), py::arg("rate_hz") = 500.0,
             py::arg("rt_priority") = false, py::arg("rt_priority_level") = 80,
             py::arg("spin_us") = 50.0)
        .def("start", &dpag::ControlLoop::start, py::call_guard<py::gil_scoped_release>())
        .def("stop", &dpag::ControlLoop::stop, py::call_guard<py::gil_scoped_release>(),
             "Finishes the current cycle and joins the thread (at most about one period).")
        .def("__enter__", [](std::shared_ptr<dpag::ControlLoop> l) {
                 {
                     py::gil_scoped_release release;
                     l->start();
                 }
                 return l;
             })
        .def("__exit__", [](dpag::ControlLoop& l, py::args) {
                 py::gil_scoped_release release;
                 l.stop();
             })
        .def_property_readonly("running", &dpag::ControlLoop::running)
        .def_property_readonly("stats", &loop_stats,
                               "Cycle counts, period error and wake latency p50/p99/max (us), RT status.")
        .def("period_error_histogram", [](const dpag::ControlLoop& l) { return histogram(l.period_error()); },
             "Counts per 1 us bin of |interval - period|; the last bin holds everything above.")
        .def("wake_latency_histogram", [](const dpag::ControlLoop& l) { return histogram(l.wake_latency()); },
             "Counts per 1 us bin of (wake time - deadline); the last bin holds everything above.");
}


// ---- CPU policy engine (csrc/unet_runtime.h) ----
//
// Float32 C-contiguous arrays only, checked with the argument's name and expected shape: a silent
// numpy conversion of an output would write into a copy the caller never sees.

std::string shape_of(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

void expect_f32(const py::array& a, const char* name, const std::vector<py::ssize_t>& shape, bool writeable) {
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

dpag::cpu::WeightType weight_type(const std::string& s) {
    if (s == "fp32") return dpag::cpu::WeightType::kF32;
    if (s == "bf16") return dpag::cpu::WeightType::kBF16;
    if (s == "fp16") return dpag::cpu::WeightType::kF16;
    throw py::value_error("weights: must be 'fp32', 'bf16' or 'fp16', got '" + s + "'");
}

std::string weight_name(dpag::cpu::WeightType t) {
    static const char* names[] = {"fp32", "bf16", "fp16"};   // in the enum's order (cpu_kernels.h)
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

void bind_engine(py::module_& m) {
    // The engine's config is the C++ struct itself, bound field by field: one schema for C++ and
    // Python (dpag_engine/runtime_cpu.py fills it from a policy).
    using Cfg = dpag::PolicyEngineConfig;
    py::class_<Cfg>(m, "EngineConfig", "csrc/unet_runtime.h PolicyEngineConfig; fill with runtime_cpu.engine_config.")
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
            [](Cfg& c, const std::string& name) { c.weights = weight_type(name); }, "'fp32', 'bf16' or 'fp16'")
        .def_readwrite("threads", &Cfg::threads);

    py::class_<dpag::PolicyEngine, std::shared_ptr<dpag::PolicyEngine>>(
        m, "PolicyEngine",
        "The whole sampler in C++, dp or guided mode (K U-Net forwards [+ the latent update's backward] +\n"
        "DDIM/DDPM steps, from the encoded mu to the normalised chunk); see csrc/unet_runtime.h. Build it\n"
        "with dpag_engine.runtime_cpu.CpuRuntime.")
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

    bind_control(m);
    bind_engine(m);

    m.attr("__version__") = DPAG_VERSION;
    py::dict info;
    info["compiler"] = DPAG_COMPILER;
    info["build_type"] = DPAG_BUILD_TYPE;
    info["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." +
                       std::to_string(PYBIND11_VERSION_MINOR) + "." +
                       std::to_string(PYBIND11_VERSION_PATCH);
    m.attr("build_info") = info;
}
