"""Reports: the terminal text (at most ``WIDTH`` columns), the markdown file and the output folder.

The terminal table gives, per case, fastlora's time, the noise of its ratios, its speed-up over each peer
(higher is better) and its overhead over the frozen linear (the floor); the markdown adds every provider's time,
peak and saved memory. With goals, a table of its own says what each goal counts, the value, the band the noise
allows and the verdict. Tables are formatted here rather than with tabulate or rich: neither is a dependency of
fastlora, and the fixed-width layout is a dozen lines.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

from .cases import MODES
from .providers import FLOOR, NAMES, SHORT
from .summary import DROPOUT, MODE, comparisons, group_by_case
from .timing import NOISY_SPREAD

WIDTH = 120
EXCLUDED_MARK, NOISY_MARK = "†", "?"

NOTE_EXCLUDED = (f"{EXCLUDED_MARK} the peer could not run this case as asked (W+BA cannot apply dropout, so it was "
                 "timed without it): shown for reference only, left out of every geomean and goal.")
NOTE_NOISY = (f"{NOISY_MARK} the ratio may be off by {NOISY_SPREAD:.0%} or more: a timing's spread (IQR/median) "
              f"exceeds {NOISY_SPREAD:.0%}, its samples fall into two groups (bimodal), its 95% interval is wider "
              f"than ±{NOISY_SPREAD:.0%}, or the machine was busy (other processes kept this one waiting for a CPU "
              "in most rounds, or ran beside it on another core). Rerun on an idle machine, with a larger --budget "
              "(python -m fastlora bench) or --benchmark-min-rounds (pytest-benchmark).")
NOTE_NOISE = ("noise: the widest 95% interval of the case's ratios, as ± of the ratio (bootstrapped from the "
              "timings' samples, in runs of consecutive rounds)")
VERDICTS = {"met": "MET", "missed": "MISSED", "undecided": "UNDECIDED", "no data": "NO DATA"}


def _speedup_cell(c: dict | None) -> str:
    if c is None:
        return "–"
    return (f"{c['speedup']:.2f}×" + ("" if c["as_asked"] else EXCLUDED_MARK)
            + (NOISY_MARK if c["noisy"] else ""))


def _overhead_cell(c: dict | None) -> str:
    if c is None:
        return "–"
    return f"{100.0 / c['speedup'] - 100.0:+.1f}%" + (NOISY_MARK if c["noisy"] else "")


def _mib(b):
    if b is None:
        return "–"
    mib = b / 2**20
    return f"{mib:.0f}" if mib >= 100 else f"{mib:.1f}"


def milliseconds(value: float) -> str:
    """A time in ms with the decimals of its magnitude, trailing zeros kept: 16.0 beside 14.4, never 16."""
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _ms(row: dict | None) -> str:
    if not row or row.get("time_ms") is None:
        return "err" if row else "–"
    return milliseconds(row["time_ms"])


def _noise(c: dict) -> str:
    """The widest interval among a case's comparisons, as ±% of the ratio."""
    noises = [v["noise"] for v in c.values() if v.get("noise") is not None]
    return f"±{100 * max(noises):.0f}%" if noises else "–"


def _case_cells(k) -> list[str]:
    return [str(k[1]), str(k[2]), str(k[3]), str(k[4]), f"{k[DROPOUT]:g}"]


def text_tables(rows: list[dict], providers) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per mode: (title, header, body) of the terminal table, one row per case."""
    comp, groups = comparisons(rows), group_by_case(rows)
    peers = [p for p in providers if p not in ("fastlora", FLOOR)]
    out = []
    for mode in MODES:
        keys = [k for k in groups if k[MODE] == mode]
        if not keys:
            continue
        header = ["M", "K", "N", "r", "p", "fastlora ms", "noise"] + [f"vs {SHORT[p]}" for p in peers]
        if FLOOR in providers:
            header += ["floor ms", "overhead"]
        memory = mode != "inference" and "peft" in providers
        if memory:
            header += ["saved MiB"]
        body = []
        for k in keys:
            g, c = groups[k], comp.get(k, {})
            cells = _case_cells(k) + [_ms(g.get("fastlora")), _noise(c)]
            cells += [_speedup_cell(c.get(p)) for p in peers]
            if FLOOR in providers:
                cells += [_ms(g.get(FLOOR)), _overhead_cell(c.get(FLOOR))]
            if memory:
                cells.append("/".join(_mib(g.get(p, {}).get("saved_bytes")) for p in ("fastlora", "peft")))
            body.append(cells)
        names = ", ".join(f"{SHORT[p]} = {NAMES[p]}" for p in peers if SHORT[p] != NAMES[p])
        out.append((f"{mode}: fastlora ms, then its speed-up over each peer (peer time / fastlora time, higher is "
                    "better) and its overhead over the frozen linear, the floor"
                    + (f"; {names}" if names else "") + ("; saved MiB: fastlora/PEFT" if memory else ""),
                    header, body))
    return out


def markdown_tables(rows: list[dict], providers) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per mode: every provider's time, fastlora's speed-ups and overhead, their noise, peak and saved MiB."""
    comp, groups = comparisons(rows), group_by_case(rows)
    others = [p for p in providers if p != "fastlora"]
    out = []
    for mode in MODES:
        keys = [k for k in groups if k[MODE] == mode]
        if not keys:
            continue
        header = ["M", "K", "N", "r", "p"] + [f"{NAMES[p]} ms" for p in providers]
        header += [f"vs {NAMES[p]}" if p != FLOOR else "overhead vs floor" for p in others] + ["noise"]
        header += ["peak MiB " + "/".join(NAMES[p] for p in providers)]
        if mode != "inference":
            header += ["saved MiB " + "/".join(NAMES[p] for p in providers)]
        body = []
        for k in keys:
            g, c = groups[k], comp.get(k, {})
            cells = _case_cells(k) + [_ms(g.get(p)) + ("" if g.get(p, {}).get("as_asked", True) else EXCLUDED_MARK)
                                      for p in providers]
            cells += [_overhead_cell(c.get(p)) if p == FLOOR else _speedup_cell(c.get(p)) for p in others]
            cells.append(_noise(c))
            cells.append("/".join(_mib(g.get(p, {}).get("peak_bytes")) for p in providers))
            if mode != "inference":
                cells.append("/".join(_mib(g.get(p, {}).get("saved_bytes")) for p in providers))
            body.append(cells)
        out.append((mode, header, body))
    return out


SUMMARY_HEADER = ["mode", "against", "cases", "geomean", "range", "left out†", "noisy"]
SUMMARY_TITLE = ("Summary: geometric means over the comparable cases (speed-up: higher is better; floor: fastlora's "
                 "extra time); cases: how many the geomean counts, left out†: cases the peer could not run as "
                 "asked, noisy: how many of the counted cases are marked ?")


def summary_lines(summary) -> list[list[str]]:
    body = []
    for s in summary:
        g, lo, hi = s["geomean_speedup"], s["min_speedup"], s["max_speedup"]
        if g is None:
            value = rng = "–"
        elif s["floor"]:
            value = f"{100 / g - 100:+.1f}% time"
            rng = f"{100 / hi - 100:+.0f}% to {100 / lo - 100:+.0f}%"
        else:
            value = f"{g:.2f}× faster" if g >= 1 else f"{1 / g:.2f}× slower"
            rng = f"{lo:.2f}–{hi:.2f}×"
        against = "floor (frozen linear)" if s["floor"] else NAMES.get(s["peer"], s["peer"])
        body.append([s["mode"], against, str(s["cases"]), value, rng, str(s["excluded"]), str(s["noisy"])])
    return body


def summary_table(summary) -> str:
    """The geometric means of ``summarize()`` as a fixed-width table."""
    return text_table(SUMMARY_HEADER, summary_lines(summary), left=2)


GOALS_HEADER = ["goal", "counts", "value", "95% band", "wanted", "verdict"]
GOALS_TITLE = ("Goals: each counts only the cases it names; value: the geomean of their ratios; 95% band: the geomean "
               f"of their intervals (at least ±{NOISY_SPREAD:.0%} for a noisy one); MET or MISSED only when the "
               "whole band clears or misses the wanted value and no counted case ran on a busy machine, else "
               "UNDECIDED")


def _goal_number(goal: dict, v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}×" if goal["kind"] == "speedup" else f"{100 * v - 100:+.1f}%"


def goal_lines(summary) -> list[list[str]]:
    """One line per goal: what it counts (mode, dropout rates, cases), its value, the band the noise allows,
    the threshold and the verdict."""
    body = []
    for s in summary:
        goal = s.get("goal")
        if not goal:
            continue
        counts = f"{goal['short_scope']}: {goal['cases']} case{'s' if goal['cases'] != 1 else ''}"
        flagged = [f"{goal[k]} {k}" for k in ("noisy", "busy") if goal.get(k)]
        if flagged:
            counts += f" ({', '.join(flagged)})"
        band = goal.get("band")
        band_txt = "–" if not band else f"{_goal_number(goal, band[0])} to {_goal_number(goal, band[1])}"
        wanted = (f"≥ {goal['threshold']:g}×" if goal["kind"] == "speedup"
                  else f"≤ {100 * goal['threshold'] - 100:+.0f}%")
        body.append([goal["text"], counts, _goal_number(goal, goal["value"]), band_txt, wanted,
                     VERDICTS[goal["verdict"]]])
    return body


def goals_table(summary) -> str:
    return text_table(GOALS_HEADER, goal_lines(summary), left=2)


def goals_verdict(summary) -> tuple[str, str | None]:
    """('met' | 'missed' | 'undecided' | 'no data', a sentence naming the goals that decide it), or ('none',
    None) when no goal was checked. A missed goal outranks an undecided one, which outranks no data."""
    goals = [s["goal"] for s in summary if s.get("goal")]
    if not goals:
        return "none", None
    by = {v: [g for g in goals if g["verdict"] == v] for v in VERDICTS}
    names = lambda gs: "; ".join(f"{g['text']} ({_goal_number(g, g['value'])}, wanted "  # noqa: E731
                                 f"{'≥' if g['kind'] == 'speedup' else '≤'} "
                                 f"{_goal_number(g, g['threshold'])})" for g in gs)
    for verdict, sentence in (("missed", "MISSED"), ("undecided", "UNDECIDED, timings too noisy to decide"),
                              ("no data", "NO DATA, no case of the grid counts for")):
        if by[verdict]:
            return verdict, f"Goals {goals[0]['set']}: {sentence}: {names(by[verdict])}."
    return "met", f"Goals {goals[0]['set']}: all {len(goals)} met."


def text_table(header, body, left: int = 0) -> str:
    """Fixed-width columns, right-aligned except the first ``left``."""
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < left else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def md_table(header, body, left: int = 0) -> str:
    align = "|".join(":---" if i < left else "---:" for i in range(len(header)))
    lines = ["| " + " | ".join(header) + " |", "|" + align + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def wrap(text: str) -> str:
    return textwrap.fill(text, WIDTH, subsequent_indent="  ", break_on_hyphens=False)


def wrap_fields(fields, sep: str = "; ", indent: str = "  ") -> str:
    """Join ``fields`` with ``sep`` into lines of at most WIDTH columns, breaking only between fields (a field
    longer than a line is wrapped on its own)."""
    lines, line = [], ""
    for field in fields:
        candidate = f"{line}{sep}{field}" if line else field
        if len(candidate) + len(sep.rstrip()) <= WIDTH:  # room for the separator that a break leaves at the end
            line = candidate
            continue
        if line:
            lines.append(line + sep.rstrip())
        line = indent + field
        if len(line) > WIDTH:
            wrapped = textwrap.wrap(line, WIDTH, subsequent_indent=indent, break_on_hyphens=False)
            lines += wrapped[:-1]
            line = wrapped[-1]
    return "\n".join(lines + [line])


def header_fields(meta: dict) -> list[str]:
    return [f"fastlora bench on {meta['device']} ({meta['device_name']})", meta["dtype"], f"torch {meta['torch']}",
            f"triton {meta['triton']}" if meta.get("triton") else "no triton", meta["date_utc"],
            f"timer: {meta.get('timer', 'interleaved host timer')}"]


def _flags(rows) -> tuple[int, int]:
    comp = comparisons(rows)
    excluded = sum(not c["as_asked"] for v in comp.values() for c in v.values())
    noisy = sum(c["noisy"] for v in comp.values() for c in v.values())
    return excluded, noisy


def _noisy_reasons(rows) -> list[str]:
    """'M=256 forward+backward p=0 vs PEFT math: fastlora bimodal' for each noisy comparison."""
    out = []
    for k, v in comparisons(rows).items():
        for p, c in v.items():
            if c["noisy"]:
                out.append(f"{k[MODE]} M={k[1]} K={k[2]} N={k[3]} r={k[4]} p={k[DROPOUT]:g} vs {NAMES.get(p, p)}: "
                           + ", ".join(c["why"]))
    return out


def busy_note(rows) -> str | None:
    """What other processes' load did to the run: rounds dropped and rerun, cases marked busy. The engine's round
    bookkeeping is per case, the same on every provider's row: fastlora's row stands for its case."""
    cases = [r for r in rows if r.get("provider") == "fastlora" and r.get("rounds")]
    rounds = sum(r["rounds"] for r in cases)
    dropped = sum(r.get("contended_rounds", 0) for r in cases)
    waited = sum(bool(r.get("busy")) and (r.get("busy_why") or "").endswith("waiting for a CPU") for r in cases)
    beside = sum(bool(r.get("busy")) for r in cases) - waited
    if not dropped and not waited and not beside:
        return None
    parts = [f"Other processes' load: {dropped} of {rounds} timed rounds waited for a CPU and were dropped and rerun"]
    if waited:
        parts.append(f"{waited} case(s) could not get enough clean rounds")
    if beside:
        parts.append(f"in {beside} case(s) other processes ran beside the timed rounds (on another core: caches and "
                     "memory bandwidth were shared)")
    advice = ("; these are marked busy (?): rerun when the machine is idle, or with --threads 1, which competes for "
              "one core instead of all and measures single-threaded speed" if waited else
              "; these are marked busy (?): rerun when the machine is idle" if beside else "")
    return "; ".join(parts) + advice + "."


def render_text(report: dict) -> str:
    meta = report["meta"]
    parts = [wrap_fields(header_fields(meta))]
    if meta.get("interrupted"):
        parts.append("INTERRUPTED: partial results (the run was stopped before every case was measured)")
    for title, header, body in text_tables(report["results"], meta["providers"]):
        parts += ["", wrap(title), text_table(header, body)]
    parts += ["", wrap(NOTE_NOISE)]
    if report["summary"]:
        parts += ["", wrap(SUMMARY_TITLE), summary_table(report["summary"])]
        if any(s.get("goal") for s in report["summary"]):
            verdict, sentence = goals_verdict(report["summary"])
            parts += ["", wrap(GOALS_TITLE), goals_table(report["summary"]), wrap(sentence)]
    excluded, noisy = _flags(report["results"])
    if excluded:
        parts += ["", wrap(NOTE_EXCLUDED)]
    busy = busy_note(report["results"])
    if busy:
        parts += ["", wrap(busy)]
    if noisy:
        parts += ["", wrap(f"WARNING: {noisy} comparison(s) rest on noisy timings. " + NOTE_NOISY)]
        parts += [wrap("  " + line) for line in _noisy_reasons(report["results"])]
    errors = sorted({f"  {r['provider']}: {r['error']}" for r in report["results"] if r.get("error")})
    if errors:
        parts += ["", "Errors:"] + [wrap(e) for e in errors]
    return "\n".join(parts)


def render_markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        "# fastlora bench", "",
        f"- command: `{meta['command']}`",
        f"- device: {meta['device']} — {meta['device_name']}",
        f"- dtype: {meta['dtype']}; date: {meta['date_utc']}",
        f"- torch {meta['torch']}, triton {meta['triton']}, fastlora {meta['fastlora']} (backend "
        f"{meta['backend']}), python {meta['python']}, {meta['torch_threads']} torch threads",
        f"- timer: {meta.get('timer', 'interleaved host timer')}",
    ]
    if meta.get("allocator"):
        lines.append(f"- allocator: {meta['allocator']}")
    if meta.get("interrupted"):
        lines.append("- **INTERRUPTED: partial results** (the run was stopped before every case was measured)")
    lines += [
        "- times are medians of one step (forward, forward+backward or no-grad inference); `vs X` is fastlora's "
        "speed-up over X (X's time / fastlora's time: higher is better); the frozen linear is the floor, and "
        "`overhead vs floor` is fastlora's extra time over it; " + NOTE_NOISE + "; peak MiB is one step's peak "
        "above the resident inputs and parameters; saved MiB is what autograd keeps for backward (parameters "
        "excluded)",
    ]
    if report["summary"]:
        lines += ["", "## Summary", "", SUMMARY_TITLE.split(": ", 1)[1] + ".", "",
                  md_table(SUMMARY_HEADER, summary_lines(report["summary"]), left=2)]
        if any(s.get("goal") for s in report["summary"]):
            verdict, sentence = goals_verdict(report["summary"])
            lines += ["", "## Goals", "", GOALS_TITLE.split(": ", 1)[1] + ".", "",
                      md_table(GOALS_HEADER, goal_lines(report["summary"]), left=2), "", sentence]
    for mode, header, body in markdown_tables(report["results"], meta["providers"]):
        lines += ["", f"## {mode}", "", md_table(header, body)]
    excluded, noisy = _flags(report["results"])
    if excluded:
        lines += ["", NOTE_EXCLUDED]
    busy = busy_note(report["results"])
    if busy:
        lines += ["", busy]
    if noisy:
        lines += ["", f"**{noisy} comparison(s) rest on noisy timings.** " + NOTE_NOISY, ""]
        lines += [f"- {line}" for line in _noisy_reasons(report["results"])]
    errors = sorted({f"{r['provider']}: {r['error']}" for r in report["results"] if r.get("error")})
    if errors:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in errors]
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, out: Path, make_plot: bool = True) -> dict[str, str]:
    """Write results.json, results.md and (with matplotlib) speedup.png into ``out``. Returns what was written,
    and under 'plot_skipped' why the plot was not."""
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    written["json"] = str(out / "results.json")
    (out / "results.md").write_text(render_markdown(report))
    written["markdown"] = str(out / "results.md")
    if make_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            written["plot_skipped"] = ('matplotlib is not installed: pip install matplotlib (or the "plot" extra) '
                                       "for the PNG plot")
        else:
            from .plot import plot

            try:
                plot(report, out / "speedup.png")
                written["plot"] = str(out / "speedup.png")
            except ValueError as exc:
                written["plot_skipped"] = str(exc)
    return written
