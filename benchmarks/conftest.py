"""pytest-benchmark suite setup: ``pytest benchmarks/ --benchmark-only``.

Environment knobs (all optional):
  FASTLORA_BENCH_DEVICE     auto (default: cuda if present, else cpu), cpu, cuda, cuda:N
  FASTLORA_BENCH_DTYPE      float32 / bfloat16 / float16 (default: bfloat16 on CUDA, float32 on CPU)
  FASTLORA_BENCH_GRID       full (default) or quick
  FASTLORA_BENCH_PROVIDERS  comma-separated subset of fastlora,peft,peft_layer,naive,base,compiled

This folder is not part of the unit tests (``python -m pytest tests``); nothing here is imported from tests/.
"""
import importlib.util

# Without pytest-benchmark there is no `benchmark` fixture: collect nothing rather than error.
collect_ignore_glob = [] if importlib.util.find_spec("pytest_benchmark") else ["test_*.py"]
