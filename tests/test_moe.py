"""The grouped LoRA op on expert weights (``fastlora.lora_experts``): outputs and every gradient against an
oracle that forms each expert's merged weight ``W_e + s·B_e A_e`` and runs token by token (no code shared with
the op), on both backends (the Triton kernels through the interpreter on CPU), odd shapes, ranks 0 to 130,
empty experts, one-token experts, rows past the last offset, transposed stacks, fp16/bf16 by the low-precision
rule; gradcheck in float64; the errors of bad input."""
from __future__ import annotations

import pytest
import torch

import fastlora
from fastlora import moe_reference
from helpers import assert_close, assert_low_precision_close, nan_poisoned_allocations

SHAPES = [  # (counts per expert, in, out, r)
    ([3, 0, 5], 7, 5, 3),           # an empty expert in the middle
    ([1, 1, 1, 1], 16, 9, 1),       # one token each, r = 1
    ([0, 0, 4], 5, 3, 2),           # leading empty experts
    ([17, 2, 0, 13, 1], 33, 19, 16),  # non-multiples of the blocks
    ([0], 4, 6, 2),                 # no rows at all
    ([5, 0, 9, 2], 16, 8, 4),       # 16-byte aligned rows: dA / dB through torch's grouped_mm on the CPU path
]


def _problem(counts, K, N, r, dtype=torch.float32, adapter_dtype=None, bias=True, transposed=False, seed=0,
             extra_rows=0):
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype
    E = len(counts)
    S = sum(counts) + extra_rows
    x = torch.randn(S, K, generator=g).to(dtype).requires_grad_()
    if transposed:  # stored (E, in, out) as GPT-OSS keeps it; the op gets the (E, out, in) view
        W = (torch.randn(E, K, N, generator=g) * 0.3).to(dtype).transpose(1, 2)
    else:
        W = (torch.randn(E, N, K, generator=g) * 0.3).to(dtype)
    A = (torch.randn(E, r, K, generator=g) * 0.3).to(adapter_dtype).requires_grad_()
    B = (torch.randn(E, N, r, generator=g) * 0.3).to(adapter_dtype).requires_grad_()
    b = (torch.randn(E, N, generator=g)).to(dtype).requires_grad_() if bias else None
    offsets = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)
    return x, W, A, B, b, offsets


def oracle(x, W, A, B, b, offsets, s):
    """Token by token with each expert's merged weight W_e + s·B_e A_e, in float64."""
    x, W, A, B = (t.double() for t in (x, W, A, B))
    rows = []
    owner = torch.searchsorted(offsets.long(), torch.arange(x.shape[0]), right=True)
    for i in range(x.shape[0]):
        e = int(owner[i])
        if e >= W.shape[0]:
            rows.append(torch.zeros(W.shape[1], dtype=torch.float64))
            continue
        merged = W[e] + s * torch.einsum("nr,rk->nk", B[e], A[e])
        rows.append(merged @ x[i] + (0 if b is None else b[e].double()))
    if not rows:  # kept on the graph of every input, so that their gradients are zeros, not missing
        return x.new_zeros(0, W.shape[1]) + 0 * (x.sum() + A.sum() + B.sum() + (0 if b is None else b.sum()))
    return torch.stack(rows)


@pytest.mark.parametrize("counts,K,N,r", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_matches_merged_weight_oracle(backend, counts, K, N, r, bias, transposed):
    x, W, A, B, b, offsets = _problem(counts, K, N, r, bias=bias, transposed=transposed)
    with nan_poisoned_allocations():
        y = fastlora.lora_experts(x, W, A, B, offsets, b, scaling=0.7)
    xd, Ad, Bd = (t.detach().double().requires_grad_() for t in (x, A, B))
    bd = None if b is None else b.detach().double().requires_grad_()
    ref = oracle(xd, W, Ad, Bd, bd, offsets, 0.7)
    assert_close(y, ref, 1e-5, 1e-5, "y")
    dy = torch.randn_like(ref)
    got = torch.autograd.grad(y, [t for t in (x, A, B, b) if t is not None], dy.float())
    want = torch.autograd.grad(ref, [t for t in (xd, Ad, Bd, bd) if t is not None], dy)
    for name, g, w in zip(("dx", "dA", "dB", "db"), got, want):
        assert_close(g, w, 1e-5, 1e-5, name)


def test_rank_zero_is_a_plain_grouped_linear_and_weight_grad(backend):
    """r = 0 (a projection without LoRA) and dW when the stack requires grad (never otherwise)."""
    x, W, A, B, b, offsets = _problem([2, 0, 3], 6, 4, 0)
    W.requires_grad_()
    y = fastlora.lora_experts(x, W, A, B, offsets, b, scaling=2.0)
    ref = oracle(x, W, A, B, b, offsets, 2.0)
    assert_close(y, ref, 1e-5, 1e-5, "y")
    dy = torch.randn_like(y)
    dW, db = torch.autograd.grad(y, [W, b], dy)
    want, want_b = torch.zeros_like(W), torch.zeros_like(b)
    for e, (a, z) in enumerate([(0, 2), (2, 2), (2, 5)]):
        want[e] = dy[a:z].t() @ x[a:z]
        want_b[e] = dy[a:z].sum(0)
    assert_close(dW, want, 1e-5, 1e-5, "dW")
    assert_close(db, want_b, 1e-5, 1e-5, "db")


@pytest.mark.parametrize("r", [130])
def test_rank_above_one_chunk(backend, r):
    """Ranks above the kernels' 128-wide rank block run in chunks."""
    x, W, A, B, b, offsets = _problem([3, 2], 8, 5, r)
    y = fastlora.lora_experts(x, W, A, B, offsets, b, scaling=0.1)
    assert_close(y, oracle(x, W, A, B, b, offsets, 0.1), 1e-5, 1e-5, "y")
    dA, dB = torch.autograd.grad(y.square().sum(), [A, B])
    xd, Ad, Bd = (t.detach().double().requires_grad_() for t in (x, A, B))
    wA, wB = torch.autograd.grad(oracle(xd, W, Ad, Bd, b, offsets, 0.1).square().sum(), [Ad, Bd])
    assert_close(dA, wA, 1e-4, 1e-5, "dA")
    assert_close(dB, wB, 1e-4, 1e-5, "dB")


def test_rows_past_the_last_offset_are_zero(backend):
    x, W, A, B, b, offsets = _problem([2, 3], 5, 4, 2, extra_rows=3)
    with nan_poisoned_allocations():
        y = fastlora.lora_experts(x, W, A, B, offsets, b, scaling=1.0)
    assert bool((y[5:] == 0).all())
    dx, = torch.autograd.grad(y, [x], torch.ones_like(y))
    assert bool((dx[5:] == 0).all())
    assert_close(y[:5], oracle(x[:5], W, A, B, b, offsets, 1.0), 1e-5, 1e-5, "y")


def test_only_adapters_train(backend):
    """x frozen, A and B trained (the first layer's input): dA without dx."""
    x, W, A, B, b, offsets = _problem([4, 1, 0, 2], 9, 6, 3, bias=False)
    x = x.detach()
    y = fastlora.lora_experts(x, W, A, B, offsets, scaling=0.5)
    dA, dB = torch.autograd.grad(y.sin().sum(), [A, B])
    Ad, Bd = (t.detach().double().requires_grad_() for t in (A, B))
    wA, wB = torch.autograd.grad(oracle(x, W, Ad, Bd, None, offsets, 0.5).sin().sum(), [Ad, Bd])
    assert_close(dA, wA, 1e-5, 1e-5, "dA")
    assert_close(dB, wB, 1e-5, 1e-5, "dB")


def test_tensor_scaling_gets_no_host_read(backend):
    x, W, A, B, b, offsets = _problem([3, 4], 6, 5, 2)
    s = torch.tensor(0.25)
    y = fastlora.lora_experts(x, W, A, B, offsets, b, scaling=s)
    assert_close(y, oracle(x, W, A, B, b, offsets, 0.25), 1e-5, 1e-5, "y")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("adapter_dtype", ["same", torch.float32])
def test_half_precision_by_the_low_precision_rule(dtype, adapter_dtype, torch_backend):
    """fp16/bf16 inputs, adapters in the same dtype or fp32 (PEFT's default): within twice the error of plain
    PyTorch in that dtype (the merged-weight formula) of the float64 result."""
    adapter_dtype = dtype if adapter_dtype == "same" else adapter_dtype
    x, W, A, B, b, offsets = _problem([5, 0, 7, 1], 24, 16, 4, dtype=dtype, adapter_dtype=adapter_dtype)
    y = fastlora.lora_experts(x, W, A, B, offsets, b, scaling=2.0)
    ref = oracle(x, W, A, B, b, offsets, 2.0)
    same = torch.cat([
        (x[a:z] @ (W[e] + 2.0 * B[e].to(dtype) @ A[e].to(dtype)).t() + b[e])
        for e, (a, z) in enumerate([(0, 5), (5, 5), (5, 12), (12, 13)])])
    assert y.dtype == dtype
    assert_low_precision_close(y, ref, same, 1e-3, "y")


def test_fp16_kernels_against_the_fp32_path(triton_backend):
    """The kernels in fp16 (the interpreter runs fp16, not bf16), fp32 adapters on the fp16 stack."""
    x, W, A, B, b, offsets = _problem([6, 0, 3], 32, 16, 5, dtype=torch.float16, adapter_dtype=torch.float32)
    y = fastlora.lora_experts(x, W, A, B, offsets, b, scaling=1.5)
    dx, dA, dB = torch.autograd.grad(y.float().square().sum(), [x, A, B])
    fastlora.set_backend("torch")
    y2 = fastlora.lora_experts(x, W, A, B, offsets, b, scaling=1.5)
    dx2, dA2, dB2 = torch.autograd.grad(y2.float().square().sum(), [x, A, B])
    assert_close(y, y2, 2e-2, 2e-3, "y")
    assert_close(dx, dx2, 5e-2, 5e-3, "dx")
    assert_close(dA, dA2, 5e-2, 5e-3, "dA")
    assert_close(dB, dB2, 5e-2, 5e-3, "dB")


def test_gradcheck_float64(torch_backend):
    x, W, A, B, b, offsets = _problem([2, 0, 3], 4, 3, 2, dtype=torch.float64)
    W = W.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, W, A, B, b: fastlora.lora_experts(x, W, A, B, offsets, b, scaling=0.6), (x, W, A, B, b))


def test_reference_spans_skip_empty_experts():
    assert list(moe_reference.spans(torch.tensor([0, 2, 2, 5]))) == [(1, 0, 2), (3, 2, 5)]


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(offsets=a["offsets"].float()), "offsets must be int32 or int64"),
    (lambda a: a.update(lora_A=a["lora_A"][:, :, :-1]), "shapes disagree"),
    (lambda a: a.update(lora_B=a["lora_B"].transpose(1, 2)), "shapes disagree"),
    (lambda a: a.update(offsets=a["offsets"][:-1]), "shapes disagree"),
    (lambda a: a.update(bias=a["bias"][:, :-1]), "shapes disagree"),
    (lambda a: a.update(input=a["input"][None]), "expected input"),
    (lambda a: a.update(weight=a["weight"].double()), "input is torch.float32 but weight is torch.float64"),
    (lambda a: a.update(lora_B=a["lora_B"].double()), "lora_A is torch.float32 but lora_B"),
    (lambda a: a.update(offsets=torch.tensor([3, 2, 5], dtype=torch.int32)), "non-decreasing"),
    (lambda a: a.update(offsets=torch.tensor([3, 3, 9], dtype=torch.int32)), "at most"),
    (lambda a: a.update(scaling=float("nan")), "finite"),
])
def test_bad_input_is_named(change, match):
    x, W, A, B, b, offsets = _problem([3, 0, 5], 7, 5, 3)
    args = dict(input=x, weight=W, lora_A=A, lora_B=B, offsets=offsets, bias=b, scaling=1.0)
    change(args)
    with pytest.raises((ValueError, TypeError), match=match):
        fastlora.lora_experts(**args)


@pytest.mark.parametrize("counts,K,N,r", [([5, 0, 9, 2], 16, 8, 4), ([3, 6], 12, 20, 40), ([0, 0, 7], 8, 4, 0)])
def test_grouped_mm_composition(triton_backend, monkeypatch, counts, K, N, r):
    """FASTLORA_MOE_PATH=grouped_mm: the base GEMM by torch's grouped_mm, the rank terms and the bias added in place
    by the kernels (the GEMM launched with K = 0), rows past the last offset zeroed: the same values and gradients,
    and grouped_mm really ran (forward and dx)."""
    monkeypatch.setenv("FASTLORA_MOE_PATH", "grouped_mm")
    calls = []
    real = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, W, A, B, b, offsets = _problem(counts, K, N, r, extra_rows=4)
    with nan_poisoned_allocations():
        y = fastlora.lora_experts(x, W, A, B, offsets, b, scaling=0.6)
    xd, Ad, Bd, bd = (t.detach().double().requires_grad_() for t in (x, A, B, b))
    ref = oracle(xd, W, Ad, Bd, bd, offsets, 0.6)
    assert_close(y, ref, 1e-5, 1e-5, "y")
    dy = torch.randn_like(ref)
    for name, g, w in zip(("dx", "dA", "dB", "db"), torch.autograd.grad(y, [x, A, B, b], dy.float()),
                          torch.autograd.grad(ref, [xd, Ad, Bd, bd], dy)):
        assert_close(g, w, 1e-5, 1e-5, name)
    assert len(calls) >= 2


def test_paths_default_to_the_fused_kernel_where_nothing_is_timed(triton_backend, monkeypatch):
    """Off CUDA nothing is timed: the fused kernel runs (what the interpreter tests), grouped_mm does not."""
    monkeypatch.delenv("FASTLORA_MOE_PATH", raising=False)
    calls = []
    real = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, W, A, B, b, offsets = _problem([5, 0, 9, 2], 16, 8, 4)
    fastlora.lora_experts(x, W, A, B, offsets, b, scaling=0.6).sum().backward()
    assert not calls
