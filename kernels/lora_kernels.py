"""The @triton.jit kernels of the fused LoRA linear ``y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ`` and its gradients, and
the jit helpers other kernels share (``low_rank_dot``, ``low_rank_prologue``, ``fused_shrink_epilogue``: the rank-r
term of a GEMM tile). Shapes: x (M, K), W (N, K), A (r, K), B (N, r), b (N,), h = drop(x) Aᵀ (M, r); the math is
derived in ``fastlora.autograd``, the roles of the kernels are in ``kernels/lora_linear.py`` (the launchers), their
configs in ``kernels/lora_configs.py`` and the resource model that prunes them in ``kernels/resources.py``.

Conventions: explicit strides (non-contiguous inputs need no copy), masked loads/stores, int64 row offsets,
fp32 accumulation, any rank r >= 1 padded to a power of two >= 16 with masks, fp32 inputs with
``input_precision="ieee"`` unless torch allows TF32 for matmuls (``torch.backends.cuda.matmul.allow_tf32``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .dropout import philox_keep

__all__ = ["lora_shrink_kernel", "gemm_lora_kernel", "lora_grad_dy_kernel", "lora_grad_a_kernel", "low_rank_dot",
           "low_rank_prologue", "fused_shrink_epilogue", "dot"]


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def low_rank_dot(l, u, acc, cdt, LO_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + l @ u for the rank-R terms (l fp32, u in the adapters' dtype): in the input dtype ``cdt``, or with fp32
    operands (TF32) where LO_FP32 says the input's fp16 could overflow (fp32 adapters on an fp16 base)."""
    if LO_FP32:
        return tl.dot(l, u.to(tl.float32), acc, input_precision="tf32")
    return tl.dot(l.to(cdt), u.to(cdt), acc, input_precision=DOT_PRECISION)

@triton.jit
def low_rank_prologue(acc, l_ptr, u_ptr, rows, cols, offs_m, col0, R,
                      stride_lm, stride_lr, stride_ur, stride_un, scaling, seed, drop_thr, inv_keep, cdt,
                      LO_DROPOUT: tl.constexpr, LO_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_BLOCK: tl.constexpr, N_ROUNDS: tl.constexpr):
    """acc + s·(L[rows, :R] @ U[:R, cols]) [⊙ keep / (1-p)]: the rank-R term of a GEMM tile, before its K loop.

    The rank-R term (and the bias, added by the caller) is the accumulator's initial value: it does not depend on
    the K loop, and starting from it keeps a single (BLOCK_M, BLOCK_N) fp32 tile live even when the term is masked
    (added after the loop, it would need a second one). R runs in chunks of R_BLOCK. LO_DROPOUT: the Philox mask
    of (row, column) from ``col0`` (dX = dY W + drop'(dh A): the forward's mask). Shared by ``gemm_lora_kernel``
    and the 4-bit GEMM (kernels/qlora.py)."""
    offs_r = tl.arange(0, R_BLOCK)
    for r0 in range(0, R, R_BLOCK):
        rr = r0 + offs_r
        l = tl.load(l_ptr + rows[:, None] * stride_lm + rr.to(tl.int64)[None, :] * stride_lr,
                    mask=rr[None, :] < R, other=0.0)
        u = tl.load(u_ptr + rr.to(tl.int64)[:, None] * stride_ur + cols[None, :] * stride_un,
                    mask=rr[:, None] < R, other=0.0)
        acc = low_rank_dot(l.to(tl.float32) * scaling, u, acc, cdt, LO_FP32, DOT_PRECISION)
    if LO_DROPOUT:
        keep = philox_keep(seed, drop_thr, offs_m, col0, BLOCK_M, BLOCK_N, N_ROUNDS)
        acc = tl.where(keep, acc * inv_keep, 0.0)
    return acc


@triton.jit
def fused_shrink_epilogue(acc, l_acc, l_ptr, u_ptr, offs_m, cols, M, R, pid_n,
                          stride_lm, stride_lr, stride_ur, stride_un, scaling, cdt,
                          STORE_L: tl.constexpr, LO_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          R_BLOCK: tl.constexpr):
    """acc + s·(L @ U[:R, cols]) after a K loop that accumulated L = a @ S (the fused shrink, ``l_acc`` (BM, R)),
    with L stored once (STORE_L, by the programs of the first column tile). Shared by ``gemm_lora_kernel`` and the
    4-bit GEMM."""
    offs_r = tl.arange(0, R_BLOCK)
    r_ok = offs_r[None, :] < R
    if STORE_L:
        if pid_n == 0:
            l_ptrs = l_ptr + offs_m.to(tl.int64)[:, None] * stride_lm + offs_r.to(tl.int64)[None, :] * stride_lr
            tl.store(l_ptrs, l_acc.to(l_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & r_ok)
    u = tl.load(u_ptr + offs_r.to(tl.int64)[:, None] * stride_ur + cols[None, :] * stride_un,
                mask=offs_r[:, None] < R, other=0.0)
    return low_rank_dot(l_acc * scaling, u, acc, cdt, LO_FP32, DOT_PRECISION)


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
        acc = dot(x, a.to(cdt), acc, DOT_PRECISION)
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

    # Without the fused shrink, the rank-R term (and the bias) is the accumulator's initial value
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if not FUSE_SHRINK:
        acc = low_rank_prologue(acc, l_ptr, u_ptr, rows, cols, offs_m, pid_n * BLOCK_N, R,
                                stride_lm, stride_lr, stride_ur, stride_un, scaling, seed, drop_thr, inv_keep, cdt,
                                LO_DROPOUT, LO_FP32, DOT_PRECISION, BLOCK_M, BLOCK_N, R_BLOCK, N_ROUNDS)
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
        acc = dot(a, b, acc, DOT_PRECISION)
        if FUSE_SHRINK:
            if EVEN_K:
                s = tl.load(s_ptrs, mask=r_ok, other=0.0)
            else:
                s = tl.load(s_ptrs, mask=r_ok & k_ok[:, None], other=0.0)
            l_acc = dot(a, s.to(cdt), l_acc, DOT_PRECISION)
            s_ptrs += BLOCK_K * stride_sk
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Epilogue of the small-M path: the fused shrink's h, stored once, then s·h@Bᵀ
    if FUSE_SHRINK:
        acc = fused_shrink_epilogue(acc, l_acc, l_ptr, u_ptr, offs_m, cols, M, R, pid_n, stride_lm, stride_lr,
                                    stride_ur, stride_un, scaling, cdt, STORE_L, LO_FP32, DOT_PRECISION, R_BLOCK)

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
            dh = dot(dy, b.to(cdt), dh, DOT_PRECISION)
        if NEED_DB:
            if LO_FP32:
                part = tl.dot(tl.trans(dy).to(tl.float32), h, tl.zeros((BLOCK_N, R_BLOCK), dtype=tl.float32),
                              input_precision="tf32")
            else:
                part = dot(tl.trans(dy), h, tl.zeros((BLOCK_N, R_BLOCK), dtype=tl.float32), DOT_PRECISION)
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
            acc = dot(tl.trans(dh.to(cdt)), x.to(cdt), acc, DOT_PRECISION)
    out_ptrs = (out_ptr + pid_s.to(tl.int64) * stride_os + offs_r.to(tl.int64)[:, None] * stride_or
                + offs_k.to(tl.int64)[None, :] * stride_ok)
    tl.store(out_ptrs, acc, mask=r_ok[:, None] & k_ok[None, :])

