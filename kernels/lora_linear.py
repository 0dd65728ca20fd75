r"""Triton kernels for the fused LoRA linear ``y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ`` and its gradients.

Shapes: x (M, K), W (N, K), A (r, K), B (N, r), b (N,), h = drop(x) Aᵀ (M, r). The math is derived in
``fastlora.autograd``; this file holds the kernels and their launch helpers only.

Forward (M > 64, or dropout on, or r > 32)
  1. ``lora_shrink_kernel``     h = drop(x) Aᵀ            one pass over x, fp32 accumulate, mask from Philox
  2. ``gemm_lora_kernel``       y = x Wᵀ + b + s·h Bᵀ      one GEMM over K; b + s·h Bᵀ is the accumulator's
                                                            initial value, so y is stored once, rounded once
Forward (M <= 64, no dropout, r <= 32: the small-M / inference path)
  1. ``gemm_lora_kernel`` with FUSE_SHRINK: h is accumulated in the same K loop from the x tiles the GEMM has
     already loaded, so x is read once and there is a single launch. The cost, r/BLOCK_N extra MMA work per
     program, is negligible where the GEMM is bound by reading W (small M), and too high for large M, where
     a separate memory-bound shrink pass (a few % of the GEMM) is cheaper; with dropout it would also
     regenerate the mask once per N tile.
Backward
  1. ``lora_grad_dy_kernel``    dh = s·dY B  and  dB = s·dYᵀ h  (and db = Σ dY) from ONE pass over dY, split
                                over row tiles and, where those cannot fill the device, column ranges (partial
                                dh per range, summed deterministically); dB/db are reduced across row tiles
                                with fp32 atomics (under torch.use_deterministic_algorithms: cuBLAS / torch.sum)
  2. ``gemm_lora_kernel``       dX = dY W + drop'(dh A)    one GEMM over N; the masked low-rank term (mask
                                regenerated from the seed) is the accumulator's initial value
  3. ``lora_grad_a_kernel``     dA = dhᵀ drop(x)           split over rows for parallelism, deterministic sum
  4. dW = dYᵀ x via cuBLAS (torch.mm), only when W requires grad (frozen in LoRA): nothing to fuse into it.

The two large GEMMs run as the fused Triton kernel or as cuBLAS on top of a Triton pass for the bias and low-rank
terms: ``gemm_dispatch`` times both per problem on first use (``FASTLORA_BASE_GEMM=auto``, the default) or
follows ``FASTLORA_BASE_GEMM=triton|cublas``. Configs are pruned by a resource model (shared memory, registers)
checked against offline sm_90 builds (benchmarks/offline_build.py); ``FASTLORA_AUTOTUNE=0`` (and the
interpreter) use one fixed config per M class instead of autotuning.

Conventions: explicit strides (non-contiguous inputs need no copy), masked loads/stores, int64 row offsets,
fp32 accumulation, any rank r >= 1 padded to a power of two >= 16 with masks, fp32 inputs with
``input_precision="ieee"`` unless torch allows TF32 for matmuls (``torch.backends.cuda.matmul.allow_tf32``).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import os
import threading
import warnings

import torch
import triton
import triton.language as tl

from .dropout import PHILOX_ROUNDS, dropout_threshold, philox_keep

__all__ = ["lora_forward", "lora_backward", "launch_counts", "base_gemm", "gemm_dispatch", "GemmDispatch",
           "FUSED_SHRINK_MAX_M"]

# The small-M path (shrink folded into the GEMM) is used up to this many rows, without dropout.
FUSED_SHRINK_MAX_M = 64
# Largest rank kept in registers by the fused shrink; above it the separate shrink kernel runs (sm_90 builds of
# the fused path at R_BLOCK = 64 spill ~1 KB at 16×64×128, offline_build.py).
FUSED_SHRINK_MAX_R = 32
# Rank chunk of the shrink / dY / dA kernels: larger ranks run as several programs over r.
R_CHUNK_MAX = 128
# Strides up to this bound keep every in-loop pointer step (BLOCK <= 256 times a stride) within int32; an
# operand with a larger stride is copied once to contiguous memory.
_MAX_STRIDE = 2**23

# Kernel launches by name: tests read it to prove the kernels ran rather than a fallback.
launch_counts: collections.Counter = collections.Counter()


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def low_rank_dot(l, u, acc, cdt, LO_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + l @ u for the rank-R terms (l fp32, u in the adapters' dtype): in the input dtype ``cdt``, or with fp32
    operands (TF32) where LO_FP32 says the input's fp16 could overflow (fp32 adapters on an fp16 base)."""
    if LO_FP32:
        return tl.dot(l, u.to(tl.float32), acc, input_precision="tf32")
    return tl.dot(l.to(cdt), u.to(cdt), acc, input_precision=DOT_PRECISION)


@triton.jit(do_not_specialize=["M", "seed", "drop_thr"])
def lora_shrink_kernel(
    x_ptr, a_ptr, h_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_hm, stride_hr,
    seed, drop_thr, inv_keep,
    M_BUCKET,  # autotune key only
    HAS_DROPOUT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr,
):
    """h[rows, r-chunk] = drop(x[rows, :]) @ A[r-chunk, :]ᵀ, fp32 accumulate. Grid (row tiles, rank chunks)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * R_BLOCK + tl.arange(0, R_BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m % M  # wrapped rows load valid memory; they are never stored
    cdt = x_ptr.dtype.element_ty
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + offs_k.to(tl.int64)[None, :] * stride_xk
    # Aᵀ tile (BLOCK_K, R_BLOCK)
    a_ptrs = a_ptr + offs_r.to(tl.int64)[None, :] * stride_ar + offs_k.to(tl.int64)[:, None] * stride_ak
    r_ok = offs_r[None, :] < R
    acc = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            a = tl.load(a_ptrs, mask=r_ok, other=0.0)
        else:
            k_ok = offs_k < K - k
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            a = tl.load(a_ptrs, mask=r_ok & k_ok[:, None], other=0.0)
        if HAS_DROPOUT:
            keep = philox_keep(seed, drop_thr, offs_m, k, BLOCK_M, BLOCK_K, N_ROUNDS)
            x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0).to(cdt)
        acc = _dot(x, a.to(cdt), acc, DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_r.to(tl.int64)[None, :] * stride_hr
    tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & r_ok)


@triton.jit(do_not_specialize=["M", "seed", "drop_thr"])
def gemm_lora_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, l_ptr, u_ptr, s_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_lm, stride_lr, stride_ur, stride_un, stride_sk, stride_sr,
    scaling, seed, drop_thr, inv_keep,
    M_BUCKET,  # autotune key only
    HAS_BIAS: tl.constexpr, LO_DROPOUT: tl.constexpr, FUSE_SHRINK: tl.constexpr, STORE_L: tl.constexpr,
    EVEN_K: tl.constexpr, LO_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_BLOCK: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr,
):
    """C (M, N) = a (M, K) @ b (K, N) [+ bias (N,)] + s·(L (M, R) @ U (R, N)) [⊙ keep / (1-p)].

    Forward: a = x, b = Wᵀ, L = h, U = Bᵀ. With FUSE_SHRINK, L = a @ S (S = Aᵀ, (K, R)) is accumulated in the
    same K loop and, with STORE_L, stored by the programs of the first column tile.
    Backward dX: a = dY, b = W, L = dh (already scaled, s = 1), U = A, LO_DROPOUT: the forward's mask on (M, N).
    Bias and the rank-R term are added into the one fp32 accumulator before C is stored, once. LO_FP32 (fp16
    inputs, fp32 adapters): the rank-R product takes fp32 operands (TF32: fp16's mantissa, fp32's range), since
    s·L or U rounded to fp16 overflow where PEFT's fp32 branch stays finite.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M swizzle: neighbouring programs share b tiles in L2
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    cdt = a_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_BLOCK)
    rows = (offs_m % M).to(tl.int64)  # wrapped: loads stay in bounds, the store is masked
    cols = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k.to(tl.int64)[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k.to(tl.int64)[:, None] * stride_bk + cols[None, :] * stride_bn

    # Without the fused shrink, the rank-R term (and the bias) is the accumulator's initial value: it does not
    # depend on the K loop, and starting from it keeps a single (BLOCK_M, BLOCK_N) fp32 tile live even when
    # the dX term is masked (added after the loop, it would need a second one).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if not FUSE_SHRINK:
        for r0 in range(0, R, R_BLOCK):
            rr = r0 + offs_r
            l = tl.load(l_ptr + rows[:, None] * stride_lm + rr.to(tl.int64)[None, :] * stride_lr,
                        mask=rr[None, :] < R, other=0.0)
            u = tl.load(u_ptr + rr.to(tl.int64)[:, None] * stride_ur + cols[None, :] * stride_un,
                        mask=rr[:, None] < R, other=0.0)
            acc = low_rank_dot(l.to(tl.float32) * scaling, u, acc, cdt, LO_FP32, DOT_PRECISION)
        if LO_DROPOUT:
            keep = philox_keep(seed, drop_thr, offs_m, pid_n * BLOCK_N, BLOCK_M, BLOCK_N, N_ROUNDS)
            acc = tl.where(keep, acc * inv_keep, 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]

    if FUSE_SHRINK:
        r_ok = offs_r[None, :] < R
        s_ptrs = s_ptr + offs_k.to(tl.int64)[:, None] * stride_sk + offs_r.to(tl.int64)[None, :] * stride_sr
        l_acc = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < K - k
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = _dot(a, b, acc, DOT_PRECISION)
        if FUSE_SHRINK:
            if EVEN_K:
                s = tl.load(s_ptrs, mask=r_ok, other=0.0)
            else:
                s = tl.load(s_ptrs, mask=r_ok & k_ok[:, None], other=0.0)
            l_acc = _dot(a, s.to(cdt), l_acc, DOT_PRECISION)
            s_ptrs += BLOCK_K * stride_sk
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Epilogue of the small-M path: the fused shrink's h, stored once, then s·h@Bᵀ
    if FUSE_SHRINK:
        if STORE_L:
            if pid_n == 0:
                l_ptrs = l_ptr + offs_m.to(tl.int64)[:, None] * stride_lm + offs_r.to(tl.int64)[None, :] * stride_lr
                tl.store(l_ptrs, l_acc.to(l_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & r_ok)
        u = tl.load(u_ptr + offs_r.to(tl.int64)[:, None] * stride_ur + cols[None, :] * stride_un,
                    mask=offs_r[:, None] < R, other=0.0)
        acc = low_rank_dot(l_acc * scaling, u, acc, cdt, LO_FP32, DOT_PRECISION)

    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=["M", "cols_per_split"])
def lora_grad_dy_kernel(
    dy_ptr, b_ptr, h_ptr, dh_ptr, db_ptr, dbias_ptr,
    M, N, R, cols_per_split,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_hm, stride_hr,
    stride_dhs, stride_dhm, stride_dhr, stride_dbn, stride_dbr,
    scaling,
    M_BUCKET,  # autotune key only
    NEED_DH: tl.constexpr, NEED_DB: tl.constexpr, NEED_DBIAS: tl.constexpr, LO_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One pass over dY (M, N), split over row tiles, column ranges and rank chunks (grid in that order).

    Program (i, j, c) reads dY[rows i, columns of split j] once and produces
      dh_part[j, rows i, chunk c] = s·dY[rows, cols] B[cols, chunk]   (M, R) partial per column split, stored;
      dB[cols, chunk] += s·dY[rows, cols]ᵀ h[rows, chunk]           fp32 atomics across row tiles;
      dbias[cols] += Σ_rows dY[rows, cols]                            fp32 atomics across row tiles.
    The column splits let small M fill the device; the launch helper sums dh_part over j (deterministically).
    LO_FP32 (fp16 dY, fp32 adapters): dB's product takes fp32 operands (TF32), s·h kept out of fp16's range."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    cdt = dy_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_start = pid_s * cols_per_split
    n_end = tl.minimum(n_start + cols_per_split, N)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_r = pid_r * R_BLOCK + tl.arange(0, R_BLOCK)
    m_ok = offs_m < M
    r_ok = offs_r < R
    dy_ptrs = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym + offs_n.to(tl.int64)[None, :] * stride_dyn
    b_ptrs = b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn + offs_r.to(tl.int64)[None, :] * stride_br
    db_ptrs = db_ptr + offs_n.to(tl.int64)[:, None] * stride_dbn + offs_r.to(tl.int64)[None, :] * stride_dbr
    if NEED_DB:
        h = tl.load(h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_r.to(tl.int64)[None, :] * stride_hr,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        h = h.to(tl.float32) * scaling
        if not LO_FP32:
            h = h.to(cdt)
    dh = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    for n in range(n_start, n_end, BLOCK_N):
        n_ok = offs_n < n_end - (n - n_start)
        # rows past M load as zeros: they must not add to dB / dbias
        dy = tl.load(dy_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if NEED_DH:
            b = tl.load(b_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            dh = _dot(dy, b.to(cdt), dh, DOT_PRECISION)
        if NEED_DB:
            if LO_FP32:
                part = tl.dot(tl.trans(dy).to(tl.float32), h, tl.zeros((BLOCK_N, R_BLOCK), dtype=tl.float32),
                              input_precision="tf32")
            else:
                part = _dot(tl.trans(dy), h, tl.zeros((BLOCK_N, R_BLOCK), dtype=tl.float32), DOT_PRECISION)
            tl.atomic_add(db_ptrs, part, mask=n_ok[:, None] & r_ok[None, :], sem="relaxed")
        if NEED_DBIAS:
            if pid_r == 0:
                tl.atomic_add(dbias_ptr + offs_n + (n - n_start), tl.sum(dy.to(tl.float32), axis=0), mask=n_ok,
                              sem="relaxed")
        dy_ptrs += BLOCK_N * stride_dyn
        b_ptrs += BLOCK_N * stride_bn
        db_ptrs += BLOCK_N * stride_dbn
    if NEED_DH:
        dh_ptrs = (dh_ptr + pid_s.to(tl.int64) * stride_dhs + offs_m.to(tl.int64)[:, None] * stride_dhm
                   + offs_r.to(tl.int64)[None, :] * stride_dhr)
        tl.store(dh_ptrs, dh * scaling, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["M", "seed", "drop_thr", "rows_per_split"])
def lora_grad_a_kernel(
    dh_ptr, x_ptr, out_ptr,
    M, K, R, rows_per_split,
    stride_dhm, stride_dhr, stride_xm, stride_xk, stride_os, stride_or, stride_ok,
    seed, drop_thr, inv_keep,
    M_BUCKET,  # autotune key only
    HAS_DROPOUT: tl.constexpr, LO_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr,
):
    """out[split, r-chunk, k-tile] = dh[rows of split]ᵀ @ drop(x)[rows of split, k-tile], fp32.
    Grid (column tiles, row splits, rank chunks); the splits are summed afterwards (deterministically).
    LO_FP32 (fp16 x, fp32 adapters): fp32 operands (TF32), dh kept out of fp16's range."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    cdt = x_ptr.dtype.element_ty
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * R_BLOCK + tl.arange(0, R_BLOCK)
    k_ok = offs_k < K
    r_ok = offs_r < R
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((R_BLOCK, BLOCK_K), dtype=tl.float32)
    for m in range(m_start, m_end, BLOCK_M):
        offs_m = m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        dh = tl.load(dh_ptr + offs_m.to(tl.int64)[:, None] * stride_dhm + offs_r.to(tl.int64)[None, :] * stride_dhr,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k.to(tl.int64)[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = philox_keep(seed, drop_thr, offs_m, pid_k * BLOCK_K, BLOCK_M, BLOCK_K, N_ROUNDS)
            x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0)
        if LO_FP32:
            acc = tl.dot(tl.trans(dh.to(tl.float32)), x.to(tl.float32), acc, input_precision="tf32")
        else:
            acc = _dot(tl.trans(dh.to(cdt)), x.to(cdt), acc, DOT_PRECISION)
    out_ptrs = (out_ptr + pid_s.to(tl.int64) * stride_os + offs_r.to(tl.int64)[:, None] * stride_or
                + offs_k.to(tl.int64)[None, :] * stride_ok)
    tl.store(out_ptrs, acc, mask=r_ok[:, None] & k_ok[None, :])


# ---------------------------------------------------------------------------------------------------------
# Autotuning: short config lists, pruned by the problem's M; key = bucketed M, N, K, R and the dtypes
# ---------------------------------------------------------------------------------------------------------

def _autotune_enabled() -> bool:
    """Off under the interpreter and with FASTLORA_AUTOTUNE=0: one fixed config per M class then."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return not interpreted and os.environ.get("FASTLORA_AUTOTUNE", "1") not in ("", "0")


def _cfg(num_warps, num_stages, small_m=False, **kwargs):
    """A config; ``small_m`` tags the ones meant for M <= FUSED_SHRINK_MAX_M (and only those run there)."""
    cfg = triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)
    cfg.fastlora_small_m = small_m
    return cfg


_GEMM_CONFIGS = [
    # large M: tiles from Triton's matmul tutorial that do well on Ampere / Hopper
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 4, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),  # what fits odd K and fp32 (FMA / TF32) operands
    # small M (decode / inference): bound by reading W, so narrow N tiles give enough programs
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, small_m=True),
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, small_m=True),  # 16×32×256: dX spills (sm_90)
    _cfg(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, small_m=True),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, small_m=True),
    _cfg(4, 3, BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, small_m=True),
    _cfg(8, 3, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, small_m=True),  # fp32 and odd K at small M
]
# Fixed configs, used without autotuning: tiny tiles for the interpreter (its cost grows with the tile), and one
# generally good tile for each M class on a GPU with FASTLORA_AUTOTUNE=0.
_GEMM_FIXED = {
    "interpret": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=2),
    "small": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4),
    "large": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
}

# The shrink is a memory-bound pass over x: short row tiles give enough programs to fill the device.
_SHRINK_CONFIGS = [
    # 8 warps: sm_90 builds with 4 warps spill at R = 128 and at odd K even at 80-128 registers (offline_build.py)
    _cfg(8, 4, BLOCK_M=16, BLOCK_K=256),
    _cfg(8, 3, BLOCK_M=16, BLOCK_K=64),  # large ranks with fp32 adapters at M <= 16: a short (BK, R) tile
    _cfg(8, 4, BLOCK_M=32, BLOCK_K=128),
    _cfg(8, 3, BLOCK_M=32, BLOCK_K=64),
    _cfg(8, 4, BLOCK_M=64, BLOCK_K=64),
    _cfg(8, 3, BLOCK_M=64, BLOCK_K=128),
]
_SHRINK_FIXED = {  # fit every rank chunk (R_BLOCK <= 128) and adapter dtype (offline_build.py checks them)
    "interpret": dict(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=2),
    "small": dict(BLOCK_M=16, BLOCK_K=64, num_warps=8, num_stages=3),
    "large": dict(BLOCK_M=32, BLOCK_K=64, num_warps=8, num_stages=3),
}

# dY pass: taller row tiles mean fewer fp32 atomics into dB (M/BLOCK_M · N · r of them), shorter ones more
# programs for the memory-bound read of dY; the autotuner measures the trade.
_DY_CONFIGS = [
    _cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
    _cfg(8, 3, BLOCK_M=64, BLOCK_N=64),
    _cfg(4, 3, BLOCK_M=64, BLOCK_N=128),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=64),  # 128×128 (8 warps) spilled at every rank in sm_90 builds: dropped
    _cfg(8, 3, BLOCK_M=32, BLOCK_N=64),  # fp32 and odd N at large ranks
    _cfg(8, 3, BLOCK_M=16, BLOCK_N=32),  # exact fp32 (FMA dots)
    _cfg(8, 4, BLOCK_M=32, BLOCK_N=128, small_m=True),  # 4 warps spilled at R = 64
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=128, small_m=True),
    _cfg(8, 4, BLOCK_M=16, BLOCK_N=64, small_m=True),
]
_DY_FIXED = {
    "interpret": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2),
    "small": dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=4),
    "large": dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),
}

_GRAD_A_CONFIGS = [  # 8 warps: 4-warp builds spilled with dropout even at 80 registers (sm_90, offline_build.py)
    _cfg(8, 3, BLOCK_M=64, BLOCK_K=64),
    _cfg(8, 3, BLOCK_M=128, BLOCK_K=64),
    _cfg(8, 4, BLOCK_M=64, BLOCK_K=32),
    _cfg(8, 3, BLOCK_M=128, BLOCK_K=128),
    _cfg(8, 3, BLOCK_M=32, BLOCK_K=32),  # exact fp32 (FMA dots)
    _cfg(8, 3, BLOCK_M=16, BLOCK_K=32),
]
_GRAD_A_FIXED = {
    "interpret": dict(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=2),
    "small": dict(BLOCK_M=64, BLOCK_K=32, num_warps=8, num_stages=3),
    "large": dict(BLOCK_M=64, BLOCK_K=32, num_warps=8, num_stages=3),
}


# ---------------------------------------------------------------------------------------------------------
# Resource model: what a config needs in shared memory and registers, from the tiles it holds. The pruning
# keeps what fits and the fallback (when nothing fits) is the config that overflows least by the same model;
# benchmarks/offline_build.py builds every config kept over the declared grid for sm_90 and checks the model
# against the cubins (shared memory, registers, spills).
# ---------------------------------------------------------------------------------------------------------

SMEM_LIMIT = 227 * 1024  # H100 / H200 (sm_90): the opt-in maximum of shared memory per block
# Planned pipeline buffers may use this much; the rest is the compiler's: layout-conversion scratch, barriers
_SMEM_BUDGET = SMEM_LIMIT - 16 * 1024
# fp32 values per thread that a config's live tiles may take: sm_90 allows 255 registers per thread and
# addresses, masks and loop state take the rest (calibrated on offline builds: above it, ptxas spills)
_REG_BUDGET = 160
# What a config that offline builds showed to spill counts as: far over the budget, so that a fallback (the least
# overflowing config) never picks it
_MEASURED_SPILL = 2 * _REG_BUDGET

_DEFAULT_ESIZE = {"a": 2, "b": 2, "s": 2, "u": 2, "l": 4}


def _esize(args, name, default):
    t = args.get(name)
    return t.element_size() if hasattr(t, "element_size") else default


def _threads(c) -> int:
    return 32 * c.num_warps


def _regs_per_thread(elements: int, c) -> int:
    return elements // _threads(c)


def _unaligned(args, loop_dim: str) -> bool:
    """The loop dimension or a stride is not a multiple of 16: no 16-byte vector loads (masked scalar loads)."""
    return any(isinstance(v, int) and not isinstance(v, bool) and v % 16 != 0
               for k, v in args.items() if (k == loop_dim or (k.startswith("stride_") and v != 1)))


def _operands_in_registers(args, loop_dim: str, esize: int, storage_esize: int | None = None) -> float:
    """Weight (fp32 registers per operand element) of operand tiles that pass through registers, for a dot in a
    dtype of ``esize`` bytes on an operand stored in ``storage_esize`` bytes: exact fp32 products (IEEE: FMA
    dots, not tensor cores; 128×128 tiles spilled up to 48 KB) and TF32 (operands converted in registers;
    16×32×128 spilled on 4 warps at weight 3), and unaligned problems (odd K = 1000, N = 1537 in the sampled
    sm_90 builds: 256×128, 32×128×128 fused and the R = 128 shrink spilled at 255 registers). 0 where the
    tiles stream through shared memory."""
    if esize == 4 and loop_dim in args:
        return 6.0 if args.get("DOT_PRECISION", "ieee") == "ieee" else 4.0
    return 1.5 * (storage_esize or esize) / 2 if _unaligned(args, loop_dim) else 0.0


def _fma_32_row_spill(args, esize: int, bm: int) -> bool:
    """Measured (sm_90, triton 3.9 and 3.6): fp32 dots (FMA, and TF32 with dropout) on 32-row tiles spill 4-16 B
    at 64-80 registers in the shrink and dY kernels (ptxas's choice, not a count the model sees); 16- and
    64-row tiles do not."""
    return bm == 32 and esize == 4


def _pipeline_smem(c, tile_bytes: int, wgmma: bool = False) -> int:
    """Shared memory of a K loop's software pipeline (measured on sm_90 builds, triton 3.6 and 3.9): num_stages
    buffers of the loop's operand tiles where the dot runs on Hopper's wgmma (BLOCK_M >= 64, operands read from
    shared memory), num_stages - 1 where it runs on mma (operands in registers)."""
    return (c.num_stages if wgmma else max(1, c.num_stages - 1)) * tile_bytes


def gemm_resources(c, args):
    """(shared bytes, live fp32 values per thread) of ``gemm_lora_kernel`` under config ``c``.

    Shared memory matches sm_90 builds to the byte at the calibration points of
    tests/test_kernels_compile.py; the register count is an estimate whose budget was calibrated on them."""
    bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    rb = args.get("R_BLOCK", 16)
    ea = _esize(args, "a_ptr", 2)
    fused = bool(args.get("FUSE_SHRINK", False))
    # per stage: a (BM, BK) and b (BK, BN) in the input dtype; the fused shrink adds Aᵀ (BK, R) in the adapters'
    tiles = (bm * bk + bk * bn) * ea
    if fused:
        tiles += bk * rb * _esize(args, "s_ptr", ea)
    smem = _pipeline_smem(c, tiles, wgmma=bm >= 64)
    acc = bm * bn
    if fused:  # h's accumulator lives through the loop; the epilogue adds Bᵀ (R, BN)
        live = acc + bm * rb + rb * bn
    else:  # the prologue holds L (BM, R), U (R, BN) and, with the dX mask, Philox words for the (BM, BN) tile
        live = acc + bm * rb + rb * bn + (acc if args.get("LO_DROPOUT") else 0)
    live += _operands_in_registers(args, "K", ea) * (bm * bk + bk * bn)
    if args.get("LO_FP32") and bm >= 128 and c.num_stages >= 4:
        # measured (sm_90, triton 3.9, fp16 with fp32 adapters): the fp32 (TF32) rank-r prologue spills 8-52 B at
        # 255 registers on 128×128×64 (4 warps) and 256×128×64 (8 warps) with 4 stages; 3 stages do not
        live = _MEASURED_SPILL * _threads(c)
    if fused:
        live += _operands_in_registers(args, "K", ea, _esize(args, "s_ptr", ea)) * bk * rb
        if c.num_warps < 8 and _unaligned(args, "K"):
            # measured: the fused path at odd K spills 4-192 B on 4 warps (16×32×128 at 168 registers)
            live = _MEASURED_SPILL * _threads(c)
    return smem, _regs_per_thread(live, c)


def shrink_resources(c, args):
    bm, bk, rb = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], args.get("R_BLOCK", 16)
    ex, ea = _esize(args, "x_ptr", 2), _esize(args, "a_ptr", 2)
    drop = bool(args.get("HAS_DROPOUT"))
    smem = max(1, c.num_stages - 1) * (bm * bk * ex + bk * rb * ea)
    if bm >= 64:  # wgmma reads both operands, converted (and masked) in registers, from one more buffer
        smem += (bm * bk + bk * rb) * ex
    elif drop:  # the masked x tile goes back through shared memory
        smem += bm * bk * ex
    # acc (BM, R); x (BM, BK) converted (and masked) in registers; Aᵀ (BK, R) converted from the adapters' dtype
    live = bm * rb + bm * bk * (2 if drop else 1) + (bk * rb if ea != ex else 0)
    # the dot runs in x's dtype; the adapters are converted to it (counted above), loaded in their own
    live += _operands_in_registers(args, "K", ex) * bm * bk + _operands_in_registers(args, "K", ex, ea) * bk * rb
    if (rb >= 128 and bm < 64 and bk >= 64 and c.num_warps < 8) or _fma_32_row_spill(args, ex, bm):
        # measured (sm_90, triton 3.9): 16×64 and 32×64 row tiles at R = 128 spill 8-24 B with 4 warps at 80-168
        # registers, where 8 warps do not; ptxas's choice, not a count this model can see
        live = _MEASURED_SPILL * _threads(c)
    return smem, _regs_per_thread(live, c)


def dy_resources(c, args):
    bm, bn, rb = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], args.get("R_BLOCK", 16)
    edy, eb = _esize(args, "dy_ptr", 2), _esize(args, "b_ptr", 2)
    # pipeline of dY (BM, BN) and B (BN, R) tiles, and the fp32 dB part (BN, R) re-laid out for its atomics
    smem = max(1, c.num_stages - 1) * (bm * bn * edy + bn * rb * eb) + bn * rb * 4
    # dh (BM, R) fp32 accumulator and h (BM, R) through the loop; dY (BM, BN) and, for dB, its transpose
    # (128×128 at R = 64 spilled at 255 registers without it), and the dB part twice: once from the dot, once in
    # the atomics' layout (32×128 at R = 128 spilled)
    need_db = args.get("NEED_DB", True)
    live = (2 * bm * rb + (2 * bn * rb if need_db else 0) + bm * bn * (2 if need_db else 1)
            + (bn * rb if eb != edy else 0))
    live += _operands_in_registers(args, "N", edy) * bm * bn + _operands_in_registers(args, "N", edy, eb) * bn * rb
    if _fma_32_row_spill(args, edy, bm):
        live = _MEASURED_SPILL * _threads(c)
    return smem, _regs_per_thread(live, c)


def grad_a_resources(c, args):
    bm, bk, rb = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], args.get("R_BLOCK", 16)
    ex = _esize(args, "x_ptr", 2)
    lo32 = bool(args.get("LO_FP32"))
    # pipeline of dh (BM, R) fp32 and x (BM, BK) tiles, and the (masked) x operand of the dot; with fp32 operands
    # (LO_FP32: TF32 dots) the dot runs on wgmma from 64 rows, with num_stages buffers (sm_90 builds: 112-256 KB,
    # to the KB at R = 64 and 128)
    smem = _pipeline_smem(c, bm * rb * 4 + bm * bk * ex, wgmma=lo32 and bm >= 64) + bm * bk * ex
    live = rb * bk + bm * rb + bm * bk * (2 if args.get("HAS_DROPOUT") else 1)
    live += _operands_in_registers(args, "K", ex) * (bm * bk + bm * rb)
    if lo32 and args.get("HAS_DROPOUT") and bm == 64 and bk == 32:
        live = _MEASURED_SPILL * _threads(c)  # measured: 8 B spilled at 80 registers (sm_90, triton 3.9)
    return smem, _regs_per_thread(live, c)


def _overflow(resources) -> float:
    smem, regs = resources
    return max(smem / _SMEM_BUDGET, regs / _REG_BUDGET)


def _fits(resources) -> bool:
    return _overflow(resources) <= 1.0


def _fallback(configs, model, args):
    """When no config fits: the one that overflows least by the resource model (``model``), with its pipeline
    shortened until it fits where that is enough. Never chosen by a single field of the config."""
    best = min(configs, key=lambda c: (_overflow(model(c, args)), -c.num_warps))
    for stages in range(best.num_stages - 1, 1, -1):
        if _fits(model(best, args)):
            break
        best = _cfg(best.num_warps, stages, small_m=best.fastlora_small_m, **best.kwargs)
    return [best]


def _fits_m(c, m: int) -> bool:
    """Row tiles much taller than the (bucketed) M waste the tile; small M keeps only its own short-tile configs
    (tagged small_m) and large M only the others."""
    return c.kwargs["BLOCK_M"] <= max(16, m) and c.fastlora_small_m == (m <= FUSED_SHRINK_MAX_M)


def _autotune_top_k() -> int:
    """``FASTLORA_AUTOTUNE_TOP_K=k`` (> 0) benchmarks only the first k configs that fit (the lists are in order of
    expectation): a bounded first run, e.g. in gpu_check.sh. 0 (the default): all of them."""
    try:
        return max(0, int(os.environ.get("FASTLORA_AUTOTUNE_TOP_K", "0")))
    except ValueError:
        raise ValueError("FASTLORA_AUTOTUNE_TOP_K must be an integer") from None


def _prune(configs, args, model, fits_m):
    keep = [c for c in configs if fits_m(c) and _fits(model(c, args))]
    if not keep:  # nothing fits M and the resources: the least overflowing of those that fit M, else of all
        keep = _fallback([c for c in configs if fits_m(c)] or configs, model, args)
    top = _autotune_top_k()
    return keep[:top] if top else keep


def _prune_gemm(configs, named_args, **kwargs):
    """Keep configs that fit M, shared memory and the register file (``gemm_resources``)."""
    args = {**named_args, **kwargs}
    m = args["M_BUCKET"]
    keep = _prune(configs, args, gemm_resources, lambda c: _fits_m(c, m))
    # K = 0 (the cuBLAS composition): the kernel only writes the low-rank term, nothing worth tuning
    return keep[-1:] if args["K"] == 0 else keep


def _rank_model(args):
    if "dy_ptr" in args:
        return dy_resources
    if "dh_ptr" in args:
        return grad_a_resources
    return shrink_resources


def _prune_rank(configs, named_args, **kwargs):
    """Shrink / dY / dA kernels: keep configs that fit M and the resource model of their kernel."""
    args = {**named_args, **kwargs}
    m = args["M_BUCKET"]
    model = _rank_model(args) if any(k.endswith("_ptr") for k in args) else (
        dy_resources if "BLOCK_N" in configs[0].kwargs else shrink_resources)

    def fits_m(c):
        return c.kwargs["BLOCK_M"] <= max(16, m) if "BLOCK_K" in c.kwargs else _fits_m(c, m)

    return _prune(configs, args, model, fits_m)


def _even_k(args):
    return args["K"] % args["BLOCK_K"] == 0


_KEY = ["M_BUCKET", "N", "K", "R", "R_BLOCK", "HAS_BIAS", "LO_DROPOUT", "FUSE_SHRINK", "STORE_L"]

# The forward (b = Wᵀ) and the dX GEMM (b = W) read their B operand in opposite layouts: two autotuners, so
# they never share a tuned config even when K = N and their other keys agree.
_gemm_fwd_tuned = triton.autotune(_GEMM_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_gemm})(
    triton.heuristics({"EVEN_K": _even_k})(gemm_lora_kernel))
_gemm_dx_tuned = triton.autotune(_GEMM_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_gemm})(
    triton.heuristics({"EVEN_K": _even_k})(gemm_lora_kernel))
_gemm_fixed = triton.heuristics({"EVEN_K": _even_k})(gemm_lora_kernel)
_shrink_tuned = triton.autotune(_SHRINK_CONFIGS, key=["M_BUCKET", "K", "R", "R_BLOCK", "HAS_DROPOUT"],
                                prune_configs_by={"early_config_prune": _prune_rank})(
    triton.heuristics({"EVEN_K": _even_k})(lora_shrink_kernel))
_shrink_fixed = triton.heuristics({"EVEN_K": _even_k})(lora_shrink_kernel)
_dy_tuned = triton.autotune(_DY_CONFIGS, key=["M_BUCKET", "N", "R", "R_BLOCK", "NEED_DH", "NEED_DB", "NEED_DBIAS"],
                            prune_configs_by={"early_config_prune": _prune_rank},
                            reset_to_zero=["db_ptr", "dbias_ptr"])(lora_grad_dy_kernel)
_grad_a_tuned = triton.autotune(_GRAD_A_CONFIGS, key=["M_BUCKET", "K", "R", "R_BLOCK", "HAS_DROPOUT"],
                                prune_configs_by={"early_config_prune": _prune_rank})(lora_grad_a_kernel)


BASE_GEMM_MODES = ("auto", "triton", "cublas")


def base_gemm() -> str:
    """Who runs the two large GEMMs (x@Wᵀ forward, dY@W backward), from ``FASTLORA_BASE_GEMM``:

    ``triton``: the fused kernel, bias and low-rank terms in its accumulator (for M <= 64 without dropout, the
    shrink too: one launch); ``cublas``: Triton kernels write h and the bias + low-rank term, then torch.addmm_
    adds the GEMM on top, reading that term as cuBLAS's C operand (one extra read and write of (M, N));
    ``auto`` (the default): per problem, the faster of the two as measured on the first call (``gemm_dispatch``).
    """
    mode = os.environ.get("FASTLORA_BASE_GEMM", "auto").lower()
    if mode not in BASE_GEMM_MODES:
        raise ValueError(f"FASTLORA_BASE_GEMM must be one of {BASE_GEMM_MODES}, got {mode!r}")
    return mode


def _cuda_timer(name, fn):
    """Median milliseconds of ``fn`` on the current CUDA stream (CUDA events, L2 flushed between runs)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=40, return_mode="median")


class GemmDispatch:
    """The choice between compositions of a large GEMM ("triton" fused, "cublas"), made per problem key by
    timing each candidate once, as autotuning does, and cached for the process.

    ``choose(key, candidates, device)`` returns the name to run: the ``FASTLORA_BASE_GEMM`` override when it is
    not ``auto``; else the cached choice; else, where timing is possible (CUDA outside graph capture, or any
    device with an injected ``timer``), the fastest candidate by ``timer(name, fn)``; else "triton" (the
    interpreter: the kernels are what is under test). ``fn`` runs the full composition, so timing it also
    writes the outputs.
    """

    def __init__(self, timer=None):
        self.timer = timer
        self.choices: dict = {}
        self.timings: dict = {}

    def _can_time(self, device) -> bool:
        if self.timer is not None:
            return True
        return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()

    def choose(self, key, candidates, device) -> str:
        mode = base_gemm()
        if mode != "auto":
            return mode
        if key in self.choices:
            return self.choices[key]
        if not self._can_time(device):
            return "triton"
        timer = self.timer or _cuda_timer
        times, errors = {}, {}
        for name, fn in candidates.items():
            try:
                times[name] = float(timer(name, fn))
            except Exception as exc:  # noqa: BLE001 - a candidate that cannot run loses; all failing: raise
                times[name], errors[name] = float("inf"), exc
        if len(errors) == len(candidates):
            raise next(iter(errors.values()))
        for name, exc in errors.items():
            warnings.warn(f"fastlora: the {name!r} composition failed on {key} and is not used: {exc!r}")
        choice = min(times, key=times.get)
        self.choices[key], self.timings[key] = choice, times
        return choice

    def report(self):
        """[(key, choice, {name: ms})] of every timed problem, for gpu_check.sh."""
        return [(k, self.choices[k], self.timings[k]) for k in self.choices]

    def clear(self):
        self.choices.clear()
        self.timings.clear()


gemm_dispatch = GemmDispatch()


def _dispatch_key(op, x, weight, lora_A, r, bias, p, mb):
    """Everything that changes which composition is faster: the GEMM (forward or dX), the bucketed M, N, K, the
    rank, the dtypes, bias and dropout, the device."""
    N, K = weight.shape
    return (op, mb, N, K, r, x.dtype, lora_A.dtype, bias is not None, p > 0.0, str(x.device))


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Triton's Autotuner keeps the arguments of the call it runs in ``self.nargs`` (its reset_to_zero hook zeroes the
# tensors named there, and it clears the field when done): two threads making their first call of a key at once
# would zero each other's dB accumulators or crash on the cleared field. Autotuned launches take turns.
_AUTOTUNE_LOCK = threading.Lock()


def _launch(name, tuned, fixed_fn, fixed_cfgs, grid, m_bucket, *args, **kwargs):
    """Launch through the autotuner, or with the fixed config for the interpreter / this M class."""
    launch_counts[name] += 1
    if _autotune_enabled():
        with _AUTOTUNE_LOCK:
            tuned[grid](*args, **kwargs)
    else:
        meta = fixed_config(tuned, fixed_cfgs, m_bucket, args, kwargs)
        g = grid(meta) if callable(grid) else grid
        fixed_fn[g](*args, **kwargs, **meta)


def fixed_config(tuned, fixed_cfgs, m_bucket, args, kwargs) -> dict:
    """The config used without autotuning: the interpreter's tiny one, else this M class's, passed through the
    same prune hook (resource model) as the tuned ones: where it does not fit this problem (fp32 adapters at a
    large rank, say), the hook's fallback replaces it."""
    if _interpreted():
        return dict(fixed_cfgs["interpret"])
    small = m_bucket <= FUSED_SHRINK_MAX_M
    meta = dict(fixed_cfgs["small" if small else "large"])
    warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
    cfg = _cfg(warps, stages, small_m=small, **meta)
    nargs = dict(zip(tuned.arg_names, args))
    kept = tuned.early_config_prune([cfg], nargs, **kwargs)
    if kept[0] is not cfg:  # it does not fit as is: the first of the tuned list that the pruning keeps
        kept = tuned.early_config_prune(tuned.configs, nargs, **kwargs)
    cfg = kept[0]
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ---------------------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------------------

def _m_bucket(m: int) -> int:
    """Next power of two of M (at least 16): a new sequence length in the same bucket does not retune."""
    return max(16, triton.next_power_of_2(m))


def _r_block(r: int, cap: int = R_CHUNK_MAX) -> int:
    """Rank padded to what tl.dot needs: a power of two >= 16, at most ``cap`` (larger r runs in chunks)."""
    return min(max(16, triton.next_power_of_2(r)), cap)


def _rank_chunk(r: int, dtype: torch.dtype) -> int:
    """Rank chunk of the shrink / dY / dA kernels: up to 128, 64 for fp32 inputs (fp32 operand tiles pass through
    registers: R = 128 spilled in sm_90 builds)."""
    return _r_block(r, 64 if dtype == torch.float32 else R_CHUNK_MAX)


def _epilogue_r_block(r: int) -> int:
    """Rank chunk of the GEMM's low-rank prologue: 16, the smallest tl.dot step, so the (BM, 16) and (16, BN)
    operand tiles beside the (BM, BN) accumulator cost 16·(BM + BN) / threads registers: the widest tiles
    (128×256, 8 warps) fit without spilling. A larger rank loops over chunks: the same MMA work."""
    return 16


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch: TF32 only where torch allows it for matmuls, exact IEEE products otherwise."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and _autotune_enabled():
        return "tf32"
    return "ieee"


def low_rank_fp32(dtype: torch.dtype, adapter_dtype: torch.dtype) -> bool:
    """The rank-r products run with fp32 operands: fp16 inputs with fp32 adapters (PEFT's default on an fp16 base),
    whose low-rank terms PEFT computes in fp32 and which would overflow in fp16 (s·h, dh above 65504). bf16 shares
    fp32's range: its rank-r products keep bf16 operands."""
    return dtype == torch.float16 and adapter_dtype == torch.float32


def _kernel_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its strides are safe for the kernels' pointer steps, else one contiguous copy."""
    if t.dim() == 2 and all(abs(s) < _MAX_STRIDE and s >= 0 for s in t.stride()):
        return t
    return t.contiguous()


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # the interpreter: a few splits, so the split path is exercised on CPU too


_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def _check(x, weight, lora_A, lora_B, bias):
    if x.dim() != 2 or weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(
            f"fastlora.kernels: x, weight, lora_A, lora_B must be 2-D, got {tuple(x.shape)}, {tuple(weight.shape)}, "
            f"{tuple(lora_A.shape)}, {tuple(lora_B.shape)}"
        )
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.dtype not in _SUPPORTED:
            raise TypeError(f"fastlora.kernels: {name} has dtype {t.dtype}; the kernels support fp16, bf16, fp32")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"fastlora.kernels: weight/bias dtype must match x's {x.dtype}")


def _dropout_args(p: float):
    if p > 0.0:
        return dropout_threshold(p), 1.0 / (1.0 - p)
    return 0, 1.0


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one (cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def lora_forward(x, weight, lora_A, lora_B, bias, scaling: float, dropout_p: float, seed: int, save_h: bool = True):
    """y = x@Wᵀ + b + s·h@Bᵀ with h = drop(x)@Aᵀ (fp32 accumulate). Returns (y, h), h None unless ``save_h``.

    y has x's dtype; h is fp32 for half inputs (``reference.h_dtype``)."""
    _check(x, weight, lora_A, lora_B, bias)
    with on_device(x.device):
        return _lora_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, save_h)


def _lora_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, save_h):
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    h_dt = torch.promote_types(x.dtype, torch.float32)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, (torch.empty((0, r), dtype=h_dt, device=x.device) if save_h else None)
    x, weight, lora_A, lora_B = (_kernel_view(t) for t in (x, weight, lora_A, lora_B))
    if bias is not None:
        bias = bias.contiguous()
    p = float(dropout_p)
    mb = _m_bucket(M)
    fusable = M <= FUSED_SHRINK_MAX_M and p == 0.0 and r <= FUSED_SHRINK_MAX_R and N > 0
    h = torch.empty((M, r), dtype=h_dt, device=x.device) if (save_h or not fusable) else None
    args = (x, weight, lora_A, lora_B, bias, y, h, scaling, p, seed, mb)
    if N == 0:
        if h is not None:
            _shrink(x, lora_A, h, p, seed, mb)
        return y, h
    candidates = {
        "triton": lambda: (_forward_fused_small_m if fusable else _forward_triton)(*args),
        "cublas": lambda: _forward_cublas(*args),
    }
    choice = gemm_dispatch.choose(_dispatch_key("fwd", x, weight, lora_A, r, bias, p, mb), candidates, x.device)
    candidates[choice]()
    return y, (h if save_h else None)


def _shrink(x, lora_A, h, p, seed, mb):
    """h (M, r) = drop(x) @ Aᵀ, fp32 accumulate."""
    M, K = x.shape
    r = lora_A.shape[0]
    thr, inv_keep = _dropout_args(p)
    _launch(
        "lora_shrink", _shrink_tuned, _shrink_fixed, _SHRINK_FIXED,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(r, _rank_chunk(r, x.dtype))), mb,
        x, lora_A, h, M, K, r,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), h.stride(0), h.stride(1),
        int(seed), thr, inv_keep, mb,
        HAS_DROPOUT=p > 0.0, R_BLOCK=_rank_chunk(r, x.dtype), DOT_PRECISION=_dot_precision(x.dtype),
        N_ROUNDS=PHILOX_ROUNDS,
    )


def _forward_gemm(x, weight, lora_A, lora_B, bias, y, h_arg, scaling, mb, k_loop, fuse, store_h):
    """y = [x @ Wᵀ] + bias + s·h @ Bᵀ in one Triton GEMM; ``k_loop`` False leaves x @ Wᵀ out (cuBLAS adds it);
    ``fuse``: h = x @ Aᵀ is accumulated in the same K loop (and stored when ``store_h``)."""
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    rb = _r_block(r, FUSED_SHRINK_MAX_R) if fuse else _epilogue_r_block(r)
    _launch(
        "gemm_lora", _gemm_fwd_tuned, _gemm_fixed, _GEMM_FIXED,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),), mb,
        # a = x (M, K); b = Wᵀ (K, N); L = h (M, r); U = Bᵀ (r, N); S = Aᵀ (K, r)
        x, weight, y, bias if bias is not None else y, h_arg, lora_B, lora_A,
        M, N, K if k_loop else 0, r,
        x.stride(0), x.stride(1), weight.stride(1), weight.stride(0), y.stride(0), y.stride(1),
        h_arg.stride(0), h_arg.stride(1), lora_B.stride(1), lora_B.stride(0), lora_A.stride(1), lora_A.stride(0),
        float(scaling), 0, 0, 1.0, mb,
        HAS_BIAS=bias is not None, LO_DROPOUT=False, FUSE_SHRINK=fuse, STORE_L=store_h,
        LO_FP32=low_rank_fp32(x.dtype, lora_B.dtype),
        R_BLOCK=rb, DOT_PRECISION=_dot_precision(x.dtype), N_ROUNDS=PHILOX_ROUNDS,
    )


def _forward_fused_small_m(x, weight, lora_A, lora_B, bias, y, h, scaling, p, seed, mb):
    """M <= 64, no dropout: one launch; the shrink rides in the GEMM's K loop."""
    _forward_gemm(x, weight, lora_A, lora_B, bias, y, h if h is not None else y, scaling, mb, True, True,
                  h is not None)


def _forward_triton(x, weight, lora_A, lora_B, bias, y, h, scaling, p, seed, mb):
    """The shrink, then the fused GEMM whose accumulator starts at bias + s·h @ Bᵀ."""
    _shrink(x, lora_A, h, p, seed, mb)
    _forward_gemm(x, weight, lora_A, lora_B, bias, y, h, scaling, mb, True, False, False)


def _forward_cublas(x, weight, lora_A, lora_B, bias, y, h, scaling, p, seed, mb):
    """The shrink, a Triton pass writing bias + s·h @ Bᵀ, then cuBLAS: y += x @ Wᵀ (beta = 1)."""
    if h is None:  # inference on the small-M path: h is not returned, but this composition needs it
        h = torch.empty((x.shape[0], lora_A.shape[0]), dtype=torch.promote_types(x.dtype, torch.float32),
                        device=x.device)
    _shrink(x, lora_A, h, p, seed, mb)
    _forward_gemm(x, weight, lora_A, lora_B, bias, y, h, scaling, mb, False, False, False)
    y.addmm_(x, weight.t())


# Column ranges of the dY pass start on multiples of this (the largest BLOCK_N of its configs on a GPU): no
# program starts in the middle of another's tile. Correctness does not depend on it (the last tile is masked).
_DY_COL_ALIGN = 128


def _dy_splits(M, N, r, device, dtype=torch.bfloat16):
    """Column splits of the dY pass: enough programs for ~2 waves of the device when row tiles are too few
    (decode, M = 2048 with 64-row tiles on 132 SMs), one split when the row tiles alone fill it."""
    sms = _sm_count(device)
    programs = triton.cdiv(M, 16 if M <= FUSED_SHRINK_MAX_M else 64) * triton.cdiv(r, _rank_chunk(r, dtype))
    align = 8 if _interpreted() else _DY_COL_ALIGN
    if programs >= sms or N <= align:
        return 1, N
    splits = min(triton.cdiv(2 * sms, programs), triton.cdiv(N, align))
    cols = triton.cdiv(triton.cdiv(N, splits), align) * align
    return triton.cdiv(N, cols), cols


def _grad_dy(grad_y, lora_B, h, scaling, need_dh, need_db, need_dbias, prec, mb):
    """dh (M, r) fp32, dB (N, r) fp32 and dbias (N,) fp32 from one pass over dY (those asked for)."""
    M, N = grad_y.shape
    r = lora_B.shape[1]
    dev = grad_y.device
    rb = _rank_chunk(r, grad_y.dtype)
    splits, cols = _dy_splits(M, N, r, dev, grad_y.dtype)
    # dh: (splits, M, r) partial sums, one per column range, added below; written in place when not split
    dh_part = torch.empty((splits, M, r), dtype=torch.float32, device=dev) if need_dh else None
    db = torch.zeros((N, r), dtype=torch.float32, device=dev) if need_db else None  # atomics accumulate into it
    dbias = torch.zeros((N,), dtype=torch.float32, device=dev) if need_dbias else None
    # A dedicated dummy for absent tensors: the autotuner zeroes db_ptr / dbias_ptr before each timing run, so
    # they must never alias a real tensor (grad_y, say).
    absent = any(t is None for t in (dh_part, db, dbias, h))
    dummy = torch.zeros((1, 1, 1), dtype=torch.float32, device=dev) if absent else None  # only when needed
    dh_a = dh_part if dh_part is not None else dummy
    db_a, dbias_a, h_a = (t if t is not None else dummy[0] for t in (db, dbias, h))
    _launch(
        "lora_grad_dy", _dy_tuned, lora_grad_dy_kernel, _DY_FIXED,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), splits, triton.cdiv(r, rb)), mb,
        grad_y, lora_B, h_a, dh_a, db_a, dbias_a,
        M, N, r, cols,
        grad_y.stride(0), grad_y.stride(1), lora_B.stride(0), lora_B.stride(1),
        h_a.stride(0), h_a.stride(1), dh_a.stride(0), dh_a.stride(1), dh_a.stride(2),
        db_a.stride(0), db_a.stride(1),
        float(scaling), mb,
        NEED_DH=need_dh, NEED_DB=need_db, NEED_DBIAS=need_dbias,
        LO_FP32=low_rank_fp32(grad_y.dtype, lora_B.dtype), R_BLOCK=rb, DOT_PRECISION=prec,
    )
    dh = None
    if need_dh:
        dh = dh_part[0] if splits == 1 else dh_part.sum(0)
    return dh, db, dbias


def _grad_a(dh, x, p, seed, prec, mb, lo_fp32=False):
    """dA (r, K) fp32 = dhᵀ @ drop(x), rows split over enough programs to fill the device."""
    M, K = x.shape
    r = dh.shape[1]
    rb = _rank_chunk(r, x.dtype)
    thr, inv_keep = _dropout_args(p)
    nominal_bk = 64
    programs = triton.cdiv(K, nominal_bk) * triton.cdiv(r, rb)
    splits = max(1, min(triton.cdiv(2 * _sm_count(x.device), programs), triton.cdiv(M, 256)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), 128) * 128
    splits = triton.cdiv(M, rows_per_split)
    part = torch.empty((splits, r, K), dtype=torch.float32, device=x.device)
    _launch(
        "lora_grad_a", _grad_a_tuned, lora_grad_a_kernel, _GRAD_A_FIXED,
        lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), splits, triton.cdiv(r, rb)), mb,
        dh, x, part, M, K, r, rows_per_split,
        dh.stride(0), dh.stride(1), x.stride(0), x.stride(1), part.stride(0), part.stride(1), part.stride(2),
        int(seed), thr, inv_keep, mb,
        HAS_DROPOUT=p > 0.0, LO_FP32=lo_fp32, R_BLOCK=rb, DOT_PRECISION=prec, N_ROUNDS=PHILOX_ROUNDS,
    )
    return part[0] if splits == 1 else part.sum(0)


def _dx_gemm(grad_y, weight, lora_A, dh, dx, p, seed, prec, mb, k_loop):
    """dX (M, K) = [dY @ W] + drop'(dh @ A) in one Triton GEMM over N; ``k_loop`` False leaves dY @ W out
    (cuBLAS adds it onto the masked low-rank term)."""
    M, N = grad_y.shape
    K, r = weight.shape[1], lora_A.shape[0]
    thr, inv_keep = _dropout_args(p)
    _launch(
        "gemm_lora", _gemm_dx_tuned, _gemm_fixed, _GEMM_FIXED,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),), mb,
        # a = dY (M, N); b = W (N, K); L = dh (M, r), already scaled; U = A (r, K)
        grad_y, weight, dx, dx, dh, lora_A, lora_A,
        M, K, N if k_loop else 0, r,
        grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1), dx.stride(0), dx.stride(1),
        dh.stride(0), dh.stride(1), lora_A.stride(0), lora_A.stride(1), 0, 0,
        1.0, int(seed), thr, inv_keep, mb,
        HAS_BIAS=False, LO_DROPOUT=p > 0.0, FUSE_SHRINK=False, STORE_L=False,
        LO_FP32=low_rank_fp32(grad_y.dtype, lora_A.dtype),
        R_BLOCK=_epilogue_r_block(r), DOT_PRECISION=prec, N_ROUNDS=PHILOX_ROUNDS,
    )


def lora_backward(
    grad_y, x, weight, lora_A, lora_B, h, scaling: float, dropout_p: float, seed: int,
    needs_input: bool, needs_weight: bool, needs_A: bool, needs_B: bool, needs_bias: bool,
):
    """Gradients of ``lora_forward`` (derived in fastlora.autograd): (dx, dW, dA, dB, dbias), None where not
    needed; dA/dB in the adapters' dtype, the others in x's. The dropout mask is regenerated from ``seed``."""
    _check(x, weight, lora_A, lora_B, None)
    with on_device(x.device):
        return _lora_backward(grad_y, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed,
                              needs_input, needs_weight, needs_A, needs_B, needs_bias)


def _lora_backward(grad_y, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed,
                   needs_input, needs_weight, needs_A, needs_B, needs_bias):
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    dev, cdt, adt = x.device, x.dtype, lora_A.dtype
    dx = dW = dA = dB = dbias = None
    if M == 0:  # an empty batch: no launch, exact zeros
        if needs_input:
            dx = torch.empty((0, K), dtype=cdt, device=dev)
        if needs_weight:
            dW = torch.zeros((N, K), dtype=cdt, device=dev)
        if needs_A:
            dA = torch.zeros((r, K), dtype=adt, device=dev)
        if needs_B:
            dB = torch.zeros((N, r), dtype=lora_B.dtype, device=dev)
        if needs_bias:
            dbias = torch.zeros((N,), dtype=cdt, device=dev)
        return dx, dW, dA, dB, dbias

    grad_y, x, weight, lora_A, lora_B = (_kernel_view(t) for t in (grad_y, x, weight, lora_A, lora_B))
    h = _kernel_view(h) if h is not None else None
    p = float(dropout_p)
    prec = _dot_precision(cdt)
    mb = _m_bucket(M)
    need_dh = needs_input or needs_A
    # fp32 atomics make dB / dbias depend on the order of the row tiles; deterministic mode reads dY twice instead
    deterministic = torch.are_deterministic_algorithms_enabled()
    fuse_db = needs_B and not deterministic and N > 0
    fuse_dbias = needs_bias and not deterministic and N > 0
    dh = db32 = dbias32 = None
    if need_dh or fuse_db or fuse_dbias:
        dh, db32, dbias32 = _grad_dy(grad_y, lora_B, h if fuse_db else None, scaling, need_dh, fuse_db,
                                     fuse_dbias, prec, mb)
    if needs_B:
        if fuse_db:
            dB = db32.to(lora_B.dtype)
        else:
            ld = torch.promote_types(cdt, lora_B.dtype)  # fp32 adapters: as the fused pass (no fp16 overflow)
            dB = torch.mm(grad_y.t().to(ld), h.to(ld)).mul_(scaling).to(lora_B.dtype)
    if needs_bias:
        dbias = dbias32.to(cdt) if fuse_dbias else grad_y.sum(0, dtype=torch.float32).to(cdt)

    if needs_input:
        dx = torch.empty((M, K), dtype=cdt, device=dev)
        if K > 0:
            args = (grad_y, weight, lora_A, dh, dx, p, seed, prec, mb)
            candidates = {"triton": lambda: _dx_gemm(*args, k_loop=True),
                          "cublas": lambda: (_dx_gemm(*args, k_loop=False), dx.addmm_(grad_y, weight))}
            key = _dispatch_key("dx", grad_y, weight.t(), lora_A, r, None, p, mb)
            candidates[gemm_dispatch.choose(key, candidates, dev)]()
    if needs_A:
        if K > 0:
            dA = _grad_a(dh, x, p, seed, prec, mb, low_rank_fp32(cdt, adt)).to(adt)
        else:
            dA = torch.empty((r, 0), dtype=adt, device=dev)
    if needs_weight:
        # dW = dYᵀ x: a plain GEMM with nothing to fuse, so cuBLAS (only for a weight that requires grad)
        dW = torch.mm(grad_y.t(), x)
    return dx, dW, dA, dB, dbias
