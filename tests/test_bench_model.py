"""The model-level case set of the bench (``python -m fastlora bench --model``): its providers train the same model,
its floor's backward stops where a LoRA step's does, its saved bytes and ratios are what they claim, and the CLI
writes its reports. A tiny Llama only: timings are never asserted."""
from __future__ import annotations

import json

import pytest
import torch

import fastlora
from fastlora.__main__ import main
from fastlora.bench import model as bm

pytest.importorskip("peft")
pytest.importorskip("transformers")

TINY = dict(hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, vocab=61, batch=2, seq=8)


@pytest.fixture(autouse=True)
def _auto_backend():
    previous = fastlora.get_backend()
    fastlora.set_backend("auto")
    yield
    fastlora.set_backend(previous)


@pytest.fixture
def tiny_preset(monkeypatch):
    monkeypatch.setitem(bm.MODEL_PRESETS, "llama-tiny", TINY)
    monkeypatch.setitem(bm.MODEL_GOALS, ("llama-tiny", "cpu"),
                        {"floor": {0.0: 100.0}, "not_slower": (("fastlora", "peft"),)})
    return "llama-tiny"


def _case(p=0.0, r=4, **sizes):
    return bm.ModelCase("llama-tiny", **{**TINY, **sizes}, r=r, dropout=p)


def test_fastlora_and_peft_start_from_the_same_model_and_both_train():
    runners, errors = bm.build_model_runners(_case(), ["fastlora", "peft", "base"])
    assert errors == {}
    fl, pe, base = runners["fastlora"], runners["peft"], runners["base"]
    assert fastlora.fused_layers(fl.model) and all(v is None for v in fastlora.fused_layers(fl.model).values())
    ids = fl.pool_x[0]
    assert torch.equal(fl.fn(ids).detach(), pe.fn(ids).detach())  # same adapters, same math at p = 0
    before = {n: t.detach().clone() for n, t in fl.model.named_parameters() if t.requires_grad}
    assert before and all("lora_" in n for n in before)
    fl.step()
    after = dict(fl.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # AdamW moved the adapters
    assert base.optimizer is None and not any(t.requires_grad for t in base.model.parameters())
    base.step()


def test_the_floor_backpropagates_exactly_as_far_as_lora_needs():
    """The frozen floor makes the LoRA targets' outputs require grad: the first layer's q/k/v outputs are where
    its backward stops (their input, the embeddings and the norm before them get no gradient), as in a LoRA step."""
    runners, _ = bm.build_model_runners(_case(), ["base", "fastlora"])
    for name, runner in runners.items():
        seen = {}
        layer0 = runner.model.get_base_model().model.layers[0] if name != "base" else runner.model.model.layers[0]
        hooks = [layer0.input_layernorm.register_forward_hook(lambda m, i, o: seen.__setitem__("norm", o)),
                 layer0.self_attn.o_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("o", o))]
        try:
            runner.fn(runner.pool_x[0])
        finally:
            for h in hooks:
                h.remove()
        assert not seen["norm"].requires_grad, name  # no gradient for the first layer's input
        assert seen["o"].requires_grad, name  # but for everything after its q, k, v


def test_saved_bytes_fastlora_equal_to_peft_without_dropout_and_below_with_it():
    for p in (0.0, 0.25):
        runners, _ = bm.build_model_runners(_case(p), ["fastlora", "peft"])
        fl = bench_saved(runners["fastlora"])
        pe = bench_saved(runners["peft"])
        if p == 0:
            assert fl == pe
        else:  # PEFT keeps a dropped copy of each target's input and its mask; fastlora keeps neither
            assert fl < pe


def bench_saved(runner):
    from fastlora.bench.memory import saved_activation_bytes

    return saved_activation_bytes(runner)


def test_ratio_stats_are_medians_of_per_round_ratios():
    a = {"median_s": 2.0, "rounds_s": [2.0, 4.0, 2.2, 1.9, 2.1]}
    b = {"median_s": 1.0, "rounds_s": [1.0, 2.0, 1.0, 1.0, 1.0]}  # round 2 was slow for both
    r = bm.ratio_stats(a, b)
    assert r["per_round"] and r["rounds"] == 5
    assert r["median"] == pytest.approx(2.0)  # per round: 2, 2, 2.2, 1.9, 2.1; the ratio of medians is 2 too
    assert (r["q1"], r["q3"]) == (pytest.approx(2.0), pytest.approx(2.1))
    drift = {"median_s": 3.0, "rounds_s": [1.0, 3.0, 3.0, 5.0, 5.0]}
    twice = {"median_s": 6.0, "rounds_s": [2.0, 6.0, 6.0, 10.0, 10.0]}
    assert bm.ratio_stats(drift, twice)["median"] == pytest.approx(0.5)
    assert (bm.ratio_stats(drift, twice)["q1"], bm.ratio_stats(drift, twice)["q3"]) == (0.5, 0.5)  # drift cancels
    cuda = bm.ratio_stats({"median_s": 3.0}, {"median_s": 2.0})
    assert cuda == {"median": 1.5, "q1": None, "q3": None, "per_round": False, "rounds": 0}
    assert bm.ratio_stats({"median_s": None}, b) is None


def test_goals_are_met_missed_or_without_data(tiny_preset):
    def row(provider, p, rounds):
        return {"provider": provider, "preset": tiny_preset, "device": "cpu", "r": 4, "dropout": p,
                "dtype": "float32", "median_s": sorted(rounds)[len(rounds) // 2], "rounds_s": rounds}

    rows = [row("fastlora", 0.0, [1.0, 1.0, 1.0]), row("peft", 0.0, [1.1, 1.2, 1.1]), row("base", 0.0, [0.5] * 3)]
    for r in rows:
        r["vs_floor"] = bm.ratio_stats(r, rows[2])
    goals = bm.model_goals(rows)
    assert [(g["text"], g["met"]) for g in goals] == [("fastlora eager ÷ frozen model ≤ 100", True),
                                                       ("fastlora eager ÷ PEFT eager ≤ 1", True)]
    rows[1]["rounds_s"] = [0.9, 0.9, 0.9]
    assert bm.model_goals(rows)[1]["met"] is False
    assert bm.model_goals(rows[:1] + rows[2:])[1]["met"] is None  # PEFT not measured: no verdict


def test_cli_model_run_prints_and_writes_the_side_by_side_report(tiny_preset, tmp_path, capsys):
    rc = main(["bench", "--model", tiny_preset, "--quick", "--budget", "0.01", "--rank", "4", "--dropout", "0,0.25",
               "--providers", "fastlora,peft,base", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    for text in ("fastlora eager", "PEFT eager", "frozen model", "saved MiB", "bit-identical", "Goals",
                 "medians of per-round ratios"):
        assert text in out, text
    assert max(len(line) for line in out.splitlines() if not line.startswith("wrote ")) <= 120
    report = json.loads((tmp_path / "results.json").read_text())
    rows = report["results"]
    assert {(r["provider"], r["dropout"]) for r in rows} == {(p, d) for p in ("fastlora", "peft", "base")
                                                            for d in (0.0, 0.25)}
    fl = [r for r in rows if r["provider"] == "fastlora"]
    assert all(r["vs_floor"]["per_round"] and r["vs_floor"]["rounds"] >= 5 and r["saved_bytes"] for r in fl)
    assert (tmp_path / "results.md").read_text().startswith("# fastlora bench --model")


def test_cli_model_rejects_what_it_cannot_run(tiny_preset, tmp_path, capsys):
    assert main(["bench", "--model", "nope", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--model", tiny_preset, "--providers", "naive", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--providers", "fastlora_compiled", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown model preset 'nope'" in err and "not naive" in err and "model-level set only" in err


def test_compiled_providers_train_the_same_model():
    """torch.compile of PEFT's model and of fastlora's: the compiled losses equal the eager ones (p = 0)."""
    runners, errors = bm.build_model_runners(_case(layers=1), ["fastlora", "fastlora_compiled", "peft", "compiled"])
    assert errors == {}
    ids = runners["fastlora"].pool_x[0]
    eager = runners["peft"].fn(ids).detach()
    for name in ("fastlora_compiled", "compiled"):
        torch.testing.assert_close(runners[name].fn(ids).detach(), eager, rtol=1e-5, atol=1e-5)
        runners[name].step()
