"""eval and export on checkpoints they cannot use: one error line naming the file and why, no traceback."""
from __future__ import annotations

import pytest

from dpag_engine.checkpoint import save_checkpoint
from dpag_engine.export import main as export_main

from factories import make_policy

pytest.importorskip("gym_pusht")
from dpag_engine.eval import main as eval_main, task_problem  # noqa: E402


def _ckpt(path, state_keys, **policy):
    return save_checkpoint(path, make_policy(**policy), metadata={"run_config": {"data": {"state_keys": state_keys}}})


def test_eval_names_the_tasks_a_ur5_checkpoint_fits(tmp_path, capsys):
    path = _ckpt(tmp_path / "model.pt", ["q", "goal"], state_dim=9, action_dim=6)
    assert eval_main(["--ckpt", str(path), "--task", "pusht", "--episodes", "1", "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: cannot be evaluated on pusht"), err
    assert "['q', 'goal']" in err and "ur5_reach" in err and "python -m dpag_engine.tasks --task ur5_reach --eval" in err
    assert "Traceback" not in err and not (tmp_path / "results.json").exists()


def test_task_problem_accepts_what_fits():
    pusht = make_policy(state_dim=20, action_dim=2).cfg  # DP's lowdim Push-T: keypoints (18) + agent (2)
    assert task_problem("pusht", pusht, ["keypoint", "state[:2]"], {}) is None
    assert task_problem("dynamic_pusht", make_policy(state_dim=24, action_dim=2).cfg,
                        ["keypoint", "state[:2]", "ball"], {}) is None
    assert "ball" in task_problem("pusht", pusht, ["keypoint", "ball"], {})  # dynamic_pusht only
    assert "20 state features" in task_problem("pusht", pusht, ["keypoint"], {})
    assert "6-D actions" in task_problem("pusht", make_policy(state_dim=20, action_dim=6).cfg,
                                         ["keypoint", "state[:2]"], {})


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("content", [b"\x00", b"PK\x03\x04 not really"])
def test_eval_and_export_print_checkpoint_errors(tmp_path, capsys, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    assert eval_main(["--ckpt", str(path), "--episodes", "1"]) == 1
    assert export_main(["--ckpt", str(path), "--out", str(tmp_path / "onnx")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert [ln.split(": unreadable")[0] for ln in err] == [f"error: {path}"] * 2, err
