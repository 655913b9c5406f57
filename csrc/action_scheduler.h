// Action scheduling between an asynchronous planner and the fixed-rate control loop.
//
// The planner (Python, ~10 Hz) submits action chunks stamped with the observation time they were
// planned from; the loop (125/500 Hz) calls tick() once per cycle and gets the joint command for
// that cycle. Between the two sits:
//
//  * latency compensation: action i of a chunk is due at t_obs + i*dt; actions already in the past
//    when the chunk arrives are dropped and have no influence at all (as in Diffusion Policy's
//    real-robot code). The loop adopts a chunk at its first cycle at or after one action interval
//    before the first kept action (a chunk stamped in the future waits);
//  * interpolation: a C1 piecewise-cubic Hermite curve R through the kept actions (Catmull-Rom
//    tangents), sampled at the loop's rate; before the first action (less than one interval) R is
//    the line along the first tangent;
//  * blending: at adoption time t_s the commanded state (p0, v0) generally differs from R. The
//    reference over the blend window W is R(t) + e(t - t_s), where the offset e is the quintic that
//    starts at (p0 - R(t_s), v0 - R'(t_s), 0) and ends at (0, 0, 0) after W: position and velocity
//    are continuous at the switch and the offset lands with zero acceleration. The offset is open
//    loop in time, so W should not exceed the planning interval: a blend restarted by every new
//    chunk before it has decayed would never finish (W = 0.1 s suits 10 Hz planning). Stretching W
//    for large offsets was tried and rejected for exactly that reason; large offsets are left to
//    the tracking law below;
//  * tracking: the command closes its gap to the reference in the reference's frame, no faster than
//    a joint braking at half its acceleration limit could stop, so a command that fell behind (limits,
//    adversarial chunks) catches up without overshoot or oscillation. With no gap it follows R exactly;
//  * limits: every command's velocity is then clamped to the acceleration and velocity limits and to
//    a discrete braking-distance bound that keeps the joint inside its position limits; counters say
//    how often each engaged;
//  * hold: once the chunk runs out with no successor, decelerate to rest at the acceleration limit
//    where the arm is. The plan is never extrapolated past its last action.
//
// Threading: submit() runs on the planner thread and does all allocation and validation there; the
// loop only swaps pointers under a try_lock, so it never waits on the planner (a busy lock means the
// new chunk is picked up one cycle later). tick() allocates nothing.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace dpag {

// Per-joint limits; every vector has `dof` entries. v_max and a_max must be > 0, q_min < q_max.
struct JointLimits {
    std::vector<double> q_min, q_max, v_max, a_max;
};

// The outcome of one submit(): a rejected chunk leaves the executing one untouched.
struct SubmitResult {
    bool accepted = false;
    bool invalid = false;     // rejected for bad input (NaN, dt <= 0), not for being late
    std::size_t kept = 0;     // actions scheduled at or after `now`
    std::size_t dropped = 0;  // actions already in the past when the chunk arrived
    std::string reason;       // why it was rejected, empty when accepted
};

enum class SchedulerMode : int { kIdle = 0, kTracking = 1, kHolding = 2 };

// Counters readable from any thread while the loop runs.
struct SchedulerStats {
    std::uint64_t ticks = 0;
    std::uint64_t chunks_submitted = 0;
    std::uint64_t chunks_rejected = 0;
    std::uint64_t chunks_adopted = 0;
    std::uint64_t chunks_superseded = 0;  // replaced by a newer one before the loop took them
    std::uint64_t actions_dropped_stale = 0;
    std::uint64_t holds = 0;  // times a chunk ran out with no successor
    // (tick, joint) pairs in which each limit changed the command.
    std::uint64_t position_limited = 0;
    std::uint64_t velocity_limited = 0;
    std::uint64_t acceleration_limited = 0;
    SchedulerMode mode = SchedulerMode::kIdle;
};

class ActionScheduler {
public:
    // blend_window: seconds over which a new chunk's offset from the commanded state decays (> 0);
    // at most the planning interval.
    ActionScheduler(std::size_t dof, JointLimits limits, double blend_window);

    std::size_t dof() const { return dof_; }
    bool initialised() const { return initialised_; }
    double blend_window() const { return blend_window_; }
    const JointLimits& limits() const { return limits_; }

    // Planner side. `actions` is n x dof row-major; action i is due at t_obs + i*dt (seconds on the
    // CLOCK_MONOTONIC time base, the one Python's time.monotonic() reads). Chunks with non-finite
    // values, dt <= 0 or no action at or after `now` are rejected. The newest accepted chunk replaces
    // any chunk the loop has not picked up yet.
    SubmitResult submit(const double* actions, std::size_t n, double t_obs, double dt, double now);

    // Sets the commanded state to rest at q (the arm's measured position) and forgets every chunk.
    // Not while a loop is ticking this scheduler.
    void reset(const double* q);

    // Loop side, once per cycle at time t (non-decreasing). The first tick after construction
    // starts at rest at q_measured (reset() does the same earlier). Writes the command to q_cmd and
    // v_cmd (dof each). Allocation-free and never blocks.
    void tick(double t, const double* q_measured, double* q_cmd, double* v_cmd);

    // The last command, from any thread: false when nothing has been commanded yet.
    bool commanded(std::vector<double>& q, std::vector<double>& v) const;

    SchedulerStats stats() const;

    // Guards against ticking one scheduler from two places (a running loop and Python).
    bool try_attach() { return !attached_.exchange(true); }
    void detach() { attached_.store(false); }

private:
    // One chunk, built and validated by submit(); read-only once handed to the loop.
    struct Chunk {
        std::vector<double> t;  // knot times, strictly increasing
        std::vector<double> q;  // knots x dof
        std::vector<double> m;  // tangents, knots x dof
        double t_start = 0.0;   // earliest adoption: one action interval before the first action
    };

    bool adopt_pending_if_due(double t);
    void evaluate(const Chunk& c, double t, std::size_t j, double& p, double& v) const;

    const std::size_t dof_;
    const JointLimits limits_;
    const double blend_window_;

    // Hand-off: submit() puts the new chunk in pending_ and frees whatever the loop retired; the
    // loop moves pending_ to active_ and the old active_ to retired_, so it never frees memory.
    mutable std::mutex handoff_;
    std::unique_ptr<Chunk> pending_;
    std::unique_ptr<Chunk> retired_;

    // Loop-owned state.
    std::unique_ptr<Chunk> active_;
    bool initialised_ = false;
    bool have_time_ = false;  // t_last_ is valid
    double t_last_ = 0.0;
    double dt_last_ = 0.0;    // the previous cycle's interval (0 before the second tick)
    double t_blend_ = 0.0;  // when active_ was adopted
    std::vector<double> p_, v_;            // commanded state
    std::vector<double> blend_p_, blend_v_;  // offsets at adoption
    std::size_t segment_ = 0;              // cached segment index into active_

    // Published command for readers on other threads (try_lock by the loop, so it never waits).
    mutable std::mutex publish_;
    std::vector<double> pub_p_, pub_v_;
    bool pub_valid_ = false;

    std::atomic<bool> attached_{false};
    std::atomic<int> mode_{static_cast<int>(SchedulerMode::kIdle)};
    std::atomic<std::uint64_t> ticks_{0}, submitted_{0}, rejected_{0}, adopted_{0}, superseded_{0},
        dropped_{0}, holds_{0}, pos_limited_{0}, vel_limited_{0}, acc_limited_{0};
};

// Checks limits for `dof` joints; returns an error message, empty when they are valid.
std::string validate_limits(const JointLimits& limits, std::size_t dof);

}  // namespace dpag
