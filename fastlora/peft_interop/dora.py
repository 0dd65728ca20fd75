"""The DoRA fuser: PEFT's DoRA adapters (``LoraConfig(use_dora=True)``) through ``fastlora.dora_linear`` /
``fastlora.dora_embedding``, which compute PEFT's DoRA without forming ``lora_B @ lora_A``.

It claims every adapter whose ``lora_variant`` is one of PEFT's DoRA variants (Linear, Embedding, Conv, and the
quantized layers that reuse ``DoraLinearVariant``), at priority 20, ahead of the plain and 4-bit fusers: a DoRA
adapter must never be run as plain LoRA by a fuser that only looks at the layer type. ``why_not`` then names
the ones it cannot run (Conv, quantized or custom bases, lora_bias, custom dropout),
which keep PEFT's forward. transformers' Conv1D (GPT-2, ``fan_in_fan_out``) runs fused, on a transposed view of
its weight.

With several active DoRA adapters, the first runs fused and the others through PEFT's own variant forward on
the running result, which is what PEFT does (its DoRA reuses the running result as the base output).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn

from ..dora import dora_embedding, dora_linear
from ..op_common import autocast_enabled
from .registry import Fuser, active_dropout_p, dropout_reason, is_conv1d, lora_variant, nested_base_reason, register

__all__ = ["claims", "why_not", "forward", "FUSER"]


def _kind(layer: nn.Module, adapter: str) -> Optional[str]:
    """"linear", "embedding", "conv", "other" for a DoRA adapter, None for anything else."""
    variant = lora_variant(layer, adapter)
    if variant is None:
        return None
    if variant == "DoRA":  # peft < 0.15 marks DoRA in use_dora only
        return "other"
    try:
        from peft.tuners.lora import variants as v
    except ImportError:  # pragma: no cover - peft without the variants module
        return "other" if "Dora" in type(variant).__name__ else None
    if isinstance(variant, v.DoraEmbeddingVariant):
        return "embedding"
    if isinstance(variant, v.DoraLinearVariant):
        return "linear"
    conv = getattr(v, "_DoraConvNdVariant", None)
    if conv is not None and isinstance(variant, conv):
        return "conv"
    return "other" if "Dora" in type(variant).__name__ else None


def claims(layer: nn.Module, adapter: str) -> bool:
    """Adapter ``adapter`` of ``layer`` is a PEFT DoRA adapter (of any layer type)."""
    return _kind(layer, adapter) is not None


def _plain_float_weight(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and type(w) in (torch.Tensor, nn.Parameter) and w.is_floating_point()


def why_not(layer: nn.Module, adapter: str) -> Optional[str]:
    """Why this claimed DoRA adapter cannot run fused, or None when it can."""
    kind = _kind(layer, adapter)
    if kind is None:
        return "not a DoRA adapter"
    if kind == "conv":
        return "DoRA on a Conv layer"
    if kind == "other":
        return "DoRA variant of an unsupported kind"
    nested = nested_base_reason(layer)
    if nested is not None:
        return nested
    base = layer.get_base_layer()
    if kind == "embedding":
        if type(base) is not nn.Embedding and type(base).forward is not nn.Embedding.forward:
            return f"DoRA on a base layer {type(base).__name__} (custom embedding)"
        if not _plain_float_weight(base):
            return "DoRA on a quantized base weight"
        return None
    if getattr(layer, "fan_in_fan_out", False):
        if not (is_conv1d(base) and getattr(base, "bias", None) is not None):
            return f"DoRA with fan_in_fan_out on a base layer {type(base).__name__}"
    elif type(base) is not nn.Linear and type(base).forward is not nn.Linear.forward:
        return f"DoRA on a base layer {type(base).__name__} (quantized or custom)"
    if not _plain_float_weight(base):
        return "DoRA on a quantized base weight"
    if getattr(layer.lora_B[adapter], "bias", None) is not None:
        return "DoRA with lora_bias"
    reason = dropout_reason(layer.lora_dropout[adapter])
    if reason is not None:
        return f"DoRA with {reason}"
    if type(layer.lora_A[adapter]) is not nn.Linear or type(layer.lora_B[adapter]) is not nn.Linear:
        return "DoRA with custom lora_A / lora_B modules"
    return None


def _peft_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return type(layer).forward(layer, x)


def _forward_linear(layer: nn.Module, x: torch.Tensor, adapters: List[str]) -> torch.Tensor:
    base = layer.get_base_layer()
    # Conv1D keeps W as (in, out): its transpose is a strided view, which the ops take as it is (no copy)
    weight = base.weight.t() if getattr(layer, "fan_in_fan_out", False) else base.weight
    bias = base.bias
    autocast = autocast_enabled(x.device.type)
    if x.dtype != weight.dtype and not autocast:
        return _peft_forward(layer, x)  # nn.Linear would raise, or PEFT casts its own way: its code decides
    first, rest = adapters[0], adapters[1:]
    dropout = layer.lora_dropout[first]
    training = bool(layer.training and dropout.training)
    p = active_dropout_p(dropout) if training else 0.0  # lora_dropout=1.0 runs fused in eval: no dropout then
    result = dora_linear(x, weight, layer.lora_A[first].weight, layer.lora_B[first].weight,
                         layer.lora_magnitude_vector[first].weight, bias, scaling=layer.scaling[first],
                         dropout_p=p, training=training)
    result_dtype = result.dtype
    for name in rest:  # PEFT's own code on the running result, as PEFT chains its adapters
        xa = layer._cast_input_dtype(x, layer.lora_A[name].weight.dtype)
        result = layer.lora_variant[name].forward(layer, active_adapter=name, x=xa, result=result)
    return result.to(result_dtype)


def _forward_embedding(layer: nn.Module, x: torch.Tensor, adapters: List[str]) -> torch.Tensor:
    base = layer.get_base_layer()
    result = base(x)
    result_dtype = result.dtype
    first, rest = adapters[0], adapters[1:]
    result = dora_embedding(x, base.weight, layer.lora_embedding_A[first], layer.lora_embedding_B[first],
                            layer.lora_magnitude_vector[first].weight, scaling=layer.scaling[first],
                            base_output=result, embed_scale=layer._get_embed_scale(), padding_idx=base.padding_idx,
                            max_norm=base.max_norm, norm_type=base.norm_type,
                            scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)  # PEFT's _embed
    for name in rest:
        result = layer.lora_variant[name].forward(layer, active_adapter=name, x=x, result=result)
    return result.to(result_dtype)


def forward(layer: nn.Module, x: torch.Tensor, adapters: List[str]) -> torch.Tensor:
    """PEFT's ``layer.forward(x)`` with exactly these active DoRA adapters, the first one fused."""
    if not adapters:
        return _peft_forward(layer, x)
    if _kind(layer, adapters[0]) == "embedding":
        return _forward_embedding(layer, x, list(adapters))
    return _forward_linear(layer, x, list(adapters))


FUSER = register(Fuser(name="dora", claims=claims, why_not=why_not, forward=forward, priority=20))
