"""pytest-benchmark suite setup: ``pytest benchmarks/ --benchmark-only``.

Environment knobs (all optional):
  FASTLORA_BENCH_DEVICE     auto (default: cuda if present, else cpu), cpu, cuda, cuda:N
  FASTLORA_BENCH_DTYPE      float32 / bfloat16 / float16 (default: bfloat16 on CUDA, float32 on CPU)
  FASTLORA_BENCH_GRID       quick or full (default: full on CUDA; quick on CPU, about two minutes on 2 cores)
  FASTLORA_BENCH_PROVIDERS  comma-separated subset of fastlora,peft,peft_layer,naive,base,compiled
                            (default: all on CUDA; fastlora,peft,naive,base on CPU, where torch.compile's
                            per-case compilation alone would take minutes)

One group is one case and its rows are the providers. After pytest-benchmark's tables, the run ends with
fastlora's speed-up over each peer and its overhead over the frozen linear (fastlora.bench's report). This
folder is not part of the unit tests (``python -m pytest tests``); nothing here is imported from tests/.
"""
import importlib.util

import pytest

# Without pytest-benchmark there is no `benchmark` fixture: collect nothing rather than error.
collect_ignore_glob = [] if importlib.util.find_spec("pytest_benchmark") else ["test_*.py"]

ROWS = pytest.StashKey[list]()
SUMMARY_MAX_CASES = 12  # more cases than this: the summary shows the geometric means only (one screen)


def pytest_report_header(config):
    from fastlora import bench

    device, dtype, grid, providers = bench.suite_settings()
    other = "quick" if grid == "full" else "full"
    return [f"fastlora benchmarks: {grid} grid on {device}, providers {','.join(providers)} "
            f"(FASTLORA_BENCH_GRID={other} for the {other} grid; see benchmarks/conftest.py)"]


def pytest_configure(config):
    config.stash[ROWS] = []


def pytest_sessionstart(session):
    """Fewer columns than pytest-benchmark's ten, unless the user chose them: the tables then fit 120 columns."""
    bs = getattr(session.config, "_benchmarksession", None)
    args = " ".join(map(str, session.config.invocation_params.args))
    if bs is not None and "--benchmark-columns" not in args:
        bs.columns = ["median", "iqr", "rounds"]


@pytest.fixture
def record_row(request):
    """Append one measured row (the fields of fastlora.bench's rows) for the closing summary."""
    return request.config.stash[ROWS].append


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, config):
    rows = config.stash.get(ROWS, [])
    if not any(r["provider"] == "fastlora" for r in rows):
        return
    from fastlora import bench
    from fastlora.bench import report as rep

    providers = [p for p in bench.PROVIDERS if any(r["provider"] == p for r in rows)]
    cases = {bench.summary.case_key(r) for r in rows}
    tr = terminalreporter
    tr.section("fastlora speed-up summary")
    timer = sorted({r.get("timer", "") for r in rows} - {""})
    tr.write_line(rep._wrap(f"timer: {', '.join(timer)}. Providers ran one after another (pytest-benchmark), not "
                            "interleaved: on a busy machine prefer `python -m fastlora bench`."))
    if len(cases) <= SUMMARY_MAX_CASES:
        for title, header, body in rep.text_tables(rows, providers):
            tr.write_line("")
            tr.write_line(rep._wrap(title))
            tr.write_line(rep._text_table(header, body))
    tr.write_line("")
    tr.write_line("geometric means over the comparable cases (speed-up: higher is better; "
                  "floor: fastlora's extra time)")
    tr.write_line(rep.summary_table(bench.summarize(rows)))
    excluded, noisy = rep._flags(rows)
    if excluded:
        tr.write_line(rep._wrap(rep.NOTE_EXCLUDED))
    if noisy:
        tr.write_line(rep._wrap(f"WARNING: {noisy} comparison(s) rest on noisy timings. " + rep.NOTE_NOISY))
