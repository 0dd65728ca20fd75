r"""Triton kernels for LoRA on grouped expert weights (mixture-of-experts), and their launch helpers.

The rows of x are sorted by expert: expert e owns rows ``offsets[e-1] : offsets[e]`` (``offsets`` is the
cumulative row count, as ``torch.nn.functional.grouped_mm`` takes it). For the rows of expert e::

    h_e = x_e A_eᵀ                          (M_e, r)      saved for backward, fp32
    y_e = x_e W_eᵀ + b_e + s · h_e B_eᵀ     (M_e, N)

with W (E, N, K), A (E, r, K), B (E, N, r), b (E, N), all by explicit strides (a transposed expert stack, or
PEFT's B layout, are views). No (E, N, K) or (N, K) delta is ever formed.

Three kernels, one launch each for all experts:

* ``grouped_lora_gemm_kernel``: a grouped GEMM whose K loop also accumulates the rank-r shrink ``x_e A_eᵀ`` (up
  to r = 32; above, ``grouped_shrink_kernel`` computes h first and the GEMM reads it); its epilogue adds
  ``s · h Bᵀ`` and the bias, so y is stored once, and the programs of the first column block store h. Row tiles never straddle two experts: each program finds its expert from the offsets (a cumulative sum of
  per-expert tile counts, computed in the kernel, so the host never reads the routing), and the grid is sized for
  the worst case (``cdiv(S, BLOCK_M) + E`` row tiles); the surplus programs zero the rows past the last offset
  (rows no expert owns: y is defined everywhere) and exit. The backward's dX is the
  same kernel on transposed views::

      dx_e = dY_e W_e + s · (dY_e B_e) A_e          x' = dY, W' = W_eᵀ, A' = B_eᵀ, B' = A_eᵀ, h' = dY_e B_e

* ``grouped_rows_outer_kernel``: per expert, a sum over its rows of outer products,
  ``out[e] = scale · P_eᵀ Q_e`` (and optionally the column sums of P_e): dB_e = s·dY_eᵀ h_e (with dbias_e = Σ dY_e),
  dA_e = (s·h'_e)ᵀ x_e (stored transposed, by strides), and dW_e = dY_eᵀ x_e when W requires grad. An expert with
  no rows gets zeros.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import autotune_enabled, dot_precision, interpreted, m_bucket, r_block

__all__ = ["grouped_shrink_kernel", "grouped_lora_gemm_kernel", "grouped_rows_outer_kernel", "experts_forward",
           "experts_backward"]

SMEM_LIMIT = 227 * 1024


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------

@triton.jit
def _expert_tile(offs_ptr, E, t, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first row, end row, routed rows, tiles) of row tile ``t``, tiles numbered expert by expert; t is
    past the experts' tiles when t >= tiles."""
    idx = tl.arange(0, BLOCK_E)
    in_e = idx < E
    ends = tl.load(offs_ptr + idx, mask=in_e, other=0).to(tl.int32)
    starts = tl.load(offs_ptr + idx - 1, mask=in_e & (idx > 0), other=0).to(tl.int32)
    tiles = tl.where(in_e, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    tile_end = tl.cumsum(tiles, 0)
    total = tl.sum(tiles, 0)
    e = tl.sum((tile_end <= t).to(tl.int32), 0)
    here = idx == e
    first_tile = tl.sum(tl.where(here, tile_end - tiles, 0), 0)
    row_start = tl.sum(tl.where(here, starts, 0), 0) + (t - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(here, ends, 0), 0)
    last = tl.sum(tl.where(idx == E - 1, ends, 0), 0)
    return e, row_start, row_end, last, total


@triton.jit
def grouped_shrink_kernel(
        x_ptr, a_ptr, h_ptr, offs_ptr,
        E, K, R,
        stride_xm, stride_xk, stride_ae, stride_ar, stride_ak, stride_hm, stride_hr,
        LO_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
        S_BUCKET: tl.constexpr):
    """h[rows of e, rank chunk] = x A_eᵀ (fp32) for one (row tile, rank chunk of R_BLOCK)."""
    t = tl.program_id(0)
    pid_r = tl.program_id(1)
    e, row_start, row_end, last, total = _expert_tile(offs_ptr, E, t, BLOCK_M, BLOCK_E)
    if t >= total:
        return
    e64 = e.to(tl.int64)
    rm = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = pid_r * R_BLOCK + tl.arange(0, R_BLOCK)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < row_end
    r_mask = rr < R
    h = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < K
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_ptr + e64 * stride_ae + rr[None, :] * stride_ar + kk[:, None] * stride_ak,
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if LO_FP32:
            h = tl.dot(xt.to(tl.float32), at.to(tl.float32), h, input_precision=DOT_PRECISION)
        else:
            h = tl.dot(xt, at.to(xt.dtype), h, input_precision=DOT_PRECISION)
    tl.store(h_ptr + rm[:, None] * stride_hm + rr[None, :] * stride_hr, h.to(h_ptr.dtype.element_ty),
             mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def grouped_lora_gemm_kernel(
        x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, h_ptr, offs_ptr,
        S, E, N, K, R, scaling,
        stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_ae, stride_ar, stride_ak,
        stride_be, stride_bn, stride_br, stride_biase, stride_biasn, stride_ym, stride_yn, stride_hm, stride_hr,
        HAS_LORA: tl.constexpr, FUSE_SHRINK: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_H: tl.constexpr,
        ACCUMULATE: tl.constexpr, LO_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_BLOCK: tl.constexpr,
        BLOCK_E: tl.constexpr, S_BUCKET: tl.constexpr):
    """y[rows of e] = x W_eᵀ + b_e + s·h B_eᵀ for one (row tile, column block). ``FUSE_SHRINK`` (r <= R_BLOCK):
    h = x A_eᵀ is accumulated in the K loop, and stored by the first column block where ``STORE_H``; else h was
    computed by ``grouped_shrink_kernel`` and is read in the epilogue, R_BLOCK ranks at a time. ``ACCUMULATE``: y
    holds x W_eᵀ already (torch's grouped_mm, the ``grouped_mm`` composition) and the kernel, launched with K = 0,
    adds the rest. ``LO_FP32``: the rank-r products take fp32 operands (fp32 adapters on a half base)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    t = pid // num_n
    pid_n = pid % num_n
    e, row_start, row_end, last, total = _expert_tile(offs_ptr, E, t, BLOCK_M, BLOCK_E)
    if t >= total:  # rows past the last offset (no expert owns them) are zeros: the grid has tiles to spare
        rt = last + (t - total) * BLOCK_M + tl.arange(0, BLOCK_M)
        rz = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(y_ptr + rt.to(tl.int64)[:, None] * stride_ym + rz[None, :] * stride_yn,
                 tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty),
                 mask=(rt < S)[:, None] & (rz < N)[None, :])
        return
    e64 = e.to(tl.int64)
    rm = row_start + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, R_BLOCK)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < row_end
    n_mask = rn < N
    rm64 = rm.to(tl.int64)
    x_rows = x_ptr + rm64[:, None] * stride_xm
    w_cols = w_ptr + e64 * stride_we + rn[None, :].to(tl.int64) * stride_wn
    a_cols = a_ptr + e64 * stride_ae + rr[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    h = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < K
        xt = tl.load(x_rows + kk[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_cols + kk[:, None] * stride_wk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
        if HAS_LORA and FUSE_SHRINK:
            at = tl.load(a_cols + kk[:, None] * stride_ak, mask=k_mask[:, None] & (rr < R)[None, :], other=0.0)
            if LO_FP32:
                h = tl.dot(xt.to(tl.float32), at.to(tl.float32), h, input_precision=DOT_PRECISION)
            else:
                h = tl.dot(xt, at.to(xt.dtype), h, input_precision=DOT_PRECISION)
    if HAS_LORA:
        if FUSE_SHRINK:
            bt = tl.load(b_ptr + e64 * stride_be + rr[:, None] * stride_br + rn[None, :] * stride_bn,
                         mask=(rr < R)[:, None] & n_mask[None, :], other=0.0)
            if LO_FP32:
                acc = tl.dot(h * scaling, bt.to(tl.float32), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot((h * scaling).to(y_ptr.dtype.element_ty), bt.to(y_ptr.dtype.element_ty), acc,
                             input_precision=DOT_PRECISION)
            if STORE_H:
                if pid_n == 0:
                    tl.store(h_ptr + rm64[:, None] * stride_hm + rr[None, :] * stride_hr,
                             h.to(h_ptr.dtype.element_ty), mask=m_mask[:, None] & (rr < R)[None, :])
        else:
            for r0 in range(0, R, R_BLOCK):
                rc = r0 + rr
                r_mask = rc < R
                hc = tl.load(h_ptr + rm64[:, None] * stride_hm + rc[None, :] * stride_hr,
                             mask=m_mask[:, None] & r_mask[None, :], other=0.0)
                bt = tl.load(b_ptr + e64 * stride_be + rc[:, None] * stride_br + rn[None, :] * stride_bn,
                             mask=r_mask[:, None] & n_mask[None, :], other=0.0)
                if LO_FP32:
                    acc = tl.dot(hc.to(tl.float32) * scaling, bt.to(tl.float32), acc, input_precision=DOT_PRECISION)
                else:
                    acc = tl.dot((hc.to(tl.float32) * scaling).to(y_ptr.dtype.element_ty),
                                 bt.to(y_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + e64 * stride_biase + rn * stride_biasn, mask=n_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm64[:, None] * stride_ym + rn[None, :] * stride_yn
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def grouped_rows_outer_kernel(
        p_ptr, q_ptr, out_ptr, colsum_ptr, offs_ptr,
        E, N, J, scale,
        stride_pm, stride_pn, stride_qm, stride_qj, stride_oe, stride_on, stride_oj, stride_ce, stride_cn,
        HAS_COLSUM: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, S_BUCKET: tl.constexpr):
    """out[e, n, j] = scale · Σ_{m of e} P[m, n] Q[m, j] for one (expert, n block, j block); colsum[e, n] = Σ P[m, n].
    Deterministic (each output element is one program's), zeros for an expert without rows."""
    e = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_j = tl.program_id(2)
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0).to(tl.int32)
    end = tl.load(offs_ptr + e).to(tl.int32)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    n_mask = rn < N
    j_mask = rj < J
    acc = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)
    cs = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rm = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_mask = rm < end
        pt = tl.load(p_ptr + rm[:, None] * stride_pm + rn[None, :] * stride_pn,
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        qt = tl.load(q_ptr + rm[:, None] * stride_qm + rj[None, :] * stride_qj,
                     mask=m_mask[:, None] & j_mask[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(tl.trans(pt.to(tl.float32)), qt.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(tl.trans(pt), qt.to(pt.dtype), acc, input_precision=DOT_PRECISION)
        if HAS_COLSUM:
            cs += tl.sum(pt.to(tl.float32), 0)
    e64 = e.to(tl.int64)
    tl.store(out_ptr + e64 * stride_oe + rn[:, None] * stride_on + rj[None, :] * stride_oj,
             (acc * scale).to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & j_mask[None, :])
    if HAS_COLSUM:
        if pid_j == 0:
            tl.store(colsum_ptr + e64 * stride_ce + rn * stride_cn, cs.to(colsum_ptr.dtype.element_ty),
                     mask=n_mask)


# --------------------------------------------------------------------------------------------------------------
# Configs: short autotune lists on a GPU (each config checked by an sm_90 build: fits, spills nothing; see
# tests/test_moe_kernels_compile.py), one small config under the interpreter or with FASTLORA_AUTOTUNE=0
# --------------------------------------------------------------------------------------------------------------

FUSED_SHRINK_MAX_R = 32  # above it, h comes from grouped_shrink_kernel and the GEMM reads it in its epilogue
RANK_CHUNK = 64  # the rank tile of the shrink kernel and of the GEMM's epilogue; 32 with fp32 rank products


def rank_chunk(lo_fp32: bool) -> int:
    return RANK_CHUNK // 2 if lo_fp32 else RANK_CHUNK


def _esize(t) -> int:
    return t.element_size() if isinstance(t, torch.Tensor) else 2


def gemm_resources(cfg, args) -> int:
    """Shared memory (bytes) of a pipelined grouped GEMM config: per stage an x tile, a W tile and, with the shrink
    fused, an A tile; plus the epilogue's h and B tiles."""
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    es = _esize(args.get("x_ptr"))
    lo = 4 if args.get("LO_FP32") else es
    per_stage = (bm * bk + bk * bn) * es
    if args.get("HAS_LORA", True) and args.get("FUSE_SHRINK", True):
        per_stage += bk * args["R_BLOCK"] * lo
    epilogue = (bm + bn) * args["R_BLOCK"] * lo
    return max(cfg.num_stages - 1, 1) * per_stage + epilogue


def shrink_resources(cfg, args) -> int:
    bm, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]
    es = _esize(args.get("x_ptr"))
    lo = 4 if args.get("LO_FP32") else es
    return max(cfg.num_stages - 1, 1) * (bm * bk * es + bk * args["R_BLOCK"] * lo)


def outer_resources(cfg, args) -> int:
    bm, bn, bj = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_J"]
    es = 4 if args.get("DOT_FP32") else _esize(args.get("p_ptr"))
    return max(cfg.num_stages - 1, 1) * (bm * bn + bm * bj) * es


def _prune(resources, keep=None):
    """Configs within the shared memory of an sm_90 SM (and ``keep(cfg, args)``); the smallest when none is."""
    def prune(configs, named_args, **kwargs):
        args = dict(named_args, **kwargs)
        ok = [c for c in configs if keep is None or keep(c, args)] or list(configs)
        kept = [c for c in ok if resources(c, args) <= SMEM_LIMIT]
        return kept or [min(ok, key=lambda c: resources(c, args))]
    return prune


def _cfg(num_warps, num_stages, **kwargs):
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


def _fixed(**kwargs):
    small = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, BLOCK_J=16)
    return [_cfg(4, 3, **{k: (small[k] if interpreted() else v) for k, v in kwargs.items()})]


def _gemm_configs():
    if not autotune_enabled():
        return _fixed(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64)
    return [_cfg(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
            _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32), _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)]


def _gemm_keep(cfg, args) -> bool:
    """The tiles whose sm_90 builds spill nothing: BLOCK_M = 128 only without the shrink in the K loop, and with
    fp32 rank products and a fused shrink wider than 16, BLOCK_N <= 64."""
    k = cfg.kwargs
    fused = args.get("HAS_LORA") and args.get("FUSE_SHRINK")
    if fused and k["BLOCK_M"] > 64:
        return False
    return not (fused and args.get("LO_FP32") and args["R_BLOCK"] > 16 and k["BLOCK_N"] > 64)


def _shrink_configs():
    if not autotune_enabled():
        return _fixed(BLOCK_M=64, BLOCK_K=64)
    return [_cfg(4, 3, BLOCK_M=64, BLOCK_K=64), _cfg(4, 4, BLOCK_M=32, BLOCK_K=64), _cfg(4, 4, BLOCK_M=64,
                                                                                            BLOCK_K=32)]


def _outer_configs():
    if not autotune_enabled():
        return _fixed(BLOCK_M=64, BLOCK_N=64, BLOCK_J=64)
    return [_cfg(4, 3, BLOCK_M=32, BLOCK_N=128, BLOCK_J=64), _cfg(4, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_J=32),
            _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_J=16), _cfg(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_J=128),
            _cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_J=64)]


def _outer_keep(cfg, args) -> bool:
    """With fp32 operands (h, dh), only the tiles whose sm_90 builds spill nothing."""
    k = cfg.kwargs
    return not args.get("DOT_FP32") or (k["BLOCK_N"] * k["BLOCK_J"] <= 8192 and k["BLOCK_J"] <= 64
                                         and k["BLOCK_M"] * (k["BLOCK_N"] + k["BLOCK_J"]) != 8192)


prune_grouped_lora_gemm = _prune(gemm_resources, _gemm_keep)
prune_grouped_shrink = _prune(shrink_resources)
prune_grouped_rows_outer = _prune(outer_resources, _outer_keep)

_GEMM = triton.autotune(configs=_gemm_configs(), key=["S_BUCKET", "N", "K", "R_BLOCK", "HAS_LORA", "FUSE_SHRINK",
                                                      "ACCUMULATE", "LO_FP32"],
                        prune_configs_by={"early_config_prune": prune_grouped_lora_gemm})(grouped_lora_gemm_kernel)
_SHRINK = triton.autotune(configs=_shrink_configs(), key=["S_BUCKET", "K", "R_BLOCK", "LO_FP32"],
                          prune_configs_by={"early_config_prune": prune_grouped_shrink})(grouped_shrink_kernel)
_OUTER = triton.autotune(configs=_outer_configs(), key=["S_BUCKET", "N", "J", "E", "DOT_FP32"],
                         prune_configs_by={"early_config_prune": prune_grouped_rows_outer})(grouped_rows_outer_kernel)


def _dot_precision(*dtypes) -> str:
    """The shared rule (``common.dot_precision``) for a product with these operand dtypes."""
    return dot_precision(torch.float32 if torch.float32 in dtypes else dtypes[0])


def low_rank_fp32(dtype: torch.dtype, adapter_dtype: torch.dtype) -> bool:
    """The rank-r products take fp32 operands wherever x or the adapters are fp32 (bf16 with fp32 adapters too,
    unlike the dense kernels' ``common.low_rank_fp32``): the PyTorch path computes them so, and both save h in that
    dtype, so the two implementations agree on what autograd keeps."""
    return dtype == torch.float32 or adapter_dtype == torch.float32


# --------------------------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------------------------

def _shrink(x, a, h, offsets):
    """h = x A_eᵀ (fp32) for every row's expert: one launch, rank chunks along the grid's second axis."""
    S, K = x.shape
    E, R = offsets.shape[0], a.shape[1]
    lo_fp32 = low_rank_fp32(x.dtype, a.dtype)
    rb = r_block(max(R, 1), rank_chunk(lo_fp32))
    _SHRINK[lambda meta: (triton.cdiv(S, meta["BLOCK_M"]) + E, triton.cdiv(R, rb))](
        x, a, h, offsets, E, K, R, x.stride(0), x.stride(1), *a.stride(), h.stride(0), h.stride(1),
        LO_FP32=lo_fp32, DOT_PRECISION=_dot_precision(x.dtype, a.dtype), R_BLOCK=rb,
        BLOCK_E=max(16, triton.next_power_of_2(E)), S_BUCKET=m_bucket(S))


def h_dtype(dtype: torch.dtype, adapter_dtype: torch.dtype) -> torch.dtype:
    """The dtype h is saved in: fp32 where the rank products are (as the PyTorch path saves it), else x's."""
    return torch.float32 if low_rank_fp32(dtype, adapter_dtype) else dtype


def _grouped_lora(x, w, a, b, bias, offsets, scaling, out_dtype, hdt=torch.float32):
    """(y, h): y = x W_eᵀ + b_e + s·(x A_eᵀ) B_eᵀ per row's expert, h = x A_eᵀ (in ``hdt``). Up to 32 ranks the
    shrink runs in the GEMM's K loop; above, in its own launch first."""
    S, K = x.shape
    y = torch.empty(S, w.shape[1], device=x.device, dtype=out_dtype)
    return _lora_gemm(x, w, a, b, bias, offsets, scaling, y, hdt, accumulate=False)


def _grouped_lora_on_grouped_mm(x, w, a, b, bias, offsets, scaling, out_dtype, hdt=torch.float32):
    """The same (y, h), composed: x W_eᵀ by torch's grouped_mm (CUTLASS on CUDA), then h by the shrink kernel and
    ``s·h B_eᵀ + b_e`` added in place by the GEMM kernel launched with K = 0 (its epilogue alone)."""
    y = torch.nn.functional.grouped_mm(x, w.transpose(1, 2), offs=offsets.to(torch.int32))
    if y.dtype != out_dtype:
        y = y.to(out_dtype)
    return _lora_gemm(x, w, a, b, bias, offsets, scaling, y, hdt, accumulate=True)


def _lora_gemm(x, w, a, b, bias, offsets, scaling, y, hdt, accumulate):
    S = x.shape[0]
    K = 0 if accumulate else x.shape[1]
    E, N = offsets.shape[0], w.shape[1]
    R = a.shape[1]
    h = torch.empty(S, R, device=x.device, dtype=hdt)
    if S == 0 or N == 0:
        return y, h
    fuse = R <= FUSED_SHRINK_MAX_R and not accumulate
    if R and not fuse:
        _shrink(x, a, h, offsets)
    has_lora = R > 0
    lo_fp32 = has_lora and low_rank_fp32(x.dtype, a.dtype)
    rb = r_block(max(R, 1), FUSED_SHRINK_MAX_R if fuse else rank_chunk(lo_fp32))
    _GEMM[lambda meta: ((triton.cdiv(S, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]),)](
        x, w, a if has_lora else y, b if has_lora else y, bias if bias is not None else y, y,
        h if has_lora else y, offsets,
        S, E, N, K, R, float(scaling),
        x.stride(0), x.stride(1), *w.stride(), *a.stride(), *b.stride(),
        *(bias.stride() if bias is not None else (0, 0)),
        y.stride(0), y.stride(1), h.stride(0), h.stride(1),
        HAS_LORA=has_lora, FUSE_SHRINK=fuse, HAS_BIAS=bias is not None, STORE_H=fuse and has_lora,
        ACCUMULATE=accumulate, LO_FP32=lo_fp32, DOT_PRECISION=_dot_precision(x.dtype, a.dtype), R_BLOCK=rb,
        BLOCK_E=max(16, triton.next_power_of_2(E)), S_BUCKET=m_bucket(S))
    return y, h


def _rows_outer(p, q, out, offsets, scale, colsum=None):
    """out[e] = scale · P_eᵀ Q_e (out (E, N, J) by its strides), colsum[e] = Σ P_e where given."""
    S, N = p.shape
    J = q.shape[1]
    E = offsets.shape[0]
    if E == 0 or N == 0 or J == 0:
        if colsum is not None:
            colsum.zero_()
        return out
    dot_fp32 = p.dtype == torch.float32 or q.dtype == torch.float32
    cs = colsum if colsum is not None else out
    _OUTER[lambda meta: (E, triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(J, meta["BLOCK_J"]))](
        p, q, out, cs, offsets, E, N, J, float(scale),
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), out.stride(0), out.stride(1), out.stride(2),
        *(colsum.stride() if colsum is not None else (0, 0)),
        HAS_COLSUM=colsum is not None, DOT_FP32=dot_fp32, DOT_PRECISION=_dot_precision(p.dtype, q.dtype),
        S_BUCKET=m_bucket(S))
    return out


PATHS = ("fused", "grouped_mm")
_PATH_CHOICE = None  # the MeasuredChoice between the two compositions, made on first use


def _path_choice():
    global _PATH_CHOICE
    if _PATH_CHOICE is None:
        from .dispatch import MeasuredChoice

        _PATH_CHOICE = MeasuredChoice("FASTLORA_MOE_PATH", PATHS, "fused")
    return _PATH_CHOICE


def dispatch_choices() -> dict:
    """The measured choices so far: {(phase, S bucket, E, N, K, r, dtype, adapter dtype, bias, device): path}."""
    return {key: choice for key, choice, _ in _path_choice().report()}


def grouped_mm_takes(x, w) -> bool:
    """torch's ``grouped_mm`` can run x (S, K) against the (E, K, N) view of w (E, N, K): present, a dtype it
    runs, 16-byte aligned rows and expert strides."""
    if not hasattr(torch.nn.functional, "grouped_mm") or x.dtype not in (torch.bfloat16, torch.float16,
                                                                          torch.float32):
        return False
    if x.device.type == "cuda" and (x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0)):
        return False
    es = x.element_size()
    wt = w.transpose(1, 2)
    return (x.stride(1) == 1 and x.stride(0) * es % 16 == 0 and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
            and 1 in wt.stride()[1:] and all(st * es % 16 == 0 for st in wt.stride() if st != 1))


def _run_path(phase, x, w, a, b, bias, offsets, scaling, out_dtype, hdt):
    """The grouped LoRA GEMM by the faster composition for this shape class (measured on CUDA, cached per key;
    ``FASTLORA_MOE_PATH`` pins one; the fused kernel where nothing is timed and where grouped_mm cannot run)."""
    args = (x, w, a, b, bias, offsets, scaling, out_dtype, hdt)
    if x.shape[0] == 0 or not grouped_mm_takes(x, w):
        return _grouped_lora(*args)
    key = (phase, m_bucket(x.shape[0]), offsets.shape[0], w.shape[1], x.shape[1], a.shape[1], x.dtype, a.dtype,
           bias is not None, str(x.device))
    return _path_choice().run(key, {"fused": lambda: _grouped_lora(*args),
                                    "grouped_mm": lambda: _grouped_lora_on_grouped_mm(*args)}, x.device)


def experts_forward(x, weight, lora_A, lora_B, bias, offsets, scaling, store_h=True):
    """(y, h): y (S, N) in x's dtype, h = x A_eᵀ (S, r) per row's expert (None unless ``store_h``), fp32 where the
    rank products are (``h_dtype``)."""
    y, h = _run_path("fwd", x, weight, lora_A, lora_B, bias, offsets, scaling, x.dtype,
                     h_dtype(x.dtype, lora_A.dtype))
    return y, (h if store_h else None)


def experts_backward(dy, x, weight, lora_A, lora_B, h, offsets, scaling, needs):
    """(dx, dW, dA, dB, dbias) for ``needs`` = (x, weight, lora_A, lora_B, bias) flags; None where not needed.

    dx comes from the forward kernels on transposed views (their h' = dY_e B_e is dh / s); dA, dB, dW and dbias
    from the per-expert outer-product kernel."""
    need_x, need_w, need_a, need_b, need_bias = needs
    E, N, K = weight.shape
    r = lora_A.shape[1]
    dy = dy.contiguous() if dy.stride(-1) != 1 else dy
    dx = dw = da = db = dbias = None
    hp = None
    if need_x:
        dx, hp = _run_path("dx", dy, weight.transpose(1, 2), lora_B.transpose(1, 2), lora_A.transpose(1, 2), None,
                           offsets, scaling, x.dtype, torch.float32)
    elif need_a and r:  # dh alone (x frozen): the rank-r shrink of dY
        hp = torch.empty(dy.shape[0], r, device=dy.device, dtype=torch.float32)
        if dy.shape[0]:
            _shrink(dy, lora_B.transpose(1, 2), hp, offsets)
    if need_a:
        da = torch.empty(E, r, K, device=x.device, dtype=lora_A.dtype)
        if hp is None:
            hp = torch.empty(dy.shape[0], r, device=dy.device, dtype=torch.float32)
        _rows_outer(x, hp, da.transpose(1, 2), offsets, scaling)  # dA_eᵀ = x_eᵀ (s·h'_e)
    if need_b or need_bias:
        dbias = torch.empty(E, N, device=x.device, dtype=torch.float32) if need_bias else None
        if need_b:
            db = torch.empty(E, N, r, device=x.device, dtype=lora_B.dtype)
        if need_b and r:
            _rows_outer(dy, h, db, offsets, scaling, colsum=dbias)
        elif need_bias:  # the column sums alone (no B, or rank 0): a one-column product nothing reads
            _rows_outer(dy, dy[:, :1], torch.empty(E, N, 1, device=x.device, dtype=torch.float32), offsets, 0.0,
                        colsum=dbias)
    if need_w:
        dw = torch.empty(E, N, K, device=x.device, dtype=weight.dtype)
        _rows_outer(dy, x, dw, offsets, 1.0)
    return dx, dw, da, db, dbias
