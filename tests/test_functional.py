"""fastlora.lora_linear on the pure-PyTorch path, against the seed's W + s·B@A reconstruction."""
from __future__ import annotations

import itertools

import pytest
import torch

import fastlora
from fastlora import reference
from helpers import assert_close, assert_low_precision_close

SHAPES = [(1, 17, 31), (7, 67, 37), (129, 31, 17)]  # (M, K, N): 1, primes, non-multiples of 16
RANKS = [1, 3, 16, 64, 128]
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4)}


pytestmark = pytest.mark.usefixtures("torch_backend")  # the PyTorch path throughout this file


def make(M, K, N, r, dtype, bias=True, lead=(), adapter_dtype=None, weight_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(*lead, M, K, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(N, K, generator=g) / K**0.5).to(dtype).requires_grad_(weight_grad)
    A = (torch.randn(r, K, generator=g) / K**0.5).to(adapter_dtype).requires_grad_()
    B = torch.randn(N, r, generator=g).to(adapter_dtype).requires_grad_()
    b = torch.randn(N, generator=g).to(dtype).requires_grad_() if bias else None
    return x, W, A, B, b


def grads_of(y, inputs, grad_y):
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(y, leaves, grad_y)


def detached_copies(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_seed_reconstruction(M, K, N, r, bias, dtype):
    x, W, A, B, b = make(M, K, N, r, dtype, bias)
    s = 0.37
    y = fastlora.lora_linear(x, W, A, B, b, scaling=s)
    ref_inputs = detached_copies((x, W, A, B, b))
    y_ref = reference.merged_lora_linear(*ref_inputs, scaling=s)
    atol, rtol = TOL[dtype]
    assert y.dtype == dtype
    assert_close(y, y_ref, atol, rtol, "y")
    gy = torch.randn_like(y)
    for name, g, g_ref in zip(["x", "A", "B", "bias"], grads_of(y, (x, W, A, B, b), gy),
                              grads_of(y_ref, ref_inputs, gy)):
        assert_close(g, g_ref, atol, rtol, f"d{name}")


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
@pytest.mark.parametrize("r", [1, 16, 64])
def test_low_precision_within_twice_torch_error(dtype, atol, r):
    M, K, N = 33, 67, 41
    x, W, A, B, b = make(M, K, N, r, dtype)
    s = 2.0
    y = fastlora.lora_linear(x, W, A, B, b, scaling=s)
    same = detached_copies((x, W, A, B, b))
    y_same = reference.merged_lora_linear(*same, scaling=s)
    ref64 = detached_copies((x, W, A, B, b), torch.float64)
    y64 = reference.merged_lora_linear(*ref64, scaling=s)
    assert y.dtype == dtype
    assert_low_precision_close(y, y64, y_same, atol, "y")
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    for name, g, g_same, g64 in zip(["x", "A", "B", "bias"], grads_of(y, (x, W, A, B, b), gy),
                                    grads_of(y_same, same, gy), grads_of(y64, ref64, gy.double())):
        assert g.dtype == dtype
        assert_low_precision_close(g, g64, g_same, atol * max(1.0, float(g64.abs().max())), f"d{name}")


def test_fp32_adapters_on_bf16_base_keep_dtypes():
    # PEFT keeps adapters in fp32 on a bf16 base: the output is bf16, the adapter gradients fp32, and the values
    # of the output and of every gradient follow the low-precision rule (bias ~3: dropping it fails by far).
    x, W, A, B, b = make(9, 23, 13, 4, torch.bfloat16, adapter_dtype=torch.float32)
    with torch.no_grad():
        b.add_(3.0)
    y = fastlora.lora_linear(x, W, A, B, b, scaling=0.5)
    assert y.dtype == torch.bfloat16
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    grads = grads_of(y, (x, W, A, B, b), gy)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32, torch.bfloat16]
    ref64 = detached_copies((x, W, A, B, b), torch.float64)
    y64 = reference.merged_lora_linear(*ref64, scaling=0.5)
    same = detached_copies((x, W, A, B, b))  # torch in bf16: the adapters cast down for the product
    y_same = reference.peft_lora_linear(*same, scaling=0.5)
    assert_low_precision_close(y, y64, y_same, 1e-2 * y64.abs().max().item(), "y")
    for name, g, g_same, g64 in zip(["x", "A", "B", "bias"], grads, grads_of(y_same, same, gy),
                                    grads_of(y64, ref64, gy.double())):
        assert_low_precision_close(g, g64, g_same, 1e-2 * max(1.0, float(g64.abs().max())), f"d{name}")


def test_leading_dims_and_noncontiguous_input():
    x, W, A, B, b = make(6, 19, 11, 3, torch.float64, lead=(2, 3))
    xt = x.detach().transpose(0, 1).requires_grad_()  # (3, 2, 6, 19), non-contiguous
    assert not xt.is_contiguous()
    x_strided = torch.randn(5, 38, dtype=torch.float64)[:, ::2].requires_grad_()  # stride 2 in the last dim
    for inp in (x, xt, x_strided):
        y = fastlora.lora_linear(inp, W, A, B, b, scaling=1.5)
        y_ref = reference.merged_lora_linear(inp, W, A, B, b, scaling=1.5)
        assert y.shape == (*inp.shape[:-1], 11)
        assert_close(y, y_ref, 1e-10, 1e-10, "y")
        gy = torch.randn_like(y)
        for g, g_ref in zip(grads_of(y, (inp, A, B, b), gy), grads_of(y_ref, (inp, A, B, b), gy)):
            assert_close(g, g_ref, 1e-10, 1e-10, "grad")


def test_one_dim_input():
    x, W, A, B, b = make(1, 19, 11, 3, torch.float64)
    x1 = x.detach()[0]
    y = fastlora.lora_linear(x1, W, A, B, b)
    assert y.shape == (11,)
    assert_close(y, reference.merged_lora_linear(x1, W, A, B, b), 1e-10, 1e-10, "y")


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_empty_batch(lead):
    x, W, A, B, b = make(lead[-1], 19, 11, 3, torch.float32, lead=lead[:-1])
    y = fastlora.lora_linear(x, W, A, B, b, dropout_p=0.2)
    assert y.shape == (*lead, 11)
    gx, gA, gB, gb = grads_of(y, (x, W, A, B, b), torch.ones_like(y))
    assert gx.shape == x.shape
    for g in (gA, gB, gb):
        assert bool((g == 0).all())


def test_weight_gradient_only_when_asked():
    x, W, A, B, b = make(7, 19, 11, 3, torch.float64, weight_grad=True)
    y = fastlora.lora_linear(x, W, A, B, b, scaling=0.7)
    y_ref = reference.merged_lora_linear(x, W, A, B, b, scaling=0.7)
    gy = torch.randn_like(y)
    (gW,) = torch.autograd.grad(y, [W], gy, retain_graph=True)
    (gW_ref,) = torch.autograd.grad(y_ref, [W], gy)
    assert_close(gW, gW_ref, 1e-10, 1e-10, "dW")
    # A frozen weight and bias: their full gradients are never computed.
    calls = []
    original = reference.lora_backward

    def spy(*args):
        calls.append(args[-5:])
        return original(*args)

    W.requires_grad_(False)
    b.requires_grad_(False)
    reference.lora_backward = spy
    try:
        out = fastlora.lora_linear(x, W, A, B, b)
        out.sum().backward()
    finally:
        reference.lora_backward = original
    assert calls == [(True, False, True, True, False)]


def test_gradcheck_float64_with_dropout():
    # Fixed seed: each call draws the same mask, so gradcheck's numerical Jacobian matches the analytical one
    # only if the backward regenerates exactly the forward's mask.
    x, W, A, B, b = make(5, 7, 6, 3, torch.float64)

    def f(x, A, B, b):
        torch.manual_seed(1234)
        return fastlora.lora_linear(x, W, A, B, b, scaling=0.8, dropout_p=0.4)

    assert torch.autograd.gradcheck(f, (x, A, B, b))


def test_dropout_matches_oracle_with_the_regenerated_mask():
    M, K, N, r, p = 64, 37, 29, 5, 0.3
    x, W, A, B, b = make(M, K, N, r, torch.float64)
    torch.manual_seed(7)
    expected_seed = int(torch.randint(0, 2**31 - 1, ()))
    torch.manual_seed(7)
    y = fastlora.lora_linear(x, W, A, B, b, scaling=1.3, dropout_p=p)
    keep = reference.dropout_keep_mask(expected_seed, (M, K), p, "cpu")
    ref_in = detached_copies((x, W, A, B, b))
    y_ref = reference.unfused_lora_linear(*ref_in, scaling=1.3, keep_mask=keep, dropout_p=p)
    assert_close(y, y_ref, 1e-10, 1e-10, "y")
    gy = torch.randn_like(y)
    for g, g_ref in zip(grads_of(y, (x, W, A, B, b), gy), grads_of(y_ref, ref_in, gy)):
        assert_close(g, g_ref, 1e-10, 1e-10, "grad")
    kept = keep.double().mean().item()
    assert abs(kept - (1 - p)) < 0.03, kept


def test_dropout_only_in_training_and_new_mask_each_call():
    x, W, A, B, b = make(32, 41, 13, 4, torch.float64)
    y_eval = fastlora.lora_linear(x, W, A, B, b, dropout_p=0.5, training=False)
    assert_close(y_eval, reference.merged_lora_linear(x, W, A, B, b), 1e-10, 1e-10, "eval")
    y1 = fastlora.lora_linear(x, W, A, B, b, dropout_p=0.5)
    y2 = fastlora.lora_linear(x, W, A, B, b, dropout_p=0.5)
    assert not torch.equal(y1, y2)
    torch.manual_seed(3)
    y3 = fastlora.lora_linear(x, W, A, B, b, dropout_p=0.5)
    torch.manual_seed(3)
    y4 = fastlora.lora_linear(x, W, A, B, b, dropout_p=0.5)
    assert torch.equal(y3, y4)


def _saved_bytes(fn, params):
    """Bytes autograd saves for backward, each storage once, parameters (which cost nothing) excluded."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params if p is not None}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, storages


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saves_only_input_h_and_seed(p):
    M, K, N, r = 64, 48, 80, 8
    x, W, A, B, b = make(M, K, N, r, torch.float32)
    _, storages = _saved_bytes(lambda: fastlora.lora_linear(x, W, A, B, b, dropout_p=p), (W, A, B, b))
    # x and h (fp32); eager code keeps the dropout seed as a Python int (compiled code, as an int64 scalar)
    assert sorted(storages.values()) == sorted([x.nbytes, M * r * 4])
    if p:  # PEFT's unfused math saves a dropped copy of x and a mask (≥ 1 byte per element) on top.
        _, peft = _saved_bytes(lambda: reference.peft_lora_linear(x, W, A, B, b, dropout_p=p), (W, A, B, b))
        assert sum(peft.values()) >= sum(storages.values()) + M * K


def test_inference_saves_nothing():
    x, W, A, B, b = make(16, 24, 20, 4, torch.float32)
    with torch.no_grad():
        _, storages = _saved_bytes(lambda: fastlora.lora_linear(x, W, A, B, b), (W, A, B, b))
    assert storages == {}
    xd, Wd, Ad, Bd, bd = (t.detach() for t in (x, W, A, B, b))
    y, storages = _saved_bytes(lambda: fastlora.lora_linear(xd, Wd, Ad, Bd, bd), ())
    assert storages == {} and not y.requires_grad


def test_autocast_cpu_bfloat16():
    x, W, A, B, b = make(9, 24, 20, 4, torch.float32)
    with torch.no_grad():
        b.add_(3.0)  # a dropped bias misses by ~3, far outside the tolerance
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastlora.lora_linear(x, W, A, B, b, scaling=2.0)
        y_lin = torch.nn.functional.linear(x, W, b)
        y_peft = reference.peft_lora_linear(x, W, A, B, b, scaling=2.0)
    assert y.dtype == y_lin.dtype == y_peft.dtype == torch.bfloat16
    ref64 = detached_copies((x, W, A, B, b), torch.float64)
    y_ref = reference.merged_lora_linear(*ref64, scaling=2.0)
    assert_low_precision_close(y, y_ref, y_peft, 1e-2 * y_ref.abs().max().item(), "y")
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    grads = grads_of(y, (x, W, A, B, b), gy)
    assert all(g.dtype == torch.float32 for g in grads)  # back through the casts
    for name, g, g_peft, g64 in zip(["x", "A", "B", "bias"], grads, grads_of(y_peft, (x, W, A, B, b), gy),
                                    grads_of(y_ref, ref64, gy.double())):
        assert_low_precision_close(g, g64, g_peft, 1e-2 * max(1.0, float(g64.abs().max())), f"d{name}")


# ---------------------------------------------------------------------------------------------------------
# Bad input: clear errors before any compute
# ---------------------------------------------------------------------------------------------------------

def _good():
    return make(4, 8, 6, 2, torch.float32)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(x=torch.randn(4, 9)), ValueError, r"input \(4, 9\).*in_features=8"),
        (lambda a: a.update(A=torch.randn(2, 9)), ValueError, r"lora_A \(2, 9\)"),
        (lambda a: a.update(B=torch.randn(6, 3)), ValueError, r"rank mismatch.*lora_A \(2, 8\).*lora_B \(6, 3\)"),
        (lambda a: a.update(B=torch.randn(5, 2)), ValueError, r"lora_B \(5, 2\).*out_features=6"),
        (lambda a: a.update(b=torch.randn(5)), ValueError, r"bias \(5,\).*out_features=6"),
        (lambda a: a.update(b=torch.randn(6, 1)), ValueError, r"bias must be 1-D"),
        (lambda a: a.update(W=torch.randn(6, 8, 1)), ValueError, r"weight must be 2-D"),
        (lambda a: a.update(A=torch.randn(0, 8), B=torch.randn(6, 0)), ValueError, r"rank must be >= 1"),
        (lambda a: a.update(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, r"input must be a floating"),
        (lambda a: a.update(W=torch.ones(6, 8, dtype=torch.int32)), TypeError, r"weight must be a floating"),
        (lambda a: a.update(x=[[1.0] * 8]), TypeError, r"input must be a torch.Tensor"),
        (lambda a: a.update(W=torch.randn(6, 8, dtype=torch.float64)), TypeError, r"float32.*float64"),
        (lambda a: a.update(b=torch.randn(6, dtype=torch.float16)), TypeError, r"bias dtype"),
        (lambda a: a.update(B=torch.randn(6, 2, dtype=torch.float64)), TypeError, r"lora_A dtype.*lora_B dtype"),
        (lambda a: a.update(p=1.0), ValueError, r"dropout_p must be a float in \[0, 1\)"),
        (lambda a: a.update(p=-0.1), ValueError, r"dropout_p"),
        (lambda a: a.update(W=torch.randn(6, 8, device="meta")), ValueError, r"one device.*weight on meta"),
    ],
)
def test_bad_input(mutate, exc, match):
    x, W, A, B, b = _good()
    args = dict(x=x, W=W, A=A, B=B, b=b, p=0.0)
    mutate(args)
    calls = []
    original = reference.lora_forward
    reference.lora_forward = lambda *a, **k: calls.append(1)
    try:
        with pytest.raises(exc, match=match):
            fastlora.lora_linear(args["x"], args["W"], args["A"], args["B"], args["b"], dropout_p=args["p"])
    finally:
        reference.lora_forward = original
    assert calls == []


# ---------------------------------------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------------------------------------

def test_backend_choice(monkeypatch):
    for name in ("auto", "torch", "triton", "TORCH"):
        fastlora.set_backend(name)
        assert fastlora.get_backend() == name.lower()
    with pytest.raises(ValueError, match="backend must be one of"):
        fastlora.set_backend("cuda")
    from fastlora import backend

    monkeypatch.setattr(backend, "_backend", None)
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    assert fastlora.get_backend() == "torch"
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    assert fastlora.get_backend() == "torch"  # the variable is read once, on first use
    monkeypatch.setattr(backend, "_backend", None)
    monkeypatch.setenv("FASTLORA_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTLORA_BACKEND"):
        fastlora.get_backend()
    fastlora.set_backend("auto")
    # auto: the kernels for CUDA tensors only; CPU tensors take the PyTorch path
    assert backend.use_triton(torch.device("cpu"), torch.float32) is False
    assert backend.use_triton(torch.device("cuda"), torch.float64) is False


def test_forced_triton_rejects_what_it_cannot_run(monkeypatch):
    from fastlora import backend

    fastlora.set_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="cannot run on cpu tensors"):
        backend.use_triton(torch.device("cpu"), torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TypeError, match="float64"):
        backend.use_triton(torch.device("cpu"), torch.float64)


def test_triton_backend_is_refused_where_it_cannot_run(monkeypatch):
    """set_backend("triton") says at once why the kernels cannot run on this machine (not at the first forward),
    and leaves the previous choice in place."""
    from fastlora import backend

    fastlora.set_backend("torch")
    monkeypatch.setattr(backend, "_TRITON_AVAILABLE", False)
    with pytest.raises(RuntimeError, match="needs the triton package: pip install triton"):
        fastlora.set_backend("triton")
    assert fastlora.get_backend() == "torch"
    monkeypatch.setattr(backend, "_TRITON_AVAILABLE", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="no CUDA device, and the Triton interpreter is off"):
        fastlora.set_backend("triton")
    assert fastlora.get_backend() == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fastlora.set_backend("triton")
    assert fastlora.get_backend() == "triton"
    fastlora.set_backend("auto")


def test_triton_from_the_environment_warns_at_import_where_it_cannot_run(monkeypatch):
    from fastlora import backend

    monkeypatch.setattr(backend, "_TRITON_AVAILABLE", False)
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    with pytest.warns(RuntimeWarning, match="FASTLORA_BACKEND=triton: .*needs the triton package"):
        assert backend._backend_from_env() == "triton"


def test_autocast_leaves_float64_alone_like_linear():
    x, W, A, B, b = make(5, 12, 7, 2, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastlora.lora_linear(x, W, A, B, b)
        y_lin = torch.nn.functional.linear(x, W, b)
    assert y.dtype == y_lin.dtype == torch.float64
    assert_close(y, reference.merged_lora_linear(x, W, A, B, b), 1e-10, 1e-10, "y")
