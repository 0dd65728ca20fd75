"""The LoRA linear benchmark suite: every provider × mode × shape × rank × dropout of
``fastlora.bench.suite_cases``, grouped so that one group is one case and its rows are the providers.

Timing, memory and FLOP accounting are fastlora.bench's (shared with ``python -m fastlora bench``): each
timed call runs one step on the next pooled input and synchronizes CUDA before returning.
"""
import os

import pytest

from fastlora import bench

DEVICE = bench.resolve_device(os.environ.get("FASTLORA_BENCH_DEVICE", "auto"))
DTYPE = os.environ.get("FASTLORA_BENCH_DTYPE") or None
if DTYPE is not None:
    DTYPE = bench.DTYPE_NAMES[bench.DTYPES[DTYPE]]
CASES = bench.suite_cases(DEVICE, DTYPE, grid=os.environ.get("FASTLORA_BENCH_GRID", "full"))
_providers = os.environ.get("FASTLORA_BENCH_PROVIDERS")
PROVIDERS = [p.strip() for p in _providers.split(",")] if _providers else list(bench.PROVIDERS)
WARMUP_STEPS = 3


def _case_id(case):
    return f"{case.mode}-{case.shape}-r{case.r}-p{case.dropout:g}-{case.dtype}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_lora_linear(benchmark, case, provider):
    available, why = bench.provider_available(provider)
    if not available:
        pytest.skip(why)
    runner = bench.build_runner(provider, case)
    try:
        for _ in range(WARMUP_STEPS):  # compilation, autotuning, allocator warm-up: never timed
            runner.step()
    except Exception as exc:
        if provider == "compiled":  # e.g. inductor without a C++ compiler: the peer is absent, not broken
            pytest.skip(f"torch.compile failed here: {type(exc).__name__}: {exc}")
        raise
    env = bench.environment(DEVICE)
    benchmark.group = case.label()
    benchmark.extra_info.update({
        "provider": provider,
        "device": DEVICE,
        "device_name": env["device_name"],
        "dtype": case.dtype,
        "torch": env["torch"],
        "triton": env["triton"],
        "M": case.M, "K": case.K, "N": case.N, "r": case.r, "dropout": case.dropout, "mode": case.mode,
        "dropout_applied": runner.dropout_applied,
        "flops": bench.lora_flops(case, provider),
        "saved_bytes": bench.saved_activation_bytes(runner),
        "saved_beyond_input_bytes": bench.saved_activation_bytes(runner, include_input=False),
        "peak_bytes": bench.peak_memory_bytes(runner),
    })
    if runner.note:
        benchmark.extra_info["note"] = runner.note
    benchmark(runner.step)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median > 0:
        benchmark.extra_info["tflops"] = bench.lora_flops(case, provider) / stats.stats.median / 1e12
