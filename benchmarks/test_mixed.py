"""Mixed-adapter batches (pytest-benchmark): one PEFT LoRA layer holding n adapters, rows spread evenly over them,
inference; fastlora's fused mixed batch against PEFT's own, the frozen linear and fastlora's single-adapter op.
One group per case, one row per provider.

Cases and providers are benchmarks/mixed_check.py's (the script the GPU check runs): on CPU its "cpu" preset
(512 rows, K = N = 1024, r = 16, 1-64 adapters), on CUDA "prefill" and "decode". Knobs: FASTLORA_BENCH_DEVICE and
FASTLORA_MIXED_PRESETS (comma-separated presets of mixed_check.py).
"""
import os

import pytest

pytest.importorskip("peft")

from fastlora import bench  # noqa: E402

import mixed_check  # noqa: E402  (benchmarks/ is on sys.path: pytest's rootdir-less import of this folder)

DEVICE = bench.resolve_device(os.environ.get("FASTLORA_BENCH_DEVICE", "auto"))
PRESETS = (os.environ.get("FASTLORA_MIXED_PRESETS") or ("prefill,decode" if DEVICE.startswith("cuda") else "cpu")
           ).split(",")
CASES = [(p, n) for p in PRESETS for n in mixed_check.PRESETS[p][4]]
_LAYERS: dict = {}


def _case(preset, n):
    M, K, N, dtype, _, cycle, _, _ = mixed_check.PRESETS[preset]
    ranks = [cycle[i % len(cycle)] for i in range(n)]
    case = bench.Case(M, K, N, r=max(1, round(sum(ranks) / n)), dtype=dtype, mode="inference", device=DEVICE)
    if (preset, n) not in _LAYERS:
        _LAYERS.clear()  # one case's layer at a time
        _LAYERS[(preset, n)] = mixed_check.mixed_layer(K, N, ranks, case.torch_dtype, DEVICE)
    return case, _LAYERS[(preset, n)], [f"a{i % n}" for i in range(M)]


@pytest.mark.parametrize("provider", mixed_check.PROVIDERS)
@pytest.mark.parametrize("preset, n", CASES, ids=lambda v: str(v))
def test_mixed_batch(benchmark, preset, n, provider):
    case, layer, names = _case(preset, n)
    runner = mixed_check.build_runner(provider, case, layer, names)
    for _ in range(3):  # compilation, the measured composition choice: never timed
        runner.step()
    env = bench.environment(DEVICE)
    benchmark.group = f"mixed {preset} M={case.M} K={case.K} N={case.N} adapters={n} {case.dtype}"
    benchmark.extra_info.update({"provider": provider, "device": DEVICE, "device_name": env["device_name"],
                                 "dtype": case.dtype, "torch": env["torch"], "M": case.M, "K": case.K, "N": case.N,
                                 "adapters": n, "mean_rank": case.r, "mode": "inference"})
    benchmark.pedantic(runner.step, rounds=20 if DEVICE.startswith("cuda") else 5, iterations=1)
