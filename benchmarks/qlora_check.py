"""QLoRA benchmark: one LoRA layer over a bitsandbytes 4-bit base, fastlora against PEFT's QLoRA layer and
bitsandbytes' dequantize + matmul; time and peak memory (and saved-activation bytes) per provider.

Providers (all on the same Linear4bit base and the same adapters):
  fastlora            the PEFT fuser (fastlora/peft_interop/bnb.py) on PEFT's layer: lora_linear_4bit, with the
                      measured choice between its two Triton paths on CUDA
  fastlora_fused4bit  the same with FASTLORA_QLORA_PATH=fused4bit (the 4-bit GEMM that dequantizes in registers)
  fastlora_dequant    the same with FASTLORA_QLORA_PATH=dequant (transient dequantized W, then the fused kernels)
  peft                PEFT's own lora.bnb.Linear4bit forward (bnb.matmul_4bit + the unfused LoRA branch)
  bnb_dequant         dequantize_4bit(W) + F.linear + the unfused LoRA branch, written out by hand
  base                the frozen bitsandbytes Linear4bit alone (the floor: no LoRA work)
The fastlora_* variants run only where the Triton kernels do (CUDA); on CPU fastlora is the PyTorch path.

    python benchmarks/qlora_check.py                      # CUDA if present: decode and training shapes, bf16
    python benchmarks/qlora_check.py --device cpu --quick # seconds on a CPU
Results: a table on stdout, qlora_check.json / .md in --out (default $OUT/qlora_check, else ./qlora_check_out).
Timing, peak memory and saved-bytes accounting are fastlora.bench's. Exit status 0 unless a provider failed or
fastlora's output or gradients differ from PEFT's beyond the dtype's tolerance (every path: auto, and on CUDA
each Triton path forced). Results are written after every case, so a run stopped by a time limit keeps them.

For benchmarks/gpu_check.sh (a section after the decode benchmark; about 2-3 minutes on an H100/H200 with the
default shapes, ~1 minute with QLORA_SHAPES=decode):

    stamp "QLoRA: fastlora vs PEFT's QLoRA layer vs bnb dequantize+matmul (benchmarks/qlora_check.py)"
    qlora_rc=0
    if "$PYTHON" -c "import bitsandbytes" 2>/dev/null; then
      timeout "${QLORA_BUDGET_S:-180}" "$PYTHON" benchmarks/qlora_check.py --device "$DEVICE" --dtype "$DTYPE" \
        --shapes "${QLORA_SHAPES:-decode,train}" --out "$RESULTS/qlora" || qlora_rc=$?
    else
      echo "bitsandbytes not installed: QLoRA section skipped"
    fi
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from fastlora import bench

PROVIDERS = ("fastlora", "fastlora_fused4bit", "fastlora_dequant", "peft", "bnb_dequant", "base")
TRITON_ONLY = {"fastlora_fused4bit": "fused4bit", "fastlora_dequant": "dequant"}
SHAPES = {
    # (M, K, N): decode (the fused 4-bit GEMM's case) and training-sized batches of a 7B-class layer
    "decode": [(1, 4096, 4096), (16, 4096, 4096), (64, 4096, 4096), (16, 4096, 11008)],
    "train": [(2048, 4096, 4096), (4096, 4096, 11008), (8192, 4096, 4096)],
    "quick": [(16, 256, 512), (512, 256, 256)],  # both Triton paths' regimes, seconds on a CPU
}



def or_none(fn, *args):
    """fn(*args), or None where it fails: memory accounting is best effort (as in fastlora.bench)."""
    try:
        return fn(*args)
    except Exception:
        return None


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:500]

def qlora_layer(case: bench.Case, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
                seed: int = 0):
    """PEFT's lora.bnb.Linear4bit over a fresh bitsandbytes Linear4bit (K → N, compute dtype = the case's),
    adapters fp32 (PEFT's) and nonzero, dropout as the case, in training mode unless inference."""
    import bitsandbytes as bnb
    import peft
    from peft.tuners.lora import bnb as lora_bnb

    torch.manual_seed(seed)
    dtype = case.torch_dtype
    base = bnb.nn.Linear4bit(case.K, case.N, bias=case.bias, compute_dtype=dtype, quant_type=quant_type,
                             compress_statistics=double_quant)
    base.weight = bnb.nn.Params4bit(torch.randn(case.N, case.K) * case.K ** -0.5, requires_grad=False,
                                    blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type,
                                    module=base)
    base = base.to(case.device)  # quantizes on the device
    cfg = peft.LoraConfig(r=case.r, lora_alpha=case.scaling * case.r, lora_dropout=case.dropout,
                          init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = lora_bnb.Linear4bit(base, "default", config=cfg, r=case.r,
                                                lora_alpha=case.scaling * case.r).to(case.device)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0.0, 0.1)  # nonzero: every gradient is exercised
    layer.train(case.training)
    return layer


def build_runner(provider: str, case: bench.Case, layer, seed: int = 0) -> bench.Runner:
    from fastlora.peft_interop import bnb as fuser_bnb
    from bitsandbytes.functional import dequantize_4bit

    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    device, dtype = torch.device(case.device), case.torch_dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    pool = 4
    pool_x = [torch.randn(case.M, case.K, generator=gen, device=device).to(dtype).requires_grad_(case.training)
              for _ in range(pool)]
    pool_dy = ([torch.randn(case.M, case.N, generator=gen, device=device).to(dtype) for _ in range(pool)]
               if case.mode == "forward+backward" else [None] * pool)
    base = layer.get_base_layer()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    params = [base.weight, A, B] + ([base.bias] if base.bias is not None else [])
    lora_inputs = lambda x: (x, A, B)  # noqa: E731
    p, s = case.dropout, case.scaling
    note = ""

    if provider == "fastlora" or provider in TRITON_ONLY:
        forced = TRITON_ONLY.get(provider)

        def fn(x):
            if forced:
                os.environ["FASTLORA_QLORA_PATH"] = forced
            try:
                return fuser_bnb.FUSER_4BIT.forward(layer, x, ["default"])
            finally:
                if forced:
                    os.environ.pop("FASTLORA_QLORA_PATH", None)
        grad_inputs = lora_inputs
    elif provider == "peft":
        fn, grad_inputs = layer, lora_inputs
    elif provider == "bnb_dequant":
        def fn(x):
            w = dequantize_4bit(base.weight, base.weight.quant_state).to(dtype)
            y = F.linear(x, w, base.bias)
            xa = F.dropout(x.to(A.dtype), p, case.training)
            return y + (F.linear(F.linear(xa, A), B) * s).to(dtype)
        grad_inputs = lora_inputs
    else:  # base
        fn, grad_inputs = base, (lambda x: (x,))
        note = "frozen 4-bit linear: no LoRA work"
    return bench.Runner(case, provider, fn, params, grad_inputs, pool_x, pool_dy, p > 0 and case.training, note)


def provider_available(provider: str, device: str) -> tuple[bool, str]:
    if provider in TRITON_ONLY:
        from fastlora import backend

        if not device.startswith("cuda") or not backend.triton_available():
            return False, "the Triton paths run on CUDA (CPU: the PyTorch path only)"
    return True, ""


def check_output(layer, case: bench.Case) -> float:
    """max over fastlora's paths (auto, and on CUDA each Triton path forced) of the relative error against PEFT's
    layer, for y and the gradients of x, A and B, in eval mode (no dropout: the same function)."""
    from fastlora.peft_interop import bnb as fuser_bnb

    layer = copy.deepcopy(layer).eval()
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    gen = torch.Generator(device=case.device).manual_seed(1)
    x = torch.randn(min(case.M, 64), case.K, device=case.device, generator=gen).to(case.torch_dtype)
    gy = torch.randn(x.shape[0], case.N, device=case.device, generator=gen).to(case.torch_dtype)

    def outputs(fn):
        # an input that requires grad also keeps bitsandbytes off its CPU inference kernel (repacked, bf16)
        xi = x.detach().clone().requires_grad_()
        y = fn(xi)
        return [y.detach(), *torch.autograd.grad(y, [xi, *params], gy)]

    ref = outputs(layer)
    paths = [None] + (list(TRITON_ONLY.values()) if case.device.startswith("cuda") else [])
    worst = 0.0
    for path in paths:
        if path:
            os.environ["FASTLORA_QLORA_PATH"] = path
        try:
            got = outputs(lambda xi: fuser_bnb.FUSER_4BIT.forward(layer, xi, ["default"]))
        finally:
            os.environ.pop("FASTLORA_QLORA_PATH", None)
        for a, e in zip(got, ref):
            e = e.double()
            worst = max(worst, float((a.double() - e).abs().max() / e.abs().max().clamp_min(1e-12)))
    return worst


def run(cases, providers, *, budget_s: float, quant_type: str, double_quant: bool, blocksize: int,
        stream=sys.stdout, on_case=None) -> list[dict]:
    """Measure every case; ``on_case(rows)`` after each one (a run stopped by a time limit keeps what it has)."""
    rows = []
    for case in cases:
        layer = qlora_layer(case, quant_type, double_quant, blocksize)
        rel_err = check_output(layer, case)
        runners, skipped = {}, {}
        for provider in providers:
            ok, why = provider_available(provider, case.device)
            if ok:  # each provider its own copy: bitsandbytes' CPU inference repacks the weight in place
                runners[provider] = build_runner(provider, case, copy.deepcopy(layer))
            else:
                skipped[provider] = why
        timed = bench.time_interleaved(runners, budget_s=budget_s, min_reps=3)
        for provider, runner in runners.items():
            res = timed[provider]
            row = {"case": case.label(), "M": case.M, "K": case.K, "N": case.N, "r": case.r, "dtype": case.dtype,
                   "dropout": case.dropout, "mode": case.mode, "provider": provider, "quant_type": quant_type,
                   "double_quant": double_quant, "blocksize": blocksize, "rel_err_vs_peft": rel_err,
                   "note": runner.note}
            if isinstance(res, Exception):
                row["error"] = error_text(res)
            else:
                row.update(res)
                row["peak_bytes"] = or_none(bench.peak_memory_bytes, runner)
                row["saved_bytes"] = or_none(bench.saved_activation_bytes, runner)
            rows.append(row)
        for provider, why in skipped.items():
            rows.append({"case": case.label(), "provider": provider, "skipped": why, "mode": case.mode,
                         "M": case.M, "K": case.K, "N": case.N})
        print(f"  measured {case.label()} (fastlora vs PEFT rel. error {rel_err:.1e})", file=stream, flush=True)
        del layer, runners
        if on_case is not None:
            on_case(rows)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | provider | median ms | vs peft | peak MiB | saved MiB |", "|---|---|---:|---:|---:|---:|"]
    peft_ms = {r["case"]: r["median_s"] for r in rows if r.get("provider") == "peft" and "median_s" in r}
    for r in rows:
        if "skipped" in r:
            continue
        if "error" in r:
            lines.append(f"| {r['case']} | {r['provider']} | error: {r['error'][:60]} | | | |")
            continue
        ms = r["median_s"] * 1e3
        ratio = peft_ms.get(r["case"], 0) / r["median_s"] if r["median_s"] else 0
        mib = lambda b: "-" if b is None else f"{b / 2**20:.2f}"  # noqa: E731
        lines.append(f"| {r['case']} | {r['provider']} | {ms:.3f} | {ratio:.2f}x | {mib(r.get('peak_bytes'))} | "
                     f"{mib(r.get('saved_bytes'))} |")
    return "\n".join(lines)


def tolerance(dtype: str) -> float:
    return {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}[dtype]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--shapes", default=None, help="decode,train (CUDA default), quick (CPU default), or MxKxN,...")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", default="0,0.1")
    ap.add_argument("--modes", default="forward+backward,inference")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4"))
    ap.add_argument("--no-double-quant", action="store_true")
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--budget", type=float, default=0.1, help="seconds of timing per provider and case")
    ap.add_argument("--quick", action="store_true", help="the 'quick' shapes, dropout 0 only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    device = bench.resolve_device(args.device)
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    spec = args.shapes or ("quick" if args.quick or not device.startswith("cuda") else "decode,train")
    shapes = []
    for part in spec.split(","):
        shapes += SHAPES[part] if part in SHAPES else bench.parse_shapes(part)
    dropouts = [0.0] if args.quick else [float(d) for d in args.dropout.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    providers = [p.strip() for p in args.providers.split(",")]
    cases = [bench.Case(M, K, N, r=args.rank, dtype=dtype, dropout=p, mode=mode, device=device)
             for (M, K, N) in shapes for mode in modes for p in dropouts if not (mode == "inference" and p > 0)]
    out = Path(args.out or (Path(os.environ["OUT"]) / "qlora_check" if os.environ.get("OUT") else "qlora_check_out"))
    out.mkdir(parents=True, exist_ok=True)

    print(f"qlora_check: {len(cases)} cases on {device} ({dtype}), {args.quant_type}, "
          f"double_quant={not args.no_double_quant}, blocksize={args.blocksize}", flush=True)
    t0 = time.time()
    env = bench.environment(device)
    from fastlora import qlora

    def write(rows):
        choices = {str(k): v for k, v in qlora.dispatch_choices().items()}
        report = {"environment": env, "rows": rows, "dispatch_choices": choices, "wall_s": time.time() - t0}
        (out / "qlora_check.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "qlora_check.md").write_text(table(rows) + "\n")
        return choices

    rows = run(cases, providers, budget_s=args.budget, quant_type=args.quant_type,
               double_quant=not args.no_double_quant, blocksize=args.blocksize, on_case=write)
    choices = write(rows)
    print(table(rows))
    if choices:
        print("measured path choices (phase, M bucket, N, K, r, ...): ")
        for k, v in choices.items():
            print(f"  {k}: {v}")
    failed = [r for r in rows if "error" in r]
    wrong = {r["case"] for r in rows if r.get("rel_err_vs_peft", 0) > tolerance(dtype)}
    if failed:
        print(f"qlora_check: {len(failed)} provider runs failed", file=sys.stderr)
    if wrong:
        print(f"qlora_check: fastlora differs from PEFT beyond {tolerance(dtype)} on {sorted(wrong)}", file=sys.stderr)
    return 1 if failed or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
