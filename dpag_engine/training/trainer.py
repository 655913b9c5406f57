"""The Trainer: builds a run (data, policy, AdamW, LR schedule, EMA, DDP; or resumes one) and runs
the training loop with logging, periodic evaluation with the EMA weights, and checkpoints.

`train.batch_size` is the global batch per optimiser step. Each rank gets batch_size / (world *
grad_accum) samples per micro-batch; gradient accumulation uses `no_sync` on all but the last
micro-batch. DP-AG's InfoNCE takes its negatives within a micro-batch, so a 2-rank run equals a
1-rank run with grad_accum=2 (tested to 1e-5), not one with a single micro-batch of 2B.
"""
from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, ImageEncoderConfig, PolicyConfig
from ..data import DataConfig, GlobalBatchSampler, collate_batch, load_datasets, prepare_data, write_synthetic
from ..progress import progress_bar
from .checkpoints import (checkpoint_dirs, data_fingerprint, restore_training_checkpoint, run_dir_of,
                          save_training_checkpoint)
from .config import TrainConfig, resolve_policy_config, run_config_dict, spec_of
from .dist import Dist, all_reduce_mean, barrier, loss_module, main_first, setup_distributed
from .ema import EMA
from .logs import CsvLog, EventLog, plot_losses
from .lr import lr_scheduler
from .rng import (EVAL_LOSS_STREAM, EVAL_SAMPLE_STREAM, chunk_generator, eval_order, seed_everything,
                  use_deterministic_algorithms)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class Trainer:
    """One run: `Trainer(policy_dict, data_cfg, train_cfg, resume_dir).train()`. Under torchrun every
    rank builds one; rank 0 alone writes the logs and checkpoints."""

    def __init__(self, policy_dict: dict[str, Any], data_cfg: DataConfig, train_cfg: TrainConfig,
                 resume_dir: Path | None = None, d: Dist | None = None):
        self.data_cfg, self.cfg = data_cfg, train_cfg
        self.d = d or setup_distributed(train_cfg.device)
        self.device = self.d.device
        self.out_dir = Path(train_cfg.out_dir)
        if self.d.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if train_cfg.deterministic:
            use_deterministic_algorithms()

        per_step = self.d.world * train_cfg.grad_accum
        if train_cfg.batch_size % per_step:
            raise ConfigError(f"train.batch_size: {train_cfg.batch_size} is not divisible by world size x grad_accum "
                              f"= {self.d.world} x {train_cfg.grad_accum}")
        self.micro_batch = train_cfg.batch_size // per_step
        self._load_data(policy_dict)

        # ---- model, optimiser, schedule, EMA ----
        from ..policy import DPAGPolicy

        seed_everything(train_cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
        self.policy = DPAGPolicy(self.policy_cfg)
        self.policy.normalizer.fit(self.train_set.normalizer_data())  # train split only
        self.policy.spec = self.spec   # written into every model.pt
        self.policy.to(self.device)
        # fused: one kernel over all parameters. On CPU torch's default is the per-tensor loop, 12 ms of
        # a 110 ms `small` step on 2 cores; fused takes 3-5 ms (same update, other rounding).
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=train_cfg.lr, betas=tuple(train_cfg.betas),
                                           weight_decay=train_cfg.weight_decay,
                                           fused=self.device.type in ("cpu", "cuda"))
        self.scheduler = lr_scheduler(self.optimizer, train_cfg)
        self.ema = EMA(self.policy, train_cfg.ema_power, train_cfg.ema_max_decay, train_cfg.ema_inv_gamma,
                       train_cfg.ema_update_after_step) if train_cfg.ema else None
        self.step = 0
        self.resumed_from: Path | None = None  # the run directory we resumed from
        self.resume_dir = resume_dir           # and the checkpoint in it
        if resume_dir is not None:
            self.step = restore_training_checkpoint(resume_dir, self.fingerprint, self.policy_cfg, self.policy,
                                                    self.ema, self.optimizer, self.scheduler)
            self.resumed_from = run_dir_of(resume_dir) or resume_dir
        self.loss_module = loss_module(self.policy, self.d, train_cfg.find_unused_parameters)

    # ---- setup helpers ----
    def _load_data(self, policy_dict: dict[str, Any]) -> None:
        """A zarr buffer, a LeRobot v3 directory or a robomimic hdf5, told apart by content; sets the
        train/val windows, the policy config resolved against them and the data's fingerprint."""
        data_cfg = self.data_cfg
        image = policy_dict.get("image")
        if isinstance(image, ImageEncoderConfig):
            image = dataclasses.asdict(image)
        if data_cfg.synthetic:
            image_cfg = ImageEncoderConfig(**image) if image is not None else None
            if image_cfg is not None and not data_cfg.cameras:
                data_cfg.cameras = {cam: cam for cam in image_cfg.cameras}  # same names in the dataset
            data_cfg.path = str(self._synthetic_data(policy_dict, image_cfg))
        # Keys resolve against the dataset (LeRobot/robomimic names need no config) and the camera
        # spec (cameras, image_shape, crop) comes from the frames where the config leaves it out.
        # Rank 0 goes first so a LeRobot video is decoded into the cache once, not once per rank.
        with main_first(self.d):
            buffer, image = prepare_data(data_cfg, image, log=print if self.d.main else None)
        if image is not None:
            policy_dict = {**policy_dict, "image": image}
        image_shape = tuple(ImageEncoderConfig(**image).image_shape) if image is not None else None
        n_obs, horizon, n_act = (policy_dict.get(k, getattr(PolicyConfig, k)) for k in
                                 ("n_obs_steps", "horizon", "n_action_steps"))
        self.train_set, self.val_set = load_datasets(data_cfg, int(n_obs), int(horizon), int(n_act), image_shape,
                                                     buffer=buffer)
        self.policy_cfg = resolve_policy_config(policy_dict, self.train_set.action_dim, self.train_set.state_dim)
        self.fingerprint = data_fingerprint(self.train_set)
        self.spec, why = spec_of(buffer, data_cfg, self.policy_cfg)
        if self.d.main:
            print(f"spec: {self.spec.describe() if self.spec else 'none - serving will refuse this policy: ' + why}")

    def _synthetic_data(self, policy_dict: dict[str, Any], image_cfg: ImageEncoderConfig | None) -> Path:
        path = self.out_dir / "synthetic.zarr"
        with main_first(self.d):  # the other ranks read what rank 0 wrote
            if self.d.main and not path.exists():
                write_synthetic(path, n_episodes=self.data_cfg.synthetic_episodes,
                                episode_length=self.data_cfg.synthetic_episode_length,
                                action_dim=int(policy_dict.get("action_dim") or PolicyConfig.action_dim),
                                state_dim=int(policy_dict.get("state_dim", PolicyConfig.state_dim)),
                                cameras=self.data_cfg.cameras,
                                image_shape=image_cfg.image_shape if image_cfg else (3, 96, 96), seed=self.cfg.seed)
        return path

    def _save(self, final: bool = False) -> Path | None:
        if not self.d.main:
            return None
        return save_training_checkpoint(self.out_dir, self.step, self.policy, self.ema, self.optimizer, self.scheduler,
                                        run_config_dict(self.policy_cfg, self.data_cfg, self.cfg), self.fingerprint,
                                        self.d.world, final=final, keep=self.cfg.keep_checkpoints)

    # ---- evaluation ----
    def evaluate(self) -> dict[str, float]:
        """Validation loss and sampled-action MSE over the full horizon (as DP) with the EMA weights."""
        model = self.ema.model if self.ema else self.policy
        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        dataset = self.val_set or self.train_set
        n = min(len(dataset), self.micro_batch * max(1, self.cfg.eval_batches))
        order = eval_order(self.cfg.seed, len(dataset))[:n]
        chunks = [order[i:i + self.micro_batch] for i in range(0, n, self.micro_batch)]
        if self.val_set is not None and self.cfg.eval_batches > 0:
            sums: dict[str, float] = {}
            for i, idx in enumerate(chunks):
                batch = to_device(dataset[idx.tolist()], self.device)
                # DP-AG's loss takes a VJP inside, so it needs autograd even here; nothing is stepped.
                with torch.enable_grad():
                    _, metrics = model.compute_loss(batch, chunk_generator(self.cfg.seed, 0, i, self.device, EVAL_LOSS_STREAM))
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v / len(chunks)
            out.update({k: float(v) for k, v in sums.items()})
        batch = to_device(dataset[chunks[0].tolist()], self.device)
        pred = model.predict_action(batch["obs"], generator=chunk_generator(self.cfg.seed, 0, 0, self.device, EVAL_SAMPLE_STREAM))
        # In normalised units ([-1, 1] per dimension), so the number reads the same for any dataset.
        norm = model.normalizer.normalize
        out["action_mse"] = float(torch.mean((norm("action", pred["action_pred"]) - norm("action", batch["action"])) ** 2))
        model.train(was_training)
        return out

    # ---- the loop ----
    def _step(self, batches, chunks: list[int], params: list[torch.nn.Parameter],
              want_grad_norm: bool) -> tuple[dict[str, float], float | None, float]:
        """One optimiser step over this rank's micro-batches -> (mean loss terms, grad norm, its lr)."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        step_terms: dict[str, torch.Tensor] = {}   # on the device until read once below
        for a, chunk in enumerate(chunks):
            batch = to_device(next(batches), self.device)
            gen = chunk_generator(cfg.seed, self.step, chunk, self.device)
            last = a == len(chunks) - 1
            sync = nullcontext() if (last or not self.d.enabled) else self.loss_module.no_sync()
            with sync:
                loss, metrics = self.loss_module(batch, gen)
                (loss / len(chunks)).backward()
            for k, v in metrics.items():
                step_terms[k] = step_terms.get(k, 0.0) + v / len(chunks)
        terms = torch.stack([torch.as_tensor(v, device=self.device, dtype=torch.float32) for v in step_terms.values()])
        step_metrics = dict(zip(step_terms, terms.tolist()))   # one read back to the host per step
        grad_norm = None
        if cfg.grad_clip_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm))
        elif want_grad_norm:
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        if not math.isfinite(step_metrics.get("loss", 0.0)):
            last = (checkpoint_dirs(self.out_dir) or [self.resume_dir])[-1]
            raise FloatingPointError(f"step {self.step}: loss is {step_metrics.get('loss')}; stopping "
                                     + (f"(last good checkpoint: {last})" if last else
                                        f"(no checkpoint saved yet; train.save_every={cfg.save_every})"))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.policy)
        self.step += 1
        return step_metrics, grad_norm, lr

    def train(self) -> dict[str, Any]:
        cfg, d = self.cfg, self.d
        sampler = GlobalBatchSampler(len(self.train_set), self.micro_batch, cfg.grad_accum, d.rank, d.world,
                                     seed=cfg.seed, start_step=self.step, num_steps=cfg.steps)
        loader = torch.utils.data.DataLoader(
            self.train_set, batch_sampler=sampler, collate_fn=collate_batch, num_workers=self.data_cfg.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False)
        batches = iter(loader)
        chunks = list(sampler.chunk_ids())
        params = [p for p in self.policy.parameters() if p.requires_grad]
        log = events = None
        window: dict[str, float] = {}
        window_n, t_window, t0 = 0, time.perf_counter(), time.perf_counter()
        start_step = self.step
        bar = progress_bar(total=cfg.steps, initial=self.step, disable=not (d.main and cfg.progress),
                           desc=f"{self.policy_cfg.method}/{self.policy_cfg.recipe}", unit="step")
        history: list[float] = []
        self.policy.train()
        while self.step < cfg.steps:
            log_now = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.steps
            step_metrics, grad_norm, lr = self._step(batches, chunks, params, log_now)
            bar.update(1)

            if log is None and d.main:
                log = CsvLog(self.out_dir / "log.csv", list(step_metrics), start_step if start_step > 0 else None,
                             previous=self.resumed_from / "log.csv" if self.resumed_from else None)
                events = EventLog(self.out_dir, cfg.tensorboard, cfg.wandb, start_step,
                                  run_config_dict(self.policy_cfg, self.data_cfg, cfg))
            for k, v in step_metrics.items():
                window[k] = window.get(k, 0.0) + v
            window_n += 1
            if log_now:
                names = list(window)
                avg = all_reduce_mean([window[k] / window_n for k in names], d)
                now = time.perf_counter()
                row = {"step": self.step, "split": "train", "epoch": sampler.epoch_of(self.step), "lr": lr,
                       **dict(zip(names, avg)), "grad_norm": grad_norm,
                       "steps_per_s": window_n / (now - t_window), "elapsed_s": now - t0}
                history.append(row["loss"])
                if d.main:
                    log.write(row)
                    events.write(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
                window, window_n, t_window = {}, 0, now
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps) and d.main:
                t_eval = time.perf_counter()
                metrics = self.evaluate()
                log.write({"step": self.step, "split": "val", "epoch": sampler.epoch_of(self.step), **metrics})
                events.write({"step": self.step, "split": "val", **metrics})
                bar.write(f"step {self.step}: " + ", ".join(f"val {k} {v:.4g}" for k, v in metrics.items()))
                t_window += time.perf_counter() - t_eval  # steps/s measures training only
            if self.step < cfg.steps and cfg.save_every and self.step % cfg.save_every == 0:
                self._save()
        bar.close()
        if events is not None:
            events.close()
        final_dir = self._save(final=True)
        png = None
        if d.main and log is not None:
            png = plot_losses(log.path, self.out_dir / "loss_curve.png",
                              f"{self.policy_cfg.method} / {self.policy_cfg.recipe} ({self.out_dir.name})")
        barrier(d)
        return {"step": self.step, "losses": history, "checkpoint": final_dir, "loss_curve": png,
                "model": self.out_dir / "model.pt"}
