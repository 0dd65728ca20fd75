"""Every trainable/frozen combination of x, A, B, W and bias, by value, on both backends (the PyTorch fallback
and the Triton kernels, interpreted on CPU), against a float64 oracle; and gradient VALUES under autocast and
for fp32 adapters on a half-precision base.

A frozen tensor must get no gradient (None) and a trainable one exactly the oracle's: a swapped or dropped
needs-grad flag (B never trains when A is frozen, say) fails here. Biases are ~3 in size, so a dropped bias term
misses by far more than any tolerance.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import fastlora
import philox_reference
from fastlora import reference
from helpers import assert_close, assert_low_precision_close, lora_inputs, lora_oracle, run_leaves

HAS_TRITON = fastlora.backend.triton_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
NAMES = ("x", "weight", "lora_A", "lora_B", "bias")
COMBOS = list(itertools.product([False, True], repeat=5))


@pytest.fixture(autouse=True)
def _restore_backend(monkeypatch):
    monkeypatch.setenv("FASTLORA_AUTOTUNE", "0")
    monkeypatch.delenv("FASTLORA_BASE_GEMM", raising=False)
    saved = fastlora.backend._backend
    yield
    fastlora.backend._backend = saved


def _inputs(M, K, N, r, dtype=torch.float32, adapter_dtype=None, seed=0):
    *tensors, grad = lora_inputs(M, K, N, r, dtype, adapter_dtype, True, seed, device=DEVICE)
    return tensors, grad


def _peek_seed():
    state = torch.random.get_rng_state()
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    torch.random.set_rng_state(state)
    return seed


def _keep(backend, seed, shape, p):
    """The keep mask the backend must use for ``seed``: torch's generator (fallback) or Philox (kernels)."""
    if p == 0:
        return None
    if backend == "torch":
        return reference.dropout_keep_mask(seed, shape, p, DEVICE)
    return torch.from_numpy(philox_reference.keep_mask(seed, shape, p))


def _id(combo):
    on = [n for n, t in zip(NAMES, combo) if t]
    return "+".join(on) if on else "none"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable", COMBOS, ids=[_id(c) for c in COMBOS])
def test_every_trainable_combination_by_value(backend, trainable):
    """M = 37 with dropout 0.2 (the separate-shrink path on the kernels), s = 1.7."""
    fastlora.set_backend(backend)
    M, K, N, r, p, s = 37, 35, 29, 3, 0.2, 1.7
    tensors, grad = _inputs(M, K, N, r)
    seed = _peek_seed()
    y, grads = run_leaves(fastlora.lora_linear, tensors, trainable, grad, scaling=s, dropout_p=p)
    keep = _keep(backend, seed, (M, K), p)
    y64, g64 = run_leaves(lora_oracle, [t.double() for t in tensors], trainable, grad.double(), scaling=s,
                          keep=keep, p=p)
    assert_close(y, y64, 2e-5, 2e-5, "y")
    for name, req, g, e in zip(NAMES, trainable, grads, g64):
        if not req:
            assert g is None, f"{name} is frozen but got a gradient"
            continue
        assert g is not None, f"{name} is trainable but got no gradient"
        assert g.dtype == tensors[NAMES.index(name)].dtype, name
        assert_close(g, e, 2e-5 * max(1.0, e.abs().max().item()), 2e-5, f"d{name}")


SMALL_M_COMBOS = [c for c in COMBOS if sum(c) in (1, 4)]  # each tensor alone, and each left out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable", SMALL_M_COMBOS, ids=[_id(c) for c in SMALL_M_COMBOS])
def test_trainable_combinations_small_M_no_dropout(backend, trainable):
    """M = 9 without dropout: the fused small-M forward on the kernels (h stored by the GEMM)."""
    fastlora.set_backend(backend)
    M, K, N, r, s = 9, 40, 36, 4, 0.6
    tensors, grad = _inputs(M, K, N, r, seed=1)
    y, grads = run_leaves(fastlora.lora_linear, tensors, trainable, grad, scaling=s)
    y64, g64 = run_leaves(lora_oracle, [t.double() for t in tensors], trainable, grad.double(), scaling=s)
    assert_close(y, y64, 2e-5, 2e-5, "y")
    for name, req, g, e in zip(NAMES, trainable, grads, g64):
        assert (g is None) == (not req), name
        if req:
            assert_close(g, e, 2e-5 * max(1.0, e.abs().max().item()), 2e-5, f"d{name}")


# ---------------------------------------------------------------------------------------------------------
# Gradient values in low precision: autocast, fp32 adapters on a half base
# ---------------------------------------------------------------------------------------------------------

LOW_ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# bf16 only on the PyTorch path: the Triton interpreter cannot run bf16
LOW_CASES = [("torch", torch.bfloat16), ("torch", torch.float16)] + ([("triton", torch.float16)] if HAS_TRITON else [])


def _low_precision_check(y, grads, tensors, trainable, grad, dtype, s, keep, p, same_fn):
    """The low-precision rule for y and every gradient: |ours − fp64| <= 2·|torch in dtype − fp64| + atol."""
    y64, g64 = run_leaves(lora_oracle, [t.double() for t in tensors], trainable, grad.double(), scaling=s,
                          keep=keep, p=p)
    ys, gs = same_fn()
    atol = LOW_ATOL[dtype]
    assert y.dtype == ys.dtype
    assert_low_precision_close(y, y64, ys, atol * y64.abs().max().item(), "y")
    for name, req, g, e, t in zip(NAMES, trainable, grads, g64, gs):
        assert (g is None) == (not req), name
        if req:
            assert g.dtype == t.dtype, name
            assert_low_precision_close(g, e, t, atol * max(1.0, e.abs().max().item()), f"d{name}")


@pytest.mark.parametrize("backend,dtype", LOW_CASES)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_autocast_gradient_values(backend, dtype, p):
    """fp32 tensors under torch.autocast(dtype): fp32 gradients whose VALUES follow the low-precision rule,
    against torch computing the same math in ``dtype`` (inputs cast, as autocast does)."""
    fastlora.set_backend(backend)
    M, K, N, r, s = 45, 40, 33, 6, 2.0
    trainable = (True, False, True, True, True)
    tensors, grad = _inputs(M, K, N, r, seed=2)
    seed = _peek_seed()
    with torch.autocast(DEVICE, dtype=dtype):
        y, grads = run_leaves(fastlora.lora_linear, tensors, trainable, grad.to(dtype), scaling=s, dropout_p=p)
    assert y.dtype == dtype and all(g.dtype == torch.float32 for g in grads if g is not None)
    keep = _keep(backend, seed, (M, K), p)

    def same():
        return run_leaves(lora_oracle, tensors, trainable, grad.to(dtype), scaling=s,
                          keep=keep, p=p, dtype=dtype)

    _low_precision_check(y, grads, tensors, trainable, grad, dtype, s, keep, p, same)


@pytest.mark.parametrize("backend,dtype", LOW_CASES)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_fp32_adapters_on_half_base_gradient_values(backend, dtype, p):
    """PEFT's layout: a half-precision base (x, W, bias) with fp32 adapters. y and dx, dbias come back in the
    base dtype, dA and dB in fp32, with values that follow the low-precision rule."""
    fastlora.set_backend(backend)
    M, K, N, r, s = 45, 40, 33, 6, 2.0
    trainable = (True, False, True, True, True)
    tensors, grad = _inputs(M, K, N, r, dtype=dtype, adapter_dtype=torch.float32, seed=3)
    seed = _peek_seed()
    y, grads = run_leaves(fastlora.lora_linear, tensors, trainable, grad, scaling=s, dropout_p=p)
    assert y.dtype == dtype
    assert [g.dtype for g in grads if g is not None] == [dtype, torch.float32, torch.float32, dtype]
    keep = _keep(backend, seed, (M, K), p)

    def same():  # torch in the base dtype: the adapters cast down for the products, as fastlora does
        return run_leaves(lora_oracle, tensors, trainable, grad, scaling=s, keep=keep, p=p, dtype=dtype)

    _low_precision_check(y, grads, tensors, trainable, grad, dtype, s, keep, p, same)
