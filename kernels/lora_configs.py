"""The autotuning configs of the LoRA kernels (``kernels/lora_kernels.py``): short lists in order of expectation,
tagged for the small-M path, and the fixed config per M class used without autotuning (the interpreter,
FASTLORA_AUTOTUNE=0). Every config passes through its kernel's prune hook (``kernels/resources.py``) before it runs;
benchmarks/NOTES.md has why each entry is there (offline sm_90 builds)."""
from __future__ import annotations

import triton

__all__ = ["cfg", "GEMM_CONFIGS", "GEMM_FIXED", "SHRINK_CONFIGS", "SHRINK_FIXED", "DY_CONFIGS", "DY_FIXED",
           "GRAD_A_CONFIGS", "GRAD_A_FIXED", "FUSED_SHRINK_MAX_M", "FUSED_SHRINK_MAX_R", "R_CHUNK_MAX"]

# The small-M path (shrink folded into the GEMM) is used up to this many rows, without dropout.
FUSED_SHRINK_MAX_M = 64
# Largest rank kept in registers by the fused shrink; above it the separate shrink kernel runs (C10 in NOTES.md).
FUSED_SHRINK_MAX_R = 32
# Rank chunk of the shrink / dY / dA kernels: larger ranks run as several programs over r.
R_CHUNK_MAX = 128


def cfg(num_warps, num_stages, small_m=False, **kwargs):
    """A config; ``small_m`` tags the ones meant for M <= FUSED_SHRINK_MAX_M (and only those run there)."""
    config = triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)
    config.fastlora_small_m = small_m
    return config


GEMM_CONFIGS = [
    # large M: tiles from Triton's matmul tutorial that do well on Ampere / Hopper
    cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
    cfg(8, 4, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    cfg(8, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),  # what fits odd K and fp32 (FMA / TF32) operands
    # small M (decode / inference): bound by reading W, so narrow N tiles give enough programs
    cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, small_m=True),
    cfg(4, 4, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, small_m=True),  # not 16×32×256 (C11)
    cfg(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, small_m=True),
    cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, small_m=True),
    cfg(4, 3, BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, small_m=True),
    cfg(8, 3, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, small_m=True),  # fp32 and odd K at small M
]
# Fixed configs, used without autotuning: tiny tiles for the interpreter (its cost grows with the tile), and one
# generally good tile for each M class on a GPU with FASTLORA_AUTOTUNE=0.
GEMM_FIXED = {
    "interpret": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=2),
    "small": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4),
    "large": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
}

# The shrink is a memory-bound pass over x: short row tiles give enough programs to fill the device.
SHRINK_CONFIGS = [
    # 8 warps (C7)
    cfg(8, 4, BLOCK_M=16, BLOCK_K=256),
    cfg(8, 3, BLOCK_M=16, BLOCK_K=64),  # large ranks with fp32 adapters at M <= 16: a short (BK, R) tile
    cfg(8, 4, BLOCK_M=32, BLOCK_K=128),
    cfg(8, 3, BLOCK_M=32, BLOCK_K=64),
    cfg(8, 4, BLOCK_M=64, BLOCK_K=64),
    cfg(8, 3, BLOCK_M=64, BLOCK_K=128),
]
SHRINK_FIXED = {  # fit every rank chunk (R_BLOCK <= 128) and adapter dtype (offline_build.py checks them)
    "interpret": dict(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=2),
    "small": dict(BLOCK_M=16, BLOCK_K=64, num_warps=8, num_stages=3),
    "large": dict(BLOCK_M=32, BLOCK_K=64, num_warps=8, num_stages=3),
}

# dY pass: taller row tiles mean fewer fp32 atomics into dB (M/BLOCK_M · N · r of them), shorter ones more
# programs for the memory-bound read of dY; the autotuner measures the trade.
DY_CONFIGS = [
    cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
    cfg(8, 3, BLOCK_M=64, BLOCK_N=64),
    cfg(4, 3, BLOCK_M=64, BLOCK_N=128),
    cfg(8, 3, BLOCK_M=128, BLOCK_N=64),  # no 128×128 (C11)
    cfg(8, 3, BLOCK_M=32, BLOCK_N=64),  # fp32 and odd N at large ranks
    cfg(8, 3, BLOCK_M=16, BLOCK_N=32),  # exact fp32 (FMA dots)
    cfg(8, 4, BLOCK_M=32, BLOCK_N=128, small_m=True),  # 8 warps (C11)
    cfg(4, 4, BLOCK_M=16, BLOCK_N=128, small_m=True),
    cfg(8, 4, BLOCK_M=16, BLOCK_N=64, small_m=True),
]
DY_FIXED = {
    "interpret": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2),
    "small": dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=4),
    "large": dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),
}

GRAD_A_CONFIGS = [  # 8 warps (C11)
    cfg(8, 3, BLOCK_M=64, BLOCK_K=64),
    cfg(8, 3, BLOCK_M=128, BLOCK_K=64),
    cfg(8, 4, BLOCK_M=64, BLOCK_K=32),
    cfg(8, 3, BLOCK_M=128, BLOCK_K=128),
    cfg(8, 3, BLOCK_M=32, BLOCK_K=32),  # exact fp32 (FMA dots)
    cfg(8, 3, BLOCK_M=16, BLOCK_K=32),
]
GRAD_A_FIXED = {
    "interpret": dict(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=2),
    "small": dict(BLOCK_M=64, BLOCK_K=32, num_warps=8, num_stages=3),
    "large": dict(BLOCK_M=64, BLOCK_K=32, num_warps=8, num_stages=3),
}
