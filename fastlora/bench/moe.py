r"""The mixture-of-experts case set (``python -m fastlora bench --moe ...``): one sparse MoE block (router,
top-k routing, the experts' gate/up and down projections, routing weights) forward + backward, with LoRA on the
expert parameters as PEFT's ``target_parameters`` puts it there.

A case is the MoE block of a random-weight transformers model (the first decoder layer's ``mlp`` of a one-layer
model built from a config, so nothing is downloaded and the experts implementation is transformers' default,
``grouped_mm`` where torch has it), a batch of hidden states that requires grad (a block inside a model
back-propagates to its input), and one step: the block's forward, and the backward of a fixed output gradient.
The providers, each on its own copy of the same weights:

* ``fastlora``  PEFT's ``ParamWrapper``s (``LoraConfig(target_parameters=[gate_up_proj, down_proj])``) routed
                through fastlora's experts fuser (``fastlora.accelerate_peft``);
* ``peft``      PEFT's own path: a parametrization that builds every expert's W + ΔW on each forward;
* ``base``      the frozen block without adapters: the floor.

Timing and memory are the bench engine's (interleaved rounds on the CPU, CUDA events on a GPU; the bytes autograd
saves in one forward, parameters and the input excluded).
"""
from __future__ import annotations

import copy
import dataclasses
import sys

import torch

from .memory import peak_memory_bytes, saved_activation_bytes
from .model import (case_set_meta, goal, goal_line, markdown_head, measure_cases, mib, ratio_cell, ratio_stats,
                    text_head, text_tail, time_rows, write_report)
from .providers import sync
from .run import error_text, or_none

MOE_PROVIDERS = ("fastlora", "peft", "base")
MOE_FLOOR = "base"
MOE_NAMES = {"fastlora": "fastlora", "peft": "PEFT", "base": "frozen block"}
MOE_TARGETS = ("gate_up_proj", "down_proj")

# (family, hidden, expert intermediate, experts, top-k, tokens)
MOE_PRESETS = {
    # the CPU case of issue 22: a Qwen3-MoE block, 16 experts, top-2, 512 tokens (fp32)
    "qwen3-moe-small": dict(family="qwen3_moe", hidden=512, intermediate=256, experts=16, top_k=2, tokens=512),
    # GPT-OSS's block (expert biases, its clamped SwiGLU, (E, in, out) stacks), scaled like the above
    "gpt-oss-small": dict(family="gpt_oss", hidden=512, intermediate=256, experts=16, top_k=2, tokens=512),
    # Qwen3-30B-A3B's MoE block: hidden 2048, 128 experts of 768, top-8, 4096 tokens (GPU, bf16)
    "qwen3-30b-a3b": dict(family="qwen3_moe", hidden=2048, intermediate=768, experts=128, top_k=8, tokens=4096),
    # Mixtral-8x7B's block: hidden 4096, 8 experts of 14336, top-2, 2048 tokens (GPU, bf16)
    "mixtral-8x7b": dict(family="mixtral", hidden=4096, intermediate=14336, experts=8, top_k=2, tokens=2048),
    # GPT-OSS-20B's block: hidden 2880, 32 experts of 2880, top-4, 4096 tokens (GPU, bf16)
    "gpt-oss-20b": dict(family="gpt_oss", hidden=2880, intermediate=2880, experts=32, top_k=4, tokens=4096),
}
MOE_SETS = {"cpu": ("qwen3-moe-small", "gpt-oss-small"), "cuda": ("qwen3-30b-a3b", "mixtral-8x7b", "gpt-oss-20b")}

# Goals per device type: fastlora's step over the frozen block's (≤), and PEFT's step over fastlora's (≥).
MOE_GOALS = {"cpu": {"floor": 1.3, "peft_over": None}, "cuda": {"floor": 1.15, "peft_over": 3.0}}


@dataclasses.dataclass(frozen=True)
class MoECase:
    preset: str
    family: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    tokens: int
    r: int = 16
    dtype: str = "float32"
    device: str = "cpu"
    mode: str = "forward+backward"

    training = True
    dropout = 0.0  # PEFT's ParamWrapper refuses dropout

    def __post_init__(self):
        if min(self.hidden, self.intermediate, self.experts, self.top_k, self.tokens, self.r) < 1:
            raise ValueError(f"every size of an MoE case must be >= 1, got {self}")
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds the number of experts ({self.experts})")

    @property
    def torch_dtype(self) -> torch.dtype:
        from .cases import DTYPES

        return DTYPES[self.dtype]

    def label(self) -> str:
        return f"{self.preset} r={self.r} {self.dtype}"

    def describe(self) -> str:
        return (f"{self.preset}: a random {self.family} MoE block (hidden {self.hidden}, {self.experts} experts of "
                f"{self.intermediate}, top-{self.top_k}), {self.tokens} tokens, LoRA r={self.r} alpha={2 * self.r} "
                f"on the experts' {' and '.join(MOE_TARGETS)}, {self.dtype} on {self.device}; one step = forward "
                "and backward (to the block's input and the adapters)")


def moe_cases(presets, ranks, dtype: str, device: str) -> list[MoECase]:
    out = []
    for preset in presets:
        if preset not in MOE_PRESETS:
            raise ValueError(f"unknown MoE preset {preset!r}: choose from {', '.join(MOE_PRESETS)}")
        out += [MoECase(preset, **MOE_PRESETS[preset], r=r, dtype=dtype, device=device) for r in ranks]
    return out


def moe_block(family: str, hidden: int, intermediate: int, experts: int, top_k: int, seed: int = 0):
    """The MoE block (``model.layers[0].mlp``) of a one-layer random-weight model of ``family``."""
    import transformers

    common = dict(vocab_size=128, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=max(hidden // 4, 8), num_experts_per_tok=top_k)
    torch.manual_seed(seed)
    if family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(intermediate_size=intermediate, moe_intermediate_size=intermediate,
                                          num_experts=experts, decoder_sparse_step=1, **common)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    elif family == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=intermediate, num_local_experts=experts, **common)
        model = transformers.MixtralForCausalLM(cfg)
    elif family == "gpt_oss":
        cfg = transformers.GptOssConfig(intermediate_size=intermediate, num_local_experts=experts, **common)
        model = transformers.GptOssForCausalLM(cfg)
    else:
        raise ValueError(f"unknown MoE family {family!r}: qwen3_moe, mixtral or gpt_oss")
    block = model.model.layers[0].mlp
    with torch.no_grad():  # spread the routing over the experts (a zero router sends every token to the same ones)
        for name, p in block.named_parameters():
            p.normal_(0, 0.02 if "experts" in name else 1.0 / hidden ** 0.5)
    return block


class MoERunner:
    """One provider's block on one case, with the interface the timing and memory code use."""

    def __init__(self, case: MoECase, provider: str, block, pool_x: list, pool_dy: list):
        self.case, self.provider = case, provider
        self.block = block
        self.fn = self.forward
        self.params = list(block.parameters())
        self.pool_x, self.pool_dy = pool_x, pool_dy
        self.device = pool_x[0].device
        self.dropout_applied = False
        self.as_asked = True
        self.note = "frozen block: no adapters" if provider == MOE_FLOOR else ""
        self._i = 0

    def call(self) -> None:
        i = self._i = (self._i + 1) % len(self.pool_x)
        x = self.pool_x[i]
        trained = [x] + [p for p in self.params if p.requires_grad]
        torch.autograd.grad(self.forward(x), trained, self.pool_dy[i])

    def forward(self, x):
        """The block's hidden states (GPT-OSS's MLP also returns its router scores)."""
        out = self.block(x)
        return out[0] if isinstance(out, tuple) else out

    def step(self) -> None:
        self.call()
        sync(self.device)


def build_moe_runners(case: MoECase, providers, *, seed: int = 0, pool_size: int = 2):
    import peft

    import fastlora

    base = moe_block(case.family, case.hidden, case.intermediate, case.experts, case.top_k, seed)
    base = base.to(device=case.device, dtype=case.torch_dtype)
    base.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 1)
    pool_x = [torch.randn(1, case.tokens, case.hidden, generator=gen).to(case.device, case.torch_dtype)
              .requires_grad_() for _ in range(pool_size)]
    pool_dy = [torch.randn(1, case.tokens, case.hidden, generator=gen).to(case.device, case.torch_dtype)
               for _ in range(pool_size)]
    config = peft.LoraConfig(r=case.r, lora_alpha=2 * case.r, target_modules=[],
                             target_parameters=[f"experts.{t}" for t in MOE_TARGETS], init_lora_weights=False)
    peft_block = None
    runners, errors = {}, {}
    for p in providers:
        try:
            if p == MOE_FLOOR:
                block = copy.deepcopy(base)
            else:
                if peft_block is None:
                    import warnings

                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        peft_block = peft.get_peft_model(copy.deepcopy(base), config)
                block = copy.deepcopy(peft_block)
                if p == "fastlora":
                    fastlora.accelerate_peft(block)
            block.train()
            runners[p] = MoERunner(case, p, block, pool_x, pool_dy)
        except Exception as exc:  # noqa: BLE001 - recorded per provider
            errors[p] = error_text(exc)
    return runners, errors


def measure_moe_case(case: MoECase, providers, *, budget_s: float = 0.5, min_reps: int = 21,
                     seed: int = 0) -> list[dict]:
    """Build, time (interleaved) and measure every provider on one case; one row per provider, with ``vs_floor``
    (its time over the frozen block's) and ``over_fastlora`` (its time over fastlora's)."""
    rows = {p: {"provider": p, **dataclasses.asdict(case)} for p in providers}
    runners, errors = build_moe_runners(case, providers, seed=seed)
    for p, why in errors.items():
        rows[p]["error"] = why
    try:
        time_rows(rows, runners, budget_s, min_reps)
        for p, runner in runners.items():
            if "error" not in rows[p]:
                rows[p]["saved_bytes"] = or_none(saved_activation_bytes, runner, include_input=False)
                rows[p]["peak_bytes"] = or_none(peak_memory_bytes, runner)
    finally:
        runners.clear()
        if torch.device(case.device).type == "cuda":
            torch.cuda.empty_cache()
    timed = {p: r for p, r in rows.items() if r.get("median_s")}
    for p, row in timed.items():
        if MOE_FLOOR in timed:
            row["vs_floor"] = ratio_stats(row, timed[MOE_FLOOR])
        if "fastlora" in timed and p != "fastlora":
            row["over_fastlora"] = ratio_stats(row, timed["fastlora"])
    return [rows[p] for p in providers]


def moe_goals(rows: list[dict]) -> list[dict]:
    """fastlora ÷ frozen block ≤ the device's limit; PEFT ÷ fastlora ≥ its limit where one is set."""
    out = []
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        groups.setdefault((row["preset"], row["device"], row["r"], row["dtype"]), {})[row["provider"]] = row
    for (preset, device, r, dtype), group in groups.items():
        goals = MOE_GOALS[torch.device(device).type]
        g = goal(f"{preset} r={r}: fastlora ÷ frozen block ≤ {goals['floor']:g}", 0.0,
                  group.get("fastlora", {}).get("vs_floor"), goals["floor"])
        out.append(g)
        if goals["peft_over"] is not None:
            ratio = group.get("peft", {}).get("over_fastlora")
            value = None if ratio is None else ratio["median"]
            out.append({"text": f"{preset} r={r}: PEFT ÷ fastlora ≥ {goals['peft_over']:g}", "dropout": 0.0,
                        "value": value, "threshold": goals["peft_over"],
                        "iqr": None if ratio is None else (ratio["q1"], ratio["q3"]),
                        "met": None if value is None else value >= goals["peft_over"]})
    return out


MOE_HEADER = ["case", "provider", "step ms", "IQR", "time ÷ frozen [IQR]", "time ÷ fastlora [IQR]", "saved MiB",
              "peak MiB"]


def moe_table(rows: list[dict]) -> list[list[str]]:
    body = []
    for row in rows:
        med = row.get("time_ms")
        body.append([f"{row['preset']} r={row['r']}", MOE_NAMES[row["provider"]],
                     "err" if med is None else f"{med:.1f}",
                     "–" if row.get("spread") is None else f"{100 * row['spread']:.0f}%",
                     ratio_cell(row.get("vs_floor")) if row["provider"] != MOE_FLOOR else "1",
                     ratio_cell(row.get("over_fastlora")) if row["provider"] != "fastlora" else "1",
                     mib(row.get("saved_bytes")), mib(row.get("peak_bytes"))])
    return body


def render_moe_text(report: dict) -> str:
    from .report import text_table, wrap

    meta = report["meta"]
    parts = text_head("moe", meta)
    parts += ["", text_table(MOE_HEADER, moe_table(report["results"]), left=2)]
    parts += ["", wrap("saved MiB: what autograd keeps for backward in one forward, the parameters and the block's "
                        "input excluded.")]
    if report["goals"]:
        parts += ["", "Goals (medians of per-round ratios):"] + ["  " + goal_line(g)[len("p=0: "):]
                                                                 for g in report["goals"]]
    if meta.get("moe_paths"):
        parts += ["", "Compositions measured (FASTLORA_MOE_PATH pins one):"]
        parts += [f"  {' '.join(p['key'])}: {p['choice']} "
                  + ", ".join(f"{n} {ms:.3f} ms" for n, ms in p["ms"].items()) for p in meta["moe_paths"]]
    parts += text_tail(report["results"], MOE_NAMES)
    return "\n".join(parts)


def render_moe_markdown(report: dict) -> str:
    from .report import busy_note, md_table

    lines = markdown_head("moe", report["meta"])
    lines += ["", md_table(MOE_HEADER, moe_table(report["results"]), left=2)]
    if report["goals"]:
        lines += ["", "Goals (medians of per-round ratios):", ""]
        lines += [f"- {goal_line(g)[len('p=0: '):]}" for g in report["goals"]]
    busy = busy_note(report["results"])
    if busy:
        lines += ["", busy]
    return "\n".join(lines) + "\n"


def run_moe_cli(args, device: str, stream=None) -> int:
    """``python -m fastlora bench --moe PRESET[,PRESET...]|auto``: the MoE case set on ``device``. Exit code 0 when
    every goal was met, 3 when one was missed, 1 when nothing was timed."""
    from .cases import DTYPE_NAMES, DTYPES
    from .report import wrap

    stream = stream if stream is not None else sys.stdout
    kind = torch.device(device).type
    presets = MOE_SETS.get(kind, MOE_SETS["cpu"]) if args.moe == "auto" else tuple(
        p.strip() for p in args.moe.split(",") if p.strip())
    asked = args.providers or MOE_PROVIDERS
    providers = ["fastlora"] + [p for p in MOE_PROVIDERS if p != "fastlora" and p in asked]
    dtype = DTYPE_NAMES[DTYPES[args.dtype]] if args.dtype else ("bfloat16" if kind == "cuda" else "float32")
    try:
        cases = moe_cases(presets, args.rank or [16], dtype, device)
    except ValueError as exc:
        print(f"fastlora bench: error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    min_reps = 5 if args.quick else 21
    budget = args.budget if args.budget is not None else 0.5
    print(wrap(f"fastlora bench --moe: {len(cases)} case(s) × {len(providers)} providers on {device} ({dtype}), at "
                f"least {min_reps} interleaved rounds; results to {args.out}/"), file=stream)
    rows, t0 = measure_cases(cases, providers, measure_moe_case, budget, min_reps)
    meta = case_set_meta(device, dtype, providers, cases, rows, budget, min_reps, t0, args, presets=list(presets))
    if kind == "cuda":  # which composition the measured choice took for each problem, with both times
        from fastlora.kernels import moe as moe_kernels

        meta["moe_paths"] = [{"key": [str(k) for k in key], "choice": choice, "ms": times}
                             for key, choice, times in moe_kernels._path_choice().report()]
    report = {"meta": meta, "results": rows, "goals": moe_goals(rows)}
    write_report(report, args.out, render_moe_text(report), render_moe_markdown(report), stream)
    timed = [r for r in rows if r["provider"] == "fastlora" and r.get("median_s")]
    if not timed or len(rows) < len(cases) * len(providers):
        return 1
    return 3 if any(g["met"] is False for g in report["goals"]) else 0
