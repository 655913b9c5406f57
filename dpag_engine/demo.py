"""The main job, end to end: train a small DP-AG if there is none yet, then run it closed-loop.

    python -m dpag_engine.demo [--out-dir outputs/demo] [--steps 600] [--episodes 8] [--retrain]

The task is the synthetic point-reaching set of `dpag_engine.data.synthetic` (no download needed).
The trained policy then drives the same dynamics at 10 Hz with receding-horizon chunks, in `dp` and
`guided` modes; the demo prints the final distance to the goal next to the scripted expert's, the
planning latency (p50/p99), and saves trajectory and latency plots next to the model.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_policy
from .data.synthetic import _maps, action_to_position, make_episodes, observe
from .train import main as train_main

EPISODE_STEPS = 80


def rollout(policy, goal: np.ndarray, start: np.ndarray, mode: str, seed: int) -> tuple[np.ndarray, list[float]]:
    """Run one episode: plan from the last To observations, execute n_action_steps, re-plan."""
    cfg = policy.cfg
    state_map, _ = _maps(cfg.state_dim, cfg.action_dim)
    gen = torch.Generator().manual_seed(seed)
    pos, vel = start.copy(), np.zeros(2)
    history = [observe(pos, goal, vel, state_map)] * cfg.n_obs_steps  # pad the start, as training does
    path, latencies = [pos.copy()], []
    while len(path) <= EPISODE_STEPS:
        obs = {"state": torch.from_numpy(np.stack(history[-cfg.n_obs_steps:]))[None]}
        t0 = time.perf_counter()
        actions = policy.predict_action(obs, gen, mode=mode)["action"][0].numpy()
        latencies.append((time.perf_counter() - t0) * 1e3)
        for action in actions:
            new = action_to_position(action)
            vel, pos = new - pos, new
            path.append(pos.copy())
            history.append(observe(pos, goal, vel, state_map))
    return np.asarray(path[:EPISODE_STEPS + 1]), latencies


def plot(paths: dict[str, list[np.ndarray]], goals: np.ndarray, latencies: dict[str, list[float]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(paths), figsize=(5 * len(paths), 5), squeeze=False)
    for ax, (name, runs) in zip(axes[0], paths.items()):
        for path, goal in zip(runs, goals):
            line, = ax.plot(path[:, 0], path[:, 1], lw=1.2)
            ax.plot(*path[0], "o", color=line.get_color(), ms=4)
            ax.plot(*goal, "*", color=line.get_color(), ms=12)
        ax.set(title=name, xlim=(-1.1, 1.1), ylim=(-1.1, 1.1), aspect="equal")
    fig.suptitle("point reaching: start (o) to goal (*)")
    fig.savefig(out / "demo_trajectories.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in latencies.items():
        ax.hist(values, bins=30, alpha=0.6, label=name)
    ax.set(xlabel="predict_action latency (ms)", ylabel="plans", title="planning latency, B=1")
    ax.legend()
    fig.savefig(out / "demo_latency.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="outputs/demo", help="run directory (model.pt, logs, plots)")
    parser.add_argument("--steps", type=int, default=2000, help="training steps when a model must be trained")
    parser.add_argument("--episodes", type=int, default=8, help="closed-loop evaluation episodes per mode")
    parser.add_argument("--retrain", action="store_true", help="train even if OUT_DIR/model.pt exists")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    if args.retrain or not (out / "model.pt").exists():
        print(f"== training a tiny DP-AG on synthetic demonstrations ({args.steps} steps) ==", flush=True)
        code = train_main(["--synthetic", "policy.recipe=tiny", f"train.steps={args.steps}", "train.lr=1e-3",
                           "train.warmup_steps=50", f"--out-dir={out}"])
        if code != 0:
            return code
    policy = load_policy(out / "model.pt")
    print(f"== closed loop: {args.episodes} episodes per mode, {policy.cfg.n_action_steps} actions per plan, "
          f"DDIM-{policy.schedule.num_steps} ==")
    # Held-out starts and goals: a seed the training set never used.
    expert = make_episodes(args.episodes, EPISODE_STEPS, policy.cfg.action_dim, policy.cfg.state_dim, seed=999)
    goals, starts, expert_paths = [], [], []
    rng = np.random.default_rng(999)  # replays make_episodes' draws to recover start and goal
    for ep in expert:
        start, goal = rng.uniform(-1, 1, size=2), rng.uniform(-1, 1, size=2)
        rng.uniform(-0.3, 0.3)
        starts.append(start)
        goals.append(goal)
        expert_paths.append(np.vstack([start, action_to_position(ep["action"])]))
    goals = np.asarray(goals)
    paths: dict[str, list[np.ndarray]] = {"scripted expert": expert_paths}
    latencies: dict[str, list[float]] = {}
    for mode in ("dp", "guided"):
        runs = [rollout(policy, goals[i], starts[i], mode, seed=i) for i in range(args.episodes)]
        paths[f"DP-AG, {mode} mode"] = [p for p, _ in runs]
        latencies[mode] = [ms for _, lat in runs for ms in lat]
    print("| controller | final distance to goal (mean +- std) | plan p50 ms | plan p99 ms |")
    print("|---|---|---|---|")
    for name, runs in paths.items():
        d = np.array([np.linalg.norm(p[-1] - g) for p, g in zip(runs, goals)])
        mode = name.split(", ")[-1].split()[0] if name.startswith("DP-AG") else None
        lat = f"{np.percentile(latencies[mode], 50):.1f} | {np.percentile(latencies[mode], 99):.1f}" if mode else "- | -"
        print(f"| {name} | {d.mean():.3f} +- {d.std():.3f} | {lat} |")
    start_d = np.linalg.norm(np.asarray(starts) - goals, axis=1)
    print(f"(initial distance {start_d.mean():.3f}; the workspace is [-1, 1]^2)")
    plot(paths, goals, latencies, out)
    print(f"plots: {out / 'demo_trajectories.png'}, {out / 'demo_latency.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
