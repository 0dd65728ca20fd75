"""DoRA: ``fastlora.dora_linear`` / ``dora_embedding`` through the DoRA fuser against PEFT's own DoRA layers
(the oracle), outputs and every gradient, on the PyTorch path (fp64, fp32) and the interpreted kernels (fp32,
fp16); the B@A-free norm; its cache; and that no (out × in) tensor is ever made."""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")

import fastlora  # noqa: E402
from fastlora import dora as fdora  # noqa: E402
from fastlora import reference
from fastlora.op_common import draw_seed  # noqa: E402
from fastlora.peft_interop import dora as dora_fuser  # noqa: E402
from fastlora.peft_interop import registry  # noqa: E402
from helpers import AllocatedShapes, assert_close, assert_low_precision_close  # noqa: E402

TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5)}
KDEV = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels' lane: CUDA, else the interpreter on CPU


def _dev(use_triton):
    return KDEV if use_triton else "cpu"


class _Net(nn.Module):
    def __init__(self, K, N, bias, V=None):
        super().__init__()
        self.lin = nn.Linear(K, N, bias=bias)
        if V is not None:
            self.emb = nn.Embedding(V, K)

    def forward(self, x):
        return self.lin(x)


def _peft_layer(K, N, r, bias=True, dropout=0.0, target="lin", V=None, seed=0, **kw):
    torch.manual_seed(seed)
    net = _Net(K, N, bias, V)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(net, peft.LoraConfig(target_modules=[target], r=r, lora_alpha=2 * r + 1,
                                                         lora_dropout=dropout, use_dora=True,
                                                         init_lora_weights=False, **kw))
    layer = getattr(model.base_model.model, target)
    with torch.no_grad():  # magnitudes away from the initial norms, so that g != 1
        for mv in layer.lora_magnitude_vector.values():
            mv.weight.mul_(torch.rand(mv.weight.shape, generator=torch.Generator().manual_seed(seed + 1)) + 0.5)
    return layer


class _MaskDropout(nn.Module):
    """PEFT's lora_dropout replaced by fastlora's keep mask: PEFT's DoRA then sees the op's mask."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.reshape(x.shape).to(x.dtype) / (1.0 - self.p)


def _op_keep(seed_state, x2d_shape, p, use_triton, device):
    torch.manual_seed(seed_state)
    seed = draw_seed(p)
    if use_triton:
        from fastlora.kernels.dropout import dropout_keep_mask

        return dropout_keep_mask(seed, x2d_shape, p, device)
    return reference.dropout_keep_mask(seed, x2d_shape, p, device)


def _trainable(layer):
    return {n: p for n, p in layer.named_parameters() if p.requires_grad}


def _run(layer, x, p, use_triton, ref_layers, dy=None):
    """Fused forward+backward on ``layer`` and PEFT's on each of ``ref_layers`` (deep copies, maybe in another
    dtype), same dropout mask. Returns ([y, dx, grads...] fused, [[...] for each ref])."""
    K = x.shape[-1]
    device = layer.get_base_layer().weight.device
    x = x.to(device)
    training = layer.training and p > 0
    keep = _op_keep(123, (x.numel() // K, K), p, use_triton, device) if training else None
    xs = x.detach().clone().requires_grad_(True)
    torch.manual_seed(123)
    y = dora_fuser.forward(layer, xs, ["default"])
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(device)
    y.backward(dy.to(y.dtype))
    out = [y, xs.grad] + [q.grad for q in _trainable(layer).values()]
    refs = []
    for ref in ref_layers:
        if keep is not None:
            ref.lora_dropout["default"] = _MaskDropout(keep, p)
        dt = ref.get_base_layer().weight.dtype
        xr = x.detach().clone().to(dt).requires_grad_(True)
        yr = ref(xr)
        yr.backward(dy.to(yr.dtype))
        refs.append([yr, xr.grad] + [q.grad for q in _trainable(ref).values()])
    names = ["y", "dx"] + [f"d{n}" for n in _trainable(layer)]
    return out, refs, names


SHAPES = [  # (lead dims, K, N, r): 1s, primes, non-multiples of the blocks, a rank above the kernels' chunk
    ((1,), 5, 3, 1),
    ((2, 7), 13, 11, 3),
    ((37,), 19, 33, 16),
    ((5,), 9, 6, 70),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-N{s[2]}-r{s[3]}")
@pytest.mark.parametrize("bias, p", [(True, 0.0), (False, 0.0), (True, 0.3)])
def test_linear_equals_peft_torch(torch_backend, dtype, shape, bias, p):
    lead, K, N, r = shape
    layer = _peft_layer(K, N, r, bias=bias, dropout=p).to(dtype)
    layer.train()
    ref = copy.deepcopy(layer)
    x = torch.randn(*lead, K, dtype=dtype)
    out, (peft_out,), names = _run(layer, x, p, False, [ref])
    atol, rtol = TOL[dtype]
    for a, e, n in zip(out, peft_out, names):
        assert_close(a, e, atol, rtol, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("shape, bias, p", [
    (((2, 7), 13, 11, 3), True, 0.0),
    (((37,), 19, 33, 16), False, 0.3),
    (((5,), 9, 6, 70), True, 0.25),
], ids=["small-bias", "odd-dropout", "rank70-dropout"])
def test_linear_equals_peft_kernels(triton_backend, dtype, shape, bias, p):
    from fastlora.kernels import lora_linear as kernels

    lead, K, N, r = shape
    layer = _peft_layer(K, N, r, bias=bias, dropout=p).to(KDEV)
    layer.train()
    ref64 = copy.deepcopy(layer).double()
    layer = layer.to(dtype)
    peft_same = copy.deepcopy(layer)
    x = torch.randn(*lead, K)
    before = sum(kernels.launch_counts.values())
    out, (r64, rsame), names = _run(layer, x.to(dtype), p, True, [ref64, peft_same])
    assert sum(kernels.launch_counts.values()) > before  # the LoRA kernels ran, not the fallback
    for a, e, t, n in zip(out, r64, rsame, names):
        if dtype == torch.float32:
            assert_close(a, e, 5e-5, 5e-5, n)
        else:
            assert_low_precision_close(a, e, t, 1e-2 if dtype == torch.bfloat16 else 1e-3, n)


def test_fp16_base_with_fp32_adapters_kernels(triton_backend):
    """PEFT's default for a half model: fp32 adapters and magnitude on a fp16 base. The fused op computes in the
    base's dtype (fp32 accumulation), as fastlora's LoRA does, where PEFT runs the adapter branch in fp32: the
    peer of the low-precision rule is PEFT with everything in fp16; dA, dB, dm keep the adapters' fp32."""
    layer = _peft_layer(12, 10, 4, bias=True, dropout=0.2).to(KDEV)
    layer.train()
    ref64 = copy.deepcopy(layer).double()
    peft_half = copy.deepcopy(layer).half()
    layer.get_base_layer().half()
    x = torch.randn(3, 5, 12)
    out, (r64, rhalf), names = _run(layer, x.half(), 0.2, True, [ref64, peft_half])
    assert out[0].dtype == torch.float16 and out[2].dtype == torch.float32
    for a, e, t, n in zip(out, r64, rhalf, names):
        assert_low_precision_close(a, e, t, 1e-3, n)


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "kernels"])
def test_weight_and_bias_gradients_when_they_require_grad(use_triton, triton_backend, p=0.3):
    if not use_triton:
        fastlora.set_backend("torch")
    layer = _peft_layer(11, 7, 3, bias=True, dropout=p).to(_dev(use_triton))
    layer.get_base_layer().weight.requires_grad_(True)
    layer.get_base_layer().bias.requires_grad_(True)
    layer.train()
    ref = copy.deepcopy(layer)
    out, (peft_out,), names = _run(layer, torch.randn(9, 11), p, use_triton, [ref])
    assert "dbase_layer.weight" in names and "dbase_layer.bias" in names
    for a, e, n in zip(out, peft_out, names):
        assert_close(a, e, 5e-5, 5e-5, n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_half_precision_torch_path_follows_the_rule(torch_backend, dtype, p):
    """The PyTorch path in bf16 / fp16 (the CPU's, and any device's with backend "torch") against PEFT in fp64,
    PEFT in the same dtype being the peer of the low-precision rule."""
    layer = _peft_layer(24, 20, 4, bias=True, dropout=p)
    layer.train()
    ref64 = copy.deepcopy(layer).double()
    layer = layer.to(dtype)
    peft_same = copy.deepcopy(layer)
    out, (r64, rsame), names = _run(layer, torch.randn(3, 7, 24).to(dtype), p, False, [ref64, peft_same])
    for a, e, t, n in zip(out, r64, rsame, names):
        assert_low_precision_close(a, e, t, 1e-2 if dtype == torch.bfloat16 else 1e-3, n)


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "kernels"])
def test_eval_and_no_grad_match_peft(use_triton, triton_backend):
    if not use_triton:
        fastlora.set_backend("torch")
    layer = _peft_layer(8, 6, 2, bias=True, dropout=0.5).to(_dev(use_triton))
    layer.eval()  # PEFT: no dropout in eval, base output reused
    x = torch.randn(4, 8, device=_dev(use_triton))
    with torch.no_grad():
        assert_close(dora_fuser.forward(layer, x, ["default"]), layer(x), 1e-6, 1e-6, "eval no_grad")
    out, (peft_out,), names = _run(layer, x, 0.5, use_triton, [copy.deepcopy(layer)])
    for a, e, n in zip(out, peft_out, names):
        assert_close(a, e, 2e-5, 2e-5, n)


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck_fp64(torch_backend, p):
    """Autograd's numerical check for x, magnitude and bias (the norm does not depend on them; A, B and W
    enter it detached, as in PEFT, so they are checked against PEFT's autograd above instead)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(4, 7, dtype=torch.float64, generator=g)
    A = torch.randn(3, 7, dtype=torch.float64, generator=g)
    B = torch.randn(4, 3, dtype=torch.float64, generator=g)
    m = torch.rand(4, dtype=torch.float64, generator=g).add_(0.5).requires_grad_(True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)

    def fn(x, m, b):
        torch.manual_seed(0)  # the same dropout mask on every evaluation
        return fastlora.dora_linear(x, W, A, B, m, b, scaling=0.6, dropout_p=p)

    assert torch.autograd.gradcheck(fn, (x, m, b))


# ---------------------------------------------------------------------------------------------------------
# The norm
# ---------------------------------------------------------------------------------------------------------

def _explicit_norm(W, A, B, s):
    return torch.linalg.norm(W.double() + s * (B.double() @ A.double()), dim=1)


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "kernels"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_norm_from_small_products(use_triton, dtype, triton_backend):
    if use_triton and dtype in (torch.float64, torch.bfloat16):
        pytest.skip("kernels: fp16/fp32 in the interpreter")
    if not use_triton:
        fastlora.set_backend("torch")
    fdora.clear_norm_cache()
    g = torch.Generator().manual_seed(1)
    N, K, r, s = 21, 300, 5, 0.8
    dev = _dev(use_triton)
    W = torch.randn(N, K, generator=g).to(dev, dtype)
    A = (torch.randn(r, K, generator=g) * 0.2).to(dev)
    B = (torch.randn(N, r, generator=g) * 0.2).to(dev)
    # row 0 nearly cancels: W_0 = -s·(B A)_0 up to rounding; the clamp keeps its norm finite and >= 0
    W[0] = (-s * (B[0:1] @ A)).to(dtype)[0]
    got = fastlora.dora_weight_norm(W, A, B, s)
    exp = _explicit_norm(W, A, B, s)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(got).all() and (got >= 0).all()
    # PEFT rounds W + s·B A to the input dtype; ours accumulates in fp32: within a few ulps of fp32
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-4)
    assert_close(got[1:].cpu(), exp[1:].cpu(), tol * float(exp.max()), tol, "norm")
    # cancellation: n² loses eps·‖W_0‖² absolutely, so n_0 is only known to about sqrt(eps)·‖W_0‖
    assert float(got[0]) < 1e-2 * float(exp.max())
    # the transposed view that the Embedding variant passes
    Wt = W.t().contiguous().t()
    assert_close(fastlora.dora_weight_norm(Wt, A, B, s)[1:], got[1:], 1e-6, 1e-6, "strided W")


def test_norm_follows_the_weight(torch_backend):
    """Every change of W is seen: in place, a new storage (.data =), copy_ (load_state_dict), a .data write."""
    fdora.clear_norm_cache()
    W = torch.randn(6, 9)
    A, B = torch.randn(2, 9), torch.randn(6, 2)
    n0 = fastlora.dora_weight_norm(W, A, B, 0.5)
    assert_close(n0, _explicit_norm(W, A, B, 0.5), 1e-5, 1e-5, "first")
    W.mul_(2.0)  # in place: version bump
    assert_close(fastlora.dora_weight_norm(W, A, B, 0.5), _explicit_norm(W, A, B, 0.5), 1e-5, 1e-5, "in place")
    p = nn.Parameter(torch.randn(6, 9), requires_grad=False)
    fastlora.dora_weight_norm(p, A, B, 0.5)
    p.data = torch.randn(6, 9)  # a new storage
    assert_close(fastlora.dora_weight_norm(p, A, B, 0.5), _explicit_norm(p, A, B, 0.5), 1e-5, 1e-5, ".data =")
    with torch.no_grad():
        p.copy_(torch.randn(6, 9))  # what load_state_dict does
    assert_close(fastlora.dora_weight_norm(p, A, B, 0.5), _explicit_norm(p, A, B, 0.5), 1e-5, 1e-5, "copy_")
    p.data.mul_(3.0)  # no version bump: the public norm is never a reused one
    assert_close(fastlora.dora_weight_norm(p, A, B, 0.5), _explicit_norm(p, A, B, 0.5), 1e-5, 1e-5, ".data.mul_")



@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "kernels"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_never_forms_B_at_A(use_triton, p, triton_backend):
    """No tensor of shape (out, in) (or its transpose) is made in the forward or the backward (W frozen)."""
    if not use_triton:
        fastlora.set_backend("torch")
    M, K, N, r = 5, 23, 17, 3
    dev = _dev(use_triton)
    x = torch.randn(M, K, device=dev, requires_grad=True)
    W = torch.randn(N, K, device=dev)
    A = torch.randn(r, K, device=dev, requires_grad=True)
    B = torch.randn(N, r, device=dev, requires_grad=True)
    m = torch.rand(N, device=dev).add_(0.5).requires_grad_(True)
    fdora.clear_norm_cache()
    with AllocatedShapes() as rec:
        y = fastlora.dora_linear(x, W, A, B, m, scaling=0.5, dropout_p=p)
        y.sum().backward()
    assert (N, K) not in rec.shapes and (K, N) not in rec.shapes, sorted(rec.shapes)
    assert (M, N) in rec.shapes  # the recorder saw the op's tensors


# ---------------------------------------------------------------------------------------------------------
# Embedding
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_triton, dtype", [(False, torch.float64), (False, torch.float32),
                                               (True, torch.float32)], ids=["torch64", "torch32", "kernels32"])
def test_embedding_equals_peft(use_triton, dtype, triton_backend):
    if not use_triton:
        fastlora.set_backend("torch")
    layer = _peft_layer(7, 5, 3, target="emb", V=29).to(_dev(use_triton), dtype)
    layer.get_base_layer().padding_idx = 0
    layer.train()
    ref = copy.deepcopy(layer)
    ids = torch.tensor([[0, 3, 28, 3], [1, 2, 5, 0]], device=_dev(use_triton))
    assert dora_fuser.claims(layer, "default") and dora_fuser.why_not(layer, "default") is None
    y = dora_fuser.forward(layer, ids, ["default"])
    yr = ref(ids)
    atol, rtol = TOL[dtype]
    assert_close(y, yr, atol, rtol, "y")
    dy = torch.randn(y.shape, dtype=dtype).to(y.device)
    y.backward(dy)
    yr.backward(dy)
    for (n, q), (_, qr) in zip(_trainable(layer).items(), _trainable(ref).items()):
        assert_close(q.grad, qr.grad, atol, rtol, f"d{n}")


# ---------------------------------------------------------------------------------------------------------
# The fuser's contract
# ---------------------------------------------------------------------------------------------------------

def test_fuser_claims_and_reasons():
    assert registry.fuser_for(_peft_layer(4, 3, 2), "default") is dora_fuser.FUSER
    assert dora_fuser.FUSER.priority == 20
    dora = _peft_layer(4, 3, 2)
    assert dora_fuser.claims(dora, "default") and dora_fuser.why_not(dora, "default") is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = peft.get_peft_model(_Net(4, 3, True), peft.LoraConfig(target_modules=["lin"]))
    assert not dora_fuser.claims(plain.base_model.model.lin, "default")

    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = peft.get_peft_model(ConvNet(), peft.LoraConfig(target_modules=["conv"], use_dora=True))
    conv_layer = conv.base_model.model.conv
    assert dora_fuser.claims(conv_layer, "default")
    assert "Conv" in dora_fuser.why_not(conv_layer, "default")

    custom = _peft_layer(4, 3, 2)
    custom.lora_dropout["default"] = nn.AlphaDropout(0.1)
    assert "AlphaDropout" in dora_fuser.why_not(custom, "default")



def test_two_active_dora_adapters_match_peft(torch_backend):
    layer = _peft_layer(9, 8, 2, bias=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.update_layer("other", r=3, lora_alpha=4, lora_dropout=0.0, init_lora_weights=False,
                           use_rslora=False, use_dora=True,  # peft < 0.19 reads use_dora, newer the config
                           config=peft.LoraConfig(use_dora=True, r=3, init_lora_weights=False))
    layer.set_adapter(["default", "other"])
    layer.train()
    ref = copy.deepcopy(layer)
    x = torch.randn(6, 9)
    assert_close(dora_fuser.forward(layer, x, ["default", "other"]), ref(x), 1e-5, 1e-5, "two adapters")


def test_invalid_arguments_raise_before_any_kernel():
    x, W, A, B, m = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2), torch.rand(5)
    with pytest.raises(ValueError, match="magnitude"):
        fastlora.dora_linear(x, W, A, B, torch.rand(4))
    with pytest.raises(ValueError, match="lora_B"):
        fastlora.dora_linear(x, W, A, torch.randn(5, 3), m)
    with pytest.raises(ValueError, match="dropout_p"):
        fastlora.dora_linear(x, W, A, B, m, dropout_p=1.0)
    with pytest.raises(TypeError, match="dtype"):
        fastlora.dora_linear(x.double(), W, A, B, m)
    with pytest.raises(TypeError, match="magnitude"):
        fastlora.dora_linear(x, W, A, B, torch.ones(5, dtype=torch.int64))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_kernels_write_every_output(triton_backend, p):
    """With NaN-filled allocations every tensor the DoRA kernels hand back is fully written (several row splits
    of the dY pass: M = 150)."""
    from helpers import nan_poisoned_allocations

    g = torch.Generator().manual_seed(3)
    x = torch.randn(150, 12, generator=g).to(KDEV)
    W, b = torch.randn(20, 12, generator=g).to(KDEV), torch.randn(20, generator=g).to(KDEV)
    A, B = (torch.randn(3, 12, generator=g) * 0.3).to(KDEV), (torch.randn(20, 3, generator=g) * 0.3).to(KDEV)
    m = (torch.rand(20, generator=g) + 0.5).to(KDEV)
    results = []
    for poisoned in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (x, A, B, m, b)]
        fdora.clear_norm_cache()
        torch.manual_seed(0)
        with nan_poisoned_allocations() if poisoned else contextlib.nullcontext():
            y = fastlora.dora_linear(leaves[0], W, leaves[1], leaves[2], leaves[3], leaves[4], scaling=0.7,
                                     dropout_p=p)
            y.backward(torch.ones_like(y))
        results.append([y] + [t.grad for t in leaves])
    for clean, poisoned, n in zip(*results, ["y", "dx", "dA", "dB", "dm", "db"]):
        assert_close(poisoned, clean, 1e-6, 1e-6, n)


def test_norm_is_reused_only_while_provably_unchanged(torch_backend):
    """Evaluation / decoding (``reuse``) skip the pass over W while W's storage and version, A's and B's values, the
    scaling and the backend are those of the kept norm; any change is seen, however it was written. Training
    (no ``reuse``) computes it every call."""
    fdora.clear_norm_cache()
    W, A, B = torch.randn(6, 9), torch.randn(2, 9), torch.randn(6, 2)
    calls = []
    real = fdora._norm_impl
    fdora._norm_impl = lambda *a: calls.append(1) or real(*a)
    try:
        n0 = fdora._norm(W, A, B, 0.5, False, True)
        assert fdora._norm(W, A, B, 0.5, False, True) is n0 and len(calls) == 1
        fdora._norm(W, A, B, 0.5, False)  # a training call: computed, nothing reused
        assert len(calls) == 2
        fdora._norm(W, A, B, 0.25, False, True)  # another scaling
        assert len(calls) == 3
        for write in (lambda: B.add_(1.0), lambda: B.data.add_(1.0), lambda: A.data.mul_(1.5),
                      lambda: setattr(A, "data", A.data.clone() * 0.5)):
            write()  # an optimizer step, a fused / 8-bit optimizer (no version bump), a .data swap
            n = fdora._norm(W, A, B, 0.25, False, True)
            assert_close(n, _explicit_norm(W, A, B, 0.25), 1e-5, 1e-5, "after a write")
        assert len(calls) == 7
        fdora._norm(W, A.clone(), B, 0.25, False, True)  # equal values in another tensor: reused
        assert len(calls) == 7
        W.mul_(0.5)  # in place on W: a version bump
        fdora._norm(W, A, B, 0.25, False, True)
        assert len(calls) == 8
        Wp = nn.Parameter(W.clone(), requires_grad=False)
        fdora._norm(Wp, A, B, 0.25, False, True)
        Wp.data = Wp.data * 2.0  # a new storage: never the kept one, whatever its address
        assert_close(fdora._norm(Wp, A, B, 0.25, False, True), _explicit_norm(Wp, A, B, 0.25), 1e-5, 1e-5, "swap")
        assert len(calls) == 10
        Wt = nn.Parameter(W.clone())  # a weight that trains is never reused
        fdora._norm(Wt, A, B, 0.25, False, True)
        fdora._norm(Wt, A, B, 0.25, False, True)
        assert len(calls) == 12
    finally:
        fdora._norm_impl = real


@pytest.mark.parametrize("use_triton, p", [(False, 0.0), (False, 0.3), (True, 0.3)],
                         ids=["torch", "torch-dropout", "kernels-dropout"])
def test_conv1d_fan_in_fan_out_equals_peft(use_triton, p, triton_backend):
    """GPT-2's Conv1D (weight stored (in, out), PEFT's fan_in_fan_out) runs fused on the weight's transpose."""
    from model_helpers import tiny_gpt2

    if not use_triton:
        fastlora.set_backend("torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpt2 = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(target_modules=["c_attn"], use_dora=True, r=3,
                                                                lora_dropout=p, init_lora_weights=False))
    layer = gpt2.base_model.model.transformer.h[0].attn.c_attn.to(_dev(use_triton))
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.3)
    assert layer.fan_in_fan_out
    assert dora_fuser.claims(layer, "default") and dora_fuser.why_not(layer, "default") is None
    layer.train()
    out, (peft_out,), names = _run(layer, torch.randn(2, 5, 16), p, use_triton, [copy.deepcopy(layer)])
    for a, e, n in zip(out, peft_out, names):
        assert_close(a, e, 3e-5, 3e-5, n)


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "kernels"])
def test_compile_fullgraph_equals_eager(use_triton, triton_backend):
    """torch.compile(fullgraph=True) traces the op (torch.library custom ops with fake kernels and a registered
    autograd): outputs and gradients equal eager ones, dropout included (same seed draw)."""
    if not use_triton:
        fastlora.set_backend("torch")
    dev = _dev(use_triton)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.W = nn.Parameter(torch.randn(6, 5, generator=g).to(dev), requires_grad=False)
            self.A = nn.Parameter(torch.randn(2, 5, generator=g).to(dev))
            self.B = nn.Parameter(torch.randn(6, 2, generator=g).to(dev))
            self.m = nn.Parameter((torch.rand(6, generator=g) + 0.5).to(dev))
            self.b = nn.Parameter(torch.randn(6, generator=g).to(dev))

        def forward(self, x):
            return fastlora.dora_linear(x, self.W, self.A, self.B, self.m, self.b, scaling=0.5, dropout_p=0.3)

    net = Net()
    x = torch.randn(3, 4, 5, device=dev)
    results = []
    for fn in (net, torch.compile(net, fullgraph=True, backend="aot_eager")):
        xs = x.clone().requires_grad_(True)
        torch.manual_seed(0)
        y = fn(xs)
        y.backward(torch.ones_like(y))
        results.append([y, xs.grad] + [p.grad.clone() for p in (net.A, net.B, net.m, net.b)])
        for p in net.parameters():
            p.grad = None
    for c, e, n in zip(results[1], results[0], ["y", "dx", "dA", "dB", "dm", "db"]):
        assert_close(c, e, 1e-6, 1e-6, n)
