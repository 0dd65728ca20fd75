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

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "h_dtype",
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


def dropout_keep_mask(seed: int, shape, p: float, device, dtype=torch.bool) -> torch.Tensor:
    """The keep mask (True = kept, probability 1-p) of the torch backend for ``seed``: the same every call.

    The Triton backend draws its mask from Philox instead (``fastlora.kernels.dropout_keep_mask``); each
    backend regenerates its own mask in the backward from the seed it saved.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    keep = torch.rand(shape, device=device, generator=gen) >= p  # uniform [0, 1): kept with probability 1-p
    return keep if dtype == torch.bool else keep.to(dtype)


def lora_forward(x, weight, lora_A, lora_B, bias, scaling: float, dropout_p: float, seed: int, save_h: bool = True):
    """y = x@Wᵀ + b + s·h@Bᵀ with h = drop(x)@Aᵀ. Returns (y, h), h None unless ``save_h``.

    x (M, K) and weight (N, K) share a dtype; the adapters may be wider (fp32 with a bf16 base, as PEFT keeps
    them) and are cast to x's dtype for the products, which accumulate in fp32 as torch's matmuls do. With
    dropout, the 1/(1-p) goes onto A (r, K) rather than onto an (M, K) tensor, and the (M, K) masked copy of
    x is a temporary: it is freed before y is computed and never saved.
    """
    cd = x.dtype
    B = lora_B.to(cd)
    if dropout_p == 0.0:
        h = torch.mm(x, lora_A.to(cd).t())  # (M, r)
    else:
        keep = dropout_keep_mask(seed, x.shape, dropout_p, x.device)
        # where(), not x * keep: a bool operand of * is first cast to x's dtype, an (M, K) temporary
        h = torch.mm(torch.where(keep, x, 0.0), (lora_A / (1.0 - dropout_p)).to(cd).t())
        del keep
    if bias is None:
        y = torch.mm(x, weight.t())
    else:
        y = torch.addmm(bias, x, weight.t())
    y.addmm_(h, B.t(), alpha=scaling)  # in place: no second (M, N) buffer
    return y, (h.to(h_dtype(cd)) if save_h else None)


def lora_backward(
    grad_y, x, weight, lora_A, lora_B, h, scaling: float, dropout_p: float, seed: int,
    needs_input: bool, needs_weight: bool, needs_A: bool, needs_B: bool, needs_bias: bool,
):
    """Gradients of lora_forward (derived in fastlora.autograd). Returns (dx, dW, dA, dB, dbias), None where
    not needed. The dropout mask is regenerated from ``seed``: it is the forward's, bit for bit."""
    cd = grad_y.dtype
    inv_keep = 1.0 / (1.0 - dropout_p)
    dx = dW = dA = dB = dbias = None
    if needs_input or needs_A:
        dh = torch.mm(grad_y, lora_B.to(cd)).mul_(scaling)  # (M, r)
    if needs_B:
        # (N, r), computed as (hᵀ dY)ᵀ: BLAS streams dY faster in this orientation
        dB = torch.mm(h.to(cd).t(), grad_y).mul_(scaling).t().to(lora_B.dtype)
    keep = None
    if dropout_p > 0.0 and (needs_input or needs_A):
        keep = dropout_keep_mask(seed, x.shape, dropout_p, x.device)
    if needs_input:
        dx = torch.mm(grad_y, weight)  # (M, K)
        if keep is None:
            dx.addmm_(dh, lora_A.to(cd))
        else:  # dx += (dh · A/(1-p)) ⊙ keep; masked_fill_ in place on the fresh product, no cast of keep
            dx.add_(torch.mm(dh, (lora_A * inv_keep).to(cd)).masked_fill_(~keep, 0.0))
    if needs_A:
        if keep is None:
            dA = torch.mm(dh.t(), x)  # (r, K)
        else:
            dA = torch.mm(dh.t(), torch.where(keep, x, 0.0)).mul_(inv_keep)
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
