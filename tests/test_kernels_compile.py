"""Compile every kind of kernel for an H100 (sm_90) without a GPU.

The interpreter lane runs the kernels' math but not Triton's compiler: layouts, tl.join/reshape, atomics,
constexpr branches and register allocation are only exercised by a real build. Triton compiles to a cubin
offline (its wheel ships ptxas), so CI checks here that each variant builds, uses Hopper's wgmma tensor-core
instructions and gets its K loop software-pipelined (more than one stage of shared memory), specialized the way
a launch on contiguous, 16-byte-aligned tensors is. Skipped with CUDA present (real launches compile there).

The interpreter lane's conftest sets TRITON_INTERPRET=1, under which Triton cannot compile: the builds run in a
child process (this file run as a script), one per test.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="real launches compile the kernels on CUDA")


def _child(check: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, check], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, f"{check} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _build(fn, types, consts, unit=(), div=(), num_warps=4, num_stages=3):
    """Compile ``fn`` with the given scalar/pointer types and constexprs; args in ``unit`` specialized to 1,
    pointers and args in ``div`` marked 16-divisible (what the JIT sees for aligned contiguous tensors)."""
    consts = dict(consts, **{name: 1 for name in unit})
    names = fn.arg_names
    signature = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]]
             for n in names if n not in consts and (n.endswith("_ptr") or n in div)}
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    return triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _gemm_types(dt):
    return dict(a_ptr=f"*{dt}", b_ptr=f"*{dt}", c_ptr=f"*{dt}", bias_ptr=f"*{dt}", l_ptr="*fp32", u_ptr="*fp32",
                s_ptr="*fp32", scaling="fp32", inv_keep="fp32", drop_thr="u32")


GEMM_VARIANTS = {
    # name: (dtype, flags, tile, warps, stages, operand layout)
    "forward": ("bf16", dict(HAS_BIAS=True, LO_DROPOUT=False, FUSE_SHRINK=False, STORE_L=False, R_BLOCK=16),
                (128, 256, 64), 8, 3, "fwd"),
    "dx_masked": ("bf16", dict(HAS_BIAS=False, LO_DROPOUT=True, FUSE_SHRINK=False, STORE_L=False, R_BLOCK=16),
                  (128, 128, 64), 8, 3, "dx"),
    "small_m_fused": ("fp16", dict(HAS_BIAS=True, LO_DROPOUT=False, FUSE_SHRINK=True, STORE_L=True, R_BLOCK=64),
                      (16, 64, 128), 4, 4, "fwd"),
    "fp32_tf32": ("fp32", dict(HAS_BIAS=True, LO_DROPOUT=False, FUSE_SHRINK=False, STORE_L=False, R_BLOCK=16),
                  (128, 128, 32), 8, 3, "fwd"),
    # fp16 base, fp32 adapters: the rank-r products take fp32 (TF32) operands, s*h kept out of fp16's range
    "fp16_lo_fp32": ("fp16", dict(HAS_BIAS=True, LO_DROPOUT=False, FUSE_SHRINK=True, STORE_L=True, R_BLOCK=16,
                                  LO_FP32=True), (64, 128, 64), 4, 3, "fwd"),
}


@pytest.mark.parametrize("variant", list(GEMM_VARIANTS))
def test_gemm_lora_kernel_builds_for_sm90(variant):
    _child(variant)


def test_rank_kernels_build_for_sm90():
    """Shrink (with dropout), the one-pass dY kernel (dh, dB and dbias with atomics), dA (with dropout)."""
    _child("rank_kernels")


def check_gemm(variant):
    from fastlora.kernels import lora_linear as kl

    dt, flags, (bm, bn, bk), warps, stages, layout = GEMM_VARIANTS[variant]
    consts = dict(dict(LO_FP32=False), **flags, EVEN_K=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, N_ROUNDS=7,
                  DOT_PRECISION="tf32" if dt == "fp32" else "ieee")
    if layout == "fwd":  # a = x, b = Wᵀ, U = Bᵀ, S = Aᵀ
        unit = ["stride_ak", "stride_bk", "stride_cn", "stride_lr", "stride_ur", "stride_sk"]
        div = ["N", "K", "stride_am", "stride_bn", "stride_cm", "stride_un", "stride_sr", "stride_lm"]
    else:  # a = dY, b = W, U = A
        unit = ["stride_ak", "stride_bn", "stride_cn", "stride_lr", "stride_un"]
        div = ["N", "K", "stride_am", "stride_bk", "stride_cm", "stride_ur", "stride_lm"]
    k = _build(kl.gemm_lora_kernel, _gemm_types(dt), consts, unit, div, warps, stages)
    ptx = k.asm["ptx"]
    if bm >= 64:
        assert "wgmma" in ptx, "the GEMM does not use Hopper's wgmma"
    assert "cp.async" in ptx, "tiles are not loaded asynchronously"
    esize = 4 if dt == "fp32" else 2
    one_stage = (bm * bk + bk * bn) * esize
    assert k.metadata.shared > one_stage, "the K loop is not software-pipelined"


def check_rank_kernels():
    for lo_fp32 in (False, True):
        _check_rank_kernels("fp16" if lo_fp32 else "bf16", lo_fp32)


def _check_rank_kernels(dt, lo_fp32):
    """``lo_fp32``: an fp16 base with fp32 adapters, whose rank-r products take fp32 operands."""
    from fastlora.kernels import lora_linear as kl

    k = _build(kl.lora_shrink_kernel, dict(x_ptr=f"*{dt}", a_ptr="*fp32", h_ptr="*fp32", inv_keep="fp32"),
               dict(HAS_DROPOUT=True, EVEN_K=True, BLOCK_M=32, BLOCK_K=64, R_BLOCK=16, DOT_PRECISION="ieee",
                    N_ROUNDS=7),
               ["stride_xk", "stride_ak", "stride_hr"], ["K", "stride_xm", "stride_ar", "stride_hm"])
    assert "cp.async" in k.asm["ptx"]
    k = _build(kl.lora_grad_dy_kernel,
               dict(dy_ptr=f"*{dt}", b_ptr="*fp32", h_ptr="*fp32", dh_ptr="*fp32", db_ptr="*fp32",
                    dbias_ptr="*fp32", scaling="fp32"),
               dict(NEED_DH=True, NEED_DB=True, NEED_DBIAS=True, BLOCK_M=64, BLOCK_N=64, R_BLOCK=128,
                    DOT_PRECISION="ieee", LO_FP32=lo_fp32),
               ["stride_dyn", "stride_br", "stride_hr", "stride_dhr", "stride_dbr"],
               ["N", "stride_dym", "stride_bn", "stride_hm", "stride_dhm", "stride_dbn"], num_warps=8)
    assert "red.global" in k.asm["ptx"] or "atom.global" in k.asm["ptx"], "no atomics for dB / dbias"
    _build(kl.lora_grad_a_kernel, dict(dh_ptr="*fp32", x_ptr=f"*{dt}", out_ptr="*fp32", inv_keep="fp32"),
           dict(HAS_DROPOUT=True, BLOCK_M=64, BLOCK_K=64, R_BLOCK=16, DOT_PRECISION="ieee", N_ROUNDS=7,
                LO_FP32=lo_fp32),
           ["stride_dhr", "stride_xk", "stride_ok"], ["K", "stride_xm", "stride_dhm", "stride_or", "stride_os"])


def test_every_kept_config_of_the_ci_grid_builds_within_sm90_limits():
    """benchmarks/offline_build.py's CI slice: every M class (1, 64, 2048), r = 128 and 256, fp32 adapters on
    bf16, dropout 0 / 0.1, bias, forward, inference and backward with both base-GEMM compositions; per launch the
    configs the pruning keeps that need the most shared memory and registers, and the fixed ones. Each must
    fit in 227 KB of shared memory and spill nothing."""
    import importlib.util

    if importlib.util.find_spec("triton.backends.compiler") is None:
        pytest.skip("this Triton cannot compile offline")
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "offline_build.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script, "--grid", "ci", "--jobs", "2"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"offline builds failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "0 failing" in proc.stdout


# ---------------------------------------------------------------------------------------------------------
# The resource model itself (pure Python): what the pruning keeps fits, and the fallback is the model's
# ---------------------------------------------------------------------------------------------------------

def _meta(dtype):
    return torch.empty(1, dtype=dtype, device="meta")


def test_finding_1_the_decode_shrink_config_that_crashed_is_priced_right_and_never_kept():
    """M <= 16, r = 128, fp32 adapters on bf16: the old fallback (16×256, 4 stages) needs 408 KB of shared
    memory (measured in an sm_90 build); the model prices it the same and the pruning no longer keeps it."""
    from fastlora.kernels import lora_configs as cfgs
    from fastlora.kernels import resources as res

    old = next(c for c in cfgs.SHRINK_CONFIGS if c.kwargs == {"BLOCK_M": 16, "BLOCK_K": 256})
    args = dict(M_BUCKET=16, R_BLOCK=128, x_ptr=_meta(torch.bfloat16), a_ptr=_meta(torch.float32),
                HAS_DROPOUT=False)
    smem, _ = res.shrink_resources(old, args)
    assert smem == 3 * (16 * 256 * 2 + 256 * 128 * 4) == 408 * 1024
    kept = res.prune_lora_shrink(cfgs.SHRINK_CONFIGS, args)
    assert old not in kept and kept
    assert all(res.shrink_resources(c, args)[0] <= res.SMEM_LIMIT for c in kept)
    # as the launch sees it (bf16 dot, aligned K): the 8-warp 16×64 config that builds in 68 KB without spills
    # is kept on its merits, not as a fallback
    launch = dict(args, K=4096, stride_xm=4096, stride_ar=4096, DOT_PRECISION="ieee")
    assert any(c.kwargs == {"BLOCK_M": 16, "BLOCK_K": 64} and res.fits(res.shrink_resources(c, launch))
               for c in res.prune_lora_shrink(cfgs.SHRINK_CONFIGS, launch))


def test_fallback_is_chosen_by_the_resource_model_not_by_one_field():
    from fastlora.kernels import lora_configs as cfgs
    from fastlora.kernels import resources as res

    args = dict(M_BUCKET=4096, R_BLOCK=128, x_ptr=_meta(torch.float32), a_ptr=_meta(torch.float32),
                HAS_DROPOUT=True)
    too_big = [cfgs.cfg(4, 6, BLOCK_M=16, BLOCK_K=512), cfgs.cfg(8, 5, BLOCK_M=64, BLOCK_K=128)]
    assert not any(res.fits(res.shrink_resources(c, args)) for c in too_big)
    (chosen,) = res.prune_lora_shrink(too_big, args)
    # the smallest BLOCK_M (the old rule) overflows most; the model picks the other and shortens its pipeline
    assert chosen.kwargs == {"BLOCK_M": 64, "BLOCK_K": 128} and chosen.num_stages < 5
    assert res.fits(res.shrink_resources(chosen, args))


# Shared memory of sm_90 builds (triton 3.9 and 3.6 agree), by benchmarks/offline_build.py: (kernel, config
# (BM, BN or None, BK or None, warps, stages), R_BLOCK, input dtype, adapter dtype, flags) -> bytes
SMEM_MEASURED = [
    ("shrink", (16, None, 256, 4, 4), 128, torch.bfloat16, torch.float32, {}, 417792),  # finding 1: the crash
    ("shrink", (16, None, 64, 8, 3), 128, torch.bfloat16, torch.float32, {}, 69632),
    ("shrink", (16, None, 64, 8, 3), 128, torch.bfloat16, torch.float32, {"HAS_DROPOUT": True}, 71680),
    ("shrink", (64, None, 128, 8, 3), 128, torch.bfloat16, torch.float32, {}, 212992),
    ("shrink", (64, None, 64, 4, 4), 128, torch.bfloat16, torch.float32, {}, 147456),
    ("gemm", (16, 64, 128, 4, 4), 16, torch.bfloat16, torch.float32, {"FUSE_SHRINK": True}, 86016),  # finding 2
    ("gemm", (16, 32, 256, 4, 4), 16, torch.bfloat16, torch.float32, {"FUSE_SHRINK": True}, 122880),
    ("gemm", (128, 128, 64, 4, 4), 16, torch.bfloat16, torch.float32, {}, 131072),
    ("gemm", (256, 128, 64, 8, 4), 16, torch.bfloat16, torch.float32, {}, 196608),
    ("gemm", (32, 128, 128, 4, 3), 16, torch.bfloat16, torch.float32, {}, 81920),
    ("gemm", (128, 128, 32, 8, 3), 16, torch.bfloat16, torch.float32, {"LO_DROPOUT": True}, 49152),
    ("dy", (64, 64, None, 8, 3), 128, torch.bfloat16, torch.float32, {"NEED_DB": True}, 114688),
    ("grad_a", (64, None, 64, 4, 3), 128, torch.bfloat16, torch.float32, {}, 90112),
]


@pytest.mark.parametrize("case", SMEM_MEASURED, ids=lambda c: f"{c[0]}-{c[1]}-R{c[2]}-{c[6]}")
def test_resource_model_prices_shared_memory_as_measured_builds(case):
    """The model's shared memory is never below a measured sm_90 build and at most 8 KB above it."""
    from fastlora.kernels import lora_configs as cfgs
    from fastlora.kernels import resources as res

    kind, (bm, bn, bk, warps, stages), rb, dt, adt, flags, measured = case
    tile = {"BLOCK_M": bm, **({"BLOCK_N": bn} if bn else {}), **({"BLOCK_K": bk} if bk else {})}
    c = cfgs.cfg(warps, stages, **tile)
    x, a = _meta(dt), _meta(adt)
    args = dict(R_BLOCK=rb, **flags)
    args.update({"gemm": dict(a_ptr=x, s_ptr=a, u_ptr=a), "shrink": dict(x_ptr=x, a_ptr=a),
                 "dy": dict(dy_ptr=x, b_ptr=a, h_ptr=_meta(torch.float32)),
                 "grad_a": dict(dh_ptr=_meta(torch.float32), x_ptr=x)}[kind])
    model = {"gemm": res.gemm_resources, "shrink": res.shrink_resources, "dy": res.dy_resources,
             "grad_a": res.grad_a_resources}[kind]
    smem, _ = model(c, args)
    assert measured <= smem <= measured + 8 * 1024, (smem, measured)


@pytest.mark.parametrize("kind", ["gemm", "shrink", "dy", "grad_a"])
def test_pruning_keeps_only_configs_that_fit_the_model(kind):
    """Over M classes, ranks, dtypes (half / fp32 adapters), dropout and the small-M path."""
    from fastlora.kernels import lora_configs as cfgs
    from fastlora.kernels import lora_linear as kl
    from fastlora.kernels import resources as res

    configs, prune, model = {
        "gemm": (cfgs.GEMM_CONFIGS, res.prune_gemm_lora, res.gemm_resources),
        "shrink": (cfgs.SHRINK_CONFIGS, res.prune_lora_shrink, res.shrink_resources),
        "dy": (cfgs.DY_CONFIGS, res.prune_lora_grad_dy, res.dy_resources),
        "grad_a": (cfgs.GRAD_A_CONFIGS, res.prune_lora_grad_a, res.grad_a_resources),
    }[kind]
    for m in (16, 64, 2048, 8192):
        for dt in (torch.float16, torch.float32):
            for adt in (dt, torch.float32):
                for rb in (16, 32, 64, 128):
                    for drop in (False, True):
                        x, a = _meta(dt), _meta(adt)
                        if kind == "gemm":
                            fused = m <= 64 and not drop and rb <= kl.FUSED_SHRINK_MAX_R
                            args = dict(M_BUCKET=m, K=4096, a_ptr=x, s_ptr=a, u_ptr=a, R_BLOCK=rb if fused else 16,
                                        FUSE_SHRINK=fused, LO_DROPOUT=drop)
                        elif kind == "dy":
                            args = dict(M_BUCKET=m, dy_ptr=x, b_ptr=a, h_ptr=_meta(torch.float32), R_BLOCK=rb,
                                        NEED_DB=True)
                        elif kind == "grad_a":
                            args = dict(M_BUCKET=m, dh_ptr=_meta(torch.float32), x_ptr=x, R_BLOCK=rb,
                                        HAS_DROPOUT=drop)
                        else:
                            args = dict(M_BUCKET=m, x_ptr=x, a_ptr=a, R_BLOCK=rb, HAS_DROPOUT=drop)
                        kept = prune(configs, args)
                        assert kept, (kind, args)
                        for c in kept:
                            smem, regs = model(c, args)
                            assert smem <= res.SMEM_BUDGET and regs <= res.REG_BUDGET, (kind, c, args)


def test_autotune_top_k_bounds_the_first_run(monkeypatch):
    """FASTLORA_AUTOTUNE_TOP_K=k (gpu_check.sh's bounded first run) keeps the first k configs that fit."""
    from fastlora.kernels import lora_configs as cfgs
    from fastlora.kernels import resources as res

    args = dict(M_BUCKET=4096, K=4096, a_ptr=_meta(torch.bfloat16), R_BLOCK=16, LO_DROPOUT=False)
    full = res.prune_gemm_lora(cfgs.GEMM_CONFIGS, args)
    assert len(full) > 2
    monkeypatch.setenv("FASTLORA_AUTOTUNE_TOP_K", "2")
    assert res.prune_gemm_lora(cfgs.GEMM_CONFIGS, args) == full[:2]
    monkeypatch.setenv("FASTLORA_AUTOTUNE_TOP_K", "many")
    with pytest.raises(ValueError, match="FASTLORA_AUTOTUNE_TOP_K"):
        res.prune_gemm_lora(cfgs.GEMM_CONFIGS, args)


if __name__ == "__main__":
    import importlib.util

    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.compiler") is None:
        print("this Triton cannot compile offline")
        sys.exit(3)
    check_rank_kernels() if sys.argv[1] == "rank_kernels" else check_gemm(sys.argv[1])
    print("built", sys.argv[1])
