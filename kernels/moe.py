r"""Triton kernels for LoRA on grouped expert weights (mixture-of-experts), and their launch helpers.

The rows of x are sorted by expert: expert e owns rows ``offsets[e-1] : offsets[e]`` (``offsets`` is the
cumulative row count, as ``torch.nn.functional.grouped_mm`` takes it). For the rows of expert e::

    h_e = x_e A_eᵀ                          (M_e, r)      saved for backward, fp32
    y_e = x_e W_eᵀ + b_e + s · h_e B_eᵀ     (M_e, N)

with W (E, N, K), A (E, r, K), B (E, N, r), b (E, N), all by explicit strides (a transposed expert stack, or
PEFT's B layout, are views). No (E, N, K) or (N, K) delta is ever formed.

Two kernels, one launch each for all experts:

* ``grouped_lora_gemm_kernel``: a grouped GEMM whose K loop also accumulates the rank-r shrink ``x_e A_eᵀ``; its
  epilogue adds ``s · h Bᵀ`` and the bias, so y is stored once, and the programs of the first column block store
  h. Row tiles never straddle two experts: each program finds its expert from the offsets (a cumulative sum of
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

import os

import torch
import triton
import triton.language as tl

__all__ = ["grouped_lora_gemm_kernel", "grouped_rows_outer_kernel", "experts_forward", "experts_backward",
           "R_BLOCK_MAX"]

R_BLOCK_MAX = 128  # larger ranks run in chunks of 128: the rank accumulator (BLOCK_M, R_BLOCK) lives in registers
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
def grouped_lora_gemm_kernel(
        x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, h_ptr, offs_ptr,
        S, E, N, K, R, scaling,
        stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_ae, stride_ar, stride_ak,
        stride_be, stride_bn, stride_br, stride_biase, stride_biasn, stride_ym, stride_yn, stride_hm, stride_hr,
        HAS_BASE: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_H: tl.constexpr,
        ACCUMULATE: tl.constexpr, LO_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_BLOCK: tl.constexpr,
        BLOCK_E: tl.constexpr, S_BUCKET: tl.constexpr):
    """y[rows of e] (+)= x W_eᵀ + b_e + s·(x A_eᵀ) B_eᵀ for one (row tile, column block); h = x A_eᵀ stored by the
    first column block. ``LO_FP32``: the rank-r products take fp32 operands (fp32 adapters on a half base)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    t = pid // num_n
    pid_n = pid % num_n
    e, row_start, row_end, last, total = _expert_tile(offs_ptr, E, t, BLOCK_M, BLOCK_E)
    if t >= total:  # rows past the last offset (no expert owns them) are zeros: the grid has tiles to spare
        if not ACCUMULATE:
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
    r_mask = rr < R
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
        if HAS_BASE:
            wt = tl.load(w_cols + kk[:, None] * stride_wk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
        if HAS_LORA:
            at = tl.load(a_cols + kk[:, None] * stride_ak, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            if LO_FP32:
                h = tl.dot(xt.to(tl.float32), at.to(tl.float32), h, input_precision=DOT_PRECISION)
            else:
                h = tl.dot(xt, at.to(xt.dtype), h, input_precision=DOT_PRECISION)
    if HAS_LORA:
        bt = tl.load(b_ptr + e64 * stride_be + rr[:, None] * stride_br + rn[None, :] * stride_bn,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if LO_FP32:
            acc = tl.dot(h * scaling, bt.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot((h * scaling).to(y_ptr.dtype.element_ty), bt.to(y_ptr.dtype.element_ty), acc,
                         input_precision=DOT_PRECISION)
        if STORE_H:
            if pid_n == 0:
                tl.store(h_ptr + rm64[:, None] * stride_hm + rr[None, :] * stride_hr, h,
                         mask=m_mask[:, None] & r_mask[None, :])
    if HAS_BIAS:
        bias = tl.load(bias_ptr + e64 * stride_biase + rn * stride_biasn, mask=n_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm64[:, None] * stride_ym + rn[None, :] * stride_yn
    out_mask = m_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


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
# Configs: a short autotune list on a GPU, one small config under the interpreter or with FASTLORA_AUTOTUNE=0
# --------------------------------------------------------------------------------------------------------------

def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _autotune_enabled() -> bool:
    return not _interpreted() and os.environ.get("FASTLORA_AUTOTUNE", "1") not in ("", "0")


def _esize(t) -> int:
    return t.element_size() if isinstance(t, torch.Tensor) else 2


def gemm_resources(cfg, args) -> int:
    """Shared memory (bytes) of a pipelined grouped GEMM config: per stage an x tile, a W tile and an A tile."""
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    es = _esize(args.get("x_ptr"))
    lo = 4 if args.get("LO_FP32") else es
    per_stage = bm * bk * es + bk * bn * es * bool(args.get("HAS_BASE", True))
    per_stage += bk * args["R_BLOCK"] * lo * bool(args.get("HAS_LORA", True))
    epilogue = args["R_BLOCK"] * bn * lo
    return max(cfg.num_stages - 1, 1) * per_stage + epilogue


def outer_resources(cfg, args) -> int:
    bm, bn, bj = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_J"]
    es = 4 if args.get("DOT_FP32") else _esize(args.get("p_ptr"))
    return max(cfg.num_stages - 1, 1) * (bm * bn + bm * bj) * es


def _prune(resources):
    def prune(configs, named_args, **kwargs):
        args = dict(named_args, **kwargs)
        kept = [c for c in configs if resources(c, args) <= SMEM_LIMIT]
        return kept or [min(configs, key=lambda c: resources(c, args))]
    return prune


def _gemm_configs():
    if not _autotune_enabled():
        return [triton.Config({"BLOCK_M": 16 if _interpreted() else 64, "BLOCK_N": 32 if _interpreted() else 128,
                               "BLOCK_K": 32 if _interpreted() else 64}, num_warps=4, num_stages=3)]
    out = []
    for bm, bn, bk, w, s in ((64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4),
                             (128, 256, 64, 8, 3), (64, 128, 32, 4, 4)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s))
    return out


def _outer_configs():
    if not _autotune_enabled():
        return [triton.Config({"BLOCK_M": 16 if _interpreted() else 64, "BLOCK_N": 32 if _interpreted() else 64,
                               "BLOCK_J": 16 if _interpreted() else 64}, num_warps=4, num_stages=3)]
    out = []
    for bm, bn, bj, w, s in ((64, 64, 64, 4, 3), (32, 128, 64, 4, 3), (64, 128, 128, 8, 3), (128, 64, 32, 4, 3),
                             (64, 64, 16, 4, 4)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_J": bj}, num_warps=w, num_stages=s))
    return out


def _bucket(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


_GEMM = triton.autotune(configs=_gemm_configs(), key=["S_BUCKET", "N", "K", "R_BLOCK", "HAS_BASE", "HAS_LORA",
                                                      "LO_FP32"],
                        prune_configs_by={"early_config_prune": _prune(gemm_resources)})(grouped_lora_gemm_kernel)
_OUTER = triton.autotune(configs=_outer_configs(), key=["S_BUCKET", "N", "J", "E", "DOT_FP32"],
                         prune_configs_by={"early_config_prune": _prune(outer_resources)})(grouped_rows_outer_kernel)


def _dot_precision(*dtypes) -> str:
    """fp32 products follow torch: TF32 only where torch allows it for matmuls, exact IEEE products otherwise."""
    if torch.float32 in dtypes and torch.backends.cuda.matmul.allow_tf32 and _autotune_enabled():
        return "tf32"
    return "ieee"


def low_rank_fp32(dtype: torch.dtype, adapter_dtype: torch.dtype) -> bool:
    """The rank-r products take fp32 operands: fp32 inputs, or fp32 adapters (PEFT's default) on a half base."""
    return dtype == torch.float32 or adapter_dtype == torch.float32


# --------------------------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------------------------

def _launch_gemm(x, w, a, b, bias, y, h, offsets, scaling, *, has_base, accumulate):
    """One grouped-GEMM launch over all experts: y (+)= [x wᵀ + bias] + s·(x aᵀ) bᵀ; h = x aᵀ where h is given."""
    S, K = x.shape
    E, N = offsets.shape[0], y.shape[1]
    has_lora = a is not None
    R = a.shape[1] if has_lora else 0
    dummy = y
    lo_fp32 = has_lora and low_rank_fp32(x.dtype, a.dtype)
    _GEMM[lambda meta: ((triton.cdiv(S, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]),)](
        x, w if has_base else dummy, a if has_lora else dummy, b if has_lora else dummy,
        bias if bias is not None else dummy, y, h if h is not None else dummy, offsets,
        S, E, N, K, R, float(scaling),
        x.stride(0), x.stride(1),
        *(w.stride() if has_base else (0, 0, 0)),
        *(a.stride() if has_lora else (0, 0, 0)),
        *(b.stride() if has_lora else (0, 0, 0)),
        *(bias.stride() if bias is not None else (0, 0)),
        y.stride(0), y.stride(1),
        *(h.stride() if h is not None else (0, 0)),
        HAS_BASE=has_base, HAS_LORA=has_lora, HAS_BIAS=bias is not None, STORE_H=h is not None,
        ACCUMULATE=accumulate, LO_FP32=lo_fp32,
        DOT_PRECISION=_dot_precision(x.dtype, a.dtype if has_lora else x.dtype),
        R_BLOCK=max(16, triton.next_power_of_2(max(R, 1))), BLOCK_E=max(16, triton.next_power_of_2(E)),
        S_BUCKET=_bucket(S))


def _grouped_lora(x, w, a, b, bias, offsets, scaling, out_dtype, store_h):
    """(y, h): the grouped LoRA GEMM, ranks above R_BLOCK_MAX in chunks (the first launch adds the base GEMM and
    the bias, the others accumulate their rank chunk into y)."""
    S = x.shape[0]
    N = w.shape[1]
    r = a.shape[1]
    y = torch.empty(S, N, device=x.device, dtype=out_dtype)
    h = torch.empty(S, r, device=x.device, dtype=torch.float32) if store_h else None
    if S == 0:
        return y, h
    if r == 0:
        _launch_gemm(x, w, None, None, bias, y, None, offsets, 0.0, has_base=True, accumulate=False)
        return y, h
    for c0 in range(0, r, R_BLOCK_MAX):
        c1 = min(r, c0 + R_BLOCK_MAX)
        _launch_gemm(x, w, a[:, c0:c1], b[:, :, c0:c1], bias if c0 == 0 else None, y,
                     h[:, c0:c1] if h is not None else None, offsets, scaling, has_base=c0 == 0, accumulate=c0 > 0)
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
        S_BUCKET=_bucket(S))
    return out


def experts_forward(x, weight, lora_A, lora_B, bias, offsets, scaling, store_h=True):
    """(y, h): y (S, N) in x's dtype, h = x A_eᵀ (S, r) fp32 per row's expert (None unless ``store_h``)."""
    return _grouped_lora(x, weight, lora_A, lora_B, bias, offsets, scaling, x.dtype, store_h)


def experts_backward(dy, x, weight, lora_A, lora_B, h, offsets, scaling, needs):
    """(dx, dW, dA, dB, dbias) for ``needs`` = (x, weight, lora_A, lora_B, bias) flags; None where not needed.

    dx comes from the forward kernel on transposed views (its h' = dY_e B_e is dh / s); dA, dB, dW and dbias from
    the per-expert outer-product kernel."""
    need_x, need_w, need_a, need_b, need_bias = needs
    E, N, K = weight.shape
    r = lora_A.shape[1]
    dy = dy.contiguous() if dy.stride(-1) != 1 else dy
    dx = dw = da = db = dbias = None
    hp = None
    if need_x or need_a:
        if need_x:
            dx, hp = _grouped_lora(dy, weight.transpose(1, 2), lora_B.transpose(1, 2), lora_A.transpose(1, 2), None,
                                   offsets, scaling, x.dtype, store_h=True)
        else:  # dh alone: the rank-r shrink of dY, no base GEMM
            hp = torch.empty(dy.shape[0], r, device=dy.device, dtype=torch.float32)
            _rows_outer_shrink(dy, lora_A, lora_B, hp, offsets)
    if need_a:
        da = torch.empty(E, r, K, device=x.device, dtype=lora_A.dtype)
        _rows_outer(x, hp, da.transpose(1, 2), offsets, scaling)  # dA_eᵀ = x_eᵀ (s·h'_e)
    if need_b or need_bias:
        db_out = (torch.empty(E, N, r, device=x.device, dtype=lora_B.dtype) if need_b else None)
        dbias = torch.empty(E, N, device=x.device, dtype=torch.float32) if need_bias else None
        if need_b:
            _rows_outer(dy, h, db_out, offsets, scaling, colsum=dbias)
        else:
            _rows_outer(dy, h[:, :1], torch.empty(E, N, 1, device=x.device, dtype=torch.float32), offsets, 0.0,
                        colsum=dbias)
        db = db_out
    if need_w:
        dw = torch.empty(E, N, K, device=x.device, dtype=weight.dtype)
        _rows_outer(dy, x, dw, offsets, 1.0)
    return dx, dw, da, db, dbias


def _rows_outer_shrink(dy, lora_A, lora_B, hp, offsets):
    """h' = dY_e B_e for every row: the dx GEMM's rank term without its base GEMM (dA needed, x frozen). The
    launch writes its y into a one-column scratch, which nothing reads."""
    S = dy.shape[0]
    r = lora_B.shape[2]
    scratch = torch.empty(S, 1, device=dy.device, dtype=torch.float32)
    for c0 in range(0, r, R_BLOCK_MAX):
        c1 = min(r, c0 + R_BLOCK_MAX)
        _launch_gemm(dy, None, lora_B[:, :, c0:c1].transpose(1, 2), lora_A[:, c0:c1, :1].transpose(1, 2), None,
                     scratch, hp[:, c0:c1], offsets, 0.0, has_base=False, accumulate=False)
