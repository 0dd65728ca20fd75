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
    "dx_masked": ("bf16", dict(HAS_BIAS=False, LO_DROPOUT=True, FUSE_SHRINK=False, STORE_L=False, R_BLOCK=32),
                  (128, 128, 64), 8, 3, "dx"),
    "small_m_fused": ("fp16", dict(HAS_BIAS=True, LO_DROPOUT=False, FUSE_SHRINK=True, STORE_L=True, R_BLOCK=64),
                      (16, 64, 128), 4, 4, "fwd"),
    "fp32_tf32": ("fp32", dict(HAS_BIAS=True, LO_DROPOUT=False, FUSE_SHRINK=False, STORE_L=False, R_BLOCK=16),
                  (128, 128, 32), 8, 3, "fwd"),
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
    consts = dict(flags, EVEN_K=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, N_ROUNDS=7,
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
    from fastlora.kernels import lora_linear as kl

    k = _build(kl.lora_shrink_kernel, dict(x_ptr="*bf16", a_ptr="*fp32", h_ptr="*fp32", inv_keep="fp32"),
               dict(HAS_DROPOUT=True, EVEN_K=True, BLOCK_M=32, BLOCK_K=64, R_BLOCK=16, DOT_PRECISION="ieee",
                    N_ROUNDS=7),
               ["stride_xk", "stride_ak", "stride_hr"], ["K", "stride_xm", "stride_ar", "stride_hm"])
    assert "cp.async" in k.asm["ptx"]
    k = _build(kl.lora_grad_dy_kernel,
               dict(dy_ptr="*bf16", b_ptr="*fp32", h_ptr="*fp32", dh_ptr="*fp32", db_ptr="*fp32",
                    dbias_ptr="*fp32", scaling="fp32"),
               dict(NEED_DH=True, NEED_DB=True, NEED_DBIAS=True, BLOCK_M=64, BLOCK_N=64, R_BLOCK=128,
                    DOT_PRECISION="ieee"),
               ["stride_dyn", "stride_br", "stride_hr", "stride_dhr", "stride_dbr"],
               ["N", "stride_dym", "stride_bn", "stride_hm", "stride_dhm", "stride_dbn"], num_warps=8)
    assert "red.global" in k.asm["ptx"] or "atom.global" in k.asm["ptx"], "no atomics for dB / dbias"
    _build(kl.lora_grad_a_kernel, dict(dh_ptr="*fp32", x_ptr="*bf16", out_ptr="*fp32", inv_keep="fp32"),
           dict(HAS_DROPOUT=True, BLOCK_M=64, BLOCK_K=64, R_BLOCK=16, DOT_PRECISION="ieee", N_ROUNDS=7),
           ["stride_dhr", "stride_xk", "stride_ok"], ["K", "stride_xm", "stride_dhm", "stride_or", "stride_os"])


if __name__ == "__main__":
    import importlib.util

    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.compiler") is None:
        print("this Triton cannot compile offline")
        sys.exit(3)
    check_rank_kernels() if sys.argv[1] == "rank_kernels" else check_gemm(sys.argv[1])
    print("built", sys.argv[1])
