"""DoRA benchmark: one training step (forward + backward) of fastlora's DoRA against PEFT's DoRA, with
fastlora's and PEFT's plain LoRA on the same shapes measured in the same run.

    python benchmarks/dora_check.py                      # GPU: bf16, r=16, the goal shapes, dropout 0 and 0.1
    python benchmarks/dora_check.py --mode infer         # GPU: eval-mode forward at decode shapes (M = 1, 16, 64)
    python benchmarks/dora_check.py --device cpu --dtype float32 --shapes 128x256x256 --reps 3   # a dry run

Providers, all on the same PEFT layer's parameters (bf16 base, fp32 adapters and magnitude: PEFT's default):
  fastlora_dora  the DoRA fuser's forward (``fastlora.peft_interop.dora.forward``) + backward
  peft_dora      PEFT's ``lora.Linear`` with ``use_dora=True``
  fastlora_lora  ``fastlora.lora_linear`` (the same A, B, no magnitude)
  peft_lora      PEFT's ``lora.Linear`` without DoRA
x requires grad (as inside a model), W is frozen. Reported per case: median step time, peak memory of the step
above what was allocated before it (CUDA only), the bytes saved for the backward beyond x and the parameters
(any device), and the ratios: the goal (issue 14, on an H100) is
fastlora_dora / fastlora_lora <= 1.2 at dropout 0; PEFT's peft_dora / peft_lora is recorded beside it, as well
as the speed-up of fastlora's DoRA over PEFT's. Results: markdown on stdout and JSON in ``$OUT/dora_check/``
(or ``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

PROVIDERS = ("fastlora_dora", "peft_dora", "fastlora_lora", "peft_lora")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GOAL_RATIO = 1.2
DEFAULT_SHAPES = "4096x4096x4096,8192x4096x4096,4096x8192x8192"  # M x K x N
DEFAULT_INFER_SHAPES = "1x4096x4096,16x4096x4096,64x4096x4096"  # decoding


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Holder(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin


def peft_layer(K, N, r, dropout, dtype, device, use_dora, seed=0):
    """A PEFT lora.Linear on a frozen nn.Linear(K, N) (with bias), adapters as PEFT makes them."""
    import peft

    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=True, device=device, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_Holder(lin), peft.LoraConfig(
            target_modules=["lin"], r=r, lora_alpha=2 * r, lora_dropout=dropout, use_dora=use_dora,
            init_lora_weights=False))
    layer = model.base_model.model.lin
    layer.train()
    return layer


class Step:
    """One training step (forward + backward) of a provider, or with ``mode="infer"`` one forward of the layer in
    eval mode under no_grad (decoding); ``__call__`` runs it (no sync)."""

    def __init__(self, provider, M, K, N, r, dropout, dtype, device, mode="train"):
        import fastlora
        from fastlora.peft_interop import dora as dora_fuser

        self.device, self.infer = device, mode == "infer"
        g = torch.Generator(device="cpu").manual_seed(1)
        self.x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype).requires_grad_(not self.infer)
        self.dy = torch.randn(M, N, generator=g).to(device=device, dtype=dtype)
        use_dora = provider.endswith("dora")
        self.layer = layer = peft_layer(K, N, r, dropout, dtype, device, use_dora)
        training = not self.infer
        layer.train(training)
        if provider == "fastlora_dora":
            self.fn = lambda x: dora_fuser.forward(layer, x, ["default"])
        elif provider == "fastlora_lora":
            base, A, B = layer.get_base_layer(), layer.lora_A["default"].weight, layer.lora_B["default"].weight
            s = layer.scaling["default"]
            self.fn = lambda x: fastlora.lora_linear(x, base.weight, A, B, base.bias, scaling=s, dropout_p=dropout,
                                                       training=training)
        else:
            self.fn = layer  # PEFT's own forward

    def __call__(self):
        if self.infer:
            with torch.no_grad():
                self.fn(self.x)
            return
        self.x.grad = None
        for p in self.layer.parameters():
            p.grad = None
        y = self.fn(self.x)
        y.backward(self.dy)


def time_step(step, reps, warmup=3):
    for _ in range(warmup):  # autotuning, compilation, allocator warm-up
        step()
    _sync(step.device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        _sync(step.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes(step):
    """Peak CUDA memory of one step above what was allocated before it (None off CUDA)."""
    if step.device.type != "cuda":
        return None
    _sync(step.device)
    torch.cuda.reset_peak_memory_stats(step.device)
    before = torch.cuda.memory_allocated(step.device)
    step()
    _sync(step.device)
    return torch.cuda.max_memory_allocated(step.device) - before


def saved_bytes(step):
    """Bytes autograd keeps for the backward of one forward, beyond x and the parameters (distinct storages):
    measurable on any device."""
    own = {step.x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in step.layer.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = step.fn(step.x)
    del y
    return sum(seen.values())


def measure(M, K, N, r, dropout, dtype, device, reps, providers=PROVIDERS, mode="train"):
    row = {"M": M, "K": K, "N": N, "r": r, "dropout": dropout, "dtype": str(dtype).replace("torch.", ""),
           "mode": mode}
    for provider in providers:
        try:
            step = Step(provider, M, K, N, r, dropout, dtype, device, mode)
            row[f"{provider}_ms"] = time_step(step, reps) * 1e3
            row[f"{provider}_peak_mib"] = (lambda b: None if b is None else b / 2**20)(peak_bytes(step))
            row[f"{provider}_saved_mib"] = None if step.infer else saved_bytes(step) / 2**20
            del step
        except Exception as exc:  # a provider that fails is reported, the others still run
            row[f"{provider}_ms"] = None
            row[f"{provider}_error"] = f"{type(exc).__name__}: {exc}"
        if device.type == "cuda":
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
    lines = [f"DoRA {what}, {env['device_name']}, torch {env['torch']}, "
             f"triton {env['triton']}, {env['date']}", ""]
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
        gm = statistics.geometric_mean(goal)
        worst = max(goal)
        verdict = "MET" if worst <= GOAL_RATIO else "MISSED"
        lines += ["", f"goal (dropout 0): fastlora DoRA step <= {GOAL_RATIO}× fastlora LoRA step: worst "
                      f"{worst:.2f}×, geomean {gm:.2f}× -> {verdict}"]
        peft_r = [r["peft_dora_over_lora"] for r in rows if r["dropout"] == 0 and r["peft_dora_over_lora"]]
        if peft_r:
            lines.append(f"PEFT, same run: DoRA step / LoRA step geomean {statistics.geometric_mean(peft_r):.2f}×")
    for r in rows:
        for p in PROVIDERS:
            if f"{p}_error" in r:
                lines.append(f"error: {p} at {r['M']}x{r['K']}x{r['N']} p={r['dropout']}: {r[f'{p}_error']}")
    return "\n".join(lines)


def environment(device):
    import importlib.util

    triton_v = "absent"
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_v = triton.__version__
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device_name": name, "torch": torch.__version__, "triton": triton_v,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def parse_shapes(spec):
    out = []
    for item in spec.split(","):
        M, K, N = (int(v) for v in item.lower().split("x"))
        out.append((M, K, N))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--mode", default="train", choices=["train", "infer"],
                    help="train: forward + backward (the goal); infer: eval-mode forward under no_grad")
    ap.add_argument("--shapes", default=None, help=f"MxKxN,... (train: {DEFAULT_SHAPES}; infer: "
                                                   f"{DEFAULT_INFER_SHAPES})")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", default="0,0.1")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    ap.add_argument("--out", default=None, help="folder for results.json (default $OUT/dora_check)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    env = environment(device)
    rows = []
    shapes = args.shapes or (DEFAULT_SHAPES if args.mode == "train" else DEFAULT_INFER_SHAPES)
    dropouts = args.dropout if args.mode == "train" else "0"  # eval: no dropout anyway
    for M, K, N in parse_shapes(shapes):
        for p in (float(v) for v in dropouts.split(",")):
            rows.append(measure(M, K, N, args.rank, p, dtype, device, args.reps, mode=args.mode))
            print(f"measured {M}x{K}x{N} p={p:g}", file=sys.stderr, flush=True)
    text = render(rows, env, args.mode)
    print(text)
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "dora_check" if os.environ.get("OUT") else None)
    stem = "results" if args.mode == "train" else "results_infer"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        (out / f"{stem}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
