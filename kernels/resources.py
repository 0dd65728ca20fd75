"""The resource model of the LoRA kernels: what a config needs in shared memory and registers, from the tiles it
holds, and each kernel's prune hook (``prune_gemm_lora``, ``prune_lora_shrink``, ``prune_lora_grad_dy``,
``prune_lora_grad_a``): keep the configs that fit the problem's M and sm_90's limits; when nothing fits, the config
that overflows least by the same model (``fallback``). benchmarks/offline_build.py builds every config kept over the
declared grid for sm_90 and checks the model against the cubins (shared memory, registers, spills); the rules
below that come from those builds are listed in benchmarks/NOTES.md."""
from __future__ import annotations

import os

from .lora_configs import FUSED_SHRINK_MAX_M, cfg

__all__ = ["SMEM_LIMIT", "SMEM_BUDGET", "REG_BUDGET", "gemm_resources", "shrink_resources", "dy_resources",
           "grad_a_resources", "overflow", "fits", "fallback", "prune", "prune_gemm_lora", "prune_lora_shrink",
           "prune_lora_grad_dy", "prune_lora_grad_a", "MODELS"]

SMEM_LIMIT = 227 * 1024  # H100 / H200 (sm_90): the opt-in maximum of shared memory per block
# Planned pipeline buffers may use this much; the rest is the compiler's: layout-conversion scratch, barriers
SMEM_BUDGET = SMEM_LIMIT - 16 * 1024
# fp32 values per thread that a config's live tiles may take: sm_90 allows 255 registers per thread and
# addresses, masks and loop state take the rest (calibration C1 in benchmarks/NOTES.md)
REG_BUDGET = 160
# What a config that offline builds showed to spill counts as: far over the budget, so that a fallback (the least
# overflowing config) never picks it. The rules that use it are the measured ones, C2-C9 in NOTES.md.
MEASURED_SPILL = 2 * REG_BUDGET

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
    dots, not tensor cores), TF32 (operands converted in registers), and unaligned problems (no 16-byte vector
    loads). 0 where the tiles stream through shared memory. The weights: calibration C2 in NOTES.md."""
    if esize == 4 and loop_dim in args:
        return 6.0 if args.get("DOT_PRECISION", "ieee") == "ieee" else 4.0
    return 1.5 * (storage_esize or esize) / 2 if _unaligned(args, loop_dim) else 0.0


def _fma_32_row_spill(args, esize: int, bm: int) -> bool:
    """fp32 dots on 32-row tiles of the shrink and dY kernels spill where the count says they fit (ptxas's choice,
    not a count the model sees): calibration C3 in NOTES.md."""
    return bm == 32 and esize == 4


def _pipeline_smem(c, tile_bytes: int, wgmma: bool = False) -> int:
    """Shared memory of a K loop's software pipeline: num_stages buffers of the loop's operand tiles where the dot
    runs on Hopper's wgmma (BLOCK_M >= 64, operands read from shared memory), num_stages - 1 where it runs on mma
    (operands in registers). Calibration C4 in NOTES.md."""
    return (c.num_stages if wgmma else max(1, c.num_stages - 1)) * tile_bytes


def gemm_resources(c, args):
    """(shared bytes, live fp32 values per thread) of ``gemm_lora_kernel`` under config ``c``.

    Shared memory matches sm_90 builds to the byte at the calibration points of
    tests/test_kernels_compile.py; the register count is an estimate whose budget (C1) was calibrated on them."""
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
        live = MEASURED_SPILL * _threads(c)  # C5: the fp32 (TF32) rank-r prologue at 128+ rows and 4+ stages
    if fused:
        live += _operands_in_registers(args, "K", ea, _esize(args, "s_ptr", ea)) * bk * rb
        if c.num_warps < 8 and _unaligned(args, "K"):
            live = MEASURED_SPILL * _threads(c)  # C6: the fused shrink at odd K on 4 warps
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
        live = MEASURED_SPILL * _threads(c)  # C7: short row tiles at R = 128 on 4 warps; C3
    return smem, _regs_per_thread(live, c)


def dy_resources(c, args):
    bm, bn, rb = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], args.get("R_BLOCK", 16)
    edy, eb = _esize(args, "dy_ptr", 2), _esize(args, "b_ptr", 2)
    # pipeline of dY (BM, BN) and B (BN, R) tiles, and the fp32 dB part (BN, R) re-laid out for its atomics
    smem = max(1, c.num_stages - 1) * (bm * bn * edy + bn * rb * eb) + bn * rb * 4
    # dh (BM, R) fp32 accumulator and h (BM, R) through the loop; dY (BM, BN) and, for dB, its transpose, and
    # the dB part twice: once from the dot, once in the atomics' layout (C8)
    need_db = args.get("NEED_DB", True)
    live = (2 * bm * rb + (2 * bn * rb if need_db else 0) + bm * bn * (2 if need_db else 1)
            + (bn * rb if eb != edy else 0))
    live += _operands_in_registers(args, "N", edy) * bm * bn + _operands_in_registers(args, "N", edy, eb) * bn * rb
    if _fma_32_row_spill(args, edy, bm):
        live = MEASURED_SPILL * _threads(c)
    return smem, _regs_per_thread(live, c)


def grad_a_resources(c, args):
    bm, bk, rb = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], args.get("R_BLOCK", 16)
    ex = _esize(args, "x_ptr", 2)
    lo32 = bool(args.get("LO_FP32"))
    # pipeline of dh (BM, R) fp32 and x (BM, BK) tiles, and the (masked) x operand of the dot; with fp32 operands
    # (LO_FP32: TF32 dots) the dot runs on wgmma from 64 rows, with num_stages buffers (C4)
    smem = _pipeline_smem(c, bm * rb * 4 + bm * bk * ex, wgmma=lo32 and bm >= 64) + bm * bk * ex
    live = rb * bk + bm * rb + bm * bk * (2 if args.get("HAS_DROPOUT") else 1)
    live += _operands_in_registers(args, "K", ex) * (bm * bk + bm * rb)
    if lo32 and args.get("HAS_DROPOUT") and bm == 64 and bk == 32:
        live = MEASURED_SPILL * _threads(c)  # C9: dA with fp32 operands and dropout at 64×32
    return smem, _regs_per_thread(live, c)


def overflow(resources) -> float:
    smem, regs = resources
    return max(smem / SMEM_BUDGET, regs / REG_BUDGET)


def fits(resources) -> bool:
    return overflow(resources) <= 1.0


def fallback(configs, model, args):
    """When no config fits: the one that overflows least by the resource model (``model``), with its pipeline
    shortened until it fits where that is enough. Never chosen by a single field of the config."""
    best = min(configs, key=lambda c: (overflow(model(c, args)), -c.num_warps))
    for stages in range(best.num_stages - 1, 1, -1):
        if fits(model(best, args)):
            break
        best = cfg(best.num_warps, stages, small_m=best.fastlora_small_m, **best.kwargs)
    return [best]


def fits_m_class(c, m: int) -> bool:
    """Row tiles much taller than the (bucketed) M waste the tile; small M keeps only its own short-tile configs
    (tagged small_m) and large M only the others."""
    return c.kwargs["BLOCK_M"] <= max(16, m) and c.fastlora_small_m == (m <= FUSED_SHRINK_MAX_M)


def autotune_top_k() -> int:
    """``FASTLORA_AUTOTUNE_TOP_K=k`` (> 0) benchmarks only the first k configs that fit (the lists are in order of
    expectation): a bounded first run, e.g. in gpu_check.sh. 0 (the default): all of them."""
    try:
        return max(0, int(os.environ.get("FASTLORA_AUTOTUNE_TOP_K", "0")))
    except ValueError:
        raise ValueError("FASTLORA_AUTOTUNE_TOP_K must be an integer") from None


def prune(configs, args, model, fits_m):
    keep = [c for c in configs if fits_m(c) and fits(model(c, args))]
    if not keep:  # nothing fits M and the resources: the least overflowing of those that fit M, else of all
        keep = fallback([c for c in configs if fits_m(c)] or configs, model, args)
    top = autotune_top_k()
    return keep[:top] if top else keep


def prune_gemm_lora(configs, named_args, **kwargs):
    """``gemm_lora_kernel``'s prune hook: keep configs that fit M, shared memory and the register file
    (``gemm_resources``)."""
    args = {**named_args, **kwargs}
    m = args["M_BUCKET"]
    keep = prune(configs, args, gemm_resources, lambda c: fits_m_class(c, m))
    # K = 0 (the cuBLAS composition): the kernel only writes the low-rank term, nothing worth tuning
    return keep[-1:] if args["K"] == 0 else keep


def _prune_rank_kernel(configs, named_args, kwargs, model, tagged: bool):
    args = {**named_args, **kwargs}
    m = args["M_BUCKET"]
    if tagged:  # configs tagged for the small-M class (the dY pass)
        def fits_m(c):
            return fits_m_class(c, m)
    else:  # row tiles no taller than the bucketed M
        def fits_m(c):
            return c.kwargs["BLOCK_M"] <= max(16, m)
    return prune(configs, args, model, fits_m)


def prune_lora_shrink(configs, named_args, **kwargs):
    """``lora_shrink_kernel``'s prune hook (``shrink_resources``)."""
    return _prune_rank_kernel(configs, named_args, kwargs, shrink_resources, tagged=False)


def prune_lora_grad_dy(configs, named_args, **kwargs):
    """``lora_grad_dy_kernel``'s prune hook (``dy_resources``)."""
    return _prune_rank_kernel(configs, named_args, kwargs, dy_resources, tagged=True)


def prune_lora_grad_a(configs, named_args, **kwargs):
    """``lora_grad_a_kernel``'s prune hook (``grad_a_resources``)."""
    return _prune_rank_kernel(configs, named_args, kwargs, grad_a_resources, tagged=False)


# The resource model of each kernel, by its launch name (offline_build.py, tests)
MODELS = {"gemm_lora": gemm_resources, "lora_shrink": shrink_resources, "lora_grad_dy": dy_resources,
          "lora_grad_a": grad_a_resources}
