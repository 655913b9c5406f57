"""bench/compare.py, the DP vs DP-AG driver behind bench/PUSHT.md: its aggregate against numpy on
result files with random numbers, and one whole tiny run of the reach task (commands and names)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "compare.py"
_spec = importlib.util.spec_from_file_location("compare", _PATH)
compare = importlib.util.module_from_spec(_spec)
sys.modules["compare"] = compare
_spec.loader.exec_module(compare)


def write_eval(run: Path, name: str, values: dict) -> None:
    (run / name).mkdir(parents=True)
    (run / name / "results.json").write_text(json.dumps(values))


def test_aggregate_means_stds_and_paired_differences(tmp_path):
    rng = np.random.default_rng()
    seeds = [0, 1, 2]
    cov = {row: rng.uniform(0.2, 0.9, 3) for row in ("dp", "dpag", "guided", "own", "a3", "ag3")}
    succ = {row: rng.uniform(0.0, 1.0, 3) for row in cov}
    jerk = {row: rng.uniform(10, 50, 3) for row in cov}
    runs = tmp_path / "out" / "runs"
    for i, seed in enumerate(seeds):
        for method in ("dp", "dpag"):
            run = runs / f"pusht_{method}_s{seed}_tau0.1"
            # "own": evaluated at the checkpoint's guidance (no slug); its row is named by what it recorded.
            rows = {"dp": "eval_pusht_dp_7", "a3": "eval_pusht_dp-a3_7"} if method == "dp" else {
                "dpag": "eval_pusht_dp_7", "guided": "eval_pusht_guided-gamma0.1_7", "own": "eval_pusht_guided_7",
                "ag3": "eval_pusht_dp-a3_7"}
            for row, name in rows.items():
                guidance = {"steps": 1, "dt": 1.0, "gamma": {"guided": 0.1, "own": 0.03}.get(row, 0.5), "eta": 0.0,
                            "normalize": True}
                write_eval(run, name, {"coverage_mean": cov[row][i], "success_rate": succ[row][i],
                                       "jerk_mean": jerk[row][i], "guidance": guidance,
                                       "action_steps": 3 if row in ("a3", "ag3") else 8})
    write_eval(runs / "pusht_dp_s0_tau0.1" / "eval_pusht_dp_99", "x", {})   # other episode counts: ignored
    args = argparse.Namespace(
        out=str(tmp_path / "out"), tasks=["pusht"], eval_episodes=7, curve_episodes=5,
        table=str(tmp_path / "t" / "table.md"), json=str(tmp_path / "t" / "r.json"))
    s = compare.aggregate(args)["tasks"]["pusht"]
    assert set(s["rows"]) == {"DP [tau0.1]", "DP-AG [tau0.1]", "DP-AG [tau0.1] guided (gamma0.1)",
                              "DP-AG [tau0.1] guided (gamma0.03)", "DP [tau0.1] (3 actions per plan)",
                              "DP-AG [tau0.1] (3 actions per plan)"}
    assert s["rows"]["DP [tau0.1] (3 actions per plan)"]["coverage_mean"]["mean"] == pytest.approx(cov["a3"].mean())
    assert s["rows"]["DP-AG [tau0.1] guided (gamma0.03)"]["coverage_mean"]["mean"] == pytest.approx(cov["own"].mean())
    got = s["rows"]["DP-AG [tau0.1] guided (gamma0.1)"]["coverage_mean"]
    assert got["mean"] == pytest.approx(cov["guided"].mean()) and got["std"] == pytest.approx(cov["guided"].std(ddof=1))
    # Rows with a tag pair only with the DP row of no tag; here there is none.
    assert s["paired_diff_vs_DP"] == {}
    table = (tmp_path / "t" / "table.md").read_text()
    assert f"{cov['dpag'].mean():.3f} ± {cov['dpag'].std(ddof=1):.3f}" in table

    for seed in seeds:   # the same runs without the tag: now DP is the baseline of the paired differences
        for run in runs.glob(f"pusht_*_s{seed}_tau0.1"):
            run.rename(run.with_name(run.name.removesuffix("_tau0.1")))
    s = compare.aggregate(args)["tasks"]["pusht"]
    d = s["paired_diff_vs_DP"]["DP-AG"]
    assert d["seeds"] == seeds
    np.testing.assert_allclose(d["coverage_mean"]["values"], cov["dpag"] - cov["dp"])
    assert d["jerk_mean"]["std"] == pytest.approx(np.std(jerk["dpag"] - jerk["dp"], ddof=1))
    # A row that replans every 3 actions pairs with DP replanning every 3, not with DP at 8.
    d3 = s["paired_diff_vs_DP"]["DP-AG (3 actions per plan)"]
    assert d3["baseline"] == "DP (3 actions per plan)" and "DP (3 actions per plan)" not in s["paired_diff_vs_DP"]
    np.testing.assert_allclose(d3["coverage_mean"]["values"], cov["ag3"] - cov["a3"])


def test_the_json_keeps_rows_whose_runs_are_gone(tmp_path):
    """Run directories are scratch, the aggregate JSON is committed: a fresh checkout that trains
    one more seed must keep every recorded seed, and a seed on disk replaces its record."""
    rng = np.random.default_rng()
    runs = tmp_path / "out" / "runs"
    cov = rng.uniform(0.2, 0.9, 4)

    def write(seed, task, value):
        write_eval(runs / f"{task}_dp_s{seed}", f"eval_{task}_dp_7",
                   {"coverage_mean": value, "success_rate": value / 2, "jerk_mean": 10 + value})

    args = argparse.Namespace(out=str(tmp_path / "out"), tasks=["pusht"], eval_episodes=7, curve_episodes=5,
                              table=str(tmp_path / "t" / "table.md"), json=str(tmp_path / "t" / "r.json"))
    write(0, "pusht", cov[0])
    write(1, "pusht", cov[1])
    (runs / "pusht_dp_s0" / "timing.json").write_text(json.dumps({"command": [sys.executable, "-m", "x"]}))
    assert compare.aggregate(args)["runs"]["pusht_dp_s0"]["command"] == ["python", "-m", "x"]  # no machine path
    (tmp_path / "out").rename(tmp_path / "gone")            # the next session's fresh checkout
    write(1, "pusht", cov[2])                                 # seed 1 retrained: replaces its record
    write(2, "pusht", cov[3])                                 # seed 2 new
    s = compare.aggregate(args)["tasks"]["pusht"]["rows"]["DP"]
    np.testing.assert_allclose(s["coverage_mean"]["values"], [cov[0], cov[2], cov[3]])
    assert s["seeds"] == [0, 1, 2]
    # A call for another task keeps this one's table.
    args.tasks = ["dynamic_pusht"]
    write(0, "dynamic_pusht", cov[1])
    table = compare.aggregate(args)
    assert set(table["tasks"]) == {"pusht", "dynamic_pusht"}
    assert f"| DP | 3 | {np.mean([cov[0], cov[2], cov[3]]):.3f}" in (tmp_path / "t" / "table.md").read_text()
    # A metric added later (DP's score): seeds evaluated before it lack it, and its cell says over which.
    (runs / "pusht_dp_s2" / "eval_pusht_dp_7" / "results.json").write_text(json.dumps(
        {"coverage_mean": cov[3], "score_mean": cov[3] + 0.01, "success_rate": 0.5, "jerk_mean": 11.0}))
    s = compare.aggregate(args)["tasks"]["pusht"]["rows"]["DP"]
    assert s["score_mean"]["values"] == [pytest.approx(cov[3] + 0.01)] and s["score_mean"]["seeds"] == [2]
    assert f"{cov[3] + 0.01:.3f} (1 of 3 seeds)" in (tmp_path / "t" / "table.md").read_text()
    # A different test-set size is another experiment: the record is not mixed in.
    args.eval_episodes = 9
    assert compare.aggregate(args)["tasks"]["dynamic_pusht"]["rows"] == {}


@pytest.mark.slow
def test_a_tiny_reach_comparison_runs_end_to_end(tmp_path):
    out = tmp_path / "out"
    code = compare.main(["--tasks", "ur5_reach", "--seeds", "0", "--steps", "12", "--recipe", "tiny",
                         "--episodes", "6", "--eval-episodes", "2", "--curve-every", "6", "--curve-episodes", "2",
                         "--guidance", "", "gamma=0.1,steps=2", "--out", str(out),
                         "--table", str(tmp_path / "t" / "table.md"), "--json", str(tmp_path / "t" / "r.json"),
                         "--set", "train.eval_every=6"])
    assert code == 0
    s = json.loads((tmp_path / "t" / "r.json").read_text())["tasks"]["ur5_reach"]
    # '' evaluates at the checkpoint's own policy.guidance: a fresh checkpoint's is the project default.
    default = compare.default_guidance()
    assert set(s["rows"]) == {"DP", "DP-AG", f"DP-AG guided ({compare.guidance_slug(default)}, default)",
                              "DP-AG guided (gamma0.1-steps2)"}
    sweep = json.loads((out / "runs" / "ur5_reach_dpag_s0" / "eval_ur5_reach_guided-gamma0.1-steps2_2"
                        / "results.json").read_text())
    assert sweep["mode"] == "guided" and sweep["guidance"]["gamma"] == 0.1 and sweep["guidance"]["steps"] == 2
    assert [p["step"] for p in s["curves"]["ur5_reach_dp_s0"]] == [6, 12]
    assert (tmp_path / "t" / "curves_ur5_reach.png").stat().st_size > 0


@pytest.mark.slow
def test_a_tiny_image_comparison_renders_its_camera_end_to_end(tmp_path):
    """pusht_image: demonstrations rendered with frames, a camera policy trained on them, and the
    evaluation rendering the same camera (a mapping slip anywhere fails here, not after a long run)."""
    out = tmp_path / "out"
    code = compare.main(["--tasks", "pusht_image", "--methods", "dp", "--seeds", "0", "--steps", "4",
                         "--recipe", "tiny", "--episodes", "2", "--eval-episodes", "1", "--no-expert",
                         "--out", str(out), "--table", str(tmp_path / "t" / "table.md"),
                         "--json", str(tmp_path / "t" / "r.json"), "--set", "train.eval_every=2"])
    assert code == 0
    import zarr
    frames = zarr.open_group(str(out / "data" / "pusht_image_2.zarr"), mode="r")["data"]["img"]
    assert frames.shape[1:] == (96, 96, 3) and float(np.asarray(frames[:4]).std()) > 0
    res = json.loads((out / "runs" / "pusht_image_dp_s0" / "eval_pusht_image_dp_1" / "results.json").read_text())
    assert res["episodes"] == 1 and 0.0 <= res["coverage_mean"] <= 1.0
    row = json.loads((tmp_path / "t" / "r.json").read_text())["tasks"]["pusht_image"]["rows"]["DP"]
    assert row["by_seed"]["0"]["coverage_mean"] == pytest.approx(res["coverage_mean"])
