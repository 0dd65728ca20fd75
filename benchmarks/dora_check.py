"""DoRA benchmark: one training step (forward + backward) of fastlora's DoRA against PEFT's DoRA, with
fastlora's and PEFT's plain LoRA on the same shapes measured in the same run.

    python benchmarks/dora_check.py                      # GPU: bf16, r=16, the goal shapes, dropout 0 and 0.1
    python benchmarks/dora_check.py --mode infer         # GPU: eval-mode forward at decode shapes (M = 1, 16, 64)
    python benchmarks/dora_check.py --device cpu --dtype float32 --shapes 128x256x256 --budget 0.05   # a dry run

Providers, all on the same PEFT layer's parameters (bf16 base, fp32 adapters and magnitude: PEFT's default):
  fastlora_dora  the DoRA fuser's forward (``fastlora.peft_interop.dora.forward``) + backward
  peft_dora      PEFT's ``lora.Linear`` with ``use_dora=True``
  fastlora_lora  ``fastlora.lora_linear`` (the same A, B, no magnitude)
  peft_lora      PEFT's ``lora.Linear`` without DoRA
x requires grad (as inside a model), W is frozen. Timing (interleaved rounds), peak memory and the bytes saved
for the backward are fastlora.bench's, as in qlora_check.py. Reported per case: median step time, peak memory,
saved bytes, and the ratios: the goal (issue 14, on an H100) is fastlora_dora / fastlora_lora <= 1.2 at dropout 0;
PEFT's peft_dora / peft_lora is recorded beside it, as well as the speed-up of fastlora's DoRA over PEFT's.
Results: markdown on stdout and JSON in ``$OUT/dora_check/`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from fastlora import bench

PROVIDERS = ("fastlora_dora", "peft_dora", "fastlora_lora", "peft_lora")
GOAL_RATIO = 1.2
DEFAULT_SHAPES = "4096x4096x4096,8192x4096x4096,4096x8192x8192"  # M x K x N
DEFAULT_INFER_SHAPES = "1x4096x4096,16x4096x4096,64x4096x4096"  # decoding


class _Holder(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin


def peft_layer(case: bench.Case, use_dora: bool, seed: int = 0):
    """A PEFT lora.Linear on a frozen nn.Linear(K, N) (with bias), adapters as PEFT makes them."""
    import peft

    torch.manual_seed(seed)
    lin = nn.Linear(case.K, case.N, bias=True, device=case.device, dtype=case.torch_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_Holder(lin), peft.LoraConfig(
            target_modules=["lin"], r=case.r, lora_alpha=2 * case.r, lora_dropout=case.dropout, use_dora=use_dora,
            init_lora_weights=False))
    layer = model.base_model.model.lin
    layer.train(case.training)
    return layer


def build_runner(provider: str, case: bench.Case, seed: int = 1) -> bench.Runner:
    """A fastlora.bench Runner of one provider on its own PEFT layer (the same seed: the same parameters)."""
    import fastlora
    from fastlora.peft_interop import dora as dora_fuser

    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    layer = peft_layer(case, use_dora=provider.endswith("dora"))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pool_x = [torch.randn(case.M, case.K, generator=gen).to(case.device, case.torch_dtype)
              .requires_grad_(case.training) for _ in range(2)]
    pool_dy = [torch.randn(case.M, case.N, generator=gen).to(case.device, case.torch_dtype) for _ in range(2)]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    trainable = [A, B] + ([layer.lora_magnitude_vector["default"].weight] if provider.endswith("dora") else [])
    if provider == "fastlora_dora":
        def fn(x):
            return dora_fuser.forward(layer, x, ["default"])
    elif provider == "fastlora_lora":
        base, s = layer.get_base_layer(), layer.scaling["default"]

        def fn(x):
            return fastlora.lora_linear(x, base.weight, A, B, base.bias, scaling=s, dropout_p=case.dropout,
                                        training=case.training)
    else:
        fn = layer  # PEFT's own forward
    params = list(layer.parameters())
    return bench.Runner(case, provider, fn, params, lambda x: (x, *trainable), pool_x, pool_dy, True)


def measure(case: bench.Case, providers=PROVIDERS, budget_s: float = 0.5) -> dict:
    """One row: per provider median ms, peak MiB (CUDA), saved MiB (training), errors; and the ratios."""
    row = {"M": case.M, "K": case.K, "N": case.N, "r": case.r, "dropout": case.dropout, "dtype": case.dtype,
           "mode": "infer" if case.mode == "inference" else "train"}
    runners = {}
    for provider in providers:
        try:
            runners[provider] = build_runner(provider, case)
        except Exception as exc:  # a provider that cannot be built is reported, the others still run
            row[f"{provider}_ms"], row[f"{provider}_error"] = None, f"{type(exc).__name__}: {exc}"
    timed = bench.time_interleaved(runners, budget_s=budget_s, min_reps=3)
    for provider, runner in runners.items():
        res = timed[provider]
        if isinstance(res, Exception):
            row[f"{provider}_ms"], row[f"{provider}_error"] = None, f"{type(res).__name__}: {res}"
            continue
        row[f"{provider}_ms"] = res["median_s"] * 1e3
        peak = bench.peak_memory_bytes(runner)
        row[f"{provider}_peak_mib"] = None if peak is None else peak / 2**20
        saved = bench.saved_activation_bytes(runner, include_input=False) if case.training else None
        row[f"{provider}_saved_mib"] = None if saved is None else saved / 2**20
    del runners
    if case.device.startswith("cuda"):
        torch.cuda.empty_cache()

    def ratio(a, b):
        ta, tb = row.get(f"{a}_ms"), row.get(f"{b}_ms")
        return ta / tb if ta and tb else None

    row["fastlora_dora_over_lora"] = ratio("fastlora_dora", "fastlora_lora")
    row["peft_dora_over_lora"] = ratio("peft_dora", "peft_lora")
    row["speedup_vs_peft_dora"] = ratio("peft_dora", "fastlora_dora")
    return row


def _fmt(v, spec=".2f"):
    return "—" if v is None else format(v, spec)


def render(rows, env, mode="train") -> str:
    what = "training step (forward + backward)" if mode == "train" else "inference (eval, no_grad forward)"
    lines = [f"DoRA {what}, {env.get('device_name', env.get('device'))}, torch {env['torch']}, "
             f"triton {env.get('triton')}, {env['date_utc']}", ""]
    lines.append("| M×K×N | r | p | fastlora DoRA ms | PEFT DoRA ms | fastlora LoRA ms | PEFT LoRA ms | "
                 "fastlora DoRA/LoRA | PEFT DoRA/LoRA | speed-up vs PEFT DoRA | peak MiB fastlora / PEFT DoRA | "
                 "saved MiB fastlora / PEFT DoRA |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['M']}×{r['K']}×{r['N']} | {r['r']} | {r['dropout']:g} | {_fmt(r.get('fastlora_dora_ms'), '.3f')} | "
            f"{_fmt(r.get('peft_dora_ms'), '.3f')} | {_fmt(r.get('fastlora_lora_ms'), '.3f')} | "
            f"{_fmt(r.get('peft_lora_ms'), '.3f')} | {_fmt(r['fastlora_dora_over_lora'])} | "
            f"{_fmt(r['peft_dora_over_lora'])} | {_fmt(r['speedup_vs_peft_dora'])} | "
            f"{_fmt(r.get('fastlora_dora_peak_mib'), '.0f')} / {_fmt(r.get('peft_dora_peak_mib'), '.0f')} | "
            f"{_fmt(r.get('fastlora_dora_saved_mib'), '.1f')} / {_fmt(r.get('peft_dora_saved_mib'), '.1f')} |")
    goal = [r["fastlora_dora_over_lora"] for r in rows if r["dropout"] == 0 and r["fastlora_dora_over_lora"]]
    if goal and mode == "infer":
        lines += ["", f"inference: fastlora DoRA / fastlora LoRA geomean {statistics.geometric_mean(goal):.2f}× "
                      "(the norm is reused while the adapters are unchanged)"]
    elif goal:
        worst = max(goal)
        verdict = "MET" if worst <= GOAL_RATIO else "MISSED"
        lines += ["", f"goal (dropout 0): fastlora DoRA step <= {GOAL_RATIO}× fastlora LoRA step: worst "
                      f"{worst:.2f}×, geomean {statistics.geometric_mean(goal):.2f}× -> {verdict}"]
        peft_r = [r["peft_dora_over_lora"] for r in rows if r["dropout"] == 0 and r["peft_dora_over_lora"]]
        if peft_r:
            lines.append(f"PEFT, same run: DoRA step / LoRA step geomean {statistics.geometric_mean(peft_r):.2f}×")
    for r in rows:
        for p in PROVIDERS:
            if f"{p}_error" in r:
                lines.append(f"error: {p} at {r['M']}x{r['K']}x{r['N']} p={r['dropout']}: {r[f'{p}_error']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--mode", default="train", choices=["train", "infer"],
                    help="train: forward + backward (the goal); infer: eval-mode forward under no_grad")
    ap.add_argument("--shapes", default=None, help=f"MxKxN,... (train: {DEFAULT_SHAPES}; infer: "
                                                   f"{DEFAULT_INFER_SHAPES})")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", default="0,0.1")
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of timing per provider and case")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    ap.add_argument("--out", default=None, help="folder for results.json (default $OUT/dora_check)")
    args = ap.parse_args(argv)
    device = bench.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    env = bench.environment(device)
    shapes = args.shapes or (DEFAULT_SHAPES if args.mode == "train" else DEFAULT_INFER_SHAPES)
    dropouts = args.dropout if args.mode == "train" else "0"  # eval: no dropout anyway
    mode = "forward+backward" if args.mode == "train" else "inference"
    rows = []
    for M, K, N in bench.parse_shapes(shapes):
        for p in (float(v) for v in dropouts.split(",")):
            case = bench.Case(M, K, N, r=args.rank, dtype=dtype, dropout=p, mode=mode, device=device, bias=True)
            rows.append(measure(case, budget_s=args.budget))
            print(f"measured {M}x{K}x{N} p={p:g}", file=sys.stderr, flush=True)
    text = render(rows, env, args.mode)
    print(text)
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "dora_check" if os.environ.get("OUT") else None)
    stem = "results" if args.mode == "train" else "results_infer"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1, default=str))
        (out / f"{stem}.md").write_text(text + "\n")
    return 1 if any(k.endswith("_error") for r in rows for k in r) else 0


if __name__ == "__main__":
    sys.exit(main())
