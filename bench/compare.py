"""DP vs DP-AG on Push-T keypoints, Dynamic Push-T keypoints and the UR5 reach task: one resumable driver.

    PYTHONPATH=$PWD python bench/compare.py                                   # the CPU budget of bench/PUSHT.md
    PYTHONPATH=$PWD python bench/compare.py --tasks ur5_reach --seeds 0 1 2   # the reach-task comparison
    PYTHONPATH=$PWD python bench/compare.py --aggregate-only                  # rebuild the tables from finished runs
    bash bench/pusht_compare_gpu.sh                                           # the paper's recipe, on a GPU

What it does, in order, skipping every piece whose output already exists (so a killed run is
continued by running the same command again):

1. data: --episodes scripted-expert demonstrations per task (Push-T: `python -m dpag_engine.envs.generate`,
   reset seeds 0.., failed episodes dropped; reach: `python -m dpag_engine.tasks --out`, seed 0);
2. ceiling: the Push-T scripted expert itself on the evaluation seeds (100000..);
3. for each training seed, task and method (dp, dpag): `python -m dpag_engine.train` with the task's
   config and the same data, steps, batch and seed for both methods, then the task's evaluator on
   the same held-out episodes (Push-T: `python -m dpag_engine.eval`; reach: `python -m
   dpag_engine.tasks --eval`, the kinematic cell): dp checkpoints in dp mode (row "DP"), dpag
   checkpoints in dp mode (row "DP-AG") and in guided mode, once per --guidance setting
   (rows "DP-AG guided (...)"). With --curve-every N the run also saves every N steps and each saved
   checkpoint is evaluated on --curve-episodes episodes: the learning curve (metric vs steps;
   the run's minutes at each point are in the JSON);
4. aggregate: per row, the mean and the sample std (ddof=1) over training seeds of each seed's
   metrics, plus the per-seed paired difference against DP; markdown (--table), JSON (--json) and
   the learning-curve plot (curves_<task>.png beside the table; against steps and minutes).
   The JSON is also the record: --out is scratch, so the aggregate starts from the rows the JSON
   holds and lays the runs found under --out over them (a seed on disk replaces its record);
   every recorded task stays in the table.

Seed-major order (all tasks and methods of seed 0, then seed 1, ...): a run stopped early leaves
complete rows over fewer seeds rather than a missing task.

Every subprocess runs with OMP/MKL threads = --threads (torch reads OMP_NUM_THREADS at start); run
the whole driver under `nice` on a shared machine. Logs: <out>/runs/<run>/train.log, eval_*/eval.log.
Variations (e.g. a DP-AG loss weight): `--methods dpag --seeds 0 --set policy.loss.tau=0.1
--tag tau0.1` trains into a separate run directory; the aggregate lists each tag as its own rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Metric:
    name: str        # column title
    key: str         # in the evaluator's results.json
    digits: int


@dataclass(frozen=True)
class TaskDef:
    title: str
    config: str                    # base training config (both methods)
    state_keys: list[str] | None   # data.state_keys override (None: the config's)
    metrics: tuple[Metric, ...]    # the first is the one the curves and paired differences use
    pusht: bool                    # evaluated by dpag_engine.eval (else by dpag_engine.tasks --eval)
    env: str = ""                  # the environment it runs in, if not the task's name
    image: bool = False            # demonstrations rendered with their camera frames (data/img)


# DP's score is what DP reports (the mean of each episode's max clip(coverage / 0.95, 0, 1));
# coverage is the raw max coverage, which a score of 1 does not distinguish past 0.95.
PUSHT_METRICS = (Metric("coverage", "coverage_mean", 3), Metric("DP score", "score_mean", 3),
                 Metric("success rate", "success_rate", 2), Metric("action jerk (px/step³)", "jerk_mean", 2))
# What the policy sees, per task: DP's keypoint observation (9 keypoints + agent xy); the dynamic
# variant adds the ball (x, y, vx, vy) so the disturbance is observable.
TASKS = {
    "pusht": TaskDef("Push-T keypoints", "configs/pusht_cpu_small.yaml", ["keypoint", "state[:2]"], PUSHT_METRICS, True),
    "dynamic_pusht": TaskDef("Dynamic Push-T keypoints", "configs/pusht_cpu_small.yaml",
                             ["keypoint", "state[:2]", "ball"], PUSHT_METRICS, True),
    # Push-T seen through its 96x96 camera plus the agent position (the config's mapping).
    "pusht_image": TaskDef("Push-T from images", "configs/pusht_image_cpu_small.yaml", None, PUSHT_METRICS, True,
                           env="pusht", image=True),
    "ur5_reach": TaskDef("UR5 reach (kinematic cell)", "configs/ur5_reach.toml", None,
                         (Metric("success rate", "success_rate", 2), Metric("collision rate", "collision_rate", 2),
                          Metric("joint jerk (rad/s³)", "mean_jerk", 1)), False),
}
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
def env_name(task: str) -> str:
    return TASKS[task].env or task


def data_path(args, task: str) -> Path:
    return Path(args.out) / "data" / f"{task}_{args.episodes}.zarr"


def ensure_data(args, task: str, env) -> Path:
    path = data_path(args, task)
    if (path / "meta").exists():
        return path
    log(f"data: generating {args.episodes} expert episodes of {task} -> {path}")
    if path.exists():
        shutil.rmtree(path)  # a partial write from a killed run
    if TASKS[task].pusht:
        cmd = [sys.executable, "-m", "dpag_engine.envs.generate", "--out", str(path), "--task", env_name(task),
               "--episodes", str(args.episodes), "--workers", str(args.workers)] + (["--image"] * TASKS[task].image)
    else:
        cmd = [sys.executable, "-m", "dpag_engine.tasks", "--task", task, "--out", str(path),
               "--episodes", str(args.episodes), "--seed", "0"]
    secs = run_logged(cmd, Path(args.out) / "logs" / f"generate_{task}.log", env)
    log(f"data: {task} done in {secs:.0f} s")
    return path


def expert_ceiling(args, task: str) -> dict | None:
    """The Push-T scripted expert on the evaluation seeds (the demonstrator's coverage: the ceiling)."""
    if not TASKS[task].pusht:
        return None
    path = Path(args.out) / "expert" / f"{task}_{args.eval_episodes}.json"
    if path.exists():
        return json.loads(path.read_text())
    from dpag_engine.envs.dynamic_pusht import make_task
    from dpag_engine.envs.expert import run_expert_episode
    from dpag_engine.eval import episode_record, summarize
    log(f"expert: {task} on {args.eval_episodes} test seeds")
    t0 = time.perf_counter()
    eps = []
    for i in range(args.eval_episodes):
        t = make_task(env_name(task))
        seed = TEST_START_SEED + i
        eps.append(episode_record(t, seed, run_expert_episode(t, seed)["action"]))
    res = {"task": task, "start_seed": TEST_START_SEED, **summarize(eps), "seconds": round(time.perf_counter() - t0, 1),
           "per_episode": eps}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    log(f"expert: {task} DP score {res['score_mean']:.3f}, coverage {res['coverage_mean']:.3f}, success {res['success_rate']:.0%} ({res['seconds']} s)")
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
        if args.steps and done is not None and int(done) != args.steps:
            raise SystemExit(f"{model} was trained for {done} steps, not --steps {args.steps}: "
                             f"use another --out (or --tag) for a different budget")
        return model
    tdef = TASKS[task]
    cmd = [sys.executable, "-m", "dpag_engine.train", "--config", args.config or tdef.config, "--method", method,
           "--data", str(data), "--out-dir", str(out), f"train.seed={seed}"]
    if tdef.state_keys:
        cmd.append(f"data.state_keys={json.dumps(tdef.state_keys)}")
    if args.steps:
        cmd.append(f"train.steps={args.steps}")
    if args.batch_size:
        cmd.append(f"train.batch_size={args.batch_size}")
    if args.recipe:
        cmd.append(f"policy.recipe={args.recipe}")
    if args.curve_every:
        cmd += [f"train.save_every={args.curve_every}", "train.keep_checkpoints=0"]
    cmd += list(args.set)
    if list(out.glob("checkpoints/step_*/training_state.pt")):  # a killed run with periodic checkpoints
        cmd = [sys.executable, "-m", "dpag_engine.train", "--resume", str(out)]
        log(f"train: resuming {out.name}")
    else:
        if out.exists():
            shutil.rmtree(out)  # a killed run with nothing to resume from
        log(f"train: {out.name}")
    secs = run_logged(cmd, out / "train.log", env)
    meta = {"train_seconds": round(secs, 1), "command": cmd}
    (out / "timing.json").write_text(json.dumps(meta, indent=1))
    log(f"train: {out.name} done in {secs:.0f} s")
    return model


def guidance_slug(guidance: str) -> str:
    """"gamma=0.1,steps=2" -> "gamma0.1-steps2" (a directory-name piece); "" -> "" (the checkpoint's)."""
    return "-".join(part.replace("=", "") for part in guidance.replace(" ", "").split(",") if part)


def _guidance_fields(latent: dict) -> list[str]:
    """gamma always, then each other field that differs from the project's default guidance."""
    from dpag_engine.config import PolicyConfig
    default = dataclasses.asdict(PolicyConfig.__dataclass_fields__["guidance"].default_factory())
    return [f"gamma={latent['gamma']}"] + [f"{k}={latent[k]}" for k in default
                                           if k != "gamma" and k in latent and latent[k] != default[k]]


def default_guidance() -> str:
    """The project's default guided setting as a --guidance string ("gamma=0.01"). The evaluators
    would otherwise use each checkpoint's own policy.guidance, which is whatever the default was
    when it was trained: seeds trained months apart would then be averaged over different settings."""
    from dpag_engine.config import PolicyConfig
    return ",".join(_guidance_fields(dataclasses.asdict(PolicyConfig.__dataclass_fields__["guidance"].default_factory())))


def guidance_label(latent: dict) -> str:
    """A guided row's name from the setting its evaluation recorded: "gamma0.01, default"."""
    label = guidance_slug(",".join(_guidance_fields(latent)))
    return label + (", default" if ",".join(_guidance_fields(latent)) == default_guidance() else "")


def eval_dir(model: Path, task: str, mode: str, guidance: str, episodes: int, action_steps: int | None = None) -> Path:
    slug = guidance_slug(guidance) if mode == "guided" else f"a{action_steps}" if action_steps else ""
    return model.parent / f"eval_{task}_{mode}{'-' + slug if slug else ''}_{episodes}"


def evaluate(args, task: str, model: Path, mode: str, env, guidance: str = "", episodes: int | None = None,
             out: Path | None = None, action_steps: int | None = None) -> dict:
    episodes = episodes or args.eval_episodes
    out = out or eval_dir(model, task, mode, guidance, episodes, action_steps)
    res_path = out / "results.json"
    if res_path.exists():
        return json.loads(res_path.read_text())
    what = f"mode={mode} {guidance}" + (f" {action_steps} actions per plan" if action_steps else "")
    log(f"eval: {model.parent.name}/{model.name} {what} on {episodes} held-out episodes")
    if TASKS[task].pusht:
        cmd = [sys.executable, "-m", "dpag_engine.eval", "--ckpt", str(model), "--task", env_name(task),
               "--episodes", str(episodes), "--workers", str(args.workers), "--mode", mode,
               "--videos", str(args.videos), "--out-dir", str(out)]
    else:
        cmd = [sys.executable, "-m", "dpag_engine.tasks", "--task", task, "--eval", str(model),
               "--episodes", str(episodes), "--mode", mode, "--json", str(res_path)]
    if mode == "guided" and guidance:
        cmd.append(f"--guidance={guidance}")
    if action_steps:
        cmd.append(f"--action-steps={action_steps}")
    secs = run_logged(cmd, out / "eval.log", env)
    res = json.loads(res_path.read_text())
    log(f"eval: {model.parent.name} {what}: "
        + ", ".join(f"{m.name} {res[m.key]:.{m.digits}f}" for m in TASKS[task].metrics) + f" ({secs:.0f} s)")
    return res


def curve(args, task: str, model: Path, env) -> None:
    """Evaluate every periodic checkpoint of a run (dp mode): the learning curve's points."""
    for ckpt in sorted(model.parent.glob("checkpoints/step_*/model.pt")):
        evaluate(args, task, ckpt, "dp", env, episodes=args.curve_episodes,
                 out=ckpt.parent / f"eval_{task}_dp_{args.curve_episodes}")


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------
def _ms(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float("nan")


def _fmt(m: float, s: float, digits: int = 3) -> str:
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def final_val(rd: Path) -> dict:
    import csv
    if not (rd / "log.csv").exists():
        return {}
    with (rd / "log.csv").open() as f:
        val = [r for r in csv.DictReader(f) if r["split"] == "val"]
    return {k: float(v) for k, v in val[-1].items() if v not in ("", None) and k != "split"} if val else {}


def curve_points(rd: Path, task: str, episodes: int) -> list[dict]:
    """(step, training minutes, metric) per evaluated checkpoint of a run."""
    import csv
    minutes = {}
    if (rd / "log.csv").exists():
        with (rd / "log.csv").open() as f:
            for r in csv.DictReader(f):
                if r["split"] == "train" and r.get("elapsed_s"):
                    minutes[int(r["step"])] = float(r["elapsed_s"]) / 60
    key = TASKS[task].metrics[0].key
    points = []
    for rp in sorted(rd.glob(f"checkpoints/step_*/eval_{task}_dp_{episodes}/results.json")):
        step = int(re.search(r"step_(\d+)", str(rp)).group(1))
        near = min(minutes, key=lambda s: abs(s - step)) if minutes else None
        points.append({"step": step, "minutes": minutes.get(near), "value": json.loads(rp.read_text())[key]})
    return points


def plot_curves(task: str, curves: dict[str, list[dict]], path: Path) -> None:
    """The metric against optimiser steps and against each run's own training minutes (on a shared
    machine a run's clock measures its neighbours too, so the steps panel is the comparable one)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0), sharey=True)
    colours = {"dp": "tab:blue", "dpag": "tab:red"}
    for name, pts in sorted(curves.items()):
        m = re.search(r"_(dp|dpag)_s(\d+)", name)
        # colour = method, line style = training seed
        style = dict(ms=3, color=colours.get(m[1]), alpha=0.8, ls=("-", "--", ":", "-.")[int(m[2]) % 4],
                     marker="o", label=name.split(f"{task}_", 1)[-1])
        axes[0].plot([p["step"] for p in pts], [p["value"] for p in pts], **style)
        timed = [p for p in pts if p["minutes"] is not None]
        axes[1].plot([p["minutes"] for p in timed], [p["value"] for p in timed], **style)
    for ax, xlabel in zip(axes, ("optimiser steps", "training minutes (the run's own clock)")):
        ax.set_xlabel(xlabel)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(TASKS[task].metrics[0].name)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{TASKS[task].title}: learning curves (dp sampling)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curves_path(args, task: str) -> Path:
    """curves_<task>.png beside the table; a second table (table_25k.md) gets curves_<task>_25k.png."""
    table = Path(args.table)
    return table.parent / f"curves_{task}{table.stem.removeprefix('table')}.png"


def _ledger(args) -> dict:
    """The aggregate written last time (--json): the durable record of every finished evaluation.
    Run directories are scratch (a fresh checkout has none); the JSON is committed, so rows whose
    runs are gone stay in the table, and a run present on disk replaces its recorded seed."""
    path = Path(args.json) if args.json else None
    if not path or not path.exists():
        return {}
    prev = json.loads(path.read_text())
    episodes = prev.get("eval_episodes", prev.get("settings", {}).get("eval_episodes"))
    return prev if episodes == args.eval_episodes else {}


def _disk_rows(task: str, runs: list, episodes: int) -> dict[str, dict]:
    """Row name -> {method, mode, guidance, tag, by_seed: {seed: metrics}} from the run directories."""
    rows: dict[str, dict] = {}
    for m, rd in runs:
        if m["task"] != task:
            continue
        for ep in sorted(rd.glob(f"eval_{task}_*_{episodes}")):
            if not (ep / "results.json").exists():
                continue
            mode, _, variant = ep.name[len(f"eval_{task}_"):-len(f"_{episodes}")].partition("-")
            r = json.loads((ep / "results.json").read_text())
            # "DP-AG [tag] guided (gamma0.3)": the training variation, then the inference setting
            # the evaluation recorded (not the directory's name, which may say "the checkpoint's").
            gslug = guidance_label(r["guidance"]) if mode == "guided" else ""
            steps = r["action_steps"] if mode == "dp" and variant else None   # dp-a3: --action-steps 3
            name = {"dp": "DP"}.get(m["method"], "DP-AG") + (f" [{m['tag']}]" if m["tag"] else "")
            name += f" guided ({gslug})" if mode == "guided" else f" ({steps} actions per plan)" if steps else ""
            row = rows.setdefault(name, {"method": m["method"], "mode": mode, "guidance": gslug,
                                         "tag": m["tag"] or "", "by_seed": {}})
            # (an evaluation written before a metric existed lacks it: that seed's cell skips it)
            row["by_seed"][int(m["seed"])] = {x.key: r[x.key] for x in TASKS[task].metrics if x.key in r}
    return rows


def portable(run: dict) -> dict:
    """A run's record without this machine's interpreter path (the JSON is committed)."""
    cmd = run.get("command")
    return run | {"command": ["python", *cmd[1:]]} if cmd and Path(cmd[0]).is_absolute() else run


def aggregate(args) -> dict:
    runs_root = Path(args.out) / "runs"
    prev = _ledger(args)
    summary: dict = {"eval_episodes": args.eval_episodes,
                     "std": "sample std (ddof=1) over training seeds of per-seed means", "tasks": {}}
    lines = [f"Each seed's value is the mean over {args.eval_episodes} held-out episodes; mean ± std over "
             f"training seeds. Paired differences are per training seed (same data, same test episodes).", ""]
    run_re = re.compile(r"^(?P<task>.+)_(?P<method>dp|dpag)_s(?P<seed>\d+)(?:_(?P<tag>.+))?$")
    runs = [(m, rd) for rd in sorted(runs_root.iterdir()) if (m := run_re.match(rd.name))] \
        if runs_root.exists() else []
    table_dir = Path(args.table).parent
    table_dir.mkdir(parents=True, exist_ok=True)
    # Every task recorded or asked for, so a call for one task keeps the others' tables.
    tasks = [t for t in TASKS if t in args.tasks or t in prev.get("tasks", {})]
    for task in tasks:
        tdef = TASKS[task]
        before = prev.get("tasks", {}).get(task, {})
        expert_file = Path(args.out) / "expert" / f"{task}_{args.eval_episodes}.json"
        expert = json.loads(expert_file.read_text()) if expert_file.exists() else before.get("expert")
        rows = {name: {k: row[k] for k in ("method", "mode", "guidance", "tag")}
                | {"by_seed": {int(sd): v for sd, v in row["by_seed"].items()}}
                for name, row in before.get("rows", {}).items()}
        for name, row in _disk_rows(task, runs, args.eval_episodes).items():
            rows.setdefault(name, row)["by_seed"].update(row["by_seed"])
        tsum: dict = {"rows": {}, "expert": None}
        lines += [f"### {tdef.title}", "",
                  "| row | training seeds | " + " | ".join(x.name for x in tdef.metrics) + f" | per-seed {tdef.metrics[0].name} |",
                  "|---|---|" + "---|" * (len(tdef.metrics) + 1)]
        for name in sorted(rows, key=lambda n: (n != "DP", n)):
            row = rows[name]
            seeds = sorted(row["by_seed"])
            cells = []
            for x in tdef.metrics:
                have = [sd for sd in seeds if x.key in row["by_seed"][sd]]
                if not have:
                    cells.append("–")
                    continue
                vals = [row["by_seed"][sd][x.key] for sd in have]
                mean, std = _ms(vals)
                row[x.key] = {"mean": mean, "std": std, "values": vals}
                if len(have) < len(seeds):   # the seeds it is over, where not all of the row's
                    row[x.key]["seeds"] = have
                cells.append(_fmt(mean, std, x.digits) + (f" ({len(have)} of {len(seeds)} seeds)"
                                                         if len(have) < len(seeds) else ""))
            row["seeds"] = seeds
            tsum["rows"][name] = row
            first = tdef.metrics[0]
            lines.append(f"| {name} | {len(seeds)} | " + " | ".join(cells) + " | "
                         + ", ".join(f"{row['by_seed'][sd][first.key]:.{first.digits}f}" for sd in seeds) + " |")
        if expert:
            tsum["expert"] = {k: expert[k] for k in ("episodes", *(x.key for x in tdef.metrics)) if k in expert}
            lines.append("| scripted expert (ceiling) | – | " + " | ".join(
                f"{expert[x.key]:.{x.digits}f}" if x.key in expert else "–" for x in tdef.metrics) + " | – |")
        # Paired differences vs DP (same training seed, same data, same test episodes), every metric.
        # Against DP sampled the same way: a row that replans every N actions pairs with DP at N.
        diffs = {}
        for name, row in rows.items():
            steps = re.search(r" \(\d+ actions per plan\)$", name)
            base_name = "DP" + (steps.group(0) if steps else "")
            base = rows.get(base_name, {}).get("by_seed", {})
            common = sorted(set(base) & set(row["by_seed"])) if name != base_name else []
            if common:
                diffs[name] = {"seeds": common, "baseline": base_name}
                for x in tdef.metrics:
                    both = [sd for sd in common if x.key in row["by_seed"][sd] and x.key in base[sd]]
                    if both:
                        d = [row["by_seed"][sd][x.key] - base[sd][x.key] for sd in both]
                        mean, std = _ms(d)
                        diffs[name][x.key] = {"mean": mean, "std": std, "values": d}
                        if both != common:
                            diffs[name][x.key]["seeds"] = both
        tsum["paired_diff_vs_DP"] = diffs
        if diffs:
            lines += ["", "Paired differences vs DP (mean ± std over the common seeds; per seed in brackets):", ""]
            for name, d in diffs.items():
                lines.append(f"- {name} − {d['baseline']}, seeds {d['seeds']}: " + "; ".join(
                    f"{x.name} {_fmt(d[x.key]['mean'], d[x.key]['std'], x.digits)} "
                    f"[{', '.join(f'{v:+.{x.digits}f}' for v in d[x.key]['values'])}]"
                    + (f" (seeds {d[x.key]['seeds']})" if "seeds" in d[x.key] else "")
                    for x in tdef.metrics if x.key in d))
        curves = before.get("curves", {}) | {rd.name: pts for m, rd in runs if m["task"] == task
                                             and (pts := curve_points(rd, task, args.curve_episodes))}
        if curves:
            tsum["curves"] = curves
            plot_curves(task, curves, curves_path(args, task))
            lines += ["", f"Learning curves: `{curves_path(args, task).name}` ({tdef.metrics[0].name} over "
                      f"{args.curve_episodes} held-out episodes at each saved checkpoint)."]
        lines.append("")
        summary["tasks"][task] = tsum
    summary["runs"] = {name: portable(run) for name, run in (prev.get("runs", {}) | {
        rd.name: {"final_val": final_val(rd),
                  **(json.loads((rd / "timing.json").read_text()) if (rd / "timing.json").exists() else {})}
        for m, rd in runs if m["task"] in tasks}).items()}
    table = "\n".join(lines)
    if args.table:
        Path(args.table).write_text(table + "\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    print(table)
    return summary


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["pusht", "dynamic_pusht"], choices=list(TASKS))
    p.add_argument("--methods", nargs="+", default=["dp", "dpag"], choices=["dp", "dpag"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (train.seed)")
    p.add_argument("--config", help="base training config for every task (default: each task's own)")
    p.add_argument("--recipe", help="policy.recipe override (tiny, small, lowdim, ...); default: the config's")
    p.add_argument("--steps", type=int, help="optimiser steps per run (train.steps); default: the config's")
    p.add_argument("--batch-size", type=int, help="train.batch_size override; default: the config's")
    p.add_argument("--set", nargs="*", default=[], metavar="section.key=value",
                   help="extra training overrides for every run of this call (use with --tag)")
    p.add_argument("--tag", default="", help="run-name suffix for a variation (its own rows in the table)")
    p.add_argument("--guidance", nargs="*", default=None, metavar="gamma=G,steps=S,eta=E",
                   help="guided-mode settings to evaluate DP-AG checkpoints with, one row each "
                        "(default: the project's default policy.guidance; '' = each checkpoint's own)")
    p.add_argument("--action-steps", nargs="*", type=int, default=[], metavar="N",
                   help="Push-T: also evaluate in dp mode executing only N actions per plan, one row each")
    p.add_argument("--episodes", type=int, default=200, help="expert demonstrations generated per task")
    p.add_argument("--eval-episodes", type=int, default=100, help="held-out episodes per checkpoint and mode")
    p.add_argument("--curve-every", type=int, default=0, help="save and evaluate a checkpoint every N steps")
    p.add_argument("--curve-episodes", type=int, default=50, help="held-out episodes per learning-curve point")
    p.add_argument("--videos", type=int, default=0, help="GIFs saved per Push-T evaluation")
    p.add_argument("--no-guided", action="store_true", help="skip the guided-mode rows")
    p.add_argument("--no-expert", action="store_true", help="skip the expert ceiling")
    p.add_argument("--workers", type=int, default=1, help="processes for generation and evaluation")
    p.add_argument("--threads", type=int, default=1, help="torch/OMP threads per process")
    p.add_argument("--out", default="outputs/compare", help="data, runs, evaluations")
    p.add_argument("--table", default="bench/compare/table.md", help="markdown table written here (plots beside it)")
    p.add_argument("--json", default="bench/compare/results.json", help="aggregate JSON written here")
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild the table from finished runs")
    args = p.parse_args(argv)
    if args.guidance is None:
        args.guidance = [default_guidance()]
    if args.action_steps and not all(TASKS[t].pusht for t in args.tasks):
        p.error("--action-steps: the Push-T evaluator's option (the reach evaluator has none)")
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
        evaluate(args, task, model, "dp", env)
        for n in args.action_steps:
            evaluate(args, task, model, "dp", env, action_steps=n)
        if method == "dpag" and not args.no_guided:
            for guidance in args.guidance:
                evaluate(args, task, model, "guided", env, guidance)
        if args.curve_every:
            curve(args, task, model, env)
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
