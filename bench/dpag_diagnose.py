"""Why DP-AG's contrastive term hurts: measurements on trained checkpoints, over validation windows.

    PYTHONPATH=$PWD python bench/dpag_diagnose.py outputs/compare/runs/ur5_reach_dp_s0/model.pt \
        outputs/compare/runs/ur5_reach_dpag_s0/model.pt [--batches 8] [--json out.json]

Per checkpoint, on its own validation split (batches of 64 windows, noise levels drawn as in training):
- sigma: the posterior's standard deviation, exp(log_var / 2) (DP-AG only);
- latent move: ||z~ - mu|| of the training-time latent update, per observation step, against the
  typical distance between two different observations' mu in the same batch (the "size" of the
  observation space in the conditioning);
- conditioning sensitivity: ||eps(a_k, k, mu_i) - eps(a_k, k, mu_j)|| / ||eps(a_k, k, mu_i)|| with mu_j
  another window's latent: how much the noise prediction depends on what the policy observes,
  overall and for the least noisy quarter of the levels (k < T/4, where the action is decided);
- the InfoNCE value at the checkpoint and at the exact noise (the loss's floor for that batch).
InfoNCE's positive for eps(a_k, k, mu) is the same network at the guided latent z~; it is satisfied
by a predictor that ignores the latent, and a detached target pulls the prediction towards it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dpag_engine import ops
from dpag_engine.checkpoint import load_checkpoint, load_policy
from dpag_engine.data.dataset import DataConfig, load_datasets
from dpag_engine.guidance import latent_update, vjp_force
from dpag_engine.losses import info_nce


def diagnose(path: str, batches: int, seed: int = 0) -> dict:
    policy = load_policy(path).eval()
    run = load_checkpoint(path)["metadata"]["run_config"]
    cfg = policy.cfg
    data_cfg = DataConfig(**{k: v for k, v in run["data"].items() if k in DataConfig.__dataclass_fields__})
    _, val = load_datasets(data_cfg, cfg.n_obs_steps, cfg.horizon, cfg.n_action_steps)
    g = torch.Generator().manual_seed(seed)
    rows: dict[str, list[float]] = {}

    def add(key, value):
        rows.setdefault(key, []).append(float(value))

    T = cfg.scheduler.num_train_timesteps
    for b in range(batches):
        idx = torch.randint(0, len(val), (64,), generator=g).tolist()
        batch = val.__getitems__(idx)
        obs, n = policy.check_obs(batch["obs"])
        a_0 = policy.normalizer.normalize("action", batch["action"])
        t = torch.randint(0, T, (n,), generator=g)
        noise = torch.randn(a_0.shape, generator=g)
        a_k = ops.q_sample(a_0, noise, t, policy.schedule.sqrt_alphas_cumprod, policy.schedule.sqrt_one_minus_alphas_cumprod)
        mu, log_var = policy.latent(obs)
        perm = torch.roll(torch.arange(n), 1)
        with torch.no_grad():
            eps = policy.predict_noise(a_k, t, mu)
            eps_other = policy.predict_noise(a_k, t, mu[perm])
        rel = (eps - eps_other).flatten(1).norm(dim=1) / eps.flatten(1).norm(dim=1)
        add("sensitivity", rel.mean())
        low = t < T // 4
        if low.any():
            add("sensitivity_low_noise", rel[low].mean())
        add("obs_distance", (mu - mu[perm]).norm(dim=-1).mean())
        add("diffusion_loss", torch.mean((eps - noise) ** 2))
        if log_var is None:
            continue
        add("sigma", torch.exp(0.5 * log_var).mean())
        z = mu.detach().requires_grad_(True)
        e = policy.predict_noise(a_k, t, z)
        force = vjp_force(e, z)
        with torch.no_grad():
            z_g = latent_update(policy.unet, a_k, t, mu, log_var, cfg.latent, first_force=force)
            eps_g = policy.predict_noise(a_k, t, z_g)
        add("latent_move", (z_g - mu).norm(dim=-1).mean())
        add("eps_change_at_guided_latent", ((eps_g - eps).flatten(1).norm(dim=1) / eps.flatten(1).norm(dim=1)).mean())
        add("info_nce", info_nce(eps, eps_g, cfg.loss.tau))
        add("info_nce_floor", info_nce(noise, noise, cfg.loss.tau))
    out = {k: float(np.mean(v)) for k, v in rows.items()}
    out.update(method=cfg.method, tau=cfg.loss.tau, lambda_cont=cfg.loss.lambda_cont, gamma=cfg.latent.gamma,
               posterior=cfg.posterior, windows=64 * batches)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--json", help="write the measurements here")
    args = p.parse_args(argv)
    torch.set_grad_enabled(True)
    results = {c: diagnose(c, args.batches) for c in args.ckpts}
    keys = ["diffusion_loss", "sensitivity", "sensitivity_low_noise", "obs_distance", "sigma", "latent_move",
            "eps_change_at_guided_latent", "info_nce", "info_nce_floor"]
    print("| checkpoint | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for c, r in results.items():
        print(f"| {Path(c).parent.name} | " + " | ".join(f"{r[k]:.4f}" if k in r else "–" for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
