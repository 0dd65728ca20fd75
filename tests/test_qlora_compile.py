"""Compile the 4-bit GEMM (fastlora/kernels/qlora.py) for an H100/H200 (sm_90) without a GPU, as
tests/test_kernels_compile.py does for the other kernels: the interpreter runs its math but not Triton's compiler.

Checked per variant (the small-M forward with the fused shrink, the dX GEMM with the dropout mask): it builds with
the GPU tile the launcher uses, its activation tiles load asynchronously (cp.async), it uses tensor cores (mma),
and its shared memory stays small: the packed bytes, not dequantized or gathered tiles, are what it stages.
Builds run in a child process (this file as a script): the interpreter lane's TRITON_INTERPRET=1 forbids them.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="real launches compile the kernels on CUDA")

# name: the launcher's tile for (M, output columns, SMs of an H100/H200)
VARIANTS = {"forward_small_m": (16, 11008, 132), "forward_decode_narrow": (1, 4096, 132), "dx_masked": (64, 4096, 132)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_gemm_4bit_lora_kernel_builds_for_sm90(variant):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, variant], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, f"{variant} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def check(variant: str) -> None:
    import triton.language as tl
    from test_kernels_compile import _build  # tests/ is this script's folder: on sys.path

    from fastlora.kernels import qlora as qk

    os.environ.pop("TRITON_INTERPRET", None)
    cfg = qk._config(*VARIANTS[variant])
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    types = dict(a_ptr="*bf16", q_ptr="*u8", absmax_ptr="*fp32", code_ptr="*fp32", c_ptr="*bf16", bias_ptr="*bf16",
                 l_ptr="*fp32", u_ptr="*fp32", s_ptr="*fp32", scaling="fp32", inv_keep="fp32", drop_thr="u32")
    common = dict(BLOCKSIZE=64, W_DTYPE=tl.bfloat16, IDX64=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_PRECISION="ieee",
                  N_ROUNDS=7)
    if variant.startswith("forward"):  # a = x, deq = Wᵀ (qstride_k = 1), U = Bᵀ, S = Aᵀ
        consts = dict(common, HAS_BIAS=True, LO_DROPOUT=False, FUSE_SHRINK=True, STORE_L=True, R_BLOCK=16,
                      SCALE_AXIS=1)
        unit = ["stride_ak", "qstride_k", "stride_cn", "stride_lr", "stride_ur", "stride_sk"]
        div = ["N", "K", "stride_am", "qstride_n", "stride_cm", "stride_un", "stride_sr", "stride_lm"]
    else:  # a = dY, deq = W (qstride_n = 1), U = A, the forward's Philox mask
        consts = dict(common, HAS_BIAS=False, LO_DROPOUT=True, FUSE_SHRINK=False, STORE_L=False, R_BLOCK=16,
                      SCALE_AXIS=2)
        unit = ["stride_ak", "qstride_n", "stride_cn", "stride_lr", "stride_un"]
        div = ["N", "K", "stride_am", "qstride_k", "stride_cm", "stride_ur", "stride_lm"]
    k = _build(qk.gemm_4bit_lora_kernel, types, consts, unit, div, cfg["num_warps"], cfg["num_stages"])
    ptx = k.asm["ptx"]
    assert "mma" in ptx, "the 4-bit GEMM does not use tensor cores"
    assert "cp.async" in ptx, "tiles are not loaded asynchronously"
    # staged per pipeline stage: the bf16 activation tile and the packed weight's bytes (a byte per element as
    # loaded), nothing of fp32 (BK, BN) size: no gathered code / absmax tiles
    per_stage = bm * bk * 2 + bk * bn
    budget = cfg["num_stages"] * per_stage + bm * bn * 4 + 16 * 1024
    assert k.metadata.shared <= budget, f"shared memory {k.metadata.shared} B > {budget} B"
    print(f"{variant}: shared {k.metadata.shared} B (budget {budget} B)")


if __name__ == "__main__":
    import importlib.util

    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.compiler") is None:
        print("this Triton cannot compile offline")
        sys.exit(3)
    check(sys.argv[1])
