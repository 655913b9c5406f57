"""DP vs DP-AG on Push-T keypoints and Dynamic Push-T keypoints: one resumable driver.

    PYTHONPATH=$PWD python bench/pusht_compare.py                        # the CPU budget of bench/PUSHT.md
    PYTHONPATH=$PWD python bench/pusht_compare.py --aggregate-only       # rebuild the table from finished runs
    bash bench/pusht_compare_gpu.sh                                      # the paper's recipe, on a GPU

What it does, in order, skipping every piece whose output already exists (so a killed run is
continued by running the same command again):

1. data: `python -m dpag_engine.envs.generate` writes --episodes scripted-expert demonstrations per
   task (reset seeds 0.., failed episodes dropped) unless the zarr is already there;
2. ceiling: the scripted expert itself on the evaluation seeds (100000..), per task;
3. for each training seed, task and method (dp, dpag): `python -m dpag_engine.train` with the same
   config, data, steps, batch and seed for both methods, then `python -m dpag_engine.eval` on the
   same test seeds: dp checkpoints in dp mode (row "DP"), dpag checkpoints in dp mode (row "DP-AG")
   and in guided mode (row "DP-AG guided");
4. aggregate: per row, the mean and the sample std (ddof=1) over training seeds of each seed's mean
   coverage / success rate / action jerk, plus the per-seed paired difference DP-AG - DP;
   written as markdown (--table) and JSON (--json).

Seed-major order (all tasks and methods of seed 0, then seed 1, ...): a run stopped early leaves
complete rows over fewer seeds rather than a missing task.

Every subprocess runs with OMP/MKL threads = --threads (torch reads OMP_NUM_THREADS at start); run
the whole driver under `nice` on a shared machine. Logs: <out>/runs/<run>/train.log, eval_*/eval.log.
Variations (e.g. a DP-AG loss weight): `--methods dpag --seeds 0 --set policy.loss.tau=0.1
--tag tau0.1` trains into a separate run directory; the aggregate lists each tag as its own rows.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TASK_NAMES = {"pusht": "Push-T keypoints", "dynamic_pusht": "Dynamic Push-T keypoints"}
# What the policy sees, per task: DP's keypoint observation (9 keypoints + agent xy); the dynamic
# variant adds the ball (x, y, vx, vy) so the disturbance is observable.
STATE_KEYS = {"pusht": ["keypoint", "state[:2]"], "dynamic_pusht": ["keypoint", "state[:2]", "ball"]}
# (row name, training method, inference mode)
ROWS = [("DP", "dp", "dp"), ("DP-AG", "dpag", "dp"), ("DP-AG guided", "dpag", "guided")]
TEST_START_SEED = 100000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())} UTC] {msg}", flush=True)


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    return env


def run_logged(cmd: list[str], logfile: Path, env: dict[str, str]) -> float:
    """Run cmd with stdout+stderr appended to logfile; raise on failure; return wall seconds."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with logfile.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if rc != 0:
        tail = logfile.read_text().splitlines()[-15:]
        raise RuntimeError(f"exit {rc}: {' '.join(cmd)}\n  log {logfile}:\n    " + "\n    ".join(tail))
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
def data_path(args, task: str) -> Path:
    return Path(args.out) / "data" / f"{task}_{args.episodes}.zarr"


def ensure_data(args, task: str, env) -> Path:
    path = data_path(args, task)
    if (path / "meta").exists():
        return path
    log(f"data: generating {args.episodes} expert episodes of {task} -> {path}")
    if path.exists():
        shutil.rmtree(path)  # a partial write from a killed run
    secs = run_logged([sys.executable, "-m", "dpag_engine.envs.generate", "--out", str(path), "--task", task,
                       "--episodes", str(args.episodes), "--workers", str(args.workers)],
                      Path(args.out) / "logs" / f"generate_{task}.log", env)
    log(f"data: {task} done in {secs:.0f} s")
    return path


def expert_ceiling(args, task: str) -> dict:
    """The scripted expert on the evaluation seeds (the demonstrator's coverage: the table's ceiling)."""
    path = Path(args.out) / "expert" / f"{task}_{args.eval_episodes}.json"
    if path.exists():
        return json.loads(path.read_text())
    from dpag_engine.envs.dynamic_pusht import make_task
    from dpag_engine.envs.expert import run_expert_episode
    from dpag_engine.eval import action_jerk
    log(f"expert: {task} on {args.eval_episodes} test seeds")
    t0 = time.perf_counter()
    eps = []
    for i in range(args.eval_episodes):
        t = make_task(task)
        seed = TEST_START_SEED + i
        ep = run_expert_episode(t, seed)
        eps.append({"seed": seed, "max_coverage": t.max_coverage, "success": t.success, "steps": t.steps,
                    "jerk": action_jerk(ep["action"])})
    cov = np.array([e["max_coverage"] for e in eps])
    res = {"task": task, "episodes": len(eps), "start_seed": TEST_START_SEED, "coverage_mean": float(cov.mean()),
           "coverage_std": float(cov.std()), "success_rate": float(np.mean([e["success"] for e in eps])),
           "jerk_mean": float(np.mean([e["jerk"] for e in eps])), "seconds": round(time.perf_counter() - t0, 1),
           "per_episode": eps}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    log(f"expert: {task} coverage {res['coverage_mean']:.3f}, success {res['success_rate']:.0%} ({res['seconds']} s)")
    return res


def run_dir(args, task: str, method: str, seed: int) -> Path:
    name = f"{task}_{method}_s{seed}" + (f"_{args.tag}" if args.tag else "")
    return Path(args.out) / "runs" / name


def train(args, task: str, method: str, seed: int, data: Path, env) -> Path:
    out = run_dir(args, task, method, seed)
    model = out / "model.pt"
    if model.exists():
        from dpag_engine.checkpoint import load_checkpoint
        done = load_checkpoint(model)["metadata"].get("run_config", {}).get("train", {}).get("steps")
        if done is not None and int(done) != args.steps:
            raise SystemExit(f"{model} was trained for {done} steps, not --steps {args.steps}: "
                             f"use another --out (or --tag) for a different budget")
        return model
    cmd = [sys.executable, "-m", "dpag_engine.train", "--config", args.config, "--method", method,
           "--data", str(data), "--out-dir", str(out),
           f"data.state_keys={json.dumps(STATE_KEYS[task])}", f"train.seed={seed}", f"train.steps={args.steps}"]
    if args.batch_size:
        cmd.append(f"train.batch_size={args.batch_size}")
    if args.recipe:
        cmd.append(f"policy.recipe={args.recipe}")
    cmd += list(args.set)
    if list(out.glob("checkpoints/step_*/training_state.pt")):  # a killed run with periodic checkpoints
        cmd = [sys.executable, "-m", "dpag_engine.train", "--resume", str(out)]
        log(f"train: resuming {out.name}")
    else:
        if out.exists():
            shutil.rmtree(out)  # a killed run with nothing to resume from
        log(f"train: {out.name} ({args.steps} steps)")
    secs = run_logged(cmd, out / "train.log", env)
    meta = {"train_seconds": round(secs, 1), "command": cmd}
    (out / "timing.json").write_text(json.dumps(meta, indent=1))
    log(f"train: {out.name} done in {secs:.0f} s ({args.steps / secs:.1f} steps/s)")
    return model


def evaluate(args, task: str, model: Path, mode: str, env) -> dict:
    out = model.parent / f"eval_{task}_{mode}_{args.eval_episodes}"
    res_path = out / "results.json"
    if res_path.exists():
        return json.loads(res_path.read_text())
    log(f"eval: {model.parent.name} mode={mode} on {args.eval_episodes} test seeds")
    secs = run_logged([sys.executable, "-m", "dpag_engine.eval", "--ckpt", str(model), "--task", task,
                       "--episodes", str(args.eval_episodes), "--workers", str(args.workers), "--mode", mode,
                       "--videos", str(args.videos), "--out-dir", str(out)], out / "eval.log", env)
    res = json.loads(res_path.read_text())
    log(f"eval: {model.parent.name} {mode}: coverage {res['coverage_mean']:.3f}, success {res['success_rate']:.0%}, "
        f"jerk {res['jerk_mean']:.2f} ({secs:.0f} s)")
    return res


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------
def _ms(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float("nan")


def _fmt(m: float, s: float, digits: int = 3) -> str:
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def run_details(args, runs_root: Path) -> dict:
    """Per run: training wall time, final validation row of log.csv, and each evaluation's summary
    with the per-episode max coverage (small enough to publish)."""
    import csv
    out = {}
    for rd in sorted(runs_root.glob("*_s*")) if runs_root.exists() else []:
        info: dict = {}
        if (rd / "timing.json").exists():
            info["train_seconds"] = json.loads((rd / "timing.json").read_text())["train_seconds"]
        if (rd / "log.csv").exists():
            with (rd / "log.csv").open() as f:
                val = [r for r in csv.DictReader(f) if r["split"] == "val"]
            if val:
                info["final_val"] = {k: float(v) for k, v in val[-1].items() if v not in ("", None) and k not in ("split",)}
        for rp in sorted(rd.glob(f"eval_*_{args.eval_episodes}/results.json")):
            r = json.loads(rp.read_text())
            info[f"eval_{r['mode']}"] = {k: r[k] for k in ("coverage_mean", "coverage_std", "success_rate", "jerk_mean",
                                                           "episodes", "seconds")}
            info[f"eval_{r['mode']}"]["max_coverage"] = [round(e["max_coverage"], 4) for e in r["per_episode"]]
        if info:
            out[rd.name] = info
    return out


def aggregate(args) -> dict:
    runs_root = Path(args.out) / "runs"
    summary: dict = {"settings": {k: v for k, v in vars(args).items() if k not in ("aggregate_only",)},
                     "std": "sample std (ddof=1) over training seeds of per-seed means", "tasks": {}}
    lines = [f"Coverage / success: mean ± std over training seeds (each seed's value is the mean over "
             f"{args.eval_episodes} test episodes, seeds {TEST_START_SEED}..{TEST_START_SEED + args.eval_episodes - 1}); "
             f"jerk: mean action jerk (px/step³, lower is smoother).", ""]
    tags = sorted({p.name.split("_s", 1)[1].partition("_")[2] for p in runs_root.glob("*_s*")} if runs_root.exists() else {""})
    for task in args.tasks:
        expert_file = Path(args.out) / "expert" / f"{task}_{args.eval_episodes}.json"
        expert = json.loads(expert_file.read_text()) if expert_file.exists() else None
        tsum: dict = {"rows": {}, "expert": None}
        lines += [f"### {TASK_NAMES[task]}", "",
                  "| row | training seeds | coverage | success rate | action jerk | per-seed coverage |",
                  "|---|---|---|---|---|---|"]
        per_row_seed_cov: dict[str, dict[int, float]] = {}
        for tag in tags:
            for row, method, mode in ROWS:
                seeds, cov, succ, jerk = [], [], [], []
                for rd in sorted(runs_root.glob(f"{task}_{method}_s*")):
                    rest = rd.name[len(f"{task}_{method}_s"):]
                    seed_s, _, rtag = rest.partition("_")
                    if rtag != tag or not seed_s.isdigit():
                        continue
                    rp = rd / f"eval_{task}_{mode}_{args.eval_episodes}" / "results.json"
                    if not rp.exists():
                        continue
                    r = json.loads(rp.read_text())
                    seeds.append(int(seed_s))
                    cov.append(r["coverage_mean"])
                    succ.append(r["success_rate"])
                    jerk.append(r["jerk_mean"])
                if not seeds:
                    continue
                name = row + (f" [{tag}]" if tag else "")
                order = np.argsort(seeds)
                seeds, cov, succ, jerk = ([x[i] for i in order] for x in (seeds, cov, succ, jerk))
                per_row_seed_cov[name] = dict(zip(seeds, cov))
                cm, cs = _ms(cov)
                sm, ss = _ms(succ)
                jm, js = _ms(jerk)
                tsum["rows"][name] = {"method": method, "mode": mode, "tag": tag, "seeds": seeds, "coverage": cov,
                                      "success": succ, "jerk": jerk, "coverage_mean": cm, "coverage_std": cs,
                                      "success_mean": sm, "success_std": ss, "jerk_mean": jm, "jerk_std": js}
                lines.append(f"| {name} | {len(seeds)} | {_fmt(cm, cs)} | {_fmt(sm, ss, 2)} | {_fmt(jm, js, 2)} | "
                             + ", ".join(f"{c:.3f}" for c in cov) + " |")
        if expert:
            tsum["expert"] = {k: expert[k] for k in ("episodes", "coverage_mean", "success_rate", "jerk_mean")}
            lines.append(f"| scripted expert (ceiling) | – | {expert['coverage_mean']:.3f} | "
                         f"{expert['success_rate']:.2f} | {expert['jerk_mean']:.2f} | – |")
        # Paired differences (same training seed, same data, same test seeds).
        base = per_row_seed_cov.get("DP", {})
        diffs = {}
        for name, by_seed in per_row_seed_cov.items():
            if name == "DP":
                continue
            common = sorted(set(base) & set(by_seed))
            if common:
                d = [by_seed[s] - base[s] for s in common]
                dm, ds = _ms(d)
                diffs[name] = {"seeds": common, "diff": d, "mean": dm, "std": ds}
        tsum["paired_diff_vs_DP"] = diffs
        if diffs:
            lines += ["", "Paired coverage difference vs DP (same training seed): "
                      + "; ".join(f"{n} − DP = {_fmt(v['mean'], v['std'])} over seeds {v['seeds']}"
                                  for n, v in diffs.items())]
        lines.append("")
        summary["tasks"][task] = tsum
    summary["runs"] = run_details(args, runs_root)
    table = "\n".join(lines)
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(table + "\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    print(table)
    return summary


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["pusht", "dynamic_pusht"], choices=list(TASK_NAMES))
    p.add_argument("--methods", nargs="+", default=["dp", "dpag"], choices=["dp", "dpag"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (train.seed)")
    p.add_argument("--config", default="configs/pusht_cpu_small.yaml", help="base training config (both methods)")
    p.add_argument("--recipe", help="policy.recipe override (tiny, lowdim, ...); default: the config's")
    p.add_argument("--steps", type=int, default=4000, help="optimiser steps per run (train.steps)")
    p.add_argument("--batch-size", type=int, help="train.batch_size override; default: the config's")
    p.add_argument("--set", nargs="*", default=[], metavar="section.key=value",
                   help="extra training overrides for every run of this call (use with --tag)")
    p.add_argument("--tag", default="", help="run-name suffix for a variation (its own rows in the table)")
    p.add_argument("--episodes", type=int, default=200, help="expert demonstrations generated per task")
    p.add_argument("--eval-episodes", type=int, default=20, help="test episodes per checkpoint and mode")
    p.add_argument("--videos", type=int, default=0, help="GIFs saved per evaluation")
    p.add_argument("--no-guided", action="store_true", help="skip the guided-mode row")
    p.add_argument("--no-expert", action="store_true", help="skip the expert ceiling")
    p.add_argument("--workers", type=int, default=1, help="processes for generation and evaluation")
    p.add_argument("--threads", type=int, default=1, help="torch/OMP threads per process")
    p.add_argument("--out", default="outputs/pusht_compare", help="data, runs, evaluations")
    p.add_argument("--table", default="bench/pusht/table.md", help="markdown table written here")
    p.add_argument("--json", default="bench/pusht/results.json", help="aggregate JSON written here")
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild the table from finished runs")
    args = p.parse_args(argv)
    if args.aggregate_only:
        aggregate(args)
        return 0
    os.environ.update({k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    env = child_env(args.threads)
    t0 = time.perf_counter()
    data = {task: ensure_data(args, task, env) for task in args.tasks}
    if not args.no_expert:
        for task in args.tasks:
            expert_ceiling(args, task)
    jobs = [(seed, task, method) for seed in args.seeds for task in args.tasks for method in args.methods]
    for i, (seed, task, method) in enumerate(jobs):
        log(f"job {i + 1}/{len(jobs)}: {task} {method} seed {seed} (elapsed {(time.perf_counter() - t0) / 60:.1f} min)")
        model = train(args, task, method, seed, data[task], env)
        modes = ["dp"] if method == "dp" or args.no_guided else ["dp", "guided"]
        for mode in modes:
            evaluate(args, task, model, mode, env)
        aggregate_quiet(args)
    log(f"all done in {(time.perf_counter() - t0) / 60:.1f} min")
    aggregate(args)
    return 0


def aggregate_quiet(args) -> None:
    """Refresh the table after every job, so a stopped run still leaves its finished rows."""
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        aggregate(args)


if __name__ == "__main__":
    raise SystemExit(main())
