r"""What every op (LoRA linear, LoRA embedding, DoRA, 4-bit LoRA) shares, written once: the checks of the
arguments they all take, autocast, flattening to 2-D, the dropout seed, the tensor scaling, and the double
backward.

Double backward. The ops' backward bodies are kernels or in-place PyTorch compositions: first-order only. A
caller that differentiates a gradient (``autograd.grad(..., create_graph=True)``, gradient penalties, Hessian-vector
products) gets, instead, the gradients of the op's plain PyTorch formula (``recompute_grads``): the forward is
recomputed from the saved inputs with differentiable ops (the same dropout mask, regenerated from the saved seed)
and differentiated by autograd, so the second derivatives are exact. The first-order backward pays nothing for it.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = ["check_scaling", "check_dropout", "autocast_enabled", "autocast", "flatten_rows", "draw_seed",
           "fold_tensor_scaling", "recompute_grads"]

AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves float64 alone


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def check_scaling(scaling, device, who: str) -> None:
    """A finite real number, or a one-element floating-point tensor without gradient (PEFT's hot-swap scaling,
    ``prepare_model_for_compiled_hotswap``). A NaN or infinite number is refused: PEFT would turn every output of
    the layer into NaN / inf, and no scaling of a trained adapter is meant to."""
    if isinstance(scaling, Tensor):
        if scaling.numel() != 1 or not scaling.is_floating_point():
            raise TypeError(f"{who}: a tensor scaling must be a one-element floating-point tensor, got "
                            f"shape {_shape(scaling)} dtype {scaling.dtype}")
        if scaling.requires_grad:
            raise ValueError(f"{who}: scaling gets no gradient; pass scaling.detach()")
        if scaling.device != device and scaling.device.type != "cpu":
            raise ValueError(f"{who}: scaling is on {scaling.device} but input on {device}")
        return
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"{who}: scaling must be a real number or a 0-d tensor, got {scaling!r}")
    if not math.isfinite(float(scaling)):
        raise ValueError(f"{who}: scaling must be finite, got {scaling!r}")


def check_dropout(dropout_p, who: str) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"{who}: dropout_p must be a float in [0, 1), got {dropout_p!r}")


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for the meta device (which autocast does not know: big-model
    loading runs modules on meta tensors)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def autocast(device_type: str, *tensors, eligible=AUTOCAST_ELIGIBLE):
    """Cast to the autocast dtype where autocast is on for this device, as nn.Linear's matmul is."""
    if not autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.dtype in eligible else t for t in tensors)


def flatten_rows(input: Tensor) -> Tensor:
    """(..., K) as (M, K), M the product of the leading sizes (K = 0 included, where reshape(-1, 0) is ambiguous)."""
    if input.dim() == 2:
        return input
    return input.reshape(math.prod(input.shape[:-1]), input.shape[-1])


def draw_seed(dropout_p: float) -> int:
    """The dropout seed, from torch's default (CPU) generator: torch.manual_seed makes runs repeatable, and
    activation checkpointing, which restores the RNG state, recomputes the same mask. Eager and compiled code
    draw it the same way (inside the op), so they consume the generator alike and see the same masks."""
    if dropout_p > 0.0:
        return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    return 0


def fold_tensor_scaling(lora_B: Tensor, scaling):
    """(B', s') with s'·B' = scaling·B, s' a Python float: a tensor scaling (PEFT's hot-swap scaling) is folded into
    B by an autograd-visible product, so dL/dB = scaling·dL/dB' comes from autograd, and the op underneath sees a
    plain float. An (N, r) product on B's device: its value is never read on the host."""
    if isinstance(scaling, Tensor):
        return lora_B * scaling.reshape(()).to(lora_B.dtype), 1.0
    return lora_B, float(scaling)


def recompute_grads(forward, inputs, needs, grad_y: Tensor):
    """Gradients of ``forward(*inputs)`` (a differentiable PyTorch formula of the op) wrt the inputs flagged in
    ``needs`` (None elsewhere), with ``create_graph=True``: what an op's backward returns when autograd asks for a
    differentiable gradient (double backward). ``inputs`` are the tensors the forward saved (the caller's own,
    so that the returned gradients are functions of them)."""
    wrt = [t for t, need in zip(inputs, needs) if need and t is not None]
    with torch.enable_grad():
        y = forward(*inputs)
        grads = iter(torch.autograd.grad(y, wrt, grad_y, create_graph=True, allow_unused=True))
    out = []
    for t, need in zip(inputs, needs):
        if need and t is not None:
            g = next(grads)
            out.append(torch.zeros_like(t) if g is None else g)
        else:
            out.append(None)
    return out
