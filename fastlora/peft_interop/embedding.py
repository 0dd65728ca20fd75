"""The fuser for PEFT's ``lora.Embedding`` on a plain ``nn.Embedding``: the base lookup and the first adapter's
``s · Aᵀ[ids] Bᵀ`` through ``fastlora.lora_embedding``, each further adapter's added in place (one ``addmm_`` per
adapter, nothing (…, dim) allocated beside the output)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..embedding import add_embedding_update
from ..functional import lora_embedding
from . import registry
from .registry import variant_name

__all__ = ["claims", "why_not", "forward", "FUSER"]


def _peft_embedding():
    return registry.peft_lora_class("Embedding")


def claims(layer: nn.Module, adapter: str) -> bool:
    return isinstance(layer, _peft_embedding()) and adapter in layer.lora_embedding_A


def why_not(layer: nn.Module, adapter: str) -> Optional[str]:
    variant = variant_name(layer, adapter)
    if variant is not None:
        return variant
    nested = registry.nested_base_reason(layer)
    if nested is not None:
        return nested
    base = layer.get_base_layer()
    if not (type(base) is nn.Embedding or (isinstance(base, nn.Embedding) and type(base).forward is nn.Embedding.forward
                                           and not hasattr(base, "embed_scale"))):
        return f"base layer {type(base).__name__} (custom forward)"
    if type(layer).forward is not _peft_embedding().forward:
        return f"{type(layer).__name__} overrides PEFT's forward"
    if getattr(layer, "input_fns", {}).get(adapter) is not None or getattr(layer, "output_fns", {}).get(adapter):
        return "tensor-parallel input/output functions"
    if not layer.lora_embedding_A[adapter].is_floating_point():
        return "non-float adapter weights"
    return None


def forward(layer: nn.Module, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
    """PEFT's ``lora.Embedding.forward(x)`` for these active adapters."""
    base = layer.get_base_layer()
    opts = (base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
    first, rest = adapters[0], adapters[1:]
    result = lora_embedding(x, base.weight, layer.lora_embedding_A[first], layer.lora_embedding_B[first],
                            scaling=layer.scaling[first], padding_idx=opts[0], max_norm=opts[1], norm_type=opts[2],
                            scale_grad_by_freq=opts[3], sparse=opts[4])
    for a in rest:
        result = add_embedding_update(result, x, layer.lora_embedding_A[a], layer.lora_embedding_B[a],
                                      layer.scaling[a], opts)
    return result


FUSER = registry.register(registry.Fuser("embedding", claims, why_not, forward, priority=0))
