#include "action_scheduler.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <utility>

namespace dpag {
namespace {

// The quintic that takes an offset from (1, 0, 0) at s = 0 to (0, 0, 0) at s = 1 (position basis),
// and the one that takes it from (0, 1, 0) to (0, 0, 0) (velocity basis, scaled by the window).
double quintic_pos(double s) { return 1.0 + s * s * s * (-10.0 + s * (15.0 - 6.0 * s)); }
double quintic_vel(double s) { return s + s * s * s * (-6.0 + s * (8.0 - 3.0 * s)); }

bool all_finite(const double* x, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) {
        if (!std::isfinite(x[i])) return false;
    }
    return true;
}

}  // namespace

std::string validate_limits(const JointLimits& l, std::size_t dof) {
    const std::pair<const std::vector<double>*, const char*> all[] = {
        {&l.q_min, "q_min"}, {&l.q_max, "q_max"}, {&l.v_max, "v_max"}, {&l.a_max, "a_max"}};
    for (const auto& [vec, name] : all) {
        if (vec->size() != dof) {
            return std::string(name) + ": expected " + std::to_string(dof) + " values, got " +
                   std::to_string(vec->size());
        }
        if (!all_finite(vec->data(), dof)) return std::string(name) + ": must be finite";
    }
    for (std::size_t j = 0; j < dof; ++j) {
        if (!(l.q_min[j] < l.q_max[j])) return "joint " + std::to_string(j) + ": q_min must be < q_max";
        if (!(l.v_max[j] > 0.0)) return "joint " + std::to_string(j) + ": v_max must be > 0";
        if (!(l.a_max[j] > 0.0)) return "joint " + std::to_string(j) + ": a_max must be > 0";
    }
    return {};
}

ActionScheduler::ActionScheduler(std::size_t dof, JointLimits limits, double blend_window)
    : dof_(dof), limits_(std::move(limits)), blend_window_(blend_window),
      p_(dof, 0.0), v_(dof, 0.0), blend_p_(dof, 0.0), blend_v_(dof, 0.0),
      pub_p_(dof, 0.0), pub_v_(dof, 0.0) {}

SubmitResult ActionScheduler::submit(const double* actions, std::size_t n, double t_obs, double dt,
                                     double now) {
    submitted_.fetch_add(1, std::memory_order_relaxed);
    SubmitResult r;
    auto reject = [&](std::string why, bool invalid = true) {
        r.invalid = invalid;
        rejected_.fetch_add(1, std::memory_order_relaxed);
        r.reason = std::move(why);
        return r;
    };
    if (n == 0) return reject("the chunk has no actions");
    if (!std::isfinite(t_obs) || !std::isfinite(now)) return reject("t_obs and now must be finite");
    if (!(dt > 0.0) || !std::isfinite(dt)) return reject("dt must be a finite number > 0");
    for (std::size_t i = 0; i < n; ++i) {
        if (!all_finite(actions + i * dof_, dof_)) {
            return reject("action " + std::to_string(i) + " has a NaN or infinite value");
        }
    }

    // Latency compensation: the planner saw the world at t_obs, so action i is meant for
    // t_obs + i*dt. Those already due before `now` can no longer be executed on time.
    std::size_t first = 0;
    while (first < n && t_obs + static_cast<double>(first) * dt < now) ++first;
    if (first == n) {
        std::ostringstream why;
        why << "all " << n << " actions are in the past (last due at t=" << t_obs + (n - 1) * dt
            << ", now=" << now << ")";
        r.dropped = n;
        dropped_.fetch_add(n, std::memory_order_relaxed);
        return reject(why.str(), false);
    }
    r.dropped = first;
    r.kept = n - first;
    dropped_.fetch_add(first, std::memory_order_relaxed);

    const std::size_t knots = n - first;
    auto c = std::make_unique<Chunk>();
    c->t.resize(knots);
    c->q.assign(actions + first * dof_, actions + n * dof_);
    c->m.assign(knots * dof_, 0.0);
    for (std::size_t i = 0; i < knots; ++i) c->t[i] = t_obs + static_cast<double>(first + i) * dt;
    c->t_start = c->t.front() - dt;
    // Catmull-Rom tangents (central differences, one-sided at the ends) make the curve C1. A single
    // knot is a point at rest.
    if (knots > 1) {
        for (std::size_t i = 0; i < knots; ++i) {
            const std::size_t lo = i == 0 ? 0 : i - 1;
            const std::size_t hi = i + 1 == knots ? i : i + 1;
            const double span = c->t[hi] - c->t[lo];
            for (std::size_t j = 0; j < dof_; ++j) {
                c->m[i * dof_ + j] = (c->q[hi * dof_ + j] - c->q[lo * dof_ + j]) / span;
            }
        }
    }

    std::unique_ptr<Chunk> stale, retired;
    {
        std::lock_guard<std::mutex> lock(handoff_);
        retired = std::move(retired_);
        if (pending_) superseded_.fetch_add(1, std::memory_order_relaxed);
        stale = std::move(pending_);
        pending_ = std::move(c);
    }
    // `stale` and `retired` are freed here, on the planner thread, outside the lock.
    r.accepted = true;
    return r;
}

void ActionScheduler::reset(const double* q) {
    std::unique_ptr<Chunk> a, p, r;
    {
        std::lock_guard<std::mutex> lock(handoff_);
        p = std::move(pending_);
        r = std::move(retired_);
    }
    a = std::move(active_);
    std::copy(q, q + dof_, p_.begin());
    std::fill(v_.begin(), v_.end(), 0.0);
    initialised_ = true;
    have_time_ = false;
    dt_last_ = 0.0;
    mode_.store(static_cast<int>(SchedulerMode::kIdle));
}

bool ActionScheduler::adopt_pending_if_due(double t) {
    std::unique_lock<std::mutex> lock(handoff_, std::try_to_lock);
    if (!lock.owns_lock()) return false;  // the planner is mid-hand-off: take it next cycle
    // retired_ is always empty here: submit() empties it before every new pending_.
    if (!pending_ || pending_->t_start > t || retired_) return false;
    retired_ = std::move(active_);
    active_ = std::move(pending_);
    return true;
}

void ActionScheduler::evaluate(const Chunk& c, double t, std::size_t j, double& p, double& v) const {
    if (t < c.t[0]) {
        // Between adoption and the first action (less than one action interval): the line the
        // chunk leaves its first action on, so the curve is C1 there too.
        v = c.m[j];
        p = c.q[j] + v * (t - c.t[0]);
        return;
    }
    const std::size_t i = segment_;
    if (c.t.size() == 1) {
        p = c.q[j];
        v = 0.0;
        return;
    }
    const double h = c.t[i + 1] - c.t[i];
    const double s = std::clamp((t - c.t[i]) / h, 0.0, 1.0);
    const double s2 = s * s, s3 = s2 * s;
    const double q0 = c.q[i * dof_ + j], q1 = c.q[(i + 1) * dof_ + j];
    const double m0 = c.m[i * dof_ + j] * h, m1 = c.m[(i + 1) * dof_ + j] * h;
    p = (2 * s3 - 3 * s2 + 1) * q0 + (s3 - 2 * s2 + s) * m0 + (-2 * s3 + 3 * s2) * q1 + (s3 - s2) * m1;
    v = ((6 * s2 - 6 * s) * q0 + (3 * s2 - 4 * s + 1) * m0 + (-6 * s2 + 6 * s) * q1 +
         (3 * s2 - 2 * s) * m1) / h;
}

// The highest speed from which a joint can still stop within `distance` when every later cycle
// slows down by at most accel*dt, counting this cycle's own step: the largest s with
//   dt * (s + (s - accel*dt) + (s - 2*accel*dt) + ...) <= distance   (positive terms only).
// Writing s = (n + f) * accel*dt with integer n and 0 <= f < 1, the sum is accel*dt^2 * (n+1) * (n/2 + f),
// which inverts in closed form. Bounding each cycle's speed by it keeps the joint short of
// `distance`, and (by induction) leaves the next cycle a speed it can reach within `accel`.
// For distance <= accel*dt^2 it is exactly distance/dt: the last step lands on the spot.
static double braking_speed(double accel, double distance, double dt) {
    if (!(distance > 0.0)) return 0.0;
    const double h = accel * dt;  // speed change per cycle
    const double units = distance / (h * dt);
    double n = std::floor((std::sqrt(1.0 + 8.0 * units) - 1.0) / 2.0);
    // The square root can be off by one ulp around integers; settle n exactly.
    while ((n + 1.0) * (n + 2.0) / 2.0 <= units) n += 1.0;
    while (n > 0.0 && n * (n + 1.0) / 2.0 > units) n -= 1.0;
    const double f = (units - n * (n + 1.0) / 2.0) / (n + 1.0);
    return h * (n + std::min(f, 1.0));
}

void ActionScheduler::tick(double t, const double* q_measured, double* q_cmd, double* v_cmd) {
    ticks_.fetch_add(1, std::memory_order_relaxed);
    if (!initialised_) {
        // First contact with the arm: command its measured position, at rest.
        std::copy(q_measured, q_measured + dof_, p_.begin());
        std::fill(v_.begin(), v_.end(), 0.0);
        initialised_ = true;
    }
    const double dt = have_time_ ? t - t_last_ : 0.0;
    const bool adopted = adopt_pending_if_due(t);
    if (adopted) {
        adopted_.fetch_add(1, std::memory_order_relaxed);
        segment_ = 0;
    }
    const Chunk* c = active_.get();
    const bool tracking = c != nullptr && t <= c->t.back();
    if (tracking) {
        while (segment_ + 2 < c->t.size() && t >= c->t[segment_ + 1]) ++segment_;
    }
    if (tracking && adopted) {
        // Offset of the commanded state from the new curve at t: where the command would be with
        // no change (coasting one cycle at its velocity) minus the curve; likewise for velocity.
        for (std::size_t j = 0; j < dof_; ++j) {
            double r, rd;
            evaluate(*c, t, j, r, rd);
            blend_p_[j] = p_[j] + v_[j] * dt - r;
            blend_v_[j] = v_[j] - rd;
        }
        t_blend_ = t;
    }
    const int mode = static_cast<int>(tracking ? SchedulerMode::kTracking
                                      : c ? SchedulerMode::kHolding : SchedulerMode::kIdle);
    if (mode == static_cast<int>(SchedulerMode::kHolding) &&
        mode_.load(std::memory_order_relaxed) == static_cast<int>(SchedulerMode::kTracking)) {
        holds_.fetch_add(1, std::memory_order_relaxed);
    }
    mode_.store(mode, std::memory_order_relaxed);

    // A velocity holds over its whole cycle, so a change of velocity happens across the span between
    // two cycles' midpoints, (dt_prev + dt) / 2: bounding it by a_max * dt alone would let the cycle
    // after a skipped slot (dt = 2 periods) accelerate a third too hard.
    const double dt_accel = dt_last_ > 0.0 ? 0.5 * (dt_last_ + dt) : dt;
    if (dt > 0.0) {
        for (std::size_t j = 0; j < dof_; ++j) {
            const double dv = limits_.a_max[j] * dt_accel;
            double v_want;
            if (tracking) {
                // Reference: the chunk's curve plus the decaying blend offset, and its velocity.
                double r, rd;
                evaluate(*c, t, j, r, rd);
                const double s = (t - t_blend_) / blend_window_;
                if (s < 1.0) {
                    const double s2 = s * s;
                    r += quintic_pos(s) * blend_p_[j] + blend_window_ * quintic_vel(s) * blend_v_[j];
                    rd += -30.0 * s2 * (1.0 - s) * (1.0 - s) / blend_window_ * blend_p_[j] +
                          (1.0 + s2 * (-18.0 + s * (32.0 - 15.0 * s))) * blend_v_[j];
                }
                // Track in the reference's frame: e is how far the command trails the reference
                // moved back one cycle. Closing e at no more than the braking speed (half the
                // acceleration limit, the other half is the reference's) closes it without
                // overshoot; when e is tiny this is exactly (r - p)/dt, i.e. follow the curve.
                const double e = r - rd * dt - p_[j];
                const double a = 0.5 * limits_.a_max[j];
                v_want = rd + braking_speed(a, e, dt) - braking_speed(a, -e, dt);
            } else {
                // Idle or holding: come to rest where we are, as fast as the limit allows. This is
                // the plan, not the limiter at work, so it is not counted.
                v_want = v_[j] - std::clamp(v_[j], -dv, dv);
            }

            // Limits, as bounds on this cycle's velocity.
            const double vmax = limits_.v_max[j];
            const double up = braking_speed(limits_.a_max[j], limits_.q_max[j] - p_[j], dt);
            const double down = braking_speed(limits_.a_max[j], p_[j] - limits_.q_min[j], dt);
            const double hi = std::min({v_[j] + dv, vmax, up});
            const double lo = std::max({v_[j] - dv, -vmax, -down});
            double v_new = v_want;
            if (v_want > hi) {
                v_new = hi;
                (hi == up ? pos_limited_ : hi == vmax ? vel_limited_ : acc_limited_)
                    .fetch_add(1, std::memory_order_relaxed);
            } else if (v_want < lo) {
                v_new = lo;
                (lo == -down ? pos_limited_ : lo == -vmax ? vel_limited_ : acc_limited_)
                    .fetch_add(1, std::memory_order_relaxed);
            }
            // Bounds that contradict each other (only by rounding, or after skipped cycles made dt
            // jump) resolve in favour of the position limit.
            v_new = std::clamp(v_new, -down, up);
            p_[j] += v_new * dt;
            v_[j] = v_new;
        }
    }
    if (dt > 0.0) dt_last_ = dt;
    t_last_ = t;
    have_time_ = true;
    std::copy(p_.begin(), p_.end(), q_cmd);
    std::copy(v_.begin(), v_.end(), v_cmd);

    std::unique_lock<std::mutex> lock(publish_, std::try_to_lock);
    if (lock.owns_lock()) {  // a reader holds it: publish next cycle
        pub_p_ = p_;         // same size, so no allocation
        pub_v_ = v_;
        pub_valid_ = true;
    }
}

bool ActionScheduler::commanded(std::vector<double>& q, std::vector<double>& v) const {
    std::lock_guard<std::mutex> lock(publish_);
    q = pub_p_;
    v = pub_v_;
    return pub_valid_;
}

SchedulerStats ActionScheduler::stats() const {
    SchedulerStats s;
    s.ticks = ticks_.load();
    s.chunks_submitted = submitted_.load();
    s.chunks_rejected = rejected_.load();
    s.chunks_adopted = adopted_.load();
    s.chunks_superseded = superseded_.load();
    s.actions_dropped_stale = dropped_.load();
    s.holds = holds_.load();
    s.position_limited = pos_limited_.load();
    s.velocity_limited = vel_limited_.load();
    s.acceleration_limited = acc_limited_.load();
    s.mode = static_cast<SchedulerMode>(mode_.load());
    return s;
}

}  // namespace dpag
