"""bench/roofline.py: the MAC count against torch's own FLOP counter, the floor's arithmetic, the
level a weight set is read from, and the C++ ceilings' argument checks (their values are timings:
they belong to the benchmarks, so only sanity is asserted here)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import roofline
from dpag_engine import _C
from dpag_engine.config import UNET_RECIPES
from dpag_engine.model.unet import ConditionalUnet1D


@pytest.mark.parametrize("recipe,batch", [("tiny", 1), ("small", 1), ("small", 3)])
def test_conv_macs_match_torch_flop_counter(recipe, batch):
    torch.manual_seed(0)
    unet = ConditionalUnet1D(2, 40, UNET_RECIPES[recipe]).eval()
    inputs = (torch.randn(batch, 16, 2), torch.tensor([7] * batch), torch.randn(batch, 40))
    macs = roofline.conv_macs(unet, *inputs)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(*inputs)
    conv_flops = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))
    assert macs > 0 and 2 * macs == conv_flops


def test_floor_is_the_larger_of_compute_and_streaming(monkeypatch):
    facts = roofline.CpuFacts("test cpu", l2_per_core=1 << 20, l3=32 << 20, flags=("avx2",))
    monkeypatch.setattr(roofline, "cpu_facts", lambda: facts)
    r = roofline.Roofline(threads=2, fma_gmacs=50.0, bandwidth_gbs={"L2": 200.0, "L3": 80.0, "DRAM": 20.0})
    assert [r.level_of(n) for n in (1 << 20, 2 << 20, (2 << 20) + 1, 32 << 20, (32 << 20) + 1)] == \
        ["L2", "L2", "L3", "L3", "DRAM"]
    # 1e9 MACs at 50 GMAC/s = 20 ms; 1e9 bytes from L3 at 80 GB/s = 12.5 ms, from DRAM at 20 GB/s = 50 ms.
    assert math.isclose(r.floor_ms(1e9, 1e9, 16 << 20), 20.0)
    assert math.isclose(r.floor_ms(1e9, 1e9, 64 << 20), 50.0)
    assert math.isclose(r.floor_ms(1e6, 1e9, 1 << 20), 5.0)


def test_cpu_facts_of_this_machine():
    facts = roofline.cpu_facts()
    assert facts.model and set(facts.flags) <= set(roofline.ISA_FLAGS)
    assert _C.cpu_kernel_isa() in facts.describe()


def test_ceilings_are_positive_and_check_their_arguments():
    assert 0 < _C.cpu_fma_peak_gmacs(1, 0.01) < 1e5
    assert 0 < _C.cpu_read_bandwidth_gbs(1 << 16, 1, 0.01) < 1e5
    with pytest.raises(ValueError, match="threads"):
        _C.cpu_fma_peak_gmacs(0, 0.01)
    with pytest.raises(ValueError, match="seconds"):
        _C.cpu_read_bandwidth_gbs(1 << 16, 1, float("nan"))
    with pytest.raises(ValueError, match="bytes_per_thread"):
        _C.cpu_read_bandwidth_gbs(100, 1, 0.01)
