// `dpag_engine._C` bindings of the control side (csrc/control_loop.h, action_scheduler.h,
// robot_bridge.h): ActionScheduler, the RobotSinks (RecordingSink, MailboxSink), ControlLoop, the
// monotonic clock and the UR5 forward kinematics of the MailboxSink's workspace check.
//
// Inputs arrive as any numeric array and are converted to float64 (forcecast): they are small, and
// the C++ side keeps its own copy. Outputs are fresh numpy arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "action_scheduler.h"
#include "bindings.h"
#include "control_loop.h"
#include "robot_bridge.h"

namespace dpag_py {
namespace {

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

}  // namespace

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
                         std::optional<std::pair<std::array<double, 3>, std::array<double, 3>>> box,
                         std::array<double, 3> tool) {
                 if (dof == 0) throw py::value_error("dof: must be > 0");
                 for (double x : tool) {
                     if (!std::isfinite(x)) throw py::value_error("tool_offset: must be finite");
                 }
                 dpag::WorkspaceBox b;
                 if (box) b = {box->first, box->second, tool};
                 try {
                     return std::make_shared<dpag::MailboxSink>(dof, joint_vector(q_initial, dof, "q_initial"),
                                                                state_timeout, box.has_value(), b);
                 } catch (const std::invalid_argument& e) {
                     throw py::value_error(e.what());
                 }
             }), py::arg("dof"), py::arg("q_initial"), py::arg("state_timeout"),
             py::arg("workspace_box") = py::none(), py::arg("tool_offset") = std::array<double, 3>{},
             "workspace_box: ((x_lo, y_lo, z_lo), (x_hi, y_hi, z_hi)) in m for a UR5, or None.\n"
             "tool_offset: the TCP's position in the flange frame (m): the box bounds that point.")
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

    m.def("ur5_tcp_position", [](const F64& q, std::array<double, 3> tool) {
              const std::vector<double> v = joint_vector(q, 6, "q");
              const std::array<double, 3> p = dpag::ur5_tcp_position(v.data(), tool);
              return py::make_tuple(p[0], p[1], p[2]);
          }, py::arg("q"), py::arg("tool_offset") = std::array<double, 3>{},
          "UR5 tool-centre position (m) by the DH chain the MailboxSink's box check uses.");

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

}  // namespace dpag_py
