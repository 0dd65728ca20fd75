"""fastlora.lora_linear_4bit against bitsandbytes itself: dequantize_4bit(W) followed by the reference LoRA math.

Three implementations are checked, on CPU: the PyTorch path (bitsandbytes' dequantize + fastlora.reference), and
under the Triton interpreter both Triton paths, forced with FASTLORA_QLORA_PATH: ``fused4bit`` (the 4-bit GEMM that
dequantizes in registers) and ``dequant`` (a transient dequantized buffer, then fastlora's fused kernels).
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="the 4-bit (QLoRA) path needs bitsandbytes: pip install -e \".[qlora]\"")
import bitsandbytes.functional as bnbF  # noqa: E402

import fastlora  # noqa: E402
from fastlora import qlora, reference  # noqa: E402
from helpers import assert_close, assert_low_precision_close, nan_poisoned_allocations  # noqa: E402

PATHS = ["torch", "fused4bit", "dequant"]
# (quant_type, double quantization, blocksize): every pair of the three options appears
QUANTS = [("nf4", True, 64), ("fp4", False, 128), ("nf4", False, 128), ("fp4", True, 64)]
# (M, K, N, r): M = 1 and a prime; K not a multiple of the blocksize, and odd (bytes and blocks straddle rows)
SHAPES = [(5, 100, 37, 3), (1, 99, 21, 16), (13, 128, 40, 1)]


@pytest.fixture
def path(request, monkeypatch):
    """Select an implementation: the torch backend, or the triton backend with one of its two paths forced."""
    name = request.param
    previous = fastlora.get_backend()
    if name == "torch":
        fastlora.set_backend("torch")
    else:
        fastlora.set_backend("triton")
        monkeypatch.setenv("FASTLORA_QLORA_PATH", name)
    yield name
    fastlora.set_backend(previous)


def cpu_kernel_quirk(K, blocksize):
    """bitsandbytes 0.50's CPU dequantize kernel indexes blocks per row when K is a multiple of 16 but not of the
    blocksize (test_bitsandbytes_cpu_kernel_quirk): for those shapes the oracle is bitsandbytes' reference."""
    return K % 16 == 0 and K % blocksize != 0


def bnb_dequantize(q, qs):
    """The oracle's W̃: bitsandbytes' dequantize_4bit, or for the quirk shapes its own reference implementation
    (bitsandbytes.backends.default.ops._dequantize_4bit_compute, uncompiled), which its CPU backend runs for odd K."""
    N, K = qs.shape
    if K % 2 == 0 and not cpu_kernel_quirk(K, qs.blocksize):  # (odd K: bnb runs the reference, torch.compiled)
        return bnbF.dequantize_4bit(q, qs)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
    return _dequantize_4bit_compute.__wrapped__(q.view(torch.uint8).reshape(-1), absmax.float(), bnbF.get_4bit_type(qs.quant_type, "cpu"),
                                                qs.blocksize, qs.shape, qs.dtype)


def quantized(N, K, quant_type="nf4", nested=False, blocksize=64, w_dtype=torch.float32, seed=0):
    """(packed uint8, QuantState, W̃ = bitsandbytes' dequantize_4bit in w_dtype) for a random (N, K) weight."""
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)).to(w_dtype)
    q, qs = bnbF.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    return q, qs, bnb_dequantize(q, qs)


def make(M, K, N, r, dtype, bias, adapter_dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).requires_grad_()
    A = (torch.randn(r, K, generator=g) / K**0.5).to(adapter_dtype).requires_grad_()
    B = torch.randn(N, r, generator=g).to(adapter_dtype).requires_grad_()
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return x, A, B, b


def keep_mask(path, seed, shape, p):
    if p == 0.0:
        return None
    if path == "torch":
        return reference.dropout_keep_mask(seed, shape, p, "cpu")
    from fastlora.kernels.dropout import dropout_keep_mask

    return dropout_keep_mask(seed, shape, p, "cpu")


def run_op(q, qs, x, A, B, b, s, p, rng_seed=11):
    """The op, and the dropout seed it draws (as fastlora.autograd does: from torch's generator)."""
    torch.manual_seed(rng_seed)
    seed = int(torch.randint(0, 2**31 - 1, ())) if p > 0 else 0
    torch.manual_seed(rng_seed)
    return fastlora.lora_linear_4bit(x, q, A, B, b, quant_state=qs, scaling=s, dropout_p=p), seed


def oracle(x, Wd, A, B, b, s, keep, p, dtype):
    """bitsandbytes' W̃ then the reference LoRA math, in ``dtype`` (leaves are fresh copies)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, A, B)]
    y = reference.unfused_lora_linear(leaves[0], Wd.to(dtype), leaves[1], leaves[2],
                                      None if b is None else b.to(dtype), scaling=s, keep_mask=keep, dropout_p=p)
    return y, leaves


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: f"{q[0]}-dq{int(q[1])}-bs{q[2]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias,p", [(False, 0.0), (True, 0.3)])
def test_matches_bitsandbytes_dequantize_then_reference(path, quant, dtype, bias, p):
    quant_type, nested, blocksize = quant
    M, K, N, r = SHAPES[(len(path) + blocksize // 64 + int(nested)) % len(SHAPES)]  # shapes rotate over cases
    q, qs, Wd = quantized(N, K, quant_type, nested, blocksize, w_dtype=dtype)
    x, A, B, b = make(M, K, N, r, dtype, bias)
    s = 0.7
    y, seed = run_op(q, qs, x, A, B, b, s, p)
    assert y.dtype == dtype and y.shape == (M, N)
    keep = keep_mask(path, seed, (M, K), p)
    y64, leaves64 = oracle(x, Wd.to(dtype), A, B, b, s, keep, p, torch.float64)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    grads = torch.autograd.grad(y, (x, A, B), gy)
    grads64 = torch.autograd.grad(y64, leaves64, gy.double())
    assert [g.dtype for g in grads] == [dtype, torch.float32, torch.float32]
    if dtype == torch.float32:
        assert_close(y, y64, 1e-4, 1e-4, "y")
        for name, g, g64 in zip("xAB", grads, grads64):
            assert_close(g, g64, 1e-4, 1e-4, f"d{name}")
    else:  # fp16: within twice plain PyTorch's own fp16 error (the flash-attention rule)
        y16, leaves16 = oracle(x, Wd.to(dtype), A.to(dtype), B.to(dtype), b, s, keep, p, dtype)
        assert_low_precision_close(y, y64, y16, 1e-2, "y")
        for name, g, g64, g16 in zip("xAB", grads, grads64, torch.autograd.grad(y16, leaves16, gy)):
            assert_low_precision_close(g, g64, g16, 1e-2 * max(1.0, float(g64.abs().max())), f"d{name}")


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_nibble_order_and_flat_blocks(path):
    """The packed layout, spelled out: W (N, K) is flattened row-major; byte j holds element 2j in its HIGH nibble
    and element 2j+1 in its LOW nibble; element i is scaled by absmax[i // blocksize], blocks running over the
    flat index (here K = 24 < blocksize = 32: blocks straddle rows). bitsandbytes must agree, and so must the op."""
    N, K, bs = 4, 24, 32
    g = torch.Generator().manual_seed(3)
    nib = torch.randint(0, 16, (N * K,), generator=g)
    packed = ((nib[0::2] << 4) | nib[1::2]).to(torch.uint8).reshape(-1, 1)
    absmax = torch.tensor([1.0, 2.0, 4.0])
    qs = bnbF.QuantState(absmax=absmax, shape=torch.Size([N, K]), code=bnbF.get_4bit_type("nf4", "cpu"),
                         blocksize=bs, quant_type="nf4", dtype=torch.float32)
    code = bnbF.get_4bit_type("nf4", "cpu")
    expected = (code[nib] * absmax[torch.arange(N * K) // bs]).reshape(N, K)
    assert torch.equal(bnbF.dequantize_4bit(packed, qs), expected), "bitsandbytes' packed layout changed"
    # y = I_K W̃ᵀ = W̃ᵀ: every element of W̃ read through the op (A, B zero: no LoRA term)
    eye = torch.eye(K)
    y = fastlora.lora_linear_4bit(eye, packed, torch.zeros(2, K), torch.zeros(N, 2), quant_state=qs)
    assert_close(y, expected.t(), 0.0, 0.0, "W̃ᵀ")
    # and dx = dY W̃ reads it in the other orientation
    x = torch.zeros(N, K, requires_grad=True)
    A = torch.zeros(2, K, requires_grad=True)
    y = fastlora.lora_linear_4bit(x, packed, A, torch.zeros(N, 2), quant_state=qs)
    (dx,) = torch.autograd.grad(y, (x,), torch.eye(N))
    assert_close(dx, expected, 0.0, 0.0, "dY W̃")


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_params4bit_weight_and_leading_dims(path):
    """A Params4bit (its quant_state), stored as bf16 words (quant_storage, as for FSDP), 3-D and empty inputs."""
    lin = bnb.nn.Linear4bit(48, 20, bias=True, quant_type="fp4", compress_statistics=True,
                            quant_storage=torch.bfloat16)
    lin = lin.to("cpu")  # quantizes
    x = torch.randn(2, 3, 48)
    A, B = torch.randn(4, 48) / 7, torch.randn(20, 4)
    y = fastlora.lora_linear_4bit(x, lin.weight, A, B, lin.bias, scaling=0.5)
    Wd = bnb_dequantize(lin.weight, lin.weight.quant_state)
    expected = reference.unfused_lora_linear(x, Wd, A, B, lin.bias, scaling=0.5)
    assert y.shape == (2, 3, 20)
    assert_close(y, expected, 1e-4, 1e-4, "y")
    x0 = torch.randn(0, 48, requires_grad=True)
    A.requires_grad_()
    y0 = fastlora.lora_linear_4bit(x0, lin.weight, A, B, lin.bias, scaling=0.5)
    y0.sum().backward()
    assert y0.shape == (0, 20) and x0.grad.shape == (0, 48) and torch.equal(A.grad, torch.zeros_like(A))


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_no_dequantized_weight_saved_or_kept(path, monkeypatch):
    """Saved for backward: x, h (and the packed weight and adapters, which are the parameters themselves): nothing
    of W's size. Every dequantized W̃ the op makes is freed by the time forward and backward return."""
    M, K, N, r = 6, 128, 64, 4
    q, qs, _ = quantized(N, K, "nf4", nested=True)
    x, A, B, _ = make(M, K, N, r, torch.float32, bias=False)
    made = []
    real = qlora._Quant.dequantize

    def tracked(self, qq, absmax, dtype):
        w = real(self, qq, absmax, dtype)
        made.append(weakref.ref(w))
        return w

    monkeypatch.setattr(qlora._Quant, "dequantize", tracked)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fastlora.lora_linear_4bit(x, q, A, B, quant_state=qs, dropout_p=0.1)
    gc.collect()
    assert all(ref() is None for ref in made), "a dequantized weight is alive between forward and backward"
    # the parameters and the quant_state's own tensors (the op's inputs: no memory of their own)
    params = {t.untyped_storage().data_ptr() for t in (q, A, B, qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset)}
    activations = [t for t in saved if t.untyped_storage().data_ptr() not in params]
    assert not any(t.is_floating_point() and t.numel() >= N * K for t in saved), [tuple(t.shape) for t in saved]
    assert sorted(tuple(t.shape) for t in activations) == [(M, r), (M, K)], [tuple(t.shape) for t in activations]
    y.sum().backward()
    del y, saved, activations
    gc.collect()
    assert all(ref() is None for ref in made), "a dequantized weight outlived the call"
    if path != "fused4bit":
        assert made, "the dequantize path did not dequantize"


def test_fused4bit_kernel_runs_for_small_m_and_dequant_for_large_m(monkeypatch):
    from fastlora.kernels import qlora as qk

    previous = fastlora.get_backend()
    fastlora.set_backend("triton")
    monkeypatch.delenv("FASTLORA_QLORA_PATH", raising=False)
    try:
        q, qs, Wd = quantized(24, 64, "nf4")
        for M, fused in ((3, True), (qlora.FUSED4BIT_DEFAULT_MAX_M + 1, False)):
            before = qk.launch_counts["gemm_4bit_lora"]
            x, A, B = torch.randn(M, 64), torch.randn(2, 64) / 8, torch.randn(24, 2)
            y = fastlora.lora_linear_4bit(x, q, A, B, quant_state=qs)
            assert (qk.launch_counts["gemm_4bit_lora"] > before) == fused, M
            assert_close(y, reference.unfused_lora_linear(x, Wd, A, B), 1e-4, 1e-4, f"y (M={M})")
    finally:
        fastlora.set_backend(previous)


def test_gradcheck_float64_torch_path_with_dropout():
    previous = fastlora.get_backend()
    fastlora.set_backend("torch")
    try:
        q, qs, _ = quantized(4, 40, "fp4", nested=True, blocksize=32)
        x, A, B, _ = make(2, 40, 4, 1, torch.float64, bias=False, adapter_dtype=torch.float64)
        b = torch.randn(4, dtype=torch.float64, requires_grad=True)

        def f(x, A, B, b):
            torch.manual_seed(1234)
            return fastlora.lora_linear_4bit(x, q, A, B, b, quant_state=qs, scaling=0.8, dropout_p=0.4)

        assert torch.autograd.gradcheck(f, (x, A, B, b), fast_mode=True)
    finally:
        fastlora.set_backend(previous)


def test_eval_and_no_grad_take_no_dropout_and_match():
    q, qs, Wd = quantized(10, 64, "nf4")
    x, A, B, b = make(4, 64, 10, 3, torch.float32, bias=True)
    with torch.no_grad():
        y = fastlora.lora_linear_4bit(x, q, A, B, b, quant_state=qs, scaling=2.0, dropout_p=0.5, training=False)
    assert_close(y, reference.unfused_lora_linear(x, Wd, A, B, b, scaling=2.0), 1e-5, 1e-5, "y")


def test_invalid_inputs_raise_before_any_kernel(monkeypatch):
    from fastlora.kernels import qlora as qk

    q, qs, _ = quantized(8, 64, "nf4")
    x, A, B = torch.randn(2, 64), torch.randn(3, 64), torch.randn(8, 3)
    before = sum(qk.launch_counts.values())
    op = fastlora.lora_linear_4bit
    with pytest.raises(TypeError, match="no quant_state"):
        op(x, q, A, B)
    with pytest.raises(TypeError, match="Params4bit or a packed"):
        op(x, "weight", A, B, quant_state=qs)
    with pytest.raises(ValueError, match="in_features=64"):
        op(torch.randn(2, 63), q, A, B, quant_state=qs)
    with pytest.raises(ValueError, match="bytes"):
        op(x, q[:-1], A, B, quant_state=qs)
    with pytest.raises(ValueError, match="lora_B"):
        op(x, q, A, torch.randn(8, 2), quant_state=qs)
    with pytest.raises(ValueError, match="dropout_p"):
        op(x, q, A, B, quant_state=qs, dropout_p=1.0)
    with pytest.raises(TypeError, match="floating-point"):
        op(x.long(), q, A, B, quant_state=qs)
    with pytest.raises(ValueError, match="one device"):
        op(x.to("meta"), q, A, B, quant_state=qs)
    with pytest.raises(TypeError, match="bias dtype"):
        op(x, q, A, B, torch.randn(8, dtype=torch.float64), quant_state=qs)
    repacked = bnbF.QuantState(absmax=qs.absmax, shape=qs.shape, code=qs.code, blocksize=64, quant_type="nf4",
                               dtype=torch.float32)
    repacked.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="restore_canonical_layout"):
        op(x, q, A, B, quant_state=repacked)
    assert sum(qk.launch_counts.values()) == before


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_bitsandbytes_cpu_kernel_quirk(path):
    """K = 96, blocksize 64: every fastlora path reads the layout that quantize_4bit wrote (blocks over the flat
    index, as bitsandbytes' reference and CUDA dequantizers do). bitsandbytes' own CPU kernel (0.50) reads this
    shape with per-row blocks; if a later release agrees with the reference, nothing here needs to change."""
    N, K, bs = 20, 96, 64
    q, qs, Wd = quantized(N, K, "nf4", blocksize=bs)
    idx = torch.arange(N * K)
    byte = q.reshape(-1)[idx // 2].long()
    nib = torch.where(idx % 2 == 0, byte >> 4, byte & 0xF)
    expected = (bnbF.get_4bit_type("nf4", "cpu")[nib] * qs.absmax[idx // bs]).reshape(N, K)
    assert torch.equal(Wd, expected)  # the oracle's reference reads the flat layout
    y = fastlora.lora_linear_4bit(torch.eye(K), q, torch.zeros(1, K), torch.zeros(N, 1), quant_state=qs)
    assert_close(y, expected.t(), 0.0, 0.0, "W̃ᵀ")


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_weight_rounded_to_its_quantized_dtype_before_fp32_compute(path):
    """A weight quantized from fp16 dequantizes to fp16 values (bitsandbytes rounds code·absmax once to the
    quant_state's dtype), even when the compute dtype is fp32."""
    q, qs, Wd = quantized(24, 128, "fp4", nested=True, w_dtype=torch.float16)
    assert Wd.dtype == torch.float16
    x, A, B, _ = make(3, 128, 24, 2, torch.float32, bias=False)
    y = fastlora.lora_linear_4bit(x, q, A, B, quant_state=qs)
    y64, _ = oracle(x, Wd.float(), A, B, None, 1.0, None, 0.0, torch.float64)
    assert_close(y, y64, 2e-5, 2e-5, "y")


def test_the_path_is_measured_per_key_by_the_shared_dispatcher_never_while_tracing(monkeypatch):
    """The choice between the two Triton paths is fastlora.kernels.dispatch's MeasuredChoice (the LoRA GEMMs' one):
    with a timer (the CUDA one replaced by a fake here) each path is timed once per key and the faster cached and
    run; FASTLORA_QLORA_PATH pins it; under torch.compile the timing happens when the custom op runs, never
    while the graph is traced."""
    monkeypatch.delenv("FASTLORA_QLORA_PATH", raising=False)
    choice = qlora._path_choice()
    calls = []

    def timer(name, fn):
        calls.append(name)
        fn()
        return {"fused4bit": 2.0, "dequant": 1.0}[name]

    monkeypatch.setattr(choice, "timer", timer)
    monkeypatch.setattr(choice, "choices", {})
    monkeypatch.setattr(choice, "timings", {})
    previous = fastlora.get_backend()
    fastlora.set_backend("triton")
    try:
        q, qs, Wd = quantized(24, 64, "nf4")
        x, A, B, _ = make(5, 64, 24, 3, torch.float32, bias=False)
        y = fastlora.lora_linear_4bit(x, q, A, B, quant_state=qs)
        assert sorted(calls) == ["dequant", "fused4bit"] and list(qlora.dispatch_choices().values()) == ["dequant"]
        calls.clear()
        assert_close(fastlora.lora_linear_4bit(x, q, A, B, quant_state=qs), y, 0, 0, "cached path")
        assert calls == []
        monkeypatch.setenv("FASTLORA_QLORA_PATH", "fused4bit")
        assert choice.choose(("forward", 16), {}, x.device) == "fused4bit"
        monkeypatch.setenv("FASTLORA_QLORA_PATH", "fastest")
        with pytest.raises(ValueError, match="FASTLORA_QLORA_PATH"):
            choice.choose(("forward", 16), {}, x.device)
        monkeypatch.delenv("FASTLORA_QLORA_PATH")
        choice.choices.clear()

        def backend(gm, example_inputs):
            assert calls == [], "a path was timed while the graph was traced"
            assert any("lora_linear_4bit_fwd" in str(n.target) for n in gm.graph.nodes), gm.graph
            return gm.forward

        torch._dynamo.reset()
        compiled = torch.compile(lambda x: fastlora.lora_linear_4bit(x, q, A, B, quant_state=qs), backend=backend,
                                 fullgraph=True)
        assert_close(compiled(x), y, 1e-6, 1e-6, "compiled")
        assert sorted(calls) == ["dequant", "fused4bit"], "the custom op measures when it runs"
    finally:
        fastlora.set_backend(previous)
        torch._dynamo.reset()


@pytest.mark.parametrize("K,blocksize", [(128, 64), (99, 64)])
def test_fused4bit_int64_index_path(K, blocksize, monkeypatch):
    """The 4-bit GEMM's int64 flat indices (used when W passes 2³¹ elements) forced on a small W: forward and
    dX as bitsandbytes' W̃ gives them, with the per-tile (K = 128) and per-element (K = 99) scales."""
    from fastlora.kernels import qlora as qk

    monkeypatch.setattr(qk, "IDX32_LIMIT", 0)
    monkeypatch.setenv("FASTLORA_QLORA_PATH", "fused4bit")
    previous = fastlora.get_backend()
    fastlora.set_backend("triton")
    try:
        q, qs, Wd = quantized(36, K, "nf4", nested=True, blocksize=blocksize)
        x, A, B, _ = make(5, K, 36, 3, torch.float32, bias=False)
        y = fastlora.lora_linear_4bit(x, q, A, B, quant_state=qs)
        y64, leaves = oracle(x, Wd, A, B, None, 1.0, None, 0.0, torch.float64)
        assert_close(y, y64, 1e-4, 1e-4, "y")
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
        (dx,) = torch.autograd.grad(y, (x,), gy)
        (dx64,) = torch.autograd.grad(y64, (leaves[0],), gy.double())
        assert_close(dx, dx64, 1e-4, 1e-4, "dx")
    finally:
        fastlora.set_backend(previous)


@pytest.mark.parametrize("path", ["fused4bit", "dequant"], indirect=True)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_every_output_element_written(path, p):
    """NaN-filled torch.empty / new_empty inside the op (forward and backward): an element no kernel writes shows."""
    q, qs, Wd = quantized(37, 96, "fp4", blocksize=32)
    x, A, B, b = make(7, 96, 37, 5, torch.float16, bias=True)
    with nan_poisoned_allocations():
        y, _ = run_op(q, qs, x, A, B, b, 0.5, p)
        grads = torch.autograd.grad(y, (x, A, B), torch.ones_like(y))
    for name, t in zip(("y", "dx", "dA", "dB"), (y, *grads)):
        assert torch.isfinite(t).all(), name


def test_bf16_compute_on_the_torch_path():
    """bf16 (QLoRA's usual compute dtype) on the PyTorch path, fp32 adapters, within twice PyTorch's bf16 error."""
    previous = fastlora.get_backend()
    fastlora.set_backend("torch")
    try:
        q, qs, Wd = quantized(33, 128, "nf4", nested=True, w_dtype=torch.bfloat16)
        x, A, B, b = make(9, 128, 33, 4, torch.bfloat16, bias=True)
        y, seed = run_op(q, qs, x, A, B, b, 2.0, 0.1)
        keep = keep_mask("torch", seed, (9, 128), 0.1)
        y64, leaves64 = oracle(x, Wd, A, B, b, 2.0, keep, 0.1, torch.float64)
        y16, leaves16 = oracle(x, Wd, A.to(torch.bfloat16), B.to(torch.bfloat16), b, 2.0, keep, 0.1, torch.bfloat16)
        assert y.dtype == torch.bfloat16
        assert_low_precision_close(y, y64, y16, 2e-2, "y")
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
        for name, g, g64, g16 in zip("xAB", torch.autograd.grad(y, (x, A, B), gy),
                                     torch.autograd.grad(y64, leaves64, gy.double()),
                                     torch.autograd.grad(y16, leaves16, gy)):
            assert_low_precision_close(g, g64, g16, 2e-2 * max(1.0, float(g64.abs().max())), f"d{name}")
    finally:
        fastlora.set_backend(previous)
