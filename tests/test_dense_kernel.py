"""The engine's dense kernel (csrc/cpu_kernels.cpp: 16-row weight panels, broadcast-FMA blocks of up to
16 columns) on every ISA this machine can run, against a float64 numpy reference.

Goes through `_C.conv1d` (im2col + the kernel, one thread): a 1x1 conv is exactly the product
out[b, r, t] = bias[r] + sum_i W[r, i] x[b, i, t], so rows = C_out, k = C_in and n_cols = B * T.
Covers row counts that are not multiples of 16 (a partial last panel), every column count 1..17 at
batch 1 (each AVX-512 block shape, and the split of 17 into two blocks), batch > 1 (column blocks
that cross samples), reduction lengths from 1 up, fp32 / bf16 / fp16 / int8 weights (int8 against its
own per-channel dequantised values, so the kernel's error is separated from the quantisation's); plus k > 1 and
transposed convs, whose im2col paths feed the same kernel. Each ISA runs in a subprocess with
DPAG_CPU_ISA set (read once when the library loads).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from dpag_engine import _C
from factories import round_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference(x, w, b, stride, pad, transposed):
    """float64 conv1d / conv_transpose1d, (B, C_in, T) -> (B, C_out, T_out)."""
    x = x.astype(np.float64)
    B, c_in, t_in = x.shape
    if transposed:
        _, c_out, k = w.shape
        t_out = (t_in - 1) * stride - 2 * pad + k
        full = np.zeros((B, c_out, (t_in - 1) * stride + k))
        for ti in range(t_in):
            full[:, :, ti * stride:ti * stride + k] += np.einsum("bi,iok->bok", x[:, :, ti], w)
        return full[:, :, pad:pad + t_out] + b[None, :, None]
    c_out, _, k = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad)))
    t_out = (t_in + 2 * pad - k) // stride + 1
    out = np.empty((B, c_out, t_out))
    for t in range(t_out):
        out[:, :, t] = np.einsum("bik,oik->bo", xp[:, :, t * stride:t * stride + k], w)
    return out + b[None, :, None]


# (batch, T): every column count 1..17 at batch 1, then column blocks over several samples.
COLUMNS = [(1, t) for t in range(1, 18)] + [(2, 5), (2, 16), (3, 17), (5, 4), (2, 9)]
ROWS = [1, 2, 15, 16, 17, 33, 69]
K = [1, 7, 16, 37, 130]


def check_all(seed: int = 0) -> float:
    """Every combination on the ISA this process runs; returns the worst error relative to the scale."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for weights in ("fp32", "bf16", "fp16", "int8"):
        for rows in ROWS:
            for k in K:
                for batch, t in COLUMNS:
                    x = rng.standard_normal((batch, k, t)).astype(np.float32)
                    w = (rng.standard_normal((rows, k, 1)) / np.sqrt(k)).astype(np.float32)
                    b = rng.standard_normal(rows).astype(np.float32)
                    out = _C.conv1d(x, w, b, 1, 0, False, weights)
                    ref = reference(x, round_weights(w, weights), b, 1, 0, False)
                    err = float(np.abs(out - ref).max())
                    assert err < 2e-5, (weights, rows, k, batch, t, err)
                    worst = max(worst, err)
        # Convs with taps and the transposed one: the im2col paths in front of the same kernel.
        for c_in, c_out, k, stride, pad, transposed, batch, t in [
                (5, 17, 5, 1, 2, False, 1, 16), (5, 17, 5, 1, 2, False, 3, 7), (9, 33, 3, 2, 1, False, 2, 16),
                (7, 20, 4, 2, 1, True, 1, 8), (7, 20, 4, 2, 1, True, 2, 5)]:
            x = rng.standard_normal((batch, c_in, t)).astype(np.float32)
            shape = (c_in, c_out, k) if transposed else (c_out, c_in, k)
            w = (rng.standard_normal(shape) / np.sqrt(c_in * k)).astype(np.float32)
            b = rng.standard_normal(c_out).astype(np.float32)
            out = _C.conv1d(x, w, b, stride, pad, transposed, weights)
            ref = reference(x, round_weights(w, weights, 1 if transposed else 0), b, stride, pad, transposed)
            err = float(np.abs(out - ref).max())
            assert err < 2e-5, (weights, c_in, c_out, k, stride, pad, transposed, batch, t, err)
            worst = max(worst, err)
    return worst


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
def test_dense_kernel_matches_float64(isa):
    code = (
        "import sys; from dpag_engine import _C\n"
        f"if _C.cpu_kernel_isa() != {isa!r}: print('unavailable', _C.cpu_kernel_isa()); sys.exit(0)\n"
        "from tests.test_dense_kernel import check_all\n"
        "print('worst', check_all())\n")
    env = {**os.environ, "DPAG_CPU_ISA": isa, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    if run.stdout.startswith("unavailable"):
        pytest.skip(f"{isa} kernels cannot run here ({run.stdout.strip()})")


def test_isa_in_this_process():
    assert _C.cpu_kernel_isa() in ("avx512", "avx2", "scalar")
    check_all(seed=1)
