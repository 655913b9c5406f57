#include "control_loop.h"

#include <pthread.h>
#include <sched.h>
#include <time.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DPAG_CPU_RELAX() _mm_pause()
#else
#define DPAG_CPU_RELAX() ((void)0)
#endif

namespace dpag {

std::int64_t monotonic_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<std::int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

namespace {

timespec to_timespec(std::int64_t ns) {
    timespec ts;
    ts.tv_sec = static_cast<time_t>(ns / 1000000000LL);
    ts.tv_nsec = static_cast<long>(ns % 1000000000LL);
    return ts;
}

// Sleeps to `spin_ns` before the deadline, then spins: the kernel's wake-up is late by a variable
// amount, the spin absorbs it. Absolute times, so a late wake-up never shifts later deadlines.
void wait_until(std::int64_t deadline_ns, std::int64_t spin_ns) {
    const std::int64_t sleep_to = deadline_ns - spin_ns;
    if (monotonic_ns() < sleep_to) {
        const timespec ts = to_timespec(sleep_to);
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nullptr) == EINTR) {
        }
    }
    while (monotonic_ns() < deadline_ns) DPAG_CPU_RELAX();
}

}  // namespace

// ---- RecordingSink ----

RecordingSink::RecordingSink(std::size_t dof, std::size_t capacity, std::vector<double> q_initial)
    : dof_(dof), capacity_(capacity), q_now_(std::move(q_initial)),
      cycle_(capacity), deadline_(capacity), wake_(capacity), q_(capacity * dof), v_(capacity * dof) {
    if (q_now_.size() != dof) throw std::invalid_argument("q_initial: expected dof values");
}

bool RecordingSink::read_state(std::int64_t, double* q) {
    std::copy(q_now_.begin(), q_now_.end(), q);
    return true;
}

bool RecordingSink::command(std::int64_t cycle, std::int64_t t_ns, std::int64_t wake_ns,
                            const double* q, const double* v) {
    std::copy(q, q + dof_, q_now_.begin());  // a perfect arm: it is where it was told to be
    const std::size_t i = size_.load(std::memory_order_relaxed);
    if (i == capacity_) {
        overflow_.fetch_add(1, std::memory_order_relaxed);
        return true;
    }
    cycle_[i] = cycle;
    deadline_[i] = t_ns;
    wake_[i] = wake_ns;
    std::copy(q, q + dof_, q_.begin() + i * dof_);
    std::copy(v, v + dof_, v_.begin() + i * dof_);
    size_.store(i + 1, std::memory_order_release);  // readers see only complete records
    return true;
}

void RecordingSink::on_fault(const std::string& what) {
    std::lock_guard<std::mutex> lock(fault_mutex_);
    fault_ = what;
}

std::string RecordingSink::fault() const {
    std::lock_guard<std::mutex> lock(fault_mutex_);
    return fault_;
}

void RecordingSink::clear() {
    size_.store(0);
    overflow_.store(0);
}

// ---- LatencyHistogram ----

void LatencyHistogram::add(std::int64_t ns) {
    ns = std::max<std::int64_t>(ns, 0);
    const std::size_t bin = std::min<std::size_t>(static_cast<std::size_t>(ns / 1000), kBins - 1);
    // One writer, so load-add-store is enough and never waits.
    bins_[bin].store(bins_[bin].load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    total_.store(total_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    if (ns > max_ns_.load(std::memory_order_relaxed)) max_ns_.store(ns, std::memory_order_relaxed);
}

void LatencyHistogram::clear() {
    for (auto& b : bins_) b.store(0);
    total_.store(0);
    max_ns_.store(0);
}

std::vector<std::uint64_t> LatencyHistogram::counts() const {
    std::vector<std::uint64_t> out(kBins);
    for (std::size_t i = 0; i < kBins; ++i) out[i] = bins_[i].load(std::memory_order_relaxed);
    return out;
}

double LatencyHistogram::quantile_us(double q) const {
    const std::vector<std::uint64_t> c = counts();
    std::uint64_t n = 0;
    for (auto x : c) n += x;
    if (n == 0) return 0.0;
    const auto rank = static_cast<std::uint64_t>(std::ceil(q * static_cast<double>(n)));
    std::uint64_t seen = 0;
    for (std::size_t i = 0; i < kBins; ++i) {
        seen += c[i];
        if (seen >= std::max<std::uint64_t>(rank, 1)) {
            // The overflow bin has no upper edge: the exact maximum is the honest answer there.
            return i + 1 == kBins ? max_us() : static_cast<double>(i + 1);
        }
    }
    return max_us();
}

// ---- ControlLoop ----

ControlLoop::ControlLoop(std::shared_ptr<RobotSink> sink, std::shared_ptr<ActionScheduler> scheduler,
                         LoopConfig config)
    : sink_(std::move(sink)), scheduler_(std::move(scheduler)), config_(config),
      period_ns_(static_cast<std::int64_t>(std::llround(1e9 / config.rate_hz))) {
    if (!sink_ || !scheduler_) throw std::invalid_argument("sink and scheduler are required");
    if (!(config.rate_hz > 0.0) || !(config.rate_hz <= 10000.0)) {
        throw std::invalid_argument("rate_hz must be in (0, 10000]");
    }
    if (!(config.spin_us >= 0.0)) throw std::invalid_argument("spin_us must be >= 0");
    if (sink_->dof() != scheduler_->dof()) {
        throw std::invalid_argument("sink and scheduler disagree on dof: " +
                                    std::to_string(sink_->dof()) + " vs " +
                                    std::to_string(scheduler_->dof()));
    }
}

ControlLoop::~ControlLoop() { stop(); }

void ControlLoop::start() {
    if (running_.load() || thread_.joinable()) throw std::runtime_error("the loop is already running");
    if (!scheduler_->try_attach()) {
        throw std::runtime_error("the scheduler is already driven by another running loop");
    }
    cycles_.store(0);
    late_.store(0);
    period_error_.clear();
    wake_latency_.clear();
    {
        std::lock_guard<std::mutex> lock(info_mutex_);
        rt_granted_ = false;
        rt_message_.clear();
        fault_.clear();
    }
    stop_requested_.store(false);
    started_.store(false);
    running_.store(true);
    thread_ = std::thread([this] { run(); });
    while (!started_.load()) std::this_thread::yield();
}

void ControlLoop::stop() {
    stop_requested_.store(true);
    if (thread_.joinable()) thread_.join();
}

void ControlLoop::set_priority() {
    bool granted = false;
    std::string message = "not requested";
    if (config_.rt_priority) {
        sched_param sp{};
        sp.sched_priority = config_.rt_priority_level;
        const int rc = pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp);
        granted = rc == 0;
        message = granted ? "SCHED_FIFO " + std::to_string(config_.rt_priority_level)
                          : std::string("SCHED_FIFO refused: ") + std::strerror(rc);
    }
    std::lock_guard<std::mutex> lock(info_mutex_);
    rt_granted_ = granted;
    rt_message_ = message;
}

void ControlLoop::run() {
    set_priority();
    // Every buffer the cycle uses exists before the first deadline.
    const std::size_t dof = sink_->dof();
    std::vector<double> q_meas(dof), q_cmd(dof), v_cmd(dof);
    const auto spin_ns = static_cast<std::int64_t>(config_.spin_us * 1e3);
    started_.store(true);

    std::string fault;
    const std::int64_t t0 = monotonic_ns() + period_ns_;
    std::int64_t k = 0, prev_k = -1, prev_wake = 0;
    while (!stop_requested_.load(std::memory_order_relaxed)) {
        std::int64_t deadline = t0 + k * period_ns_;
        wait_until(deadline, spin_ns);
        const std::int64_t wake = monotonic_ns();
        if (wake - deadline >= period_ns_) {
            // A whole period behind: serve the newest slot that is due, skip the ones before it.
            const std::int64_t behind = (wake - deadline) / period_ns_;
            late_.fetch_add(static_cast<std::uint64_t>(behind), std::memory_order_relaxed);
            k += behind;
            deadline = t0 + k * period_ns_;
        }
        wake_latency_.add(wake - deadline);
        if (prev_k >= 0) period_error_.add(std::llabs((wake - prev_wake) - (k - prev_k) * period_ns_));

        if (!sink_->read_state(deadline, q_meas.data())) {
            fault = "read_state failed at cycle " + std::to_string(k);
            break;
        }
        // The trajectory is sampled at the deadline, not the wake time: commands stay exactly one
        // period apart in trajectory time, whatever the wake-up jitter.
        scheduler_->tick(static_cast<double>(deadline) * 1e-9, q_meas.data(), q_cmd.data(), v_cmd.data());
        if (!sink_->command(k, deadline, wake, q_cmd.data(), v_cmd.data())) {
            fault = "command failed at cycle " + std::to_string(k);
            break;
        }
        cycles_.fetch_add(1, std::memory_order_relaxed);
        prev_k = k;
        prev_wake = wake;
        ++k;
    }
    if (!fault.empty()) {
        const std::string why = sink_->failure();
        if (!why.empty()) fault += ": " + why;
        sink_->on_fault(fault);
        std::lock_guard<std::mutex> lock(info_mutex_);
        fault_ = fault;
    }
    scheduler_->detach();
    running_.store(false);
}

LoopStats ControlLoop::stats() const {
    LoopStats s;
    s.cycles = cycles_.load();
    s.late_cycles = late_.load();
    s.period_error_p50_us = period_error_.quantile_us(0.50);
    s.period_error_p99_us = period_error_.quantile_us(0.99);
    s.period_error_max_us = period_error_.max_us();
    s.wake_latency_p50_us = wake_latency_.quantile_us(0.50);
    s.wake_latency_p99_us = wake_latency_.quantile_us(0.99);
    s.wake_latency_max_us = wake_latency_.max_us();
    s.rt_requested = config_.rt_priority;
    std::lock_guard<std::mutex> lock(info_mutex_);
    s.rt_granted = rt_granted_;
    s.rt_message = rt_message_;
    s.fault = fault_;
    return s;
}

}  // namespace dpag
