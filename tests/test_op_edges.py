"""The ops at their edges, each op the same way (LoRA linear, DoRA linear, 4-bit LoRA): a double backward, the meta
device, a tensor scaling, a non-finite scaling, NaN in the adapters, fp16 bases with fp32 adapters (no overflow where
PEFT's fp32 branch stays finite), bf16 on Triton's interpreter, K = 0, threads. The oracles are plain PyTorch
formulas written here (PEFT's math), not fastlora code.
"""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastlora
from fastlora import backend as fbackend
from fastlora.op_common import draw_seed
from helpers import assert_close

OPS = ["lora", "dora", "4bit"]


def _bnb():
    return pytest.importorskip("bitsandbytes")


class Case:
    """One op's inputs and its oracle: ``run(x, A, B, bias, m)`` with fastlora, ``oracle(...)`` in PEFT's formula."""

    def __init__(self, op, M=5, K=64, N=12, r=3, dtype=torch.float64, adapter_dtype=None, seed=0, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        adapter_dtype = adapter_dtype or dtype
        if op == "4bit":
            bnbF = _bnb().functional
            W = torch.randn(N, K, generator=g)
            self.q, self.qs = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4")
            self.W = bnbF.dequantize_4bit(self.q, self.qs).to(dtype)  # W̃, the oracle's constant weight
        else:
            self.W = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
        self.op, self.dtype = op, dtype
        self.x = torch.randn(M, K, generator=g).to(dtype)
        self.A = (torch.randn(r, K, generator=g) / K**0.5).to(adapter_dtype)
        self.B = (torch.randn(N, r, generator=g) * 0.5).to(adapter_dtype)
        self.b = torch.randn(N, generator=g).to(dtype)
        self.m = (torch.rand(N, generator=g) + 0.5).to(adapter_dtype)
        for name in ("W", "x", "A", "B", "b", "m"):
            setattr(self, name, getattr(self, name).to(device))

    def leaves(self, with_m=True):
        names = ["x", "A", "B", "b"] + (["m"] if self.op == "dora" and with_m else [])
        return [getattr(self, n).clone().requires_grad_(True) for n in names]

    def run(self, leaves, scaling, dropout_p=0.0, training=True):
        x, A, B, b, *m = leaves
        if self.op == "lora":
            return fastlora.lora_linear(x, self.W, A, B, b, scaling=scaling, dropout_p=dropout_p, training=training)
        if self.op == "dora":
            return fastlora.dora_linear(x, self.W, A, B, m[0] if m else self.m, b, scaling=scaling,
                                        dropout_p=dropout_p, training=training)
        return fastlora.lora_linear_4bit(x, self.q, A, B, b, quant_state=self.qs, scaling=scaling,
                                         dropout_p=dropout_p, training=training)

    def oracle(self, leaves, scaling, keep=None, dropout_p=0.0):
        """PEFT's formula: base + s·B(A(drop(x))) (DoRA: its norm detached), the branch in the adapters' dtype."""
        x, A, B, b, *m = leaves
        xd = x if keep is None else x * keep.to(x.dtype) / (1.0 - dropout_p)
        s = scaling.item() if isinstance(scaling, torch.Tensor) else scaling
        low = F.linear(F.linear(xd.to(A.dtype), A), B) * s
        base = F.linear(x, self.W, b)
        if self.op != "dora":
            return base + low.to(x.dtype)
        mag = m[0] if m else self.m
        norm = torch.linalg.norm(self.W.to(A.dtype) + s * (B @ A), dim=1).detach()
        g = mag / norm
        return base + ((g - 1) * F.linear(xd, self.W).to(g.dtype) + g * low).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Double backward: exact (the op's formula differentiated by autograd), never silently a constant
# ---------------------------------------------------------------------------------------------------------

def _penalized_grads(fn, leaves):
    y = fn(leaves)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), [leaves[0]], create_graph=True)
    loss = y.sum() + gx.pow(2).sum()
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_double_backward_is_exact(op, p, backend):
    if op == "4bit":
        _bnb()
    dtype = torch.float64 if backend == "torch" and op != "4bit" else torch.float32
    case = Case(op, dtype=dtype)
    s = 0.8
    torch.manual_seed(3)
    seed = draw_seed(p)
    if p > 0.0:  # the op's own mask for that seed, regenerated as the backend does
        from fastlora.autograd import keep_mask

        keep = keep_mask(seed, case.x.shape, p, case.x.device, backend == "triton")
    else:
        keep = None
    torch.manual_seed(3)
    got = _penalized_grads(lambda lv: case.run(lv, s, dropout_p=p), case.leaves())
    want = _penalized_grads(lambda lv: case.oracle(lv, s, keep, p), case.leaves())
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for name, a, e in zip(["x", "A", "B", "bias", "magnitude"], got, want):
        scale = float(e.abs().max()) + 1.0
        assert_close(a, e, tol * scale, tol, f"d{name} of a gradient penalty")


# ---------------------------------------------------------------------------------------------------------
# Scaling: tensor scalings everywhere, non-finite ones refused, NaN propagated as PEFT does
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
def test_tensor_scaling_equals_float_scaling(op, backend):
    """PEFT's hot-swap scaling (a 0-d tensor, prepare_model_for_compiled_hotswap) works for every op."""
    case = Case(op, dtype=torch.float32)
    outs = []
    for s in (0.7, torch.tensor(0.7)):
        leaves = case.leaves()
        y = case.run(leaves, s)
        y.backward(torch.ones_like(y))
        outs.append([y] + [t.grad for t in leaves])
    for name, a, e in zip(["y", "x", "A", "B", "bias", "magnitude"], *outs):
        assert_close(a, e, 1e-5, 1e-5, name)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_scaling_is_refused(value):
    case = Case("lora", dtype=torch.float32)
    x, A, B, b = case.leaves()
    calls = {
        "lora_linear": lambda: fastlora.lora_linear(x, case.W, A, B, b, scaling=value),
        "lora_linear_multi": lambda: fastlora.lora_linear_multi(x, case.W, [A, A], [B, B], b, scalings=[1.0, value],
                                                                dropout_ps=[0.0, 0.0]),
        "dora_linear": lambda: fastlora.dora_linear(x, case.W, A, B, case.m, b, scaling=value),
        "lora_embedding": lambda: fastlora.lora_embedding(torch.tensor([1, 2]), torch.randn(5, 4), torch.randn(2, 5),
                                                          torch.randn(4, 2), scaling=value),
        "dora_embedding": lambda: fastlora.dora_embedding(torch.tensor([1, 2]), torch.randn(5, 4), torch.randn(2, 5),
                                                          torch.randn(4, 2), torch.rand(4), scaling=value),
    }
    if _has_bnb():
        c4 = Case("4bit", dtype=torch.float32)
        calls["lora_linear_4bit"] = lambda: fastlora.lora_linear_4bit(c4.x, c4.q, c4.A, c4.B, quant_state=c4.qs,
                                                                      scaling=value)
    for name, call in calls.items():
        try:
            call()
        except ValueError as e:
            assert "scaling must be finite" in str(e), f"{name}: {e}"
        else:
            pytest.fail(f"{name} took scaling={value}")


def _has_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("where", ["A", "B"])
def test_nan_in_an_adapter_propagates_at_scaling_zero(op, where, backend):
    """PEFT's branch times 0 is NaN where the branch is NaN (0·NaN): a NaN in A or B shows, as in PEFT, even at
    scaling 0 (torch's addmm with alpha = 0 skips the product and would hide it)."""
    if op == "4bit":
        _bnb()
    case = Case(op, dtype=torch.float32)
    getattr(case, where)[0, 1] = float("nan")
    with torch.no_grad():
        y = case.run(case.leaves(), 0.0)
        expected = case.oracle(case.leaves(), 0.0)
    assert expected.isnan().any()
    assert torch.equal(y.isnan(), expected.isnan()), f"NaN at {int(y.isnan().sum())} places, PEFT " \
                                                    f"{int(expected.isnan().sum())}"
    finite = ~expected.isnan()
    assert_close(y[finite], expected[finite], 1e-5, 1e-5, "the rest")


# ---------------------------------------------------------------------------------------------------------
# fp16 base, fp32 adapters (PEFT's autocast_adapter_dtype): the low-rank terms must not overflow in fp16
# ---------------------------------------------------------------------------------------------------------

def _fp16_case(op, big):
    """The issue's inputs: s·h far above fp16's 65504 (``big="s·h"``; ``"h"``: h itself too; ``"dh"``: the
    backward's dh = s·dY B too, at |dY| ≈ 1e3), the output well inside."""
    g = torch.Generator().manual_seed(5)
    case = Case(op, M=4, K=128, N=16, r=2, dtype=torch.float16, adapter_dtype=torch.float32, seed=5)
    case.x = (torch.randn(4, 128, generator=g) * (300 if big == "h" else 30)).half()
    case.W = (torch.randn(16, 128, generator=g) * 0.01).half() if op != "4bit" else case.W
    case.A = torch.randn(2, 128, generator=g) * (20 if big == "h" else 2)
    case.B = torch.randn(16, 2, generator=g) * (0.1 if big == "dh" else 1e-4)
    case.b = torch.randn(16, generator=g).half()
    return case


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("big", ["s·h", "h", "dh"], ids=["s·h-overflows", "h-overflows", "dh-overflows"])
def test_fp16_base_fp32_adapters_stay_finite_as_peft(op, big, backend):
    if op == "4bit":
        _bnb()
    case = _fp16_case(op, big)
    s = 200.0
    leaves, ref_leaves = case.leaves(), case.leaves()
    for t in ref_leaves:  # PEFT's own autograd of its formula, in fp32 where the adapters are fp32
        t.retain_grad()
    y = case.run(leaves, s)
    y_ref = case.oracle(ref_leaves, s)
    assert torch.isfinite(y_ref).all()
    y_ref_abs = float(y_ref.detach().abs().max())
    assert torch.isfinite(y).all(), f"{int((~torch.isfinite(y)).sum())} of {y.numel()} outputs not finite"
    assert_close(y.float(), y_ref.float(), 2e-2 * y_ref_abs, 1e-2, "y")
    gy = (torch.randn(y.shape, generator=torch.Generator().manual_seed(9)) * 1e3).half()  # |dY| ≈ 1e3
    y.backward(gy)
    y_ref.backward(gy)
    for name, t, r in zip(["x", "A", "B", "bias", "magnitude"], leaves, ref_leaves):
        if r.grad is None or not torch.isfinite(r.grad).all():
            continue  # where PEFT itself overflows (dx of an fp16 input) nothing is asked of fastlora
        assert torch.isfinite(t.grad).all(), f"d{name}: {int((~torch.isfinite(t.grad)).sum())} not finite"
        assert_close(t.grad.float(), r.grad.float(), 2e-2 * float(r.grad.abs().max()), 2e-2, f"d{name}")


# ---------------------------------------------------------------------------------------------------------
# bf16 on Triton's interpreter: the PyTorch path, said once
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's CPU interpreter only")
@pytest.mark.parametrize("op", OPS)
def test_bf16_never_runs_on_the_interpreter(op, triton_backend, monkeypatch):
    if op == "4bit":
        _bnb()
    case = Case(op, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    monkeypatch.setattr(fbackend, "_warned_bf16", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = case.run(case.leaves(), 0.5)
        y2 = case.run(case.leaves(), 0.5)
    assert sum("interpreter" in str(w.message) for w in caught) == 1  # said once, not per call
    fastlora.set_backend("torch")
    expected = case.run(case.leaves(), 0.5)
    assert torch.equal(y1, expected) and torch.equal(y2, expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's CPU interpreter only")
def test_bf16_autocast_through_the_layer_and_peft_on_the_interpreter(triton_backend):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    cfg = peft.LoraConfig(target_modules=["0", "2"], r=4, init_lora_weights=False)
    fast = fastlora.accelerate_peft(peft.get_peft_model(_copy(base), cfg))
    plain = peft.get_peft_model(base, cfg)
    fast.load_state_dict(plain.state_dict())
    layer = fastlora.LoRALinear(24, 16, r=4)
    layer.reset_lora_parameters(False)
    x = torch.randn(6, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y_fast, y_plain = fast(x), plain(x)
        y_layer = layer(x)
        fastlora.set_backend("torch")
        y_layer_torch = layer(x)
    assert torch.equal(y_layer, y_layer_torch)
    assert_close(y_fast.float(), y_plain.float(), 5e-2, 5e-2, "accelerated PEFT under bf16 autocast")


def _copy(module):
    import copy

    return copy.deepcopy(module)


# ---------------------------------------------------------------------------------------------------------
# The meta device (big-model loading), K = 0, and threads
# ---------------------------------------------------------------------------------------------------------

def test_meta_device_as_nn_linear():
    meta = dict(device="meta")
    x, W, A, B = (torch.empty(*s, **meta) for s in ((2, 3, 8), (4, 8), (2, 8), (4, 2)))
    assert fastlora.lora_linear(x, W, A, B).shape == (2, 3, 4)
    assert fastlora.dora_linear(x, W, A, B, torch.empty(4, **meta), scaling=0.5).shape == (2, 3, 4)
    layer = fastlora.LoRALinear(8, 4, r=2, lora_dropout=0.1, device="meta")
    y = layer(x.requires_grad_(True))  # training, with dropout: the mask has no values on meta
    assert y.device.type == "meta" and y.shape == (2, 3, 4) and y.requires_grad
    peft = pytest.importorskip("peft")
    for cfg in (peft.LoraConfig(target_modules=["0"], r=2, lora_dropout=0.1),
                peft.LoraConfig(target_modules=["0"], r=2, use_dora=True)):
        model = fastlora.get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 4)).to("meta"), cfg)
        assert fastlora.fused_layers(model) == {"base_model.model.0": None}
        assert model(torch.empty(3, 8, **meta)).shape == (3, 4)


@pytest.mark.parametrize("lead", [(2, 3), (0,), (4,)])
def test_no_input_features(lead, backend):
    """K = 0: y is the bias (x Wᵀ and the branch are empty sums), for any leading shape."""
    W, A, B, b = torch.randn(5, 0), torch.randn(2, 0), torch.randn(5, 2), torch.randn(5)
    x = torch.randn(*lead, 0)
    y = fastlora.lora_linear(x, W, A, B, b, scaling=0.5)
    assert y.shape == (*lead, 5)
    assert torch.equal(y, b.expand_as(y))
    y = fastlora.lora_linear_multi(x, W, [A, A], [B, B], b, scalings=[0.5, 0.25], dropout_ps=[0.0, 0.0])
    assert torch.equal(y, b.expand_as(y))


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's CPU interpreter only")
def test_interpreted_kernels_are_thread_safe(triton_backend):
    """Triton's interpreter patches triton.language globally while it runs a kernel: concurrent callers must be
    serialized, not corrupt each other's launches."""
    cases = [Case("lora", M=9 + i, K=40 + 3 * i, N=24 + 5 * i, r=2 + i, dtype=torch.float32, seed=i) for i in range(3)]
    expected = [c.run([c.x, c.A, c.B, c.b], 0.5) for c in cases]
    errors = []

    def work(i):
        try:
            for _ in range(2):
                y = cases[i].run([cases[i].x, cases[i].A, cases[i].B, cases[i].b], 0.5)
                if not torch.allclose(y, expected[i], atol=1e-5):
                    errors.append(f"thread {i}: wrong result")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"thread {i}: {e!r}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_autotuned_launches_are_serialized(monkeypatch):
    """Triton's Autotuner keeps the arguments of the call it is tuning in ``self.nargs`` (reset_to_zero zeroes
    what that names): two threads making a first call would zero each other's dB. Autotuned launches hold a lock."""
    pytest.importorskip("triton")
    from fastlora.kernels import common as kc
    from fastlora.kernels import lora_linear as kl

    seen = []

    class Tuned:
        def __getitem__(self, grid):
            return lambda *a, **k: seen.append(kl._AUTOTUNE_LOCK.locked())

    monkeypatch.setattr(kc, "autotune_enabled", lambda: True)
    kl._launch("probe", Tuned(), None, None, (1,), 16)
    assert seen == [True]
    assert not kl._AUTOTUNE_LOCK.locked()


# ---------------------------------------------------------------------------------------------------------
# Clear errors where the ops disagreed
# ---------------------------------------------------------------------------------------------------------

def test_lora_embedding_checks_its_adapters():
    ids, W = torch.tensor([[0, 3], [1, 2]]), torch.randn(5, 4)
    A, B = torch.randn(2, 5), torch.randn(4, 2)
    with pytest.raises(TypeError, match="lora_A dtype torch.float32 and lora_B dtype torch.float64"):
        fastlora.lora_embedding(ids, W, A, B.double())
    with pytest.raises(ValueError, match="one device.*lora_B on meta"):
        fastlora.lora_embedding(ids, W, A, B.to("meta"))
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        fastlora.lora_embedding(ids, torch.randint(0, 9, (5, 4)), A, B)


def test_multi_checks_each_adapters_dtypes_as_lora_linear():
    case = Case("lora", dtype=torch.float32)
    A, B = case.A, case.B
    with pytest.raises(TypeError, match="lora_A dtype torch.float32 and lora_B dtype torch.float64"):
        fastlora.lora_linear(case.x, case.W, A, B.double())
    with pytest.raises(TypeError, match="lora_A dtype torch.float32 and lora_B dtype torch.float64"):
        fastlora.lora_linear_multi(case.x, case.W, [A, A], [B, B.double()], scalings=[1.0, 1.0],
                                   dropout_ps=[0.0, 0.0])
