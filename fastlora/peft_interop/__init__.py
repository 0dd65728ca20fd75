"""``accelerate_peft``: run an existing PEFT model's LoRA linear layers through fastlora's fused op, in place.

Only the forward of each PEFT ``lora.Linear`` changes: it calls ``fastlora.lora_linear`` with the layer's own
parameters (``base_layer.weight``/``bias``, ``lora_A[name].weight``, ``lora_B[name].weight``), so PEFT's training
loop, optimizer state, ``save_pretrained`` and adapter management are untouched. peft is imported only here.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ..functional import lora_linear

__all__ = ["accelerate_peft", "is_accelerated"]

_FLAG = "_fastlora_accelerated"


def _dropout_p(dropout: nn.Module):
    """p of PEFT's lora_dropout entry (nn.Dropout or nn.Identity), or None for anything else."""
    if type(dropout) is nn.Identity:
        return 0.0
    if type(dropout) is nn.Dropout:
        return float(dropout.p)
    return None


def _fast_path(module, x: torch.Tensor, args, kwargs):
    """(name, dropout_p, dropout_training) when this call can take the fused op, else None (PEFT's path)."""
    if args or kwargs or module.disable_adapters or module.merged:
        return None  # adapter_names (mixed batches), variant kwargs, disabled or merged adapters: PEFT's own code
    active = module.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in module.lora_A or _variant(module, name) or module.lora_B[name].bias is not None:
        return None
    dropout = module.lora_dropout[name]
    p = _dropout_p(dropout)
    if p is None:
        return None
    weight = module.get_base_layer().weight
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return None  # PEFT's base layer would raise or cast its own way: let it
    return name, p, dropout.training


def _variant(module, name: str) -> str | None:
    """The name of a LoRA variant (DoRA, ...) on adapter ``name``; peft < 0.15 marks DoRA in ``use_dora`` only."""
    variant = getattr(module, "lora_variant", {}).get(name)
    if variant is not None:
        return "DoRA" if "Dora" in type(variant).__name__ else f"LoRA variant {type(variant).__name__}"
    if getattr(module, "use_dora", {}).get(name, False):
        return "DoRA"
    return None


class _AcceleratedForward:
    """The instance-level ``forward`` of an accelerated layer (an object rather than a bound function, so that
    the model still pickles and deep-copies)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        module = self.module
        fast = _fast_path(module, x, args, kwargs)
        if fast is None:
            return type(module).forward(module, x, *args, **kwargs)
        name, p, training = fast
        base = module.get_base_layer()
        return lora_linear(x, base.weight, module.lora_A[name].weight, module.lora_B[name].weight, base.bias,
                           scaling=module.scaling[name], dropout_p=p, training=training)


def _why_not(module) -> str | None:
    """Why a PEFT lora.Linear cannot take the fused op, or None if it can."""
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) > 1:
        return f"{len(active)} active adapters"
    if not active:
        return "no active adapter"
    name = active[0]
    variant = _variant(module, name)
    if variant is not None:
        return variant
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out (Conv1D weight layout)"
    if module.lora_B[name].bias is not None:
        return "lora_bias"
    if _dropout_p(module.lora_dropout[name]) is None:
        return f"lora_dropout is a {type(module.lora_dropout[name]).__name__}"
    base = module.get_base_layer()
    if type(base) is not nn.Linear and type(base).forward is not nn.Linear.forward:
        return f"base layer {type(base).__name__} (quantized or custom)"
    w = getattr(base, "weight", None)
    if not isinstance(w, torch.Tensor) or type(w) not in (torch.Tensor, nn.Parameter) or not w.is_floating_point():
        return "quantized base weight"
    if type(module.lora_A[name]) is not nn.Linear or type(module.lora_B[name]) is not nn.Linear:
        return "custom lora_A / lora_B modules"
    return None


def is_accelerated(module: nn.Module) -> bool:
    return bool(module.__dict__.get(_FLAG, False))


def accelerate_peft(peft_model: nn.Module) -> nn.Module:
    """Swap the forward of every PEFT ``lora.Linear`` whose adapter fastlora can run for one that calls
    ``fastlora.lora_linear`` on the layer's own parameters; returns ``peft_model`` (changed in place).

    The new forward computes ``base(x) + scaling · lora_B(lora_A(dropout(x)))`` with PEFT's parameters and
    dropout probability, and defers to PEFT's own forward whenever PEFT would do something else: adapters disabled
    or merged, several active adapters, ``adapter_names`` passed. Layers that cannot be accelerated at all (DoRA and
    other variants, several active adapters, ``lora_bias``, quantized or Conv1D bases) keep PEFT's path and are
    named in one warning. Calling it twice is harmless.
    """
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("accelerate_peft needs peft: pip install peft (or pip install fastlora[peft])") from e
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"accelerate_peft expects a PEFT model (an nn.Module), got {type(peft_model).__name__}")
    skipped, found = [], 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, lora_layer.Linear):
            continue
        found += 1
        if is_accelerated(module):
            continue
        reason = _why_not(module)
        if reason is not None:
            skipped.append(f"{name} ({reason})")
            continue
        module.forward = _AcceleratedForward(module)
        module.__dict__[_FLAG] = True
    if found == 0:
        warnings.warn("accelerate_peft: the model has no PEFT lora.Linear layer; nothing was changed")
    if skipped:
        warnings.warn(f"accelerate_peft: {len(skipped)} of {found} LoRA linear layers keep PEFT's forward: "
                      + ", ".join(skipped))
    return peft_model
