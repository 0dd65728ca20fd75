"""The mixed-adapter LoRA linear (``fastlora.lora_linear_mixed``): both implementations (PyTorch, Triton under the
interpreter) against a row-by-row float64 oracle that shares no code with them, outputs and every gradient, on
odd shapes, mixed ranks from 1, base rows, skewed groups, empty batches, dropout. What every op shares (tensor
scaling, torch.compile, autocast, meta, opcheck, double backward) is tests/test_ops_protocol.py's, through the
op's case in tests/op_cases.py."""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fastlora
from fastlora.mixed import lora_embedding_mixed, lora_linear_mixed, pack_adapters
from fastlora.mixed_reference import MixedTorch, keep_mask, mixed_oracle
from helpers import assert_close, assert_low_precision_close, nan_poisoned_allocations

NEEDS_ALL = (True, True, True, True, True, False, False)


def _inputs(M, K, N, ranks, index, dtype=torch.float32, adapter_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    adt = adapter_dtype or dtype

    def rnd(*shape, scale=1.0, dt=dtype, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dt)

    x = rnd(M, K)
    W = rnd(N, K, scale=K ** -0.5)
    b = rnd(N, shift=3.0)
    As = [rnd(r, K, scale=K ** -0.5, dt=adt) for r in ranks]
    Bs = [rnd(N, r, scale=0.5, dt=adt) for r in ranks]
    s = torch.rand(len(ranks), generator=g) + 0.5
    return x, W, b, As, Bs, torch.as_tensor(index, dtype=torch.int64), s, rnd(M, N)


def _oracle_grads(x, W, b, As, Bs, index, s, keep, grad_y):
    leaves = [t.detach().double().requires_grad_() for t in (x, W, b, *As, *Bs)]
    n = len(As)
    y = mixed_oracle(leaves[0], leaves[1], leaves[2], leaves[3:3 + n], leaves[3 + n:], index, s.tolist(), keep)
    y.backward(grad_y.double())
    zero = [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]
    dA = torch.cat(zero[3:3 + n])
    dB = torch.cat([g.reshape(-1) for g in zero[3 + n:]])
    return y.detach(), [zero[0], zero[1], zero[2], dA, dB]


CASES = {
    # name: (M, K, N, ranks, index)
    "three_adapters_base_rows": (7, 5, 3, [2, 3, 2], [0, 1, -1, 2, 0, 2, 1]),
    # padded tiles: one rank-3 adapter holds most rows (skewed groups)
    "rank_1_and_skewed": (22, 9, 11, [1, 3, 3, 3], [1] * 17 + [0, -1, 2, 3, 1]),
    "all_base_rows": (5, 4, 4, [3], [-1] * 5),
    "empty_batch": (0, 4, 6, [2, 3], []),
    "primes_mixed_ranks": (37, 33, 17, [17, 3, 5, 8], [(i * 7) % 5 - 1 for i in range(37)]),
    "segments_walk": (70, 16, 12, [16, 1, 33], [(i * 5) % 4 - 1 for i in range(70)]),  # M > 64: sorted segments
    "unused_adapter": (9, 6, 5, [2, 4, 3], [0, 2, 0, 2, -1, 0, 2, 2, 0]),
    # the segments walk with an adapter that has no row between two that have (the PEFT layer's adapter bank hands
    # the op every adapter of the layer, used or not)
    "segments_unused_adapter": (70, 12, 10, [4, 8, 2, 5], [[-1, 0, 2, 3][i % 4] for i in range(70)]),
    # rows already grouped by adapter (a server's batch): each rank class is one block of x and y, no gather
    "grouped_rows": (9, 7, 5, [2, 2, 3], [-1, 0, 0, 0, 1, 1, 1, 2, 2]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dropout", [False, True])
def test_torch_implementation_matches_the_oracle(case, dropout):
    M, K, N, ranks, index = CASES[case]
    x, W, b, As, Bs, idx, s, gy = _inputs(M, K, N, ranks, index, dtype=torch.float64)
    ps = [0.3 * (a % 2) + 0.1 for a in range(len(ranks))] if dropout else [0.0] * len(ranks)
    A, B, _ = pack_adapters(As, Bs)
    y, (h,) = MixedTorch.forward(x, W, b, A, B, idx, s, ranks, ps, seed=11, save=True)
    keep = keep_mask(11, idx, K, ps, "cpu")
    y64, expected = _oracle_grads(x, W, b, As, Bs, idx, s, keep, gy)
    assert_close(y, y64, 1e-12, 1e-12, "y")
    grads = MixedTorch.backward(gy, x, W, b, A, B, idx, s, h, ranks, ps, seed=11, needs=NEEDS_ALL)
    for name, g, e in zip(("dx", "dW", "dbias", "dA", "dB"), grads, expected):
        assert_close(g, e, 1e-11, 1e-11, name)


def test_each_adapter_draws_its_own_dropout_mask():
    """Rows of an adapter with p = 0 are never dropped; rows of the others drop at their own rate."""
    idx = torch.tensor([0, 1, 2] * 400)
    keep = keep_mask(5, idx, 50, [0.0, 0.2, 0.6], "cpu")
    dropped = [(keep[idx == a] == 0).float().mean().item() for a in range(3)]
    assert dropped[0] == 0.0
    assert abs(dropped[1] - 0.2) < 0.01 and abs(dropped[2] - 0.6) < 0.01
    assert torch.equal(keep, keep_mask(5, idx, 50, [0.0, 0.2, 0.6], "cpu"))  # regenerated, bit for bit
    assert not torch.equal(keep, keep_mask(6, idx, 50, [0.0, 0.2, 0.6], "cpu"))


def test_cpu_path_runs_one_bmm_pair_per_rank_not_per_adapter():
    """64 adapters of one rank and 8 of another, rows spread over them: two shrink and two expand batched GEMMs,
    no per-adapter loop."""
    ranks = [4] * 64 + [2] * 8
    M = 2 * len(ranks)
    x, W, b, As, Bs, idx, s, _ = _inputs(M, 8, 8, ranks, [i % len(ranks) for i in range(M)])

    class Count(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = {}

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", str(func))
            self.calls[name] = self.calls.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    A, B, _ = pack_adapters(As, Bs)
    with Count() as count:
        MixedTorch.forward(x, W, b, A, B, idx, s, ranks, [0.0] * len(ranks), seed=0, save=False)
    batched = sum(count.calls.get(name, 0) for name in ("bmm", "baddbmm", "baddbmm_"))
    assert batched == 4, count.calls


# --------------------------------------------------------------------------------------------------------------
# The public function (validation, per-row / per-sample index, both backends)
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lora_linear_mixed_forward_backward(backend, monkeypatch):
    monkeypatch.setattr(fastlora.backend, "_backend", backend)
    x, W, b, As, Bs, _, s, _ = _inputs(2 * 6, 10, 7, [3, 1, 5], [0] * 12)
    x = x.view(2, 6, 10).requires_grad_()
    As = [a.requires_grad_() for a in As]
    Bs = [q.requires_grad_() for q in Bs]
    per_sample = torch.tensor([2, -1])
    y = lora_linear_mixed(x, W, As, Bs, per_sample, b, scalings=s.tolist())
    row_idx = per_sample[:, None].expand(2, 6).reshape(-1)
    expected = mixed_oracle(x.detach().view(12, 10), W, b, As, Bs, row_idx, s.tolist()).view(2, 6, 7)
    assert_close(y, expected, 2e-5, 2e-5, "y")
    y.sum().backward()
    # no row of adapters 0 and 1: zero gradients (what a run on none of the rows gives)
    assert float(As[0].grad.abs().sum()) == 0.0 and float(Bs[1].grad.abs().sum()) == 0.0
    assert As[2].grad is not None and float(As[2].grad.abs().sum()) > 0
    per_row = lora_linear_mixed(x, W, As, Bs, row_idx.view(2, 6), b, scalings=s.tolist())
    assert_close(per_row, y, 0, 0, "per-row index")


def test_validation_errors_name_the_problem():
    x, W, b, As, Bs, idx, s, _ = _inputs(4, 6, 5, [2, 3], [0, 1, 1, -1])
    with pytest.raises(ValueError, match=r"values must be in \[-1, 2\)"):
        lora_linear_mixed(x, W, As, Bs, torch.tensor([0, 2, 1, 1]), b, scalings=[1.0, 1.0])
    with pytest.raises(ValueError, match="rank mismatch"):
        lora_linear_mixed(x, W, As, [Bs[1], Bs[0]], idx, b, scalings=[1.0, 1.0])
    with pytest.raises(ValueError, match="one adapter per row"):
        lora_linear_mixed(x, W, As, Bs, torch.tensor([0, 1]), b, scalings=[1.0, 1.0])
    with pytest.raises(TypeError, match="integer tensor"):
        lora_linear_mixed(x, W, As, Bs, idx.float(), b, scalings=[1.0, 1.0])
    with pytest.raises(ValueError, match="as many"):
        lora_linear_mixed(x, W, As, Bs, idx, b, scalings=[1.0])
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear_mixed(x, W, As, Bs, idx, b, scalings=[1.0, 1.0], dropout_ps=[0.1, 1.0])
    with pytest.raises(ValueError, match=r"must be \(r, 6\)"):
        lora_linear_mixed(x, W, [As[0][:, :5], As[1]], Bs, idx, b, scalings=[1.0, 1.0])
    with pytest.raises(TypeError, match="weight dtype"):
        lora_linear_mixed(x, W.double(), As, Bs, idx, None, scalings=[1.0, 1.0])


def test_gradcheck_with_dropout_and_double_backward():
    x, W, b, As, Bs, idx, s, _ = _inputs(9, 5, 4, [2, 1, 3], [0, 1, 2, -1, 2, 0, 1, 1, 2], dtype=torch.float64)
    leaves = [x.requires_grad_(), *[a.requires_grad_() for a in As], *[q.requires_grad_() for q in Bs]]

    def fn(x, *ab):
        torch.manual_seed(3)  # the same dropout seed for every evaluation
        return lora_linear_mixed(x, W, list(ab[:3]), list(ab[3:]), idx, b, scalings=s.tolist(),
                                 dropout_ps=[0.3, 0.0, 0.5])

    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


def test_embedding_mixed_matches_the_oracle_and_trains_each_adapter_on_its_tokens():
    g = torch.Generator().manual_seed(0)
    V, D, ranks = 11, 6, [2, 4]
    weight = torch.randn(V, D, generator=g, dtype=torch.float64)
    As = [torch.randn(r, V, generator=g, dtype=torch.float64).requires_grad_() for r in ranks]
    Bs = [torch.randn(D, r, generator=g, dtype=torch.float64).requires_grad_() for r in ranks]
    ids = torch.randint(0, V, (3, 5), generator=g)
    sample = torch.tensor([1, -1, 0])
    y = lora_embedding_mixed(ids, weight, As, Bs, sample, scalings=[0.5, 2.0], padding_idx=3)
    expected = []
    for i, a in enumerate(sample.tolist()):
        row = weight[ids[i]].clone()
        if a >= 0:
            row = row + As[a].t()[ids[i]] @ Bs[a].t() * [0.5, 2.0][a]  # padding_idx acts on gradients only
        expected.append(row)
    assert_close(y, torch.stack(expected), 1e-12, 1e-12, "embedding")
    assert torch.autograd.gradcheck(
        lambda *ab: lora_embedding_mixed(ids, weight, list(ab[:2]), list(ab[2:]), sample, scalings=[0.5, 2.0]),
        (*As, *Bs))


# --------------------------------------------------------------------------------------------------------------
# The Triton kernels (interpreter on CPU)
# --------------------------------------------------------------------------------------------------------------

def _triton_keep(seed, idx, K, ps):
    from fastlora.mixed import _triton_keep as keep

    return keep(seed, idx, K, ps)


KERNEL_CASES = ["three_adapters_base_rows", "rank_1_and_skewed", "primes_mixed_ranks", "segments_walk",
                "empty_batch", "all_base_rows", "grouped_rows", "unused_adapter", "segments_unused_adapter"]


@pytest.mark.parametrize("case", KERNEL_CASES)
@pytest.mark.parametrize("dtypes", [(torch.float32, None), (torch.float16, None), (torch.float16, torch.float32)],
                         ids=["fp32", "fp16", "fp16-fp32-adapters"])
def test_triton_kernels_match_the_oracle(case, dtypes, monkeypatch):
    _check_triton(case, dtypes, "triton", monkeypatch)


@pytest.mark.parametrize("dtypes", [(torch.float32, None), (torch.float16, torch.float32)],
                         ids=["fp32", "fp16-fp32-adapters"])
def test_triton_cublas_composition_matches_the_oracle(dtypes, monkeypatch):
    """On the segments walk the forward is the fused segment GEMM or cuBLAS over the segment expand (measured
    choice on a GPU); both are checked."""
    _check_triton("segments_walk", dtypes, "cublas", monkeypatch)


def _check_triton(case, dtypes, composition, monkeypatch):
    from fastlora.kernels.mixed import MixedTriton

    monkeypatch.setenv("FASTLORA_BASE_GEMM", composition)
    M, K, N, ranks, index = CASES[case]
    dt, adt = dtypes
    x, W, b, As, Bs, idx, s, gy = _inputs(M, K, N, ranks, index, dtype=dt, adapter_dtype=adt)
    ps = [0.25 if a % 2 == 0 else 0.0 for a in range(len(ranks))]
    A, B, _ = pack_adapters(As, Bs)
    with nan_poisoned_allocations():
        y, (h,) = MixedTriton.forward(x, W, b, A, B, idx, s, ranks, ps, seed=7, save=True)
        grads = MixedTriton.backward(gy, x, W, b, A, B, idx, s, h, ranks, ps, seed=7, needs=NEEDS_ALL)
    keep = _triton_keep(7, idx, K, ps)
    y64, expected = _oracle_grads(x, W, b, As, Bs, idx, s, keep, gy)
    if dt == torch.float32:
        assert_close(y, y64, 2e-5, 2e-5, "y")
        for name, g, e in zip(("dx", "dW", "dbias", "dA", "dB"), grads, expected):
            assert_close(g, e, 5e-5, 5e-5, name)
        return
    # fp16: the low-precision rule against PyTorch's own result in the same dtypes
    assert_low_precision_close(y, y64, _with_keep(x, W, b, As, Bs, idx, s, keep, dt), 1e-2, "y")
    for name, g, e in zip(("dx", "dA", "dB"), (grads[0], grads[3], grads[4]), (expected[0], *expected[3:])):
        assert_close(g.float(), e.float(), 3e-2, 3e-2, name)


def _with_keep(x, W, b, As, Bs, idx, s, keep, dt):
    """PyTorch's result in the input dtype with the same mask: the low-precision rule's yardstick."""
    return mixed_oracle(x, W, b, As, Bs, idx, s.tolist(), keep, dtype=dt)


def test_triton_kernels_launch_both_walks(monkeypatch):
    """Decode-sized batches take the per-row kernels, larger ones the sorted segments."""
    from fastlora.kernels import mixed as km

    monkeypatch.setattr(fastlora.backend, "_backend", "triton")
    km.launch_counts.clear()
    for M in (5, 70):
        x, W, b, As, Bs, idx, s, _ = _inputs(M, 8, 8, [2, 3], [i % 3 - 1 for i in range(M)])
        As = [a.requires_grad_() for a in As]
        lora_linear_mixed(x.requires_grad_(), W, As, Bs, idx, b, scalings=s.tolist()).sum().backward()
    counts = dict(km.launch_counts)
    assert counts["mixed_shrink_rows"] >= 2 and counts["mixed_expand_rows"] >= 2
    assert counts["mixed_shrink"] >= 2 and counts["mixed_grad"] >= 2
    assert counts.get("mixed_gemm", 0) + counts.get("mixed_expand", 0) >= 2


@pytest.mark.parametrize("M", [5, 70], ids=["rows_walk", "segments_walk"])
def test_triton_kernels_take_a_transposed_weight(M):
    """GPT-2's Conv1D hands the op its weight transposed, by strides: the kernels read it as it is."""
    from fastlora.kernels.mixed import MixedTriton

    x, W, b, As, Bs, idx, s, gy = _inputs(M, 24, 20, [3, 5], [(i * 3) % 3 - 1 for i in range(M)])
    Wt = W.t().contiguous().t()  # (N, K) with strides (1, N)
    A, B, ranks = pack_adapters(As, Bs)
    y, (h,) = MixedTriton.forward(x, Wt, b, A, B, idx, s, ranks, [0.0, 0.0], seed=0, save=True)
    dx = MixedTriton.backward(gy, x, Wt, b, A, B, idx, s, h, ranks, [0.0, 0.0], seed=0, needs=NEEDS_ALL)[0]
    y64, expected = _oracle_grads(x, W, b, As, Bs, idx, s, None, gy)
    assert_close(y, y64, 2e-5, 2e-5, "y")
    assert_close(dx, expected[0], 5e-5, 5e-5, "dx")
