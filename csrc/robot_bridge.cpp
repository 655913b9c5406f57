#include "robot_bridge.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <stdexcept>

namespace dpag {

std::array<double, 3> ur5_tcp_position(const double* q, const std::array<double, 3>& tool) {
    // Standard DH parameters of the classic UR5 (as dpag_engine/kinematics.py).
    static constexpr double kA[6] = {0.0, -0.425, -0.39225, 0.0, 0.0, 0.0};
    static constexpr double kD[6] = {0.089159, 0.0, 0.0, 0.10915, 0.09465, 0.0823};
    static constexpr double kPi = 3.14159265358979323846;
    static constexpr double kAlpha[6] = {kPi / 2, 0.0, 0.0, kPi / 2, -kPi / 2, 0.0};
    // T = T0 * T1 * ... * T5, kept as a 3x4 matrix (the last row is always 0 0 0 1).
    double t[3][4] = {{1, 0, 0, 0}, {0, 1, 0, 0}, {0, 0, 1, 0}};
    for (int i = 0; i < 6; ++i) {
        const double ct = std::cos(q[i]), st = std::sin(q[i]);
        const double ca = std::cos(kAlpha[i]), sa = std::sin(kAlpha[i]);
        const double a[3][4] = {{ct, -st * ca, st * sa, kA[i] * ct},
                                {st, ct * ca, -ct * sa, kA[i] * st},
                                {0.0, sa, ca, kD[i]}};
        double r[3][4];
        for (int row = 0; row < 3; ++row) {
            for (int col = 0; col < 4; ++col) {
                r[row][col] = t[row][0] * a[0][col] + t[row][1] * a[1][col] + t[row][2] * a[2][col] +
                              (col == 3 ? t[row][3] : 0.0);
            }
        }
        std::copy(&r[0][0], &r[0][0] + 12, &t[0][0]);
    }
    std::array<double, 3> p{};
    for (int row = 0; row < 3; ++row) {
        p[row] = t[row][0] * tool[0] + t[row][1] * tool[1] + t[row][2] * tool[2] + t[row][3];
    }
    return p;
}

MailboxSink::MailboxSink(std::size_t dof, std::vector<double> q_initial, double state_timeout_s,
                         bool box_enabled, WorkspaceBox box)
    : dof_(dof), state_timeout_ns_(static_cast<std::int64_t>(state_timeout_s * 1e9)),
      box_enabled_(box_enabled), box_(box), state_q_(std::move(q_initial)) {
    if (state_q_.size() != dof_) throw std::invalid_argument("q_initial: expected dof values");
    if (!(state_timeout_s > 0.0)) throw std::invalid_argument("state_timeout_s must be > 0");
    if (box_enabled_ && dof_ != 6) throw std::invalid_argument("the workspace box needs a 6-joint UR arm");
    for (int i = 0; i < 3; ++i) {
        if (box_enabled_ && !(box_.lo[i] < box_.hi[i])) {
            throw std::invalid_argument("workspace box: lo must be < hi on every axis");
        }
    }
    slot_.q.assign(dof_, 0.0);
    slot_.v.assign(dof_, 0.0);
    state_ns_ = monotonic_ns();
}

bool MailboxSink::fail(const std::string& what) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (fault_.empty()) fault_ = what;
        faulted_.store(true);
    }
    cv_.notify_all();
    return false;
}

bool MailboxSink::read_state(std::int64_t, double* q) {
    if (faulted_.load()) return false;
    std::int64_t age;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        std::copy(state_q_.begin(), state_q_.end(), q);
        age = monotonic_ns() - state_ns_;
    }
    if (age > state_timeout_ns_) {
        char msg[160];
        std::snprintf(msg, sizeof msg,
                      "robot state stale: no update for %.1f ms (limit %.1f ms): stream frozen or "
                      "connection lost",
                      age * 1e-6, state_timeout_ns_ * 1e-6);
        return fail(msg);
    }
    return true;
}

bool MailboxSink::command(std::int64_t cycle, std::int64_t t_ns, std::int64_t wake_ns,
                          const double* q, const double* v) {
    for (std::size_t j = 0; j < dof_; ++j) {
        if (!std::isfinite(q[j]) || !std::isfinite(v[j])) return fail("non-finite joint command");
    }
    if (box_enabled_) {
        const std::array<double, 3> p = ur5_tcp_position(q, box_.tool);
        for (int i = 0; i < 3; ++i) {
            if (p[i] < box_.lo[i] || p[i] > box_.hi[i]) {
                char msg[200];
                std::snprintf(msg, sizeof msg,
                              "command would move the TCP to (%.3f, %.3f, %.3f) m, outside the "
                              "workspace box; not sent",
                              p[0], p[1], p[2]);
                return fail(msg);
            }
        }
    }
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (slot_.seq > taken_seq_) overwritten_.fetch_add(1, std::memory_order_relaxed);
        slot_.seq += 1;
        slot_.cycle = cycle;
        slot_.t_ns = t_ns;
        slot_.wake_ns = wake_ns;
        std::copy(q, q + dof_, slot_.q.begin());
        std::copy(v, v + dof_, slot_.v.begin());
    }
    posted_.fetch_add(1, std::memory_order_relaxed);
    cv_.notify_one();
    return true;
}

void MailboxSink::on_fault(const std::string& what) { fail(what); }

bool MailboxSink::wait_command(double timeout_s, MailboxCommand& out) {
    std::unique_lock<std::mutex> lock(mutex_);
    const bool ready = cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), [this] {
        return faulted_.load() || slot_.seq > taken_seq_;
    });
    if (!ready || faulted_.load()) return false;
    out = slot_;
    taken_seq_ = slot_.seq;
    taken_.fetch_add(1, std::memory_order_relaxed);
    return true;
}

void MailboxSink::post_state(const double* q) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        std::copy(q, q + dof_, state_q_.begin());
        state_ns_ = monotonic_ns();
    }
    state_updates_.fetch_add(1, std::memory_order_relaxed);
}

void MailboxSink::post_fault(const std::string& what) { fail(what); }

void MailboxSink::reset(const double* q) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::copy(q, q + dof_, state_q_.begin());
    state_ns_ = monotonic_ns();
    fault_.clear();
    faulted_.store(false);
    taken_seq_ = slot_.seq;
}

std::string MailboxSink::fault() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return fault_;
}

MailboxStats MailboxSink::stats() const {
    return {posted_.load(), taken_.load(), overwritten_.load(), state_updates_.load()};
}

}  // namespace dpag
