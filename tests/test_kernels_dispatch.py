"""The measured choice between the fused Triton GEMM and the cuBLAS composition (``kl.gemm_dispatch``).

On CUDA the dispatch times both compositions once per problem key; here a fake timer stands in for the CUDA one,
so the logic (pick the faster, cache per key, distinct forward and dX keys, the FASTLORA_BASE_GEMM override, the
outputs of whichever composition wins) is checked on the interpreter.
"""
from __future__ import annotations

import pytest
import torch

from fastlora import reference
from helpers import assert_close, lora_inputs

kernels = pytest.importorskip("fastlora.kernels.lora_linear")
from fastlora.kernels.dropout import dropout_keep_mask  # noqa: E402
from fastlora.kernels import common as kc  # noqa: E402
from fastlora.kernels import lora_configs as cfgs  # noqa: E402
from fastlora.kernels import lora_linear as kl  # noqa: E402

pytestmark = [pytest.mark.skipif(torch.cuda.is_available(), reason="CPU lane: the CUDA timer runs in gpu_check.sh"),
              pytest.mark.usefixtures("poisoned_kernels")]


class FakeTimer:
    """Runs the candidate (so its outputs are written) and returns the preset milliseconds for its name."""

    def __init__(self, ms):
        self.ms = dict(ms)
        self.calls = []

    def __call__(self, name, fn):
        self.calls.append(name)
        fn()
        return self.ms[name]


@pytest.fixture
def dispatch(monkeypatch):
    monkeypatch.delenv("FASTLORA_BASE_GEMM", raising=False)
    monkeypatch.setenv("FASTLORA_AUTOTUNE", "0")

    def install(ms):
        d = kl.new_gemm_dispatch(timer=FakeTimer(ms))
        monkeypatch.setattr(kl, "gemm_dispatch", d)
        return d

    return install


def _check_outputs(x, w, a, b, bias, dy, p=0.0, seed=3):
    """Forward and backward through the kernels against the fp64 oracle (fp32 inputs)."""
    y, h = kernels.lora_forward(x, w, a, b, bias, 0.5, p, seed)
    dx, _, dA, dB, dbias = kernels.lora_backward(dy, x, w, a, b, h, 0.5, p, seed, True, False, True, True,
                                                 bias is not None)
    keep = dropout_keep_mask(seed, x.shape, p, "cpu") if p > 0 else None
    leaves = [t.double().requires_grad_(True) if t is not None else None for t in (x, w, a, b, bias)]
    y64 = reference.unfused_lora_linear(*leaves, 0.5, keep_mask=keep, dropout_p=p)
    y64.backward(dy.double())
    assert_close(y, y64, 2e-5, 2e-5, "y")
    for name, got, leaf in (("dx", dx, leaves[0]), ("dA", dA, leaves[2]), ("dB", dB, leaves[3]),
                            ("dbias", dbias, leaves[4])):
        if leaf is not None:
            assert_close(got, leaf.grad, 2e-5 * max(1.0, leaf.grad.abs().max().item()), 2e-5, name)


@pytest.mark.parametrize("winner", ["triton", "cublas"])
@pytest.mark.parametrize("M", [5, 70], ids=["small-M", "large-M"])
def test_the_faster_composition_runs_and_is_correct(dispatch, winner, M, monkeypatch):
    loser = "cublas" if winner == "triton" else "triton"
    d = dispatch({winner: 1.0, loser: 2.0})
    ran = []
    for name in ("_forward_cublas", "_forward_triton", "_forward_fused_small_m"):
        fn = getattr(kl, name)
        monkeypatch.setattr(kl, name, lambda *a, _fn=fn, _n=name: (ran.append(_n), _fn(*a))[1])
    _check_outputs(*lora_inputs(M, 24, 20, 3))
    assert sorted(d.timer.calls) == ["cublas", "cublas", "triton", "triton"], "each candidate timed once per op"
    assert {c for _, c, _ in d.report()} == {winner}
    # after the timing runs, the winner ran once more: its outputs are the ones returned
    expected = {"cublas": "_forward_cublas", "triton": "_forward_fused_small_m" if M <= 64 else "_forward_triton"}
    assert ran[-1] == expected[winner]


def test_choice_is_cached_per_key_and_m_bucket(dispatch):
    d = dispatch({"triton": 1.0, "cublas": 2.0})
    x, w, a, b, bias, _ = lora_inputs(70, 16, 12, 2)
    kernels.lora_forward(x, w, a, b, bias, 1.0, 0.0, 0)
    assert len(d.timer.calls) == 2
    kernels.lora_forward(x[:66], w, a, b, bias, 1.0, 0.0, 0)  # same M bucket (128): no new timing
    assert len(d.timer.calls) == 2
    kernels.lora_forward(x[:40], w, a, b, bias, 1.0, 0.0, 0)  # M bucket 64: a new problem
    assert len(d.timer.calls) == 4
    kernels.lora_forward(x, w, a, b, None, 1.0, 0.0, 0)  # no bias: a new problem
    kernels.lora_forward(x, w, a, b, bias, 1.0, 0.1, 0)  # dropout: a new problem
    assert len(d.timer.calls) == 8 and len(d.report()) == 4


def test_forward_and_dx_have_distinct_keys_even_when_k_equals_n(dispatch):
    d = dispatch({"triton": 1.0, "cublas": 2.0})
    x, w, a, b, _, dy = lora_inputs(70, 16, 16, 2, bias=False)
    y, h = kernels.lora_forward(x, w, a, b, None, 1.0, 0.0, 0)
    kernels.lora_backward(dy, x, w, a, b, h, 1.0, 0.0, 0, True, False, False, False, False)
    keys = [k for k, _, _ in d.report()]
    assert len(keys) == 2 and {k[0] for k in keys} == {"fwd", "dx"}
    # and the two GEMMs tune in separate autotuners (their B operands have opposite layouts)
    assert kl._gemm_fwd_tuned is not kl._gemm_dx_tuned


@pytest.mark.parametrize("mode", ["triton", "cublas"])
def test_environment_overrides_the_measurement(dispatch, mode, monkeypatch):
    d = dispatch({"triton": 1.0, "cublas": 1.0})
    monkeypatch.setenv("FASTLORA_BASE_GEMM", mode)
    ran = []
    monkeypatch.setattr(kl, "_dx_gemm", lambda *a, _fn=kl._dx_gemm, **k: (ran.append(k["k_loop"]), _fn(*a, **k)))
    _check_outputs(*lora_inputs(70, 16, 12, 2, bias=False), p=0.2)
    assert d.timer.calls == [] and d.report() == []
    assert ran == [mode == "triton"], "cublas: the Triton pass skips its loop and cuBLAS adds dY @ W"


def test_without_a_timer_off_cuda_the_kernels_run_untimed(monkeypatch):
    monkeypatch.delenv("FASTLORA_BASE_GEMM", raising=False)
    d = kl.new_gemm_dispatch()
    assert d.choose(("k",), {"triton": None, "cublas": None}, torch.device("cpu")) == "triton"
    assert d.report() == []
    assert kl.base_gemm() == "auto"


def test_dy_pass_splits_columns_when_row_tiles_cannot_fill_the_device(monkeypatch):
    """Decode and M = 2048 on a 132-SM card: the dY pass gets ~2 waves of programs from column splits."""
    monkeypatch.setattr(kc, "sm_count", lambda device, off_cuda=4: 132)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the GPU alignment of column ranges
    cpu = torch.device("cpu")
    for M, N, r in ((1, 4096, 16), (16, 4096, 16), (2048, 4096, 16), (2048, 8192, 256)):
        splits, cols = kl._dy_splits(M, N, r, cpu)
        programs = -(-M // (16 if M <= 64 else 64)) * -(-r // kc.r_block(r, cfgs.R_CHUNK_MAX)) * splits
        assert programs >= min(132, N // kl._DY_COL_ALIGN) and cols % kl._DY_COL_ALIGN == 0
        assert splits * cols >= N > (splits - 1) * cols
    assert kl._dy_splits(16384, 4096, 16, cpu) == (1, 4096)  # 256 row tiles of 64 fill it: no partial sums


def test_a_candidate_that_fails_loses_and_all_failing_raises(dispatch):
    """A composition that raises while timed (OutOfResources on some card, say) is not chosen; the outputs come
    from the other. If every candidate fails, the error surfaces."""
    d = dispatch({"triton": 1.0, "cublas": 2.0})

    def broken():
        raise RuntimeError("out of resources")

    with pytest.warns(UserWarning, match="triton"):
        assert d.choose(("p",), {"triton": broken, "cublas": lambda: None}, torch.device("cpu")) == "cublas"
    with pytest.raises(RuntimeError, match="out of resources"):
        d.choose(("q",), {"triton": broken, "cublas": broken}, torch.device("cpu"))
