"""The PyTorch path's dropout mask (``fastlora.reference.dropout_drop_index`` / ``dropout_keep_mask``): PEFT's
distribution (each element kept with probability 1-p, independently), checked statistically; the same mask for
the same seed; and what the op does with it (forward and backward of one call use one mask).

The mask is drawn as geometric gaps between dropped elements, so the checks look where such a sampler goes wrong:
the keep rate (an off-by-one in the gap shifts it by p²-ish amounts), the gap distribution itself (chi-square
against the geometric law), independence of neighbours along a row, across a row boundary and down a column,
and draws that need more than one chunk of gaps."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastlora import reference


def _drops(seed, numel, p):
    return reference.dropout_drop_index(seed, numel, p, "cpu").numpy()


@pytest.mark.parametrize("p", [0.01, 0.05, 0.3, 0.5, 0.9])
def test_keep_rate_is_one_minus_p(p):
    """Over 2²¹ elements the kept fraction's standard error is ≤ 3.5e-4: the band is 6 sigma."""
    n = 1 << 21
    kept = 1.0 - len(_drops(3, n, p)) / n
    tol = 6 * math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < tol, (p, kept)


@pytest.mark.parametrize("p", [0.05, 0.4])
def test_gaps_between_drops_are_geometric(p):
    """The drop positions of independent Bernoulli(p) trials have i.i.d. gaps with P(G = k) = (1-p)^(k-1) p:
    chi-square over the first buckets plus a tail bucket, and the first drop's position follows the same law."""
    drops = _drops(11, 1 << 21, p)
    gaps = np.diff(drops)
    kmax = max(2, int(math.log(0.01) / math.log(1 - p)))  # buckets 1..kmax, then the tail (≥ 1% mass each side)
    expected = np.array([(1 - p) ** (k - 1) * p for k in range(1, kmax + 1)] + [(1 - p) ** kmax]) * len(gaps)
    observed = np.array([np.sum(gaps == k) for k in range(1, kmax + 1)] + [np.sum(gaps > kmax)])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    dof = len(expected) - 1
    assert chi2 < dof + 8 * math.sqrt(2 * dof), (chi2, dof)  # ~5.7 sigma of a chi-square with dof degrees
    firsts = np.array([_drops(s, 1 << 10, p)[0] for s in range(400)])  # G - 1 of the first gap
    assert abs(firsts.mean() - (1 - p) / p) < 6 * math.sqrt((1 - p) / p**2 / len(firsts)), firsts.mean()


@pytest.mark.parametrize("seed", [1, 2024])
def test_neighbours_in_a_row_across_rows_and_in_a_column_are_independent(seed):
    """P(keep[i,j] and keep[i',j']) = (1-p)² for neighbours, with p = 0.5 and 2¹⁷ elements (standard error of a
    joint rate ~0.0014, band ±0.01). Row ends are neighbours of the next row's start in the flat layout: checked
    on their own."""
    M, K, p = 256, 512, 0.5
    keep = reference.dropout_keep_mask(seed, (M, K), p, "cpu").numpy().astype(np.float64)
    expected = (1 - p) ** 2
    for dc in (1, 2, 3):
        joint = (keep[:, :-dc] * keep[:, dc:]).mean()
        assert abs(joint - expected) < 0.01, (dc, joint)
    for dr in (1, 2):
        joint = (keep[:-dr] * keep[dr:]).mean()
        assert abs(joint - expected) < 0.01, (dr, joint)
    wrap = (keep[:-1, -1] * keep[1:, 0]).mean()  # last of row i, first of row i+1
    assert abs(wrap - expected) < 0.07, wrap  # 255 pairs: standard error ~0.027
    other = reference.dropout_keep_mask(seed + 1, (M, K), p, "cpu").numpy().astype(np.float64)
    assert abs((keep * other).mean() - expected) < 0.01
    assert not any(np.array_equal(keep[i], keep[i + 1]) for i in range(M - 1))


def test_same_seed_same_mask_and_layout():
    a = reference.dropout_keep_mask(5, (37, 53), 0.3, "cpu")
    assert a.shape == (37, 53) and a.dtype == torch.bool
    assert torch.equal(a, reference.dropout_keep_mask(5, (37, 53), 0.3, "cpu"))
    assert not torch.equal(a, reference.dropout_keep_mask(6, (37, 53), 0.3, "cpu"))
    drops = reference.dropout_drop_index(5, 37 * 53, 0.3, "cpu")
    assert torch.equal((~a).flatten().nonzero().flatten(), drops)  # row-major flat indices, increasing
    assert reference.dropout_keep_mask(5, (37, 53), 0.3, "cpu", dtype=torch.float32).dtype == torch.float32


def test_degenerate_sizes_and_rates():
    assert reference.dropout_drop_index(1, 0, 0.5, "cpu").numel() == 0
    assert reference.dropout_drop_index(1, 100, 0.0, "cpu").numel() == 0
    assert reference.dropout_keep_mask(1, (0, 7), 0.5, "cpu").shape == (0, 7)
    one = [int(reference.dropout_drop_index(s, 1, 0.5, "cpu").numel()) for s in range(400)]
    assert set(one) == {0, 1} and abs(sum(one) / 400 - 0.5) < 0.1
    tiny = reference.dropout_drop_index(1, 1000, 1e-9, "cpu")
    assert tiny.numel() == 0 and tiny.dtype == torch.int64
    almost_all = reference.dropout_drop_index(2, 10_000, 0.999, "cpu")
    assert 9950 <= almost_all.numel() <= 10_000 and int(almost_all.max()) < 10_000
    # meta tensors (big-model loading) carry shapes only: nothing is drawn, the op still gives its shapes
    assert reference.dropout_keep_mask(1, (4, 6), 0.5, "meta").shape == (4, 6)
    meta = [torch.empty(s, device="meta") for s in ((4, 6), (5, 6), (2, 6), (5, 2))]
    y, h = reference.lora_forward(*meta, None, 1.0, 0.3, 1)
    assert y.shape == (4, 5) and h.shape == (4, 2) and y.device.type == "meta"


def test_a_draw_that_needs_more_than_one_chunk_of_gaps(monkeypatch):
    """The sampler draws gaps in chunks sized for the expected number of drops plus a margin; when a chunk falls
    short it draws more from the same generator, continuing from the last drop. The gaps are one stream whatever
    the chunking, so chunks shrunk to ~1/8 of the need give the very same mask."""
    real_rand = torch.rand
    calls = []

    def short_rand(count, *args, **kwargs):
        calls.append(count)
        assert len(calls) < 100, "the sampler does not advance from chunk to chunk"
        return real_rand(max(1, count // 8), *args, **kwargs)

    monkeypatch.setattr(reference.torch, "rand", short_rand)
    n, p = 1 << 18, 0.2
    drops = reference.dropout_drop_index(4, n, p, "cpu")
    assert len(calls) > 4  # it went round the loop
    assert bool((drops[1:] > drops[:-1]).all()) and int(drops[0]) >= 0 and int(drops[-1]) < n
    assert abs(drops.numel() / n - p) < 6 * math.sqrt(p * (1 - p) / n)
    monkeypatch.setattr(reference.torch, "rand", real_rand)
    assert torch.equal(reference.dropout_drop_index(4, n, p, "cpu"), drops)


def test_forward_and_backward_use_one_mask_and_only_the_dropped_elements_vanish():
    """With the op's seed peeked, the forward's h is (x ⊙ keep) Aᵀ/(1-p) and the backward's dA, dx are the
    oracle's for that same keep mask: a backward that regenerated another mask, or dropped other elements,
    would differ. A single dropped element is enough to tell."""
    import fastlora

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 33, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(21, 33, dtype=torch.float64, generator=g)
    A = torch.randn(4, 33, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(21, 4, dtype=torch.float64, generator=g, requires_grad=True)
    p = 0.02
    torch.manual_seed(9)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    torch.manual_seed(9)
    x_before = x.detach().clone()
    y = fastlora.lora_linear(x, W, A, B, scaling=1.5, dropout_p=p)
    assert torch.equal(x, x_before), "the op wrote into its input"
    keep = reference.dropout_keep_mask(seed, x.shape, p, "cpu")
    assert 0 < int((~keep).sum()) < 60
    y_ref = x @ W.t() + 1.5 * ((x * keep / (1 - p)) @ A.t()) @ B.t()
    gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad(y, (x, A, B), gy)
    want = torch.autograd.grad(y_ref, (x, A, B), gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
