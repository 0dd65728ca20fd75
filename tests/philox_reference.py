"""An independent Philox-4x32 and the dropout keep mask the kernels must produce, in NumPy.

Written from the published algorithm (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3",
SC'11, and the Random123 sources), NOT from Triton's ``tl.philox`` and without importing anything from
``kernels/``: the tests compare the kernels' masks against this, so a bug in the kernels' generator cannot hide
behind a test that asks the same generator what it should have produced. ``KNOWN_ANSWERS`` are Random123's
published test vectors (``kat_vectors``), which pin this implementation down on its own.

The layout it reproduces is the one ``kernels/dropout.py`` documents:

* key = (seed mod 2³², seed // 2³²), counter = (column // 4, row, 0, 0), ``ROUNDS`` rounds;
* one call gives four 32-bit words (w0, w1, w2, w3) for the quad of columns 4q .. 4q+3. The kernel joins them as
  ``reshape(join(join(w0, w1), join(w2, w3)))``, and ``tl.join`` stacks along a new LAST axis, so the quad's
  columns take the words in the order (w0, w2, w1, w3);
* an element is kept when its word >= threshold = min(round(p · 2³²), 2³² − 1).
"""
from __future__ import annotations

import numpy as np

ROUNDS = 7  # kernels/dropout.py: PHILOX_ROUNDS

_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_MASK32 = 0xFFFFFFFF

# (rounds, counter, key) -> output, from Random123's kat_vectors
KNOWN_ANSWERS = [
    (7, (0, 0, 0, 0), (0, 0), (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
    (7, (_MASK32,) * 4, (_MASK32,) * 2, (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662)),
    (7, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A)),
    (10, (0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (10, (_MASK32,) * 4, (_MASK32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (10, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# The order in which a quad's columns 4q + 0..3 take the four words of its Philox call.
COLUMN_WORD = (0, 2, 1, 3)


def philox4x32_scalar(counter, key, rounds: int = ROUNDS):
    """Pure-Python Philox-4x32-``rounds`` of one counter: Random123's philox4x32_R, key bumped before rounds 2..R."""
    c0, c1, c2, c3 = (int(v) & _MASK32 for v in counter)
    k0, k1 = (int(v) & _MASK32 for v in key)
    for i in range(rounds):
        if i:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        p0, p1 = _M0 * c0, _M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0, p1 & _MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & _MASK32)
    return c0, c1, c2, c3


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = ROUNDS):
    """Vectorized Philox-4x32 over uint32 arrays (broadcast together); the key is a pair of ints."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in np.broadcast_arrays(c0, c1, c2, c3))
    k0, k1 = np.uint64(k0 & _MASK32), np.uint64(k1 & _MASK32)
    mask, shift = np.uint64(_MASK32), np.uint64(32)
    for i in range(rounds):
        if i:
            k0, k1 = (k0 + np.uint64(_W0)) & mask, (k1 + np.uint64(_W1)) & mask
        p0 = np.uint64(_M0) * c0  # < 2⁶⁴: exact in uint64
        p1 = np.uint64(_M1) * c2
        c0, c1, c2, c3 = ((p1 >> shift) ^ c1 ^ k0, p1 & mask, (p0 >> shift) ^ c3 ^ k1, p0 & mask)
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


def threshold(p: float) -> int:
    """uint32 threshold: words below it drop their element."""
    return min(int(round(float(p) * 2.0**32)), 2**32 - 1)


def words(seed: int, rows, cols) -> np.ndarray:
    """The Philox word of each (row, col) pair (arrays broadcast together), as uint32."""
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    rows, cols = np.broadcast_arrays(rows, cols)
    seed = int(seed)
    out = philox4x32(cols // 4, rows, 0, 0, seed & _MASK32, (seed >> 32) & _MASK32)
    stacked = np.stack(out, axis=-1)  # (..., 4)
    which = np.asarray(COLUMN_WORD)[cols % 4]
    return np.take_along_axis(stacked, which[..., None], axis=-1)[..., 0]


def keep_mask(seed: int, shape, p: float) -> np.ndarray:
    """(M, K) bool keep mask (True = kept) that ``kernels.dropout_keep_mask(seed, shape, p)`` must equal."""
    M, K = (int(s) for s in shape)
    if p <= 0.0:
        return np.ones((M, K), dtype=bool)
    w = words(seed, np.arange(M)[:, None], np.arange(K)[None, :])
    return w >= np.uint32(threshold(p))


def keep_bits(seed: int, triples_or_pairs, p: float):
    """Keep bits for chosen (row, col) pairs of one seed, via the scalar pure-Python generator (no NumPy)."""
    thr = threshold(p)
    bits = []
    for row, col in triples_or_pairs:
        w = philox4x32_scalar((col // 4, row, 0, 0), (seed & _MASK32, (seed >> 32) & _MASK32))
        bits.append(w[COLUMN_WORD[col % 4]] >= thr)
    return bits
