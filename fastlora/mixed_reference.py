r"""Pure-PyTorch math of the mixed-adapter LoRA linear: several adapters on one base layer, each row of the batch
with its own adapter (or none).

Shapes. x (M, K), weight (N, K), bias (N,); ``n`` adapters of ranks r_0..r_{n-1} (R = Σ r_a), packed:

* ``lora_A`` (R, K): the adapters' A matrices stacked along the rank, adapter a in rows [o_a, o_a + r_a);
* ``lora_B`` (N·R,): the adapters' B matrices (N, r_a) flattened one after the other, adapter a's in elements
  [N·o_a, N·(o_a + r_a)) (``torch.cat([B.reshape(-1) for B in Bs])``: a plain copy per adapter, where stacking
  along the rank (``torch.cat(Bs, 1)``) scatters every row and costs 5× more on a CPU);
* ``index`` (M,) int64: the adapter of each row, -1 for the base layer alone; ``scalings`` (n,) the adapters'
  scalings s_a; ``dropout_ps`` the adapters' dropout probabilities p_a.

Forward, for a row m of adapter a = index[m] (no low-rank term where a = -1)::

    h_m = (x_m ⊙ keep_m / (1 - p_a)) A_aᵀ           (r_a,)     saved, in a (M, max r_a) buffer
    y_m = x_m Wᵀ + b + s_a · h_m B_aᵀ                (N,)

Backward, dY (M, N); sums over the rows of adapter a only::

    dh_m = s_a · dY_m B_a                            (r_a,)
    dB_a = s_a · Σ_m dY_mᵀ h_m                       (N, r_a)
    dA_a = Σ_m dh_mᵀ (x_m ⊙ keep_m / (1 - p_a))      (r_a, K)
    dx_m = dY_m W + (dh_m A_a) ⊙ keep_m / (1 - p_a)  (K,)
    dW = dYᵀ x, db = Σ_m dY_m                        only when they require grad

An adapter's gradients are thus exactly what a separate run on its own rows gives, and an adapter with no row
gets zeros (the callers leave adapters that have no row out of the packing).

How it runs without a Python loop over adapters: the base GEMM runs once for all rows (``addmm``); the rows are
sorted by adapter (one ``argsort``) and the adapters grouped by rank (one class per distinct rank: a handful). In a
class, each adapter's rows are cut into tiles of T rows; the shrink and the expand are then one batched GEMM each
(``bmm``) over the class's tiles, with each tile's own A and B (a view of the packed buffers when every adapter
is one tile, a gather otherwise), and the low-rank rows are added into y in place (``index_add_``). No rank is
padded to another's. T is each adapter's row count when the rows are spread evenly (one tile per adapter, no
padding), else a power of two near the mean, so that padding stays bounded where a few adapters hold most rows.

Dropout: one keep mask over (M, K) drawn from a generator seeded with ``seed``, each row against its own
adapter's p; the rows of two adapters are disjoint, so the adapters' masks are independent. The backward
regenerates it from the seed.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .reference import h_dtype, low_rank_dtype

__all__ = ["MixedPlan", "mixed_plan", "keep_mask", "mixed_forward", "mixed_backward", "MixedTorch", "mixed_oracle"]


@dataclass
class RankClass:
    """The used adapters of one rank, cut into tiles of ``T`` rows."""
    rank: int
    tile_adapter: Tensor      # (n_tiles,) int64: the adapter of each tile
    rows: Tensor              # (n_tiles, T) int64: the row of x of each slot (padding slots: a valid row)
    valid: Optional[Tensor]   # (n_tiles, T) bool, None when no slot is padding
    first: int                # with ``views``: the first adapter of the class
    views: bool               # one tile per adapter, adapters first..first+n_tiles-1: packed buffers as views
    block: Optional[slice]    # one tile per adapter, no padding: the class's rows as one block of the sorted rows


@dataclass
class MixedPlan:
    classes: list
    offsets: list             # rank offsets o_a (n + 1,) as Python ints
    order: Optional[Tensor] = None   # (M,) the rows sorted by adapter (None: already in that order)
    inverse: Optional[Tensor] = None  # (M,) where each row went in ``order`` (None with it)

    @property
    def blocks(self) -> bool:
        """Every class is one block of the sorted rows: the forward can run in sorted order, without scatter."""
        return bool(self.classes) and all(c.block is not None for c in self.classes)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


_PLANS: "collections.OrderedDict" = collections.OrderedDict()


def mixed_plan(index: Tensor, ranks: Sequence[int]) -> MixedPlan:
    """The tiles of every rank class for ``index`` (M,) (-1: base only) and the adapters' ``ranks``. Reads the
    per-adapter row counts on the host (one sync on a GPU: this is the PyTorch path).

    On the CPU, plans are cached by value: the key is the index's bytes and the ranks themselves, never a tensor's
    identity or version, so a hit is the same plan by construction. Every layer of a model sees the same batch
    composition in one forward: the first layer plans, the others look it up (a 4 KB hash for 512 rows)."""
    if index.device.type != "cpu" or index.numel() > 1 << 16:
        return _make_plan(index, ranks)
    key = (index.numpy().tobytes(), tuple(int(r) for r in ranks))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _make_plan(index, ranks)
        if len(_PLANS) > 32:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


def _make_plan(index: Tensor, ranks: Sequence[int]) -> MixedPlan:
    n = len(ranks)
    M = index.numel()
    offsets = [0]
    for r in ranks:
        offsets.append(offsets[-1] + int(r))
    if M == 0:
        return MixedPlan([], offsets)
    in_order = bool((index[1:] >= index[:-1]).all())  # rows already grouped by adapter (a server's batch)
    order = torch.arange(M, device=index.device) if in_order else torch.argsort(index, stable=True)
    counts = torch.bincount(index + 1, minlength=n + 1).tolist()
    starts, at = [], counts[0]
    for c in counts[1:]:
        starts.append(at)
        at += c
    by_rank: dict[int, list[int]] = {}
    for a in range(n):
        if counts[a + 1]:
            by_rank.setdefault(int(ranks[a]), []).append(a)
    device = index.device
    classes = []
    for rank, ids in by_rank.items():
        cs = [counts[a + 1] for a in ids]
        total, most = sum(cs), max(cs)
        if len(ids) * most <= 2 * total:  # (nearly) even: one tile per adapter
            T = most
            tiles = [(a, starts[a], starts[a] + c) for a, c in zip(ids, cs)]
        else:  # skewed: tiles of about the mean, so that padding stays below one tile per adapter
            T = max(8, _next_pow2(-(-total // len(ids))))
            tiles = [(a, starts[a] + j, min(starts[a] + j + T, starts[a] + c))
                     for a, c in zip(ids, cs) for j in range(0, c, T)]
        meta = torch.tensor([t for tile in tiles for t in tile], dtype=torch.int64).view(-1, 3).to(device)
        pos = meta[:, 1:2] + torch.arange(T, device=device)
        valid = pos < meta[:, 2:3]
        rows = order[pos.clamp_(max=M - 1)]
        if bool(valid.all()):
            valid = None
        else:
            rows = torch.where(valid, rows, order[meta[:, 1:2]])  # padding slots repeat the tile's first row
        views = len(tiles) == len(ids) and ids == list(range(ids[0], ids[0] + len(ids)))
        block = slice(starts[ids[0]], starts[ids[0]] + len(ids) * T) if views and valid is None else None
        classes.append(RankClass(rank, meta[:, 0], rows, valid, ids[0], views, block))
    if in_order:
        return MixedPlan(classes, offsets)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(M, device=device)
    return MixedPlan(classes, offsets, order, inverse)


def _tile_offsets(plan: MixedPlan, cls: RankClass, device) -> Tensor:
    """(n_tiles,) int64: the rank offset o_a of each tile's adapter."""
    return torch.tensor(plan.offsets[:-1], dtype=torch.int64, device=device)[cls.tile_adapter]


def _stack_A(lora_A: Tensor, plan: MixedPlan, cls: RankClass) -> Tensor:
    """(n_tiles, r, K): each tile's A."""
    r, K = cls.rank, lora_A.shape[1]
    if cls.views:
        o = plan.offsets[cls.first]
        return lora_A[o:o + cls.tile_adapter.numel() * r].view(-1, r, K)
    offs = _tile_offsets(plan, cls, lora_A.device)
    return lora_A[(offs[:, None] + torch.arange(r, device=lora_A.device)).view(-1)].view(-1, r, K)


def _stack_B(lora_B: Tensor, N: int, plan: MixedPlan, cls: RankClass) -> Tensor:
    """(n_tiles, N, r): each tile's B."""
    r = cls.rank
    if cls.views:
        o = N * plan.offsets[cls.first]
        return lora_B[o:o + cls.tile_adapter.numel() * N * r].view(-1, N, r)
    offs = N * _tile_offsets(plan, cls, lora_B.device)
    return lora_B[(offs[:, None] + torch.arange(N * r, device=lora_B.device)).view(-1)].view(-1, N, r)


def _row_dropout(index: Tensor, dropout_ps: Sequence[float], device) -> Optional[Tensor]:
    """(M,) float32 p of each row's adapter (0 for base rows), or None when no adapter drops anything."""
    if not any(p > 0.0 for p in dropout_ps):
        return None
    table = torch.tensor([0.0] + [float(p) for p in dropout_ps], dtype=torch.float32, device=device)
    return table[index + 1]


def keep_mask(seed: int, index: Tensor, K: int, dropout_ps: Sequence[float], device) -> Optional[Tensor]:
    """(M, K) float32: keep / (1 - p_row) (0 where dropped) for the PyTorch path and ``seed``; None without
    dropout. The same every call for the same seed."""
    p_row = _row_dropout(index, dropout_ps, device)
    if p_row is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    u = torch.rand((index.numel(), K), generator=gen, device=device, dtype=torch.float32)
    p = p_row[:, None]
    return torch.where(u >= p, 1.0 / (1.0 - p), 0.0)


def _gather(t: Tensor, cls: RankClass) -> Tensor:
    """(n_tiles, T, ·): the rows of each tile (``index_select``: a row copy each, 5× faster than advanced indexing
    with a 2-D index on a CPU)."""
    return t.index_select(0, cls.rows.reshape(-1)).view(*cls.rows.shape, *t.shape[1:])


def _padding_zeroed(t: Tensor, cls: RankClass) -> Tensor:
    return t if cls.valid is None else t.masked_fill(~cls.valid[..., None], 0.0)


def _valid_rows(values: Tensor, cls: RankClass):
    """(rows, values) of the non-padding slots, flattened, for an index_add_ into (M, ·)."""
    rows = cls.rows.reshape(-1)
    values = values.reshape(rows.numel(), -1)
    if cls.valid is None:
        return rows, values
    keep = cls.valid.reshape(-1)
    return rows[keep], values[keep]


def mixed_forward(x, weight, bias, lora_A, lora_B, index, ranks, scalings, dropout_ps, seed: int,
                  save_h: bool = True):
    """y = x Wᵀ + b + s_a · (drop_a(x) A_aᵀ) B_aᵀ row by row (module docstring). Returns (y, h): h (M, max r)
    with each row's h in its first r_a columns (zeros after, and for base rows), None unless ``save_h``."""
    M, K = x.shape
    N = weight.shape[0]
    cd = x.dtype
    ld = low_rank_dtype(cd, lora_A.dtype)
    h_all = torch.zeros((M, max(ranks)), dtype=h_dtype(cd), device=x.device) if save_h else None
    plan = mixed_plan(index, ranks)
    keep = keep_mask(seed, index, K, dropout_ps, x.device) if plan.classes else None
    # Where every rank class is one block of the sorted rows (the rows spread evenly, or already grouped), the
    # whole forward runs in sorted order: one gather of x, the expand in place into y's blocks (baddbmm_), one
    # gather back. Otherwise: gathered tiles, and their low-rank rows added into y (index_add_).
    permuted = plan.order is not None and plan.blocks
    use_blocks = plan.order is None or permuted
    if permuted:
        x = x.index_select(0, plan.order)
        keep = None if keep is None else keep.index_select(0, plan.order)
    y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    xd = x if keep is None else (x.to(ld) * keep.to(ld))
    s = scalings.to(device=x.device, dtype=ld)
    for cls in plan.classes:  # one per distinct rank
        n_t, T = cls.rows.shape
        blk = cls.block if use_blocks else None
        xt = (xd[blk] if blk is not None else _gather(xd, cls)).to(ld).view(n_t, T, K)
        h = torch.bmm(xt, _stack_A(lora_A, plan, cls).to(ld).transpose(1, 2))  # (n_tiles, T, r)
        if save_h:
            rows, vals = _valid_rows(h, cls)  # cls.rows: rows of the caller's x, whatever the working order
            h_all[:, :cls.rank].index_copy_(0, rows, vals.to(h_all.dtype))
        hs = h.mul_(s[cls.tile_adapter][:, None, None])  # h is copied into h_all above: scaled in place
        Bt = _stack_B(lora_B, N, plan, cls).to(ld).transpose(1, 2)        # (n_tiles, r, N)
        if blk is not None and ld == cd:
            y[blk].view(n_t, T, N).baddbmm_(hs, Bt)  # in place: nothing (M, N) beside y
            continue
        low = torch.bmm(hs, Bt)                                            # (n_tiles, T, N)
        if blk is not None:
            y[blk] += low.view(-1, N).to(cd)
            continue
        rows, vals = _valid_rows(low, cls)
        y.index_add_(0, rows, vals.to(cd))
    if permuted:  # back to the caller's row order
        y = y.index_select(0, plan.inverse)
    return y, h_all


def mixed_backward(grad_y, x, weight, lora_A, lora_B, h, index, ranks, scalings, dropout_ps, seed: int,
                   needs_input: bool, needs_weight: bool, needs_bias: bool, needs_A: bool, needs_B: bool):
    """Gradients of ``mixed_forward`` (module docstring): (dx, dW, dbias, dA, dB), None where not needed; dA (R, K)
    and dB (N·R,) packed as lora_A and lora_B, each adapter's from its own rows only."""
    M, K = x.shape
    N = weight.shape[0]
    cd = grad_y.dtype
    ld = low_rank_dtype(cd, lora_A.dtype)
    dx = dW = dbias = dA = dB = None
    plan = mixed_plan(index, ranks)
    if needs_input:
        dx = torch.mm(grad_y, weight)
    if needs_weight:
        dW = torch.mm(grad_y.t(), x)
    if needs_bias:
        dbias = grad_y.sum(0)
    if needs_A:
        dA = torch.zeros(lora_A.shape, dtype=ld, device=x.device)
    if needs_B:
        dB = torch.zeros(lora_B.shape, dtype=ld, device=x.device)
    if not (needs_input or needs_A or needs_B) or not plan.classes:
        return dx, dW, dbias, (None if dA is None else dA.to(lora_A.dtype)), (None if dB is None else dB.to(lora_B.dtype))
    keep = keep_mask(seed, index, K, dropout_ps, x.device) if (needs_input or needs_A) else None
    s = scalings.to(device=x.device, dtype=ld)
    for cls in plan.classes:
        r = cls.rank
        st = s[cls.tile_adapter][:, None, None]
        dyt = _padding_zeroed(_gather(grad_y, cls).to(ld), cls)                    # (n_tiles, T, N)
        Bt = _stack_B(lora_B, N, plan, cls).to(ld)                                 # (n_tiles, N, r)
        if needs_B:
            ht = _padding_zeroed(_gather(h, cls)[..., :r].to(ld), cls)              # (n_tiles, T, r)
            dBt = torch.bmm(dyt.transpose(1, 2), ht).mul_(st)                      # (n_tiles, N, r)
            _add_packed(dB, dBt, N * r, N, plan, cls)
        if not (needs_input or needs_A):
            continue
        dh = torch.bmm(dyt, Bt).mul_(st)                                           # (n_tiles, T, r)
        kt = None if keep is None else _gather(keep, cls).to(ld)                   # dA and dx share the tiles' mask
        if needs_A:
            xt = _gather(x, cls).to(ld)
            if kt is not None:
                xt = xt * kt
            dAt = torch.bmm(dh.transpose(1, 2), _padding_zeroed(xt, cls))          # (n_tiles, r, K)
            _add_packed(dA.view(-1), dAt, r * K, K, plan, cls)
        if needs_input:
            lx = torch.bmm(dh, _stack_A(lora_A, plan, cls).to(ld))                 # (n_tiles, T, K)
            if kt is not None:
                lx = lx * kt
            rows, vals = _valid_rows(lx, cls)
            dx.index_add_(0, rows, vals.to(dx.dtype))
    return dx, dW, dbias, (None if dA is None else dA.to(lora_A.dtype)), (None if dB is None else dB.to(lora_B.dtype))


def _add_packed(flat: Tensor, per_tile: Tensor, size: int, unit: int, plan: MixedPlan, cls: RankClass) -> None:
    """Add each tile's (·) block of ``size`` elements into its adapter's block of the packed flat buffer (whose
    adapter a starts at unit·o_a): a copy where tiles are the adapters in order, an index_add_ otherwise."""
    flat = flat.view(-1)
    if cls.views:
        o = unit * plan.offsets[cls.first]
        flat[o:o + per_tile.numel()].add_(per_tile.reshape(-1))
        return
    offs = unit * _tile_offsets(plan, cls, flat.device)
    idx = offs[:, None] + torch.arange(size, device=flat.device)
    flat.index_add_(0, idx.reshape(-1), per_tile.reshape(-1))


class MixedTorch:
    """The PyTorch implementation in the op protocol's shape (``fastlora.op_common``): tensors (x, weight, bias,
    lora_A, lora_B, index, scalings), consts (ranks, dropout_ps), saved (h,)."""

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, index, scalings, ranks, dropout_ps, *, seed, save):
        if x.device.type == "meta":  # shapes only (big-model loading): the grouping needs the index's values
            y = x.new_empty(x.shape[0], weight.shape[0])
            return y, (x.new_empty(x.shape[0], max(ranks), dtype=h_dtype(x.dtype)) if save else None,)
        y, h = mixed_forward(x, weight, bias, lora_A, lora_B, index, ranks, scalings, dropout_ps, seed, save_h=save)
        return y, (h,)

    @staticmethod
    def backward(grad_y, x, weight, bias, lora_A, lora_B, index, scalings, h, ranks, dropout_ps, *, seed, needs):
        n_x, n_w, n_b, n_a, n_bb = needs[:5]
        if x.device.type == "meta":
            like = (x, weight, bias, lora_A, lora_B)
            return [t.new_empty(t.shape) if need else None for t, need in zip(like, needs[:5])] + [None, None]
        dx, dW, dbias, dA, dB = mixed_backward(grad_y, x, weight, lora_A, lora_B, h, index, ranks, scalings,
                                               dropout_ps, seed, n_x, n_w, n_b, n_a, n_bb)
        return [dx, dW, dbias, dA, dB, None, None]


def mixed_oracle(x, weight, bias, lora_As, lora_Bs, index, scalings, keep=None, dtype=torch.float64):
    """The op's formula, row by row, in ``dtype``, from the unpacked adapters (``keep``: the (M, K) keep/(1-p)
    factors, or None): the oracle of the tests, sharing no code with the op."""
    x64 = x.to(dtype)
    y = x64 @ weight.to(dtype).t()
    if bias is not None:
        y = y + bias.to(dtype)
    xd = x64 if keep is None else x64 * keep.to(dtype)
    rows = []
    for m in range(x.shape[0]):
        a = int(index[m])
        if a < 0:
            rows.append(y[m])
            continue
        low = (xd[m] @ lora_As[a].to(dtype).t()) @ lora_Bs[a].to(dtype).t()
        rows.append(y[m] + float(scalings[a]) * low)
    return torch.stack(rows) if rows else y
