"""Reports: the terminal text (at most ``WIDTH`` columns), the markdown file and the output folder.

The terminal table gives, per case, fastlora's time, its speed-up over each peer (higher is better) and its
overhead over the frozen linear (the floor); the markdown adds every provider's time, peak and saved memory.
Tables are formatted here rather than with tabulate or rich: neither is a dependency of fastlora, and the
fixed-width layout is a dozen lines.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

from .cases import MODES
from .providers import FLOOR
from .summary import (DROPOUT, MODE, NOISY_SPREAD, comparisons, group_by_case)

WIDTH = 120
NAMES = {"fastlora": "fastlora", "peft": "PEFT math", "peft_layer": "PEFT layer", "naive": "W+BA",
         "base": "frozen linear", "compiled": "compiled"}
SHORT = {**NAMES, "peft": "PEFT", "peft_layer": "layer"}  # terminal headers: "vs PEFT", "vs layer"
EXCLUDED_MARK, NOISY_MARK = "†", "?"

NOTE_EXCLUDED = (f"{EXCLUDED_MARK} the peer could not run this case as asked (W+BA cannot apply dropout, so it was "
                 "timed without it): shown for reference only, left out of every geomean and goal.")
NOTE_NOISY = (f"{NOISY_MARK} a timing's spread (IQR/median) exceeds {NOISY_SPREAD:.0%}: this ratio may be off by "
              "about that much. Rerun on an idle machine, with a larger --budget (python -m fastlora bench) or "
              "--benchmark-min-rounds (pytest-benchmark).")


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
    return "–" if b is None else f"{b / 2**20:.1f}"


def _ms(row: dict | None) -> str:
    if not row or row.get("time_ms") is None:
        return "err" if row else "–"
    v = row["time_ms"]
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _pct(row: dict | None) -> str:
    s = (row or {}).get("spread")
    return "–" if s is None else f"{100 * s:.0f}%"


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
        header = ["M", "K", "N", "r", "p", "fastlora ms", "IQR"] + [f"vs {SHORT[p]}" for p in peers]
        if FLOOR in providers:
            header += ["floor ms", "overhead"]
        memory = mode != "inference" and "peft" in providers
        if memory:
            header += ["saved MiB"]
        body = []
        for k in keys:
            g, c = groups[k], comp.get(k, {})
            cells = _case_cells(k) + [_ms(g.get("fastlora")), _pct(g.get("fastlora"))]
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
    """Per mode: every provider's time, fastlora's speed-ups and overhead, peak and saved MiB."""
    comp, groups = comparisons(rows), group_by_case(rows)
    others = [p for p in providers if p != "fastlora"]
    out = []
    for mode in MODES:
        keys = [k for k in groups if k[MODE] == mode]
        if not keys:
            continue
        header = ["M", "K", "N", "r", "p"] + [f"{NAMES[p]} ms" for p in providers]
        header += [f"vs {NAMES[p]}" if p != FLOOR else "overhead vs floor" for p in others]
        header += ["peak MiB " + "/".join(NAMES[p] for p in providers)]
        if mode != "inference":
            header += ["saved MiB " + "/".join(NAMES[p] for p in providers)]
        body = []
        for k in keys:
            g, c = groups[k], comp.get(k, {})
            cells = _case_cells(k) + [_ms(g.get(p)) + ("" if g.get(p, {}).get("as_asked", True) else EXCLUDED_MARK)
                                      for p in providers]
            cells += [_overhead_cell(c.get(p)) if p == FLOOR else _speedup_cell(c.get(p)) for p in others]
            cells.append("/".join(_mib(g.get(p, {}).get("peak_bytes")) for p in providers))
            if mode != "inference":
                cells.append("/".join(_mib(g.get(p, {}).get("saved_bytes")) for p in providers))
            body.append(cells)
        out.append((mode, header, body))
    return out


SUMMARY_HEADER = ["mode", "against", "cases", "geomean", "range", "left out†", "noisy?", "goal"]


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
        goal_txt = ""
        goal = s.get("goal")
        if goal:
            if goal["kind"] == "speedup":
                want = f"≥ {goal['threshold']:g}×"
                got = "–" if goal["value"] is None else f"{goal['value']:.2f}×"
            else:
                want = f"≤ {100 * goal['threshold'] - 100:+.0f}%"
                got = "–" if goal["value"] is None else f"{100 * goal['value'] - 100:+.1f}%"
            verdict = {True: "MET", False: "MISSED", None: "NO DATA"}[goal["met"]]
            goal_txt = f"{want}: {got} {verdict}"
        against = "floor (frozen linear)" if s["floor"] else NAMES.get(s["peer"], s["peer"])
        body.append([s["mode"], against, str(s["cases"]), value, rng, str(s["excluded"] or ""),
                     str(s["noisy"] or ""), goal_txt])
    return body


def summary_table(summary) -> str:
    """The geometric means (and goals) of ``summarize()`` as a fixed-width table."""
    return _text_table(SUMMARY_HEADER, summary_lines(summary), left=2)


def _text_table(header, body, left: int = 0) -> str:
    """Fixed-width columns, right-aligned except the first ``left``."""
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < left else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def _md_table(header, body, left: int = 0) -> str:
    align = "|".join(":---" if i < left else "---:" for i in range(len(header)))
    lines = ["| " + " | ".join(header) + " |", "|" + align + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def _wrap(text: str) -> str:
    return textwrap.fill(text, WIDTH, subsequent_indent="  ", break_on_hyphens=False)


def _flags(rows) -> tuple[int, int]:
    comp = comparisons(rows)
    excluded = sum(not c["as_asked"] for v in comp.values() for c in v.values())
    noisy = sum(c["noisy"] for v in comp.values() for c in v.values())
    return excluded, noisy


def render_text(report: dict) -> str:
    meta = report["meta"]
    parts = [_wrap(f"fastlora bench on {meta['device']} ({meta['device_name']}), {meta['dtype']}, torch "
                   f"{meta['torch']}, triton {meta['triton']}, {meta['date_utc']}; timer: "
                   f"{meta.get('timer', 'interleaved host timer')}")]
    if meta.get("interrupted"):
        parts.append("INTERRUPTED: partial results (the run was stopped before every case was measured)")
    for title, header, body in text_tables(report["results"], meta["providers"]):
        parts += ["", _wrap(title), _text_table(header, body)]
    if report["summary"]:
        parts += ["", "Summary: geometric means over the comparable cases (speed-up: higher is better; "
                      "floor: fastlora's extra time)", summary_table(report["summary"])]
    excluded, noisy = _flags(report["results"])
    if excluded:
        parts += ["", _wrap(NOTE_EXCLUDED)]
    if noisy:
        parts += ["", _wrap(f"WARNING: {noisy} comparison(s) rest on noisy timings. " + NOTE_NOISY)]
    errors = sorted({f"  {r['provider']}: {r['error']}" for r in report["results"] if r.get("error")})
    if errors:
        parts += ["", "Errors:"] + [_wrap(e) for e in errors]
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
    if meta.get("interrupted"):
        lines.append("- **INTERRUPTED: partial results** (the run was stopped before every case was measured)")
    lines += [
        "- times are medians of one step (forward, forward+backward or no-grad inference); `vs X` is fastlora's "
        "speed-up over X (X's time / fastlora's time: higher is better); the frozen linear is the floor, and "
        "`overhead vs floor` is fastlora's extra time over it; peak MiB is one step's peak above the resident "
        "inputs and parameters; saved MiB is what autograd keeps for backward (parameters excluded)",
    ]
    if report["summary"]:
        lines += ["", "## Summary: geometric means over the comparable cases", "",
                  _md_table(SUMMARY_HEADER, summary_lines(report["summary"]), left=2)]
    for mode, header, body in markdown_tables(report["results"], meta["providers"]):
        lines += ["", f"## {mode}", "", _md_table(header, body)]
    excluded, noisy = _flags(report["results"])
    if excluded:
        lines += ["", NOTE_EXCLUDED]
    if noisy:
        lines += ["", f"**{noisy} comparison(s) rest on noisy timings.** " + NOTE_NOISY]
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


