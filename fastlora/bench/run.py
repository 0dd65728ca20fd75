"""Running a grid: build the providers of each case, time them, measure their memory, one row per provider.
Also the progress line and the environment record that goes with every report."""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

import fastlora

from .cases import Case, lora_flops
from .memory import peak_memory_bytes, saved_activation_bytes
from .providers import build_runner, provider_available
from .report import WIDTH
from .timing import CPU_RATIO_SD, ratio_interval, spread, steady_allocator, time_case


def error_text(exc: BaseException) -> str:
    """An exception as a report's ``error`` field: its type and message, at most 500 characters."""
    return f"{type(exc).__name__}: {exc}".strip()[:500]


def measure_case(case: Case, providers, *, budget_s: float = 0.5, min_reps: int = 5, seed: int = 0) -> list[dict]:
    """Build every provider on ``case``, time them interleaved, then measure saved and peak memory of each.
    One row per provider; a provider that fails (unavailable, or e.g. torch.compile without a compiler)
    gets an ``error`` and does not end the run."""
    rows = {p: {"provider": p, **dataclasses.asdict(case)} for p in providers}
    runners = {}
    for p in providers:
        ok, why = provider_available(p)
        if not ok:
            rows[p]["error"] = why
            continue
        try:
            runners[p] = build_runner(p, case, seed=seed)
        except Exception as exc:  # noqa: BLE001
            rows[p]["error"] = error_text(exc)
    try:
        timings = time_case(runners, budget_s=budget_s, min_reps=min_reps, warmup_s=min(0.1, budget_s))
        for p, timing in timings.items():
            row, runner = rows[p], runners[p]
            if isinstance(timing, BaseException):
                row["error"] = error_text(timing)
                continue
            row.update(timing)
            row["time_ms"] = timing["median_s"] * 1e3
            row["spread"] = spread(timing)
            row["tflops"] = lora_flops(case, p) / timing["median_s"] / 1e12
            row["saved_bytes"] = or_none(saved_activation_bytes, runner)
            row["saved_beyond_input_bytes"] = or_none(saved_activation_bytes, runner, False)
            row["peak_bytes"] = or_none(peak_memory_bytes, runner)
            row["dropout_applied"] = runner.dropout_applied
            row["as_asked"] = runner.as_asked
            if runner.note:
                row["note"] = runner.note
        _ratio_intervals(rows, providers)
    finally:
        runners.clear()
        if torch.device(case.device).type == "cuda":
            torch.cuda.empty_cache()
    return [rows[p] for p in providers]


def _ratio_intervals(rows: dict, providers) -> None:
    """Give each provider timed beside fastlora the 95% interval of its time / fastlora's (``speedup_ci``):
    paired round by round where both were timed interleaved, else from each side's samples alone; on the CPU's
    host timer no narrower than the run-to-run reproducibility measured there (CPU_RATIO_SD)."""
    fl = rows.get("fastlora", {})
    if not fl.get("samples_s"):
        return
    for p in providers:
        row = rows[p]
        if p == "fastlora" or not row.get("samples_s"):
            continue
        host = row.get("timer") == fl.get("timer") == "interleaved host timer"
        paired = host and len(row["samples_s"]) == len(fl["samples_s"])
        interval = ratio_interval(fl["samples_s"], row["samples_s"], paired=paired,
                                  floor_sd=CPU_RATIO_SD if host else 0.0)
        if interval is not None:
            row["speedup_ci"] = list(interval)
            row["speedup_ci_paired"] = paired


def measure(provider: str, case: Case, *, budget_s: float = 0.5, min_reps: int = 5, seed: int = 0) -> dict:
    """Build, time and measure one provider on one case. Errors are recorded, not raised."""
    return measure_case(case, [provider], budget_s=budget_s, min_reps=min_reps, seed=seed)[0]


def or_none(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or None where it raises."""
    try:
        return fn(*args, **kwargs)
    except Exception:  # memory accounting is best effort: a hook-hostile provider gets no figure
        return None


# ---------------------------------------------------------------------------------------------------------
# Grids, runs and reports
# ---------------------------------------------------------------------------------------------------------
class Progress:
    """A plain progress bar on stderr: redrawn in place on a terminal, a line per ~10% otherwise. Hand-rolled
    on purpose: tqdm or rich would be a new dependency for twenty lines, and neither is one of fastlora's."""

    def __init__(self, total: int, stream=None, width: int = 28):
        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self._last_decile = -1

    def update(self, text: str, n: int = 1) -> None:
        self.done += n
        frac = self.done / self.total
        filled = int(round(frac * self.width))
        elapsed = time.perf_counter() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{elapsed:5.0f}s elapsed, ~{eta:4.0f}s left  {text}")
        if self.tty:
            self.stream.write("\r" + line[:WIDTH - 1].ljust(WIDTH - 1))
            if self.done == self.total:
                self.stream.write("\n")
        else:
            decile = int(frac * 10)
            if decile != self._last_decile or self.done == self.total:
                self._last_decile = decile
                self.stream.write(line + "\n")
        self.stream.flush()


def run_cases(cases, providers, *, budget_s: float = 0.5, min_reps: int = 5, progress: bool = True,
              stream=None) -> list[dict]:
    """Measure every provider on every case. Ctrl-C (or ``timeout -s INT``) stops the run early and returns
    the rows measured so far, so that a report of them can still be written."""
    bar = Progress(len(cases) * len(providers), stream=stream) if progress else None
    rows = []
    try:
        for case in cases:
            rows.extend(measure_case(case, providers, budget_s=budget_s, min_reps=min_reps))
            if bar:
                bar.update(f"{case.mode} {case.shape} r={case.r} p={case.dropout:g}", n=len(providers))
    except KeyboardInterrupt:
        print(f"\ninterrupted: reporting the {len(rows)} of {len(cases) * len(providers)} measurements done",
              file=stream if stream is not None else sys.stderr)
    return rows


def environment(device: str) -> dict:
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "fastlora": fastlora.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "backend": fastlora.get_backend(),
    }
    if torch.device(device).type == "cpu":
        info["allocator"] = steady_allocator()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    dev = torch.device(device)
    if dev.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = info["cpu"]
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return (platform.processor() or platform.machine()) + f" ({os.cpu_count()} logical cores)"


