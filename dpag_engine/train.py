"""Train a DP-AG (or plain Diffusion Policy) policy: `python -m dpag_engine.train --help`.

    python -m dpag_engine.train --synthetic policy.recipe=tiny train.steps=300        # demo, no data needed
    python -m dpag_engine.train --config configs/pusht_lowdim.yaml --method dp        # DP baseline
    torchrun --nproc_per_node=4 -m dpag_engine.train --config configs/pusht_image.yaml  # DDP, same command
    python -m dpag_engine.train --resume outputs/run                                  # continue exactly

One code path for both methods (`--method dp|dpag`), so they are compared with the same data order,
optimiser, schedule, EMA and evaluation. Recipe as in Diffusion Policy / the DP-AG release: AdamW
(lr 1e-4, betas 0.95/0.999, wd 1e-6), cosine schedule with warm-up, EMA (power 0.75, max 0.9999).

Reproducibility, and why resume is exact with no sampler state:
  * the batch order is a pure function of (seed, step) (data.sampler.GlobalBatchSampler);
  * the loss's randomness (timesteps, noise, crops, Brownian seed) comes from a generator reseeded
    for every (seed, step, chunk), where a chunk is one micro-batch of the global batch;
  * so step s computes the same thing whether it runs first, after a resume, or split over ranks.

Distributed: `train.batch_size` is the global batch per optimiser step. Under torchrun each rank gets
batch_size / (world * grad_accum) samples per micro-batch. The policy is wrapped as a module whose
forward *is* `compute_loss`, and that module is what DDP wraps: every U-Net call of a step (static
branch, the VJP for the force, the no-grad guided branch) happens inside one DDP forward and one
`backward()`, so each parameter's gradient is all-reduced exactly once per step. The force VJP is
`torch.autograd.grad` w.r.t. the latent only: it never reaches a parameter's gradient accumulator,
so DDP's hooks do not fire for it. Gradient accumulation uses `no_sync` on all but the last
micro-batch. Note that DP-AG's InfoNCE takes its negatives within a micro-batch, so a 2-rank run
equals a 1-rank run with grad_accum=2 (tested to 1e-5), not one with a single micro-batch of 2B.

The code lives in dpag_engine/training/, one job per module (see its README.md).
"""
from __future__ import annotations

import sys

from .training.cli import main

if __name__ == "__main__":
    sys.exit(main())
