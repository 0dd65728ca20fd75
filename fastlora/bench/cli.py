"""``python -m fastlora bench``: parse the options, run the grid, print the report, write the files."""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path

import torch

from .cases import DTYPE_NAMES, DTYPES, MODES, SHAPE_PRESETS, SUITE_GRIDS, default_suite_grid, make_cases, parse_shapes
from .model import MODEL_PRESETS, MODEL_PROVIDERS, run_model_cli
from .moe import MOE_PRESETS, MOE_SETS, run_moe_cli
from .providers import DEFAULT_PROVIDERS, PROVIDERS
from .report import goals_verdict, render_text, write_outputs
from .run import environment, run_cases
from .summary import GOAL_HELP, GOALS, goal_requirements, summarize

CLI_DESCRIPTION = textwrap.fill(
    "Time fastlora's LoRA linear against PEFT's unfused math, the seed's W+BA reconstruction and the frozen "
    "nn.Linear (the floor) in forward, forward+backward and inference; print fastlora's speed-up over each "
    "(higher is better) and its overhead over the floor; write JSON, markdown and a PNG plot.", 79)

# Exit codes, so that a script or CI job can gate on the goals.
EXIT_OK = 0  # the run completed; with --goals, every goal was met
EXIT_FAILED = 1  # nothing was timed, a provider a goal needs failed, or the run was interrupted
EXIT_USAGE = 2  # bad arguments, a device that is not present, or goals that the asked grid cannot check
EXIT_GOAL_MISSED = 3  # a goal was missed (named in the report and on stderr)
EXIT_UNDECIDED = 4  # no goal missed, but one could not be decided: its timings were too noisy
EXIT_CODES = {
    EXIT_OK: "the run completed (with --goals: every goal met)",
    EXIT_FAILED: "nothing was timed, the run was interrupted, or a goal has no data (its provider failed)",
    EXIT_USAGE: "bad arguments, a device that is not present, or --goals that the grid cannot check",
    EXIT_GOAL_MISSED: "a goal was missed",
    EXIT_UNDECIDED: "no goal missed, but the timings were too noisy to decide one (rerun idle or with a larger "
                    "--budget)",
}
CLI_EPILOG = "exit codes:\n" + "\n".join(
    textwrap.fill(text, 79, initial_indent=f"  {code}  ", subsequent_indent="     ")
    for code, text in EXIT_CODES.items())
CLI_FORMATTER = argparse.RawDescriptionHelpFormatter  # the description and the exit codes keep their lines


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


MODEL_ONLY_PROVIDERS = tuple(p for p in MODEL_PROVIDERS if p not in PROVIDERS)  # fastlora_compiled


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
                        help="a small grid (CPU: M∈{256,1024}, K=N=1024; CUDA: the llm-grid), forward and "
                             "forward+backward, dropout 0 and 0.1, short timing budget")
    parser.add_argument("--device", default="auto", help="auto (default: cuda if present, else cpu), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--rank", type=_ints, default=None, help="LoRA rank(s), comma-separated (default 16)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated MxKxN (x is (M,K), y is (M,N)) and presets: "
                             + ", ".join(f"{k} ({_plural(len(v), 'shape')})" for k, v in SHAPE_PRESETS.items())
                             + "; default: llm-grid on CUDA, cpu on CPU (cpu-quick with --quick)")
    parser.add_argument("--dropout", type=_floats, default=None,
                        help="dropout p values, comma-separated (default 0,0.1)")
    parser.add_argument("--modes", type=_names(MODES, "mode"), default=None,
                        help="forward, forward+backward, inference, or all (default: all; forward and "
                             "forward+backward with --quick)")
    parser.add_argument("--providers", type=_names(PROVIDERS + MODEL_ONLY_PROVIDERS, "provider"), default=None,
                        help=f"from {', '.join(PROVIDERS)}, or all (default: {', '.join(DEFAULT_PROVIDERS)}); "
                             "fastlora is always included; base is the frozen linear, the floor. With --model: "
                             f"{', '.join(MODEL_PROVIDERS)} (default: all; base is the frozen model)")
    parser.add_argument("--bias", action="store_true", help="give the base linear a (frozen) bias")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timing per provider and case after warm-up (default 0.5; 0.2 with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (torch.set_num_threads; default: torch's choice)")
    parser.add_argument("--goals", choices=sorted(GOALS), default=None,
                        help="also check a set of performance goals, each a geometric mean over the cases it "
                             "names; the exit code says whether all were met (see below): "
                             + "; ".join(f"{k}: {v}" for k, v in GOAL_HELP.items()).replace("%", "%%"))
    parser.add_argument("--model", default=None, metavar="PRESET",
                        help="run the model-level case set instead of the layer grid: one training step (forward, "
                             "backward, AdamW) of a random-weight Llama with LoRA on every projection, fastlora "
                             "eager and compiled against PEFT eager, PEFT compiled and the frozen model; presets: "
                             + ", ".join(f"{k} ({v['hidden']} hidden, {v['layers']} layers, {v['batch']}×{v['seq']} "
                                         "tokens)" for k, v in MODEL_PRESETS.items())
                             + "; auto: llama-small on CPU, llama-1b on CUDA. Default dropout 0,0.05")
    parser.add_argument("--moe", default=None, metavar="PRESET",
                        help="run the mixture-of-experts case set instead of the layer grid: one MoE block forward + "
                             "backward with LoRA on its experts' gate_up_proj and down_proj (PEFT's "
                             "target_parameters), fastlora against PEFT and the frozen block; presets (comma-"
                             "separated): " + ", ".join(MOE_PRESETS) + "; auto: "
                             + "; ".join(f"{', '.join(v)} on {k.upper()}" for k, v in MOE_SETS.items()))
    parser.add_argument("--out", default="fastlora-bench", help="output folder (default ./fastlora-bench/)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace, stream=None) -> int:
    stream = stream if stream is not None else sys.stdout
    try:
        device = resolve_device(args.device)
        if args.model and args.goals:
            raise ValueError(f"--goals {args.goals} checks the layer grid; --model reports the model-level goals of "
                             "its preset itself (they do not set the exit code)")
        if args.model and getattr(args, "moe", None):
            raise ValueError("--model and --moe are two case sets: ask for one")
        if args.model:
            return run_model_cli(args, device, stream)
        if getattr(args, "moe", None):
            if args.goals:
                raise ValueError(f"--goals {args.goals} checks the layer grid; --moe reports its own goals")
            return run_moe_cli(args, device, stream)
        if args.providers and not set(PROVIDERS) <= set(args.providers):  # "all" means the layer providers here
            bad = [p for p in args.providers if p in MODEL_ONLY_PROVIDERS]
            if bad:
                raise ValueError(f"provider {', '.join(bad)} runs in the model-level set only (--model)")
        shapes_spec = args.shapes or ("llm-grid" if device.startswith("cuda") else
                                      ("cpu-quick" if args.quick else "cpu"))
        shapes = parse_shapes(shapes_spec)
    except ValueError as exc:
        print(f"fastlora bench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.dtype:
        dtype_name = DTYPE_NAMES[DTYPES[args.dtype]]
    else:
        dtype_name = "bfloat16" if device.startswith("cuda") else "float32"
    ranks = args.rank or [16]
    dropouts = args.dropout if args.dropout is not None else [0.0, 0.1]
    modes = args.modes or (["forward", "forward+backward"] if args.quick else list(MODES))
    providers = ["fastlora"] + [p for p in (args.providers or DEFAULT_PROVIDERS)
                                if p != "fastlora" and p not in MODEL_ONLY_PROVIDERS]
    budget = args.budget if args.budget is not None else (0.2 if args.quick else 0.5)
    cases = make_cases(shapes, ranks, dropouts, modes, dtype_name, device, bias=args.bias)
    if args.goals:
        missing = goal_requirements(args.goals, modes, dropouts, providers)
        if missing:
            print(f"fastlora bench: error: --goals {args.goals} cannot be checked on this grid: "
                  + "; ".join(missing), file=sys.stderr)
            return EXIT_USAGE

    print(f"fastlora bench: {len(cases)} cases × {len(providers)} providers on {device} ({dtype_name}); "
          f"results to {args.out}/", file=stream)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    rows = run_cases(cases, providers, budget_s=budget)
    interrupted = len(rows) < len(cases) * len(providers)
    meta = environment(device)
    timers = sorted({r["timer"] for r in rows if r.get("timer")})
    meta.update({
        "device": device, "dtype": dtype_name, "ranks": ranks, "dropouts": dropouts, "modes": modes,
        "shapes": [f"{M}x{K}x{N}" for M, K, N in shapes], "providers": providers, "budget_s": budget,
        "quick": bool(args.quick), "bias": bool(args.bias), "wall_s": round(time.perf_counter() - t0, 1),
        "goals": args.goals,
        "interrupted": interrupted, "timer": ", ".join(timers) or "none",
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
    if not timed or interrupted:
        return EXIT_FAILED
    verdict, sentence = goals_verdict(report["summary"])
    if verdict != "none" and verdict != "met":
        print(f"fastlora bench: {sentence}", file=sys.stderr)
    return {"none": EXIT_OK, "met": EXIT_OK, "missed": EXIT_GOAL_MISSED, "undecided": EXIT_UNDECIDED,
            "no data": EXIT_FAILED}[verdict]


def main(argv=None) -> int:
    """``python -m fastlora bench [options]`` without the ``bench`` word."""
    parser = argparse.ArgumentParser(prog="fastlora bench", description=CLI_DESCRIPTION, epilog=CLI_EPILOG,
                                     formatter_class=CLI_FORMATTER)
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return run_cli(args)


def suite_settings(environ=None) -> tuple[str, str | None, str, list[str]]:
    """(device, dtype, grid, providers) of the pytest-benchmark suite from its environment knobs
    (FASTLORA_BENCH_DEVICE, _DTYPE, _GRID, _PROVIDERS; see benchmarks/conftest.py)."""
    env = os.environ if environ is None else environ
    device = resolve_device(env.get("FASTLORA_BENCH_DEVICE", "auto"))
    dtype = env.get("FASTLORA_BENCH_DTYPE") or None
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"FASTLORA_BENCH_DTYPE must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPE_NAMES[DTYPES[dtype]]
    grid = env.get("FASTLORA_BENCH_GRID") or default_suite_grid(device)
    if grid not in SUITE_GRIDS:
        raise ValueError(f"FASTLORA_BENCH_GRID must be one of {SUITE_GRIDS}, got {grid!r}")
    default = PROVIDERS if torch.device(device).type == "cuda" else DEFAULT_PROVIDERS
    providers = [p.strip() for p in env.get("FASTLORA_BENCH_PROVIDERS", ",".join(default)).split(",") if p.strip()]
    bad = [p for p in providers if p not in PROVIDERS]
    if bad or not providers:
        raise ValueError(f"FASTLORA_BENCH_PROVIDERS: unknown {bad or providers!r}; choose from {', '.join(PROVIDERS)}")
    return device, dtype, grid, providers
