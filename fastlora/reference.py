"""Pure-PyTorch LoRA linear math.

Two things live here:

* The factored math ``lora_forward`` / ``lora_backward``: the CPU fallback (and the ``torch`` backend on any
  device). It never forms ``B @ A``; it composes in-place ``addmm_`` calls so that nothing of size (M, N) is
  allocated twice, and it regenerates the dropout mask from a seed instead of storing it.
* The seed notebook's reconstruction ``W + s·B@A`` (``merged_lora_linear``, ``NaiveLoRALinear``) and PEFT's
  unfused math (``peft_lora_linear``): the oracles of the tests and the baselines of the benchmarks.

Shapes: x (M, K), weight (N, K), lora_A (r, K), lora_B (N, r), bias (N,), h = drop(x) @ lora_Aᵀ (M, r).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "h_dtype",
    "dropout_drop_index",
    "low_rank_dtype",
    "dropout_keep_mask",
    "lora_forward",
    "lora_backward",
    "merged_lora_linear",
    "unfused_lora_linear",
    "peft_lora_linear",
    "NaiveLoRALinear",
]


def h_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved low-rank activation h: fp32 for half inputs (fp32 accumulate), else the input's."""
    return torch.promote_types(dtype, torch.float32)


def dropout_drop_index(seed: int, numel: int, p: float, device) -> torch.Tensor:
    """The torch backend's dropout for ``seed``: the flat indices (int64, increasing) of the elements it drops
    among ``numel``, each element independently with probability p; the same every call.

    Drawn as the gaps between dropped elements, which for independent drops are i.i.d. geometric:
    G = 1 + ⌊log(1-U) / log(1-p)⌋ with U uniform on [0, 1) in float64, so that P(G > k) = (1-p)^k (exact up to
    float64 rounding). That is ~p·numel uniform draws where a mask from ``torch.rand`` takes numel: 20× fewer at
    p = 0.05, and what is left to apply is a scatter of p·numel zeros instead of a pass over a dense mask.
    """
    device = torch.device(device)
    if numel == 0 or p <= 0.0 or device.type == "meta":  # meta: shapes only, no values to drop
        return torch.empty(0, dtype=torch.int64, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    log_keep = math.log1p(-p)
    chunks, last = [], -1  # last: the position of the previous drop (-1: before the first element)
    while True:
        left = numel - 1 - last  # positions still to cover
        count = int(left * p + 6.0 * math.sqrt(left * p * (1.0 - p)) + 16)  # enough gaps but once in ~10⁹ calls
        u = torch.rand(count, dtype=torch.float64, device=device, generator=gen)
        # i.i.d. geometric gaps ≥ 1: the quotient is ≥ 0, so truncating to int64 is the floor; the sum of the gaps
        # then runs in exact integers (one pass fewer than flooring in float64 and converting the positions after)
        gaps = u.neg_().log1p_().div_(log_keep).to(torch.int64).add_(1)
        pos = gaps.cumsum_(0).add_(last)
        end = int(pos[-1])
        if end >= numel:
            chunks.append(pos[:int(torch.searchsorted(pos, numel))])
            break
        chunks.append(pos)
        last = end
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def dropout_keep_mask(seed: int, shape, p: float, device, dtype=torch.bool) -> torch.Tensor:
    """The keep mask (True = kept, probability 1-p) of the torch backend for ``seed``: ``dropout_drop_index``
    laid out row-major over ``shape``; the same every call.

    The Triton backend draws its mask from Philox instead (``fastlora.kernels.dropout_keep_mask``); each
    backend regenerates its own mask in the backward from the seed it saved.
    """
    numel = math.prod(int(s) for s in shape)
    keep = torch.ones(numel, dtype=torch.bool, device=torch.device(device))
    keep.index_fill_(0, dropout_drop_index(seed, numel, p, device), False)
    keep = keep.view(tuple(int(s) for s in shape))
    return keep if dtype == torch.bool else keep.to(dtype)


def _dropped_(t: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """t (contiguous) with the elements at the flat indices ``drop`` zeroed, in place."""
    t.view(-1).index_fill_(0, drop, 0.0)
    return t


def _dropped(t: torch.Tensor, drop: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous copy of t (M, K), in ``dtype`` (default t's), with the elements at the flat indices ``drop``
    zeroed."""
    if dtype is None or dtype == t.dtype:
        return _dropped_(t.clone(memory_format=torch.contiguous_format), drop)
    return _dropped_(t.to(dtype, memory_format=torch.contiguous_format), drop)


def low_rank_dtype(dtype: torch.dtype, adapter_dtype: torch.dtype) -> torch.dtype:
    """dtype of the low-rank products h = drop(x) Aᵀ, s·h Bᵀ and the backward's dh, dA, dB: the adapters' where they
    are wider than the input (fp32 adapters on a half base, PEFT's default), as in PEFT. In the input's fp16 they
    would overflow where PEFT stays finite (s·h above 65504, say)."""
    return torch.promote_types(dtype, adapter_dtype)


def lora_forward(x, weight, lora_A, lora_B, bias, scaling: float, dropout_p: float, seed: int, save_h: bool = True):
    """y = x@Wᵀ + b + s·h@Bᵀ with h = drop(x)@Aᵀ. Returns (y, h), h None unless ``save_h``.

    x (M, K) and weight (N, K) share a dtype; the adapters may be wider (fp32 with a bf16 base, as PEFT keeps
    them): the low-rank products then run in their dtype (``low_rank_dtype``) and the branch is rounded once, when
    it is added into y (in x's dtype, as PEFT's sum). With dropout, the 1/(1-p) goes onto A (r, K) rather than
    onto an (M, K) tensor, and the (M, K) masked copy of x is a temporary: it is freed before y is computed and
    never saved.
    """
    cd = x.dtype
    ld = low_rank_dtype(cd, lora_A.dtype)
    if dropout_p == 0.0:
        h = torch.mm(x.to(ld), lora_A.to(ld).t())  # (M, r)
    else:  # the masked copy of x is a temporary: zeros scattered at the ~p·M·K dropped positions
        drop = dropout_drop_index(seed, x.numel(), dropout_p, x.device)
        h = torch.mm(_dropped(x, drop, ld), (lora_A / (1.0 - dropout_p)).to(ld).t())
        del drop
    if bias is None:
        y = torch.mm(x, weight.t())
    else:
        y = torch.addmm(bias, x, weight.t())
    # s on the (M, r) side, not addmm's alpha: alpha = 0 skips the product and would hide a NaN in A or B (PEFT's
    # 0·NaN is NaN)
    hs = h * scaling
    if ld == cd:
        y.addmm_(hs, lora_B.to(cd).t())  # in place: no second (M, N) buffer
    else:  # the branch in the adapters' dtype, added (and rounded) once
        y.add_(torch.mm(hs, lora_B.to(ld).t()))
    return y, (h.to(h_dtype(cd)) if save_h else None)


def lora_backward(
    grad_y, x, weight, lora_A, lora_B, h, scaling: float, dropout_p: float, seed: int,
    needs_input: bool, needs_weight: bool, needs_A: bool, needs_B: bool, needs_bias: bool,
):
    """Gradients of lora_forward (derived in fastlora.autograd). Returns (dx, dW, dA, dB, dbias), None where
    not needed. The dropout mask is regenerated from ``seed``: it is the forward's, bit for bit. dh, dA and dB
    are computed in ``low_rank_dtype`` (dY is exact in it), dx and dW in x's dtype."""
    cd = grad_y.dtype
    ld = low_rank_dtype(cd, lora_A.dtype)
    inv_keep = 1.0 / (1.0 - dropout_p)
    dx = dW = dA = dB = dbias = None
    dy = grad_y.to(ld) if (needs_input or needs_A or needs_B) else grad_y
    if needs_input or needs_A:
        dh = torch.mm(dy, lora_B.to(ld)).mul_(scaling)  # (M, r)
    if needs_B:
        # (N, r), computed as (hᵀ dY)ᵀ: BLAS streams dY faster in this orientation
        dB = torch.mm(h.to(ld).t(), dy).mul_(scaling).t().to(lora_B.dtype)
    del dy
    drop = None
    if dropout_p > 0.0 and (needs_input or needs_A):
        drop = dropout_drop_index(seed, x.numel(), dropout_p, x.device)
    if needs_input:
        if drop is None:
            dx = torch.mm(grad_y, weight)  # (M, K)
            if ld == cd:
                dx.addmm_(dh, lora_A.to(cd))
            else:  # the low-rank term in the adapters' dtype, added (and rounded) once
                dx.add_(torch.mm(dh, lora_A.to(ld)))
        elif ld == cd:  # dx = (dh · A/(1-p)) ⊙ keep + dY W: the base GEMM accumulates onto the masked product
            dx = _dropped_(torch.mm(dh, (lora_A * inv_keep).to(cd)), drop).addmm_(grad_y, weight)
        else:
            dx = torch.mm(grad_y, weight).add_(_dropped_(torch.mm(dh, (lora_A * inv_keep).to(ld)), drop))
    if needs_A:
        if drop is None:
            dA = torch.mm(dh.t(), x.to(ld))  # (r, K)
        else:
            dA = torch.mm(dh.t(), _dropped(x, drop, ld)).mul_(inv_keep)
        dA = dA.to(lora_A.dtype)
    if needs_weight:
        dW = torch.mm(grad_y.t(), x)  # (N, K): only for a weight that asks for it
    if needs_bias:
        dbias = grad_y.sum(0)
    return dx, dW, dA, dB, dbias


# ---------------------------------------------------------------------------------------------------------
# Oracles and baselines
# ---------------------------------------------------------------------------------------------------------

def merged_lora_linear(x, weight, lora_A, lora_B, bias=None, scaling: float = 1.0):
    """The seed notebook's LoRA: rebuild W' = W + s·B@A every call, then one linear. No dropout."""
    lora_weight = weight + (lora_B @ lora_A) * scaling
    return F.linear(x, lora_weight.to(x.dtype), bias)


def unfused_lora_linear(x, weight, lora_A, lora_B, bias=None, scaling: float = 1.0, keep_mask=None,
                        dropout_p: float = 0.0):
    """x@Wᵀ + b + s·((x·keep/(1-p))@Aᵀ)@Bᵀ with an explicit keep mask: the oracle for dropout runs."""
    xd = x if keep_mask is None else x * keep_mask.to(x.dtype) / (1.0 - dropout_p)
    return F.linear(x, weight, bias) + F.linear(F.linear(xd, lora_A.to(x.dtype)), lora_B.to(x.dtype)) * scaling


def peft_lora_linear(x, weight, lora_A, lora_B, bias=None, scaling: float = 1.0, dropout_p: float = 0.0,
                     training: bool = True):
    """PEFT's unfused lora.Linear forward: base(x) + lora_B(lora_A(dropout(x))) · scaling."""
    result = F.linear(x, weight, bias)
    xd = F.dropout(x, dropout_p, training)
    return result + F.linear(F.linear(xd, lora_A.to(x.dtype)), lora_B.to(x.dtype)) * scaling


class NaiveLoRALinear(nn.Module):
    """The seed notebook's LoRALinear, as written there: frozen random weight, A and B ~ N(0, 0.01²), a
    trainable zero bias, and a forward that rebuilds ``W + (B @ A)·alpha/r`` every step."""

    def __init__(self, in_features: int, out_features: int, r: int = 4, alpha: float = 1.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.weight.requires_grad = False
        self.A = nn.Parameter(torch.randn(r, in_features) * 0.01)
        self.B = nn.Parameter(torch.randn(out_features, r) * 0.01)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        lora_weight = self.weight + (self.B @ self.A) * self.scaling
        return F.linear(x, lora_weight, self.bias)

    def extra_repr(self):
        return f"in_features = {self.in_features}, out_features = {self.out_features}, r = {self.r}, alpha = {self.alpha}"
