"""Mixed-adapter batches (issue 23): one LoRA layer holding n adapters, a batch whose rows are spread evenly over
them (PEFT's ``adapter_names=``), inference. Providers, all on the same PEFT ``lora.Linear``:

  fastlora  the accelerated layer: ``layer(x, adapter_names=names)`` through fastlora's router (the fused mixed op)
  peft      PEFT's own ``lora.Linear.forward(x, adapter_names=names)`` (its loop over the adapters)
  base      the frozen ``nn.Linear`` alone: the floor (no LoRA work)
  single    fastlora's single-adapter fused op (``fastlora.lora_linear``) on every row, at the adapters' mean rank:
            what serving one adapter costs

Goals (the issue's): on the CPU preset, fastlora ≤ 1.2 × base at every adapter count (PEFT's ratio beside it); on
the CUDA presets (prefill: 4096 rows, decode: 64 rows; K = N = 4096, bf16 base, ranks mixed over 8-64),
fastlora ≤ 1.15 × single. Every case first checks fastlora's output against PEFT's.

    flock /tmp/fastlora-bench.lock python benchmarks/mixed_check.py --preset cpu     # CPU, fp32 (minutes)
    python benchmarks/mixed_check.py --preset prefill,decode                         # CUDA (benchmarks/gpu_check.sh)
    python benchmarks/mixed_check.py --preset quick                                  # seconds, any machine

Timing is ``fastlora.bench``'s (interleaved host timing on CPU with contended rounds dropped, CUDA events on GPU);
results go to mixed_check.json / .md in --out (default $OUT/mixed_check, else ./mixed_check_out), written after
every case. Exit status: 0 when every goal was met, 3 when one was missed, 1 when a provider failed or an output
differs from PEFT's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from fastlora import bench

PROVIDERS = ("fastlora", "peft", "base", "single")
MIXED_RANKS = (16, 64, 8, 32)  # cycled over the adapters: ranks 8-64, mean 30 from four adapters on
PRESETS = {
    # name: (M, K, N, dtype, adapter counts, ranks cycled, goal: (provider, denominator, max ratio), device)
    "cpu": (512, 1024, 1024, "float32", (1, 2, 4, 8, 16, 32, 64), (16,), ("fastlora", "base", 1.2), "cpu"),
    "prefill": (4096, 4096, 4096, "bfloat16", (1, 4, 16, 64, 256), MIXED_RANKS, ("fastlora", "single", 1.15),
                "cuda"),
    "decode": (64, 4096, 4096, "bfloat16", (1, 4, 16, 64), MIXED_RANKS, ("fastlora", "single", 1.15), "cuda"),
    "quick": (96, 64, 64, "float32", (1, 3, 8), (4, 2), ("fastlora", "base", None), "auto"),
}


def mixed_layer(K, N, ranks, dtype, device, seed=0):
    """PEFT's lora.Linear over a K → N nn.Linear with one adapter per rank in ``ranks`` (a0, a1, ...), nonzero,
    accelerated by fastlora; PEFT keeps the adapters in fp32 on a half base, as it does by default."""
    import peft

    import fastlora

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(K, N, bias=False)

    def config(r):
        return peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], init_lora_weights=False)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(Net(), config(ranks[0]), adapter_name="a0")
        for i, r in enumerate(ranks[1:], 1):
            model.add_adapter(f"a{i}", config(r))
    model = fastlora.accelerate_peft(model.to(device=device))
    layer = model.base_model.model.proj
    layer.base_layer.to(dtype)
    layer.eval()
    return layer


def build_runner(provider, case: bench.Case, layer, names, seed=0):
    import fastlora

    device, dtype = torch.device(case.device), case.torch_dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    pool_x = [torch.randn(case.M, case.K, generator=gen, device=device).to(dtype) for _ in range(4)]
    base = layer.base_layer
    params = [p for p in layer.parameters()]
    if provider == "fastlora":
        fn = lambda x: layer(x, adapter_names=names)  # noqa: E731 - the accelerated layer's routed forward
    elif provider == "peft":
        fn = lambda x: type(layer).forward(layer, x, adapter_names=names)  # noqa: E731
    elif provider == "base":
        fn = base
    else:  # single: one adapter of the mean rank on every row
        g = torch.Generator().manual_seed(seed + 1)
        A = (torch.randn(case.r, case.K, generator=g) * case.K ** -0.5).to(device)
        B = (torch.randn(case.N, case.r, generator=g) * 0.1).to(device)
        fn = lambda x: fastlora.lora_linear(x, base.weight, A, B, base.bias, scaling=2.0)  # noqa: E731
    return bench.Runner(case, provider, fn, params, lambda x: (x,), pool_x, [None] * 4, True,
                        "frozen linear: no LoRA work" if provider == "base" else "")


def check_output(layer, case, names) -> float:
    """Relative error of fastlora's mixed output against PEFT's (the same layer, the same rows)."""
    x = torch.randn(case.M, case.K, device=case.device).to(case.torch_dtype)
    with torch.no_grad():
        got = layer(x, adapter_names=names).double()
        ref = type(layer).forward(layer, x, adapter_names=names).double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def run(presets, providers, *, budget_s, stream=sys.stdout, on_case=None):
    rows = []
    for name in presets:
        M, K, N, dtype, counts, rank_cycle, goal, device = PRESETS[name]
        device = bench.resolve_device(device)
        for n in counts:
            ranks = [rank_cycle[i % len(rank_cycle)] for i in range(n)]
            case = bench.Case(M, K, N, r=max(1, round(sum(ranks) / n)), dtype=dtype, mode="inference",
                              device=device)
            layer = mixed_layer(K, N, ranks, case.torch_dtype, device)
            names = [f"a{i % n}" for i in range(M)]  # rows spread evenly over the adapters
            rel_err = check_output(layer, case, names)
            runners = {p: build_runner(p, case, layer, names) for p in providers}
            stats = bench.time_case(runners, budget_s=budget_s)
            row = {"preset": name, "M": M, "K": K, "N": N, "dtype": dtype, "adapters": n, "ranks": sorted(set(ranks)),
                   "device": device, "rel_err_vs_peft": rel_err}
            for p, s in stats.items():
                if isinstance(s, Exception):
                    row[f"{p}_error"] = f"{type(s).__name__}: {s}"[:300]
                    continue
                row[f"{p}_ms"] = s["median_s"] * 1e3
                row[f"{p}_samples"] = s.get("rounds_s") or s.get("samples_s")
                row["busy"] = row.get("busy", False) or bool(s.get("busy"))
            for num, den in (("fastlora", "base"), ("peft", "base"), ("fastlora", "single"), ("fastlora", "peft")):
                if f"{num}_ms" in row and f"{den}_ms" in row:
                    row[f"{num}/{den}"] = row[f"{num}_ms"] / row[f"{den}_ms"]
                    paired = device == "cpu"
                    iv = bench.ratio_interval(row[f"{den}_samples"], row[f"{num}_samples"], paired=paired)
                    row[f"{num}/{den}_interval"] = iv
            g_num, g_den, g_max = goal
            if g_max is not None and f"{g_num}/{g_den}" in row:
                row["goal"] = f"{g_num}/{g_den} <= {g_max}"
                row["goal_met"] = row[f"{g_num}/{g_den}"] <= g_max
            rows.append(row)
            print(line(row), file=stream, flush=True)
            if on_case:
                on_case(rows)
    return rows


def _fmt_ratio(row, key):
    if key not in row:
        return "-"
    iv = row.get(f"{key}_interval")
    return f"{row[key]:.2f}" + (f" [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else "")


def line(row) -> str:
    t = "  ".join(f"{p} {row[f'{p}_ms']:.3f}" for p in PROVIDERS if f"{p}_ms" in row)
    goal = "" if "goal" not in row else (" goal MET" if row["goal_met"] else " goal MISSED")
    return (f"{row['preset']:8} n={row['adapters']:<4} ms: {t} | fastlora/base {_fmt_ratio(row, 'fastlora/base')}"
            f"  peft/base {_fmt_ratio(row, 'peft/base')}  fastlora/single {_fmt_ratio(row, 'fastlora/single')}"
            f"  err {row['rel_err_vs_peft']:.1e}{goal}{' (busy)' if row.get('busy') else ''}")


def markdown(rows, meta) -> str:
    out = [f"# Mixed-adapter batches ({meta['device_name']}, torch {meta['torch']}, {meta['date_utc']})", "",
           f"load average before the run: {meta.get('loadavg')}", "",
           "| preset | rows | adapters | ranks | fastlora ms | PEFT ms | base ms | single ms | fastlora/base | "
           "PEFT/base | fastlora/single | goal |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = [f"{r[f'{p}_ms']:.3f}" if f"{p}_ms" in r else "-" for p in ("fastlora", "peft", "base", "single")]
        goal = "" if "goal" not in r else f"{r['goal']}: {'met' if r['goal_met'] else 'MISSED'}"
        out.append(f"| {r['preset']} | {r['M']} | {r['adapters']} | {','.join(map(str, r['ranks']))} | "
                   + " | ".join(ms) + f" | {_fmt_ratio(r, 'fastlora/base')} | {_fmt_ratio(r, 'peft/base')} | "
                   f"{_fmt_ratio(r, 'fastlora/single')} | {goal} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu", help=f"comma-separated, from {', '.join(PRESETS)}")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of timing per provider and case")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    presets = [p.strip() for p in args.preset.split(",") if p.strip()]
    bad = [p for p in presets if p not in PRESETS]
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    if bad or any(p not in PROVIDERS for p in providers):
        ap.error(f"unknown preset or provider: {bad or providers}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or (Path(os.environ["OUT"]) / "mixed_check" if os.environ.get("OUT") else "mixed_check_out"))
    out.mkdir(parents=True, exist_ok=True)
    meta = bench.environment(bench.resolve_device(PRESETS[presets[0]][-1]))
    meta["loadavg"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    meta["command"] = " ".join(["python benchmarks/mixed_check.py"] + list(sys.argv[1:] if argv is None else argv))

    def save(rows):
        slim = [{k: v for k, v in r.items() if not k.endswith("_samples")} for r in rows]
        (out / "mixed_check.json").write_text(json.dumps({"meta": meta, "results": slim}, indent=1, default=str))
        (out / "mixed_check.md").write_text(markdown(rows, meta))

    t0 = time.perf_counter()
    rows = run(presets, providers, budget_s=args.budget, on_case=save)
    print(f"{len(rows)} cases in {time.perf_counter() - t0:.0f} s; wrote {out}/mixed_check.json and .md")
    if any(k.endswith("_error") for r in rows for k in r) or any(r["rel_err_vs_peft"] > 2e-2 for r in rows):
        return 1
    return 3 if any(r.get("goal_met") is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
