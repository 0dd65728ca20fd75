"""Compile the DoRA kernels (``fastlora.kernels.dora``) for an H100 (sm_90) without a GPU, in bf16 with every
flag on: the interpreter lane runs their math but not Triton's compiler (layouts, nested constexpr/runtime
branches in loops, fp32 ``tl.dot`` of the norm's quadratic term). Skipped with CUDA present (real launches
compile there). Builds run in a child process, as in test_kernels_compile.py (TRITON_INTERPRET is set here)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="real launches compile the kernels on CUDA")


def test_dora_kernels_build_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, f"build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _build(fn, types, consts, num_warps=4, num_stages=2):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr")}
    return triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _check():
    from fastlora.kernels import dora as kd

    for need_sq in (True, False):
        _build(kd.dora_norm_kernel, dict(w_ptr="*bf16", a_ptr="*fp32", b_ptr="*fp32", aat_ptr="*fp32",
                                             sq_ptr="*fp32", norm_ptr="*fp32", scaling="fp32"),
                   dict(NEED_SQ=need_sq, BLOCK_N=32, BLOCK_K=128, R_BLOCK=16 if need_sq else 128))
    _build(kd.dora_scale_kernel, dict(z_ptr="*bf16", g_ptr="*fp32", bias_ptr="*bf16", rest_ptr="*bf16",
                                      y_ptr="*bf16"),
           dict(HAS_BIAS=True, HAS_REST=True, BLOCK_M=32, BLOCK_N=128))
    _build(kd.dora_grad_scale_kernel, dict(dy_ptr="*bf16", z_ptr="*bf16", g_ptr="*fp32", dz_ptr="*bf16",
                                           rest_ptr="*bf16", dg_ptr="*fp32", dsum_ptr="*fp32"),
           dict(NEED_DZ=True, NEED_REST=True, NEED_DG=True, NEED_DSUM=True, BLOCK_M=32, BLOCK_N=128))
    _build(kd.dropout_scale_kernel, dict(x_ptr="*bf16", out_ptr="*bf16", drop_thr="u32", keep_scale="fp32",
                                         drop_scale="fp32"),
           dict(ACCUMULATE=True, BLOCK_M=32, BLOCK_K=128, N_ROUNDS=7))


if __name__ == "__main__":
    import importlib.util

    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.compiler") is None:
        print("this Triton cannot compile offline")
        sys.exit(3)
    _check()
    print("built the DoRA kernels")
