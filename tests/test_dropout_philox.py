"""The kernels' dropout mask against an independent Philox-4x32 (tests/philox_reference.py), bit for bit, and
statistical checks that neighbouring columns and rows are independent.

The reference imports nothing from ``kernels/``; it is pinned down by Random123's published known answers. A mask
that agrees with it bit for bit on many (seed, row, column) triples has the documented counter layout; the
independence checks say the layout is a good one (each element its own word), with fixed seeds and enough samples
that a broken layout (a word reused across a quad, rows sharing a counter) fails every time, not by chance.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import philox_reference as ref

kernels = pytest.importorskip("fastlora.kernels.lora_linear")
from fastlora.kernels.dropout import dropout_keep_mask  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _mask(seed, shape, p):
    return dropout_keep_mask(seed, shape, p, DEVICE).cpu().numpy()


@pytest.mark.parametrize("rounds,counter,key,expected", ref.KNOWN_ANSWERS)
def test_reference_philox_matches_random123_known_answers(rounds, counter, key, expected):
    assert ref.philox4x32_scalar(counter, key, rounds) == expected
    vec = ref.philox4x32(*counter, *key, rounds=rounds)
    assert tuple(int(v) for v in vec) == expected


@pytest.mark.parametrize("seed,shape,p", [
    (0, (37, 53), 0.3),
    (123, (67, 301), 0.3),
    (2**31 - 2, (40, 130), 0.5),  # the largest seed autograd draws
    (2**33 + 5, (9, 70), 0.1),  # a seed past 2³²: the key's high word is used too
    (77, (130, 64), 0.9),
])
def test_kernel_mask_equals_reference_bit_for_bit(seed, shape, p):
    got = _mask(seed, shape, p)
    want = ref.keep_mask(seed, shape, p)
    bad = np.argwhere(got != want)
    assert bad.size == 0, f"{len(bad)} of {got.size} keep bits differ, first at (row, col) {tuple(bad[0])}"


def test_chosen_triples_far_from_the_origin():
    """Rows and columns past a tile, far from it and at a quad's every phase: the pure-Python scalar generator."""
    seed, p = 987654321, 0.4
    pairs = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (31, 63), (32, 64), (33, 66), (1000, 5), (5, 1001)]
    M = max(r for r, _ in pairs) + 1
    K = max(c for _, c in pairs) + 1
    expected = ref.keep_bits(seed, pairs, p)
    # materialize only the rows/columns needed: a (1, K) and an (M, 8) slab
    row0 = _mask(seed, (34, 67), p)
    tall = _mask(seed, (M, 8), p)
    wide = _mask(seed, (6, K), p)
    for (r, c), want in zip(pairs, expected):
        got = row0[r, c] if r < 34 and c < 67 else (tall[r, c] if c < 8 else wide[r, c])
        assert bool(got) == want, (r, c)


def test_threshold_boundary_is_inclusive():
    """An element whose word equals the threshold exactly is kept (word >= round(p·2³²)): p chosen from the
    reference's word for one element, so an off-by-one comparison or threshold flips that one bit."""
    seed, rows, cols = 4242, 8, 16
    words = ref.words(seed, np.arange(rows)[:, None], np.arange(cols)[None, :])
    for (r, c) in [(3, 5), (6, 14)]:
        w = int(words[r, c])
        p = w / 2.0**32
        assert ref.threshold(p) == w
        got = _mask(seed, (rows, cols), p)
        assert got[r, c], f"the element whose word equals the threshold was dropped at {(r, c)}"
        assert np.array_equal(got, words >= np.uint32(w))


def test_keep_rate_per_column_phase_and_row():
    M, K, p = 256, 256, 0.3
    mask = _mask(11, (M, K), p)
    n = mask.size
    tol = 6 * np.sqrt(p * (1 - p) / n)
    assert abs(mask.mean() - (1 - p)) < tol
    for phase in range(4):
        assert abs(mask[:, phase::4].mean() - (1 - p)) < 4 * tol, phase


@pytest.mark.parametrize("seed", [1, 2024])
def test_neighbouring_columns_and_rows_are_independent(seed):
    """P(keep[i,j] and keep[i',j']) = (1-p)² for neighbours in a row (the same quad, or across quads) and in a
    column. With p = 0.5 and 2¹⁷ elements, the standard error of each joint rate is ~0.0014; the band is ±0.01
    (7 sigma). A word reused across a quad gives 0.5 instead of 0.25, rows sharing a counter 0.5 too."""
    M, K, p = 256, 512, 0.5
    mask = _mask(seed, (M, K), p).astype(np.float64)
    expected = (1 - p) ** 2
    for dc in (1, 2, 3, 4):
        joint = (mask[:, :-dc] * mask[:, dc:]).mean()
        assert abs(joint - expected) < 0.01, f"columns j, j+{dc}: joint keep rate {joint:.4f}, expected {expected}"
        for phase in range(4):  # within a quad and across quad boundaries separately
            a = mask[:, phase:K - dc:4]
            b = mask[:, phase + dc::4][:, :a.shape[1]]
            joint = (a * b).mean()
            assert abs(joint - expected) < 0.02, (dc, phase, joint)
    for dr in (1, 2):
        joint = (mask[:-dr] * mask[dr:]).mean()
        assert abs(joint - expected) < 0.01, f"rows i, i+{dr}: joint keep rate {joint:.4f}, expected {expected}"
    # a different seed gives an independent mask
    other = _mask(seed + 1, (M, K), p).astype(np.float64)
    assert abs((mask * other).mean() - expected) < 0.01
    # correlation of whole rows / columns: no row equals its neighbour, no column its neighbour
    assert not any(np.array_equal(mask[i], mask[i + 1]) for i in range(M - 1))
    assert not any(np.array_equal(mask[:, j], mask[:, j + 1]) for j in range(K - 1))


def test_dropout_p_zero_keeps_everything():
    assert _mask(5, (3, 7), 0.0).all()
    assert ref.keep_mask(5, (3, 7), 0.0).all()
