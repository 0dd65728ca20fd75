"""How long one step takes.

* CUDA: the way kernel libraries time GPU work. ``triton.testing.do_bench`` records CUDA events around each
  call and clears the L2 cache between calls, so no rep finds the previous rep's operands in cache and host
  overhead between launches is not counted. Without triton, the same is done here with CUDA events and a
  256 MiB buffer zeroed before each call (``_cuda_events``).
* CPU: providers of one case are timed **interleaved** (one sample of each in turn): on a shared or throttling
  machine the load then drifts over all providers alike, which keeps their ratios honest. No library does this
  (pytest-benchmark and ``torch.utils.benchmark`` time one callable at a time), hence the loop below.

Every result is a dict with ``median_s``, ``min_s``, ``iqr_s`` (the spread between the 25th and 75th percentile
samples), ``samples`` and ``steps_per_sample``; interleaved timings add ``rounds_s``, the samples in round order,
so that ``rounds_s[i]`` of two providers were taken side by side and their ratio is free of the load drift between
rounds (CUDA timings, one provider after another, have no rounds to pair). ``spread(stats)`` = IQR / median is
what the report uses to flag a ratio whose timings are too noisy to trust.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from .providers import Runner

L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H100: 50 MiB)


def spread(stats: dict) -> float | None:
    """IQR / median of a timing: 0.1 means the middle half of the samples spans 10% of the median."""
    med, iqr = stats.get("median_s"), stats.get("iqr_s")
    return iqr / med if med and iqr is not None else None


def _warm_up(runner: Runner, warmup_s: float, min_sample_s: float) -> int:
    """Two steps (compilation, autotuning), then steps until ``warmup_s`` has passed. Returns how many steps
    one sample runs back to back so that it lasts at least ``min_sample_s``."""
    runner.step()
    runner.step()
    t0 = time.perf_counter()
    n_warm = 0
    while time.perf_counter() - t0 < warmup_s or n_warm < 1:
        runner.step()
        n_warm += 1
    one = (time.perf_counter() - t0) / n_warm
    return max(1, math.ceil(min_sample_s / max(one, 1e-9)))


def _sample(runner: Runner, inner: int) -> float:
    t = time.perf_counter()
    for _ in range(inner):
        runner.step()
    return (time.perf_counter() - t) / inner


def _stats(samples: list[float], inner: int) -> dict:
    samples = sorted(samples)
    q = len(samples) // 4
    return {"median_s": statistics.median(samples), "min_s": samples[0], "iqr_s": samples[-1 - q] - samples[q],
            "samples": len(samples), "steps_per_sample": inner}


def time_interleaved(runners: dict, *, budget_s: float = 0.5, min_reps: int = 5, max_reps: int = 200,
                     warmup_s: float = 0.1, min_sample_s: float = 1e-3) -> dict:
    """Time several runners of one case in round robin (host timer; each step synchronizes), until
    ``budget_s`` per runner has passed. Returns {name: stats dict, or the exception that stopped it}."""
    out: dict = {}
    inners = {}
    for name, runner in runners.items():
        try:
            inners[name] = _warm_up(runner, warmup_s, min_sample_s)
        except Exception as exc:  # noqa: BLE001 - recorded per provider
            out[name] = exc
    samples: dict[str, list[float]] = {name: [] for name in inners}
    start = time.perf_counter()
    rounds = 0
    while samples:
        for name in list(samples):
            try:
                samples[name].append(_sample(runners[name], inners[name]))
            except Exception as exc:  # noqa: BLE001
                out[name] = exc
                del samples[name]
        rounds += 1
        spent = time.perf_counter() - start
        if rounds >= max_reps or (rounds >= min_reps and spent >= budget_s * max(len(samples), 1)):
            break
    for name, vals in samples.items():
        out[name] = {**_stats(vals, inners[name]), "rounds_s": list(vals)}
    return out


def _cuda_events(fn, *, warmup_ms: float, rep_ms: float) -> list[float]:
    """do_bench's method without triton: per call, zero an L2-sized buffer, then time ``fn`` alone between
    two CUDA events. Returns the per-call times in ms."""
    cache = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        cache.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    n_warm, n_rep = max(1, int(warmup_ms / estimate)), max(5, int(rep_ms / estimate))
    for _ in range(n_warm):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for s, e in zip(starts, ends):
        cache.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_cuda(runner: Runner, *, budget_s: float = 0.5, warmup_s: float = 0.1) -> dict:
    """One runner on CUDA: two plain steps (autotuning, compilation), then ``triton.testing.do_bench`` (CUDA
    events, L2 cleared between calls) over ``budget_s``, or the same method by hand without triton."""
    runner.step()
    runner.step()
    warmup_ms, rep_ms = warmup_s * 1e3, budget_s * 1e3
    try:
        from triton.testing import do_bench
    except ImportError:
        times_ms = _cuda_events(runner.call, warmup_ms=warmup_ms, rep_ms=rep_ms)
        method = "cuda-events"
    else:
        times_ms = do_bench(runner.call, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        method = "triton.testing.do_bench"
    stats = _stats([t / 1e3 for t in times_ms], 1)
    stats["timer"] = method
    return stats


def time_case(runners: dict, *, budget_s: float = 0.5, min_reps: int = 5, warmup_s: float = 0.1) -> dict:
    """Time every runner of one case: on CUDA one after another with CUDA events (the GPU is not shared, and
    the L2 flush isolates reps), elsewhere interleaved. Returns {name: stats dict or the exception}."""
    if not runners:
        return {}
    if next(iter(runners.values())).device.type == "cuda":
        out = {}
        for name, runner in runners.items():
            try:
                out[name] = time_cuda(runner, budget_s=budget_s, warmup_s=warmup_s)
            except Exception as exc:  # noqa: BLE001 - recorded per provider
                out[name] = exc
        return out
    out = time_interleaved(runners, budget_s=budget_s, min_reps=min_reps, warmup_s=warmup_s)
    for stats in out.values():
        if isinstance(stats, dict):
            stats["timer"] = "interleaved host timer"
    return out


def time_runner(runner: Runner, *, budget_s: float = 0.5, min_reps: int = 5, warmup_s: float = 0.1) -> dict:
    """Median time of one step of one runner (see ``time_case``)."""
    return time_case({"one": runner}, budget_s=budget_s, min_reps=min_reps, warmup_s=warmup_s)["one"]
