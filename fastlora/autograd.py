r"""The LoRA linear op (``LORA_LINEAR``) and its exact gradients, written in the op protocol
(``fastlora.op_common.FusedOp``: the autograd.Function, the ``torch.library`` custom ops ``fastlora::lora_linear_fwd``
/ ``_infer`` / ``_bwd``, autocast, checks of the shared arguments and the dispatch come from there).

Forward, with x (M, K), W (N, K), A (r, K), B (N, r), s the scaling and m the dropout keep mask (scaled by
1/(1-p), all ones without dropout)::

    h = (x ⊙ m) Aᵀ                      (M, r)   saved, fp32 for half inputs
    y = x Wᵀ + b + s · h Bᵀ             (M, N)

Backward, given dY = ∂L/∂y (M, N)::

    ∂L/∂h = dh = s · dY B               (M, r)
    ∂L/∂B = dB = s · dYᵀ h              (N, r)    since y depends on B only through s·h Bᵀ
    ∂L/∂A = dA = dhᵀ (x ⊙ m)            (r, K)    since h = (x ⊙ m) Aᵀ
    ∂L/∂x = dx = dY W + (dh A) ⊙ m      (M, K)    the base path, plus the LoRA path through the mask
    ∂L/∂W = dW = dYᵀ x                  (N, K)    only when W requires grad (frozen in LoRA: skipped)
    ∂L/∂b = db = Σ_rows dY              (N,)      only when b requires grad

``B @ A`` appears nowhere. A 0-d tensor s (PEFT's hot-swap scaling) is folded into B as B' = s·B, so the launch
helpers always get a Python float and the value is never read on the host; then ∂L/∂B = s · ∂L/∂B'.

Saved for backward: x, h and the dropout seed (a Python int in eager code, an int64
scalar under torch.compile), plus the parameters, which cost no memory; the mask m is regenerated from the
seed, so it is the forward's bit for bit, and never stored.

Double backward: the backward bodies (kernels, in-place PyTorch) are first-order. When autograd asks for a
differentiable gradient (``create_graph=True``: gradient penalties, Hessian-vector products), the backward returns
instead the gradients of ``differentiable_forward`` (the same formula in plain PyTorch ops, the same dropout mask)
taken by autograd from the saved inputs, so second derivatives are exact (``fastlora.op_common.recompute_grads``).

The two implementations have one signature (``TorchLoRALinear``: ``fastlora.reference``'s ``lora_forward`` /
``lora_backward``; ``TritonLoRALinear``: the same functions of ``fastlora.kernels.lora_linear``); what is this op's
own (its checks, what it saves, its fake outputs, its differentiable formula) is below.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend as _backend
from . import reference
from .op_common import FusedOp

__all__ = ["LORA_LINEAR", "LoRALinearOp", "keep_mask", "differentiable_forward"]


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def keep_mask(seed: int, shape, dropout_p: float, device, use_triton: bool) -> Tensor:
    """The keep mask (True = kept) that the forward of this backend drew for ``seed``, materialized."""
    if use_triton:
        from fastlora.kernels.dropout import dropout_keep_mask

        with _backend.kernel_section(True):
            return dropout_keep_mask(seed, shape, dropout_p, device)
    return reference.dropout_keep_mask(seed, shape, dropout_p, device)


def dropped(x: Tensor, dropout_p: float, seed: int, use_triton: bool) -> Tensor:
    """drop(x) = x ⊙ keep / (1-p) with the backend's mask for ``seed``, in differentiable ops."""
    if dropout_p == 0.0:
        return x
    keep = keep_mask(seed, x.shape, dropout_p, x.device, use_triton)
    return torch.where(keep, x * (1.0 / (1.0 - dropout_p)), 0.0)


def differentiable_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed: int, use_triton: bool):
    """The op's forward in differentiable PyTorch ops (PEFT's formula, with the op's own dropout mask): what a double
    backward differentiates. The low-rank branch runs in the adapters' dtype, as PEFT's."""
    xd = dropped(x, dropout_p, seed, use_triton)
    low = F.linear(F.linear(xd.to(lora_A.dtype), lora_A), lora_B.to(lora_A.dtype))
    low = low * (scaling.to(low.dtype) if isinstance(scaling, Tensor) else scaling)
    return F.linear(x, weight, bias) + low.to(x.dtype)


class TorchLoRALinear:
    """The PyTorch implementation (``fastlora.reference``)."""

    @staticmethod
    def forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, *, seed, save):
        y, h = reference.lora_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, save_h=save)
        return y, (h,)

    @staticmethod
    def backward(grad_y, x, weight, lora_A, lora_B, bias, h, scaling, dropout_p, *, seed, needs):
        return reference.lora_backward(grad_y, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, *needs)


class TritonLoRALinear:
    """The Triton implementation (``fastlora.kernels.lora_linear``), the same signature."""

    @staticmethod
    def forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, *, seed, save):
        from fastlora.kernels import lora_linear as kernels

        y, h = kernels.lora_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, save_h=save)
        return y, (h,)

    @staticmethod
    def backward(grad_y, x, weight, lora_A, lora_B, bias, h, scaling, dropout_p, *, seed, needs):
        from fastlora.kernels import lora_linear as kernels

        return kernels.lora_backward(grad_y, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, *needs)


class LoRALinearOp(FusedOp):
    """``y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ``; saves h = drop(x) Aᵀ."""

    name = "lora_linear"
    tensors = ("input", "weight", "lora_A", "lora_B", "bias")
    optional = frozenset({"bias"})
    consts = (("scaling", "float"), ("dropout_p", "float"))
    saved = ("h",)
    autocast_args = ("input", "weight", "lora_A", "lora_B", "bias")
    scaled = "lora_B"
    torch_impl = TorchLoRALinear
    triton_impl = "fastlora.autograd:TritonLoRALinear"

    def check(self, a):
        check_linear_shapes(self.name, a["input"], a["weight"], a["lora_A"], a["lora_B"], a["bias"])

    def check_dtypes(self, a):
        check_linear_dtypes(self.name, a["input"], a["weight"], a["lora_A"], a["lora_B"], a["bias"])

    def fake(self, x, weight, lora_A, lora_B, bias, scaling, dropout_p):
        M = x.shape[0]
        return x.new_empty(M, weight.shape[0]), x.new_empty(M, lora_A.shape[0], dtype=reference.h_dtype(x.dtype))

    def differentiable_forward(self, tensors, saved, consts, seed, use_triton):
        return differentiable_forward(*tensors, *consts, seed, use_triton)


def check_linear_shapes(who, input, weight, lora_A, lora_B, bias, N=None, K=None) -> None:
    """The shapes of a LoRA linear: input (..., K), weight (N, K) (or N, K given: a packed weight), lora_A (r, K),
    lora_B (N, r), bias (N,)."""
    if input.dim() < 1:
        raise ValueError(f"{who}: input must have at least 1 dimension (..., in_features), got a scalar")
    named = {"lora_A": lora_A, "lora_B": lora_B} if weight is None else {"weight": weight, "lora_A": lora_A,
                                                                         "lora_B": lora_B}
    for name, t in named.items():
        if t.dim() != 2:
            raise ValueError(f"{who}: {name} must be 2-D, got shape {_shape(t)}")
    if bias is not None and bias.dim() != 1:
        raise ValueError(f"{who}: bias must be 1-D (out_features,), got shape {_shape(bias)}")
    wdesc = f"weight {_shape(weight)}" if weight is not None else f"the weight ({N}, {K})"
    if weight is not None:
        N, K = weight.shape
    r = lora_A.shape[0]
    if input.shape[-1] != K:
        raise ValueError(f"{who}: input {_shape(input)} has {input.shape[-1]} features but {wdesc} expects "
                         f"in_features={K}")
    if lora_A.shape[1] != K:
        raise ValueError(f"{who}: lora_A {_shape(lora_A)} must be (r, in_features={K}) to match {wdesc}")
    if r < 1:
        raise ValueError(f"{who}: rank must be >= 1, got lora_A {_shape(lora_A)}")
    if lora_B.shape[1] != r:
        raise ValueError(f"{who}: rank mismatch: lora_A {_shape(lora_A)} has r={r} but lora_B {_shape(lora_B)} has "
                         f"r={lora_B.shape[1]}")
    if lora_B.shape[0] != N:
        raise ValueError(f"{who}: lora_B {_shape(lora_B)} must be (out_features={N}, r) to match {wdesc}")
    if bias is not None and bias.shape[0] != N:
        raise ValueError(f"{who}: bias {_shape(bias)} must be (out_features={N},) to match {wdesc}")


def check_linear_dtypes(who, input, weight, lora_A, lora_B, bias) -> None:
    if weight is not None and weight.dtype != input.dtype:
        raise TypeError(f"{who}: input dtype {input.dtype} and weight dtype {weight.dtype} differ (as in nn.Linear, "
                        "they must match; use torch.autocast for mixed precision)")
    if bias is not None and bias.dtype != input.dtype:
        raise TypeError(f"{who}: bias dtype {bias.dtype} must match input dtype {input.dtype}")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"{who}: lora_A dtype {lora_A.dtype} and lora_B dtype {lora_B.dtype} differ")


LORA_LINEAR = LoRALinearOp()
