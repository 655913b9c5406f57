// The two ceilings of a CPU step's roofline, measured the way the engine runs (bench/roofline.py):
// how fast `threads` threads can read weights from a given level of the memory hierarchy, and how
// many fp32 multiply-accumulates per second they can issue with the dense kernel's instruction
// (the widest FMA the engine selects here, cpu_kernels.h kernel_isa()).
#pragma once

#include <cstddef>

namespace dpag::cpu {

// GB/s of `threads` threads each streaming its own `bytes_per_thread` buffer (first touched by that
// thread, so it lives in its core's cache or NUMA node) with vector loads, repeatedly, for at least
// `seconds`. Buffer sizes pick the level: half an L2 per thread measures L2, and so on.
double read_bandwidth_gbs(std::size_t bytes_per_thread, int threads, double seconds);

// GMAC/s of `threads` threads each running independent fp32 FMA chains from registers (enough to
// cover the FMA latency), on the ISA the dense kernel uses; scalar: one mul-add per cycle per chain.
double fma_peak_gmacs(int threads, double seconds);

}  // namespace dpag::cpu
