"""The embedded UR5 reach task: expert, evaluation, rollout, dataset (no training; a few seconds)."""
from __future__ import annotations

import numpy as np
import pytest

from dpag_engine.data import load_datasets, read_replay_buffer
from dpag_engine.envs.ur5_reach import (ReachTask, ReachExpert, evaluate, frame_origins, ik,
                                        mean_jerk, observe, rollout)
from dpag_engine.tasks import get_task
from dpag_engine.training.config import build_configs, load_config_file, resolve_policy_config
from dpag_engine.kinematics import UR5_LIMITS, fk_matrix, forward_kinematics, matrix_from_rotvec

TASK = ReachTask()


def _ik_path(points, q_near=None):
    """Hand-made joint trajectory through Cartesian points (tool orientation of the task)."""
    q = np.asarray(TASK.q_home if q_near is None else q_near, dtype=float)
    out = []
    for p in points:
        q = ik(np.asarray(p, float), TASK, q)
        out.append(q)
    return np.asarray(out)


def _line(a, b, n):
    s = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - s) * np.asarray(a, float) + s * np.asarray(b, float)


def test_task_geometry_is_sensible():
    tcp = forward_kinematics(np.asarray(TASK.q_home))
    # Tool pointing down, tilted 0.25 rad back towards the base (+x): the flange z-axis is -z of the
    # base rotated by 0.25 rad about y.
    np.testing.assert_allclose(matrix_from_rotvec(tcp[3:])[:, 2], [np.sin(0.25), 0, -np.cos(0.25)], atol=1e-3)
    c = np.asarray(TASK.obstacle_center)
    lo, hi = np.asarray(TASK.goal_low), np.asarray(TASK.goal_high)
    # The obstacle lies between the start and every goal along the direction of travel.
    for goal in (lo, hi, np.array([lo[0], hi[1], lo[2]]), np.array([hi[0], lo[1], lo[2]])):
        d = (goal - tcp[:3])[:2] / np.linalg.norm((goal - tcp[:3])[:2])
        along_c, along_g = (c - tcp[:3])[:2] @ d, (goal - tcp[:3])[:2] @ d
        assert 0 < along_c - TASK.obstacle_radius and along_c + TASK.obstacle_radius < along_g


def test_frame_origins_match_fk():
    qs = np.random.default_rng().uniform(-np.pi, np.pi, size=(4, 6))
    origins = frame_origins(qs)
    for q, o in zip(qs, origins):
        np.testing.assert_allclose(o[6], fk_matrix(q)[:3, 3], atol=1e-12)


def test_expert_reaches_goals_without_collision_on_both_sides():
    expert = ReachExpert(TASK)
    sides = []
    for seed in range(8):
        rng = np.random.default_rng([seed, 7])
        goal = TASK.sample_goal(rng)
        q0 = TASK.sample_start(rng)
        traj, side = expert.run(rng, goal, q0)
        assert traj.shape == (TASK.episode_steps + 1, 6)
        np.testing.assert_allclose(traj[0], q0)
        score = evaluate(traj, goal, TASK)
        assert score["success"] and not score["collided"], (seed, score)
        assert score["min_clearance_m"] > 0.0
        # The geometric side of the evaluation agrees with the side the expert chose.
        assert score["path_side"] == side
        sides.append(side)
        # Smooth and slow: joint speeds well under the UR5's pi rad/s, at rest at the end.
        speed = np.abs(np.diff(traj, axis=0)) / TASK.dt
        assert speed.max() <= TASK.max_demo_joint_speed < UR5_LIMITS.v_max
        assert speed[-5:].max() < 1e-6
        # The tool keeps its orientation (rotation error under ~0.6 degrees everywhere).
        r0 = matrix_from_rotvec(TASK.tool_rotvec)
        for q in traj[::7]:
            r = fk_matrix(q)[:3, :3]
            assert np.arccos(np.clip((np.trace(r0.T @ r) - 1) / 2, -1, 1)) < 0.01
    assert set(sides) == {"left", "right"}


def test_expert_side_can_be_forced():
    goal = TASK.sample_goal(np.random.default_rng(3))
    for side in ("left", "right"):
        traj, got = ReachExpert(TASK).run(np.random.default_rng(1), goal, side=side)
        assert got == side and evaluate(traj, goal, TASK)["path_side"] == side


def test_evaluate_flags_a_path_through_the_obstacle():
    c = np.asarray(TASK.obstacle_center)
    start = forward_kinematics(np.asarray(TASK.q_home))[:3]
    goal = c + (c - start) * 1.2   # straight on, through the centre, beyond
    traj = _ik_path(_line(start, goal, 40))
    score = evaluate(traj, goal, TASK)
    assert score["collided"] and not score["success"]
    assert score["min_clearance_m"] < -0.9 * TASK.obstacle_radius   # it went (almost) through the centre
    assert score["final_error_m"] < 1e-4                              # reaching the goal is not enough
    assert score["path_side"] is None


def test_evaluate_checks_between_samples():
    # Two samples only, both well clear of the sphere, but the motion between them crosses it.
    c = np.asarray(TASK.obstacle_center)
    a, b = c + [0.12, 0.0, 0.0], c - [0.12, 0.0, 0.0]
    traj = _ik_path([a, b])
    assert all(np.linalg.norm(frame_origins(q)[0, 6] - c) > 0.1 for q in traj)
    assert evaluate(traj, b, TASK)["collided"]


def test_evaluate_accepts_a_path_around_the_obstacle():
    c = np.asarray(TASK.obstacle_center)
    start = forward_kinematics(np.asarray(TASK.q_home))[:3]
    goal = c + np.array([-0.15, 0.0, 0.0])        # travel is along -x
    # Facing -x with z up, the left-hand side is -y (z x d = (0, 0, 1) x (-1, 0, 0) = (0, -1, 0)).
    for dy, expected in ((-0.15, "left"), (0.15, "right")):
        corners = [start, start + [0, dy, 0], goal + [0, dy, 0], goal]
        points = np.concatenate([_line(p, q, 15) for p, q in zip(corners[:-1], corners[1:])])
        score = evaluate(_ik_path(points), goal, TASK)
        assert not score["collided"] and score["success"], score
        # The closest legs of the rectangle are the first (at the start's distance from the centre) and
        # the last (15 cm beyond it); the wrist link (8 cm above the TCP, pointing back to the base)
        # passes over the sphere near the goal, closer but clear.
        nearest_leg = min(np.linalg.norm(start - c), 0.15)
        assert score["tcp_clearance_m"] == pytest.approx(nearest_leg - TASK.obstacle_radius, abs=0.005)
        assert 0 < score["min_clearance_m"] <= score["tcp_clearance_m"]
        assert score["path_side"] == expected


def test_evaluate_fails_a_path_that_stops_short():
    c = np.asarray(TASK.obstacle_center)
    start = forward_kinematics(np.asarray(TASK.q_home))[:3]
    goal = c + np.array([-0.15, 0.0, 0.0])
    corners = [start, start + [0, 0.15, 0], goal + [0, 0.15, 0], goal + [0.03, 0, 0]]
    points = np.concatenate([_line(p, q, 15) for p, q in zip(corners[:-1], corners[1:])])
    score = evaluate(_ik_path(points), goal, TASK)
    assert not score["collided"] and not score["success"]
    assert score["final_error_m"] == pytest.approx(0.03, abs=1e-4)


@pytest.mark.parametrize("dt", [0.1, 0.02])
def test_mean_jerk_is_exact_on_a_cubic(dt):
    rng = np.random.default_rng()  # fresh coefficients every run
    coef = rng.normal(size=(4, 6))   # q_j(t) = c0 + c1 t + c2 t^2 + c3 t^3 per joint
    t = np.arange(50)[:, None] * dt
    q = coef[0] + coef[1] * t + coef[2] * t ** 2 + coef[3] * t ** 3
    expected = np.mean(np.abs(6 * coef[3]))   # q''' = 6 c3 everywhere
    assert expected > 0
    assert mean_jerk(q, dt) == pytest.approx(expected, rel=1e-5), coef
    assert mean_jerk(q[:3], dt) == 0.0


def test_observe_shape_dtype_and_order():
    q, goal = np.arange(6) * 0.1, np.array([-0.6, -0.1, 0.24])
    s = observe(q, goal)
    assert s.shape == (9,) and s.dtype == np.float32
    np.testing.assert_allclose(s, np.concatenate([q, goal]), rtol=1e-6)


def _replay(traj):
    """The expert trajectory as a policy_fn: find the current q in it, return the next 8 targets."""
    calls = []

    def fn(history):
        calls.append(history.copy())
        q = history[-1, :6].astype(float)
        i = int(np.argmin(np.linalg.norm(traj - q, axis=1)))
        nxt = traj[i + 1:i + 9]
        return np.concatenate([nxt, np.repeat(traj[-1:], 8 - len(nxt), axis=0)])
    return fn, calls


def test_rollout_replaying_the_expert_succeeds():
    goal = TASK.sample_goal(np.random.default_rng(11))
    traj, _ = ReachExpert(TASK).run(np.random.default_rng(12), goal)
    fn, calls = _replay(traj)
    out = rollout(fn, TASK, goal, n_obs_steps=2)
    assert out.shape == traj.shape
    np.testing.assert_allclose(out, traj, atol=1e-5)
    assert evaluate(out, goal, TASK)["success"]
    # One call per executed chunk of 8; the first history repeats the first observation.
    assert len(calls) == int(np.ceil(TASK.episode_steps / 8))
    assert calls[0].shape == (2, 9) and calls[0].dtype == np.float32
    np.testing.assert_array_equal(calls[0][0], calls[0][1])
    np.testing.assert_allclose(calls[1][-1], observe(traj[8], goal), rtol=1e-6)
    np.testing.assert_allclose(calls[1][0], observe(traj[7], goal), rtol=1e-6)


def test_rollout_limits_joint_speed():
    far = np.asarray(TASK.q_home) + np.array([1.5, -1.5, 0.5, 0.0, 0.0, 0.0])
    out = rollout(lambda h: np.repeat(far[None], 4, axis=0), TASK, np.zeros(3), steps=3)
    assert out.shape == (4, 6)
    step = np.abs(np.diff(out, axis=0))
    v = TASK.max_joint_speed * TASK.dt
    np.testing.assert_allclose(step[:, :2], v)             # far targets: full speed every step
    np.testing.assert_allclose(step[:, 2], [v, 0.5 - v, 0.0], atol=1e-12)  # near one: reached, then held
    np.testing.assert_allclose(step[:, 3:], 0.0)


def test_generated_zarr_loads_through_the_training_config(tmp_path):
    path = tmp_path / "ur5.zarr"
    summary = get_task("ur5_reach").write_demonstrations(path, 3, seed=5)
    assert summary["written"] == 3 and summary["success_rate"] == 1.0
    buf = read_replay_buffer(path)
    assert set(buf.data) == {"q", "goal", "action"}
    assert buf.episode_lengths().tolist() == [TASK.episode_steps] * 3
    ep = buf.get_episode(1)
    # action t is the joint position reached at step t + 1.
    np.testing.assert_array_equal(ep["action"][:-1], ep["q"][1:])

    d = load_config_file("configs/ur5_reach.toml")
    d["data"]["path"] = str(path)
    d["data"]["val_ratio"] = 0.0
    policy, data_cfg, _ = build_configs(d)
    cfg = resolve_policy_config(policy, 6, 9)
    train, _ = load_datasets(data_cfg, cfg.n_obs_steps, cfg.horizon, cfg.n_action_steps)
    assert train.state_dim == 9 and train.action_dim == 6
    assert cfg.method == "dp" and cfg.recipe == "small" and cfg.state_dim == 9 and cfg.action_dim == 6
    batch = train[[0, 5]]
    assert tuple(batch["obs"]["state"].shape) == (2, 2, 9) and tuple(batch["action"].shape) == (2, 16, 6)
    # The dataset's state is exactly what observe() builds at serve time.
    ep0 = buf.get_episode(0)
    np.testing.assert_array_equal(train.state[3], observe(ep0["q"][3], ep0["goal"][3]))
