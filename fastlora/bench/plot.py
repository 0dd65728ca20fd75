"""The PNG plot: fastlora's speed-up over each peer against M, one panel per (mode, K×N, r).

Read at a glance: higher is better; y = 1 is parity; each peer has its own colour and marker, solid for
dropout 0 and dashed for dropout > 0; the floor (the frozen linear: time ratio base / fastlora, 1 would be a
free LoRA branch) is black, dotted (dash-dotted with dropout); hollow markers are cases the peer could not run
as asked (left out of the geomeans); a vertical bar is the ratio's 95% interval; a red ring marks a ratio
that the table flags as noisy (``?``); one legend, outside the panels.
"""
from __future__ import annotations

import math
from pathlib import Path

from .cases import MODES
from .providers import FLOOR, NAMES, PROVIDERS
from .summary import DROPOUT, MODE, M, comparisons
from .timing import NOISY_SPREAD

MARKERS = {"peft": "o", "peft_layer": "s", "naive": "^", "compiled": "D", FLOOR: "v"}
COLORS = {"peft": "C0", "peft_layer": "C2", "naive": "C1", "compiled": "C4", FLOOR: "black"}


def _style(peer: str, p: float) -> str:
    if peer == FLOOR:
        return ":" if p == 0 else "-."
    return "-" if p == 0 else "--"


NOISY_COLOR = "red"


def plot(report: dict, path: Path) -> dict:
    """Write the plot to ``path``. Needs matplotlib; raises ValueError when nothing can be plotted. Returns what
    was drawn: {"points": n, "noisy": [(mode, M, K, N, r, p, peer), ...] ringed as noisy, "excluded": [...]
    drawn hollow}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    comp = comparisons(report["results"])
    panels = sorted({(k[MODE], k[2], k[3], k[4]) for k in comp if comp[k]},
                    key=lambda t: (MODES.index(t[0]), t[1], t[2], t[3]))
    if not panels:
        raise ValueError("nothing to plot: no case has both fastlora and another provider timed")
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols + 2.6, 3.6 * rows_n + 0.6), squeeze=False,
                             layout="constrained")
    others = [p for p in PROVIDERS if p not in ("fastlora", FLOOR)] + [FLOOR]  # the floor last in the legend
    seen_styles, drawn = set(), {"points": 0, "noisy": [], "excluded": []}
    for ax, (mode, K, N, r) in zip(axes.flat, panels):
        keys = [k for k in comp if (k[MODE], k[2], k[3], k[4]) == (mode, K, N, r)]
        for peer in others:
            for p in sorted({k[DROPOUT] for k in keys}):
                pts = sorted((k[M], comp[k][peer]) for k in keys if k[DROPOUT] == p and peer in comp[k])
                if not pts:
                    continue
                style = _style(peer, p)
                ax.plot([m for m, _ in pts], [c["speedup"] for _, c in pts], color=COLORS[peer], linestyle=style,
                        linewidth=1.6, zorder=2)
                for m, c in pts:  # filled: comparable; hollow: the peer could not run the case as asked
                    ax.plot([m], [c["speedup"]], marker=MARKERS[peer], markersize=6, color=COLORS[peer],
                            markerfacecolor=COLORS[peer] if c["as_asked"] else "white", zorder=3)
                    if c.get("ci"):  # the ratio's 95% interval
                        lo, hi = c["ci"]
                        ax.plot([m, m], [lo, hi], color=COLORS[peer], linewidth=1.0, alpha=0.7, zorder=2)
                    point = (mode, m, K, N, r, p, peer)
                    drawn["points"] += 1
                    if not c["as_asked"]:
                        drawn["excluded"].append(point)
                    if c["noisy"]:  # the table's "?": a red ring around the marker
                        ax.plot([m], [c["speedup"]], marker="o", markersize=13, linestyle="none",
                                markerfacecolor="none", markeredgecolor=NOISY_COLOR, markeredgewidth=1.4, zorder=4)
                        drawn["noisy"].append(point)
                seen_styles.add((peer, p))
        ax.axhline(1.0, color="gray", linewidth=0.8, zorder=1)
        ms = sorted({k[M] for k in keys})
        if len(ms) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(ms)
        ax.set_xticklabels([str(m) for m in ms])
        ax.minorticks_off()
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speed-up (×), higher is better")
        ax.set_title(f"{mode}, K={K} N={N} r={r}", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")

    handles = []
    for peer in others:
        for p in sorted({q for pr, q in seen_styles if pr == peer}):
            style = _style(peer, p)
            name = "floor: frozen linear\n(1 = LoRA at no cost)" if peer == FLOOR else f"vs {NAMES[peer]}"
            label = f"{name}, p={p:g}"
            handles.append(Line2D([], [], color=COLORS[peer], linestyle=style, marker=MARKERS[peer], label=label))
    handles.append(Line2D([], [], color="gray", linewidth=0.8, label="1 = parity"))
    if drawn["excluded"]:
        handles.append(Line2D([], [], color="gray", marker="^", markerfacecolor="white", linestyle="none",
                              label="hollow: peer ran without\ndropout (left out of\ngeomeans)"))
    handles.append(Line2D([], [], color="gray", linewidth=1.0, marker="|", markersize=10, linestyle="none",
                          label="bar: 95% interval"))
    if drawn["noisy"]:
        handles.append(Line2D([], [], marker="o", markersize=11, linestyle="none", markerfacecolor="none",
                              markeredgecolor=NOISY_COLOR, markeredgewidth=1.4,
                              label=f"red ring: noisy (? in\nthe table), may be off\nby {NOISY_SPREAD:.0%} or more"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False, handlelength=3.5)
    meta = report["meta"]
    fig.suptitle(f"fastlora's speed-up over each peer (peer time / fastlora time; higher is better)\n"
                 f"{meta['device_name']}, {meta['dtype']}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn
