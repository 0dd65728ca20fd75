"""The LoRA linear benchmark suite: every provider × case of ``fastlora.bench.suite_cases`` (the grid and the
providers are chosen in conftest.py), grouped so that one group is one case and its rows are the providers.

Timing, memory and FLOP accounting are fastlora.bench's, shared with ``python -m fastlora bench``: each timed
call runs one step on the next pooled input and synchronizes CUDA before returning, which is what a host timer
like pytest-benchmark's needs. On CUDA each benchmark also times the step the way kernel libraries do
(``triton.testing.do_bench``: CUDA events, L2 cleared between calls); the closing speed-up summary uses those
times there, pytest-benchmark's medians elsewhere. On the CPU the C allocator is put in its long-running state
first (``bench.steady_allocator``), as the CLI does, so that no case's time depends on the cases before it.
"""
import pytest

from fastlora import bench

DEVICE, DTYPE, GRID, PROVIDERS = bench.suite_settings()
CASES = bench.suite_cases(DEVICE, DTYPE, grid=GRID)
if DEVICE == "cpu":
    bench.steady_allocator()
WARMUP_STEPS = 3
MODE_IDS = {"forward": "fwd", "forward+backward": "fwd+bwd", "inference": "infer"}


def _case_id(case):
    return f"{MODE_IDS[case.mode]}-{case.shape}-r{case.r}-p{case.dropout:g}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_lora_linear(benchmark, record_row, case, provider):
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
    info = {
        "provider": provider, "device": DEVICE, "device_name": env["device_name"], "dtype": case.dtype,
        "torch": env["torch"], "triton": env["triton"],
        "M": case.M, "K": case.K, "N": case.N, "r": case.r, "dropout": case.dropout, "mode": case.mode,
        "dropout_applied": runner.dropout_applied, "as_asked": runner.as_asked,
        "flops": bench.lora_flops(case, provider),
        "saved_bytes": bench.saved_activation_bytes(runner),
        "saved_beyond_input_bytes": bench.saved_activation_bytes(runner, include_input=False),
        "peak_bytes": bench.peak_memory_bytes(runner),
    }
    if runner.note:
        info["note"] = runner.note
    if runner.device.type == "cuda":
        cuda = bench.time_cuda(runner, budget_s=0.2)
        info.update(cuda_median_ms=cuda["median_s"] * 1e3, cuda_timer=cuda["timer"])
    benchmark.extra_info.update(info)
    benchmark(runner.step)

    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is None or not stats.median > 0:  # --benchmark-disable: nothing was timed
        return
    if runner.device.type == "cuda":
        median, spread, timer = cuda["median_s"], bench.spread(cuda), cuda["timer"]
    else:
        median, spread, timer = stats.median, stats.iqr / stats.median, "pytest-benchmark host timer"
    benchmark.extra_info["tflops"] = bench.lora_flops(case, provider) / median / 1e12
    record_row({**{f: getattr(case, f) for f in bench.summary.CASE_FIELDS}, "provider": provider,
                "median_s": median, "time_ms": median * 1e3, "spread": spread, "as_asked": runner.as_asked,
                "saved_bytes": info["saved_bytes"], "peak_bytes": info["peak_bytes"], "timer": timer})
