"""Where training's random numbers come from, so that a step computes the same thing whether it runs
first, after a resume, or split over ranks.

  * the batch order is a pure function of (seed, step) (data.sampler.GlobalBatchSampler);
  * the loss's randomness (timesteps, noise, crops, Brownian draws) comes from a generator reseeded
    for every (seed, stream, step, chunk), where a chunk is one micro-batch of the global batch;
  * model init draws from the global RNGs after `seed_everything`; their state is saved with each
    checkpoint and restored on resume, although the loop itself never draws from them.
"""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

TRAIN_STREAM, EVAL_LOSS_STREAM, EVAL_SAMPLE_STREAM = 0, 1, 2


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_deterministic_algorithms() -> None:
    """train.deterministic: deterministic kernels (slower on GPU; CPU is already)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def chunk_generator(seed: int, step: int, chunk: int, device: torch.device, stream: int = TRAIN_STREAM) -> torch.Generator:
    """The loss's randomness for micro-batch `chunk` of step `step`; independent of rank and history."""
    state = np.random.SeedSequence([seed, stream, step, chunk]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state >> np.uint64(1)))


def eval_order(seed: int, n: int) -> np.ndarray:
    """The order in which evaluation visits the n windows of its dataset: the same at every evaluation."""
    return np.random.default_rng([seed, 7]).permutation(n)


def rng_state() -> dict[str, Any]:
    """Global RNGs, as weights-only-loadable values. The loop does not draw from them (every draw uses
    a reseeded generator), but a policy or a user hook might: restore them anyway."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [random.getstate()[0], list(random.getstate()[1])],
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python"][0], tuple(state["python"][1]), None))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
