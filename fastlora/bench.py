r"""Benchmarks of the LoRA linear: ``python -m fastlora bench`` and the shared code of ``benchmarks/``.

One case is a LoRA linear y = x Wᵀ + s·(drop(x) Aᵀ) Bᵀ with x (M, K), W (N, K) frozen, A (r, K) and B (N, r)
trained, run in one mode:

* ``forward``: the training forward (grad enabled, x requires grad, the graph and saved tensors are built);
* ``forward+backward``: that forward, then ``torch.autograd.grad`` of x, A and B (W frozen, so no dW);
* ``inference``: ``torch.no_grad()``, dropout off.

Providers, each computing the same function:

* ``fastlora``   ``fastlora.lora_linear`` (Triton kernels on CUDA, the factored torch fallback elsewhere);
* ``peft``       PEFT's unfused math ``base(x) + B(A(drop(x)))·s`` (``fastlora.reference.peft_lora_linear``);
* ``peft_layer`` the real ``peft.tuners.lora.Linear`` (when peft is installed);
* ``naive``      the seed notebook's ``W + s·B@A`` rebuilt every call (``fastlora.reference.merged_lora_linear``);
                 it cannot apply dropout, so with dropout > 0 it runs without (marked ``dropout_applied``);
* ``base``       the frozen ``nn.Linear`` alone: the floor (no LoRA work, no dropout);
* ``compiled``   ``torch.compile`` of the unfused math.

Timing is honest: every step synchronizes CUDA before it returns, warm-up runs first (autotuning included),
each step takes the next x and dY from a pool larger than the last-level cache, and the CLI times the
providers of a case in round robin so that load from other processes drifts over all of them alike. Memory per case: the bytes
autograd saves for backward (``saved_tensors_hooks``; each storage counted once, parameters excluded) and the
peak memory of one step above what was allocated before it (CUDA allocator statistics; on CPU the profiler's
allocation events).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import fastlora
from fastlora import reference

CLI_DESCRIPTION = ("Time fastlora's LoRA linear against PEFT's unfused math, the seed's W+BA reconstruction and the "
                   "frozen nn.Linear (forward, forward+backward, inference); print a table and write JSON, markdown "
                   "and a PNG plot of the speed-ups.")

__all__ = [
    "PROVIDERS", "PEERS", "MODES", "SHAPE_PRESETS", "GOALS", "Case", "Runner", "build_runner",
    "provider_available", "saved_activation_bytes", "peak_memory_bytes", "time_runner", "time_interleaved",
    "measure_case", "measure", "make_cases", "suite_cases", "run_cases", "lora_flops", "speedups", "summarize",
    "environment", "render_text", "render_markdown", "plot", "write_outputs", "resolve_device", "parse_shapes",
    "add_arguments", "run_cli", "main",
]

PROVIDERS = ("fastlora", "peft", "peft_layer", "naive", "base", "compiled")
PEERS = PROVIDERS[1:]
MODES = ("forward", "forward+backward", "inference")
DEFAULT_PROVIDERS = ("fastlora", "peft", "naive", "base")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _grid(Ms, KNs):
    return tuple((M, K, K) for K in KNs for M in Ms)


# Shapes are (M, K, N): x (M, K) → y (M, N).
SHAPE_PRESETS = {
    # issue 3's goal grid (H100, bf16, r=16)
    "issue3": _grid((2048, 4096, 8192), (4096, 5120, 8192)),
    # LLaMA MLP up/gate (4096→14336) and down (14336→4096) projections, 4096 tokens
    "llama": ((4096, 4096, 14336), (4096, 14336, 4096)),
    # decode: a few tokens through a 4096×4096 projection
    "decode": ((1, 4096, 4096), (16, 4096, 4096), (64, 4096, 4096)),
    # issue 2's CPU goal shape
    "goal2": ((2048, 2048, 2048),),
    # scaled-down CPU grids (fp32)
    "cpu": _grid((256, 512, 1024, 2048), (1024, 2048)),
    "cpu-quick": _grid((256, 1024), (1024,)),
}

# Goals stated in the issues: (mode, peer) → (description, kind, threshold). "speedup" is peer time / fastlora
# time (≥ threshold), "ratio" is fastlora time / peer time (≤ threshold); both as geometric means over the grid.
GOALS = {
    "issue3": {
        ("forward+backward", "peft"): ("fwd+bwd speed-up vs PEFT math", "speedup", 1.3),
        ("forward+backward", "base"): ("fwd+bwd time ratio vs frozen nn.Linear", "ratio", 1.15),
        ("forward", "base"): ("fwd time ratio vs frozen nn.Linear", "ratio", 1.08),
        ("forward+backward", "naive"): ("fwd+bwd speed-up vs W+BA (naive)", "speedup", 1.4),
    },
    "issue2": {
        ("forward+backward", "naive"): ("fwd+bwd speed-up vs W+BA (naive)", "speedup", 1.3),
        ("forward+backward", "peft"): ("fwd+bwd speed-up vs PEFT math", "speedup", 1.0),
        ("forward+backward", "base"): ("fwd+bwd time ratio vs frozen nn.Linear", "ratio", 1.10),
    },
}
# Dropout rates a goal set is stated for (None: all cases of the grid). Issue 2's CPU goal is for dropout 0.
GOAL_DROPOUT = {"issue3": None, "issue2": (0.0,)}


# ---------------------------------------------------------------------------------------------------------
# Cases and providers
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark point. ``scaling`` is lora_alpha / r with PEFT's common alpha = 2r."""

    M: int
    K: int
    N: int
    r: int = 16
    dtype: str = "float32"
    dropout: float = 0.0
    mode: str = "forward+backward"
    device: str = "cpu"
    bias: bool = False
    scaling: float = 2.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.dtype not in DTYPE_NAMES.values():
            raise ValueError(f"dtype must be one of {sorted(set(DTYPE_NAMES.values()))}, got {self.dtype!r}")
        if min(self.M, self.K, self.N, self.r) < 1:
            raise ValueError(f"M, K, N and r must be >= 1, got M={self.M} K={self.K} N={self.N} r={self.r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def training(self) -> bool:
        return self.mode != "inference"

    @property
    def shape(self) -> str:
        return f"{self.M}x{self.K}x{self.N}"

    def label(self) -> str:
        return f"{self.mode} M={self.M} K={self.K} N={self.N} r={self.r} p={self.dropout:g} {self.dtype}"


def lora_flops(case: Case, provider: str) -> float:
    """Useful FLOPs of one step: the LoRA layer's own work (the base GEMMs plus the low-rank products),
    whatever extra a provider spends (naive's B@A and its gradient count for nothing). ``base`` is credited
    with the base GEMMs only."""
    M, K, N, r = case.M, case.K, case.N, case.r
    base_fwd = 2.0 * M * N * K
    lora_fwd = 2.0 * M * K * r + 2.0 * M * N * r
    if case.mode == "forward+backward":
        base_total = 2 * base_fwd  # forward + dX (W frozen: no dW)
        lora_total = 3 * lora_fwd  # forward; dh and dB; dh@A and dA
    else:
        base_total, lora_total = base_fwd, lora_fwd
    return base_total if provider == "base" else base_total + lora_total


def _cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        unit = {"K": 2**10, "M": 2**20}.get(text[-1], 1)
        return int(text.rstrip("KM")) * unit
    except (OSError, ValueError):
        return 32 * 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """A ready-to-time provider on one case. ``step()`` runs one iteration on the next pooled input and
    synchronizes before returning; ``forward(x)`` gives the output (for memory and correctness checks)."""

    def __init__(self, case: Case, provider: str, fn: Callable, params: list, grad_inputs: Callable,
                 pool_x: list, pool_dy: list, dropout_applied: bool, note: str = ""):
        self.case, self.provider = case, provider
        self.fn, self.params = fn, params
        self.grad_inputs = grad_inputs  # x → the tensors torch.autograd.grad differentiates
        self.pool_x, self.pool_dy = pool_x, pool_dy
        self.dropout_applied, self.note = dropout_applied, note
        self.device = pool_x[0].device
        self._i = 0

    def forward(self, x):
        if self.case.mode == "inference":
            with torch.no_grad():
                return self.fn(x)
        return self.fn(x)

    def step(self) -> None:
        i = self._i = (self._i + 1) % len(self.pool_x)
        x = self.pool_x[i]
        if self.case.mode == "inference":
            with torch.no_grad():
                self.fn(x)
        elif self.case.mode == "forward":
            self.fn(x)
        else:
            y = self.fn(x)
            torch.autograd.grad(y, self.grad_inputs(x), self.pool_dy[i])
        _sync(self.device)


def _peft_layer(case: Case, weight, bias, lora_A, lora_B):
    """The real peft.tuners.lora.Linear around a frozen nn.Linear holding ``weight``; adapters in the base dtype
    (``autocast_adapter_dtype=False``) and copied from lora_A / lora_B."""
    import torch.nn as nn
    from peft import LoraConfig, get_peft_model

    class _One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(case.K, case.N, bias=case.bias, device=weight.device, dtype=weight.dtype)

        def forward(self, x):
            return self.proj(x)

    holder = _One()
    with torch.no_grad():
        holder.proj.weight.copy_(weight)
        if bias is not None:
            holder.proj.bias.copy_(bias)
    config = LoraConfig(r=case.r, lora_alpha=case.scaling * case.r, lora_dropout=case.dropout,
                        target_modules=["proj"], bias="none")
    try:
        model = get_peft_model(holder, config, autocast_adapter_dtype=False)
    except TypeError:  # peft older than 0.12 has no autocast_adapter_dtype
        model = get_peft_model(holder, config)
    layer = model.base_model.model.proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        A.data = lora_A.detach().clone().to(A.device, weight.dtype)
        B.data = lora_B.detach().clone().to(B.device, weight.dtype)
    layer.train(case.training)
    return layer, [A, B]


def build_runner(provider: str, case: Case, *, seed: int = 0, pool_size: int | None = None) -> Runner:
    """Allocate the case's tensors on its device and wrap ``provider``'s call. Raises ImportError for
    ``peft_layer`` without peft."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    device, dtype = torch.device(case.device), case.torch_dtype
    M, K, N, r = case.M, case.K, case.N, case.r
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: fast for GPU-sized grids

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)

    weight = rand(N, K, scale=K ** -0.5)
    bias = rand(N, scale=0.1) if case.bias else None
    lora_A = rand(r, K, scale=K ** -0.5).requires_grad_(case.training)
    lora_B = rand(N, r, scale=0.1).requires_grad_(case.training)  # nonzero: every gradient is exercised
    s, p, training = case.scaling, case.dropout, case.training

    if pool_size is None:
        per_step = (M * K + (M * N if case.mode == "forward+backward" else 0)) * torch.finfo(dtype).bits // 8
        pool_size = min(16, max(2, math.ceil(2 * _cache_bytes(device) / max(per_step, 1))))
    pool_x = [rand(M, K).requires_grad_(training) for _ in range(pool_size)]
    pool_dy = [rand(M, N) for _ in range(pool_size)] if case.mode == "forward+backward" else [None] * pool_size

    params = [weight, lora_A, lora_B] + ([bias] if bias is not None else [])
    lora_inputs = lambda x: (x, lora_A, lora_B)  # noqa: E731
    dropout_applied = p > 0 and training
    note = ""

    if provider == "fastlora":
        def fn(x):
            return fastlora.lora_linear(x, weight, lora_A, lora_B, bias, scaling=s, dropout_p=p, training=training)
        grad_inputs = lora_inputs
    elif provider == "peft":
        def fn(x):
            return reference.peft_lora_linear(x, weight, lora_A, lora_B, bias, scaling=s, dropout_p=p,
                                              training=training)
        grad_inputs = lora_inputs
    elif provider == "compiled":
        import torch._dynamo as dynamo

        dynamo.reset()  # a fresh cache per case: static shapes, no recompile limit across a grid
        compiled = torch.compile(reference.peft_lora_linear, dynamic=False)

        def fn(x):
            return compiled(x, weight, lora_A, lora_B, bias, scaling=s, dropout_p=p, training=training)
        grad_inputs = lora_inputs
    elif provider == "naive":
        def fn(x):
            return reference.merged_lora_linear(x, weight, lora_A, lora_B, bias, scaling=s)
        grad_inputs = lora_inputs
        if dropout_applied:
            dropout_applied = False
            note = "W+BA cannot apply dropout: timed without it"
    elif provider == "base":
        def fn(x):
            return F.linear(x, weight, bias)
        grad_inputs = lambda x: (x,)  # noqa: E731
        dropout_applied = False
        if training:
            note = "frozen linear: no LoRA work, no dropout"
    else:  # peft_layer
        layer, (A, B) = _peft_layer(case, weight, bias, lora_A, lora_B)
        fn = layer
        params = params + [A, B] + [t for t in layer.parameters()]
        grad_inputs = lambda x: (x, A, B)  # noqa: E731
    return Runner(case, provider, fn, params, grad_inputs, pool_x, pool_dy, dropout_applied, note)


def provider_available(provider: str) -> tuple[bool, str]:
    """(available, why not) for a provider on this machine, without building anything."""
    if provider == "peft_layer":
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            return False, "peft is not installed (pip install peft)"
    return True, ""


# ---------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------

def saved_activation_bytes(runner: Runner, include_input: bool = True) -> int | None:
    """Bytes that autograd saves for backward in one training forward: each storage once, the parameters
    (weight, bias, adapters and views of them) excluded. 0 in inference mode. With ``include_input=False``
    the input x is excluded too: what remains is memory that lives only because autograd saved it (x is
    held by the caller or the previous layer anyway)."""
    if not runner.case.training:
        return 0
    x = runner.pool_x[0]
    held = list(runner.params) + ([] if include_input else [x])
    param_ptrs = {t.untyped_storage().data_ptr() for t in held if t is not None}
    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in param_ptrs:
                seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        except (RuntimeError, NotImplementedError):  # a tensor without storage (a subclass): not counted
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = runner.fn(x)
    del y
    return sum(seen.values())


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C-level stderr (the profiler's start/stop lines) while profiling."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def peak_memory_bytes(runner: Runner) -> int | None:
    """Peak memory of one step above what was allocated before it (output, saved tensors, gradients and
    temporaries; not the inputs or parameters). CUDA: allocator statistics. CPU: the profiler's allocation
    events, summed in time order. None where neither is available."""
    device = runner.device
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        runner.step()
        return int(torch.cuda.max_memory_allocated(device) - before)
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    try:
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            runner.step()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except (RuntimeError, AttributeError):
        return None
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return int(peak)


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
        runner.step()  # each step ends in a CUDA sync
    return (time.perf_counter() - t) / inner


def _stats(samples: list[float], inner: int) -> dict:
    samples = sorted(samples)
    q = len(samples) // 4
    return {"median_s": statistics.median(samples), "min_s": samples[0], "iqr_s": samples[-1 - q] - samples[q],
            "samples": len(samples), "steps_per_sample": inner}


def time_runner(runner: Runner, *, budget_s: float = 0.5, min_reps: int = 5, max_reps: int = 200,
                warmup_s: float = 0.1, min_sample_s: float = 1e-3) -> dict:
    """Median time of one step, in seconds, of one runner: warm-up, then samples until ``budget_s`` has passed
    (at least ``min_reps``, at most ``max_reps``)."""
    return time_interleaved({"one": runner}, budget_s=budget_s, min_reps=min_reps, max_reps=max_reps,
                            warmup_s=warmup_s, min_sample_s=min_sample_s)["one"]


def time_interleaved(runners: dict, *, budget_s: float = 0.5, min_reps: int = 5, max_reps: int = 200,
                     warmup_s: float = 0.1, min_sample_s: float = 1e-3) -> dict:
    """Time several runners of one case in round robin: one sample of each in turn, until ``budget_s`` per
    runner has passed. On a shared or throttling machine the load then drifts over all providers alike,
    which keeps their ratios honest. Returns {name: stats dict, or the exception that stopped it}."""
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
        if rounds >= max_reps or (rounds >= min_reps and time.perf_counter() - start >= budget_s * max(len(samples), 1)):
            break
    for name, vals in samples.items():
        out[name] = _stats(vals, inners[name])
    return out


def _error(exc: BaseException) -> str:
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
            rows[p]["error"] = _error(exc)
    try:
        timings = time_interleaved(runners, budget_s=budget_s, min_reps=min_reps, warmup_s=min(0.1, budget_s))
        for p, timing in timings.items():
            row, runner = rows[p], runners[p]
            if isinstance(timing, BaseException):
                row["error"] = _error(timing)
                continue
            row.update(timing)
            row["time_ms"] = timing["median_s"] * 1e3
            row["tflops"] = lora_flops(case, p) / timing["median_s"] / 1e12
            row["saved_bytes"] = _or_none(saved_activation_bytes, runner)
            row["saved_beyond_input_bytes"] = _or_none(saved_activation_bytes, runner, False)
            row["peak_bytes"] = _or_none(peak_memory_bytes, runner)
            row["dropout_applied"] = runner.dropout_applied
            if runner.note:
                row["note"] = runner.note
    finally:
        runners.clear()
        if torch.device(case.device).type == "cuda":
            torch.cuda.empty_cache()
    return [rows[p] for p in providers]


def measure(provider: str, case: Case, *, budget_s: float = 0.5, min_reps: int = 5, seed: int = 0) -> dict:
    """Build, time and measure one provider on one case. Errors are recorded, not raised."""
    return measure_case(case, [provider], budget_s=budget_s, min_reps=min_reps, seed=seed)[0]


def _or_none(fn, *args):
    try:
        return fn(*args)
    except Exception:  # memory accounting is best effort: a hook-hostile provider gets no figure
        return None


# ---------------------------------------------------------------------------------------------------------
# Grids, runs and reports
# ---------------------------------------------------------------------------------------------------------

def parse_shapes(spec: str) -> list[tuple[int, int, int]]:
    """'MxKxN' tokens and preset names, comma-separated: '2048x4096x4096,decode'."""
    shapes = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token in SHAPE_PRESETS:
            shapes.extend(SHAPE_PRESETS[token])
            continue
        parts = token.lower().split("x")
        try:
            M, K, N = (int(v) for v in parts)
        except ValueError:
            raise ValueError(
                f"bad shape {token!r}: use MxKxN (x is (M, K), y is (M, N)), e.g. 2048x4096x4096, or a preset: "
                f"{', '.join(SHAPE_PRESETS)}") from None
        if min(M, K, N) < 1:
            raise ValueError(f"bad shape {token!r}: M, K and N must be >= 1")
        shapes.append((M, K, N))
    if not shapes:
        raise ValueError("no shapes given")
    return list(dict.fromkeys(shapes))


def make_cases(shapes, ranks, dropouts, modes, dtype: str, device: str, bias: bool = False) -> list[Case]:
    """The cross product, skipping inference with dropout > 0 (dropout is off in inference: a duplicate)."""
    cases = []
    for mode in modes:
        for p in dropouts:
            if mode == "inference" and p > 0:
                continue
            for r in ranks:
                for M, K, N in shapes:
                    cases.append(Case(M, K, N, r=r, dtype=dtype, dropout=p, mode=mode, device=device, bias=bias))
    return cases


def suite_cases(device: str, dtype: str | None = None, grid: str = "full") -> list[Case]:
    """The pytest-benchmark suite's cases. CUDA (bf16): issue 3's grid and the LLaMA MLP shapes with r ∈ {16, 64}
    and dropout 0 / 0.1, decode shapes with dropout 0; ``grid='quick'`` keeps issue 3's grid at r=16. CPU
    (fp32): a scaled-down grid that runs in minutes on 2 cores, plus issue 2's goal shape."""
    cuda = torch.device(device).type == "cuda"
    dtype = dtype or ("bfloat16" if cuda else "float32")
    if grid not in ("full", "quick"):
        raise ValueError(f"grid must be 'full' or 'quick', got {grid!r}")
    if cuda:
        ranks = [16] if grid == "quick" else [16, 64]
        cases = make_cases(SHAPE_PRESETS["issue3"], ranks, [0.0, 0.1], MODES, dtype, device)
        if grid == "full":
            cases += make_cases(SHAPE_PRESETS["llama"], ranks, [0.0, 0.1], MODES, dtype, device)
            cases += make_cases(SHAPE_PRESETS["decode"], ranks, [0.0], MODES, dtype, device)
        return cases
    shapes = SHAPE_PRESETS["cpu-quick"] if grid == "quick" else SHAPE_PRESETS["cpu-quick"] + SHAPE_PRESETS["goal2"]
    return make_cases(shapes, [16], [0.0, 0.1], MODES, dtype, device)


class Progress:
    """A plain progress bar on stderr: redrawn in place on a terminal, a line per ~10% otherwise."""

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
            self.stream.write("\r" + line[:150].ljust(150))
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


def _case_key(row: dict) -> tuple:
    return tuple(row[f] for f in ("mode", "M", "K", "N", "r", "dtype", "dropout", "bias", "device"))


def _geomean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def speedups(rows: list[dict]) -> dict:
    """{case key: {peer: peer time / fastlora time}} for every case where both were timed."""
    by_case: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault(_case_key(row), {})[row["provider"]] = row
    out = {}
    for key, group in by_case.items():
        fl = group.get("fastlora", {}).get("median_s")
        if not fl:
            continue
        out[key] = {p: g["median_s"] / fl for p, g in group.items() if p != "fastlora" and g.get("median_s")}
    return out


def summarize(rows: list[dict], goals: str | None = None) -> list[dict]:
    """Geometric means over the grid of fastlora's speed-up over each peer (peer time / fastlora time), per mode;
    with ``goals`` ('issue2' or 'issue3'), each stated goal with its measured value and whether it is met."""
    sp = speedups(rows)
    modes = [m for m in MODES if any(k[0] == m for k in sp)]
    summary = []
    for mode in modes:
        peers = sorted({p for k, v in sp.items() if k[0] == mode for p in v}, key=PROVIDERS.index)
        for peer in peers:
            vals = [v[peer] for k, v in sp.items() if k[0] == mode and peer in v]
            g = _geomean(vals)
            entry = {"mode": mode, "peer": peer, "cases": len(vals), "geomean_speedup": g,
                     "geomean_ratio": (1.0 / g) if g else None, "min_speedup": min(vals), "max_speedup": max(vals)}
            goal = GOALS.get(goals or "", {}).get((mode, peer))
            rates = GOAL_DROPOUT.get(goals or "")
            goal_vals = [v[peer] for k, v in sp.items() if k[0] == mode and peer in v
                         and (rates is None or k[6] in rates)]  # k[6]: the case's dropout (see _case_key)
            goal_g = _geomean(goal_vals)
            if goal and goal_g:
                text, kind, threshold = goal
                value = goal_g if kind == "speedup" else 1.0 / goal_g
                met = value >= threshold if kind == "speedup" else value <= threshold
                entry["goal"] = {"text": text, "kind": kind, "threshold": threshold, "value": value, "met": met,
                                 "dropout": list(rates) if rates is not None else "all", "cases": len(goal_vals)}
            summary.append(entry)
    return summary


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


def _mib(b):
    return "–" if b is None else f"{b / 2**20:.1f}"


def _ms(row):
    return f"{row['time_ms']:.3g}" if row.get("time_ms") is not None else "err"


def tables(rows: list[dict], providers) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per mode: (title, header, body). One row per case: time per provider, fastlora's speed-up over each
    peer, and peak / saved MiB per provider."""
    sp = speedups(rows)
    by_case: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault(_case_key(row), {})[row["provider"]] = row
    peers = [p for p in providers if p != "fastlora"]
    out = []
    for mode in MODES:
        keys = [k for k in by_case if k[0] == mode]
        if not keys:
            continue
        header = ["M", "K", "N", "r", "p"] + [f"{p} ms" for p in providers] + [f"× vs {p}" for p in peers]
        header += ["peak MiB " + "/".join(providers)]
        if mode != "inference":
            header += ["saved MiB " + "/".join(providers)]
        body = []
        for k in keys:
            g = by_case[k]
            cells = [str(k[1]), str(k[2]), str(k[3]), str(k[4]), f"{k[6]:g}"]
            for p in providers:
                row = g.get(p, {})
                mark = "†" if row.get("note") and mode != "inference" and k[6] > 0 else ""
                cells.append(_ms(row) + mark)
            for p in peers:
                v = sp.get(k, {}).get(p)
                cells.append("–" if v is None else f"{v:.2f}×")
            cells.append("/".join(_mib(g.get(p, {}).get("peak_bytes")) for p in providers))
            if mode != "inference":
                cells.append("/".join(_mib(g.get(p, {}).get("saved_bytes")) for p in providers))
            body.append(cells)
        out.append((mode, header, body))
    return out


def _text_table(header, body) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def _md_table(header, body) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def _summary_lines(summary) -> list[list[str]]:
    body = []
    for s in summary:
        g = s["geomean_speedup"]
        goal = s.get("goal")
        goal_txt = ""
        if goal:
            rel = "≥" if goal["kind"] == "speedup" else "≤"
            goal_txt = (f"{goal['text']}: {goal['value']:.3f} (goal {rel} {goal['threshold']}) "
                        f"{'MET' if goal['met'] else 'MISSED'}")
        body.append([s["mode"], s["peer"], str(s["cases"]), "–" if g is None else f"{g:.3f}×",
                     "–" if g is None else f"{1 / g:.3f}", f"{s['min_speedup']:.2f}–{s['max_speedup']:.2f}",
                     goal_txt])
    return body


SUMMARY_HEADER = ["mode", "peer", "cases", "geomean speed-up (peer t / fastlora t)",
                  "geomean ratio (fastlora t / peer t)", "range", "goal"]


def render_text(report: dict) -> str:
    meta = report["meta"]
    parts = [f"fastlora bench on {meta['device']} ({meta['device_name']}), {meta['dtype']}, torch {meta['torch']}, "
             f"triton {meta['triton']}, {meta['date_utc']}"]
    if meta.get("interrupted"):
        parts.append("INTERRUPTED: partial results (the run was stopped before every case was measured)")
    for mode, header, body in tables(report["results"], meta["providers"]):
        parts.append(f"\n{mode} (median ms per step; × = fastlora's speed-up over the peer)")
        parts.append(_text_table(header, body))
    if report["summary"]:
        parts.append("\nGeometric means over the grid")
        parts.append(_text_table(SUMMARY_HEADER, _summary_lines(report["summary"])))
    errors = [r for r in report["results"] if r.get("error")]
    if errors:
        parts.append("\nErrors:")
        seen = set()
        for r in errors:
            msg = f"  {r['provider']}: {r['error']}"
            if msg not in seen:
                seen.add(msg)
                parts.append(msg)
    if any(r.get("note") for r in report["results"]):
        parts.append("† the peer cannot apply dropout (naive W+BA) or has no LoRA branch (base): timed without it.")
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
    ]
    if meta.get("interrupted"):
        lines.append("- **INTERRUPTED: partial results** (the run was stopped before every case was measured)")
    lines += [
        "- times are medians of one step (forward, forward+backward or no-grad inference), CUDA synchronized; "
        "× is fastlora's speed-up over the peer (peer time / fastlora time); peak MiB is one step's peak above "
        "the resident inputs and parameters; saved MiB is what autograd keeps for backward (parameters "
        "excluded)",
    ]
    if report["summary"]:
        lines += ["", "## Geometric means over the grid", "", _md_table(SUMMARY_HEADER, _summary_lines(report["summary"]))]
    for mode, header, body in tables(report["results"], meta["providers"]):
        lines += ["", f"## {mode}", "", _md_table(header, body)]
    if any(r.get("note") for r in report["results"]):
        lines += ["", "† the peer cannot apply dropout (naive W+BA) or has no LoRA branch (base): timed without it."]
    errors = sorted({f"{r['provider']}: {r['error']}" for r in report["results"] if r.get("error")})
    if errors:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in errors]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Speed-up of fastlora over each peer vs M: one panel per (mode, K×N, r), one line per peer (dashed with
    dropout > 0). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sp = speedups(report["results"])
    panels = sorted({(k[0], k[2], k[3], k[4]) for k in sp}, key=lambda t: (MODES.index(t[0]), t[1], t[2], t[3]))
    if not panels:
        raise ValueError("nothing to plot: no case has both fastlora and a peer timed")
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.8 * rows_n), squeeze=False)
    colors = {p: f"C{i}" for i, p in enumerate(PEERS)}
    for ax, (mode, K, N, r) in zip(axes.flat, panels):
        keys = [k for k in sp if (k[0], k[2], k[3], k[4]) == (mode, K, N, r)]
        for peer in PEERS:
            for p in sorted({k[6] for k in keys}):
                pts = sorted((k[1], sp[k][peer]) for k in keys if k[6] == p and peer in sp[k])
                if pts:
                    ax.plot([m for m, _ in pts], [v for _, v in pts], marker="o", color=colors[peer],
                            linestyle="-" if p == 0 else "--", label=f"vs {peer}" + (f" (p={p:g})" if p else ""))
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ms = sorted({k[1] for k in keys})
        ax.set_xticks(ms)
        ax.set_xticklabels([str(m) for m in ms])
        ax.minorticks_off()
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("fastlora speed-up (×)")
        ax.set_title(f"{mode}, K={K} N={N} r={r}", fontsize=10)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    meta = report["meta"]
    fig.suptitle(f"fastlora speed-up, {meta['device_name']}, {meta['dtype']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
            written["plot_skipped"] = 'matplotlib is not installed: pip install "fastlora[plot]" for the PNG plot'
        else:
            try:
                plot(report, out / "speedup.png")
                written["plot"] = str(out / "speedup.png")
            except ValueError as exc:
                written["plot_skipped"] = str(exc)
    return written


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def resolve_device(name: str) -> str:
    """'auto' → the best device present (cuda if available, else cpu); otherwise the named device, which
    must be present. Raises ValueError saying what is there."""
    name = name.strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = torch.version.cuda or "none (a CPU-only torch build)"
            raise ValueError(
                f"device {name!r} is not present: torch {torch.__version__} sees no CUDA device (CUDA in this "
                f"torch build: {built}). Run on --device cpu, or on a machine with an NVIDIA GPU and a CUDA "
                "build of torch.")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {name!r} is not present: this machine has {count} CUDA device(s), "
                             f"cuda:0..cuda:{count - 1}")
        return str(dev)
    raise ValueError(f"device {name!r} is not supported by fastlora bench: use auto, cpu or cuda[:N]")


def _floats(text):
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not 0.0 <= v < 1.0 for v in vals):
        raise argparse.ArgumentTypeError(f"dropout must be in [0, 1), got {text!r}")
    return vals


def _ints(text):
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"ranks must be >= 1, got {text!r}")
    return vals


def _names(allowed, what):
    def parse(text):
        vals = [v.strip() for v in text.split(",") if v.strip()]
        if vals == ["all"]:
            return list(allowed)
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad or text!r}: choose from {', '.join(allowed)}")
        return vals
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a small grid (CPU: M∈{256,1024}, K=N=1024; CUDA: issue 3's grid), forward and "
                             "forward+backward, dropout 0 and 0.1, short timing budget")
    parser.add_argument("--device", default="auto", help="auto (default: cuda if present, else cpu), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--rank", type=_ints, default=None, help="LoRA rank(s), comma-separated (default 16)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated MxKxN (x is (M,K), y is (M,N)) and presets: "
                             + ", ".join(f"{k} ({len(v)} shapes)" for k, v in SHAPE_PRESETS.items())
                             + "; default: issue3 on CUDA, cpu on CPU (cpu-quick with --quick)")
    parser.add_argument("--dropout", type=_floats, default=None, help="dropout p values, comma-separated (default 0,0.1)")
    parser.add_argument("--modes", type=_names(MODES, "mode"), default=None,
                        help="forward, forward+backward, inference, or all (default: all; forward and "
                             "forward+backward with --quick)")
    parser.add_argument("--providers", type=_names(PROVIDERS, "provider"), default=None,
                        help=f"from {', '.join(PROVIDERS)}, or all (default: {', '.join(DEFAULT_PROVIDERS)}); "
                             "fastlora is always included")
    parser.add_argument("--bias", action="store_true", help="give the base linear a (frozen) bias")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timing per measurement after warm-up (default 0.5; 0.2 with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (torch.set_num_threads; default: torch's choice)")
    parser.add_argument("--goals", choices=sorted(GOALS), default=None,
                        help="also check the geometric means against issue 2's (CPU) or issue 3's (GPU) goals")
    parser.add_argument("--out", default="fastlora-bench", help="output folder (default ./fastlora-bench/)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace, stream=None) -> int:
    stream = stream if stream is not None else sys.stdout
    try:
        device = resolve_device(args.device)
        shapes_spec = args.shapes or ("issue3" if device.startswith("cuda") else
                                      ("cpu-quick" if args.quick else "cpu"))
        shapes = parse_shapes(shapes_spec)
    except ValueError as exc:
        print(f"fastlora bench: error: {exc}", file=sys.stderr)
        return 2
    dtype_name = DTYPE_NAMES[DTYPES[args.dtype]] if args.dtype else ("bfloat16" if device.startswith("cuda") else "float32")
    ranks = args.rank or [16]
    dropouts = args.dropout if args.dropout is not None else [0.0, 0.1]
    modes = args.modes or (["forward", "forward+backward"] if args.quick else list(MODES))
    providers = ["fastlora"] + [p for p in (args.providers or DEFAULT_PROVIDERS) if p != "fastlora"]
    budget = args.budget if args.budget is not None else (0.2 if args.quick else 0.5)
    cases = make_cases(shapes, ranks, dropouts, modes, dtype_name, device, bias=args.bias)

    print(f"fastlora bench: {len(cases)} cases × {len(providers)} providers on {device} ({dtype_name}); "
          f"results to {args.out}/", file=stream)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    rows = run_cases(cases, providers, budget_s=budget)
    interrupted = len(rows) < len(cases) * len(providers)
    meta = environment(device)
    meta.update({
        "device": device, "dtype": dtype_name, "ranks": ranks, "dropouts": dropouts, "modes": modes,
        "shapes": [f"{M}x{K}x{N}" for M, K, N in shapes], "providers": providers, "budget_s": budget,
        "quick": bool(args.quick), "bias": bool(args.bias), "wall_s": round(time.perf_counter() - t0, 1),
        "interrupted": interrupted,
        "command": " ".join(["python -m fastlora bench"] + list(getattr(args, "argv", []) or [])),
    })
    report = {"meta": meta, "results": rows, "summary": summarize(rows, args.goals)}
    print(render_text(report), file=stream)
    written = write_outputs(report, Path(args.out), make_plot=not args.no_plot)
    for kind in ("json", "markdown", "plot"):
        if kind in written:
            print(f"wrote {written[kind]}", file=stream)
    if "plot_skipped" in written:
        print(f"plot skipped: {written['plot_skipped']}", file=stream)
    timed = [r for r in rows if r.get("provider") == "fastlora" and r.get("median_s")]
    return 0 if timed and not interrupted else 1


def main(argv=None) -> int:
    """``python -m fastlora bench [options]`` without the ``bench`` word."""
    parser = argparse.ArgumentParser(prog="fastlora bench", description=CLI_DESCRIPTION)
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return run_cli(args)
