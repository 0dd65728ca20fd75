"""How long one step takes.

* CUDA: the way kernel libraries time GPU work. ``triton.testing.do_bench`` records CUDA events around each
  call and clears the L2 cache between calls, so no rep finds the previous rep's operands in cache and host
  overhead between launches is not counted. Without triton, the same is done here with CUDA events and a
  256 MiB buffer zeroed before each call (``_cuda_events``).
* CPU: providers of one case are timed **interleaved** (one sample of each in turn, a *round*): on a shared or
  throttling machine the load then drifts over all providers alike, which keeps their ratios honest. No library
  does this (pytest-benchmark and ``torch.utils.benchmark`` time one callable at a time), hence the loop below.
  Two things that interleaving alone does not remove were measured (benchmarks/NOTES.md, "Benchmark numbers
  that depend on case order") and are handled here:

  - **glibc's adaptive malloc thresholds.** A fresh process ``mmap``s every block above 128 KiB and returns it
    on ``free``; each step then page-faults its tensors in again (3,000 faults per step for W+BA at 256×1024),
    until frees of larger blocks have raised the thresholds. So a case measured early ran slower, by provider
    differently, than the same case measured late. ``steady_allocator()`` sets the thresholds to the values a
    long-running process converges to (mmap above 32 MiB, trim above 64 MiB) before anything is timed.
  - **Other processes' load.** With torch's threads on every core, a process that takes one core stalls every
    parallel region; steps slow down by up to 17× and by a different factor per provider, so interleaving
    cannot even it out. Each sample reads how long this process's threads waited for a CPU
    (``/proc/self/task/*/schedstat``, Linux); a round in which any sample waited more than
    ``CONTENDED_WAIT`` of its wall time is dropped and run again. A case that cannot get ``min_reps`` clean
    rounds within ``BUSY_BUDGET_FACTOR`` × its budget keeps every round and is marked ``busy``. A process on a
    core this one leaves idle (``--threads 1``) makes nothing wait but still shares caches and memory
    bandwidth: the machine's busy time (``/proc/stat``) minus this process's, summed over the kept rounds, is
    what others ran beside them, and a case with more than ``SHARED_CORES`` of it is marked ``busy`` too.

Every result is a dict with ``median_s``, ``min_s``, ``iqr_s`` (the spread between the 25th and 75th percentile
samples), ``samples``, ``steps_per_sample``, ``samples_s`` (the per-step time of every kept sample) and
``bimodal``; interleaved timings add ``rounds_s``, the same samples in round order, so that ``rounds_s[i]`` of two
providers were taken side by side and their ratio is free of the load drift between rounds (CUDA timings, one
provider after another, have no rounds to pair), and ``rounds``, ``contended_rounds``, ``others_cores``, ``busy``
and ``busy_why``. ``spread(stats)`` = IQR / median; ``ratio_interval`` gives the 95% interval of a ratio of two
medians (on the CPU never narrower than the run-to-run reproducibility measured, ``CPU_RATIO_SD``). The report
flags a ratio as noisy from these (fastlora.bench.summary).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import platform
import statistics
import time

import torch

from .providers import Runner

L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H100: 50 MiB)

NOISY_SPREAD = 0.10  # a timing whose IQR / median exceeds this is too noisy to trust a ratio to ~this much
BIMODAL_GAP = NOISY_SPREAD / 2  # two groups of samples this far apart (of the median) are two modes
BIMODAL_SHARE = 0.15  # ... when the smaller group holds at least this share of the samples
CONTENDED_WAIT = 0.05  # a sample whose threads waited for a CPU > 5% of its wall time ran on a busy machine
SHARED_CORES = 0.25  # other processes running beside the kept rounds, in cores on average: the case is not clean
BUSY_BUDGET_FACTOR = 4.0  # how much longer than its budget a case may run to replace contended rounds
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
# How much a CPU ratio moves from one run to the next beyond what one run's samples show: separate runs of the
# same case (fresh processes, 2-core EPYC, shared) gave ratios whose log varied with a standard deviation of up to
# 1.7% (benchmarks/NOTES.md, "Benchmark numbers that depend on case order"). A CPU ratio's interval is never
# narrower than that allows: ± 1.96 × 1.7% ≈ 3.3% at 95%.
CPU_RATIO_SD = 0.017

# glibc mallopt parameters (malloc.h) and the values its dynamic rule reaches in a long-running process:
# M_MMAP_THRESHOLD rises to the largest freed mmapped block, at most DEFAULT_MMAP_THRESHOLD_MAX (32 MiB on
# 64-bit), and M_TRIM_THRESHOLD to twice that.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
STEADY_MMAP_THRESHOLD = 32 * 2**20
STEADY_TRIM_THRESHOLD = 2 * STEADY_MMAP_THRESHOLD
_allocator: str | None = None


def steady_allocator() -> str:
    """Put the C allocator in its long-running state before CPU timing, once per process, and say what was done.

    glibc adapts its mmap and trim thresholds to the blocks a process has freed so far, so the cost of the
    same step depends on what ran before it (see the module docstring). Fixing them at the values that
    adaptation converges to removes the dependence and measures each case as a training process would see it.
    Left alone where the C library is not glibc, or where ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
    already set them."""
    global _allocator
    if _allocator is None:
        _allocator = _set_malloc_thresholds()
    return _allocator


def _set_malloc_thresholds() -> str:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "left as is (not glibc)"
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return "left as is (MALLOC_*_THRESHOLD_ set in the environment)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, STEADY_TRIM_THRESHOLD) == 1)
    except (OSError, AttributeError):
        ok = False
    if not ok:
        return "left as is (mallopt failed)"
    return (f"glibc mmap threshold {STEADY_MMAP_THRESHOLD >> 20} MiB, trim threshold "
            f"{STEADY_TRIM_THRESHOLD >> 20} MiB (a long-running process's)")


def cpu_wait_ns() -> int | None:
    """Nanoseconds this process's threads have spent runnable but not running (waiting for a CPU that other
    processes held), summed over its threads, from Linux's per-thread schedstat. None where not available."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    total, read = 0, False
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
            read = True
        except (OSError, ValueError, IndexError):  # a thread that just ended, or no schedstat in this kernel
            continue
    return total if read else None


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") and "SC_CLK_TCK" in os.sysconf_names else 100


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has spent busy (user, nice, system, interrupts, and steal: time the
    hypervisor gave another guest), from Linux's /proc/stat, in clock ticks. None where not available. Minus this
    process's own CPU time, it is what other processes took."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    except (OSError, ValueError, IndexError):
        return None
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def spread(stats: dict) -> float | None:
    """IQR / median of a timing: 0.1 means the middle half of the samples spans 10% of the median."""
    med, iqr = stats.get("median_s"), stats.get("iqr_s")
    return iqr / med if med and iqr is not None else None


def bimodal(samples, *, gap: float = BIMODAL_GAP, share: float = BIMODAL_SHARE) -> bool:
    """True when the samples fall into two groups, each holding at least ``share`` of them (and 3), with no
    sample in a gap wider than ``gap`` × their median between the groups. A long tail of a few slow samples is
    not two modes; a step that alternates between two speeds is, even when its IQR is small."""
    s = sorted(samples)
    n = len(s)
    k = max(3, math.ceil(share * n))
    if n < 2 * k:
        return False
    widest = max(s[i] - s[i - 1] for i in range(k, n - k + 1))
    return widest > gap * statistics.median(s)


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


def _sample(runner: Runner, inner: int) -> tuple[float, float | None]:
    """One sample: (seconds per step, the share of its wall time this process's threads waited for a CPU, or
    None where that cannot be read)."""
    w0 = cpu_wait_ns()
    t = time.perf_counter()
    for _ in range(inner):
        runner.step()
    wall = time.perf_counter() - t
    w1 = cpu_wait_ns()
    waited = None if w0 is None or w1 is None else max(w1 - w0, 0) / 1e9 / max(wall, 1e-9)
    return wall / inner, waited


def sample_stats(samples: list[float], inner: int) -> dict:
    ordered = sorted(samples)
    q = len(ordered) // 4
    return {"median_s": statistics.median(ordered), "min_s": ordered[0], "iqr_s": ordered[-1 - q] - ordered[q],
            "samples": len(ordered), "steps_per_sample": inner, "samples_s": list(samples),
            "bimodal": bimodal(ordered)}


def ratio_interval(base_samples, other_samples, *, paired: bool, confidence: float = CONFIDENCE,
                   resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, floor_sd: float = 0.0
                   ) -> tuple[float, float] | None:
    """The ``confidence`` interval of median(other) / median(base), by bootstrap. ``paired`` (interleaved timings,
    where the i-th samples of both ran back to back) resamples whole rounds, in runs of consecutive rounds (a
    moving-block bootstrap, blocks of ∛n): a machine's speed drifts over seconds, so neighbouring rounds are
    alike, and resampling single rounds would take that drift for independent noise and give an interval too
    narrow to hold when the case is run again. Unpaired samples are resampled on their own. The interval is at
    least ± z·``floor_sd`` of the ratio at its confidence (z = 1.96 at 95%): ``floor_sd`` is the run-to-run
    standard deviation that separate runs showed (``CPU_RATIO_SD``), which no single run can see. Seeded, so that
    a report is reproducible from its samples. None with fewer than 3 samples a side."""
    a = torch.tensor(list(base_samples), dtype=torch.float64)
    b = torch.tensor(list(other_samples), dtype=torch.float64)
    n = a.numel()
    if n < 3 or b.numel() < 3 or (paired and n != b.numel()):
        return None
    gen = torch.Generator().manual_seed(seed)
    if paired:
        block = max(1, round(n ** (1 / 3)))
        starts = torch.randint(n - block + 1, (resamples, math.ceil(n / block)), generator=gen)
        ia = (starts.unsqueeze(-1) + torch.arange(block)).flatten(1)[:, :n]
        ib = ia
    else:
        ia = torch.randint(n, (resamples, n), generator=gen)
        ib = torch.randint(b.numel(), (resamples, b.numel()), generator=gen)
    # quantile 0.5, not Tensor.median: the mean of the two middle samples, as the reported medians are
    ratios = b[ib].quantile(0.5, dim=1) / a[ia].quantile(0.5, dim=1)
    tail = (1 - confidence) / 2
    lo, hi = torch.quantile(ratios, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    point = float(b.quantile(0.5) / a.quantile(0.5))
    floor = statistics.NormalDist().inv_cdf(1 - tail) * floor_sd
    return min(lo, point / (1 + floor)), max(hi, point * (1 + floor))


def time_interleaved(runners: dict, *, budget_s: float = 0.5, min_reps: int = 5, max_reps: int = 200,
                     warmup_s: float = 0.1, min_sample_s: float = 1e-3) -> dict:
    """Time several runners of one case in round robin (host timer; each step synchronizes) until ``budget_s``
    per runner has passed and ``min_reps`` clean rounds are in. A round in which any sample waited for a CPU
    more than ``CONTENDED_WAIT`` of its time is dropped; after ``BUSY_BUDGET_FACTOR`` × the budget the case
    keeps what it has (every round, marked ``busy``, if fewer than ``min_reps`` were clean). Returns {name:
    stats dict, or the exception that stopped it}."""
    steady_allocator()
    out: dict = {}
    inners = {}
    for name, runner in runners.items():
        try:
            inners[name] = _warm_up(runner, warmup_s, min_sample_s)
        except Exception as exc:  # noqa: BLE001 - recorded per provider
            out[name] = exc
    clean: dict[str, list[float]] = {name: [] for name in inners}
    every: dict[str, list[float]] = {name: [] for name in inners}
    measured = cpu_wait_ns() is not None
    others_s = kept_wall_s = 0.0  # what other processes ran beside the kept rounds, and those rounds' wall time
    start = time.perf_counter()
    rounds = contended = 0
    while every:
        this_round, busy_round = {}, False
        round_start, machine0, own0 = time.perf_counter(), machine_busy_s(), time.process_time()
        for name in list(every):
            try:
                this_round[name], waited = _sample(runners[name], inners[name])
            except Exception as exc:  # noqa: BLE001
                out[name] = exc
                del every[name], clean[name]
                continue
            busy_round |= waited is not None and waited > CONTENDED_WAIT
        rounds += 1
        contended += busy_round
        machine1, own1 = machine_busy_s(), time.process_time()
        for name, value in this_round.items():
            every[name].append(value)
            if not busy_round:
                clean[name].append(value)
        if not busy_round and machine0 is not None and machine1 is not None:
            # tick-sampled (10 ms), so one round's figure is coarse; summed over the kept rounds it is not
            others_s += (machine1 - machine0) - (own1 - own0)
            kept_wall_s += time.perf_counter() - round_start
        n_clean = rounds - contended
        budget = budget_s * max(len(every), 1)
        spent = time.perf_counter() - start
        done = n_clean >= max_reps or (n_clean >= min_reps and spent >= budget)
        # rounds were dropped and the extra time is spent: keep what there is rather than wait for the load to go
        give_up = contended and rounds >= min_reps and spent >= BUSY_BUDGET_FACTOR * budget
        if done or give_up or rounds >= BUSY_BUDGET_FACTOR * max_reps:
            break
    few_clean = rounds - contended < min_reps
    others = others_s / kept_wall_s if kept_wall_s > 0 else None
    busy_why = ("other processes kept it waiting for a CPU" if few_clean else
                f"other processes ran beside it ({max(others, 0):.1f} core)" if others and others > SHARED_CORES
                else None)
    for name in every:
        kept = every[name] if few_clean else clean[name]
        stats = sample_stats(kept, inners[name])
        stats.update(rounds_s=list(kept), rounds=rounds, contended_rounds=contended, busy=busy_why is not None,
                     busy_why=busy_why, others_cores=None if others is None else round(others, 3),
                     cpu_wait_measured=measured)
        out[name] = stats
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
    stats = sample_stats([t / 1e3 for t in times_ms], 1)
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
