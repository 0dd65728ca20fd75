r"""Triton kernels for DoRA's extra pieces; the GEMMs are fastlora's LoRA kernels (``lora_linear.py``).

The math is derived in ``fastlora.dora``. Shapes: x (M, K), W (N, K), A (r, K), B (N, r), g = m / n (N,).

1. ``dora_norm_kernel``      n_i = sqrt(max(0, ‖W_i‖² + 2s·B_i·(W Aᵀ)_i + s²·B_i (A Aᵀ) B_iᵀ)): one pass over W,
                             W Aᵀ accumulated in fp32 per row tile and consumed in registers (never stored);
                             ‖W_i‖² from the same tiles unless the caller has it cached. B A is never formed.
2. ``dora_scale_kernel``     forward epilogue: y = g ⊙ z + b, or with dropout z = y' − t, y = t + b + g ⊙ z
                             (z written over y', y over t): one read and one write per (M, N) element.
3. ``dora_grad_scale_kernel`` backward prologue, one pass over dY (and z): dZ = g ⊙ dY, F = dY − dZ,
                             Σ_rows dY ⊙ z and Σ_rows dY as per-split fp32 partials (summed deterministically).
4. ``dropout_scale_kernel``  out (+)= x ⊙ (keep ? keep_scale : drop_scale), the keep mask regenerated from the
                             Philox seed (``dropout.philox_keep``: the LoRA kernels' mask, bit for bit).

Conventions as in ``lora_linear.py``: explicit strides, masked loads/stores, int64 offsets, fp32 arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common as kc
from .dropout import PHILOX_ROUNDS, dropout_threshold, philox_keep

__all__ = ["dora_weight_norm", "scale_columns", "grad_scale", "dropout_scale"]


def _r_block(r: int) -> int:
    """Rank chunk of the norm kernel: W is read once per chunk. 64 in the interpreter, so that the tests'
    r = 70 exercises the chunked path; 128 on GPU (a (32, 128) fp32 tile is 32 registers a thread)."""
    return kc.r_block(r, 64 if kc.interpreted() else 128)


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------

@triton.jit
def dora_norm_kernel(
    w_ptr, a_ptr, b_ptr, aat_ptr, sq_ptr, norm_ptr,
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, stride_aat,
    scaling,
    NEED_SQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_BLOCK: tl.constexpr,
):
    """norm[rows] (fp32) of W + s·B A, for a tile of BLOCK_N rows; the rank runs in chunks of R_BLOCK (W is
    read once per chunk). With NEED_SQ, ‖W_i‖² is accumulated from the first chunk's tiles and stored."""
    pid = tl.program_id(0)
    cdt = w_ptr.dtype.element_ty
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_BLOCK)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    cross = tl.zeros((BLOCK_N,), dtype=tl.float32)
    quad = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, R, R_BLOCK):
        rr = r0 + offs_r
        r_ok = rr < R
        wa = tl.zeros((BLOCK_N, R_BLOCK), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            kk = k + offs_k
            k_ok = kk < K
            w = tl.load(w_ptr + rows[:, None] * stride_wn + kk.to(tl.int64)[None, :] * stride_wk,
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            # Aᵀ tile (BLOCK_K, R_BLOCK)
            a = tl.load(a_ptr + rr.to(tl.int64)[None, :] * stride_ar + kk.to(tl.int64)[:, None] * stride_ak,
                        mask=r_ok[None, :] & k_ok[:, None], other=0.0)
            wa = tl.dot(w, a.to(cdt), wa, input_precision="ieee")
            if NEED_SQ:
                if r0 == 0:
                    wf = w.to(tl.float32)
                    sq += tl.sum(wf * wf, axis=1)
        b = tl.load(b_ptr + rows[:, None] * stride_bn + rr.to(tl.int64)[None, :] * stride_br,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        cross += tl.sum(b * wa, axis=1)
        # quad_i = Σ_{r,r'} B_ir (AAᵀ)_rr' B_ir': this chunk's columns r against every chunk r'
        p = tl.zeros((BLOCK_N, R_BLOCK), dtype=tl.float32)
        for r1 in range(0, R, R_BLOCK):
            r1s = r1 + offs_r
            r1_ok = r1s < R
            b1 = tl.load(b_ptr + rows[:, None] * stride_bn + r1s.to(tl.int64)[None, :] * stride_br,
                         mask=n_ok[:, None] & r1_ok[None, :], other=0.0).to(tl.float32)
            aat = tl.load(aat_ptr + r1s.to(tl.int64)[:, None] * stride_aat + rr.to(tl.int64)[None, :],
                          mask=r1_ok[:, None] & r_ok[None, :], other=0.0)
            p = tl.dot(b1, aat, p, input_precision="ieee")
        quad += tl.sum(p * b, axis=1)
    if not NEED_SQ:
        sq = tl.load(sq_ptr + offs_n, mask=n_ok, other=0.0)
    n2 = sq + (2.0 * scaling) * cross + (scaling * scaling) * quad
    tl.store(norm_ptr + offs_n, tl.sqrt(tl.maximum(n2, 0.0)), mask=n_ok)
    if NEED_SQ:
        tl.store(sq_ptr + offs_n, sq, mask=n_ok)


@triton.jit
def dora_scale_kernel(
    z_ptr, g_ptr, bias_ptr, rest_ptr, y_ptr,
    M, N,
    stride_zm, stride_zn, stride_rm, stride_rn, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_REST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y = g ⊙ z + b; with HAS_REST: z ← z − rest (stored back) and y = rest + b + g ⊙ z. fp32 arithmetic."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    cols = offs_n.to(tl.int64)[None, :]
    z_ptrs = z_ptr + offs_m[:, None] * stride_zm + cols * stride_zn
    z = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs_n, mask=offs_n < N, other=0.0)
    if HAS_REST:
        rest = tl.load(rest_ptr + offs_m[:, None] * stride_rm + cols * stride_rn, mask=mask, other=0.0)
        rest = rest.to(tl.float32)
        z = z - rest
        tl.store(z_ptrs, z.to(z_ptr.dtype.element_ty), mask=mask)
        y = rest + g[None, :] * z
    else:
        y = g[None, :] * z
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + cols * stride_yn, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "rows_per_split"])
def dora_grad_scale_kernel(
    dy_ptr, z_ptr, g_ptr, dz_ptr, rest_ptr, dg_ptr, dsum_ptr,
    M, N, rows_per_split,
    stride_dym, stride_dyn, stride_zm, stride_zn, stride_dzm, stride_dzn, stride_rm, stride_rn,
    stride_ps,
    NEED_DZ: tl.constexpr, NEED_REST: tl.constexpr, NEED_DG: tl.constexpr, NEED_DSUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """For a column tile and a range of rows: dZ = g ⊙ dY, rest = dY − dZ, and the partial column sums
    Σ dY ⊙ z and Σ dY of these rows into row ``split`` of the (splits, N) fp32 partials."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    cols = offs_n.to(tl.int64)[None, :]
    g = tl.load(g_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    acc_dg = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    for m in range(m_start, m_end, BLOCK_M):
        offs_m = (m + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (offs_m[:, None] < m_end) & n_ok[None, :]
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + cols * stride_dyn, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        if NEED_DZ:
            tl.store(dz_ptr + offs_m[:, None] * stride_dzm + cols * stride_dzn,
                     (g * dy).to(dz_ptr.dtype.element_ty), mask=mask)
        if NEED_REST:
            tl.store(rest_ptr + offs_m[:, None] * stride_rm + cols * stride_rn,
                     ((1.0 - g) * dy).to(rest_ptr.dtype.element_ty), mask=mask)
        if NEED_DG:
            z = tl.load(z_ptr + offs_m[:, None] * stride_zm + cols * stride_zn, mask=mask, other=0.0)
            acc_dg += tl.sum(dy * z.to(tl.float32), axis=0)
        if NEED_DSUM:
            acc_sum += tl.sum(dy, axis=0)
    if NEED_DG:
        tl.store(dg_ptr + pid_s * stride_ps + offs_n, acc_dg, mask=n_ok)
    if NEED_DSUM:
        tl.store(dsum_ptr + pid_s * stride_ps + offs_n, acc_sum, mask=n_ok)


@triton.jit(do_not_specialize=["M", "seed", "drop_thr"])
def dropout_scale_kernel(
    x_ptr, out_ptr,
    M, K,
    stride_xm, stride_xk, stride_om, stride_ok,
    seed, drop_thr, keep_scale, drop_scale,
    ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, N_ROUNDS: tl.constexpr,
):
    """out (+)= x ⊙ (keep ? keep_scale : drop_scale), keep from Philox(seed, row, column)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    rows = offs_m.to(tl.int64)[:, None]
    cols = offs_k.to(tl.int64)[None, :]
    x = tl.load(x_ptr + rows * stride_xm + cols * stride_xk, mask=mask, other=0.0).to(tl.float32)
    keep = philox_keep(seed, drop_thr, offs_m, pid_k * BLOCK_K, BLOCK_M, BLOCK_K, N_ROUNDS)
    val = x * tl.where(keep, keep_scale, drop_scale)
    o_ptrs = out_ptr + rows * stride_om + cols * stride_ok
    if ACCUMULATE:
        val += tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, val.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------------------

def _ew_blocks():
    """(BLOCK_M, BLOCK_N, num_warps) of the elementwise kernels."""
    return (16, 32, 4) if kc.interpreted() else (32, 128, 4)


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     row_sq: torch.Tensor | None = None, return_row_sq: bool = False):
    """‖W + s·B A‖_row (N,) fp32 from one pass over W (any strides: W may be a transposed view). With
    ``row_sq`` (‖W_i‖², fp32) the kernel skips the squares; ``return_row_sq`` also returns them."""
    N, K = weight.shape
    r = lora_A.shape[0]
    dev = weight.device
    norm = torch.empty((N,), dtype=torch.float32, device=dev)
    need_sq = row_sq is None
    sq = torch.empty((N,), dtype=torch.float32, device=dev) if need_sq else row_sq.to(torch.float32).contiguous()
    A32 = lora_A.detach().to(torch.float32)
    aat = torch.mm(A32, A32.t()).contiguous()  # (r, r): tiny
    if N > 0:
        block_n, block_k = (16, 32) if kc.interpreted() else (32, 128)
        rb = _r_block(r)
        with kc.on_device(dev):
            dora_norm_kernel[(triton.cdiv(N, block_n),)](
                weight, lora_A, lora_B, aat, sq, norm,
                N, K, r,
                weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
                lora_B.stride(0), lora_B.stride(1), aat.stride(0),
                float(scaling),
                NEED_SQ=need_sq, BLOCK_N=block_n, BLOCK_K=block_k, R_BLOCK=rb,
                num_warps=4, num_stages=2,
            )
    return (norm, sq) if return_row_sq else norm


def scale_columns(z: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None, rest: torch.Tensor | None = None,
                  inplace: bool = False) -> torch.Tensor:
    """Without ``rest``: y = g ⊙ z + b (into z when ``inplace``). With ``rest``: z ← z − rest in place, and
    y = rest + b + g ⊙ z written over ``rest``. Returns y."""
    M, N = z.shape
    if rest is not None:
        y = rest
    else:
        y = z if inplace else torch.empty_like(z)
    if M and N:
        bm, bn, nw = _ew_blocks()
        g32 = g.to(torch.float32).contiguous()
        b = bias.contiguous() if bias is not None else g32
        r = rest if rest is not None else z
        with kc.on_device(z.device):
            dora_scale_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
                z, g32, b, r, y, M, N,
                z.stride(0), z.stride(1), r.stride(0), r.stride(1), y.stride(0), y.stride(1),
                HAS_BIAS=bias is not None, HAS_REST=rest is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw,
            )
    return y


def _splits(M: int, N: int, bn: int, device) -> tuple[int, int]:
    """(splits, rows_per_split) so that column tiles × row splits fill the device."""
    col_tiles = triton.cdiv(N, bn)
    sms = kc.sm_count(device, off_cuda=2)  # the interpreter: a few splits, so that the split path runs on CPU too
    splits = max(1, min(triton.cdiv(2 * sms, col_tiles), triton.cdiv(M, 64)))
    rows = triton.cdiv(M, splits)
    return triton.cdiv(M, rows), rows


def grad_scale(dy: torch.Tensor, z: torch.Tensor, g: torch.Tensor, need_dz=True, need_dg=True, need_dsum=False,
               need_rest=False):
    """(dZ = g ⊙ dY, Σ_rows dY ⊙ z fp32, Σ_rows dY fp32, dY − dZ), None for what is not asked, from one pass."""
    M, N = dy.shape
    dev = dy.device
    dz = torch.empty_like(dy) if need_dz else None
    rest = torch.empty_like(dy) if need_rest else None
    dg = dsum = None
    if M == 0 or N == 0:
        zeros = torch.zeros((N,), dtype=torch.float32, device=dev)
        return dz, (zeros if need_dg else None), (zeros.clone() if need_dsum else None), rest
    bm, bn, nw = _ew_blocks()
    splits, rows = _splits(M, N, bn, dev)
    pdg = torch.empty((splits, N), dtype=torch.float32, device=dev) if need_dg else None
    psum = torch.empty((splits, N), dtype=torch.float32, device=dev) if need_dsum else None
    g32 = g.to(torch.float32).contiguous()
    dummy = g32
    dz_a, rest_a = (t if t is not None else dy for t in (dz, rest))
    pdg_a, psum_a = (t if t is not None else dummy.view(1, -1) for t in (pdg, psum))
    with kc.on_device(dev):
        dora_grad_scale_kernel[(triton.cdiv(N, bn), splits)](
            dy, z, g32, dz_a, rest_a, pdg_a, psum_a,
            M, N, rows,
            dy.stride(0), dy.stride(1), z.stride(0), z.stride(1), dz_a.stride(0), dz_a.stride(1),
            rest_a.stride(0), rest_a.stride(1), pdg_a.stride(0) if pdg is not None else psum_a.stride(0),
            NEED_DZ=need_dz, NEED_REST=need_rest, NEED_DG=need_dg, NEED_DSUM=need_dsum,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=nw,
        )
    if need_dg:
        dg = pdg[0].clone() if splits == 1 else pdg.sum(0)
    if need_dsum:
        dsum = psum[0].clone() if splits == 1 else psum.sum(0)
    return dz, dg, dsum, rest


def dropout_scale(x: torch.Tensor, seed: int, p: float, keep_scale: float, drop_scale: float,
                  out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """out (+)= x ⊙ (keep ? keep_scale : drop_scale) with the LoRA kernels' Philox keep mask for ``seed``."""
    M, K = x.shape
    if out is None:
        out = torch.empty_like(x)
        accumulate = False
    if M and K:
        bm, bk, nw = _ew_blocks()
        with kc.on_device(x.device):
            dropout_scale_kernel[(triton.cdiv(M, bm), triton.cdiv(K, bk))](
                x, out, M, K, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
                int(seed), dropout_threshold(p), float(keep_scale), float(drop_scale),
                ACCUMULATE=accumulate, BLOCK_M=bm, BLOCK_K=bk, N_ROUNDS=PHILOX_ROUNDS, num_warps=nw,
            )
    return out
