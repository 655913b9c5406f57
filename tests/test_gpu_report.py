"""bench/gpu_report.py --dry-run in CI: every section builds and runs on the CPU, so the GPU report cannot rot."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (the kernel rows need it)")
def test_dry_run_prints_one_complete_table():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU even on a GPU machine
    proc = subprocess.run([sys.executable, "bench/gpu_report.py", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("Card: ") and "read bandwidth" in lines[0] and "date 20" in lines[0]
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| group")]
    assert not [r for r in rows if r.startswith(("| error", "| skipped"))], "\n".join(rows)
    text = "\n".join(rows)
    for expected in ("| kernel | sampler_step", "| train step | lowdim", "| train step | image",
                     "lowdim predict_action B=1 DDIM-4 dp | fp32 | eager torch", "DDIM-4 guided | bf16 | eager torch",
                     "eager, triton backend", "torch.compile(unet)", "image predict_action B=1 DDIM-4 dp | fp32"):
        assert expected in text, expected
    if importlib.util.find_spec("onnxruntime") is not None:
        assert "onnxruntime (CPUExecutionProvider)" in text
    assert "CUDA graph" not in text  # GPU-only parts stay out of the dry run
