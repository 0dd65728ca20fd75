r"""The model-level case set (``python -m fastlora bench --model ...``): one LoRA training step of a whole model,
as a PEFT user runs it, rather than one layer.

A case is a random-weight Llama (transformers' ``LlamaForCausalLM`` built from a config, so nothing is
downloaded) with LoRA on every projection (q, k, v, o, gate, up, down), a batch of random token ids, and one
training step: the causal-LM loss, its backward, and AdamW on the adapters (fused, as HF Trainer's default
``adamw_torch_fused``). The providers, each on its own copy of the same weights:

* ``fastlora``           PEFT's model routed through fastlora (``fastlora.get_peft_model``), eager;
* ``fastlora_compiled``  the same, under ``torch.compile``;
* ``peft``               PEFT's own model (``peft.get_peft_model``), eager;
* ``compiled``           PEFT's model under ``torch.compile``;
* ``base``               the frozen model without adapters: the floor, what the step would cost if LoRA were
                         free. The outputs of the LoRA targets are made to require grad, so that its backward runs
                         exactly where the LoRA step's runs: through every layer, down to the first layer's q, k, v
                         outputs, and no further (a LoRA step needs no gradient of the first layer's input; making
                         the input embeddings require grad instead, as ``enable_input_require_grads`` does, would
                         add those GEMMs to the floor and flatter every ratio to it by ~1%).

Timing is the bench engine's (``timing.time_case``: interleaved rounds on the CPU, CUDA events on a GPU). Ratios
between two providers are medians of per-round ratios where the timer gives rounds (CPU), so that the load drift
between rounds cancels; ratios of medians on CUDA. Memory is the engine's too: the bytes autograd saves in one
forward (parameters excluded) and one step's peak.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .memory import peak_memory_bytes, saved_activation_bytes
from .providers import sync
from .run import error_text, or_none
from .timing import spread, time_case

MODEL_PROVIDERS = ("fastlora", "fastlora_compiled", "peft", "compiled", "base")
MODEL_FLOOR = "base"
MODEL_NAMES = {"fastlora": "fastlora eager", "fastlora_compiled": "fastlora compiled", "peft": "PEFT eager",
               "compiled": "PEFT compiled", "base": "frozen model"}
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Geometry of each preset: (hidden, intermediate, layers, attention heads, KV heads, vocabulary, batch, sequence).
MODEL_PRESETS = {
    # the CPU case of issue 26: ~53 M base parameters, 512 tokens; a step takes ~0.7 s on 2 cores
    "llama-small": dict(hidden=1024, intermediate=2816, layers=4, heads=16, kv_heads=4, vocab=8000, batch=2, seq=256),
    # TinyLlama-1.1B's geometry, 4 × 1024 tokens: the GPU case
    "llama-1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, batch=4,
                     seq=1024),
}
DEFAULT_MODEL = {"cpu": "llama-small", "cuda": "llama-1b"}
MODEL_DROPOUTS = (0.0, 0.05)

# Goals per (preset, device type): fastlora eager's time over the frozen model's, per dropout rate (≤), and
# (fastlora provider, PEFT provider) pairs where fastlora may never be slower, at any rate. Issue 26 asks fastlora
# eager never to be slower than PEFT eager or PEFT compiled; fastlora compiled against PEFT compiled is the
# like-for-like comparison of the two compiled runs (compile also fuses the model's non-LoRA elementwise work).
MODEL_GOALS = {
    ("llama-small", "cpu"): {"floor": {0.0: 1.05, 0.05: 1.15},
                             "not_slower": (("fastlora", "peft"), ("fastlora", "compiled"),
                                            ("fastlora_compiled", "compiled"))},
}


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """One model-level point. ``lora_alpha`` is 2r (scaling 2), as in the layer cases."""

    preset: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    r: int = 16
    dropout: float = 0.0
    dtype: str = "float32"
    device: str = "cpu"
    mode: str = "train step"  # what one timed step is (the layer cases' runners read case.mode / training)

    training = True

    def __post_init__(self):
        if min(self.hidden, self.intermediate, self.layers, self.heads, self.kv_heads, self.vocab, self.batch,
               self.seq, self.r) < 1:
            raise ValueError(f"every size of a model case must be >= 1, got {self}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads}), and heads of "
                             f"kv_heads ({self.kv_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def torch_dtype(self) -> torch.dtype:
        from .cases import DTYPES

        return DTYPES[self.dtype]

    def label(self) -> str:
        return f"{self.preset} r={self.r} p={self.dropout:g} {self.dtype}"

    def describe(self) -> str:
        return (f"{self.preset}: random Llama (hidden {self.hidden}, intermediate {self.intermediate}, {self.layers} "
                f"layers, {self.heads} heads / {self.kv_heads} KV heads, vocab {self.vocab}), batch {self.batch} × "
                f"{self.seq} tokens, LoRA r={self.r} alpha={2 * self.r} on "
                f"{','.join(t.replace('_proj', '') for t in LLAMA_TARGETS)}, {self.dtype} on {self.device}; one "
                "step = forward, backward, AdamW (fused)")


def model_cases(preset: str, dropouts, ranks, dtype: str, device: str) -> list[ModelCase]:
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}: choose from {', '.join(MODEL_PRESETS)}")
    return [ModelCase(preset, **MODEL_PRESETS[preset], r=r, dropout=float(p), dtype=dtype, device=device)
            for r in ranks for p in dropouts]


# ---------------------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------------------

class ModelRunner:
    """One provider's model, optimizer and batches on one case, with the interface of ``providers.Runner`` that
    the timing and memory code use: ``step()`` (one training step, synchronized), ``call()``, ``fn(ids)`` (the
    loss, with the graph), ``params``, ``pool_x``, ``device``."""

    def __init__(self, case: ModelCase, provider: str, model, loss_fn, optimizer, pool_x: list):
        self.case, self.provider = case, provider
        self.model, self.fn, self.optimizer = model, loss_fn, optimizer
        self.params = list(model.parameters())
        self.pool_x = pool_x
        self.device = pool_x[0].device
        self.dropout_applied = provider != MODEL_FLOOR and case.dropout > 0
        self.as_asked = True
        self.note = "frozen model: no adapters, no dropout" if provider == MODEL_FLOOR else ""
        self._i = 0

    def call(self) -> None:
        i = self._i = (self._i + 1) % len(self.pool_x)
        self.fn(self.pool_x[i]).backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.call()
        sync(self.device)


def _adamw(params):
    """HF Trainer's default optimizer (``adamw_torch_fused``); torch's default AdamW where fused is not built."""
    try:
        return torch.optim.AdamW(params, lr=1e-5, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, lr=1e-5)


def _base_model(case: ModelCase, seed: int):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=case.vocab, hidden_size=case.hidden, intermediate_size=case.intermediate,
        num_hidden_layers=case.layers, num_attention_heads=case.heads, num_key_value_heads=case.kv_heads,
        max_position_embeddings=max(case.seq, 32))
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(device=case.device, dtype=case.torch_dtype)
    model.train()
    return model


def _output_requires_grad(module, args, output):
    return output if output.requires_grad else output.requires_grad_(True)


def _grads_stop_at_the_targets(model) -> None:
    """Make the outputs of the LoRA targets of a frozen model require grad (the floor's backward: see above)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in LLAMA_TARGETS:
            module.register_forward_hook(_output_requires_grad)


def build_model_runners(case: ModelCase, providers, *, seed: int = 0, pool_size: int = 2):
    """({provider: ModelRunner}, {provider: error text}): every provider gets its own copy of one base model and
    of one PEFT model (so fastlora and PEFT start from the same adapters), and the same batches."""
    import peft

    import fastlora

    base = _base_model(case, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    pool_x = [torch.randint(0, case.vocab, (case.batch, case.seq), generator=gen).to(case.device)
              for _ in range(pool_size)]
    config = peft.LoraConfig(r=case.r, lora_alpha=2 * case.r, lora_dropout=case.dropout,
                             target_modules=list(LLAMA_TARGETS))
    peft_model = None
    runners, errors = {}, {}
    for p in providers:
        try:
            if p == MODEL_FLOOR:
                model = copy.deepcopy(base)
                model.requires_grad_(False)
                _grads_stop_at_the_targets(model)
            else:
                if peft_model is None:
                    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
                model = copy.deepcopy(peft_model)
                if p.startswith("fastlora"):
                    fastlora.accelerate_peft(model)
            model.train()
            trainable = [t for t in model.parameters() if t.requires_grad]
            run = torch.compile(model) if p.endswith("compiled") else model
            runners[p] = ModelRunner(case, p, model, lambda ids, run=run: run(input_ids=ids, labels=ids).loss,
                                     _adamw(trainable) if trainable else None, pool_x)
        except Exception as exc:  # noqa: BLE001 - recorded per provider (no compiler, no peft, ...)
            errors[p] = error_text(exc)
    return runners, errors


# ---------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------

def ratio_stats(num: dict, den: dict) -> dict | None:
    """num's time over den's: {"median", "q1", "q3", "per_round"}. From the per-round samples taken side by side
    where both timings have them (the median of the per-round ratios, and its quartiles), else the ratio of the
    medians (quartiles None)."""
    if not num.get("median_s") or not den.get("median_s"):
        return None
    a, b = num.get("rounds_s") or [], den.get("rounds_s") or []
    n = min(len(a), len(b))
    if n >= 2:
        ratios = sorted(x / y for x, y in zip(a[:n], b[:n]))
        q = n // 4
        return {"median": statistics.median(ratios), "q1": ratios[q], "q3": ratios[-1 - q], "per_round": True,
                "rounds": n}
    return {"median": num["median_s"] / den["median_s"], "q1": None, "q3": None, "per_round": False, "rounds": 0}


def _first_loss(runner: ModelRunner) -> float | None:
    """The loss of a forward on the first batch before any step (fastlora and PEFT start from the same weights,
    so at dropout 0 their losses must agree). With grad enabled, as the timed steps run: a compiled provider
    compiles its training graph here once, not an inference graph beside it."""
    try:
        return float(runner.fn(runner.pool_x[0]).detach())
    except Exception:  # noqa: BLE001
        return None


def time_rows(rows: dict, runners: dict, budget_s: float, min_reps: int) -> None:
    """Time ``runners`` interleaved (``time_case``, up to 1 s of warm-up) and put each provider's timing, median in ms
    and spread into its row, or the error it raised."""
    timings = time_case(runners, budget_s=budget_s, min_reps=min_reps, warmup_s=min(1.0, budget_s))
    for p, timing in timings.items():
        if isinstance(timing, BaseException):
            rows[p]["error"] = error_text(timing)
            continue
        rows[p].update(timing)
        rows[p]["time_ms"] = timing["median_s"] * 1e3
        rows[p]["spread"] = spread(timing)


def measure_model_case(case: ModelCase, providers, *, budget_s: float = 1.0, min_reps: int = 21,
                       seed: int = 0) -> list[dict]:
    """Build, time (interleaved) and measure every provider on one model case; one row per provider, with
    ``vs_floor`` (its time over the frozen model's) and ``fastlora_over`` (fastlora eager's time over its)."""
    rows = {p: {"provider": p, **dataclasses.asdict(case)} for p in providers}
    runners, errors = build_model_runners(case, providers, seed=seed)
    for p, why in errors.items():
        rows[p]["error"] = why
    try:
        for p, runner in runners.items():
            rows[p]["loss0"] = _first_loss(runner)
        time_rows(rows, runners, budget_s, min_reps)
        for p, runner in runners.items():
            if "error" in rows[p]:
                continue
            rows[p]["saved_bytes"] = or_none(saved_activation_bytes, runner)
            rows[p]["peak_bytes"] = or_none(peak_memory_bytes, runner)
            rows[p]["optimizer"] = (None if runner.optimizer is None else
                                    "AdamW (fused)" if runner.optimizer.defaults.get("fused") else "AdamW")
            if runner.note:
                rows[p]["note"] = runner.note
    finally:
        runners.clear()
        if torch.device(case.device).type == "cuda":
            torch.cuda.empty_cache()
    timed = {p: r for p, r in rows.items() if r.get("median_s")}
    for p, row in timed.items():
        if MODEL_FLOOR in timed:
            row["vs_floor"] = ratio_stats(row, timed[MODEL_FLOOR])
        if "fastlora" in timed and p != "fastlora":
            row["fastlora_over"] = ratio_stats(timed["fastlora"], row)
    return [rows[p] for p in providers]


def model_goals(rows: list[dict]) -> list[dict]:
    """The stated goals of each measured case's preset on its device: [{"text", "value", "threshold", "met",
    "dropout"}], met None where the comparison was not measured."""
    out = []
    by_case: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        key = (row["preset"], row["device"], row["r"], row["dropout"], row["dtype"])
        by_case.setdefault(key, {})[row["provider"]] = row
    for (preset, device, r, p, dtype), group in by_case.items():
        goals = MODEL_GOALS.get((preset, torch.device(device).type))
        if not goals:
            continue
        limit = goals["floor"].get(p)
        if limit is not None:
            ratio = group.get("fastlora", {}).get("vs_floor")
            out.append(goal(f"fastlora eager ÷ frozen model ≤ {limit:g}", p, ratio, limit))
        for ours, peer in goals["not_slower"]:
            ratio = ratio_stats(group[ours], group[peer]) if ours in group and peer in group else None
            out.append(goal(f"{MODEL_NAMES[ours]} ÷ {MODEL_NAMES[peer]} ≤ 1", p, ratio, 1.0))
    return out


def goal(text, p, ratio, limit):
    value = None if ratio is None else ratio["median"]
    return {"text": text, "dropout": p, "value": value, "threshold": limit,
            "iqr": None if ratio is None else (ratio["q1"], ratio["q3"]),
            "met": None if value is None else value <= limit}


# ---------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------

def ratio_cell(r: dict | None) -> str:
    if r is None:
        return "–"
    if r["q1"] is None:
        return f"{r['median']:.3f}"
    return f"{r['median']:.3f} [{r['q1']:.3f}–{r['q3']:.3f}]"


def mib(b) -> str:
    return "–" if b is None else f"{b / 2**20:.1f}"


MODEL_HEADER = ["p", "provider", "step ms", "IQR", "time ÷ frozen [IQR]", "fastlora eager ÷ it [IQR]", "saved MiB",
                "peak MiB"]


def model_table(rows: list[dict]) -> list[list[str]]:
    body = []
    for row in rows:
        med = row.get("time_ms")
        body.append([f"{row['dropout']:g}", MODEL_NAMES[row["provider"]],
                     "err" if med is None else f"{med:.1f}",
                     "–" if row.get("spread") is None else f"{100 * row['spread']:.0f}%",
                     ratio_cell(row.get("vs_floor")) if row["provider"] != MODEL_FLOOR else "1",
                     ratio_cell(row.get("fastlora_over")) if row["provider"] != "fastlora" else "1",
                     mib(row.get("saved_bytes")), mib(row.get("peak_bytes"))])
    return body


def _loss_lines(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        if row["provider"] != "fastlora" or row["dropout"] != 0.0 or row.get("loss0") is None:
            continue
        peft_row = next((r for r in rows if r["provider"] == "peft" and r["dropout"] == 0.0 and r["r"] == row["r"]
                         and r.get("loss0") is not None), None)
        if peft_row is not None:
            a, b = row["loss0"], peft_row["loss0"]
            same = "bit-identical" if a == b else f"differ by {abs(a - b):.3g}"
            lines.append(f"loss before the first step at p=0 (r={row['r']}): fastlora {a:.7f}, PEFT {b:.7f}: {same}")
    return lines


def goal_line(g) -> str:
    verdict = {True: "MET", False: "MISSED", None: "NO DATA"}[g["met"]]
    iqr = "" if not g["iqr"] or g["iqr"][0] is None else f" [{g['iqr'][0]:.3f}–{g['iqr'][1]:.3f}]"
    value = "–" if g["value"] is None else f"{g['value']:.3f}{iqr}"
    return f"p={g['dropout']:g}: {g['text']}: {value} {verdict}"


def text_head(title: str, meta: dict) -> list:
    """The first lines of a case set's text report: the command, device, torch, date, timer, then each case."""
    from .report import wrap

    parts = [wrap(f"fastlora bench --{title} on {meta['device']} ({meta['device_name']}), torch {meta['torch']}, "
                  f"{meta['date_utc']}; timer: {meta['timer']}; ratios: {meta['ratios']}")]
    for desc in dict.fromkeys(meta["cases"]):
        parts += ["", wrap(desc)]
    return parts


def text_tail(results: list, names: dict) -> list:
    """The last lines of a case set's text report: the busy-machine note and the providers' errors."""
    from .report import busy_note, wrap

    parts = []
    busy = busy_note(results)
    if busy:
        parts += ["", wrap(busy)]
    errors = sorted({f"  {names[r['provider']]}: {r['error']}" for r in results if r.get("error")})
    if errors:
        parts += ["", "Errors:"] + [wrap(e) for e in errors]
    return parts


def markdown_head(title: str, meta: dict) -> list:
    """The first lines of a case set's markdown report: title, command, device, versions, then each case."""
    lines = [f"# fastlora bench --{title}", "", f"- command: `{meta['command']}`",
             f"- device: {meta['device']} — {meta['device_name']}; date: {meta['date_utc']}",
             f"- torch {meta['torch']}, triton {meta['triton']}, fastlora {meta['fastlora']}, "
             f"{meta['torch_threads']} torch threads; timer: {meta['timer']}; ratios: {meta['ratios']}"]
    return lines + [f"- {desc}" for desc in dict.fromkeys(meta["cases"])]


def render_model_text(report: dict) -> str:
    from .report import text_table

    parts = text_head("model", report["meta"])
    parts += ["", text_table(MODEL_HEADER, model_table(report["results"]), left=2)]
    parts += _loss_lines(report["results"])
    if report["goals"]:
        parts += ["", "Goals (medians of per-round ratios; ≤ is better):"] + ["  " + goal_line(g)
                                                                                 for g in report["goals"]]
    parts += text_tail(report["results"], MODEL_NAMES)
    return "\n".join(parts)


def render_model_markdown(report: dict) -> str:
    from .report import busy_note, md_table

    lines = markdown_head("model", report["meta"])
    lines += ["", md_table(MODEL_HEADER, model_table(report["results"]), left=2)]
    lines += [f"\n{line}" for line in _loss_lines(report["results"])]
    if report["goals"]:
        lines += ["", "Goals (medians of per-round ratios; ≤ is better):", ""]
        lines += [f"- {goal_line(g)}" for g in report["goals"]]
    busy = busy_note(report["results"])
    if busy:
        lines += ["", busy]
    errors = sorted({f"{MODEL_NAMES[r['provider']]}: {r['error']}" for r in report["results"] if r.get("error")})
    if errors:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in errors]
    return "\n".join(lines) + "\n"


def measure_cases(cases, providers, measure, budget_s: float, min_reps: int):
    """(rows, start time): ``measure(case, providers, budget_s=, min_reps=)`` for every case in turn, a progress line
    each on stderr; Ctrl-C stops and keeps what was measured."""
    t0 = time.perf_counter()
    rows = []
    try:
        for case in cases:
            rows += measure(case, providers, budget_s=budget_s, min_reps=min_reps)
            print(f"  measured {case.label()} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"\ninterrupted: reporting the {len(rows)} measurements done", file=sys.stderr)
    return rows, t0


def case_set_meta(device, dtype, providers, cases, rows, budget, min_reps, t0, args, **extra) -> dict:
    """The report's meta of a model-level or MoE case set: the environment, what ran (``extra``: the preset or
    presets), the timers and how the ratios were taken, the command."""
    from .run import environment

    meta = environment(device)
    timers = sorted({r["timer"] for r in rows if r.get("timer")})
    meta.update({"device": device, "dtype": dtype, **extra, "providers": providers,
                 "cases": [c.describe() for c in cases], "budget_s": budget, "min_rounds": min_reps,
                 "timer": ", ".join(timers) or "none", "wall_s": round(time.perf_counter() - t0, 1),
                 "ratios": ("medians of per-round ratios" if any((r.get("vs_floor") or {}).get("per_round")
                                                                 for r in rows) else "ratios of medians"),
                 "command": " ".join(["python -m fastlora bench"] + list(getattr(args, "argv", []) or []))})
    return meta


def write_report(report: dict, out, text: str, markdown: str, stream) -> None:
    """Print the text report and write results.json and results.md into ``out``."""
    print(text, file=stream)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown)
    print(f"wrote {out / 'results.json'}\nwrote {out / 'results.md'}", file=stream)


def run_model_cli(args, device: str, stream=None) -> int:
    """``python -m fastlora bench --model PRESET``: the model-level case set on ``device``."""
    from .cases import DTYPE_NAMES, DTYPES

    stream = stream if stream is not None else sys.stdout
    preset = DEFAULT_MODEL[torch.device(device).type] if args.model == "auto" else args.model
    asked = args.providers or MODEL_PROVIDERS
    if set(MODEL_PROVIDERS) <= set(asked):  # "all"
        asked = MODEL_PROVIDERS
    providers = ["fastlora"] + [p for p in asked if p != "fastlora"]
    bad = [p for p in providers if p not in MODEL_PROVIDERS]
    dtype = DTYPE_NAMES[DTYPES[args.dtype]] if args.dtype else ("bfloat16" if device.startswith("cuda") else "float32")
    try:
        if bad:
            raise ValueError(f"--model runs providers {', '.join(MODEL_PROVIDERS)}; not {', '.join(bad)}")
        cases = model_cases(preset, args.dropout if args.dropout is not None else MODEL_DROPOUTS,
                            args.rank or [16], dtype, device)
    except ValueError as exc:
        print(f"fastlora bench: error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    min_reps = 5 if args.quick else 21
    budget = args.budget if args.budget is not None else 0.5
    from .report import wrap

    print(wrap(f"fastlora bench --model {preset}: {len(cases)} case(s) × {len(providers)} providers on {device} "
                f"({dtype}), at least {min_reps} interleaved rounds; results to {args.out}/"), file=stream)
    rows, t0 = measure_cases(cases, providers, measure_model_case, budget, min_reps)
    meta = case_set_meta(device, dtype, providers, cases, rows, budget, min_reps, t0, args, preset=preset)
    report = {"meta": meta, "results": rows, "goals": model_goals(rows)}
    write_report(report, args.out, render_model_text(report), render_model_markdown(report), stream)
    timed = [r for r in rows if r["provider"] == "fastlora" and r.get("median_s")]
    return 0 if timed and len(rows) == len(cases) * len(providers) else 1
