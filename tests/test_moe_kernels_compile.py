"""Compile the MoE grouped kernels for an H100 (sm_90) without a GPU: every config that the autotune lists keep
(after the resource pruning) for the heaviest launches of each kernel builds, fits in 227 KB of shared memory and
spills nothing. As in test_kernels_compile.py, the builds run in a child process (this file run as a script):
the interpreter lane's TRITON_INTERPRET=1 forbids compiling."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="real launches compile the kernels on CUDA")

_HERE = os.path.dirname(os.path.abspath(__file__))


def test_every_kept_moe_config_builds_for_sm90_without_spills():
    if importlib.util.find_spec("triton.backends.compiler") is None:
        pytest.skip("this Triton cannot compile offline")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"builds failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "0 failing" in proc.stdout, proc.stdout[-3000:]


def _meta(dtype):
    return torch.empty(1, dtype=dtype, device="meta")


UNIT_FWD = ("stride_xk", "stride_wk", "stride_ak", "stride_be", "stride_biasn")
UNIT_DX = ("stride_xk", "stride_wn", "stride_ae", "stride_bn")


def gemm_specs():
    """(name, kernel, signature, constexprs, warps, stages) of the grouped GEMM and the shrink: the forward with
    the shrink in the K loop (bias, h stored; r <= 32), the GEMM reading h (r > 32) and the dX (no bias); bf16 with
    fp32 adapters (the rank products in fp32: the most registers) and fp16 with fp16 adapters."""
    from fastlora.kernels import moe as km

    out = []
    for dt, adt in (("bf16", "fp32"), ("fp16", "fp16")):
        lo_fp32 = adt == "fp32"
        x = _meta(torch.bfloat16 if dt == "bf16" else torch.float16)
        chunk = km.rank_chunk(lo_fp32)
        for mode, flags, rb in (("fwd fused", dict(FUSE_SHRINK=True, HAS_BIAS=True, STORE_H=True), 32),
                                ("fwd reads h", dict(FUSE_SHRINK=False, HAS_BIAS=True, STORE_H=False), chunk),
                                ("dx fused", dict(FUSE_SHRINK=True, HAS_BIAS=False, STORE_H=True), 16),
                                # the grouped_mm composition's epilogue: y += s·h Bᵀ + b (launched with K = 0)
                                ("fwd epilogue", dict(FUSE_SHRINK=False, HAS_BIAS=True, STORE_H=False,
                                                      ACCUMULATE=True), chunk)):
            flags = dict(dict(ACCUMULATE=False), **flags)
            # the unit strides a launch on PEFT's tensors specializes to 1: x, W (E, out, in), A (E, r, in) and B
            # (E, out, r) viewed from PEFT's (out, r·E) in the forward; dY, Wᵀ, Bᵀ and Aᵀ in the dX launch
            unit = (UNIT_FWD if mode.startswith("fwd") else UNIT_DX) + ("stride_yn", "stride_hr")
            args = dict(x_ptr=x, R_BLOCK=rb, LO_FP32=lo_fp32, HAS_LORA=True, FUSE_SHRINK=flags["FUSE_SHRINK"])
            for cfg in km.prune_grouped_lora_gemm(km._gemm_configs(), args):
                consts = dict(flags, HAS_LORA=True, LO_FP32=lo_fp32, DOT_PRECISION="ieee", R_BLOCK=rb, BLOCK_E=128,
                              S_BUCKET=4096, **cfg.kwargs, **{u: 1 for u in unit})
                sig = dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", a_ptr=f"*{adt}", b_ptr=f"*{adt}", bias_ptr=f"*{dt}",
                           y_ptr=f"*{dt}", h_ptr="*fp32", offs_ptr="*i32", scaling="fp32")
                out.append((f"gemm {mode} {dt}/{adt} R{rb} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}",
                            km.grouped_lora_gemm_kernel, sig, consts, cfg.num_warps, cfg.num_stages))
        args = dict(x_ptr=x, R_BLOCK=chunk, LO_FP32=lo_fp32)
        for cfg in km.prune_grouped_shrink(km._shrink_configs(), args):
            consts = dict(LO_FP32=lo_fp32, DOT_PRECISION="ieee", R_BLOCK=chunk, BLOCK_E=128, S_BUCKET=4096, **cfg.kwargs,
                          stride_xk=1, stride_ak=1, stride_hr=1)
            sig = dict(x_ptr=f"*{dt}", a_ptr=f"*{adt}", h_ptr="*fp32", offs_ptr="*i32")
            out.append((f"shrink {dt}/{adt} R{chunk} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}",
                        km.grouped_shrink_kernel, sig, consts, cfg.num_warps, cfg.num_stages))
    return out


def outer_specs():
    """The per-expert outer products: dB (bf16 dY, fp32 h, dbias), dA (bf16 x, fp32 dh), dW (bf16 both)."""
    from fastlora.kernels import moe as km

    out = []
    for name, p, q, o, dot_fp32, colsum in (("dB", "bf16", "fp32", "fp32", True, True),
                                            ("dA", "bf16", "fp32", "fp32", True, False),
                                            ("dW", "bf16", "bf16", "bf16", False, False)):
        args = dict(p_ptr=_meta(torch.bfloat16), DOT_FP32=dot_fp32)
        for cfg in km.prune_grouped_rows_outer(km._outer_configs(), args):
            consts = dict(HAS_COLSUM=colsum, DOT_FP32=dot_fp32, DOT_PRECISION="ieee", S_BUCKET=4096, **cfg.kwargs,
                          stride_pn=1, stride_qj=1, stride_cn=1, **({"stride_on": 1} if name == "dA" else
                                                                   {"stride_oj": 1}))
            sig = dict(p_ptr=f"*{p}", q_ptr=f"*{q}", out_ptr=f"*{o}", colsum_ptr="*fp32", offs_ptr="*i32",
                       scale="fp32")
            out.append((f"outer {name} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}", km.grouped_rows_outer_kernel, sig, consts, cfg.num_warps,
                        cfg.num_stages))
    return out


def main() -> int:
    spec = importlib.util.spec_from_file_location(
        "offline_build", os.path.join(_HERE, "..", "benchmarks", "offline_build.py"))
    ob = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ob)
    failing = 0
    for name, jit, types, consts, warps, stages in gemm_specs() + outer_specs():
        signature = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in jit.arg_names}
        attrs = [n for n in jit.arg_names if (n.endswith("_ptr") or n.startswith("stride_") or n in ("N", "K"))
                 and n not in consts and n not in ("stride_ae", "stride_be")]
        res = ob.compile_spec(dict(jit=jit, signature=signature, consts=consts, attrs=attrs, warps=warps,
                                   stages=stages))
        bad = ("error" in res or res["shared"] > 227 * 1024 or res.get("spill_stores", 0) > 0
               or res.get("spill_loads", 0) > 0)
        failing += bad
        print(("FAIL " if bad else "ok   ") + name + " " + str(res), flush=True)
    print(f"{failing} failing")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
