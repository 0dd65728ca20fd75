"""From rows to verdicts: fastlora's speed-up over each peer per case, which comparisons are valid and
trustworthy, geometric means over the grid and the stated performance goals.

* speed-up over a peer = peer time / fastlora time (medians): higher is better, > 1 means fastlora is faster;
  with it goes its 95% interval (``ci``, from the timings' samples, see ``timing.ratio_interval``) and ``noise``,
  the interval's larger half-width relative to the speed-up;
* the frozen linear (``base``) is the floor, not a peer: against it the report gives fastlora's overhead,
  fastlora time / base time − 1, in percent (0% would be a LoRA branch that costs nothing);
* a comparison is **excluded** when the peer could not run the case as asked (``as_asked`` False: the W+BA
  reconstruction with dropout > 0 runs without dropout): shown flagged, never in a geometric mean or a goal;
* a comparison is **noisy** when either timing's spread (IQR / median) exceeds ``NOISY_SPREAD``, either timing is
  bimodal, the machine was too busy to get clean rounds, or the interval is wider than ± ``NOISY_SPREAD``:
  shown flagged and counted, with the reasons, so that a reader knows the ratio may be off by about that much;
* a goal is **met** when its geometric mean clears the threshold across the whole interval, **missed** when the
  whole interval falls short, and **undecided** when the interval straddles the threshold (a noisy comparison
  counts with an interval of at least ± ``NOISY_SPREAD``) or a counted case was timed on a busy machine (its
  rounds were slowed by other processes, a bias that no interval covers).
"""
from __future__ import annotations

import math

from .cases import MODES
from .providers import FLOOR, PROVIDERS
from .timing import NOISY_SPREAD

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
    "cpu-fallback": "the PyTorch fallback on CPU (run with --device cpu --shapes square-2048 --rank 16): ≥1.3× "
                    "W+BA, ≥1.0× PEFT's math, ≤10% over the frozen linear; counts the forward+backward cases at "
                    "dropout 0 (other rates are reported, not counted)",
    "cuda-kernels": "the Triton kernels on an H100-class GPU (llm-grid, bf16, r=16): ≥1.3× PEFT's math, "
                    "≥1.4× W+BA, ≤15% (fwd+bwd) and ≤8% (fwd) over the frozen linear; counts every dropout rate",
}


def goal_requirements(goals: str, modes, dropouts, providers) -> list[str]:
    """What a grid of ``modes`` × ``dropouts`` with ``providers`` lacks for the goal set ``goals`` to count at
    least one case per goal, in words; empty when every goal can be checked."""
    rates = GOAL_DROPOUT[goals]
    missing = []
    for (mode, peer), (text, _, _) in GOALS[goals].items():
        lacks = []
        if mode not in modes:
            lacks.append(f"--modes {mode}")
        if peer not in providers:
            lacks.append(f"provider {peer}")
        if rates is not None and not set(rates) & set(dropouts):
            lacks.append("--dropout " + ",".join(f"{p:g}" for p in rates))
        if lacks:
            missing.append(f"{text} needs " + " and ".join(lacks))
    return missing


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


def noise_reasons(fl: dict, other: dict, other_name: str) -> list[str]:
    """Why a comparison between fastlora's row and another's cannot be trusted to ± NOISY_SPREAD (empty: it can)."""
    reasons = []
    if fl.get("busy") or other.get("busy"):
        reasons.append("machine busy: " + (fl.get("busy_why") or other.get("busy_why") or "too few clean rounds"))
    for name, row in (("fastlora", fl), (other_name, other)):
        s = row.get("spread")
        if s is not None and s > NOISY_SPREAD:
            reasons.append(f"{name} spread {s:.0%}")
        if row.get("bimodal"):
            reasons.append(f"{name} bimodal")
    return reasons


def comparisons(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """{case key: {other provider: {"speedup", "ci", "noise", "as_asked", "noisy", "why"}}} for every case where
    fastlora and that provider were both timed. ``speedup`` is other time / fastlora time (for the floor it is
    ≤ 1 in practice: read it as the overhead 1/speedup − 1); ``ci`` its 95% interval or None; ``noise`` the
    interval's larger half-width over the speed-up; ``why`` the reasons it is ``noisy``."""
    out = {}
    for key, group in group_by_case(rows).items():
        fl = group.get("fastlora", {})
        if not fl.get("median_s"):
            continue
        entry = {}
        for p, g in group.items():
            if p == "fastlora" or not g.get("median_s"):
                continue
            speedup = g["median_s"] / fl["median_s"]
            ci = tuple(g["speedup_ci"]) if g.get("speedup_ci") else None
            noise = max(ci[1] / speedup - 1, 1 - ci[0] / speedup, 0.0) if ci else None
            why = noise_reasons(fl, g, p)
            if noise is not None and noise > NOISY_SPREAD:
                why.append(f"interval ±{noise:.0%}")
            entry[p] = {"speedup": speedup, "ci": ci, "noise": noise, "as_asked": g.get("as_asked", True),
                        "noisy": bool(why), "why": why, "busy": bool(fl.get("busy") or g.get("busy"))}
        out[key] = entry
    return out


def speedups(rows: list[dict]) -> dict[tuple, dict[str, float]]:
    """{case key: {provider: its time / fastlora time}}, flagged comparisons included."""
    return {k: {p: c["speedup"] for p, c in v.items()} for k, v in comparisons(rows).items()}


def _band(c: dict) -> tuple[float, float]:
    """The interval a goal counts for one comparison: its ci, at least ± NOISY_SPREAD when flagged noisy (the
    report's own warning: such a ratio may be off by about that much), the point itself when nothing is known."""
    lo, hi = c["ci"] if c["ci"] else (c["speedup"], c["speedup"])
    if c["noisy"]:
        lo, hi = min(lo, c["speedup"] / (1 + NOISY_SPREAD)), max(hi, c["speedup"] * (1 + NOISY_SPREAD))
    return lo, hi


def goal_verdict(kind: str, threshold: float, value, band) -> str:
    """'met', 'missed', 'undecided' (the band straddles the threshold) or 'no data'. ``value`` and ``band`` are
    speed-ups for kind 'speedup' and time ratios (fastlora / floor) for 'overhead'."""
    if value is None:
        return "no data"
    lo, hi = band
    if kind == "speedup":
        return "met" if lo >= threshold else "missed" if hi < threshold else "undecided"
    return "met" if hi <= threshold else "missed" if lo > threshold else "undecided"


MODE_SHORT = {"forward": "fwd", "forward+backward": "fwd+bwd", "inference": "inference"}


def goal_scope(mode: str, rates, short: bool = False) -> str:
    """Which cases a goal counts, in words: 'forward+backward, dropout 0' ('fwd+bwd, p=0' when ``short``)."""
    if short:
        return f"{MODE_SHORT[mode]}, " + ("any p" if rates is None else "p=" + ",".join(f"{p:g}" for p in rates))
    if rates is None:
        return f"{mode}, every dropout"
    return f"{mode}, dropout " + ", ".join(f"{p:g}" for p in rates)


def summarize(rows: list[dict], goals: str | None = None) -> list[dict]:
    """Per mode and peer: the geometric mean of fastlora's speed-up over the comparable cases (excluded ones are
    counted apart), its range, and how many of those cases were noisy. The floor gets the geometric-mean
    overhead. With ``goals`` (a key of GOALS), each goal of that set with the cases it counts, its measured
    value, the band the noise allows and its verdict."""
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
                entry["goal"] = _goal(goals, goal, mode, valid)
            summary.append(entry)
    return summary


def _goal(goals: str, goal: tuple, mode: str, valid: dict) -> dict:
    rates = GOAL_DROPOUT[goals]
    counted = [c for k, c in valid.items() if rates is None or k[DROPOUT] in rates]
    text, kind, threshold = goal
    g = geomean([c["speedup"] for c in counted])
    bands = [_band(c) for c in counted]
    lo, hi = geomean([b[0] for b in bands]), geomean([b[1] for b in bands])  # errors taken as fully correlated
    if kind == "speedup":
        value, band = g, (lo, hi)
    else:  # the time ratio fastlora / floor: the inverse of the speed-up over the floor
        value, band = (None if g is None else 1.0 / g), ((1.0 / hi, 1.0 / lo) if g is not None else (None, None))
    verdict = goal_verdict(kind, threshold, value, band)
    busy = sum(c["busy"] for c in counted)
    if busy and verdict != "no data":  # timed while other processes held the CPUs: biased, not just noisy
        verdict = "undecided"
    return {"set": goals, "text": text, "kind": kind, "threshold": threshold, "value": value,
            "band": list(band) if value is not None else None, "verdict": verdict,
            "met": {"met": True, "missed": False}.get(verdict), "dropout": list(rates) if rates is not None else "all",
            "mode": mode, "scope": goal_scope(mode, rates), "short_scope": goal_scope(mode, rates, short=True),
            "cases": len(counted),
            "noisy": sum(c["noisy"] for c in counted), "busy": busy}
