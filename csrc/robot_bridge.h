// MailboxSink: the RobotSink for an arm whose client runs on another thread.
//
// ur_rtde ships only Python bindings on PyPI, so its servoJ has to be called from a Python thread.
// The loop must never wait on that thread (it may be held up by the GIL, the planner, the garbage
// collector), so the two meet in a one-slot mailbox:
//
//   loop thread  -- command() -->  [newest command]  -- wait_command() -->  client thread -> servoJ
//   loop thread  <-- read_state() --  [newest state]  <-- post_state()  --  client thread <- RTDE
//
// Both sides hold the mutex only to copy a few doubles, so the loop waits at most a memcpy. A
// command the client has not taken before the next one arrives is overwritten (the arm wants the
// newest target, never a burst of stale ones) and counted.
//
// The safety checks that need no Python also live here, on the loop's side: every command must be
// finite and keep the tool centre inside a workspace box (UR5 forward kinematics), and the arm's
// state must be fresh. Any failure, or a fault the client posts (protective stop, disconnect...),
// makes the next read_state() fail, so the loop stops within one cycle and the client, woken by
// on_fault(), brings the arm to a stop.
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "control_loop.h"

namespace dpag {

// Tool-centre position [x, y, z] (m, base frame) of a UR5 at joint positions q (6 values): the
// standard DH chain of the classic UR5, identical to dpag_engine/kinematics.py, then the tool's
// offset (the TCP's position in the flange frame, m; zero: the flange itself).
std::array<double, 3> ur5_tcp_position(const double* q, const std::array<double, 3>& tool = {});

// An axis-aligned box in the base frame; the TCP (the flange plus `tool`, e.g. the fingertips of
// a gripper 17 cm out) must stay inside it.
struct WorkspaceBox {
    std::array<double, 3> lo{}, hi{};
    std::array<double, 3> tool{};
};

struct MailboxCommand {
    std::uint64_t seq = 0;  // 1, 2, ... in loop order; gaps are overwritten commands
    std::int64_t cycle = 0, t_ns = 0, wake_ns = 0;
    std::vector<double> q, v;
};

struct MailboxStats {
    std::uint64_t posted = 0;       // commands the loop put in the mailbox
    std::uint64_t taken = 0;        // commands the client took
    std::uint64_t overwritten = 0;  // replaced before the client took them
    std::uint64_t state_updates = 0;
};

class MailboxSink : public RobotSink {
public:
    // state_timeout_s: read_state() fails when the newest posted state is older than this (a
    // frozen stream or a dead client). box_enabled=false skips the workspace check (non-UR5 arms).
    MailboxSink(std::size_t dof, std::vector<double> q_initial, double state_timeout_s,
                bool box_enabled, WorkspaceBox box);

    // Loop side (RobotSink).
    std::size_t dof() const override { return dof_; }
    bool read_state(std::int64_t t_ns, double* q) override;
    bool command(std::int64_t cycle, std::int64_t t_ns, std::int64_t wake_ns, const double* q,
                 const double* v) override;
    void on_fault(const std::string& what) override;
    std::string failure() const override { return fault(); }

    // Client side. Waits up to timeout_s for a command newer than the last one taken; false on
    // timeout or once a fault is set (check fault()).
    bool wait_command(double timeout_s, MailboxCommand& out);
    // The arm's measured joint positions, stamped now (the loop's clock).
    void post_state(const double* q);
    // A fault seen by the client (the first one wins); wakes every waiter.
    void post_fault(const std::string& what);
    // Forget a fault and restart the state clock at q (between runs, never while a loop runs).
    void reset(const double* q);

    std::string fault() const;
    bool faulted() const { return faulted_.load(); }
    MailboxStats stats() const;
    double state_timeout_s() const { return state_timeout_ns_ * 1e-9; }

private:
    bool fail(const std::string& what);  // sets the fault, returns false

    const std::size_t dof_;
    const std::int64_t state_timeout_ns_;
    const bool box_enabled_;
    const WorkspaceBox box_;

    mutable std::mutex mutex_;
    std::condition_variable cv_;
    MailboxCommand slot_;  // the newest command
    std::uint64_t taken_seq_ = 0;
    std::vector<double> state_q_;
    std::int64_t state_ns_ = 0;
    std::string fault_;
    std::atomic<bool> faulted_{false};
    std::atomic<std::uint64_t> posted_{0}, taken_{0}, overwritten_{0}, state_updates_{0};
};

}  // namespace dpag
