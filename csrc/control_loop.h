// The fixed-rate control loop: its own std::thread, absolute deadlines, a robot sink per cycle.
//
// Each cycle k has the deadline t0 + k*period on CLOCK_MONOTONIC. The thread sleeps with
// clock_nanosleep(TIMER_ABSTIME) until `spin` before the deadline (the kernel's wake-up latency is
// tens of microseconds, worse under load) and busy-waits the rest, so absolute deadlines never
// accumulate drift. It then reads the arm, asks the ActionScheduler for the command at the
// deadline's time and sends it. When the thread falls more than a whole period behind, the slots
// it can no longer serve are skipped (never replayed back to back: a burst of stale commands is
// worse for an arm than a missing one) and counted as late cycles.
//
// Nothing in the loop touches Python: the sink is C++ (RecordingSink; MailboxSink in robot_bridge.h
// hands commands to ur_rtde's thread without waiting on it) and the
// statistics are atomics that readers on other threads copy out.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "action_scheduler.h"

namespace dpag {

// Nanoseconds on CLOCK_MONOTONIC (the clock Python's time.monotonic() reads).
std::int64_t monotonic_ns();

// What the loop talks to: a real arm (ur_rtde's servoJ) or a stand-in. Called only from the loop
// thread, so implementations must not block for long and must not call into Python.
class RobotSink {
public:
    virtual ~RobotSink() = default;
    virtual std::size_t dof() const = 0;
    // Measured joint positions into q (dof values). false = the arm cannot be read: a fault.
    virtual bool read_state(std::int64_t t_ns, double* q) = 0;
    // The command for slot `cycle` (its deadline t_ns): positions and velocities, dof each.
    // `wake_ns` is when the loop actually ran. false = the arm refused it: a fault.
    virtual bool command(std::int64_t cycle, std::int64_t t_ns, std::int64_t wake_ns,
                         const double* q, const double* v) = 0;
    // The loop stops after a fault; this is the sink's chance to bring the arm to a safe stop.
    virtual void on_fault(const std::string& what) = 0;
    // Why the last read_state/command returned false, when the sink knows; added to the fault.
    virtual std::string failure() const { return {}; }
};

// An in-process arm for tests and benchmarks: tracks every command perfectly (read_state returns
// the last command) and records each cycle into buffers preallocated for `capacity` cycles. Cycles
// beyond the capacity are counted, not recorded. Read the records once the loop has stopped.
class RecordingSink : public RobotSink {
public:
    RecordingSink(std::size_t dof, std::size_t capacity, std::vector<double> q_initial);

    std::size_t dof() const override { return dof_; }
    bool read_state(std::int64_t t_ns, double* q) override;
    bool command(std::int64_t cycle, std::int64_t t_ns, std::int64_t wake_ns, const double* q,
                 const double* v) override;
    void on_fault(const std::string& what) override;

    std::size_t size() const { return size_.load(std::memory_order_acquire); }
    std::uint64_t overflow() const { return overflow_.load(); }
    std::size_t capacity() const { return capacity_; }
    const std::int64_t* cycles() const { return cycle_.data(); }
    const std::int64_t* deadlines_ns() const { return deadline_.data(); }
    const std::int64_t* wakes_ns() const { return wake_.data(); }
    const double* q() const { return q_.data(); }
    const double* v() const { return v_.data(); }
    std::string fault() const;
    // Forget all records (not while a loop runs).
    void clear();

private:
    const std::size_t dof_, capacity_;
    std::vector<double> q_now_;
    std::vector<std::int64_t> cycle_, deadline_, wake_;
    std::vector<double> q_, v_;
    std::atomic<std::size_t> size_{0};
    std::atomic<std::uint64_t> overflow_{0};
    mutable std::mutex fault_mutex_;
    std::string fault_;
};

// Counts per 1 us bin from 0 to kBins-1 us, the last bin collecting everything above. Single
// writer (the loop), any number of readers.
class LatencyHistogram {
public:
    static constexpr std::size_t kBins = 10001;
    void add(std::int64_t ns);
    void clear();
    std::vector<std::uint64_t> counts() const;
    // The q-quantile (0..1) in us, to the bin's upper edge; 0 when empty.
    double quantile_us(double q) const;
    double max_us() const { return max_ns_.load() / 1e3; }
    std::uint64_t total() const { return total_.load(); }

private:
    std::array<std::atomic<std::uint64_t>, kBins> bins_{};
    std::atomic<std::uint64_t> total_{0};
    std::atomic<std::int64_t> max_ns_{0};
};

struct LoopConfig {
    double rate_hz = 500.0;
    bool rt_priority = false;  // ask for SCHED_FIFO; refused silently when the OS says no
    int rt_priority_level = 80;
    double spin_us = 50.0;  // busy-wait this long before each deadline
};

struct LoopStats {
    std::uint64_t cycles = 0;       // cycles that ran (commands sent)
    std::uint64_t late_cycles = 0;  // slots skipped because the loop was a whole period behind
    // |start-to-start interval - nominal| and (wake time - deadline), in us.
    double period_error_p50_us = 0, period_error_p99_us = 0, period_error_max_us = 0;
    double wake_latency_p50_us = 0, wake_latency_p99_us = 0, wake_latency_max_us = 0;
    bool rt_requested = false, rt_granted = false;
    std::string rt_message;  // why real-time priority was refused, or "SCHED_FIFO n"
    std::string fault;       // set when the sink failed and the loop stopped
};

class ControlLoop {
public:
    ControlLoop(std::shared_ptr<RobotSink> sink, std::shared_ptr<ActionScheduler> scheduler,
                LoopConfig config);
    ~ControlLoop();
    ControlLoop(const ControlLoop&) = delete;
    ControlLoop& operator=(const ControlLoop&) = delete;

    // Starts the thread and returns once it has set its priority (so stats say whether RT was
    // granted). Throws std::runtime_error when already running or the scheduler is in use elsewhere.
    void start();
    // Asks the thread to finish its cycle and joins it (at most about one period).
    void stop();
    bool running() const { return running_.load(); }

    LoopStats stats() const;
    const LatencyHistogram& period_error() const { return period_error_; }
    const LatencyHistogram& wake_latency() const { return wake_latency_; }
    const LoopConfig& config() const { return config_; }

private:
    void run();
    void set_priority();

    std::shared_ptr<RobotSink> sink_;
    std::shared_ptr<ActionScheduler> scheduler_;
    const LoopConfig config_;
    const std::int64_t period_ns_;

    std::thread thread_;
    std::atomic<bool> stop_requested_{false};
    std::atomic<bool> running_{false};
    std::atomic<bool> started_{false};  // the thread has settled its priority

    std::atomic<std::uint64_t> cycles_{0}, late_{0};
    LatencyHistogram period_error_, wake_latency_;
    mutable std::mutex info_mutex_;  // guards the strings below; never taken inside a cycle
    bool rt_granted_ = false;
    std::string rt_message_, fault_;
};

}  // namespace dpag
