"""Ahead-of-time compilation of every kernel for a GPU target, without a GPU.

`python -m dpag_engine.kernels.aot [--arch 90]` builds each kernel with `triton.compile` through the
full NVIDIA pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin, using the ptxas shipped in the triton
wheel) for an sm_90 (Hopper) target, so a kernel that cannot build for the GPU fails CI on a CPU box.

It must run in a process where TRITON_INTERPRET is unset: under the interpreter `@triton.jit`
returns interpreter objects that the compiler cannot lower (the test runs this in a subprocess).
"""
from __future__ import annotations

import argparse
import os
import sys

import triton
import triton.language as tl


def specs() -> list[tuple[str, object, dict, dict]]:
    """(name, JITFunction, signature, constexprs) for each kernel in its production configuration(s)."""
    from . import film, latent, sampler

    f32 = tl.float32
    step = dict(sampler.COEF_COLUMNS, STEP_FROM_PTR=True, HAS_NOISE=True, HAS_CLIP=True, CDT=f32,
                BLOCK=sampler.BLOCK)
    sig_step = {"x_ptr": "*fp16", "eps_ptr": "*fp16", "noise_ptr": "*fp16", "coefs_ptr": "*fp32",
                "step_ptr": "*i64", "prev_ptr": "*fp16", "x0_ptr": "*fp16", "N": "i32", "K": "i32",
                "step_val": "i32", "clip": "fp32"}
    sig_q = {"x0_ptr": "*fp32", "noise_ptr": "*fp32", "t_ptr": "*i64", "sa_ptr": "*fp32",
             "s1ma_ptr": "*fp32", "out_ptr": "*fp32", "N": "i32", "M": "i32"}
    sig_qb = {"dy_ptr": "*fp32", "t_ptr": "*i64", "sa_ptr": "*fp32", "s1ma_ptr": "*fp32",
              "dx0_ptr": "*fp32", "dnoise_ptr": "*fp32", "N": "i32", "M": "i32"}
    em_common = {"R": "i32", "D": "i32", "c_drift": "fp32", "c_noise": "fp32"}
    sig_em = {"z_ptr": "*fp32", "g_ptr": "*fp32", "lv_ptr": "*fp32", "xi_ptr": "*fp32", "out_ptr": "*fp32", **em_common}
    sig_emb = {"dy_ptr": "*fp32", "g_ptr": "*fp32", "lv_ptr": "*fp32", "xi_ptr": "*fp32", "dlv_ptr": "*fp32",
               **em_common}
    em_cx = dict(NORMALIZE=True, HAS_NOISE=True, CDT=f32, BLOCK_R=16, BLOCK_D=256)
    sig_red = {"dy_ptr": "*bf16", "h_ptr": "*bf16", "row_off_ptr": "*i32", "row_len_ptr": "*i32",
               "out_col_ptr": "*i32", "row_c_ptr": "*i32", "dsb_ptr": "*fp32",
               "n_rows": "i32", "P": "i32", "S2": "i32", "max_T": "i32"}
    sig_mm = {"a_ptr": "*fp32", "w_ptr": "*fp32", "cond_ptr": "*fp32", "out_ptr": "*fp32",
              "M": "i32", "N": "i32", "K": "i32", "stride_wk": "i32", "stride_wn": "i32",
              "stride_cm": "i32", "stride_cn": "i32"}
    return [
        ("sampler_step", sampler._sampler_step_kernel, sig_step, step),
        ("sampler_step[int step, no noise]", sampler._sampler_step_kernel,
         {**sig_step, "x_ptr": "*fp32", "eps_ptr": "*fp32", "noise_ptr": "*fp32", "prev_ptr": "*fp32",
          "x0_ptr": "*fp32"}, {**step, "STEP_FROM_PTR": False, "HAS_NOISE": False}),
        ("sampler_step_inpaint", sampler._sampler_step_inpaint_kernel,
         {**sig_step, "pre_ptr": "*fp16", "pnoise_ptr": "*fp16", "w_ptr": "*fp16", "icoefs_ptr": "*fp32",
          "HD": "i32", "Da": "i32", "start": "i32", "W": "i32", "NP": "i32"},
         {**step, **sampler.INPAINT_COLUMNS}),
        ("q_sample_fwd", sampler._q_sample_fwd_kernel, sig_q, dict(CDT=f32, BLOCK=sampler.BLOCK)),
        ("q_sample_bwd", sampler._q_sample_bwd_kernel, sig_qb, dict(CDT=f32, BLOCK=sampler.BLOCK)),
        ("em_fwd", latent._em_fwd_kernel, sig_em, em_cx),
        ("em_bwd", latent._em_bwd_kernel, sig_emb, em_cx),
        ("film_reduce", film._film_reduce_kernel, sig_red, dict(CDT=f32, BLOCK_R=128, BLOCK_T=16)),
        ("film_matmul", film._film_matmul_kernel, sig_mm, dict(CDT=f32, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)),
        # float64 path (exactness tests on the GPU): tl.dot in fp64 (DMMA on sm_80+).
        ("film_matmul[fp64]", film._film_matmul_kernel,
         {**sig_mm, **{k: "*fp64" for k in ("a_ptr", "w_ptr", "cond_ptr", "out_ptr")}},
         dict(CDT=tl.float64, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32)),
    ]


def compile_all(arch: int = 90, warp_size: int = 32) -> dict[str, list[str]]:
    """Compile every spec; returns {name: stages produced}. Raises on the first failure."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("aot: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)")
    target = triton.backends.compiler.GPUTarget("cuda", arch, warp_size)
    done = {}
    for name, fn, signature, constexprs in specs():
        sig = dict(signature, **{k: "constexpr" for k in constexprs})
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        compiled = triton.compile(src, target=target)
        done[name] = list(compiled.asm.keys())
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for sm_90")
    args = p.parse_args(argv)
    for name, stages in compile_all(args.arch).items():
        print(f"{name}: {' -> '.join(stages)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
