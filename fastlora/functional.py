"""``lora_linear``: validate → autocast → flatten to 2-D → dispatch (Triton | PyTorch) → reshape."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import backend as _backend
from .autograd import lora_linear_infer, lora_linear_train

__all__ = ["lora_linear"]


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _validate(input, weight, lora_A, lora_B, bias, scaling, dropout_p) -> None:
    named = {"input": input, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"lora_linear: {name} must be a floating-point tensor, got dtype {t.dtype}")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"lora_linear: all tensors must be on one device, got {listing}")
    if input.dim() < 1:
        raise ValueError(f"lora_linear: input must have at least 1 dimension (..., in_features), got a scalar")
    for name in ("weight", "lora_A", "lora_B"):
        if named[name].dim() != 2:
            raise ValueError(f"lora_linear: {name} must be 2-D, got shape {_shape(named[name])}")
    if bias is not None and bias.dim() != 1:
        raise ValueError(f"lora_linear: bias must be 1-D (out_features,), got shape {_shape(bias)}")
    N, K = weight.shape
    r = lora_A.shape[0]
    if input.shape[-1] != K:
        raise ValueError(
            f"lora_linear: input {_shape(input)} has {input.shape[-1]} features but weight {_shape(weight)} "
            f"expects in_features={K}"
        )
    if lora_A.shape[1] != K:
        raise ValueError(
            f"lora_linear: lora_A {_shape(lora_A)} must be (r, in_features={K}) to match weight {_shape(weight)}"
        )
    if r < 1:
        raise ValueError(f"lora_linear: rank must be >= 1, got lora_A {_shape(lora_A)}")
    if lora_B.shape[1] != r:
        raise ValueError(
            f"lora_linear: rank mismatch: lora_A {_shape(lora_A)} has r={r} but lora_B {_shape(lora_B)} has "
            f"r={lora_B.shape[1]}"
        )
    if lora_B.shape[0] != N:
        raise ValueError(
            f"lora_linear: lora_B {_shape(lora_B)} must be (out_features={N}, r) to match weight {_shape(weight)}"
        )
    if bias is not None and bias.shape[0] != N:
        raise ValueError(f"lora_linear: bias {_shape(bias)} must be (out_features={N},) to match weight {_shape(weight)}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"lora_linear: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"lora_linear: scaling must be a real number, got {scaling!r}")


def _check_dtypes(input, weight, lora_A, lora_B, bias) -> None:
    if weight.dtype != input.dtype:
        raise TypeError(
            f"lora_linear: input dtype {input.dtype} and weight dtype {weight.dtype} differ (as in nn.Linear, "
            "they must match; use torch.autocast for mixed precision)"
        )
    if bias is not None and bias.dtype != input.dtype:
        raise TypeError(f"lora_linear: bias dtype {bias.dtype} must match input dtype {input.dtype}")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_linear: lora_A dtype {lora_A.dtype} and lora_B dtype {lora_B.dtype} differ")


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves float64 alone


def _autocast(device_type: str, *tensors):
    """Cast to the autocast dtype where autocast is on for this device, as nn.Linear's matmul is."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.dtype in _AUTOCAST_ELIGIBLE else t for t in tensors)


def lora_linear(
    input: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    bias: Tensor | None = None,
    *,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    r"""``input @ weightᵀ + bias + scaling · (dropout(input) @ lora_Aᵀ) @ lora_Bᵀ`` without forming B@A.

    input (..., in), weight (out, in), lora_A (r, in), lora_B (out, r), bias (out,) or None. Dropout acts on the
    LoRA branch only, and only when ``training`` and ``dropout_p > 0``. The output has input's dtype; the
    adapters may be in a wider dtype than input and weight (fp32 adapters on a bf16 base, as PEFT keeps them).
    Gradients flow to input, lora_A and lora_B, and to weight and bias only if they require grad.
    """
    _validate(input, weight, lora_A, lora_B, bias, scaling, dropout_p)
    input, weight, lora_A, lora_B, bias = _autocast(input.device.type, input, weight, lora_A, lora_B, bias)
    _check_dtypes(input, weight, lora_A, lora_B, bias)

    p = float(dropout_p) if training else 0.0
    use_triton = _backend.use_triton(input.device, input.dtype)

    x2d = input if input.dim() == 2 else input.reshape(-1, input.shape[-1])
    args = (x2d, weight, lora_A, lora_B, bias, float(scaling), p, use_triton)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, lora_A, lora_B, bias)
    )
    y = lora_linear_train(*args) if needs_grad else lora_linear_infer(*args)
    return y if input.dim() == 2 else y.reshape(*input.shape[:-1], weight.shape[0])
