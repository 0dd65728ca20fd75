"""Philox dropout for the LoRA branch: the keep mask is a pure function of (seed, row, column), so every kernel
that needs it (the forward's shrink, the backward's dX epilogue and dA) regenerates the forward's mask bit for
bit, and nothing of size (M, K) is ever stored.

Counter layout: Philox-4x32 with key = seed and counter = (column // 4, row, 0, 0). One call yields four 32-bit
words, used for four neighbouring columns, so a tile costs one Philox call per four elements. Row and column
stay below 2³² on their own, so nothing overflows however large M·K is. An element is kept when its word is
>= round(p · 2³²), which has probability 1 - p up to 2⁻³².
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import on_device

__all__ = ["PHILOX_ROUNDS", "dropout_threshold", "philox_keep", "dropout_keep_mask"]

# Philox-4x32-7 passes BigCrush (Salmon et al., SC'11); 7 rounds instead of the default 10 cut the integer work
# of the mask by 30%, which matters because the mask is regenerated three times per training step.
PHILOX_ROUNDS = 7


def dropout_threshold(p: float) -> int:
    """The uint32 threshold below which a Philox word drops its element."""
    return min(int(round(float(p) * 2.0**32)), 2**32 - 1)


def dropout_args(p: float):
    """(Philox threshold, 1/(1-p)) of a dropout probability, as the kernels take them; (0, 1.0) without dropout."""
    if p > 0.0:
        return dropout_threshold(p), 1.0 / (1.0 - p)
    return 0, 1.0


@triton.jit
def philox_keep(seed, thr, rows, col_start, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                N_ROUNDS: tl.constexpr):
    """(BLOCK_ROWS, BLOCK_COLS) keep mask for rows ``rows`` (BLOCK_ROWS,) and columns
    ``col_start + arange(BLOCK_COLS)``; ``col_start`` must be a multiple of 4."""
    quads = col_start // 4 + tl.arange(0, BLOCK_COLS // 4)
    zero = tl.zeros((BLOCK_ROWS, BLOCK_COLS // 4), dtype=tl.uint32)
    c0 = quads[None, :].to(tl.uint32) + zero
    c1 = rows[:, None].to(tl.uint32) + zero
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, zero, zero, N_ROUNDS)
    # (R, C/4, 2, 2) -> (R, C): four words per quad of columns, in a fixed order
    words = tl.reshape(tl.join(tl.join(w0, w1), tl.join(w2, w3)), (BLOCK_ROWS, BLOCK_COLS))
    return words >= thr.to(tl.uint32)


@triton.jit(do_not_specialize=["seed", "thr"])
def _keep_mask_kernel(out_ptr, M, K, stride_om, stride_ok, seed, thr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, N_ROUNDS: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = philox_keep(seed, thr, offs_m, pid_k * BLOCK_K, BLOCK_M, BLOCK_K, N_ROUNDS)
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_k.to(tl.int64)[None, :] * stride_ok
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


def dropout_keep_mask(seed: int, shape, p: float, device, dtype=torch.bool) -> torch.Tensor:
    """Materialize the kernels' keep mask (True = kept) for an (M, K) input: for tests, never used by the op."""
    M, K = (int(s) for s in shape)
    device = torch.device(device)
    out = torch.empty((M, K), dtype=torch.int8, device=device)
    if p <= 0.0:
        out.fill_(1)
    elif M > 0 and K > 0:
        grid = (triton.cdiv(M, 32), triton.cdiv(K, 64))
        with on_device(device):
            _keep_mask_kernel[grid](out, M, K, out.stride(0), out.stride(1), int(seed), dropout_threshold(p),
                                    BLOCK_M=32, BLOCK_K=64, N_ROUNDS=PHILOX_ROUNDS)
    return out.bool() if dtype == torch.bool else out.to(dtype)
