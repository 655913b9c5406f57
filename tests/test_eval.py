"""`python -m dpag_engine.eval` end to end on a tiny checkpoint trained on expert demonstrations."""
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gym_pusht")

from dpag_engine.envs.generate import main as generate_main  # noqa: E402
from dpag_engine.eval import action_jerk, main as eval_main, policy_obs  # noqa: E402
from dpag_engine.training.cli import main as train_main  # noqa: E402


def test_action_jerk_is_zero_on_constant_acceleration():
    t = np.arange(10, dtype=float)[:, None]
    assert action_jerk(np.hstack([t ** 2, 3 * t])) == pytest.approx(0.0)
    assert action_jerk(np.hstack([t ** 3, 0 * t])) == pytest.approx(6.0)


def test_policy_obs_follows_state_keys():
    hist = [{"keypoint": np.full((9, 2), i, np.float32), "state": np.arange(5, dtype=np.float32) + i} for i in range(2)]
    obs = policy_obs(hist, ["keypoint", "state[:2]"], {})
    assert obs["state"].shape == (1, 2, 20)
    assert obs["state"][0, 1, -2:].tolist() == [1.0, 2.0]


def test_action_steps_sets_how_often_the_policy_replans(monkeypatch):
    """run_episode executes the first --action-steps actions of each plan, then plans again."""
    from types import SimpleNamespace

    import torch

    from dpag_engine import eval as ev
    from dpag_engine.envs import make_task
    rng = np.random.default_rng()
    plans = []

    class Planner:
        def predict_action(self, obs, gen, mode):
            plans.append(rng.uniform(100, 400, (8, 2)).astype(np.float32))
            return {"action": torch.from_numpy(plans[-1])[None]}
    for n, expected_plans in ((8, 3), (3, 7), (1, 20)):
        plans.clear()
        monkeypatch.setattr(ev, "_WORKER", dict(policy=SimpleNamespace(cfg=SimpleNamespace(n_obs_steps=2)),
                                                planner=Planner(), task=make_task("pusht"), mode="dp",
                                                state_keys=["keypoint", "state[:2]"], cameras={}, max_steps=20,
                                                action_steps=n))
        ep = ev.run_episode((100000, False))
        assert ep["steps"] == 20 and len(plans) == expected_plans   # ceil(20 / n) plans
        executed = np.concatenate([plan[:n] for plan in plans])[:20]
        assert ep["jerk"] == pytest.approx(action_jerk(executed))


def test_eval_cli_on_tiny_checkpoint(tmp_path):
    data = tmp_path / "demo.zarr"
    assert generate_main(["--out", str(data), "--episodes", "1", "--seed", "3", "--keep-failed"]) == 0
    run = tmp_path / "run"
    assert train_main(["--config", str(Path(__file__).parents[1] / "configs/pusht_lowdim.yaml"), "--data", str(data), "--out-dir", str(run),
                       "policy.recipe=tiny", "train.steps=1", "train.batch_size=4", "train.warmup_steps=1",
                       "data.val_ratio=0", "train.eval_every=0", "train.save_every=0"]) == 0
    out = tmp_path / "eval"
    assert eval_main(["--ckpt", str(run / "model.pt"), "--task", "dynamic_pusht", "--episodes", "2",
                      "--max-steps", "16", "--videos", "1", "--mode", "dp", "--out-dir", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert {"score_mean", "coverage_mean", "coverage_std", "success_rate", "jerk_mean", "per_episode"} <= set(res)
    assert res["score_mean"] == pytest.approx(np.mean([min(1, e["max_coverage"] / 0.95) for e in res["per_episode"]]))
    assert res["episodes"] == 2 and res["task"] == "dynamic_pusht" and res["mode"] == "dp"
    assert [e["seed"] for e in res["per_episode"]] == [100000, 100001]
    assert all(0.0 <= e["max_coverage"] <= 1.0 and e["steps"] == 16 for e in res["per_episode"])
    assert (out / "rollout_100000.gif").stat().st_size > 0
    # The engine's options: fewer denoising steps and int8 weights run; bad values stop before any work.
    again = tmp_path / "eval_k4"
    assert eval_main(["--ckpt", str(run / "model.pt"), "--task", "pusht", "--episodes", "1", "--max-steps", "8",
                      "--videos", "0", "--inference-steps", "4", "--weights", "int8", "--out-dir", str(again)]) == 0
    res = json.loads((again / "results.json").read_text())
    assert res["inference_steps"] == 4 and res["weights"] == "int8" and res["runtime"] == "cpp"
    assert eval_main(["--ckpt", str(run / "model.pt"), "--inference-steps", "0", "--out-dir", str(again)]) == 1
    # Fewer actions per plan (run_episode's replanning is checked below).
    one = tmp_path / "eval_a1"
    assert eval_main(["--ckpt", str(run / "model.pt"), "--task", "pusht", "--episodes", "1", "--max-steps", "5",
                      "--videos", "0", "--action-steps", "1", "--out-dir", str(one)]) == 0
    assert json.loads((one / "results.json").read_text())["action_steps"] == 1
    assert res["action_steps"] == 8   # the checkpoint's n_action_steps (configs/pusht_lowdim.yaml)
    for bad in ("0", "9"):
        assert eval_main(["--ckpt", str(run / "model.pt"), "--action-steps", bad, "--out-dir", str(one)]) == 1
    with pytest.raises(SystemExit):
        eval_main(["--ckpt", str(run / "model.pt"), "--weights", "int8", "--runtime", "torch", "--out-dir", str(again)])
