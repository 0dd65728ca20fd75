"""The fuser for PEFT's ``lora.Linear``: an ``nn.Linear`` or transformers ``Conv1D`` base, one or several plain
LoRA adapters (``lora_bias`` and dropout included), run through ``fastlora.lora_linear`` /
``lora_linear_multi`` on the layer's own parameters.

DoRA and other variants, and quantized bases (4-bit, 8-bit), are other fusers' business: this one names them as
the reason it cannot run them, and the fusers registered for them (with a higher priority) claim them first.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..functional import lora_linear_multi
from ..op_common import autocast_enabled
from . import registry
from .registry import active_dropout_p, dropout_reason, is_conv1d, variant_name

__all__ = ["claims", "why_not", "forward", "FUSER"]


def _peft_linear():
    return registry.peft_lora_class("Linear")


def base_kind_reason(base: nn.Module) -> Optional[str]:
    """Why this base layer is not a plain float nn.Linear / Conv1D, or None."""
    name = type(base).__name__
    if "4bit" in name:
        return "4-bit base"
    if "8bit" in name:
        return "8-bit base"
    weight = base._parameters.get("weight") if "weight" in base._parameters else getattr(base, "weight", None)
    if (not isinstance(weight, torch.Tensor) or type(weight) not in (torch.Tensor, nn.Parameter)
            or not weight.is_floating_point()):
        return f"quantized base weight ({name})"
    if type(base) is nn.Linear or (isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward):
        return None
    if is_conv1d(base):
        return None
    return f"base layer {name} (custom forward)"


def base_of(layer: nn.Module) -> nn.Module:
    """The layer's ``base_layer``, read from ``_modules``: the layer holding the weight, since ``why_not`` refuses
    nested tuner layers (``registry.nested_base_reason``)."""
    return layer._modules["base_layer"]


def claims(layer: nn.Module, adapter: str) -> bool:
    """PEFT's lora.Linear, and PEFT's other linear LoRA layers (``lora.bnb.Linear4bit``, ``lora.hqq``, ...) so that
    ``why_not`` can name their base (4-bit, 8-bit, quantized) when no fuser of their own is registered."""
    if adapter not in layer._modules["lora_A"]._modules:
        return False
    cls = type(layer)
    return isinstance(layer, _peft_linear()) or (cls.__module__.startswith("peft.tuners.lora.")
                                                  and "Linear" in cls.__name__)


def why_not(layer: nn.Module, adapter: str) -> Optional[str]:
    # (runs on every call: submodules and parameters are read from _modules / _parameters, not nn.Module.__getattr__)
    variant = variant_name(layer, adapter)
    if variant is not None:
        return variant
    reason = registry.nested_base_reason(layer) or base_kind_reason(base_of(layer))
    if reason is not None:
        return reason
    if type(layer).forward is not _peft_linear().forward:
        return f"{type(layer).__name__} overrides PEFT's forward"
    mods = layer._modules
    A, B = mods["lora_A"]._modules[adapter], mods["lora_B"]._modules[adapter]
    if type(A) is not nn.Linear or type(B) is not nn.Linear or A._parameters["bias"] is not None:
        return "custom lora_A / lora_B modules"
    if not A._parameters["weight"].is_floating_point() or not B._parameters["weight"].is_floating_point():
        return "non-float adapter weights"
    return dropout_reason(mods["lora_dropout"]._modules[adapter])


def _scaled(t: torch.Tensor, s) -> torch.Tensor:
    return t * (s.to(t.dtype) if isinstance(s, torch.Tensor) else s)


def forward(layer: nn.Module, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
    """PEFT's ``lora.Linear.forward(x)`` for these active adapters, in one fused call."""
    base = base_of(layer)
    # Conv1D keeps its weight as (in, out): the (out, in) operand is its transposed view, by strides, no copy
    weight = base.weight.t() if is_conv1d(base) else base.weight
    if not x.is_floating_point() or (x.dtype != weight.dtype and not autocast_enabled(x.device.type)):
        return type(layer).forward(layer, x)  # PEFT's base layer raises or casts its own way: let it
    bias = base.bias
    for a in adapters:  # lora_bias: lora_B(h)·s = (h Bᵀ + b)·s, i.e. s·b joins the base bias
        b = layer.lora_B[a].bias
        if b is not None:
            extra = _scaled(b, layer.scaling[a]).to(weight.dtype)
            bias = extra if bias is None else bias + extra
    As, Bs, ss, ps = [], [], [], []
    for a in adapters:
        dropout = layer.lora_dropout[a]
        As.append(layer.lora_A[a].weight)
        Bs.append(layer.lora_B[a].weight)
        ss.append(layer.scaling[a])
        ps.append(active_dropout_p(dropout))
    return lora_linear_multi(x, weight, As, Bs, bias, scalings=ss, dropout_ps=ps, training=True)


FUSER = registry.register(registry.Fuser("linear", claims, why_not, forward, priority=0))
