r"""The benchmark engine behind ``python -m fastlora bench`` and ``benchmarks/`` (pytest-benchmark).

One small module per job:

* ``cases``      what is measured: ``Case``, modes, dtypes, shape presets, the CLI and suite grids, FLOPs;
* ``providers``  who is measured: fastlora, PEFT's math, the real PEFT layer, W+BA, the frozen linear (floor),
                 torch.compile; ``Runner`` wraps one provider on one case;
* ``timing``     how: CUDA events with the L2 cache cleared (``triton.testing.do_bench``) on GPU, interleaved
                 host timing on CPU with the allocator in its steady state and rounds that other processes'
                 load disturbed dropped; the statistics (spread, bimodality, the interval of a ratio);
* ``memory``     saved-for-backward and peak bytes of one step;
* ``run``        a grid of cases → rows; the environment record;
* ``model``      the model-level case set (``--model``): one training step of a whole random Llama, fastlora vs
                 PEFT eager and compiled vs the frozen model;
* ``summary``    rows → speed-ups with their intervals, flags (not run as asked, noisy), geometric means,
                 goals and their verdicts;
* ``report``     terminal text (≤ 120 columns), markdown, the output folder;
* ``plot``       the PNG;
* ``cli``        the command line.
"""
from .cases import (DTYPE_NAMES, DTYPES, MODES, SHAPE_PRESETS, SUITE_GRIDS, Case, default_suite_grid, lora_flops,
                    make_cases, parse_shapes, suite_cases)
from .cli import CLI_DESCRIPTION, CLI_EPILOG, EXIT_CODES, add_arguments, main, resolve_device, run_cli, suite_settings
from .memory import peak_memory_bytes, saved_activation_bytes
from .model import (MODEL_PRESETS, MODEL_PROVIDERS, ModelCase, build_model_runners, measure_model_case, model_cases,
                    model_goals, ratio_stats)
from .providers import DEFAULT_PROVIDERS, FLOOR, PEERS, PROVIDERS, Runner, build_runner, provider_available
from .report import WIDTH, render_markdown, render_text, write_outputs
from .run import Progress, environment, measure, measure_case, run_cases
from .plot import plot
from .summary import GOAL_DROPOUT, GOALS, comparisons, goal_requirements, speedups, summarize
from .timing import (NOISY_SPREAD, bimodal, cpu_wait_ns, machine_busy_s, ratio_interval, spread, steady_allocator,
                     time_case, time_cuda, time_interleaved, time_runner)

__all__ = [
    "DTYPE_NAMES", "DTYPES", "MODES", "SHAPE_PRESETS", "SUITE_GRIDS", "Case", "default_suite_grid", "lora_flops",
    "make_cases", "parse_shapes", "suite_cases", "suite_settings", "CLI_DESCRIPTION", "CLI_EPILOG", "EXIT_CODES",
    "add_arguments", "main", "resolve_device", "run_cli", "peak_memory_bytes", "saved_activation_bytes",
    "DEFAULT_PROVIDERS", "FLOOR", "PEERS", "PROVIDERS", "Runner", "build_runner", "provider_available", "WIDTH",
    "render_markdown", "render_text", "write_outputs", "Progress", "environment", "measure", "measure_case",
    "run_cases", "GOAL_DROPOUT", "GOALS", "NOISY_SPREAD", "comparisons", "goal_requirements", "speedups",
    "summarize", "plot", "bimodal", "cpu_wait_ns", "machine_busy_s", "ratio_interval", "spread", "steady_allocator",
    "time_case", "time_cuda", "time_interleaved", "time_runner", "MODEL_PRESETS", "MODEL_PROVIDERS", "ModelCase",
    "build_model_runners", "measure_model_case", "model_cases", "model_goals", "ratio_stats",
]
