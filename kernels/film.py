"""Batched vector-Jacobian product of the FiLM conditioning w.r.t. the conditioning vector.

Every ConditionalResidualBlock1D b of the U-Net does

    [scale_b; bias_b] = W_b Mish(cond) + c_b          W_b: (2 C_b, cond_dim)
    y_b = scale_b[:, :, None] * h_b + bias_b[:, :, None]          h_b, y_b: (B, C_b, T_b)

and cond = [step_embedding, global_cond] reaches the network only there. Given the upstream
gradients dy_b = dL/dy_b and the saved h_b, the gradient w.r.t. (a column slice of) cond is

    d_sb[:, off_b : off_b + C_b]       = sum_t dy_b * h_b       (d scale_b)
    d_sb[:, off_b + C_b : off_b + 2C_b] = sum_t dy_b             (d bias_b)
    d_cond = (d_sb @ W_cat) * Mish'(cond)                        W_cat = cat_b W_b[:, cols]

Two launches for any number of sites and the whole batch (autograd: ~5 ops per site):
  1. `_film_reduce_kernel`: all (site, channel) rows of all batch elements reduce over time at once,
     from packed buffers (below), into d_sb (B, S2) float32, S2 = sum_b 2 C_b.
  2. `_film_matmul_kernel`: d_sb @ W_cat as one tiled matmul with Mish'(cond) fused in the epilogue.

Packing (`FilmLayout`): dys and hs are each one (B, P) buffer, P = sum_b C_b T_b; batch row i holds
site 0's (C_0, T_0) block row-major, then site 1's, ... `FilmLayout.views(buf)` gives per-site
(B, C_b, T_b) views into such a buffer, so a producer (e.g. forward hooks) can write h_b straight
into the pack; `film_vjp` also accepts plain lists and packs them with one torch.cat each.
W_cat rows follow the same site order, each site contributing [W_b scale rows; W_b bias rows],
which is exactly the row order of nn.Linear(cond_dim, 2 C_b).weight, so
`W_cat = torch.cat([lin_b.weight[:, cols] for b in sites])` (see `film_weight_cat`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils as U


@triton.jit
def _film_reduce_kernel(dy_ptr, h_ptr, row_off_ptr, row_len_ptr, out_col_ptr, row_c_ptr, dsb_ptr,
                        n_rows, P, S2, max_T,
                        CDT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    # Grid: (row blocks over sum_b C_b, batch). A "row" is one (site, channel): its T_b time
    # samples are contiguous in the pack, and rows of the same site are adjacent, so a
    # (BLOCK_R, BLOCK_T) tile is (nearly) one contiguous chunk of memory.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    batch = tl.program_id(1).to(tl.int64)
    rmask = rows < n_rows
    off = tl.load(row_off_ptr + rows, mask=rmask, other=0)
    T = tl.load(row_len_ptr + rows, mask=rmask, other=0)
    base = batch * P + off
    acc_s = tl.zeros((BLOCK_R,), dtype=CDT)
    acc_b = tl.zeros((BLOCK_R,), dtype=CDT)
    for t0 in range(0, max_T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        m = rmask[:, None] & (t[None, :] < T[:, None])
        idx = base[:, None] + t[None, :]
        dy = tl.load(dy_ptr + idx, mask=m, other=0.0).to(CDT)
        h = tl.load(h_ptr + idx, mask=m, other=0.0).to(CDT)
        acc_s += tl.sum(dy * h, axis=1)
        acc_b += tl.sum(dy, axis=1)
    col = tl.load(out_col_ptr + rows, mask=rmask, other=0)  # d_scale column; d_bias is C_b later
    C = tl.load(row_c_ptr + rows, mask=rmask, other=0)
    out = dsb_ptr + batch * S2 + col
    tl.store(out, acc_s, mask=rmask)
    tl.store(out + C, acc_b, mask=rmask)


@triton.jit
def _mish_grad(x):
    # Mish(x) = x tanh(softplus(x)). With n = e^x, w = n^2 + 2n:
    #   tanh(softplus(x)) = w / (w + 2),  sech^2(softplus(x)) = 4 (w + 1) / (w + 2)^2,
    #   softplus'(x) = sigmoid(x) = n / (1 + n),
    #   Mish'(x) = tanh(sp) + x sech^2(sp) sigmoid(x).
    # Clamping x at 20 before exp avoids overflow (w ~ 2e17 fits fp32); there Mish'(x) = 1 to
    # float precision. For x -> -inf, n -> 0 and everything tends to 0 gracefully.
    n = tl.exp(tl.minimum(x, 20.0))
    w = n * n + 2.0 * n
    tsp = w / (w + 2.0)
    sech2 = 4.0 * (w + 1.0) / ((w + 2.0) * (w + 2.0))
    return tsp + x * sech2 * (n / (1.0 + n))


@triton.jit
def _film_matmul_kernel(a_ptr, w_ptr, cond_ptr, out_ptr, M, N, K,
                        stride_wk, stride_wn, stride_cm, stride_cn,
                        CDT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    # out (M, N) = (a (M, K) @ w (K, N)) * Mish'(cond (M, N)); a is the contiguous float32 d_sb.
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=CDT)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0).to(CDT)
        w = tl.load(w_ptr + rk[:, None] * stride_wk + rn[None, :] * stride_wn,
                    mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0).to(CDT)
        # "ieee": full fp32 products. The matmul is tiny next to the reduction's memory traffic,
        # and TF32 (10-bit mantissa) would put ~1e-3 relative error into the guidance force.
        acc += tl.dot(a, w, input_precision="ieee", out_dtype=CDT)
    omask = (rm[:, None] < M) & (rn[None, :] < N)
    x = tl.load(cond_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, mask=omask, other=0.0).to(CDT)
    out = acc * _mish_grad(x)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=omask)


class FilmLayout:
    """Where each FiLM site lives in the packed (B, P) buffers and in d_sb / W_cat rows.

    `channels[b]` = C_b, `lengths[b]` = T_b, in U-Net execution order (any fixed order works, as
    long as W_cat uses the same one). The per-row tables are built once per device and cached.
    """

    def __init__(self, channels: list[int], lengths: list[int]):
        if len(channels) != len(lengths) or not channels:
            raise ValueError("FilmLayout: need one (channels, length) pair per site, at least one site")
        self.channels = [int(c) for c in channels]
        self.lengths = [int(t) for t in lengths]
        if min(self.channels) <= 0 or min(self.lengths) <= 0:
            raise ValueError(f"FilmLayout: sizes must be positive, got C={self.channels}, T={self.lengths}")
        self.pack_offsets, self.sb_offsets = [], []
        p = s = 0
        for c, t in zip(self.channels, self.lengths):
            self.pack_offsets.append(p)
            self.sb_offsets.append(s)
            p, s = p + c * t, s + 2 * c
        self.P, self.S2 = p, s          # packed width; rows of W_cat / columns of d_sb
        self.n_rows = sum(self.channels)
        self.max_T = max(self.lengths)
        self._tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @classmethod
    def from_tensors(cls, hs: list[torch.Tensor]) -> "FilmLayout":
        return cls([h.shape[1] for h in hs], [h.shape[2] for h in hs])

    def tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._tables:
            off, length, col, ch = [], [], [], []
            for c, t, p, s in zip(self.channels, self.lengths, self.pack_offsets, self.sb_offsets):
                off += [p + j * t for j in range(c)]
                length += [t] * c
                col += [s + j for j in range(c)]
                ch += [c] * c
            self._tables[device] = tuple(torch.tensor(v, dtype=torch.int32, device=device)
                                         for v in (off, length, col, ch))
        return self._tables[device]

    def empty(self, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(batch, self.P, dtype=dtype, device=device)

    def views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """Per-site (B, C_b, T_b) views into a packed (B, P) buffer (write into them to pack)."""
        return [buf[:, p:p + c * t].view(buf.shape[0], c, t)
                for c, t, p in zip(self.channels, self.lengths, self.pack_offsets)]

    def pack(self, xs: list[torch.Tensor]) -> torch.Tensor:
        if len(xs) != len(self.channels):
            raise ValueError(f"FilmLayout.pack: expected {len(self.channels)} sites, got {len(xs)}")
        for x, c, t in zip(xs, self.channels, self.lengths):
            if x.dim() != 3 or x.shape[1:] != (c, t):
                raise ValueError(f"FilmLayout.pack: site of shape {tuple(x.shape)}, expected (B, {c}, {t})")
        return torch.cat([x.reshape(x.shape[0], -1) for x in xs], dim=1)


def film_weight_cat(weights: list[torch.Tensor], cols: slice = slice(None)) -> torch.Tensor:
    """W_cat (S2, G) from the FiLM Linear weights (2 C_b, cond_dim), keeping the `cols` of cond
    (e.g. slice(dsed, None) for the global_cond part). Build once per weight update, not per call."""
    return torch.cat([w[:, cols] for w in weights], dim=0).contiguous()


def film_sum_over_time(dy_pack: torch.Tensor, h_pack: torch.Tensor, layout: FilmLayout) -> torch.Tensor:
    """Launch 1 alone: d_sb (B, S2) float32 (float64 for float64 inputs)."""
    if dy_pack.shape != h_pack.shape or dy_pack.dim() != 2 or dy_pack.shape[1] != layout.P:
        raise ValueError(f"film_vjp: packed dy {tuple(dy_pack.shape)} / h {tuple(h_pack.shape)} "
                         f"must both be (B, {layout.P})")
    U.check_int32_numel("film_vjp: packed dy", dy_pack[0])
    dy_pack, h_pack = dy_pack.contiguous(), h_pack.to(dy_pack.dtype).contiguous()
    B = dy_pack.shape[0]
    acc_dtype = torch.float64 if dy_pack.dtype == torch.float64 else torch.float32
    dsb = U.empty((B, layout.S2), acc_dtype, dy_pack.device)
    off, length, col, ch = layout.tables(dy_pack.device)
    block_t = min(U.next_power_of_2(layout.max_T), 64)
    block_r = max(16, 2048 // block_t)
    grid = (triton.cdiv(layout.n_rows, block_r), B)
    _film_reduce_kernel[grid](dy_pack, h_pack, off, length, col, ch, dsb,
                              layout.n_rows, layout.P, layout.S2, layout.max_T,
                              CDT=U.compute_dtype(dy_pack.dtype), BLOCK_R=block_r, BLOCK_T=block_t,
                              num_warps=4)
    return dsb


def film_vjp(dys, hs, w_cat: torch.Tensor, cond: torch.Tensor,
             layout: FilmLayout | None = None) -> torch.Tensor:
    """Gradient w.r.t. `cond` (B, G) of sum_b <dy_b, y_b>, y_b the FiLM outputs (module docstring).

    dys, hs: lists of (B, C_b, T_b) tensors (packed here), or packed (B, P) buffers plus `layout`.
    w_cat: (S2, G) concatenated FiLM weights restricted to the columns of `cond` wanted.
    cond:  (B, G) the matching columns of the conditioning vector *before* Mish.
    Returns (B, G) in cond's dtype. No autograd: this is itself a backward pass.
    """
    if isinstance(dys, (list, tuple)):
        layout = layout or FilmLayout.from_tensors(hs)
        dy_pack, h_pack = layout.pack(list(dys)), layout.pack(list(hs))
    else:
        if layout is None:
            raise ValueError("film_vjp: packed inputs need their FilmLayout")
        dy_pack, h_pack = dys, hs
    B = dy_pack.shape[0]
    if w_cat.dim() != 2 or w_cat.shape[0] != layout.S2:
        raise ValueError(f"film_vjp: w_cat must be ({layout.S2}, G), got {tuple(w_cat.shape)}")
    G = w_cat.shape[1]
    if cond.shape != (B, G):
        raise ValueError(f"film_vjp: cond must be ({B}, {G}), got {tuple(cond.shape)}")
    with torch.no_grad():
        dsb = film_sum_over_time(dy_pack, h_pack, layout)
        out = U.empty((B, G), cond.dtype, cond.device)
        cdt = U.compute_dtype(dsb.dtype)
        # tl.dot needs every block dim >= 16; small B or G are masked.
        bm = min(64, max(16, U.next_power_of_2(B)))
        bn = min(64, max(16, U.next_power_of_2(G)))
        grid = (triton.cdiv(B, bm), triton.cdiv(G, bn))
        _film_matmul_kernel[grid](dsb, w_cat, cond, out, B, G, layout.S2,
                                  w_cat.stride(0), w_cat.stride(1), cond.stride(0), cond.stride(1),
                                  CDT=cdt, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=32, num_warps=4)
    return out
