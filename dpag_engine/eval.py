"""Closed-loop evaluation of a checkpoint on Push-T or Dynamic Push-T, scored as Diffusion Policy does.

    python -m dpag_engine.eval --ckpt outputs/pusht_lowdim/model.pt --task pusht --episodes 50 \
        [--workers 2] [--mode dp|guided] [--out-dir DIR] [--videos 2]

Episode i resets with seed 100000 + i (DP's test seeds), runs up to 300 steps at 10 Hz and stops at
0.95 coverage. The policy plans from its last To observations and executes n_action_steps actions
per plan (--action-steps N: only the first N, replanning more often). Printed and saved
(DIR/results.json): DP's score (the mean of each episode's max clip(coverage / 0.95, 0, 1): the
number DP reports), coverage mean/std (each episode's max coverage), success rate (max coverage >
0.95) and mean action jerk (the norm of the third difference of the executed action sequence, px
per step^3: lower is smoother). The first --videos rollouts are saved as DIR/rollout_<seed>.gif.

Observations are built with the checkpoint's own data mapping (data.state_keys, data.cameras from
its run config, e.g. ["keypoint", "state[:2]"]), so the policy sees what it was trained on. A
checkpoint that does not fit the task (other observation keys, sizes or action dimension, e.g. one
trained on the UR5 reach task) is refused with the reason and the tasks it does fit.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError, load_checkpoint, load_policy
from .config import ConfigError, LatentUpdateConfig, PolicyConfig, latent_overrides
from .data.dataset import parse_key_spec
from .envs.dynamic_pusht import make_task
from .envs.pusht import MAX_STEPS, TEST_START_SEED
from .runtime import ENGINE_WEIGHTS, policy_planner

_WORKER: dict = {}  # per-process policy and settings (set by _init)


TASKS = ("pusht", "dynamic_pusht")


def observation_mapping(ckpt: str | dict) -> tuple[list[str], dict[str, str]]:
    """(state_keys, cameras) a checkpoint (a model.pt path, or one loaded) was trained with; DP's lowdim
    Push-T mapping if absent."""
    ckpt = ckpt if isinstance(ckpt, dict) else load_checkpoint(ckpt)
    data = ckpt["metadata"].get("run_config", {}).get("data", {})
    return list(data.get("state_keys") or ["keypoint", "state[:2]"]), dict(data.get("cameras") or {})


def task_problem(task: str, cfg: PolicyConfig, state_keys: list[str], cameras: dict[str, str]) -> str | None:
    """Why a policy cannot run on `task` with this observation mapping, or None if it can: checked on the
    task's first observation, so the answer is the environment's, not a table that could drift."""
    env = make_task(task, render=bool(cameras))
    obs = env.reset(TEST_START_SEED)
    missing = [k for k in [parse_key_spec(s)[0] for s in state_keys] + list(cameras.values()) if k not in obs]
    if missing:
        return f"it reads observation keys {missing}, which {task} does not provide (it has {sorted(obs)})"
    got = policy_obs([obs], state_keys, cameras)
    if state_keys and got["state"].shape[-1] != cfg.state_dim:
        return f"it takes {cfg.state_dim} state features, {task} gives {got['state'].shape[-1]} for {state_keys}"
    for cam in cameras:
        if cfg.image is None or tuple(got[cam].shape[2:]) != tuple(cfg.image.image_shape):
            want = None if cfg.image is None else tuple(cfg.image.image_shape)
            return f"camera {cam!r}: {task} renders {tuple(got[cam].shape[2:])} (C, H, W), the policy takes {want}"
    action_dim = env.env.action_space.shape[0]
    if cfg.action_dim != action_dim:
        return f"it outputs {cfg.action_dim}-D actions, {task} takes {action_dim}-D ones"
    return None


def fitting_tasks(ckpt_path: str, cfg: PolicyConfig, state_keys: list[str], cameras: dict[str, str]) -> list[str]:
    """The tasks (with the command that evaluates them) a checkpoint can be evaluated on."""
    from .envs import ur5_reach

    fits = [f"{t} (--task {t})" for t in TASKS if task_problem(t, cfg, state_keys, cameras) is None]
    # The UR5 reach task has its own rollout; its state is ur5_reach.observe's concat(q, goal).
    if (cfg.state_dim, cfg.action_dim, cfg.image) == (ur5_reach.STATE_DIM, ur5_reach.ACTION_DIM, None):
        fits.append(f"ur5_reach (python -m dpag_engine.tasks --task ur5_reach --eval {ckpt_path})")
    return fits


def policy_obs(history: list[dict[str, np.ndarray]], state_keys: list[str], cameras: dict[str, str]) -> dict:
    """The raw observation dict of `predict_action` from the last To env observations (batch 1)."""
    obs = {}
    if state_keys:
        parts = []
        for spec in state_keys:
            key, sl = parse_key_spec(spec)
            parts.append(np.stack([h[key].reshape(-1)[sl] for h in history]))
        obs["state"] = torch.from_numpy(np.concatenate(parts, axis=1).astype(np.float32))[None]
    for cam, key in cameras.items():
        frames = np.stack([h[key] for h in history]).astype(np.float32) / 255.0  # (To, H, W, C) uint8
        obs[cam] = torch.from_numpy(frames).permute(0, 3, 1, 2)[None].contiguous()
    return obs


def action_jerk(actions: np.ndarray) -> float:
    """Mean norm of the third difference of the action sequence (0 for fewer than 4 actions)."""
    if len(actions) < 4:
        return 0.0
    return float(np.linalg.norm(np.diff(actions, n=3, axis=0), axis=1).mean())


def _init(ckpt: str, task: str, mode: str | None, max_steps: int, state_keys: list[str],
          cameras: dict[str, str], latent: LatentUpdateConfig, runtime: str, weights: str,
          inference_steps: int | None, action_steps: int) -> None:
    torch.set_num_threads(1)  # one core per worker; the workers are the parallelism
    policy = load_policy(ckpt)
    policy.set_guidance(latent)
    if inference_steps:
        policy.set_inference_steps(inference_steps)
    _WORKER.update(policy=policy, planner=policy_planner(policy, runtime, mode, weights=weights),
                   task=make_task(task, render=bool(cameras)), mode=mode,
                   state_keys=state_keys, cameras=cameras, max_steps=max_steps, action_steps=action_steps)


def run_episode(args: tuple[int, bool]) -> dict:
    seed, record = args
    w = _WORKER
    policy, task, n_obs = w["policy"], w["task"], w["policy"].cfg.n_obs_steps
    gen = torch.Generator().manual_seed(seed)
    obs = task.reset(seed)
    history = [obs] * n_obs  # pad the start by repeating the first observation, as training does
    actions, frames = [], [task.render()] if record else []
    while not task.done and task.steps < w["max_steps"]:
        plan = w["planner"].predict_action(policy_obs(history[-n_obs:], w["state_keys"], w["cameras"]), gen,
                                           mode=w["mode"])["action"][0].numpy()
        for action in plan[:w["action_steps"]]:
            history.append(task.step(action))
            actions.append(action)
            if record:
                frames.append(task.render())
            if task.done or task.steps >= w["max_steps"]:
                break
    return {**episode_record(task, seed, np.asarray(actions)), "frames": frames}


def episode_record(task, seed: int, actions: np.ndarray) -> dict:
    """One finished episode's scores (the policy's here, the scripted expert's in bench/compare.py)."""
    return {"seed": seed, "score": task.score, "max_coverage": task.max_coverage, "success": task.success,
            "steps": task.steps, "jerk": action_jerk(actions)}


def summarize(episodes: list[dict]) -> dict:
    """Means over episodes: DP's score, coverage (and its per-episode std), success rate, jerk."""
    cov = np.array([e["max_coverage"] for e in episodes])
    return {"episodes": len(episodes), "score_mean": float(np.mean([e["score"] for e in episodes])),
            "coverage_mean": float(cov.mean()), "coverage_std": float(cov.std()),
            "success_rate": float(np.mean([e["success"] for e in episodes])),
            "jerk_mean": float(np.mean([e["jerk"] for e in episodes]))}


def save_gif(frames: list[np.ndarray], path: Path) -> None:
    from PIL import Image
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)  # 10 Hz


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="model.pt (or a run directory holding one)")
    p.add_argument("--task", default="pusht", choices=["pusht", "dynamic_pusht"])
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--mode", choices=["dp", "guided"], help="inference mode (default: the checkpoint's)")
    p.add_argument("--guidance", default="", metavar="gamma=G,steps=S,eta=E",
                   help="guided mode: the latent update's settings (default: the checkpoint's policy.guidance)")
    p.add_argument("--runtime", default="cpp", choices=["cpp", "torch"],
                   help="plan on the C++ engine (as serving does) or the PyTorch reference")
    p.add_argument("--weights", default="fp32", choices=ENGINE_WEIGHTS,
                   help="--runtime cpp: how the engine stores the U-Net's convolution weights")
    p.add_argument("--inference-steps", type=int, metavar="K",
                   help="denoising steps per plan (default: the checkpoint's scheduler.num_inference_steps)")
    p.add_argument("--action-steps", type=int, metavar="N",
                   help="actions executed per plan before the next (default: the checkpoint's n_action_steps)")
    p.add_argument("--start-seed", type=int, default=TEST_START_SEED)
    p.add_argument("--max-steps", type=int, default=MAX_STEPS)
    p.add_argument("--videos", type=int, default=2, help="rollouts saved as GIFs")
    p.add_argument("--out-dir", help="default: <checkpoint dir>/eval_<task>_<mode>")
    args = p.parse_args(argv)
    if args.weights != "fp32" and args.runtime != "cpp":
        p.error("--weights: only the C++ engine (--runtime cpp) stores reduced-precision weights")
    ckpt = Path(args.ckpt)
    try:
        loaded = load_checkpoint(ckpt)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg: PolicyConfig = loaded["policy_config"]
    state_keys, cameras = observation_mapping(loaded)
    problem = task_problem(args.task, cfg, state_keys, cameras)
    if problem:
        fits = fitting_tasks(str(ckpt), cfg, state_keys, cameras)
        print(f"error: {ckpt}: cannot be evaluated on {args.task}: {problem}. It can be evaluated on: "
              f"{'; '.join(fits) if fits else 'none of the tasks here'}", file=sys.stderr)
        return 1
    mode = args.mode or cfg.inference_mode
    if args.inference_steps is not None and not 1 <= args.inference_steps <= cfg.scheduler.num_train_timesteps:
        print(f"error: --inference-steps: must be in [1, num_train_timesteps={cfg.scheduler.num_train_timesteps}], "
              f"got {args.inference_steps}", file=sys.stderr)
        return 1
    action_steps = cfg.n_action_steps if args.action_steps is None else args.action_steps
    if not 1 <= action_steps <= cfg.n_action_steps:
        print(f"error: --action-steps: must be in [1, n_action_steps={cfg.n_action_steps}] (a plan holds "
              f"{cfg.n_action_steps} actions), got {args.action_steps}", file=sys.stderr)
        return 1
    try:
        latent = latent_overrides(cfg.guidance, args.guidance)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out_dir) if args.out_dir else (ckpt if ckpt.is_dir() else ckpt.parent) / f"eval_{args.task}_{mode}"
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(args.start_seed + i, i < args.videos) for i in range(args.episodes)]
    init = (str(ckpt), args.task, mode, args.max_steps, state_keys, cameras, latent, args.runtime, args.weights,
            args.inference_steps, action_steps)
    t0 = time.perf_counter()
    if args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers, initializer=_init, initargs=init) as pool:
            episodes = pool.map(run_episode, jobs, chunksize=1)
    else:
        _init(*init)
        episodes = [run_episode(job) for job in jobs]
    for ep in episodes:
        frames = ep.pop("frames")
        if frames:
            save_gif(frames, out / f"rollout_{ep['seed']}.gif")
    results = {"ckpt": str(ckpt), "task": args.task, "mode": mode, "runtime": args.runtime, "weights": args.weights,
               "inference_steps": args.inference_steps or cfg.scheduler.num_inference_steps,
               "action_steps": action_steps, "guidance": dataclasses.asdict(latent), "start_seed": args.start_seed,
               **summarize(episodes), "seconds": round(time.perf_counter() - t0, 1), "per_episode": episodes}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"{args.task} {mode}: DP score {results['score_mean']:.3f}, coverage {results['coverage_mean']:.3f} "
          f"+- {results['coverage_std']:.3f}, success {results['success_rate']:.0%}, "
          f"jerk {results['jerk_mean']:.2f} px/step^3 "
          f"over {len(episodes)} episodes ({results['seconds']} s) -> {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
