"""Small builders shared by the tests: random-but-valid policies, batches and observations, an
emulator fixture and a serve run against it."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import torch

from dpag_engine.config import ImageEncoderConfig, PolicyConfig
from dpag_engine.policy import DPAGPolicy


def make_policy(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> DPAGPolicy:
    """A tiny policy with a normaliser fitted on random data (ranges far from [-1, 1] on purpose)."""
    cfg = PolicyConfig(**{"recipe": "tiny", "state_dim": 5, "action_dim": 3, **overrides})
    torch.manual_seed(seed)
    policy = DPAGPolicy(cfg).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    fit = {"action": torch.randn(200, cfg.action_dim, generator=g) * 3 + 2}
    if cfg.state_dim > 0:
        fit["state"] = torch.randn(200, cfg.state_dim, generator=g) * 5 - 1
    policy.normalizer.fit(fit)
    return policy


def make_obs(cfg: PolicyConfig, batch: int, generator: torch.Generator, dtype=torch.float32) -> dict:
    obs = {}
    if cfg.state_dim > 0:
        obs["state"] = (torch.randn(batch, cfg.n_obs_steps, cfg.state_dim, generator=generator) * 5 - 1).to(dtype)
    if cfg.image is not None:
        for cam in cfg.image.cameras:
            obs[cam] = torch.rand(batch, cfg.n_obs_steps, *cfg.image.image_shape, generator=generator).to(dtype)
    return obs


def make_batch(cfg: PolicyConfig, batch: int, generator: torch.Generator, dtype=torch.float32) -> dict:
    action = torch.randn(batch, cfg.horizon, cfg.action_dim, generator=generator) * 3 + 2
    return {"obs": make_obs(cfg, batch, generator, dtype), "action": action.to(dtype)}


# Overrides for a small two-camera image policy (64 px crops leave a 2x2 map for the spatial softmax).
SMALL_IMAGE = dict(state_dim=4, action_dim=2,
                   image=ImageEncoderConfig(cameras=("front", "wrist"), image_shape=(3, 72, 72), crop_shape=(64, 64)))


def normalised_error(policy: DPAGPolicy, a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in the sampler's normalised action units (independent of the dataset's units)."""
    scale = policy.normalizer.affine("action", torch.float32).scale.to(a.device)
    return float(((a - b.to(a.device)) * scale).abs().max())


def running_emulator(host: str, version: str, control_port: int):
    """For a module fixture: `yield from running_emulator(...)` gives a started EmulatorProcess on its
    own loopback address and checks, at the end, that it stopped cleanly (exit 0)."""
    from dpag_engine.ursim import EmulatorProcess
    emu = EmulatorProcess(host, version, control_port=control_port).start()
    yield emu
    assert emu.stop() == 0, emu.output()


class ServeThread:
    """`python -m dpag_engine.serve argv` on a thread (or as a child process), against an emulator;
    then its summary and the emulator's command log. The process form is for faults that leave
    ur_rtde wedged (a frozen stream): its client keeps reconnecting in the background, which must
    not outlive the run inside pytest."""

    def __init__(self, emu, argv: list[str], out, process: bool = False):
        from dpag_engine import serve
        self.emu, self.argv, self.out, self.code = emu, argv, out, None
        run = (lambda: subprocess.run([sys.executable, "-m", "dpag_engine.serve", *argv], capture_output=True,
                                      timeout=60).returncode) if process else (lambda: serve.main(argv))
        self.thread = threading.Thread(target=lambda: setattr(self, "code", run()), daemon=True)
        self.thread.start()

    def wait_servoing(self, n: int = 50, timeout: float = 60.0):
        """Until the emulator has received n servo commands (the arm is moving under the loop). The
        timeout only binds on a failure (start-up is seconds, longer on a loaded machine); a run that
        ends before it servoes fails at once, with its own account of why."""
        from dpag_engine.ursim import wait_until
        servoing = lambda: sum(e["name"] in ("servoJ", "servoL") for e in self.emu.control.command_log()) >= n
        wait_until(lambda: servoing() or not self.thread.is_alive(), timeout)
        if not servoing():
            said = (self.out / "summary.json").read_text() if (self.out / "summary.json").exists() else "no summary"
            raise AssertionError(f"serve is not servoing after {timeout:g} s (exit {self.code}): {said[:2000]}")

    def join(self, timeout: float = 60.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "serve did not return"
        self.summary = json.loads((self.out / "summary.json").read_text())
        self.log = self.emu.control.command_log()
        return self.code


def round_weights(w: np.ndarray, weights: str, out_axis: int = 0) -> np.ndarray:
    """The values the engine multiplies with: fp32, rounded to nearest-even bf16 / fp16, or int8
    per output channel (axis `out_axis`): scale = max |w| / 127 in float32, q = rint(w / scale)."""
    w = w.astype(np.float32)
    if weights == "int8":
        others = tuple(a for a in range(w.ndim) if a != out_axis)
        scale = (np.abs(w).max(axis=others, keepdims=True).astype(np.float64) / 127.0).astype(np.float32)
        safe = np.where(scale > 0, scale, 1).astype(np.float64)
        q = np.clip(np.rint(w.astype(np.float64) / safe), -127, 127)
        return q * scale.astype(np.float64)
    if weights == "fp16":
        return w.astype(np.float16).astype(np.float64)
    if weights == "bf16":
        bits = w.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    return w.astype(np.float64)
