"""QLoRA benchmark suite (pytest-benchmark): one LoRA layer over a bitsandbytes 4-bit base, fastlora against PEFT's
QLoRA layer, bitsandbytes' dequantize + matmul and the frozen 4-bit base; one group per case, one row per provider.

Cases and providers are benchmarks/qlora_check.py's (the script the GPU check runs): on CPU its "quick" shapes
(seconds), on CUDA the decode and training shapes. Knobs: FASTLORA_BENCH_DEVICE, FASTLORA_BENCH_DTYPE (as the
main suite) and FASTLORA_QLORA_SHAPES (quick, decode, train or MxKxN,...).
"""
import copy
import os

import pytest

pytest.importorskip("bitsandbytes", reason="QLoRA benchmarks need bitsandbytes: pip install fastlora[qlora]")
pytest.importorskip("peft")

from fastlora import bench  # noqa: E402

import qlora_check  # noqa: E402  (benchmarks/ is on sys.path: pytest's rootdir-less import of this folder)

DEVICE = bench.resolve_device(os.environ.get("FASTLORA_BENCH_DEVICE", "auto"))
DTYPE = os.environ.get("FASTLORA_BENCH_DTYPE") or ("bfloat16" if DEVICE.startswith("cuda") else "float32")
_spec = os.environ.get("FASTLORA_QLORA_SHAPES") or ("decode,train" if DEVICE.startswith("cuda") else "quick")
SHAPES = [s for part in _spec.split(",") for s in (qlora_check.SHAPES.get(part) or bench.parse_shapes(part))]
CASES = [bench.Case(M, K, N, r=16, dtype=DTYPE, dropout=p, mode=mode, device=DEVICE)
         for (M, K, N) in SHAPES for mode in ("forward+backward", "inference") for p in (0.0, 0.1)
         if not (mode == "inference" and p > 0)]
_LAYERS: dict = {}


def _layer(case):
    key = (case.M, case.K, case.N, case.mode, case.dropout)
    if key not in _LAYERS:
        _LAYERS.clear()  # one case's layer at a time
        _LAYERS[key] = qlora_check.qlora_layer(case)
    return copy.deepcopy(_LAYERS[key])


@pytest.mark.parametrize("provider", qlora_check.PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.mode}-{c.shape}-r{c.r}-p{c.dropout:g}-{c.dtype}")
def test_qlora(benchmark, case, provider):
    ok, why = qlora_check.provider_available(provider, DEVICE)
    if not ok:
        pytest.skip(why)
    runner = qlora_check.build_runner(provider, case, _layer(case))
    for _ in range(3):  # compilation, autotuning, the measured path choice: never timed
        runner.step()
    env = bench.environment(DEVICE)
    benchmark.group = "qlora " + case.label()
    benchmark.extra_info.update({
        "provider": provider, "device": DEVICE, "device_name": env["device_name"], "dtype": case.dtype,
        "torch": env["torch"], "triton": env["triton"], "M": case.M, "K": case.K, "N": case.N, "r": case.r,
        "dropout": case.dropout, "mode": case.mode, "quant_type": "nf4", "double_quant": True, "blocksize": 64,
        "peak_bytes": bench.peak_memory_bytes(runner),
        "saved_bytes": qlora_check.or_none(bench.saved_activation_bytes, runner),
    })
    if runner.note:
        benchmark.extra_info["note"] = runner.note
    # fixed rounds, as the DoRA suite: pytest-benchmark's calibration would spend seconds per case on a CPU
    benchmark.pedantic(runner.step, rounds=20 if DEVICE.startswith("cuda") else 5, iterations=1)
