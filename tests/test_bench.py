"""The bench job (fastlora.bench, ``python -m fastlora bench``): it runs, writes valid reports, measures memory
exactly, compares providers that compute the same function, and fails clearly on a bad device. Tiny CPU cases
only: timings are never asserted (performance claims live in benchmarks/)."""
import contextlib
import json
import re
import subprocess
import sys

import pytest
import torch

import fastlora
from fastlora import bench
from fastlora.__main__ import main

TINY = dict(M=24, K=40, N=36, r=3, dtype="float32", device="cpu")


@pytest.fixture(autouse=True)
def _auto_backend():
    """These tests time CPU tensors: run them on the backend users get there (auto: the torch fallback), not
    on kernels that another test module may have forced through the slow Triton interpreter."""
    previous = fastlora.get_backend()
    fastlora.set_backend("auto")
    yield
    fastlora.set_backend(previous)


@pytest.mark.parametrize("provider", [p for p in bench.PROVIDERS if p != "compiled"])
@pytest.mark.parametrize("mode", bench.MODES)
def test_providers_compute_the_lora_linear(provider, mode):
    available, why = bench.provider_available(provider)
    if not available:
        pytest.skip(why)
    case = bench.Case(**TINY, mode=mode, bias=True)
    runner = bench.build_runner(provider, case)
    x = runner.pool_x[0]
    W, A, B = runner.params[:3]
    bias = runner.params[3]
    y = runner.forward(x)
    if provider == "base":
        expected = torch.nn.functional.linear(x, W, bias)
    else:
        expected = torch.nn.functional.linear(x, W + case.scaling * B @ A, bias)
    torch.testing.assert_close(y, expected.detach(), atol=1e-5, rtol=1e-5)
    runner.step()  # the timed step runs (forward+backward: the gradients exist)


def test_saved_bytes_are_x_h_and_at_most_a_seed():
    for p in (0.0, 0.25):
        case = bench.Case(**TINY, dropout=p, mode="forward+backward")
        M, K, r = case.M, case.K, case.r
        fl = bench.build_runner("fastlora", case)
        # x (M, K) fp32 + h (M, r) fp32, plus the seed if it is kept as an int64 tensor (a Python int in eager
        # code costs no tensor); the frozen weight and the adapters are not counted
        assert bench.saved_activation_bytes(fl) - (M * K * 4 + M * r * 4) in (0, 8)
        assert bench.saved_activation_bytes(fl, include_input=False) - M * r * 4 in (0, 8)
        peft = bench.build_runner("peft", case)
        if p > 0:  # PEFT keeps the dropped copy of x (M, K) and its mask (≥ 1 byte per element)
            assert bench.saved_activation_bytes(peft, include_input=False) >= M * K * 5 + M * r * 4
    inference = bench.build_runner("fastlora", bench.Case(**TINY, mode="inference"))
    assert bench.saved_activation_bytes(inference) == 0


def test_peak_memory_counts_the_output():
    case = bench.Case(M=64, K=64, N=256, r=4, mode="forward", device="cpu")
    peak = bench.peak_memory_bytes(bench.build_runner("base", case))
    if peak is None:
        pytest.skip("the profiler gives no memory events here")
    assert peak >= 64 * 256 * 4  # at least y (M, N) fp32


def test_cli_quick_writes_json_markdown_and_plot(tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["bench", "--quick", "--device", "cpu", "--shapes", "8x40x36,33x40x36", "--rank", "3",
               "--budget", "0.01", "--goals", "cpu-fallback", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "forward+backward" in text and "Summary: geometric means" in text
    assert "†" in text  # W+BA with dropout 0.1 ran without dropout: flagged
    report = json.loads((out / "results.json").read_text())
    assert report["meta"]["device"] == "cpu" and report["meta"]["dtype"] == "float32"
    assert report["meta"]["command"].startswith("python -m fastlora bench --quick")
    rows = report["results"]
    # 2 shapes × 2 dropouts × 2 modes (quick) × 4 default providers, all timed
    assert len(rows) == 2 * 2 * 2 * 4
    assert all("error" not in r and r["median_s"] > 0 and r["tflops"] > 0 for r in rows), rows
    assert {r["provider"] for r in rows} == {"fastlora", "peft", "naive", "base"}
    naive_dropout = [r for r in rows if r["provider"] == "naive" and r["dropout"] > 0]
    assert naive_dropout and not any(r["dropout_applied"] for r in naive_dropout)
    goals = [s["goal"] for s in report["summary"] if "goal" in s]
    assert {g["text"] for g in goals} == {t for t, _, _ in bench.GOALS["cpu-fallback"].values()}
    md = (out / "results.md").read_text()
    assert "## forward+backward" in md and "| 33 | 40 | 36 | 3 |" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install matplotlib" in text
    else:
        assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_says_how_to_get_the_plot(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    rows = [bench.measure(p, bench.Case(**TINY), budget_s=0.01, min_reps=1) for p in ("fastlora", "base")]
    report = {"meta": {**bench.environment("cpu"), "device": "cpu", "dtype": "float32", "command": "test",
                       "providers": ["fastlora", "base"]}, "results": rows, "summary": bench.summarize(rows)}
    written = bench.write_outputs(report, tmp_path)
    assert "pip install matplotlib" in written["plot_skipped"]
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["provider"] == "fastlora"


def test_summary_goals_met_and_missed():
    def row(provider, t, mode="forward+backward", M=64):
        return {"provider": provider, "median_s": t, "mode": mode, "M": M, "K": 8, "N": 8, "r": 1,
                "dtype": "float32", "dropout": 0.0, "bias": False, "device": "cpu"}
    rows = [row("fastlora", 1.0), row("peft", 1.5), row("naive", 1.2), row("base", 0.8),
            row("fastlora", 1.0, M=128), row("peft", 1.5 * 4 / 3, M=128), row("naive", 1.2, M=128),
            row("base", 0.9, M=128)]
    summary = {(s["mode"], s["peer"]): s for s in bench.summarize(rows, "cuda-kernels")}
    peft = summary[("forward+backward", "peft")]
    assert peft["geomean_speedup"] == pytest.approx((1.5 * 2.0) ** 0.5) and peft["goal"]["met"]
    assert not summary[("forward+backward", "naive")]["goal"]["met"]  # 1.2 < 1.4
    base = summary[("forward+backward", "base")]
    assert base["goal"]["value"] == pytest.approx(1 / (0.8 * 0.9) ** 0.5) and not base["goal"]["met"]


def test_cpu_fallback_goals_use_dropout_zero_cases_only():
    def row(provider, t, dropout):
        return {"provider": provider, "median_s": t, "mode": "forward+backward", "M": 64, "K": 8, "N": 8, "r": 1,
                "dtype": "float32", "dropout": dropout, "bias": False, "device": "cpu"}
    rows = [row("fastlora", 1.0, 0.0), row("base", 0.95, 0.0), row("fastlora", 1.3, 0.1), row("base", 0.95, 0.1)]
    base = {s["peer"]: s for s in bench.summarize(rows, "cpu-fallback")}["base"]
    assert base["goal"]["value"] == pytest.approx(1 / 0.95) and base["goal"]["met"]  # the p = 0.1 row is left out
    assert base["goal"]["dropout"] == [0.0] and base["goal"]["cases"] == 1
    assert base["cases"] == 2  # the geometric mean over the whole grid still covers both


@pytest.mark.parametrize("spec, shapes", [("8x16x32", [(8, 16, 32)]),
                                          ("square-2048,8x16x32, square-2048", [(2048, 2048, 2048), (8, 16, 32)])])
def test_parse_shapes(spec, shapes):
    assert bench.parse_shapes(spec) == shapes


@pytest.mark.parametrize("spec", ["8x16", "axbxc", "0x4x4", "nonsense", ""])
def test_parse_shapes_rejects(spec):
    with pytest.raises(ValueError, match="shape"):
        bench.parse_shapes(spec)


def test_bad_device_is_a_clear_error(tmp_path):
    missing = "cuda:99" if torch.cuda.is_available() else "cuda"
    proc = subprocess.run([sys.executable, "-m", "fastlora", "bench", "--device", missing, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"device {missing!r} is not present" in proc.stderr
    assert not (tmp_path / "results.json").exists()


def test_bad_arguments_are_rejected(capsys):
    for argv in (["bench", "--rank", "0"], ["bench", "--dropout", "1.5"], ["bench", "--providers", "nope"],
                 ["bench", "--dtype", "int8"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "unknown provider" in capsys.readouterr().err


def test_progress_bar_plain_lines():
    import io

    stream = io.StringIO()
    bar = bench.Progress(20, stream=stream)
    for i in range(20):
        bar.update(f"item {i}")
    lines = stream.getvalue().splitlines()
    assert 2 <= len(lines) <= 11 and lines[-1].startswith("[" + "#" * 28 + "] 20/20")


def _row(provider, t, *, mode="forward+backward", M=64, dropout=0.0, as_asked=True, spread=0.01, K=8, N=8):
    return {"provider": provider, "median_s": t, "time_ms": t * 1e3, "spread": spread, "as_asked": as_asked,
            "mode": mode, "M": M, "K": K, "N": N, "r": 1, "dtype": "float32", "dropout": dropout, "bias": False,
            "device": "cpu"}


def _report(rows, providers, goals=None):
    meta = {**bench.environment("cpu"), "device": "cpu", "dtype": "float32", "command": "test", "providers": providers}
    return {"meta": meta, "results": rows, "summary": bench.summarize(rows, goals)}


def test_a_peer_not_run_as_asked_is_flagged_and_left_out_of_geomeans():
    rows = [_row("fastlora", 1.0), _row("naive", 1.5), _row("base", 0.9),
            _row("fastlora", 1.0, dropout=0.1), _row("naive", 0.5, dropout=0.1, as_asked=False),
            _row("base", 0.9, dropout=0.1)]
    naive = {s["peer"]: s for s in bench.summarize(rows, "cpu-fallback")}["naive"]
    assert naive["geomean_speedup"] == pytest.approx(1.5) and naive["cases"] == 1 and naive["excluded"] == 1
    report = _report(rows, ["fastlora", "naive", "base"])
    text = bench.render_text(report)
    assert "0.50\u00d7\u2020" in text and "could not run this case as asked" in text
    assert "0.50\u00d7\u2020" in bench.render_markdown(report)


def test_case_rows_know_whether_the_peer_ran_as_asked():
    case = bench.Case(**TINY, dropout=0.25, mode="forward+backward")
    assert not bench.build_runner("naive", case).as_asked
    assert bench.build_runner("peft", case).as_asked and bench.build_runner("base", case).as_asked
    assert bench.build_runner("naive", bench.Case(**TINY, dropout=0.25, mode="inference")).as_asked


def test_floor_is_an_overhead_not_a_speedup():
    rows = [_row("fastlora", 1.1), _row("base", 1.0)]
    floor = bench.summarize(rows)[0]
    assert floor["floor"] and floor["geomean_overhead_pct"] == pytest.approx(10.0)
    text = bench.render_text(_report(rows, ["fastlora", "base"]))
    assert "+10.0%" in text and "floor (frozen linear)" in text


def test_noisy_timings_are_warned_about():
    quiet = [_row("fastlora", 1.0), _row("peft", 1.2)]
    assert "WARNING" not in bench.render_text(_report(quiet, ["fastlora", "peft"]))
    noisy = [_row("fastlora", 1.0, spread=0.4), _row("peft", 1.2)]
    text = bench.render_text(_report(noisy, ["fastlora", "peft"]))
    assert "1.20×?" in text and "WARNING: 1 comparison(s) rest on noisy timings" in text
    assert bench.summarize(noisy)[0]["noisy"] == 1


def test_text_report_fits_120_columns_with_every_provider():
    rows = []
    for mode in bench.MODES:
        for p in (0.0, 0.1):
            for i, prov in enumerate(bench.PROVIDERS):
                rows.append(_row(prov, 123.456 + i, mode=mode, M=16384, K=14336, N=14336, dropout=p,
                                 as_asked=not (prov == "naive" and p > 0), spread=0.5))
                rows[-1].update(saved_bytes=123456789, peak_bytes=987654321)
    text = bench.render_text(_report(rows, list(bench.PROVIDERS), "cuda-kernels"))
    width = max(len(line) for line in text.splitlines())
    assert width <= bench.WIDTH, text


def test_version_and_bare_command_print_help(capsys):
    assert main([]) == 0
    assert "bench" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"fastlora {fastlora.__version__}"


def test_cli_speaks_of_what_is_measured_not_of_the_tracker(capsys):
    for argv in ([], ["bench", "--help"]):
        with contextlib.suppress(SystemExit):
            main(argv)
    text = capsys.readouterr().out
    assert "cpu-fallback" in text and "llm-grid" in text
    assert not re.search(r"issue|goal ?\d", text, re.IGNORECASE), text


def test_plot_of_flagged_cases(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for M in (32, 64):
        for p in (0.0, 0.1):
            rows += [_row("fastlora", 1.0, M=M, dropout=p), _row("peft", 1.2, M=M, dropout=p),
                     _row("naive", 1.4, M=M, dropout=p, as_asked=p == 0), _row("base", 0.9, M=M, dropout=p)]
    bench.plot(_report(rows, ["fastlora", "peft", "naive", "base"]), tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_suite_settings_default_to_the_quick_cpu_grid_and_reject_typos():
    device, dtype, grid, providers = bench.suite_settings({"FASTLORA_BENCH_DEVICE": "cpu"})
    assert (device, dtype, grid, providers) == ("cpu", None, "quick", list(bench.DEFAULT_PROVIDERS))
    quick, full = (bench.suite_cases("cpu", grid=g) for g in ("quick", "full"))
    assert set(quick) < set(full) and all(c.dtype == "float32" for c in quick)
    env = {"FASTLORA_BENCH_DEVICE": "cpu", "FASTLORA_BENCH_GRID": "full", "FASTLORA_BENCH_PROVIDERS": "fastlora,base"}
    assert bench.suite_settings(env)[2:] == ("full", ["fastlora", "base"])
    for key, value in (("FASTLORA_BENCH_GRID", "huge"), ("FASTLORA_BENCH_PROVIDERS", "fastlora,nope"),
                       ("FASTLORA_BENCH_DTYPE", "int8")):
        with pytest.raises(ValueError, match=key):
            bench.suite_settings({"FASTLORA_BENCH_DEVICE": "cpu", key: value})


def test_cuda_runners_are_timed_with_cuda_events_and_cpu_ones_interleaved(monkeypatch):
    from fastlora.bench import timing

    calls = []
    monkeypatch.setattr(timing, "time_cuda", lambda runner, **kw: calls.append(runner) or {"median_s": 1.0})

    class FakeCudaRunner:
        device = torch.device("cuda")

    runners = {"a": FakeCudaRunner(), "b": FakeCudaRunner()}
    assert timing.time_case(runners) == {"a": {"median_s": 1.0}, "b": {"median_s": 1.0}}
    assert calls == [runners["a"], runners["b"]]
    cpu = bench.build_runner("base", bench.Case(**TINY))
    stats = timing.time_case({"base": cpu}, budget_s=0.01, min_reps=2)["base"]
    assert stats["timer"] == "interleaved host timer" and stats["median_s"] > 0 and not calls[2:]
