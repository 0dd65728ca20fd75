"""The fuser for PEFT's ``ParamWrapper`` on the expert parameters of a transformers 5.x mixture-of-experts module
(``LoraConfig(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])``): the whole experts
forward, with LoRA on each adapted parameter, through ``fastlora.moe.lora_experts_forward``.

PEFT adapts a parameter by registering a parametrization that builds the full (E, out, in) delta of every expert
on each forward and differentiates through it; two adapted parameters of one module are two nested
``ParamWrapper``s (the outer one is the module its parent calls). This fuser runs on the outer wrapper and takes
the LoRA of every wrapper of the chain into one computation: the routed tokens are sorted by expert once, and each
projection is one grouped op, ``x W_eᵀ + s·(x A_eᵀ) B_eᵀ``, with no delta formed. The inner wrappers are never
called then (``fused_layers`` reports them fused as well: called on their own, they run through this fuser too).

What it takes: an experts module built with transformers' ``use_experts_implementation`` (its ``has_gate``,
``has_bias``, ``is_transposed`` and ``_apply_gate`` describe it; Qwen3-MoE, Mixtral, GPT-OSS, ...), not expert
parallel, with the eager, batched_mm or grouped_mm implementation (the math fastlora reproduces); adapters on
``gate_up_proj`` / ``up_proj`` / ``down_proj`` in PEFT's layout (read by ``fastlora.moe.peft_layout``). Anything
else keeps PEFT's path with the reason named.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from ..moe import ExpertLoRA, combine, lora_experts_forward, peft_layout, routing_args
from . import registry

__all__ = ["claims", "why_not", "forward", "FUSER"]

_IMPLEMENTATIONS = (None, "eager", "batched_mm", "grouped_mm")
_PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")
_PARAM_WRAPPER: list = []


def _param_wrapper_class():
    if not _PARAM_WRAPPER:
        from peft.tuners.lora.layer import ParamWrapper

        _PARAM_WRAPPER.append(ParamWrapper)
    return _PARAM_WRAPPER[0]


def claims(layer: nn.Module, adapter: str) -> bool:
    return isinstance(layer, _param_wrapper_class()) and adapter in layer._modules["lora_A"]._modules


def chain(layer: nn.Module) -> tuple[list, nn.Module]:
    """(the ParamWrappers from ``layer`` inwards, the module that holds the parameters)."""
    PW = _param_wrapper_class()
    wrappers, base = [layer], layer._modules["base_layer"]
    while isinstance(base, PW):
        wrappers.append(base)
        base = base._modules["base_layer"]
    return wrappers, base


def experts_reason(experts: nn.Module) -> Optional[str]:
    """Why fastlora cannot run this module's experts forward, or None."""
    d = experts.__dict__
    if not all(k in d for k in ("has_gate", "has_bias", "is_transposed")) or not hasattr(experts, "_apply_gate"):
        return f"{type(experts).__name__} is not a transformers experts module (use_experts_implementation)"
    if d.get("_is_expert_parallel", False):
        return "expert parallel experts"
    config = d.get("config")
    impl = getattr(config, "_experts_implementation", None)
    if impl not in _IMPLEMENTATIONS:
        return f"experts implementation {impl!r}"
    for name in ("gate_up_proj" if d["has_gate"] else "up_proj", "down_proj"):
        w = getattr(experts, name, None)
        if w is None or w.dim() != 3 or w.shape[0] != experts.num_experts or not w.is_floating_point():
            return f"{name} is not a float (E, ., .) expert stack"
    return None


def _wrapper_reason(w: nn.Module, adapters: list[str], experts: nn.Module) -> Optional[str]:
    name = w.parameter_name
    if name not in _PROJECTIONS:
        return f"LoRA on expert parameter {name!r}"
    if not experts.__dict__["has_gate"] and name == "gate_up_proj":
        return "gate_up_proj on experts without a gate"
    if w.num_experts != experts.num_experts:
        return f"{name}: {w.num_experts} experts in the adapter, {experts.num_experts} in the module"
    if bool(w.__dict__.get("_did_swap_in_out_features")) == bool(experts.__dict__["is_transposed"]):
        return f"{name}: PEFT's in/out orientation disagrees with the module's is_transposed"
    mods = w._modules
    for a in adapters:
        for attr in ("lora_A", "lora_B", "lora_dropout"):
            sub = mods[attr]._modules.get(a)
            if sub is not None and (sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks
                                    or sub._backward_pre_hooks or "forward" in sub.__dict__):
                return f"hook on {name} {attr}[{a!r}]"
        A, B = mods["lora_A"]._modules[a], mods["lora_B"]._modules[a]
        if type(A) is not nn.Linear or type(B) is not nn.Linear or A.bias is not None or B.bias is not None:
            return f"{name}: custom lora_A / lora_B modules"
        if not A.weight.is_floating_point() or not B.weight.is_floating_point():
            return f"{name}: non-float adapter weights"
        if registry.active_dropout_p(mods["lora_dropout"]._modules[a]) != 0.0:  # PEFT refuses dropout here
            return f"{name}: lora_dropout is a {type(mods['lora_dropout']._modules[a]).__name__}"
        variant = registry.variant_name(w, a)
        if variant is not None:
            return f"{name}: {variant}"
    return None


def _inner_adapters(w: nn.Module) -> list[str] | str:
    """The adapters an inner wrapper adds (PEFT's own forward, were it called), or the reason it cannot be fused."""
    if w.disable_adapters:
        return "nested ParamWrapper with adapters disabled" if w.merged else []
    if w.merged:
        return []  # its delta is in the weight already
    return [a for a in w.active_adapters if a in w._modules["lora_A"]._modules]


def why_not(layer: nn.Module, adapter: str) -> Optional[str]:
    wrappers, experts = chain(layer)
    reason = experts_reason(experts)
    if reason is not None:
        return reason
    seen = set()
    for i, w in enumerate(wrappers):
        adapters = [adapter] if i == 0 else _inner_adapters(w)
        if isinstance(adapters, str):
            return adapters
        if w.parameter_name in seen:
            return f"two ParamWrappers on {w.parameter_name}"
        seen.add(w.parameter_name)
        reason = _wrapper_reason(w, adapters, experts)
        if reason is not None:
            return reason
    return None


def _lora_of(w: nn.Module, adapters: list[str], num_experts: int) -> Optional[ExpertLoRA]:
    loras = []
    for a in adapters:
        A, B = peft_layout(w.lora_A[a].weight, w.lora_B[a].weight, num_experts)
        loras.append(ExpertLoRA(A, B, w.scaling[a]))
    return combine(loras) if loras else None


def forward(layer: nn.Module, x, adapters: list[str], *args, **kwargs):
    """PEFT's ``ParamWrapper.forward(x, top_k_index, top_k_weights)`` for the whole chain of wrappers, fused."""
    wrappers, experts = chain(layer)
    hidden, top_k_index, top_k_weights = routing_args(experts, (x,) + args, kwargs)
    loras = {}
    for i, w in enumerate(wrappers):
        lora = _lora_of(w, adapters if i == 0 else _inner_adapters(w), experts.num_experts)
        if lora is not None:
            loras[w.parameter_name] = lora
    return lora_experts_forward(experts, hidden, top_k_index, top_k_weights, loras)


FUSER = registry.register(registry.Fuser("moe_experts", claims, why_not, forward, priority=20, takes_args=True))
