"""Which composition of the two large GEMMs wins, per problem, on this GPU (run by gpu_check.sh).

For each shape, one forward+backward through ``fastlora.kernels`` with ``FASTLORA_BASE_GEMM=auto``: the first
call of each problem key autotunes the Triton kernels and times the fused Triton GEMM against the cuBLAS
composition (``kl.gemm_dispatch``); this prints the choice and both times per key, and the compile + autotune +
dispatch time of each shape (the first-run cost that gpu_check.sh bounds).

    python benchmarks/dispatch_report.py --shapes 2048x4096x4096,16x4096x4096 --rank 16 --dropout 0,0.1
    python benchmarks/dispatch_report.py --json out.json     # also write the table
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ISSUE3 = [(M, KN, KN) for KN in (4096, 5120, 8192) for M in (2048, 4096, 8192)]
DECODE = [(M, 4096, 4096) for M in (1, 16, 64)]


def parse_shapes(text):
    if text == "issue3":
        return ISSUE3
    if text == "decode":
        return DECODE
    if text == "all":
        return ISSUE3 + DECODE
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="all", help="MxKxN,... or issue3 / decode / all")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--dropout", default="0,0.1")
    ap.add_argument("--adapters", default="float32", help="adapter dtype (the layers' default: float32)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("dispatch_report: needs CUDA (the choice is made by timing on the GPU)")
        return 3
    os.environ["FASTLORA_BASE_GEMM"] = os.environ.get("FASTLORA_BASE_GEMM", "auto")
    from fastlora.kernels import lora_linear as kl

    dt, adt = getattr(torch, args.dtype), getattr(torch, args.adapters)
    r = args.rank
    rows, first_run = [], []
    for M, K, N in parse_shapes(args.shapes):
        for p in (float(v) for v in args.dropout.split(",")):
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(M, K, device="cuda", dtype=dt, generator=g)
            w = torch.randn(N, K, device="cuda", dtype=dt, generator=g) * K**-0.5
            a = torch.randn(r, K, device="cuda", dtype=adt, generator=g) * K**-0.5
            b = torch.randn(N, r, device="cuda", dtype=adt, generator=g)
            dy = torch.randn(M, N, device="cuda", dtype=dt, generator=g)
            before = set(kl.gemm_dispatch.choices)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            y, h = kl.lora_forward(x, w, a, b, None, 2.0, p, 1)
            kl.lora_backward(dy, x, w, a, b, h, 2.0, p, 1, True, False, True, True, False)
            torch.cuda.synchronize()
            first_run.append(((M, K, N, p), time.perf_counter() - t0))
            for key in kl.gemm_dispatch.choices:
                if key in before:
                    continue
                times = kl.gemm_dispatch.timings[key]
                op, mb, n_out, k_red = key[:4]
                rows.append(dict(op=op, M=M, N=n_out, K=k_red, r=r, dropout=p, choice=kl.gemm_dispatch.choices[key],
                                 triton_ms=times.get("triton"), cublas_ms=times.get("cublas")))
            del x, w, a, b, dy, y, h
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, adapters {args.adapters}, r={r}, "
          f"torch {torch.__version__}, triton {__import__('triton').__version__}")
    print(f"{'op':<4} {'M':>5} {'N':>5} {'K':>5} {'p':>4}  {'winner':<7} {'triton ms':>10} {'cublas ms':>10} "
          f"{'cublas/triton':>13}")
    for row in rows:
        t, c = row["triton_ms"], row["cublas_ms"]
        print(f"{row['op']:<4} {row['M']:>5} {row['N']:>5} {row['K']:>5} {row['dropout']:>4}  {row['choice']:<7} "
              f"{t:>10.4f} {c:>10.4f} {c / t:>13.3f}")
    total = sum(s for _, s in first_run)
    print(f"first run (compile + autotune + dispatch timing): {total:.1f}s over {len(first_run)} problems; "
          f"slowest {max(first_run, key=lambda e: e[1]) if first_run else None}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows,
                           first_run=[dict(problem=k, seconds=s) for k, s in first_run]), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
