r"""Triton kernels for the fused LoRA linear ``y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ`` and its gradients.

Shapes: x (M, K), W (N, K), A (r, K), B (N, r), b (N,), h = drop(x) Aᵀ (M, r). The math is derived in
``fastlora.autograd``. This file holds the launchers (``lora_forward`` / ``lora_backward``, the implementation behind
``fastlora.autograd.TritonLoRALinear``) and the autotuners; the kernels are in ``kernels/lora_kernels.py``, their
configs in ``kernels/lora_configs.py``, the resource model and prune hooks in ``kernels/resources.py``, the helpers
shared with the other kernel files in ``kernels/common.py``.

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
terms: ``gemm_dispatch`` (a ``kernels/dispatch.py`` MeasuredChoice) times both per problem on first use
(``FASTLORA_BASE_GEMM=auto``, the default) or follows ``FASTLORA_BASE_GEMM=triton|cublas``. Configs are pruned by a resource model (shared memory, registers)
checked against offline sm_90 builds (benchmarks/offline_build.py); ``FASTLORA_AUTOTUNE=0`` (and the
interpreter) use one fixed config per M class instead of autotuning.

"""
from __future__ import annotations

import collections
import threading

import torch
import triton

from . import common as kc
from . import lora_configs as cfgs
from . import resources as res
from .dispatch import MeasuredChoice
from .dropout import PHILOX_ROUNDS, dropout_args
from .lora_configs import FUSED_SHRINK_MAX_M, FUSED_SHRINK_MAX_R, R_CHUNK_MAX
from .lora_kernels import gemm_lora_kernel, lora_grad_a_kernel, lora_grad_dy_kernel, lora_shrink_kernel

__all__ = ["lora_forward", "lora_backward", "launch_counts", "base_gemm", "gemm_dispatch", "new_gemm_dispatch",
           "FUSED_SHRINK_MAX_M"]

# Kernel launches by name: tests read it to prove the kernels ran rather than a fallback.
launch_counts: collections.Counter = collections.Counter()


# ---------------------------------------------------------------------------------------------------------
# Autotuners: key = bucketed M, N, K, R and the flags; each kernel's configs pass through its own prune hook
# ---------------------------------------------------------------------------------------------------------

def _even_k(args):
    return args["K"] % args["BLOCK_K"] == 0


_KEY = ["M_BUCKET", "N", "K", "R", "R_BLOCK", "HAS_BIAS", "LO_DROPOUT", "FUSE_SHRINK", "STORE_L"]

# The forward (b = Wᵀ) and the dX GEMM (b = W) read their B operand in opposite layouts: two autotuners, so
# they never share a tuned config even when K = N and their other keys agree.
_gemm_fwd_tuned = triton.autotune(cfgs.GEMM_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": res.prune_gemm_lora})(
    triton.heuristics({"EVEN_K": _even_k})(gemm_lora_kernel))
_gemm_dx_tuned = triton.autotune(cfgs.GEMM_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": res.prune_gemm_lora})(
    triton.heuristics({"EVEN_K": _even_k})(gemm_lora_kernel))
_gemm_fixed = triton.heuristics({"EVEN_K": _even_k})(gemm_lora_kernel)
_shrink_tuned = triton.autotune(cfgs.SHRINK_CONFIGS, key=["M_BUCKET", "K", "R", "R_BLOCK", "HAS_DROPOUT"],
                                prune_configs_by={"early_config_prune": res.prune_lora_shrink})(
    triton.heuristics({"EVEN_K": _even_k})(lora_shrink_kernel))
_shrink_fixed = triton.heuristics({"EVEN_K": _even_k})(lora_shrink_kernel)
_dy_tuned = triton.autotune(cfgs.DY_CONFIGS, key=["M_BUCKET", "N", "R", "R_BLOCK", "NEED_DH", "NEED_DB", "NEED_DBIAS"],
                            prune_configs_by={"early_config_prune": res.prune_lora_grad_dy},
                            reset_to_zero=["db_ptr", "dbias_ptr"])(lora_grad_dy_kernel)
_grad_a_tuned = triton.autotune(cfgs.GRAD_A_CONFIGS, key=["M_BUCKET", "K", "R", "R_BLOCK", "HAS_DROPOUT"],
                                prune_configs_by={"early_config_prune": res.prune_lora_grad_a})(lora_grad_a_kernel)


BASE_GEMM_MODES = ("auto", "triton", "cublas")


def new_gemm_dispatch(timer=None) -> MeasuredChoice:
    """The measured choice of who runs the two large GEMMs (x@Wᵀ forward, dY@W backward), pinned by
    ``FASTLORA_BASE_GEMM``:

    ``triton``: the fused kernel, bias and low-rank terms in its accumulator (for M <= 64 without dropout, the
    shrink too: one launch); ``cublas``: Triton kernels write h and the bias + low-rank term, then torch.addmm_
    adds the GEMM on top, reading that term as cuBLAS's C operand (one extra read and write of (M, N));
    ``auto`` (the default): per problem, the faster of the two as measured on the first call; the fused kernel
    where nothing can be timed (the interpreter: the kernels are what is tested)."""
    return MeasuredChoice("FASTLORA_BASE_GEMM", BASE_GEMM_MODES[1:], "triton", timer)


gemm_dispatch = new_gemm_dispatch()


def base_gemm() -> str:
    """``FASTLORA_BASE_GEMM``: "auto" (measured per problem), "triton" or "cublas" (validated)."""
    return gemm_dispatch.forced() or "auto"


def _dispatch_key(op, x, weight, lora_A, r, bias, p, mb):
    """Everything that changes which composition is faster: the GEMM (forward or dX), the bucketed M, N, K, the
    rank, the dtypes, bias and dropout, the device."""
    N, K = weight.shape
    return (op, mb, N, K, r, x.dtype, lora_A.dtype, bias is not None, p > 0.0, str(x.device))


# Triton's Autotuner keeps the arguments of the call it runs in ``self.nargs`` (its reset_to_zero hook zeroes the
# tensors named there, and it clears the field when done): two threads making their first call of a key at once
# would zero each other's dB accumulators or crash on the cleared field. Autotuned launches take turns.
_AUTOTUNE_LOCK = threading.Lock()


def _launch(name, tuned, fixed_fn, fixed_cfgs, grid, m_bucket, *args, **kwargs):
    """Launch through the autotuner, or with the fixed config for the interpreter / this M class."""
    launch_counts[name] += 1
    if kc.autotune_enabled():
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
    if kc.interpreted():
        return dict(fixed_cfgs["interpret"])
    small = m_bucket <= FUSED_SHRINK_MAX_M
    meta = dict(fixed_cfgs["small" if small else "large"])
    warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
    cfg = cfgs.cfg(warps, stages, small_m=small, **meta)
    nargs = dict(zip(tuned.arg_names, args))
    kept = tuned.early_config_prune([cfg], nargs, **kwargs)
    if kept[0] is not cfg:  # it does not fit as is: the first of the tuned list that the pruning keeps
        kept = tuned.early_config_prune(tuned.configs, nargs, **kwargs)
    cfg = kept[0]
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ---------------------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------------------

def _rank_chunk(r: int, dtype: torch.dtype) -> int:
    """Rank chunk of the shrink / dY / dA kernels: up to 128, 64 for fp32 inputs (fp32 operand tiles pass through
    registers: C12 in benchmarks/NOTES.md)."""
    return kc.r_block(r, 64 if dtype == torch.float32 else R_CHUNK_MAX)


def _epilogue_r_block(r: int) -> int:
    """Rank chunk of the GEMM's low-rank prologue: 16, the smallest tl.dot step, so the (BM, 16) and (16, BN)
    operand tiles beside the (BM, BN) accumulator cost 16·(BM + BN) / threads registers: the widest tiles
    (128×256, 8 warps) fit without spilling. A larger rank loops over chunks: the same MMA work."""
    return 16


def _check(x, weight, lora_A, lora_B, bias):
    if x.dim() != 2 or weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(
            f"fastlora.kernels: x, weight, lora_A, lora_B must be 2-D, got {tuple(x.shape)}, {tuple(weight.shape)}, "
            f"{tuple(lora_A.shape)}, {tuple(lora_B.shape)}"
        )
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.dtype not in kc.SUPPORTED:
            raise TypeError(f"fastlora.kernels: {name} has dtype {t.dtype}; the kernels support fp16, bf16, fp32")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"fastlora.kernels: weight/bias dtype must match x's {x.dtype}")


def lora_forward(x, weight, lora_A, lora_B, bias, scaling: float, dropout_p: float, seed: int, save_h: bool = True):
    """y = x@Wᵀ + b + s·h@Bᵀ with h = drop(x)@Aᵀ (fp32 accumulate). Returns (y, h), h None unless ``save_h``.

    y has x's dtype; h is fp32 for half inputs (``reference.h_dtype``)."""
    _check(x, weight, lora_A, lora_B, bias)
    with kc.on_device(x.device):
        return _lora_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, save_h)


def _lora_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, save_h):
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    h_dt = torch.promote_types(x.dtype, torch.float32)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, (torch.empty((0, r), dtype=h_dt, device=x.device) if save_h else None)
    x, weight, lora_A, lora_B = (kc.kernel_view(t) for t in (x, weight, lora_A, lora_B))
    if bias is not None:
        bias = bias.contiguous()
    p = float(dropout_p)
    mb = kc.m_bucket(M)
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
    thr, inv_keep = dropout_args(p)
    _launch(
        "lora_shrink", _shrink_tuned, _shrink_fixed, cfgs.SHRINK_FIXED,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(r, _rank_chunk(r, x.dtype))), mb,
        x, lora_A, h, M, K, r,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), h.stride(0), h.stride(1),
        int(seed), thr, inv_keep, mb,
        HAS_DROPOUT=p > 0.0, R_BLOCK=_rank_chunk(r, x.dtype), DOT_PRECISION=kc.dot_precision(x.dtype),
        N_ROUNDS=PHILOX_ROUNDS,
    )


def _forward_gemm(x, weight, lora_A, lora_B, bias, y, h_arg, scaling, mb, k_loop, fuse, store_h):
    """y = [x @ Wᵀ] + bias + s·h @ Bᵀ in one Triton GEMM; ``k_loop`` False leaves x @ Wᵀ out (cuBLAS adds it);
    ``fuse``: h = x @ Aᵀ is accumulated in the same K loop (and stored when ``store_h``)."""
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    rb = kc.r_block(r, FUSED_SHRINK_MAX_R) if fuse else _epilogue_r_block(r)
    _launch(
        "gemm_lora", _gemm_fwd_tuned, _gemm_fixed, cfgs.GEMM_FIXED,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),), mb,
        # a = x (M, K); b = Wᵀ (K, N); L = h (M, r); U = Bᵀ (r, N); S = Aᵀ (K, r)
        x, weight, y, bias if bias is not None else y, h_arg, lora_B, lora_A,
        M, N, K if k_loop else 0, r,
        x.stride(0), x.stride(1), weight.stride(1), weight.stride(0), y.stride(0), y.stride(1),
        h_arg.stride(0), h_arg.stride(1), lora_B.stride(1), lora_B.stride(0), lora_A.stride(1), lora_A.stride(0),
        float(scaling), 0, 0, 1.0, mb,
        HAS_BIAS=bias is not None, LO_DROPOUT=False, FUSE_SHRINK=fuse, STORE_L=store_h,
        LO_FP32=kc.low_rank_fp32(x.dtype, lora_B.dtype),
        R_BLOCK=rb, DOT_PRECISION=kc.dot_precision(x.dtype), N_ROUNDS=PHILOX_ROUNDS,
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
    sms = kc.sm_count(device)
    programs = triton.cdiv(M, 16 if M <= FUSED_SHRINK_MAX_M else 64) * triton.cdiv(r, _rank_chunk(r, dtype))
    align = 8 if kc.interpreted() else _DY_COL_ALIGN
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
        "lora_grad_dy", _dy_tuned, lora_grad_dy_kernel, cfgs.DY_FIXED,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), splits, triton.cdiv(r, rb)), mb,
        grad_y, lora_B, h_a, dh_a, db_a, dbias_a,
        M, N, r, cols,
        grad_y.stride(0), grad_y.stride(1), lora_B.stride(0), lora_B.stride(1),
        h_a.stride(0), h_a.stride(1), dh_a.stride(0), dh_a.stride(1), dh_a.stride(2),
        db_a.stride(0), db_a.stride(1),
        float(scaling), mb,
        NEED_DH=need_dh, NEED_DB=need_db, NEED_DBIAS=need_dbias,
        LO_FP32=kc.low_rank_fp32(grad_y.dtype, lora_B.dtype), R_BLOCK=rb, DOT_PRECISION=prec,
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
    thr, inv_keep = dropout_args(p)
    nominal_bk = 64
    programs = triton.cdiv(K, nominal_bk) * triton.cdiv(r, rb)
    splits = max(1, min(triton.cdiv(2 * kc.sm_count(x.device), programs), triton.cdiv(M, 256)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), 128) * 128
    splits = triton.cdiv(M, rows_per_split)
    part = torch.empty((splits, r, K), dtype=torch.float32, device=x.device)
    _launch(
        "lora_grad_a", _grad_a_tuned, lora_grad_a_kernel, cfgs.GRAD_A_FIXED,
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
    thr, inv_keep = dropout_args(p)
    _launch(
        "gemm_lora", _gemm_dx_tuned, _gemm_fixed, cfgs.GEMM_FIXED,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),), mb,
        # a = dY (M, N); b = W (N, K); L = dh (M, r), already scaled; U = A (r, K)
        grad_y, weight, dx, dx, dh, lora_A, lora_A,
        M, K, N if k_loop else 0, r,
        grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1), dx.stride(0), dx.stride(1),
        dh.stride(0), dh.stride(1), lora_A.stride(0), lora_A.stride(1), 0, 0,
        1.0, int(seed), thr, inv_keep, mb,
        HAS_BIAS=False, LO_DROPOUT=p > 0.0, FUSE_SHRINK=False, STORE_L=False,
        LO_FP32=kc.low_rank_fp32(grad_y.dtype, lora_A.dtype),
        R_BLOCK=_epilogue_r_block(r), DOT_PRECISION=prec, N_ROUNDS=PHILOX_ROUNDS,
    )


def lora_backward(
    grad_y, x, weight, lora_A, lora_B, h, scaling: float, dropout_p: float, seed: int,
    needs_input: bool, needs_weight: bool, needs_A: bool, needs_B: bool, needs_bias: bool,
):
    """Gradients of ``lora_forward`` (derived in fastlora.autograd): (dx, dW, dA, dB, dbias), None where not
    needed; dA/dB in the adapters' dtype, the others in x's. The dropout mask is regenerated from ``seed``."""
    _check(x, weight, lora_A, lora_B, None)
    with kc.on_device(x.device):
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

    grad_y, x, weight, lora_A, lora_B = (kc.kernel_view(t) for t in (grad_y, x, weight, lora_A, lora_B))
    h = kc.kernel_view(h) if h is not None else None
    p = float(dropout_p)
    prec = kc.dot_precision(cdt)
    mb = kc.m_bucket(M)
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
            dA = _grad_a(dh, x, p, seed, prec, mb, kc.low_rank_fp32(cdt, adt)).to(adt)
        else:
            dA = torch.empty((r, 0), dtype=adt, device=dev)
    if needs_weight:
        # dW = dYᵀ x: a plain GEMM with nothing to fuse, so cuBLAS (only for a weight that requires grad)
        dW = torch.mm(grad_y.t(), x)
    return dx, dW, dA, dB, dbias
