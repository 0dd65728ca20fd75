"""DoRA benchmark cases (pytest-benchmark): one training step (forward + backward) of fastlora's DoRA (the DoRA
fuser) against PEFT's DoRA layer, with fastlora's and PEFT's plain LoRA as the reference points; grouped so
that one group is one case and its rows are the providers. Quick on CPU (small shapes); on CUDA the shapes of
``benchmarks/dora_check.py``'s goal grid. Peak memory of the step (CUDA) goes into ``extra_info``.

    python -m pytest benchmarks/test_dora.py --benchmark-only
"""
import os

import pytest
import torch

import dora_check

DEVICE = torch.device(os.environ.get("FASTLORA_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
DTYPE = dora_check.DTYPES[os.environ.get("FASTLORA_BENCH_DTYPE")
                          or ("bfloat16" if DEVICE.type == "cuda" else "float32")]
if DEVICE.type == "cuda":
    SHAPES = dora_check.parse_shapes(dora_check.DEFAULT_SHAPES)
else:
    SHAPES = [(128, 256, 256), (37, 96, 80)]  # quick: seconds on a CPU
CASES = [(M, K, N, 16, p) for (M, K, N) in SHAPES for p in (0.0, 0.1)]


@pytest.mark.parametrize("provider", dora_check.PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-r{c[3]}-p{c[4]:g}")
def test_dora_step(benchmark, case, provider):
    pytest.importorskip("peft")
    M, K, N, r, p = case
    step = dora_check.Step(provider, M, K, N, r, p, DTYPE, DEVICE)
    for _ in range(2):  # autotuning and allocator warm-up: never timed
        step()
    benchmark.group = f"dora-step-{M}x{K}x{N}-r{r}-p{p:g}-{str(DTYPE).replace('torch.', '')}"
    benchmark.extra_info.update({"provider": provider, "device": str(DEVICE), "dtype": str(DTYPE), "M": M, "K": K,
                                 "N": N, "r": r, "dropout": p, "mode": "forward+backward",
                                 "peak_bytes": dora_check.peak_bytes(step),
                                 "saved_bytes": dora_check.saved_bytes(step)})

    def run():
        step()
        dora_check._sync(DEVICE)

    # a fixed number of rounds: bounded time on a shared CPU, enough for a median on a GPU
    benchmark.pedantic(run, rounds=20 if DEVICE.type == "cuda" else 5, iterations=1)
