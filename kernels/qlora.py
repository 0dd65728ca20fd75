r"""Triton kernel of the LoRA linear over a bitsandbytes 4-bit (NF4 / FP4) base weight: the GEMM reads the packed
weight inside its K loop and dequantizes it in registers, so W costs half a byte per element of traffic.

Packed layout (bitsandbytes ``quantize_4bit``, checked against ``dequantize_4bit`` in tests/test_qlora.py): W (N, K)
is flattened row-major, element ``i = n·K + k``; byte ``i // 2`` holds elements ``2j`` in its HIGH nibble and
``2j + 1`` in its LOW nibble; element i's scale is ``absmax[i // blocksize]`` (blocks run over the flat index, so
they may straddle rows when K is not a multiple of blocksize). Its value is ``code[nibble] · absmax``, computed in
fp32 and rounded once to the quantized tensor's dtype (``quant_state.dtype``), exactly as bitsandbytes does, then
cast to the compute dtype. With double quantization the caller passes the absmax vector already dequantized (a
vector of N·K/blocksize fp32, tiny next to W).

``gemm_4bit_lora_kernel`` is ``gemm_lora_kernel`` (kernels/lora_linear.py) with its ``b`` operand read from the
packed weight through element strides: the forward reads Wᵀ (reduction index k, output index n: flat
``k + n·K``), the backward's dX = dY W + drop'(dh A) reads W (reduction index n, output index k: flat ``n·K + k``).
The low-rank term and the Philox dropout mask are the same @triton.jit helpers as there (``low_rank_prologue``,
``fused_shrink_epilogue`` of kernels/lora_kernels.py; the mask is the same function of (seed, row, column), so it
matches the shrink kernel's forward mask bit for bit).

Layout of this file: kernel → launch helpers (``qlora_gemm_forward`` / ``qlora_gemm_dx``). No autograd here: the
op, its gradients and the dispatch between this kernel and "dequantize once, then the fused kernels" live in
``fastlora.qlora``.
"""
from __future__ import annotations

import collections

import torch
import triton
import triton.language as tl

from . import common as kc
from .dropout import PHILOX_ROUNDS, dropout_args
from .lora_kernels import dot, fused_shrink_epilogue, low_rank_prologue

__all__ = ["gemm_4bit_lora_kernel", "qlora_gemm_forward", "qlora_gemm_dx", "launch_counts", "QLORA_FUSED_MAX_R"]

# Largest rank the fused shrink keeps in registers (as FUSED_SHRINK_MAX_R in lora_linear.py).
QLORA_FUSED_MAX_R = 64

# Kernel launches by name: tests read it to prove this kernel ran.
launch_counts: collections.Counter = collections.Counter()

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _select(bit, one, zero):
    return tl.where(bit != 0, one, zero)


@triton.jit
def load_code(code_ptr):
    """The 16 table entries as scalars, loaded once per program (before the K loop)."""
    return (tl.load(code_ptr + 0), tl.load(code_ptr + 1), tl.load(code_ptr + 2), tl.load(code_ptr + 3),
            tl.load(code_ptr + 4), tl.load(code_ptr + 5), tl.load(code_ptr + 6), tl.load(code_ptr + 7),
            tl.load(code_ptr + 8), tl.load(code_ptr + 9), tl.load(code_ptr + 10), tl.load(code_ptr + 11),
            tl.load(code_ptr + 12), tl.load(code_ptr + 13), tl.load(code_ptr + 14), tl.load(code_ptr + 15))


@triton.jit
def lookup_code(nib, code):
    """code[nib] for a tile of 4-bit indices, as a tree of selects between the 16 table entries ``code`` (a tuple
    of scalars): no per-element gather, exactly the table's values (bitsandbytes' dDequantizeNF4 is the same
    tree)."""
    b0 = nib & 1
    b1 = nib & 2
    b2 = nib & 4
    b3 = nib & 8
    v0 = _select(b0, code[1], code[0])
    v1 = _select(b0, code[3], code[2])
    v2 = _select(b0, code[5], code[4])
    v3 = _select(b0, code[7], code[6])
    v4 = _select(b0, code[9], code[8])
    v5 = _select(b0, code[11], code[10])
    v6 = _select(b0, code[13], code[12])
    v7 = _select(b0, code[15], code[14])
    w0 = _select(b1, v1, v0)
    w1 = _select(b1, v3, v2)
    w2 = _select(b1, v5, v4)
    w3 = _select(b1, v7, v6)
    return _select(b3, _select(b2, w3, w2), _select(b2, w1, w0))


@triton.jit
def dequant_4bit_tile(q_ptr, absmax_ptr, code, idx, ok, scale_idx, BLOCKSIZE: tl.constexpr,
                      SCALE_AXIS: tl.constexpr, W_DTYPE: tl.constexpr):
    """Values of the 4-bit elements at flat indices ``idx`` ((BK, BN) int32 or int64), 0 where not ``ok``, in W_DTYPE:
    ``code[nibble] · absmax[idx // BLOCKSIZE]`` in fp32, rounded once to W_DTYPE (bitsandbytes' rounding).
    SCALE_AXIS 0: a scale per element; 1 / 2: the tile lies within quantization blocks along axis 0 / 1, so
    ``scale_idx`` ((1, BN) / (BK, 1) flat indices) gives one scale per column / row of the tile."""
    byte = tl.load(q_ptr + (idx >> 1), mask=ok, other=0).to(tl.int32)
    shift = (1 - (idx & 1).to(tl.int32)) * 4  # element 2j: high nibble, 2j+1: low nibble
    value = lookup_code((byte >> shift) & 0xF, code)
    if SCALE_AXIS == 1:  # (1, BN); no K tail: K is a multiple of the K tile here
        scale = tl.load(absmax_ptr + scale_idx // BLOCKSIZE)
    else:  # (BK, BN) or (BK, 1): rows past the reduction length are masked
        scale = tl.load(absmax_ptr + scale_idx // BLOCKSIZE, mask=ok, other=0.0)
    return tl.where(ok, value * scale, 0.0).to(W_DTYPE)


@triton.jit(do_not_specialize=["M", "seed", "drop_thr"])
def gemm_4bit_lora_kernel(
    a_ptr, q_ptr, absmax_ptr, code_ptr, c_ptr, bias_ptr, l_ptr, u_ptr, s_ptr,
    M, N, K, R,
    stride_am, stride_ak, qstride_k, qstride_n, stride_cm, stride_cn,
    stride_lm, stride_lr, stride_ur, stride_un, stride_sk, stride_sr,
    scaling, seed, drop_thr, inv_keep,
    HAS_BIAS: tl.constexpr, LO_DROPOUT: tl.constexpr, FUSE_SHRINK: tl.constexpr, STORE_L: tl.constexpr,
    BLOCKSIZE: tl.constexpr, SCALE_AXIS: tl.constexpr, W_DTYPE: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr, LO_FP32: tl.constexpr,
):
    """C (M, N) = a (M, K) @ deq(q) (K, N) [+ bias] + s·(L (M, R) @ U (R, N)) [⊙ keep / (1-p)].

    deq(q)[k, n] is the 4-bit weight element at flat index ``k·qstride_k + n·qstride_n``. Forward: a = x,
    qstride = (1, K_in), L = h, U = Bᵀ (FUSE_SHRINK: L = a @ S with S = Aᵀ accumulated in the K loop). Backward
    dX: a = dY, qstride = (K_in, 1), L = dh (scaled, s = 1), U = A, LO_DROPOUT: the forward's mask on (M, N).
    SCALE_AXIS (set by the launcher when K % BLOCKSIZE == 0 and the tile divides the blocksize): 1 — the K tile
    lies in one quantization block per column (forward), 2 — the column tile lies in one block per row (dX).
    Grid: one program per (row tile, column tile), column tiles fastest (small M: W is read once).
    """
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    cdt = a_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_BLOCK)
    rows = (offs_m % M).to(tl.int64)  # wrapped: loads stay in bounds, the store is masked
    cols = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k.to(tl.int64)[None, :] * stride_ak
    # (BLOCK_K, BLOCK_N) flat indices into W: int32 unless W (with a tile's overhang) passes 2³¹ elements, which
    # halves the registers of the per-element index math
    if IDX64:
        qcols = cols
        q_idx = offs_k.to(tl.int64)[:, None] * qstride_k + qcols[None, :] * qstride_n
    else:
        qcols = offs_n % N
        q_idx = offs_k[:, None] * qstride_k + qcols[None, :] * qstride_n

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if not FUSE_SHRINK:  # the rank-R term (masked for dX) as the accumulator's initial value, as gemm_lora_kernel
        acc = low_rank_prologue(acc, l_ptr, u_ptr, rows, cols, offs_m, pid_n * BLOCK_N, R,
                                stride_lm, stride_lr, stride_ur, stride_un, scaling, seed, drop_thr, inv_keep, cdt,
                                LO_DROPOUT, LO_FP32, DOT_PRECISION, BLOCK_M, BLOCK_N, R_BLOCK, N_ROUNDS)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]

    if FUSE_SHRINK:
        r_ok = offs_r[None, :] < R
        s_ptrs = s_ptr + offs_k.to(tl.int64)[:, None] * stride_sk + offs_r.to(tl.int64)[None, :] * stride_sr
        l_acc = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    code = load_code(code_ptr)
    for k in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        if SCALE_AXIS == 1:
            scale_idx = k * qstride_k + qcols[None, :] * qstride_n  # (1, BN): the tile's first row
        elif SCALE_AXIS == 2:
            scale_idx = (k + offs_k.to(q_idx.dtype))[:, None] * qstride_k + pid_n * BLOCK_N * qstride_n  # (BK, 1)
        else:
            scale_idx = q_idx
        w = dequant_4bit_tile(q_ptr, absmax_ptr, code, q_idx, k_ok[:, None], scale_idx, BLOCKSIZE,
                              SCALE_AXIS, W_DTYPE)
        acc = dot(a, w.to(cdt), acc, DOT_PRECISION)
        if FUSE_SHRINK:
            s = tl.load(s_ptrs, mask=r_ok & k_ok[:, None], other=0.0)
            l_acc = dot(a, s.to(cdt), l_acc, DOT_PRECISION)
            s_ptrs += BLOCK_K * stride_sk
        a_ptrs += BLOCK_K * stride_ak
        q_idx += BLOCK_K * qstride_k

    if FUSE_SHRINK:
        acc = fused_shrink_epilogue(acc, l_acc, l_ptr, u_ptr, offs_m, cols, M, R, pid_n, stride_lm, stride_lr,
                                    stride_ur, stride_un, scaling, cdt, STORE_L, LO_FP32, DOT_PRECISION, R_BLOCK)

    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# ---------------------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------------------

def _config(M: int, N: int = 0, sms: int = 0) -> dict:
    """Tiles for an (M, N) output: tiny under the interpreter (its cost grows with the tile); on a GPU, short row
    tiles, and column tiles narrow enough that a small M still launches at least one program per SM (``sms``) to
    stream the packed weight at full bandwidth: 64 columns, or 32 where 64 would leave SMs idle."""
    if kc.interpreted():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2)
    bm = 16 if M <= 16 else (32 if M <= 32 else 64)
    bn = 64 if triton.cdiv(M, bm) * triton.cdiv(N, 64) >= sms else 32
    # BLOCK_K = 64 and BLOCK_N (32 or 64) divide bitsandbytes' usual blocksizes (64, 128, ...): one scale per
    # column (forward) or row (dX) of a tile
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, num_warps=4, num_stages=4)


# W's flat indices (plus a tile's overhang) at or above this use int64 arithmetic in the kernel
IDX32_LIMIT = 2**31


def _idx64(N: int, K: int) -> bool:
    return (N + 256) * (K + 256) >= IDX32_LIMIT


def _check_packed(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n_elements: int, blocksize: int):
    if q.dtype != torch.uint8 or not q.is_contiguous():
        raise TypeError(f"fastlora.kernels.qlora: the packed weight must be contiguous uint8, got {q.dtype}")
    if q.numel() != (n_elements + 1) // 2:
        raise ValueError(f"fastlora.kernels.qlora: packed weight has {q.numel()} bytes, expected {(n_elements + 1) // 2}")
    if absmax.dtype != torch.float32 or absmax.numel() != -(-n_elements // blocksize):
        raise ValueError("fastlora.kernels.qlora: absmax must be fp32 with one value per block")
    if code.dtype != torch.float32 or code.numel() != 16:
        raise ValueError("fastlora.kernels.qlora: code must be the 16-entry fp32 table")
    if blocksize & (blocksize - 1):
        raise ValueError(f"fastlora.kernels.qlora: blocksize must be a power of two, got {blocksize}")


def qlora_gemm_forward(x, q, absmax, code, blocksize: int, w_dtype: torch.dtype, N: int, lora_A, lora_B, bias,
                       scaling: float, h=None, save_h: bool = True):
    """y = x @ deq(W)ᵀ + b + s·h Bᵀ for x (M, K), the packed W (N, K), lora_A (r, K), lora_B (N, r).

    With ``h`` (M, r) given (the dropout path: the shrink ran elsewhere), it is used as is; without it, h = x Aᵀ is
    accumulated in the GEMM's K loop (no dropout; r <= QLORA_FUSED_MAX_R) and returned when ``save_h``.
    Returns (y, h or None); h is fp32 for half x."""
    M, K = x.shape
    r = lora_A.shape[0]
    _check_packed(q, absmax, code, N * K, blocksize)
    fuse = h is None
    if fuse and r > QLORA_FUSED_MAX_R:
        raise ValueError(f"fastlora.kernels.qlora: the fused shrink supports r <= {QLORA_FUSED_MAX_R}, got {r}")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    h_dt = torch.promote_types(x.dtype, torch.float32)
    if fuse:
        h = torch.empty((M, r), dtype=h_dt, device=x.device) if save_h else None
    if M == 0 or N == 0:
        if N == 0 and fuse and save_h:
            h = torch.mm(x.to(h_dt), lora_A.to(h_dt).t())  # nothing to stream W for: the shrink alone
        return y, h
    h_arg = h if h is not None else y  # dummy pointer when h is neither read nor stored
    bias_arg = bias.contiguous() if bias is not None else y
    cfg = _config(M, N, kc.sm_count(x.device, off_cuda=0))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    launch_counts["gemm_4bit_lora"] += 1
    with kc.on_device(x.device):
        gemm_4bit_lora_kernel[grid](
            # a = x (M, K); deq (K, N) = Wᵀ; L = h (M, r); U = Bᵀ (r, N); S = Aᵀ (K, r)
            x, q, absmax, code, y, bias_arg, h_arg, lora_B, lora_A,
            M, N, K, r,
            x.stride(0), x.stride(1), 1, K, y.stride(0), y.stride(1),
            h_arg.stride(0), h_arg.stride(1), lora_B.stride(1), lora_B.stride(0), lora_A.stride(1), lora_A.stride(0),
            float(scaling), 0, 0, 1.0,
            HAS_BIAS=bias is not None, LO_DROPOUT=False, FUSE_SHRINK=fuse, STORE_L=fuse and save_h,
            BLOCKSIZE=blocksize, W_DTYPE=_TL_DTYPES[w_dtype],
            # K tiles inside one quantization block per column: one scale per column and tile
            SCALE_AXIS=1 if K % blocksize == 0 and blocksize % cfg["BLOCK_K"] == 0 else 0, IDX64=_idx64(N, K),
            R_BLOCK=kc.r_block(r) if fuse else (16 if r <= 16 else 32), LO_FP32=kc.low_rank_fp32(x.dtype, lora_B.dtype),
            DOT_PRECISION=kc.dot_precision(x.dtype), N_ROUNDS=PHILOX_ROUNDS, **cfg,
        )
    return y, h


def qlora_gemm_dx(grad_y, q, absmax, code, blocksize: int, w_dtype: torch.dtype, K: int, dh, lora_A,
                  dropout_p: float, seed: int):
    """dX (M, K) = dY @ deq(W) + ((dh A) ⊙ keep)/(1-p) for dY (M, N), the packed W (N, K), dh (M, r) already
    scaled by s, lora_A (r, K); the keep mask is the Philox mask of ``seed`` (the forward's)."""
    M, N = grad_y.shape
    r = lora_A.shape[0]
    _check_packed(q, absmax, code, N * K, blocksize)
    dx = torch.empty((M, K), dtype=grad_y.dtype, device=grad_y.device)
    if M == 0 or K == 0:
        return dx
    p = float(dropout_p)
    thr, inv_keep = dropout_args(p)
    cfg = _config(M, K, kc.sm_count(grad_y.device, off_cuda=0))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_N"]),)
    launch_counts["gemm_4bit_lora_dx"] += 1
    with kc.on_device(grad_y.device):
        gemm_4bit_lora_kernel[grid](
            # a = dY (M, N); deq (N, K) = W; L = dh (M, r); U = A (r, K)
            grad_y, q, absmax, code, dx, dx, dh, lora_A, lora_A,
            M, K, N, r,
            grad_y.stride(0), grad_y.stride(1), K, 1, dx.stride(0), dx.stride(1),
            dh.stride(0), dh.stride(1), lora_A.stride(0), lora_A.stride(1), 0, 0,
            1.0, int(seed), thr, inv_keep,
            HAS_BIAS=False, LO_DROPOUT=p > 0.0, FUSE_SHRINK=False, STORE_L=False,
            BLOCKSIZE=blocksize, W_DTYPE=_TL_DTYPES[w_dtype], R_BLOCK=16 if r <= 16 else 32,
            # output (k) tiles inside one quantization block per row n: one scale per row and tile
            SCALE_AXIS=2 if K % blocksize == 0 and blocksize % cfg["BLOCK_N"] == 0 else 0, IDX64=_idx64(N, K),
            LO_FP32=kc.low_rank_fp32(grad_y.dtype, lora_A.dtype),
            DOT_PRECISION=kc.dot_precision(grad_y.dtype), N_ROUNDS=PHILOX_ROUNDS, **cfg,
        )
    return dx
