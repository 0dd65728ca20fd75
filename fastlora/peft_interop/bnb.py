"""Fusers for PEFT's bitsandbytes LoRA layers (contract: ``registry.py``).

* ``bnb_4bit`` claims ``peft.tuners.lora.bnb.Linear4bit`` (QLoRA: NF4 / FP4 bases, with or without double
  quantization) and runs it through ``fastlora.lora_linear_4bit``: the base GEMM and every adapter in one op, no
  dequantized weight kept between calls or saved for the backward.
* ``bnb_8bit`` claims ``peft.tuners.lora.bnb.Linear8bitLt`` only to name why it stays on PEFT's path (an int8
  base with outlier decomposition: not fused).

Importing this module never fails: without peft or bitsandbytes the fusers claim nothing. Both register at import
with priority 10 (before the plain linear fuser, whose ``lora.Linear`` check would not match them anyway).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn

from ..op_common import autocast_enabled
from ..qlora import is_linear4bit, lora_linear_4bit, restore_canonical_layout
from .registry import Fuser, active_dropout_p, dropout_reason, nested_base_reason, register, variant_name

__all__ = ["FUSER_4BIT", "FUSER_8BIT"]


def _lora_bnb():
    """peft.tuners.lora.bnb, or None where peft or bitsandbytes is missing."""
    try:
        from peft.tuners.lora import bnb as lora_bnb
    except Exception:  # ImportError, or bitsandbytes failing to load its library
        return None
    return lora_bnb


def _peft_class(name: str):
    mod = _lora_bnb()
    return getattr(mod, name, None) if mod is not None else None


# ---------------------------------------------------------------------------------------------------------
# 4-bit
# ---------------------------------------------------------------------------------------------------------

def claims_4bit(layer: nn.Module, adapter: str) -> bool:
    cls = _peft_class("Linear4bit")
    return cls is not None and isinstance(layer, cls)


def why_not_4bit(layer: nn.Module, adapter: str) -> Optional[str]:
    if adapter not in layer.lora_A:
        return f"no LoRA adapter {adapter!r}"
    variant = variant_name(layer, adapter)
    if variant is not None:
        return f"{variant} on a 4-bit base"
    if type(layer.lora_A[adapter]) is not nn.Linear or type(layer.lora_B[adapter]) is not nn.Linear:
        return "custom lora_A / lora_B modules"
    if layer.lora_B[adapter].bias is not None:
        return "lora_bias"
    reason = dropout_reason(layer.lora_dropout[adapter]) or nested_base_reason(layer)
    if reason is not None:
        return reason
    base = layer.get_base_layer()
    if not is_linear4bit(base):
        return f"base layer {type(base).__name__} is not a bitsandbytes Linear4bit"
    import bitsandbytes as bnb

    if type(base).forward is not bnb.nn.Linear4bit.forward:
        return f"base layer {type(base).__name__} has its own forward"
    qs = getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)
    if qs is None:
        return "4-bit base weight not quantized yet"
    if getattr(qs, "quant_type", None) not in ("nf4", "fp4"):
        return f"4-bit quant_type {getattr(qs, 'quant_type', None)!r}"
    return None


def _base_input(base: nn.Module, x: torch.Tensor):
    """What bitsandbytes' Linear4bit.forward does before its matmul: (x in the compute dtype, bias in it)."""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(base)
    restore_canonical_layout(base.weight)  # bitsandbytes' CPU eval-mode repacking, if an earlier call did it
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    xc = x.to(base.compute_dtype) if base.compute_dtype is not None else x
    bias = base.bias.to(xc.dtype) if base.bias is not None else None
    return xc, bias


def forward_4bit(layer: nn.Module, x: torch.Tensor, adapters: List[str]) -> torch.Tensor:
    """PEFT's Linear4bit.forward(x) with exactly ``adapters`` active: base(x) + Σ scaling·B(A(dropout(x))).

    One fused op runs the base GEMM with the first adapter, or with all of them when no dropout is active (their
    A stacked along r, their B scaled and stacked: one rank-Σr update, exact). Further adapters with dropout are
    added as PEFT computes them (each its own mask)."""
    base = layer.get_base_layer()
    names = [a for a in adapters if a in layer.lora_A]
    if not names:
        return base(x)
    inp_dtype = x.dtype
    xc, bias = _base_input(base, x)
    ps = [active_dropout_p(layer.lora_dropout[a]) for a in names]
    As = [layer.lora_A[a].weight for a in names]
    Bs = [layer.lora_B[a].weight for a in names]
    rest: list[str] = []
    if len(names) == 1:
        A, B, s, p = As[0], Bs[0], layer.scaling[names[0]], ps[0]
    elif all(p == 0.0 for p in ps) and len({t.dtype for t in As + Bs}) == 1:
        A = torch.cat(As, dim=0)
        B = torch.cat([b * (s.to(b.dtype) if isinstance(s, torch.Tensor) else s)
                       for b, s in zip(Bs, (layer.scaling[a] for a in names))], dim=1)
        s, p = 1.0, 0.0
    else:
        A, B, s, p = As[0], Bs[0], layer.scaling[names[0]], ps[0]
        rest = names[1:]
    y = lora_linear_4bit(xc, base.weight, A, B, bias, scaling=s, dropout_p=p, training=p > 0.0).to(inp_dtype)
    for a in rest:  # PEFT's own unfused branch for the remaining adapters
        lora_A, lora_B = layer.lora_A[a], layer.lora_B[a]
        xa = x
        if not autocast_enabled(x.device.type):
            xa = layer._cast_input_dtype(x, lora_A.weight.dtype)
        y = y + (lora_B(lora_A(layer.lora_dropout[a](xa))) * layer.scaling[a]).to(inp_dtype)
    return y


FUSER_4BIT = register(Fuser("bnb_4bit", claims_4bit, why_not_4bit, forward_4bit, priority=10))


# ---------------------------------------------------------------------------------------------------------
# 8-bit: claimed so that the reason is named; never fused
# ---------------------------------------------------------------------------------------------------------

_WHY_8BIT = "8-bit base (bitsandbytes Linear8bitLt): not fused, PEFT's path"


def claims_8bit(layer: nn.Module, adapter: str) -> bool:
    cls = _peft_class("Linear8bitLt")
    return cls is not None and isinstance(layer, cls)


def why_not_8bit(layer: nn.Module, adapter: str) -> Optional[str]:
    return _WHY_8BIT


def forward_8bit(layer: nn.Module, x: torch.Tensor, adapters: List[str]) -> torch.Tensor:
    raise RuntimeError(f"fastlora: {_WHY_8BIT}; the router must keep PEFT's forward for this layer")


FUSER_8BIT = register(Fuser("bnb_8bit", claims_8bit, why_not_8bit, forward_8bit, priority=10))
