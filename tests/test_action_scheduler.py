"""dpag_engine._C.ActionScheduler, ticked offline (no thread, no clock): the command stream it
produces is checked numerically - continuity across chunk switches, limits under adversarial
chunks, latency compensation, hold-and-decelerate, input validation.
"""
from __future__ import annotations

import numpy as np
import pytest

from dpag_engine import _C

DOF = 6
PERIOD = 0.002  # 500 Hz
ACTION_DT = 0.1  # 10 Hz actions, as the policies plan
Q_LIM = np.full(DOF, 2.0)
V_MAX = np.full(DOF, 1.5)
A_MAX = np.full(DOF, 8.0)
# Float slack on limit checks: the clamp is exact up to rounding.
EPS = 1e-9


def make(v_max=V_MAX, a_max=A_MAX, q_lim=Q_LIM, blend_window=0.1, q0=None):
    s = _C.ActionScheduler(DOF, -q_lim, q_lim, v_max, a_max, blend_window=blend_window)
    s.reset(np.zeros(DOF) if q0 is None else q0)
    return s


def run(s, t0, n, period=PERIOD, on_tick=None):
    """Ticks n cycles from t0; on_tick(k, t) may submit. Returns times, q (n, dof), v (n, dof)."""
    ts, qs, vs = [], [], []
    for k in range(n):
        t = t0 + k * period
        if on_tick is not None:
            on_tick(k, t)
        q, v = s.tick(t)
        ts.append(t)
        qs.append(q)
        vs.append(v)
    return np.array(ts), np.array(qs), np.array(vs)


def smooth_chunk(t_obs, n=16, freq=0.5, amp=0.3, phase=0.0):
    """n actions of a sine trajectory sampled at t_obs + i*ACTION_DT (a different sine per joint)."""
    t = t_obs + ACTION_DT * np.arange(n)
    j = np.arange(DOF)
    return amp * np.sin(2 * np.pi * freq * t[:, None] + phase + 0.3 * j[None, :])


def limited(s):
    st = s.stats
    return st["position_limited"] + st["velocity_limited"] + st["acceleration_limited"]


def check_limits(t, q, v, q_lim=Q_LIM, v_max=V_MAX, a_max=A_MAX):
    """The command stream respects every limit; velocities are the per-cycle finite differences."""
    dt = np.diff(t)[:, None]
    assert np.all(np.abs(q) <= q_lim + EPS), "position limit exceeded"
    assert np.all(np.abs(v) <= v_max + EPS), "velocity limit exceeded"
    np.testing.assert_allclose(np.diff(q, axis=0), v[1:] * dt, atol=1e-12)  # v is what moved q
    acc = np.abs(np.diff(v, axis=0)) / dt
    assert np.all(acc <= a_max * (1 + EPS)), f"acceleration limit exceeded: {acc.max()}"


def test_follows_the_chunk_through_its_actions():
    # A chunk that starts where the arm rests and at rest: no offset to blend, so the command is
    # the interpolating curve itself and passes through every action at its time.
    s = make()
    t = np.arange(16) * ACTION_DT
    acts = 0.2 * (1 - np.cos(np.pi * t / t[-1]))[:, None] * np.ones(DOF)  # starts with zero slope
    assert s.submit(acts, 0.0, ACTION_DT, now=0.0).accepted
    ts, q, v = run(s, 0.0, int(round(t[-1] / PERIOD)) + 1)
    on_knots = np.round(t / PERIOD).astype(int)
    np.testing.assert_allclose(q[on_knots[2:]], acts[2:], atol=2e-3)
    np.testing.assert_allclose(q[on_knots[-1]], acts[-1], atol=1e-9)  # settled on the curve
    check_limits(ts, q, v)
    assert s.stats["chunks_adopted"] == 1


def sine(t, freq, phase, offset=0.0):
    return 0.3 * np.sin(2 * np.pi * freq * t + phase + 0.3 * np.arange(DOF)) + offset


def sine_rate(t, freq, phase):
    return 0.3 * 2 * np.pi * freq * np.cos(2 * np.pi * freq * t + phase + 0.3 * np.arange(DOF))


def test_chunk_switch_is_continuous_in_position_and_velocity():
    # Chunk A (a sine) runs; at 0.53 s chunk B arrives whose curve is ahead in phase and 5 cm off:
    # switching curves outright would step by ~0.07 rad and ~0.37 rad/s in one cycle. With the blend
    # every per-cycle change is that of a bounded acceleration: the quintic offset's (at most
    # 5.78|e_p|/W^2 + 3.95|e_v|/W) plus the curve's own. The limits are generous here and the
    # limiter never stepped in, so this is the blend's doing, not the clamp's.
    a_max, v_max, w = 100.0, 10.0, 0.1
    s = make(v_max=np.full(DOF, v_max), a_max=np.full(DOF, a_max), blend_window=w,
             q0=sine(0.0, 0.5, 0.0))
    switch_k = 265
    chunk_b = sine(0.5 + ACTION_DT * np.arange(16)[:, None], 0.5, 0.4, offset=0.05)

    def on_tick(k, t):
        if k == 0:
            s.submit(sine(ACTION_DT * np.arange(16)[:, None], 0.5, 0.0), 0.0, ACTION_DT, now=t)
        if k == switch_k:
            assert s.submit(chunk_b, 0.5, ACTION_DT, now=t).dropped == 1  # 0.5 s is already past

    ts, q, v = run(s, 0.0, 1000, on_tick=on_tick)
    assert limited(s) == 0 and s.stats["chunks_adopted"] == 2
    t_s = ts[switch_k]
    e_p = np.abs(sine(t_s, 0.5, 0.4, 0.05) - q[switch_k - 1]).max()
    e_v = np.abs(sine_rate(t_s, 0.5, 0.4) - v[switch_k - 1]).max()
    assert e_p > 0.06 and e_v > 0.3  # a real switch

    curve_acc, curve_vel = 0.3 * (2 * np.pi * 0.5) ** 2, 0.3 * 2 * np.pi * 0.5
    dv = np.abs(np.diff(v, axis=0)).max(axis=1)
    dq = np.abs(np.diff(q, axis=0)).max(axis=1)
    # (2% slack: the curves are Catmull-Rom interpolants of the sines, not the sines.)
    assert dv.max() <= 1.02 * (5.78 * e_p / w**2 + 3.95 * e_v / w + curve_acc) * PERIOD
    assert dq.max() <= 1.02 * (1.875 * e_p / w + e_v + curve_vel) * PERIOD
    assert dq.max() < e_p / 10 and dv.max() < e_v / 2
    # At the switch itself the offset starts with zero acceleration: no kink at all.
    assert dv[switch_k - 2:switch_k + 1].max() <= 2 * curve_acc * PERIOD
    # Once the blend is over the command is on chunk B's curve.
    np.testing.assert_allclose(q[-1], sine(ts[-1], 0.5, 0.4, 0.05), atol=3e-3)


def test_switch_with_tight_limits_never_steps():
    # The same switch under the real limits: position and velocity steps bounded by them.
    s = make()
    def on_tick(k, t):
        if k == 0:
            s.submit(smooth_chunk(0.0), 0.0, ACTION_DT, now=t)
        if k == 265:
            s.submit(smooth_chunk(0.5, freq=0.8, phase=1.0) + 0.3, 0.5, ACTION_DT, now=t)
    ts, q, v = run(s, 0.0, 800, on_tick=on_tick)
    check_limits(ts, q, v)


@pytest.mark.parametrize("seed", range(12))
def test_limits_never_exceeded_for_adversarial_chunks(seed):
    # Chunks with huge jumps, targets far outside the position range, random lengths, spacings and
    # arrival times (some stale, some in the future), and gaps long enough to hold in between.
    rng = np.random.default_rng(seed)
    q_lim = rng.uniform(0.5, 3.0, DOF)
    v_max = rng.uniform(0.2, 3.0, DOF)
    a_max = rng.uniform(1.0, 50.0, DOF)
    s = make(v_max=v_max, a_max=a_max, q_lim=q_lim, blend_window=rng.uniform(0.01, 0.3))
    period = rng.choice([0.002, 0.008])

    def on_tick(k, t):
        if rng.random() < 0.03:
            n = int(rng.integers(1, 20))
            kind = rng.integers(3)
            if kind == 0:
                acts = rng.uniform(-3 * q_lim, 3 * q_lim, (n, DOF))  # way out of range
            elif kind == 1:
                acts = np.cumsum(rng.normal(0, 1.0, (n, DOF)), axis=0)  # large steps
            else:
                acts = np.where(rng.random((n, DOF)) < 0.5, q_lim, -q_lim) * 1.01  # bang-bang
            dt = rng.uniform(0.005, 0.3)
            s.submit(acts, t + rng.uniform(-0.5, 0.2), dt, now=t)

    ts, q, v = run(s, 100.0, 2500, period=period, on_tick=on_tick)
    check_limits(ts, q, v, q_lim=q_lim, v_max=v_max, a_max=a_max)
    assert s.stats["chunks_adopted"] > 0 and limited(s) > 0


def test_big_correction_catches_up_without_overshoot():
    # A chunk far from the arm: the command lags under the limits, then settles on the target
    # without overshooting it (no limit-cycle around the target).
    s = make()
    target = np.full(DOF, 1.0)
    s.submit(np.tile(target, (40, 1)), 0.0, ACTION_DT, now=0.0)
    ts, q, v = run(s, 0.0, 2000)
    check_limits(ts, q, v)
    assert np.all(q <= target + 1e-9)
    np.testing.assert_allclose(q[-1], target, atol=1e-9)
    assert np.all(np.diff(q, axis=0) >= -1e-12)  # monotone approach


def test_nan_chunk_is_rejected_and_changes_nothing():
    ref, s = make(), make()
    for sched in (ref, s):
        sched.submit(smooth_chunk(0.0), 0.0, ACTION_DT, now=0.0)
    _, q_ref, v_ref = run(ref, 0.0, 400)

    def on_tick(k, t):
        if k == 100:
            bad = smooth_chunk(t)
            bad[3, 2] = np.nan
            with pytest.raises(ValueError, match="action 3 has a NaN or infinite value"):
                s.submit(bad, t, ACTION_DT, now=t)
            bad[3, 2] = np.inf
            with pytest.raises(ValueError, match="executing one is kept"):
                s.submit(bad, t, ACTION_DT, now=t)

    _, q, v = run(s, 0.0, 400, on_tick=on_tick)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(v, v_ref)
    assert s.stats["chunks_rejected"] == 2 and s.stats["chunks_adopted"] == 1


@pytest.mark.parametrize(
    "actions, kwargs, match",
    [
        (np.zeros((4, DOF - 1)), {}, r"actions: expected shape \(N, 6\) with N >= 1, got \(4, 5\)"),
        (np.zeros(DOF), {}, r"got \(6,\)"),
        (np.zeros((0, DOF)), {}, r"got \(0, 6\)"),
        (np.zeros((4, DOF)), {"dt": 0.0}, "dt must be a finite number > 0"),
        (np.zeros((4, DOF)), {"dt": -0.1}, "dt must be a finite number > 0"),
        (np.zeros((4, DOF)), {"t_obs": np.inf}, "t_obs and now must be finite"),
    ],
)
def test_bad_submissions_raise_value_error(actions, kwargs, match):
    s = make()
    args = {"t_obs": 0.0, "dt": ACTION_DT, "now": 0.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        s.submit(actions, **args)
    assert s.stats["chunks_adopted"] == 0


def test_bad_limits_raise_value_error():
    ones = np.ones(DOF)
    with pytest.raises(ValueError, match=r"q_min: expected shape \(6,\)"):
        _C.ActionScheduler(DOF, -np.ones(5), ones, ones, ones)
    with pytest.raises(ValueError, match="joint 0: v_max must be > 0"):
        _C.ActionScheduler(DOF, -ones, ones, np.r_[0.0, ones[1:]], ones)
    with pytest.raises(ValueError, match="q_min must be < q_max"):
        _C.ActionScheduler(DOF, ones, ones, ones, ones)
    with pytest.raises(ValueError, match="blend_window"):
        _C.ActionScheduler(DOF, -ones, ones, ones, ones, blend_window=0.0)
    with pytest.raises(ValueError, match="a_max: must be finite"):
        _C.ActionScheduler(DOF, -ones, ones, ones, np.full(DOF, np.nan))


def test_stale_actions_are_dropped():
    # Planned from an observation 0.35 s old: actions due at +0.0 .. +0.3 are gone. They point far
    # away (1.5 rad); the fresh ones stay near 0, so any influence of a stale one would show.
    s = make()
    acts = np.zeros((16, DOF))
    acts[:4] = 1.5
    r = s.submit(acts, 10.0, ACTION_DT, now=10.35)
    assert (r.accepted, r.kept, r.dropped) == (True, 12, 4)
    assert s.stats["actions_dropped_stale"] == 4
    _, q, _ = run(s, 10.35, 500)
    assert np.abs(q).max() < 1e-12

    # A chunk with every action in the past is refused (not an error: the planner was too slow),
    # and the executing chunk carries on.
    r = s.submit(np.ones((4, DOF)), 10.0, ACTION_DT, now=11.0)
    assert not r.accepted and r.kept == 0 and r.dropped == 4 and "in the past" in r.reason
    assert s.stats["chunks_rejected"] == 1


def test_future_chunk_waits_for_its_time():
    s = make()
    s.submit(np.full((4, DOF), 0.1), 1.0, ACTION_DT, now=0.0)  # first action due at 1.0
    _, q, _ = run(s, 0.0, 400)  # up to 0.8 s: still one interval too early
    assert np.abs(q).max() == 0 and s.stats["mode"] == "idle"
    run(s, 0.8, 100)
    assert s.stats["chunks_adopted"] == 1


def test_holds_and_decelerates_when_plans_stop():
    # A ramp at 0.6 rad/s, then nothing: the command slows down at the acceleration limit, stops
    # and stays stopped, overshooting the last action only by the braking distance.
    s = make()
    acts = 0.6 * ACTION_DT * np.arange(10)[:, None] * np.ones(DOF)
    s.submit(acts, 0.0, ACTION_DT, now=0.0)
    ts, q, v = run(s, 0.0, 1000)
    check_limits(ts, q, v)
    assert s.stats["mode"] == "holding" and s.stats["holds"] == 1
    end = int(round(0.9 / PERIOD))
    speed = v[end:, 0]
    assert np.all(np.diff(speed) <= 1e-12)  # never speeds up again
    stop_cycles = int(np.ceil(0.6 / (A_MAX[0] * PERIOD))) + 2
    assert np.all(v[end + stop_cycles:] == 0)
    braking = 0.6**2 / (2 * A_MAX[0])
    assert np.all(q[-1] <= acts[-1] + braking + 0.6 * PERIOD + 1e-9)
    np.testing.assert_array_equal(q[-1], q[end + stop_cycles])


def test_newer_chunk_supersedes_one_not_yet_taken():
    s = make()
    s.submit(np.full((4, DOF), 0.5), 0.0, ACTION_DT, now=0.0)
    s.submit(np.full((4, DOF), -0.2), 0.0, ACTION_DT, now=0.0)
    _, q, _ = run(s, 0.0, 300)
    assert s.stats["chunks_superseded"] == 1 and s.stats["chunks_adopted"] == 1
    assert q[-1, 0] < 0


def test_commanded_state_and_first_tick():
    s = _C.ActionScheduler(DOF, -Q_LIM, Q_LIM, V_MAX, A_MAX)
    assert s.commanded() is None
    with pytest.raises(ValueError, match="q_measured: required on the first tick"):
        s.tick(0.0)
    q0 = np.linspace(-0.5, 0.5, DOF)
    q, v = s.tick(0.0, q_measured=q0)  # starts at rest where the arm is
    np.testing.assert_array_equal(q, q0)
    np.testing.assert_array_equal(v, 0)
    qc, vc = s.commanded()
    np.testing.assert_array_equal(qc, q0)
    assert s.dof == DOF and s.blend_window == pytest.approx(0.1)
    np.testing.assert_array_equal(s.limits["a_max"], A_MAX)


def test_start_outside_position_limits_only_moves_back_in():
    s = make(q0=np.full(DOF, 2.5))  # beyond q_max = 2
    s.submit(np.full((10, DOF), 3.0), 0.0, ACTION_DT, now=0.0)  # and asked to go further out
    _, q, _ = run(s, 0.0, 300)
    assert np.all(q <= 2.5)
