r"""Triton kernels for the mixed-adapter LoRA linear: each row of x with its own adapter (or none), the math and
the packed layout of ``fastlora.mixed_reference`` (A (R, K) stacked along the rank, B (N·R,) flattened adapter
after adapter, adapter a at rank offset o_a with rank r_a; ``index`` (M,) -1 for base rows).

Two ways to walk the rows, both without a host sync:

* segments (prefill-sized groups, Punica's SGMV): the rows sorted by adapter (``argsort`` on the device), each
  adapter's rows (segment s = a + 1; segment 0: base rows) cut into tiles of TILE_M rows; a program finds its
  tile's segment from the cumulative tile counts (a vector compare over at most S_BLOCK segments), gathers its
  rows through the permutation and scatters its results back to them. The grid is the upper bound
  cdiv(M, TILE_M) + segments; programs past the last tile return at once.
* rows (decode, Punica's BGMV): one program per row (and rank chunk / column block), reading that row's adapter
  from ``index``: no sort, no metadata, every row may differ.

Kernels (``U``: the adapters' second operand, read from A (row o_a + j) or, with U_PACKED_B, from the packed B
read as (r_a, N): element (j, n) at N·o_a + n·r_a + j):
  ``mixed_shrink_kernel`` / ``mixed_shrink_rows_kernel``  H[m, :r_a] = [s_a ·] drop_a(X[m]) U_aᵀ  (h; dh = s·dY B)
  ``mixed_expand_kernel`` / ``mixed_expand_rows_kernel``  O[m] = [b +] drop_a'(s_a · L[m, :r_a] U_a)  (y's bias +
                                                          low-rank term under cuBLAS's x Wᵀ; dX's low-rank term)
  ``mixed_gemm_kernel``     y[rows of a tile] = x Wᵀ + b + s_a·h B_aᵀ: the base GEMM over segment tiles, the
                            tile's adapter term as the accumulator's initial value (the fused forward)
  ``mixed_grad_kernel``     G_a = Σ_{m of a} [s_a·] L[m]ᵀ drop_a(X[m]): dA (L = dh, X = x) and dB (L = h, X = dY)
                            per adapter, deterministic (one program per adapter, column block and rank chunk)

Each rank loop runs to the row's own r_a in chunks of R_BLOCK = 16 (no padding to the largest rank). Dropout is
Philox from (seed, row, column) as in ``kernels/dropout.py``, each adapter with its own threshold: a row's mask is
the same wherever a kernel regenerates it.
"""
from __future__ import annotations

import collections

import torch
import triton
import triton.language as tl

from .common import dot_precision, interpreted, kernel_view, low_rank_fp32, on_device
from .dropout import PHILOX_ROUNDS, dropout_threshold, philox_keep
from .lora_kernels import low_rank_dot
from .lora_linear import gemm_dispatch

__all__ = ["MixedTriton", "launch_counts", "ROWS_MAX_M"]

launch_counts: collections.Counter = collections.Counter()

# Up to this many rows the per-row (gather) kernels run: decode batches, where sorting costs more than it saves.
ROWS_MAX_M = 64
R_BLOCK = 16  # rank chunk: the smallest tl.dot step; a rank loops over ceil(r_a / 16) chunks


@triton.jit
def _segment_of(t, tile_cum_ptr, seg_start_ptr, n_seg, TILE_M: tl.constexpr, S_BLOCK: tl.constexpr):
    """(segment, first sorted row, end) of tile ``t``; segment = n_seg past the last tile."""
    offs = tl.arange(0, S_BLOCK)
    cum = tl.load(tile_cum_ptr + offs, mask=offs <= n_seg, other=2**30)
    s = tl.sum((cum <= t).to(tl.int32)) - 1
    s = tl.minimum(s, n_seg)
    first_tile = tl.load(tile_cum_ptr + s)
    seg_lo = tl.load(seg_start_ptr + s)
    seg_hi = tl.load(seg_start_ptr + tl.minimum(s + 1, n_seg))
    lo = seg_lo + (t - first_tile) * TILE_M
    return s, lo, tl.minimum(lo + TILE_M, seg_hi)


@triton.jit
def _u_ptrs(u_ptr, o, r, j, k, stride_ur, stride_uk, K, U_PACKED_B: tl.constexpr):
    """Pointers of U_a[j, k] (j rank, k column): A's row o + j, or packed B's element N·o + k·r + j (N = K)."""
    if U_PACKED_B:
        return u_ptr + o.to(tl.int64) * K + k.to(tl.int64) * r + j
    return u_ptr + (o + j).to(tl.int64) * stride_ur + k.to(tl.int64) * stride_uk


@triton.jit
def _segment_low_rank(acc, l_ptr, u_ptr, rows, i_ok, cols, n_ok, o, r, scale, stride_lm, stride_lr, stride_ur,
                      stride_un, N, cdt, U_PACKED_B: tl.constexpr, LO_FP32: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, R_BLOCK: tl.constexpr):
    """acc + scale · L[rows, :r] U_a[:r, cols] for adapter a at rank offset o (U_a read as ``_u_ptrs`` lays it
    out), rank chunk by chunk: the low-rank term of a segment tile (the expand's output, the fused GEMM's
    accumulator)."""
    jj = tl.arange(0, R_BLOCK)
    for r0 in range(0, r, R_BLOCK):
        j = r0 + jj
        l = tl.load(l_ptr + rows[:, None] * stride_lm + j.to(tl.int64)[None, :] * stride_lr,
                    mask=i_ok[:, None] & (j[None, :] < r), other=0.0)
        u = tl.load(_u_ptrs(u_ptr, o, r, j[:, None], cols[None, :], stride_ur, stride_un, N, U_PACKED_B),
                    mask=(j[:, None] < r) & n_ok[None, :], other=0.0)
        acc = low_rank_dot(l.to(tl.float32) * scale, u, acc, cdt, LO_FP32, DOT_PRECISION)
    return acc


@triton.jit(do_not_specialize=["M", "seed"])
def mixed_shrink_kernel(
    x_ptr, u_ptr, h_ptr, perm_ptr, seg_start_ptr, tile_cum_ptr, rank_off_ptr, scal_ptr, thr_ptr, inv_keep_ptr,
    M, K, n_seg,
    stride_xm, stride_xk, stride_ur, stride_uk, stride_hm, stride_hr,
    seed,
    U_PACKED_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    TILE_M: tl.constexpr, BLOCK_K: tl.constexpr, R_BLOCK: tl.constexpr, S_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr,
):
    """H[rows of a tile, chunk] = [s_a ·] drop_a(X[rows]) U_a[chunk]ᵀ, fp32 accumulate. Grid (tiles, chunks)."""
    s, lo, hi = _segment_of(tl.program_id(0), tile_cum_ptr, seg_start_ptr, n_seg, TILE_M, S_BLOCK)
    if s == 0 or s >= n_seg:  # base rows (no adapter), or past the last tile
        return
    a = s - 1
    o = tl.load(rank_off_ptr + a)
    r = tl.load(rank_off_ptr + a + 1) - o
    j = tl.program_id(1) * R_BLOCK + tl.arange(0, R_BLOCK)
    if tl.program_id(1) * R_BLOCK >= r:
        return
    i = lo + tl.arange(0, TILE_M)
    i_ok = i < hi
    rows = tl.load(perm_ptr + i, mask=i_ok, other=0).to(tl.int64)
    j_ok = j < r
    offs_k = tl.arange(0, BLOCK_K)
    cdt = x_ptr.dtype.element_ty
    if HAS_DROPOUT:
        thr = tl.load(thr_ptr + a)
        inv_keep = tl.load(inv_keep_ptr + a)
    acc = tl.zeros((TILE_M, R_BLOCK), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + offs_k
        k_ok = kk < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + kk.to(tl.int64)[None, :] * stride_xk,
                    mask=i_ok[:, None] & k_ok[None, :], other=0.0)
        u = tl.load(_u_ptrs(u_ptr, o, r, j[None, :], kk[:, None], stride_ur, stride_uk, K, U_PACKED_B),
                    mask=j_ok[None, :] & k_ok[:, None], other=0.0)  # U_aᵀ tile (BLOCK_K, R_BLOCK)
        if HAS_DROPOUT:
            keep = philox_keep(seed, thr, rows, k, TILE_M, BLOCK_K, N_ROUNDS)
            x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0).to(cdt)
        acc = tl.dot(x, u.to(cdt), acc, input_precision=DOT_PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(scal_ptr + a)
    tl.store(h_ptr + rows[:, None] * stride_hm + j.to(tl.int64)[None, :] * stride_hr,
             acc.to(h_ptr.dtype.element_ty), mask=i_ok[:, None] & j_ok[None, :])


@triton.jit(do_not_specialize=["M", "seed"])
def mixed_shrink_rows_kernel(
    x_ptr, u_ptr, h_ptr, index_ptr, rank_off_ptr, scal_ptr, thr_ptr, inv_keep_ptr,
    M, K,
    stride_xm, stride_xk, stride_ur, stride_uk, stride_hm, stride_hr,
    seed,
    U_PACKED_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_K: tl.constexpr, R_BLOCK: tl.constexpr, N_ROUNDS: tl.constexpr,
):
    """H[m, chunk] = [s_a ·] drop_a(X[m]) U_a[chunk]ᵀ for the row's own adapter a. Grid (rows, chunks)."""
    m = tl.program_id(0)
    a = tl.load(index_ptr + m)
    if a < 0:
        return
    o = tl.load(rank_off_ptr + a)
    r = tl.load(rank_off_ptr + a + 1) - o
    if tl.program_id(1) * R_BLOCK >= r:
        return
    j = tl.program_id(1) * R_BLOCK + tl.arange(0, R_BLOCK)
    j_ok = j < r
    offs_k = tl.arange(0, BLOCK_K)
    row = m.to(tl.int64)
    if HAS_DROPOUT:
        thr = tl.load(thr_ptr + a)
        inv_keep = tl.load(inv_keep_ptr + a)
    acc = tl.zeros((R_BLOCK, BLOCK_K), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + offs_k
        k_ok = kk < K
        x = tl.load(x_ptr + row * stride_xm + kk.to(tl.int64) * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep = philox_keep(seed, thr, tl.zeros((1,), dtype=tl.int64) + row, k, 1, BLOCK_K, N_ROUNDS)
            x = tl.where(tl.reshape(keep, (BLOCK_K,)), x * inv_keep, 0.0)
        u = tl.load(_u_ptrs(u_ptr, o, r, j[:, None], kk[None, :], stride_ur, stride_uk, K, U_PACKED_B),
                    mask=j_ok[:, None] & k_ok[None, :], other=0.0)
        acc += u.to(tl.float32) * x[None, :]
    h = tl.sum(acc, axis=1)
    if HAS_SCALE:
        h = h * tl.load(scal_ptr + a)
    tl.store(h_ptr + row * stride_hm + j.to(tl.int64) * stride_hr, h.to(h_ptr.dtype.element_ty), mask=j_ok)


@triton.jit(do_not_specialize=["M", "seed"])
def mixed_expand_kernel(
    l_ptr, u_ptr, out_ptr, bias_ptr, perm_ptr, seg_start_ptr, tile_cum_ptr, rank_off_ptr, scal_ptr, thr_ptr,
    inv_keep_ptr,
    M, N, n_seg,
    stride_lm, stride_lr, stride_ur, stride_un, stride_om, stride_on,
    seed,
    U_PACKED_B: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, LO_DROPOUT: tl.constexpr,
    LO_FP32: tl.constexpr,
    TILE_M: tl.constexpr, BLOCK_N: tl.constexpr, R_BLOCK: tl.constexpr, S_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr,
):
    """O[rows of a tile, cols] = [b +] drop_a'([s_a ·] L[rows, :r_a] U_a[:, cols]); base rows get b (or 0).
    Grid (tiles, column blocks); every row of O is written."""
    s, lo, hi = _segment_of(tl.program_id(0), tile_cum_ptr, seg_start_ptr, n_seg, TILE_M, S_BLOCK)
    if s >= n_seg:
        return
    i = lo + tl.arange(0, TILE_M)
    i_ok = i < hi
    rows = tl.load(perm_ptr + i, mask=i_ok, other=0).to(tl.int64)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < N
    cdt = out_ptr.dtype.element_ty
    acc = tl.zeros((TILE_M, BLOCK_N), dtype=tl.float32)
    if s > 0:
        a = s - 1
        o = tl.load(rank_off_ptr + a)
        r = tl.load(rank_off_ptr + a + 1) - o
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scal_ptr + a)
        acc = _segment_low_rank(acc, l_ptr, u_ptr, rows, i_ok, cols, n_ok, o, r, scale, stride_lm, stride_lr,
                                stride_ur, stride_un, N, cdt, U_PACKED_B, LO_FP32, DOT_PRECISION, R_BLOCK)
        if LO_DROPOUT:
            keep = philox_keep(seed, tl.load(thr_ptr + a), rows, pid_n * BLOCK_N, TILE_M, BLOCK_N, N_ROUNDS)
            acc = tl.where(keep, acc * tl.load(inv_keep_ptr + a), 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols.to(tl.int64)[None, :] * stride_on, acc.to(cdt),
             mask=i_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["M", "seed"])
def mixed_expand_rows_kernel(
    l_ptr, u_ptr, out_ptr, bias_ptr, index_ptr, rank_off_ptr, scal_ptr, thr_ptr, inv_keep_ptr,
    M, N,
    stride_lm, stride_lr, stride_ur, stride_un, stride_om, stride_on,
    seed,
    U_PACKED_B: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, LO_DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr, R_BLOCK: tl.constexpr, N_ROUNDS: tl.constexpr,
):
    """O[m, cols] = [b +] drop_a'([s_a ·] L[m, :r_a] U_a[:, cols]) for the row's own adapter (b or 0 for a base
    row). Grid (rows, column blocks)."""
    m = tl.program_id(0)
    row = m.to(tl.int64)
    a = tl.load(index_ptr + m)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if a >= 0:
        o = tl.load(rank_off_ptr + a)
        r = tl.load(rank_off_ptr + a + 1) - o
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scal_ptr + a)
        jj = tl.arange(0, R_BLOCK)
        for r0 in range(0, r, R_BLOCK):
            j = r0 + jj
            l = tl.load(l_ptr + row * stride_lm + j.to(tl.int64) * stride_lr, mask=j < r, other=0.0)
            u = tl.load(_u_ptrs(u_ptr, o, r, j[:, None], cols[None, :], stride_ur, stride_un, N, U_PACKED_B),
                        mask=(j[:, None] < r) & n_ok[None, :], other=0.0)
            acc += tl.sum((l.to(tl.float32) * scale)[:, None] * u.to(tl.float32), axis=0)
        if LO_DROPOUT:
            keep = philox_keep(seed, tl.load(thr_ptr + a), tl.zeros((1,), dtype=tl.int64) + row, pid_n * BLOCK_N,
                               1, BLOCK_N, N_ROUNDS)
            acc = tl.where(tl.reshape(keep, (BLOCK_N,)), acc * tl.load(inv_keep_ptr + a), 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols.to(tl.int64) * stride_on, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit(do_not_specialize=["M"])
def mixed_gemm_kernel(
    x_ptr, w_ptr, y_ptr, bias_ptr, h_ptr, b_ptr, perm_ptr, seg_start_ptr, tile_cum_ptr, rank_off_ptr, scal_ptr,
    M, N, K, n_seg,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_hm, stride_hr,
    HAS_BIAS: tl.constexpr, LO_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_BLOCK: tl.constexpr,
    S_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """y[rows of a tile, cols] = x[rows] Wᵀ + b + s_a · h[rows, :r_a] B_aᵀ over segment tiles of BLOCK_M rows:
    every tile holds one adapter's rows (or base rows: no low-rank term), whose term is the accumulator's
    initial value, so y is stored once. Grid (tiles, column blocks)."""
    s, lo, hi = _segment_of(tl.program_id(0), tile_cum_ptr, seg_start_ptr, n_seg, BLOCK_M, S_BLOCK)
    if s >= n_seg:
        return
    i = lo + tl.arange(0, BLOCK_M)
    i_ok = i < hi
    rows = tl.load(perm_ptr + i, mask=i_ok, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < N
    cols_w = (cols % N).to(tl.int64)  # wrapped: W loads stay in bounds, the store is masked
    cdt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if s > 0:
        a = s - 1
        o = tl.load(rank_off_ptr + a)
        r = tl.load(rank_off_ptr + a + 1) - o
        # packed B read at the wrapped columns (in bounds); the store masks the columns past N
        acc = _segment_low_rank(acc, h_ptr, b_ptr, rows, i_ok, cols_w, n_ok, o, r, tl.load(scal_ptr + a),
                                stride_hm, stride_hr, 0, 0, N, cdt, True, LO_FP32, DOT_PRECISION, R_BLOCK)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_w).to(tl.float32)[None, :]
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k.to(tl.int64)[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k.to(tl.int64)[:, None] * stride_wk + cols_w[None, :] * stride_wn
    for k in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k
        xa = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        wb = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(xa, wb, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    tl.store(y_ptr + rows[:, None] * stride_ym + cols.to(tl.int64)[None, :] * stride_yn, acc.to(cdt),
             mask=i_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["M", "seed"])
def mixed_grad_kernel(
    l_ptr, x_ptr, out_ptr, perm_ptr, seg_start_ptr, rank_off_ptr, scal_ptr, thr_ptr, inv_keep_ptr,
    M, C,
    stride_lm, stride_lr, stride_xm, stride_xc, stride_or, stride_oc,
    seed,
    OUT_PACKED_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr, LO_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, R_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr,
):
    """G_a[chunk, cols] = Σ over adapter a's rows of [s_a ·] L[m, chunk]ᵀ drop_a(X[m, cols]), fp32, stored in A's
    layout (row o_a + j) or, with OUT_PACKED_B, B's (element C·o_a + c·r_a + j). Grid (adapters, column blocks,
    rank chunks); an adapter without rows gets zeros."""
    a = tl.program_id(0)
    o = tl.load(rank_off_ptr + a)
    r = tl.load(rank_off_ptr + a + 1) - o
    if tl.program_id(2) * R_BLOCK >= r:
        return
    j = tl.program_id(2) * R_BLOCK + tl.arange(0, R_BLOCK)
    j_ok = j < r
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    lo = tl.load(seg_start_ptr + a + 1)
    hi = tl.load(seg_start_ptr + a + 2)
    cdt = x_ptr.dtype.element_ty
    if HAS_DROPOUT:
        thr = tl.load(thr_ptr + a)
        inv_keep = tl.load(inv_keep_ptr + a)
    acc = tl.zeros((R_BLOCK, BLOCK_C), dtype=tl.float32)
    for i0 in range(lo, hi, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        i_ok = i < hi
        rows = tl.load(perm_ptr + i, mask=i_ok, other=0).to(tl.int64)
        l = tl.load(l_ptr + rows[:, None] * stride_lm + j.to(tl.int64)[None, :] * stride_lr,
                    mask=i_ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols.to(tl.int64)[None, :] * stride_xc,
                    mask=i_ok[:, None] & c_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = philox_keep(seed, thr, rows, pid_c * BLOCK_C, BLOCK_M, BLOCK_C, N_ROUNDS)
            x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0)
        if LO_FP32:
            acc = tl.dot(tl.trans(l), x.to(tl.float32), acc, input_precision="tf32")
        else:
            acc = tl.dot(tl.trans(l.to(cdt)), x.to(cdt), acc, input_precision=DOT_PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(scal_ptr + a)
    if OUT_PACKED_B:
        ptrs = out_ptr + o.to(tl.int64) * C + cols.to(tl.int64)[None, :] * r + j[:, None]
    else:
        ptrs = out_ptr + (o + j).to(tl.int64)[:, None] * stride_or + cols.to(tl.int64)[None, :] * stride_oc
    tl.store(ptrs, acc, mask=j_ok[:, None] & c_ok[None, :])


# ---------------------------------------------------------------------------------------------------------
# Configs: fixed per kernel and M class (the interpreter's are tiny: its cost grows with the tile). The
# offline sm_90 builds (tests/test_kernels_compile.py) check them for spills and shared memory.
# ---------------------------------------------------------------------------------------------------------

def configs(dtype: torch.dtype, M: int) -> dict:
    """{kernel: meta-parameters} for inputs of ``dtype`` and M rows."""
    if interpreted():
        return dict(shrink=dict(TILE_M=16, BLOCK_K=32, num_warps=4, num_stages=2),
                    shrink_rows=dict(BLOCK_K=32, num_warps=4, num_stages=2),
                    expand=dict(TILE_M=16, BLOCK_N=32, num_warps=4, num_stages=2),
                    expand_rows=dict(BLOCK_N=32, num_warps=4, num_stages=2),
                    gemm=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2),
                    grad=dict(BLOCK_M=16, BLOCK_C=32, num_warps=4, num_stages=2))
    fp32 = dtype == torch.float32
    return dict(shrink=dict(TILE_M=16 if M <= 1024 else 32, BLOCK_K=64 if fp32 else 128, num_warps=4, num_stages=3),
                shrink_rows=dict(BLOCK_K=256, num_warps=4, num_stages=3),
                expand=dict(TILE_M=32, BLOCK_N=64 if fp32 else 128, num_warps=4, num_stages=3),
                expand_rows=dict(BLOCK_N=256, num_warps=4, num_stages=3),
                gemm=dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32 if fp32 else 64, num_warps=4, num_stages=4),
                grad=dict(BLOCK_M=32, BLOCK_C=64, num_warps=4, num_stages=3))


# ---------------------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------------------

_PARAMS: "collections.OrderedDict" = collections.OrderedDict()


def _adapter_params(ranks, dropout_ps, device):
    """(rank offsets (n+1,) int32, dropout thresholds (n,) int64, 1/(1-p) (n,) fp32) on ``device``, cached by value
    (the key is the values themselves, so a cached entry is never stale)."""
    key = (tuple(int(r) for r in ranks), tuple(float(p) for p in dropout_ps), str(device))
    hit = _PARAMS.get(key)
    if hit is not None:
        _PARAMS.move_to_end(key)
        return hit
    offs = [0]
    for r in key[0]:
        offs.append(offs[-1] + r)
    hit = (torch.tensor(offs, dtype=torch.int32).to(device),
           torch.tensor([dropout_threshold(p) if p > 0.0 else 0 for p in key[1]], dtype=torch.int64).to(device),
           torch.tensor([1.0 / (1.0 - p) for p in key[1]], dtype=torch.float32).to(device))
    _PARAMS[key] = hit
    if len(_PARAMS) > 256:
        _PARAMS.popitem(last=False)
    return hit


class _Segments:
    """The rows sorted by adapter and the cumulative tile counts, on the device (no host sync)."""

    def __init__(self, index, n):
        dev = index.device
        self.n_seg = n + 1
        self.M = index.numel()
        self.perm = torch.argsort(index, stable=True)
        counts = torch.zeros(n + 1, dtype=torch.int32, device=dev)
        counts.scatter_add_(0, (index + 1).to(torch.int64), torch.ones_like(index, dtype=torch.int32))
        self.counts = counts
        self.seg_start = torch.zeros(n + 2, dtype=torch.int32, device=dev)
        self.seg_start[1:] = counts.cumsum(0)
        self.S_BLOCK = max(16, triton.next_power_of_2(n + 2))
        self._tiles = {}

    def tiles(self, tile_m: int):
        """(tile_cum (n+2,) int32, grid bound) for tiles of ``tile_m`` rows."""
        if tile_m not in self._tiles:
            cum = torch.zeros(self.n_seg + 1, dtype=torch.int32, device=self.perm.device)
            cum[1:] = ((self.counts + tile_m - 1) // tile_m).cumsum(0)
            self._tiles[tile_m] = (cum, triton.cdiv(self.M, tile_m) + self.n_seg)
        return self._tiles[tile_m]


def _launch(name, kernel, grid, *args, **meta):
    launch_counts[name] += 1
    kernel[grid](*args, **meta)


def _shrink(x, u, h, index, seg, params, scal, seed, cfg, *, packed_b, scale, dropout):
    """h[m, :r_a] = [s_a ·] drop_a(x[m]) U_aᵀ for every adapter row (per row when ``seg`` is None)."""
    M, K = x.shape
    rank_off, thr, inv_keep = params
    r_max = h.shape[1]
    chunks = triton.cdiv(r_max, R_BLOCK)
    sur, suk = (0, 0) if packed_b else (u.stride(0), u.stride(1))
    prec = dot_precision(x.dtype)
    if seg is None:
        c = cfg["shrink_rows"]
        _launch("mixed_shrink_rows", mixed_shrink_rows_kernel, (M, chunks),
                x, u, h, index, rank_off, scal, thr, inv_keep, M, K,
                x.stride(0), x.stride(1), sur, suk, h.stride(0), h.stride(1), int(seed),
                U_PACKED_B=packed_b, HAS_SCALE=scale, HAS_DROPOUT=dropout, R_BLOCK=R_BLOCK, N_ROUNDS=PHILOX_ROUNDS,
                **c)
        return
    c = dict(cfg["shrink"])
    tile_cum, bound = seg.tiles(c["TILE_M"])
    _launch("mixed_shrink", mixed_shrink_kernel, (bound, chunks),
            x, u, h, seg.perm, seg.seg_start, tile_cum, rank_off, scal, thr, inv_keep, M, K, seg.n_seg,
            x.stride(0), x.stride(1), sur, suk, h.stride(0), h.stride(1), int(seed),
            U_PACKED_B=packed_b, HAS_SCALE=scale, HAS_DROPOUT=dropout, R_BLOCK=R_BLOCK, S_BLOCK=seg.S_BLOCK,
            DOT_PRECISION=prec, N_ROUNDS=PHILOX_ROUNDS, **c)


def _expand(l, u, out, bias, index, seg, params, scal, seed, cfg, *, packed_b, scale, dropout, lo_fp32):
    """out[m] = [b +] drop_a'([s_a ·] l[m, :r_a] U_a) for every row (b or 0 for base rows)."""
    M, N = out.shape
    rank_off, thr, inv_keep = params
    sur, sun = (0, 0) if packed_b else (u.stride(0), u.stride(1))
    b = bias if bias is not None else out
    if seg is None:
        c = cfg["expand_rows"]
        _launch("mixed_expand_rows", mixed_expand_rows_kernel, (M, triton.cdiv(N, c["BLOCK_N"])),
                l, u, out, b, index, rank_off, scal, thr, inv_keep, M, N,
                l.stride(0), l.stride(1), sur, sun, out.stride(0), out.stride(1), int(seed),
                U_PACKED_B=packed_b, HAS_BIAS=bias is not None, HAS_SCALE=scale, LO_DROPOUT=dropout,
                R_BLOCK=R_BLOCK, N_ROUNDS=PHILOX_ROUNDS, **c)
        return
    c = cfg["expand"]
    tile_cum, bound = seg.tiles(c["TILE_M"])
    _launch("mixed_expand", mixed_expand_kernel, (bound, triton.cdiv(N, c["BLOCK_N"])),
            l, u, out, b, seg.perm, seg.seg_start, tile_cum, rank_off, scal, thr, inv_keep, M, N, seg.n_seg,
            l.stride(0), l.stride(1), sur, sun, out.stride(0), out.stride(1), int(seed),
            U_PACKED_B=packed_b, HAS_BIAS=bias is not None, HAS_SCALE=scale, LO_DROPOUT=dropout, LO_FP32=lo_fp32,
            R_BLOCK=R_BLOCK, S_BLOCK=seg.S_BLOCK, DOT_PRECISION=dot_precision(out.dtype), N_ROUNDS=PHILOX_ROUNDS,
            **c)


def _fused_gemm(x, weight, bias, h, lora_B, y, seg, params, scal, cfg, lo_fp32):
    M, K = x.shape
    N = weight.shape[0]
    c = cfg["gemm"]
    tile_cum, bound = seg.tiles(c["BLOCK_M"])
    _launch("mixed_gemm", mixed_gemm_kernel, (bound, triton.cdiv(N, c["BLOCK_N"])),
            x, weight, y, bias if bias is not None else y, h, lora_B, seg.perm, seg.seg_start, tile_cum, params[0],
            scal, M, N, K, seg.n_seg,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
            h.stride(0), h.stride(1),
            HAS_BIAS=bias is not None, LO_FP32=lo_fp32, R_BLOCK=R_BLOCK, S_BLOCK=seg.S_BLOCK,
            DOT_PRECISION=dot_precision(x.dtype), **c)


def _grad(l, x, out, seg, params, scal, seed, cfg, n, *, packed_b, scale, dropout, lo_fp32):
    """out (fp32, A's or packed B's layout) = per adapter Σ_rows [s_a ·] l[m]ᵀ drop_a(x[m])."""
    M, C = x.shape
    rank_off, thr, inv_keep = params
    c = cfg["grad"]
    r_max = l.shape[1]
    so = (0, 0) if packed_b else (out.stride(0), out.stride(1))
    _launch("mixed_grad", mixed_grad_kernel, (n, triton.cdiv(C, c["BLOCK_C"]), triton.cdiv(r_max, R_BLOCK)),
            l, x, out, seg.perm, seg.seg_start, rank_off, scal, thr, inv_keep, M, C,
            l.stride(0), l.stride(1), x.stride(0), x.stride(1), *so, int(seed),
            OUT_PACKED_B=packed_b, HAS_SCALE=scale, HAS_DROPOUT=dropout, LO_FP32=lo_fp32, R_BLOCK=R_BLOCK,
            DOT_PRECISION=dot_precision(x.dtype), N_ROUNDS=PHILOX_ROUNDS, **c)


def _dispatch_key(op, x, weight, lora_A, ranks, bias):
    N, K = weight.shape
    mb = max(16, triton.next_power_of_2(x.shape[0]))
    return (op, mb, N, K, max(ranks), triton.next_power_of_2(len(ranks)), x.dtype, lora_A.dtype, bias is not None,
            str(x.device))


class MixedTriton:
    """The Triton implementation in the op protocol's shape (the same signature as
    ``fastlora.mixed_reference.MixedTorch``): tensors (x, weight, bias, lora_A, lora_B, index, scalings), consts
    (ranks, dropout_ps), saved (h,)."""

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, index, scalings, ranks, dropout_ps, *, seed, save):
        with on_device(x.device):
            return MixedTriton._forward(x, weight, bias, lora_A, lora_B, index, scalings, ranks, dropout_ps, seed,
                                        save)

    @staticmethod
    def _forward(x, weight, bias, lora_A, lora_B, index, scalings, ranks, dropout_ps, seed, save):
        M, K = x.shape
        N = weight.shape[0]
        dev = x.device
        h = torch.empty((M, max(ranks)), dtype=torch.promote_types(x.dtype, torch.float32), device=dev)
        y = torch.empty((M, N), dtype=x.dtype, device=dev)
        if M == 0:
            return y, (h if save else None,)
        # explicit strides everywhere: a transposed weight (GPT-2's Conv1D) is read as it is, not copied
        x, weight, lora_A = (kernel_view(t) for t in (x, weight, lora_A))
        lora_B = lora_B.contiguous()
        bias = bias.contiguous() if bias is not None else None
        index = index.contiguous()
        params = _adapter_params(ranks, dropout_ps, dev)
        scal = scalings.to(device=dev, dtype=torch.float32)
        dropout = any(p > 0.0 for p in dropout_ps)
        cfg = configs(x.dtype, M)
        lo_fp32 = low_rank_fp32(x.dtype, lora_B.dtype)
        if M <= ROWS_MAX_M:  # decode: per-row kernels, cuBLAS for the base GEMM on top of b + low-rank term
            _shrink(x, lora_A, h, index, None, params, scal, seed, cfg, packed_b=False, scale=False, dropout=dropout)
            if N > 0:
                _expand(h, lora_B, y, bias, index, None, params, scal, seed, cfg, packed_b=True, scale=True,
                        dropout=False, lo_fp32=lo_fp32)
                if K > 0:
                    y.addmm_(x, weight.t())
            return y, (h if save else None,)
        seg = _Segments(index, len(ranks))
        _shrink(x, lora_A, h, index, seg, params, scal, seed, cfg, packed_b=False, scale=False, dropout=dropout)
        if N == 0:
            return y, (h if save else None,)

        def fused():
            _fused_gemm(x, weight, bias, h, lora_B, y, seg, params, scal, cfg, lo_fp32)

        def cublas():
            _expand(h, lora_B, y, bias, index, seg, params, scal, seed, cfg, packed_b=True, scale=True,
                    dropout=False, lo_fp32=lo_fp32)
            if K > 0:
                y.addmm_(x, weight.t())

        candidates = {"triton": fused, "cublas": cublas}
        candidates[gemm_dispatch.choose(_dispatch_key("mixed_fwd", x, weight, lora_A, ranks, bias), candidates,
                                        dev)]()
        return y, (h if save else None,)

    @staticmethod
    def backward(grad_y, x, weight, bias, lora_A, lora_B, index, scalings, h, ranks, dropout_ps, *, seed, needs):
        with on_device(x.device):
            return MixedTriton._backward(grad_y, x, weight, bias, lora_A, lora_B, index, scalings, h, ranks,
                                         dropout_ps, seed, needs)

    @staticmethod
    def _backward(grad_y, x, weight, bias, lora_A, lora_B, index, scalings, h, ranks, dropout_ps, seed, needs):
        n_x, n_w, n_b, n_a, n_bb = needs[:5]
        M, K = x.shape
        N = weight.shape[0]
        dev = x.device
        n = len(ranks)
        dx = dW = dbias = dA = dB = None
        if n_w:
            dW = torch.mm(grad_y.t(), x)
        if n_b:
            dbias = grad_y.sum(0)
        if M == 0 or not (n_x or n_a or n_bb):
            if n_x:
                dx = torch.zeros((M, K), dtype=x.dtype, device=dev)
            if n_a:
                dA = torch.zeros_like(lora_A)
            if n_bb:
                dB = torch.zeros_like(lora_B)
            return [dx, dW, dbias, dA, dB, None, None]
        grad_y = kernel_view(grad_y)
        # explicit strides everywhere: a transposed weight (GPT-2's Conv1D) is read as it is, not copied
        x, weight, lora_A = (kernel_view(t) for t in (x, weight, lora_A))
        lora_B = lora_B.contiguous()
        index = index.contiguous()
        params = _adapter_params(ranks, dropout_ps, dev)
        scal = scalings.to(device=dev, dtype=torch.float32)
        dropout = any(p > 0.0 for p in dropout_ps)
        cfg = configs(x.dtype, M)
        seg = _Segments(index, n)
        walk = None if M <= ROWS_MAX_M else seg
        lo_fp32 = low_rank_fp32(x.dtype, lora_A.dtype)
        if n_bb:
            dB32 = torch.empty(lora_B.shape, dtype=torch.float32, device=dev)
            _grad(h, grad_y, dB32, seg, params, scal, seed, cfg, n, packed_b=True, scale=True, dropout=False,
                  lo_fp32=lo_fp32)
            dB = dB32.to(lora_B.dtype)
        if n_x or n_a:
            dh = torch.empty((M, max(ranks)), dtype=torch.float32, device=dev)
            _shrink(grad_y, lora_B, dh, index, walk, params, scal, seed, cfg, packed_b=True, scale=True,
                    dropout=False)
            if n_a:
                dA32 = torch.empty(lora_A.shape, dtype=torch.float32, device=dev)
                _grad(dh, x, dA32, seg, params, scal, seed, cfg, n, packed_b=False, scale=False, dropout=dropout,
                      lo_fp32=lo_fp32)
                dA = dA32.to(lora_A.dtype)
            if n_x:
                dx = torch.empty((M, K), dtype=x.dtype, device=dev)
                if K > 0:
                    _expand(dh, lora_A, dx, None, index, walk, params, scal, seed, cfg, packed_b=False, scale=False,
                            dropout=dropout, lo_fp32=lo_fp32)
                    if N > 0:
                        dx.addmm_(grad_y, weight)
        return [dx, dW, dbias, dA, dB, None, None]
