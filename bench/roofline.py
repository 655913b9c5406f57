"""The CPU roofline of a policy step, measured on the machine it runs on.

    python bench/roofline.py [--threads 2]      # this machine's table (bench/RESULTS.md keeps one per machine)

A step's floor is the larger of two times (bench/bench_step.py's "floor ms" column):
  * compute: its multiply-accumulates / the fp32 FMA peak of the engine's threads on the ISA its dense
    kernel uses (every weight type is widened to fp32 and multiplied with fp32 FMAs);
  * streaming: its weight bytes / the read bandwidth of the level those weights fit in (the per-core
    L2s together, the L3, or DRAM), since each denoising step reads every weight once.
Both ceilings come from the engine's own microbenchmarks (csrc/roofline.cpp), with its thread count,
so the floor holds on a CPU whose L3 keeps the weights (where a DRAM-bandwidth floor was wrong, as
on the Xeon of the CPU-kernels issue) as on one that streams them from memory.
"""
from __future__ import annotations

import argparse
import functools
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from dpag_engine import _C

# The ISA extensions a CPU engine could use, in the names /proc/cpuinfo gives them.
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16",
             "amx_int8", "amx_tile")


@dataclass(frozen=True)
class CpuFacts:
    model: str
    l2_per_core: int      # bytes
    l3: int               # bytes (all slices the engine's cores share; 0 if none)
    flags: tuple[str, ...]  # of ISA_FLAGS, the ones this CPU has

    def describe(self) -> str:
        return (f"{self.model}; L2 {self.l2_per_core >> 10} KiB per core, L3 {self.l3 >> 20} MiB; "
                f"ISA {' '.join(self.flags) or 'baseline x86-64'}; engine kernels {_C.cpu_kernel_isa()}")


def _size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


@functools.lru_cache(maxsize=None)
def cpu_facts() -> CpuFacts:
    """Model name, cache sizes (sysfs, cpu0) and ISA flags (/proc/cpuinfo) of this Linux machine."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    l2 = l3 = 0
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind = int((index / "level").read_text()), (index / "type").read_text().strip()
            size = _size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind in ("Unified", "Data"):
            l2 = size if level == 2 else l2
            l3 = size if level == 3 else l3
    return CpuFacts(model, l2, l3, tuple(f for f in ISA_FLAGS if f in flags))


@dataclass(frozen=True)
class Roofline:
    threads: int
    fma_gmacs: float             # fp32 multiply-accumulates per second (G), all threads
    bandwidth_gbs: dict          # level ("L2", "L3", "DRAM") -> read GB/s, all threads

    def level_of(self, resident_bytes: int) -> str:
        """Where weights of this total size live between steps: every byte is re-read each step."""
        facts = cpu_facts()
        if facts.l2_per_core and resident_bytes <= facts.l2_per_core * self.threads:
            return "L2"
        if facts.l3 and resident_bytes <= facts.l3:
            return "L3"
        return "DRAM"

    def floor_ms(self, macs: float, streamed_bytes: float, resident_bytes: int) -> float:
        """max(compute time, time to stream `streamed_bytes` from the level `resident_bytes` fit in)."""
        compute = macs / (self.fma_gmacs * 1e9)
        stream = streamed_bytes / (self.bandwidth_gbs[self.level_of(resident_bytes)] * 1e9)
        return max(compute, stream) * 1e3

    def describe(self) -> str:
        bw = ", ".join(f"{level} {gbs:.0f}" for level, gbs in self.bandwidth_gbs.items())
        return f"{self.threads} threads: fp32 FMA {self.fma_gmacs:.0f} GMAC/s; read GB/s {bw}"


def measure(threads: int, seconds: float = 0.3) -> Roofline:
    """Each ceiling measured with `threads` threads; each level's buffer is half of it (L2: per thread)
    so it stays resident, DRAM's is 8x the L3 (at least 256 MiB in all)."""
    facts = cpu_facts()
    sizes = {}
    if facts.l2_per_core:
        sizes["L2"] = facts.l2_per_core // 2
    if facts.l3:
        sizes["L3"] = facts.l3 // 2 // threads
    sizes["DRAM"] = max(8 * facts.l3, 256 << 20) // threads
    bandwidth = {level: _C.cpu_read_bandwidth_gbs(size, threads, seconds) for level, size in sizes.items()}
    return Roofline(threads, _C.cpu_fma_peak_gmacs(threads, seconds), bandwidth)


def conv_macs(unet: torch.nn.Module, *inputs) -> int:
    """Multiply-accumulates of the U-Net's convolutions in one forward on `inputs` (forward hooks:
    C_out x C_in x k per output position; a ConvTranspose1d's per input position)."""
    total = 0

    def count(module, args, output):
        nonlocal total
        c_in, c_out, k = module.in_channels, module.out_channels, module.kernel_size[0]
        positions = args[0].shape[0] * (args[0].shape[-1] if isinstance(module, torch.nn.ConvTranspose1d)
                                        else output.shape[-1])
        total += c_in * c_out * k * positions // module.groups

    hooks = [m.register_forward_hook(count) for m in unet.modules()
             if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d))]
    try:
        with torch.no_grad():
            unet(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="the engine's thread count")
    p.add_argument("--seconds", type=float, default=0.5, help="per measurement")
    args = p.parse_args()
    facts = cpu_facts()
    print(facts.describe())
    rows = ["| threads | fp32 FMA GMAC/s | " + " | ".join(f"{lv} read GB/s" for lv in ("L2", "L3", "DRAM")) + " |",
            "|---|---|---|---|---|"]
    for threads in sorted({1, args.threads}):
        r = measure(threads, args.seconds)
        rows.append(f"| {threads} | {r.fma_gmacs:.0f} | "
                    + " | ".join(f"{r.bandwidth_gbs.get(lv, float('nan')):.0f}" for lv in ("L2", "L3", "DRAM")) + " |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
