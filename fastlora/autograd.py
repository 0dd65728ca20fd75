r"""The LoRA linear op and its exact gradients: an autograd.Function for eager code, and ``torch.library``
custom ops (with fake kernels and a registered autograd) that ``torch.compile`` traces without a graph break.

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

Two thin wrappers share one forward and one backward body, which pick the implementation: the Triton kernels
(``fastlora.kernels``) or the pure-PyTorch math (``fastlora.reference``), both exposing ``lora_forward`` /
``lora_backward`` with the same signature:

* eager code runs a ``torch.autograd.Function`` (a few µs of host overhead per call);
* code being compiled runs ``torch.library`` custom ops with fake kernels and a registered autograd, so
  ``torch.compile(fullgraph=True)`` traces through without a graph break (their Python dispatch costs tens of
  µs per call, which a compiled graph pays once at trace time, and eager decode-sized calls should not pay).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend as _backend
from . import reference
from .op_common import draw_seed as _draw_seed
from .op_common import recompute_grads

__all__ = ["lora_linear_train", "lora_linear_infer"]


def _impl(use_triton: bool):
    if use_triton:
        from fastlora.kernels import lora_linear as kernels  # imported on first use: importing triton is slow and optional

        return kernels
    return reference


def _fold_scaling(lora_B: Tensor, scaling):
    """(B', s') with s'·B' = scaling·B and s' a Python float, as the launch helpers take it.

    A float scaling stays as it is. A tensor scaling (0-d, as PEFT's ``prepare_model_for_compiled_hotswap`` makes
    it) goes into B: an (N, r) product on B's device, so its value is never read on the host (no device sync, and
    a compiled graph that takes it as an input need not be recompiled when it changes)."""
    if isinstance(scaling, Tensor):
        return lora_B * scaling.to(lora_B.dtype), 1.0
    return lora_B, scaling


def _forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, use_triton, save_h):
    """(y, h or None, seed)."""
    seed = _draw_seed(dropout_p)
    lora_B, scaling = _fold_scaling(lora_B, scaling)
    with _backend.kernel_section(use_triton):
        y, h = _impl(use_triton).lora_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed,
                                              save_h=save_h)
    return y, h, seed


def _needs(ctx) -> list[bool]:
    """[dx, dW, dA, dB, dbias]: what autograd asks for; dW and dbias only for tensors that require grad."""
    nx, nw, na, nb, nbias = ctx.needs_input_grad[:5]
    return [nx, nw, na, nb, nbias and ctx.has_bias]


def _backward(grad_y, x, weight, lora_A, lora_B, h, seed: int, scaling, dropout_p, use_triton, needs):
    folded_B, s = _fold_scaling(lora_B, scaling)
    with _backend.kernel_section(use_triton):
        dx, dW, dA, dB, dbias = _impl(use_triton).lora_backward(grad_y, x, weight, lora_A, folded_B, h, s,
                                                                dropout_p, seed, *needs)
    if dB is not None and isinstance(scaling, Tensor):  # dB' is the gradient wrt B' = scaling·B
        dB = (dB * scaling.to(dB.dtype)).to(lora_B.dtype)
    return dx, dW, dA, dB, dbias


def keep_mask(seed: int, shape, dropout_p: float, device, use_triton: bool) -> Tensor:
    """The keep mask (True = kept) that the forward of this backend drew for ``seed``, materialized."""
    if use_triton:
        from fastlora.kernels.dropout import dropout_keep_mask

        with _backend.kernel_section(True):
            return dropout_keep_mask(seed, shape, dropout_p, device)
    return reference.dropout_keep_mask(seed, shape, dropout_p, device)


def differentiable_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed: int, use_triton: bool):
    """The op's forward in differentiable PyTorch ops (PEFT's formula, with the op's own dropout mask): what a double
    backward differentiates. The low-rank branch runs in the adapters' dtype, as PEFT's."""
    xd = x
    if dropout_p > 0.0:
        keep = keep_mask(seed, x.shape, dropout_p, x.device, use_triton)
        xd = torch.where(keep, x * (1.0 / (1.0 - dropout_p)), 0.0)
    low = F.linear(F.linear(xd.to(lora_A.dtype), lora_A), lora_B.to(lora_A.dtype))
    low = low * (scaling.to(low.dtype) if isinstance(scaling, Tensor) else scaling)
    return F.linear(x, weight, bias) + low.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Eager: an autograd.Function
# ---------------------------------------------------------------------------------------------------------

class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling, dropout_p, use_triton):
        # scaling: a float, or a 0-d tensor that gets no gradient (PEFT's hot-swap scaling)
        y, h, seed = _forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, use_triton, save_h=True)
        ctx.save_for_backward(x, weight, lora_A, lora_B, bias, h)
        ctx.seed, ctx.scaling, ctx.dropout_p, ctx.use_triton = seed, scaling, dropout_p, use_triton
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, bias, h = ctx.saved_tensors
        needs = _needs(ctx)
        if not any(needs):
            return (None,) * 8
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is differentiated again (op_common)
            def forward(x, weight, lora_A, lora_B, bias):
                return differentiable_forward(x, weight, lora_A, lora_B, bias, ctx.scaling, ctx.dropout_p, ctx.seed,
                                              ctx.use_triton)

            return (*recompute_grads(forward, (x, weight, lora_A, lora_B, bias), needs, grad_y), None, None, None)
        grads = _backward(grad_y, x, weight, lora_A, lora_B, h, ctx.seed, ctx.scaling, ctx.dropout_p,
                          ctx.use_triton, needs)
        return (*grads, None, None, None)


# ---------------------------------------------------------------------------------------------------------
# Compiled: torch.library custom ops
# ---------------------------------------------------------------------------------------------------------

@torch.library.custom_op("fastlora::lora_linear_fwd", mutates_args=())
def _lora_linear_fwd(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
    scaling: float, dropout_p: float, use_triton: bool, scale: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y, h, seed); the seed (a CPU int64 scalar) is saved for the backward's mask. ``scale``, when given,
    is a 0-d tensor scaling that replaces the float ``scaling`` (a graph input: its value may change between
    calls of a compiled graph)."""
    s = scale if scale is not None else scaling
    y, h, seed = _forward(x, weight, lora_A, lora_B, bias, s, dropout_p, use_triton, save_h=True)
    return y, h, torch.full((), seed, dtype=torch.int64)


@_lora_linear_fwd.register_fake
def _(x, weight, lora_A, lora_B, bias, scaling, dropout_p, use_triton, scale=None):
    M = x.shape[0]
    y = x.new_empty(M, weight.shape[0])
    h = x.new_empty(M, lora_A.shape[0], dtype=reference.h_dtype(x.dtype))
    return y, h, torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op("fastlora::lora_linear_infer", mutates_args=())
def _lora_linear_infer(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
    scaling: float, dropout_p: float, use_triton: bool, scale: Optional[Tensor] = None,
) -> Tensor:
    s = scale if scale is not None else scaling
    return _forward(x, weight, lora_A, lora_B, bias, s, dropout_p, use_triton, save_h=False)[0]


@_lora_linear_infer.register_fake
def _(x, weight, lora_A, lora_B, bias, scaling, dropout_p, use_triton, scale=None):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("fastlora::lora_linear_bwd", mutates_args=())
def _lora_linear_bwd(
    grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor, seed: Tensor,
    scaling: float, dropout_p: float, use_triton: bool, needs_grad: list[bool], scale: Optional[Tensor] = None,
) -> list[Tensor]:
    """Returns [dx, dW, dA, dB, dbias]; a gradient that is not needed comes back as an empty tensor
    (custom ops cannot return None)."""
    s = scale if scale is not None else scaling
    grads = _backward(grad_y, x, weight, lora_A, lora_B, h, int(seed), s, dropout_p, use_triton, needs_grad)
    # Contiguous, as the fake kernel promises (a transposed product would otherwise leak its strides).
    return [g.contiguous() if g is not None else grad_y.new_empty(0) for g in grads]


@_lora_linear_bwd.register_fake
def _(grad_y, x, weight, lora_A, lora_B, h, seed, scaling, dropout_p, use_triton, needs_grad, scale=None):
    like = (x, weight, lora_A, lora_B, grad_y.new_empty(weight.shape[0]))
    return [t.new_empty(t.shape) if need else grad_y.new_empty(0) for t, need in zip(like, needs_grad)]


def _setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, bias, scaling, dropout_p, use_triton, *rest = inputs
    scale = rest[0] if rest else None
    _, h, seed = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, h, seed, scale)
    ctx.scaling, ctx.dropout_p, ctx.use_triton = scaling, dropout_p, use_triton
    ctx.has_bias = bias is not None


def _custom_op_backward(ctx, grad_y, grad_h, grad_seed):
    # h and seed are internal outputs that callers never use: their gradients are ignored.
    x, weight, lora_A, lora_B, h, seed, scale = ctx.saved_tensors
    needs = _needs(ctx)
    if not any(needs):
        return (None,) * 9
    grads = _lora_linear_bwd(
        grad_y, x, weight, lora_A, lora_B, h, seed, ctx.scaling, ctx.dropout_p, ctx.use_triton, needs, scale
    )
    return (*[g if need else None for g, need in zip(grads, needs)], None, None, None, None)


torch.library.register_autograd("fastlora::lora_linear_fwd", _custom_op_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------
# Entry points for fastlora.functional (2-D x)
# ---------------------------------------------------------------------------------------------------------

def _op_scaling(scaling):
    """(float, tensor or None) arguments of the custom ops for a float or 0-d tensor scaling."""
    return (1.0, scaling) if isinstance(scaling, Tensor) else (scaling, None)


def lora_linear_train(x, weight, lora_A, lora_B, bias, scaling, dropout_p, use_triton) -> Tensor:
    """With autograd: saves x, h and the seed. ``scaling``: a float or a 0-d tensor (no gradient)."""
    if torch.compiler.is_compiling():
        s, scale = _op_scaling(scaling)
        return _lora_linear_fwd(x, weight, lora_A, lora_B, bias, s, dropout_p, use_triton, scale)[0]
    return LoRALinearFunction.apply(x, weight, lora_A, lora_B, bias, scaling, dropout_p, use_triton)


def lora_linear_infer(x, weight, lora_A, lora_B, bias, scaling, dropout_p, use_triton) -> Tensor:
    """Without autograd: saves nothing and skips h's store."""
    if torch.compiler.is_compiling():
        s, scale = _op_scaling(scaling)
        return _lora_linear_infer(x, weight, lora_A, lora_B, bias, s, dropout_p, use_triton, scale)
    return _forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, use_triton, save_h=False)[0]
