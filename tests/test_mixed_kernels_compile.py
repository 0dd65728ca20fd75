"""Build every variant of the mixed-adapter kernels (``fastlora.kernels.mixed``) for an H100 (sm_90) without a GPU,
with the configs the launchers use on a GPU, and check each fits: no register spills, shared memory within
227 KB. The builds run in a child process (this file run as a script): the interpreter lane's conftest sets
TRITON_INTERPRET=1, under which Triton cannot compile. Skipped with CUDA present (real launches compile there)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="real launches compile the kernels on CUDA")

HERE = os.path.dirname(os.path.abspath(__file__))
SMEM_LIMIT = 227 * 1024


def test_mixed_kernels_build_for_sm90_without_spills():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("no triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, f"builds failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    assert "0 failing" in proc.stdout, proc.stdout[-3000:]


def _specs():
    """(name, jit, signature types, constexprs, 16-divisible args, warps, stages) of every variant."""
    from fastlora.kernels import mixed as km

    specs = []
    for dt, adt, lo32, fp32 in (("bf16", "fp32", False, False), ("fp16", "fp32", True, False),
                                ("fp32", "fp32", False, True)):
        torch_dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
        prec = "tf32" if fp32 else "ieee"
        for M in (64, 4096):
            cfg = km.configs(torch_dt, M)

            def meta(name):
                c = dict(cfg[name])
                return c, c.pop("num_warps"), c.pop("num_stages")

            common = dict(R_BLOCK=km.R_BLOCK, N_ROUNDS=7)
            c, w, s = meta("shrink")
            for packed, scale, drop in ((False, False, True), (True, True, False)):  # h (dropout), dh = s·dY B
                specs.append((f"shrink {dt} M={M} packed_b={packed}", km.mixed_shrink_kernel,
                              dict(x_ptr=f"*{dt}", u_ptr=f"*{adt}", h_ptr="*fp32", perm_ptr="*i64",
                                   seg_start_ptr="*i32", tile_cum_ptr="*i32", rank_off_ptr="*i32",
                                   scal_ptr="*fp32", thr_ptr="*i64", inv_keep_ptr="*fp32"),
                              dict(common, **c, U_PACKED_B=packed, HAS_SCALE=scale, HAS_DROPOUT=drop, S_BLOCK=512,
                                   DOT_PRECISION=prec), ["K", "stride_xm", "stride_ur", "stride_hm"], w, s))
            c, w, s = meta("shrink_rows")
            for packed, scale, drop in ((False, False, True), (True, True, False)):
                specs.append((f"shrink_rows {dt} packed_b={packed}", km.mixed_shrink_rows_kernel,
                              dict(x_ptr=f"*{dt}", u_ptr=f"*{adt}", h_ptr="*fp32", index_ptr="*i64",
                                   rank_off_ptr="*i32", scal_ptr="*fp32", thr_ptr="*i64", inv_keep_ptr="*fp32"),
                              dict(common, **c, U_PACKED_B=packed, HAS_SCALE=scale, HAS_DROPOUT=drop),
                              ["K", "stride_xm", "stride_ur", "stride_hm"], w, s))
            c, w, s = meta("expand")
            for packed, bias, scale, drop in ((True, True, True, False), (False, False, False, True)):  # y; dx
                specs.append((f"expand {dt} M={M} packed_b={packed}", km.mixed_expand_kernel,
                              dict(l_ptr="*fp32", u_ptr=f"*{adt}", out_ptr=f"*{dt}", bias_ptr=f"*{dt}",
                                   perm_ptr="*i64", seg_start_ptr="*i32", tile_cum_ptr="*i32", rank_off_ptr="*i32",
                                   scal_ptr="*fp32", thr_ptr="*i64", inv_keep_ptr="*fp32"),
                              dict(common, **c, U_PACKED_B=packed, HAS_BIAS=bias, HAS_SCALE=scale, LO_DROPOUT=drop,
                                   LO_FP32=lo32, S_BLOCK=512, DOT_PRECISION=prec),
                              ["N", "stride_lm", "stride_ur", "stride_om"], w, s))
            c, w, s = meta("expand_rows")
            for packed, bias, scale, drop in ((True, True, True, False), (False, False, False, True)):
                specs.append((f"expand_rows {dt} packed_b={packed}", km.mixed_expand_rows_kernel,
                              dict(l_ptr="*fp32", u_ptr=f"*{adt}", out_ptr=f"*{dt}", bias_ptr=f"*{dt}",
                                   index_ptr="*i64", rank_off_ptr="*i32", scal_ptr="*fp32", thr_ptr="*i64",
                                   inv_keep_ptr="*fp32"),
                              dict(common, **c, U_PACKED_B=packed, HAS_BIAS=bias, HAS_SCALE=scale,
                                   LO_DROPOUT=drop), ["N", "stride_lm", "stride_ur", "stride_om"], w, s))
            c, w, s = meta("gemm")
            specs.append((f"gemm {dt} M={M}", km.mixed_gemm_kernel,
                          dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", y_ptr=f"*{dt}", bias_ptr=f"*{dt}", h_ptr="*fp32",
                               b_ptr=f"*{adt}", perm_ptr="*i64", seg_start_ptr="*i32", tile_cum_ptr="*i32",
                               rank_off_ptr="*i32", scal_ptr="*fp32"),
                          dict(**c, HAS_BIAS=True, LO_FP32=lo32, R_BLOCK=km.R_BLOCK, S_BLOCK=512,
                               DOT_PRECISION=prec),
                          ["N", "K", "stride_xm", "stride_wn", "stride_ym", "stride_hm"], w, s))
            c, w, s = meta("grad")
            for packed, scale, drop in ((True, True, False), (False, False, True)):  # dB; dA (dropout)
                specs.append((f"grad {dt} packed_b={packed}", km.mixed_grad_kernel,
                              dict(l_ptr="*fp32", x_ptr=f"*{dt}", out_ptr="*fp32", perm_ptr="*i64",
                                   seg_start_ptr="*i32", rank_off_ptr="*i32", scal_ptr="*fp32", thr_ptr="*i64",
                                   inv_keep_ptr="*fp32"),
                              dict(common, **c, OUT_PACKED_B=packed, HAS_SCALE=scale, HAS_DROPOUT=drop,
                                   LO_FP32=lo32, DOT_PRECISION=prec),
                              ["C", "stride_lm", "stride_xm", "stride_or"], w, s))
    return specs


def main() -> int:
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.compiler") is None:
        print("this Triton cannot compile offline")
        return 3
    sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
    from offline_build import compile_spec

    seen, failing = set(), 0
    for name, jit, types, consts, div, warps, stages in _specs():
        key = (jit.fn.__name__, tuple(sorted(types.items())), tuple(sorted(consts.items())), warps, stages)
        if key in seen:
            continue
        seen.add(key)
        unit = [n for n in jit.arg_names if n.startswith("stride_") and n.endswith(("k", "n", "r", "c", "on", "oc"))
                and n not in div and n not in ("stride_ur", "stride_or")]
        consts = dict(consts, **{n: 1 for n in unit})
        signature = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in jit.arg_names}
        attrs = [n for n in jit.arg_names if n not in consts and (n.endswith("_ptr") or n in div)]
        res = compile_spec(dict(jit=jit, signature=signature, consts=consts, attrs=attrs, warps=warps,
                                stages=stages))
        bad = ("error" in res or res.get("spill_stores", 0) or res.get("spill_loads", 0)
               or res["shared"] > SMEM_LIMIT)
        failing += bool(bad)
        print(f"{'FAIL' if bad else 'ok  '} {name:34} warps={warps} stages={stages} {res}")
    print(f"{len(seen)} builds, {failing} failing")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
