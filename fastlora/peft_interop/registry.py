"""The fusers: one for each kind of PEFT LoRA layer that fastlora can run through its fused ops.

A fuser is plain data. The router in this package (``accelerate_peft``) asks, for every PEFT LoRA layer and each
of its active adapters, which registered fuser claims it (the first one, in priority order), whether that fuser
can run it now (``why_not``), and if every active adapter of the layer is claimed by one fuser that can, it calls
``forward`` instead of PEFT's own forward. Everything else (adapters disabled or merged, hooks on the sub-layers,
adapters of different kinds active together) keeps PEFT's forward. Mixed-adapter batches (``adapter_names=``)
use the same fusers' ``claims`` / ``why_not`` to decide, and run through ``peft_interop.mixed``.

Contract for a fuser module (``linear``, ``embedding``, ``bnb``, ``dora``, ...):

* ``claims(layer, adapter) -> bool``: adapter ``adapter`` of PEFT LoRA layer ``layer`` is of this fuser's kind
  (e.g. a ``peft.tuners.lora.bnb.Linear4bit`` layer, or an adapter whose ``lora_variant`` is DoRA). Cheap, no
  side effects.
* ``why_not(layer, adapter) -> str | None``: the reason, in a few words shown to the user, that this claimed
  adapter cannot run fused right now, or None when it can.
* ``forward(layer, x, adapters) -> Tensor``: the full output of PEFT's ``layer.forward(x)`` with exactly these
  active adapters (base output plus every adapter's contribution), with PEFT's semantics: dropout only in
  training, each adapter its own independent dropout mask, output dtype as PEFT's. A fuser registered with
  ``takes_args=True`` is also given the call's other arguments, ``forward(layer, x, adapters, *args, **kwargs)``
  (an experts module's routing); the others run only for a plain ``layer(x)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn as nn

__all__ = ["Fuser", "register", "fusers", "fuser_for", "nested_base_reason", "dropout_p", "active_dropout_p",
           "dropout_reason", "lora_variant", "variant_name", "is_conv1d", "peft_lora_class"]


@dataclass(frozen=True)
class Fuser:
    name: str
    claims: Callable[[nn.Module, str], bool]
    why_not: Callable[[nn.Module, str], Optional[str]]
    forward: Callable[[nn.Module, torch.Tensor, List[str]], torch.Tensor]
    priority: int = 0  # higher is asked first: specific kinds (DoRA, 4-bit) before the plain linear one
    takes_args: bool = False  # forward(layer, x, adapters, *args, **kwargs): the layer's call has more arguments


_FUSERS: list[Fuser] = []


def register(fuser: Fuser) -> Fuser:
    """Add (or replace, by name) a fuser; returns it."""
    _FUSERS[:] = [f for f in _FUSERS if f.name != fuser.name]
    _FUSERS.append(fuser)
    _FUSERS.sort(key=lambda f: -f.priority)
    return fuser


def fusers() -> tuple[Fuser, ...]:
    return tuple(_FUSERS)


def fuser_for(layer: nn.Module, adapter: str) -> Optional[Fuser]:
    """The first registered fuser that claims adapter ``adapter`` of ``layer``, or None."""
    for f in _FUSERS:
        if f.claims(layer, adapter):
            return f
    return None


# --------------------------------------------------------------------------------------------------------------
# Checks every fuser shares
# --------------------------------------------------------------------------------------------------------------

def nested_base_reason(layer: nn.Module) -> Optional[str]:
    """Why ``layer``'s base layer is not the layer that holds its weight, or None. PEFT nests tuner layers: in a
    ``PeftMixedModel`` a LoRA layer added over a LoHa / LoKr layer has that layer as its ``base_layer``, whose own
    forward (and adapter) a fused call that went straight to the innermost weight would skip."""
    base = layer._modules.get("base_layer")
    if base is not None and "base_layer" in base._modules:
        return f"its base layer is another PEFT tuner layer ({type(base).__name__})"
    return None


def dropout_p(dropout: nn.Module) -> Optional[float]:
    """p of PEFT's lora_dropout entry (nn.Dropout or nn.Identity), or None for anything else."""
    if type(dropout) is nn.Identity:
        return 0.0
    if type(dropout) is nn.Dropout:
        return float(dropout.p)
    return None


def active_dropout_p(dropout: nn.Module) -> Optional[float]:
    """p of PEFT's lora_dropout entry in its current mode: 0 for nn.Identity or an nn.Dropout in eval mode, None for
    anything else."""
    p = dropout_p(dropout)
    return p if p is None or dropout.training else 0.0


def lora_variant(layer: nn.Module, adapter: str):
    """The LoRA variant object of ``adapter`` (PEFT >= 0.15: ``layer.lora_variant``), "DoRA" where an older PEFT
    marks DoRA in ``use_dora`` only, or None for plain LoRA."""
    variants = layer.__dict__.get("lora_variant")
    if variants is None:  # peft < 0.15 marks DoRA in use_dora only
        return "DoRA" if layer.__dict__.get("use_dora", {}).get(adapter, False) else None
    return variants.get(adapter)


def variant_name(layer: nn.Module, adapter: str) -> Optional[str]:
    """"DoRA" or the name of another LoRA variant on ``adapter``; None for plain LoRA."""
    variant = lora_variant(layer, adapter)
    if variant is None or variant == "DoRA":
        return variant
    name = type(variant).__name__
    return "DoRA" if "Dora" in name else f"LoRA variant {name}"


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2) with its own forward: weight (in, out), ``y = x @ weight + bias``. Checked
    without importing transformers."""
    for cls in type(module).__mro__:
        if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
            return type(module).forward is cls.forward
    return False


def dropout_reason(dropout: nn.Module) -> Optional[str]:
    """Why PEFT's lora_dropout entry cannot run fused right now, or None. ``LoraConfig(lora_dropout=1.0)`` drops
    every input of the branch in training: PEFT runs that (its branch is 0·x), the fused ops take p < 1."""
    p = dropout_p(dropout)
    if p is None:
        return f"lora_dropout is a {type(dropout).__name__}"
    if p >= 1.0 and dropout.training:
        return "lora_dropout=1.0 in training (the branch sees no input)"
    return None


_PEFT_CLASSES: dict[str, type] = {}


def peft_lora_class(name: str) -> type:
    """``peft.tuners.lora.layer.<name>`` (``Linear``, ``Embedding`` or ``LoraLayer``), imported on first use.

    Not ``functools.lru_cache``: fused forwards call this while torch.compile traces them, and dynamo warns about
    lru_cache-wrapped calls. The dict is filled once, with every name, so that its keys (which dynamo guards on)
    never change after a graph has been compiled."""
    if not _PEFT_CLASSES:
        from peft.tuners.lora import layer

        _PEFT_CLASSES.update(Linear=layer.Linear, Embedding=layer.Embedding, LoraLayer=layer.LoraLayer)
    return _PEFT_CLASSES[name]
