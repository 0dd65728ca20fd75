"""From rows to verdicts: fastlora's speed-up over each peer per case, which comparisons are valid and
trustworthy, geometric means over the grid and the stated performance goals.

* speed-up over a peer = peer time / fastlora time: higher is better, > 1 means fastlora is faster;
* the frozen linear (``base``) is the floor, not a peer: against it the report gives fastlora's overhead,
  fastlora time / base time − 1, in percent (0% would be a LoRA branch that costs nothing);
* a comparison is **excluded** when the peer could not run the case as asked (``as_asked`` False: the W+BA
  reconstruction with dropout > 0 runs without dropout): shown flagged, never in a geometric mean or a goal;
* a comparison is **noisy** when either timing's spread (IQR / median) exceeds ``NOISY_SPREAD``: shown
  flagged and counted, so that a reader knows the ratio may be off by about that much.
"""
from __future__ import annotations

import math

from .cases import MODES
from .providers import FLOOR, PROVIDERS

NOISY_SPREAD = 0.10

# Performance goals, named by what they measure. (mode, peer) → (description, kind, threshold): "speedup" is
# peer time / fastlora time (≥ threshold), "overhead" is fastlora time / floor time (≤ threshold); both as
# geometric means over the comparable cases of the grid (restricted to GOAL_DROPOUT's rates where given).
GOALS = {
    # The PyTorch fallback on a CPU: square-2048 shape, fp32, r = 16, dropout 0.
    "cpu-fallback": {
        ("forward+backward", "naive"): ("fwd+bwd speed-up vs W+BA", "speedup", 1.3),
        ("forward+backward", "peft"): ("fwd+bwd speed-up vs PEFT math", "speedup", 1.0),
        ("forward+backward", "base"): ("fwd+bwd time vs frozen linear", "overhead", 1.10),
    },
    # The Triton kernels on an H100-class GPU: llm-grid shapes, bf16, r = 16, dropout 0 and 0.1.
    "cuda-kernels": {
        ("forward+backward", "peft"): ("fwd+bwd speed-up vs PEFT math", "speedup", 1.3),
        ("forward+backward", "base"): ("fwd+bwd time vs frozen linear", "overhead", 1.15),
        ("forward", "base"): ("fwd time vs frozen linear", "overhead", 1.08),
        ("forward+backward", "naive"): ("fwd+bwd speed-up vs W+BA", "speedup", 1.4),
    },
}
GOAL_DROPOUT = {"cpu-fallback": (0.0,), "cuda-kernels": None}  # None: every dropout rate of the grid
GOAL_HELP = {
    "cpu-fallback": "the PyTorch fallback on CPU (run with --shapes square-2048 --rank 16 --dropout 0): "
                    "≥1.3× W+BA, ≥1.0× PEFT's math, ≤10% over the frozen linear, fwd+bwd",
    "cuda-kernels": "the Triton kernels on an H100-class GPU (llm-grid, bf16, r=16): ≥1.3× PEFT's math, "
                    "≥1.4× W+BA, ≤15% (fwd+bwd) and ≤8% (fwd) over the frozen linear",
}

CASE_FIELDS = ("mode", "M", "K", "N", "r", "dtype", "dropout", "bias", "device")
MODE, M, K, N, R, DTYPE, DROPOUT = range(7)  # positions in a case key


def case_key(row: dict) -> tuple:
    return tuple(row[f] for f in CASE_FIELDS)


def group_by_case(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """{case key: {provider: row}}, in the order the cases were measured."""
    out: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        out.setdefault(case_key(row), {})[row["provider"]] = row
    return out


def geomean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def comparisons(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """{case key: {other provider: {"speedup", "as_asked", "noisy"}}} for every case where fastlora and that
    provider were both timed. ``speedup`` is other time / fastlora time (for the floor it is ≤ 1 in practice:
    read it as the overhead 1/speedup − 1)."""
    out = {}
    for key, group in group_by_case(rows).items():
        fl = group.get("fastlora", {})
        if not fl.get("median_s"):
            continue
        entry = {}
        for p, g in group.items():
            if p == "fastlora" or not g.get("median_s"):
                continue
            spreads = [s for s in (fl.get("spread"), g.get("spread")) if s is not None]
            entry[p] = {"speedup": g["median_s"] / fl["median_s"], "as_asked": g.get("as_asked", True),
                        "noisy": bool(spreads) and max(spreads) > NOISY_SPREAD}
        out[key] = entry
    return out


def speedups(rows: list[dict]) -> dict[tuple, dict[str, float]]:
    """{case key: {provider: its time / fastlora time}}, flagged comparisons included."""
    return {k: {p: c["speedup"] for p, c in v.items()} for k, v in comparisons(rows).items()}


def summarize(rows: list[dict], goals: str | None = None) -> list[dict]:
    """Per mode and peer: the geometric mean of fastlora's speed-up over the comparable cases (excluded ones are
    counted apart), its range, and how many of those cases were noisy. The floor gets the geometric-mean
    overhead. With ``goals`` (a key of GOALS), each goal of that set with its measured value and verdict."""
    if goals is not None and goals not in GOALS:
        raise ValueError(f"goals must be one of {sorted(GOALS)}, got {goals!r}")
    comp = comparisons(rows)
    summary = []
    for mode in MODES:
        in_mode = {k: v for k, v in comp.items() if k[MODE] == mode}
        others = sorted({p for v in in_mode.values() for p in v}, key=lambda p: (p == FLOOR, PROVIDERS.index(p)))
        for peer in others:
            valid = {k: v[peer] for k, v in in_mode.items() if peer in v and v[peer]["as_asked"]}
            excluded = sum(1 for v in in_mode.values() if peer in v and not v[peer]["as_asked"])
            vals = [c["speedup"] for c in valid.values()]
            g = geomean(vals)
            entry = {"mode": mode, "peer": peer, "floor": peer == FLOOR, "cases": len(vals), "excluded": excluded,
                     "noisy": sum(c["noisy"] for c in valid.values()), "geomean_speedup": g,
                     "geomean_overhead_pct": (100.0 / g - 100.0) if g and peer == FLOOR else None,
                     "min_speedup": min(vals) if vals else None, "max_speedup": max(vals) if vals else None}
            goal = GOALS.get(goals or "", {}).get((mode, peer))
            if goal:
                rates = GOAL_DROPOUT[goals]
                goal_vals = [c["speedup"] for k, c in valid.items() if rates is None or k[DROPOUT] in rates]
                goal_g = geomean(goal_vals)
                text, kind, threshold = goal
                value = None if goal_g is None else (goal_g if kind == "speedup" else 1.0 / goal_g)
                met = None if value is None else (value >= threshold if kind == "speedup" else value <= threshold)
                entry["goal"] = {"set": goals, "text": text, "kind": kind, "threshold": threshold, "value": value,
                                 "met": met, "dropout": list(rates) if rates is not None else "all",
                                 "cases": len(goal_vals)}
            summary.append(entry)
    return summary
