"""The model level: PEFT builds and manages the model, fastlora runs its LoRA layers.

``get_peft_model`` and ``from_pretrained`` are PEFT's own (they return a genuine ``peft.PeftModel``), followed by
``accelerate_peft``, which routes each PEFT LoRA layer's forward through the fusers of ``registry`` (plain and
several-adapter linear layers, Conv1D, ``lora_bias``, embeddings; 4-bit bases, DoRA and the ``ParamWrapper``s on
MoE experts in their own modules) and falls back to PEFT's forward whenever no fuser can run the call. Only ``forward`` changes: parameters, adapter
management, saving and loading are PEFT's code. peft is imported only when one of these functions is called.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch.nn as nn
from torch.nn.modules import module as _nn_module

from . import registry
from . import bnb, dora, embedding, linear, moe  # noqa: F401  (registers the fusers; none imports peft or bitsandbytes)
from . import mixed
from .mixed import allow_mixed_batch_training

__all__ = ["get_peft_model", "from_pretrained", "accelerate_peft", "fused_layers", "is_accelerated",
           "allow_mixed_batch_training"]

_FLAG = "_fastlora_accelerated"
_DISABLED = "adapters disabled"
_MERGED = "adapters merged (runs the base layer)"
_INACTIVE = "no active adapter on this layer"
_PASSING_STATES = (_DISABLED, _MERGED, _INACTIVE)
PEFT_EXTRA = 'pip install peft transformers safetensors (or pip install -e ".[peft]" in a fastlora clone)'


def _peft(what: str):
    """The peft package, or an ImportError that names the extra to install."""
    try:
        import peft
        from peft.tuners.lora.layer import LoraLayer  # noqa: F401
    except ImportError as e:
        raise ImportError(f"fastlora.{what} needs peft and transformers: {PEFT_EXTRA}") from e
    return peft


def _lora_layer_class():
    return registry.peft_lora_class("LoraLayer")


# --------------------------------------------------------------------------------------------------------------
# Routing one call
# --------------------------------------------------------------------------------------------------------------

# Attribute reads go through ``_modules`` / ``__dict__``: nn.Module.__getattr__ would cost most of a plan's time.

def _active(layer) -> list[str]:
    """The active adapters that this layer holds, in PEFT's order."""
    mods = layer._modules
    linear, embedding = mods["lora_A"]._modules, mods["lora_embedding_A"]._parameters
    return [a for a in layer.active_adapters if a in linear or a in embedding]


def _hooked(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")  # a nested PEFT layer routed by fastlora is no hook
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or (forward is not None and not isinstance(forward, _RoutedForward)))


_SUB_LAYERS = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector")


def _hook_reason(layer, adapters: list[str]) -> Optional[str]:
    """A hook that PEFT's forward would fire and a fused call would skip, if any."""
    if (_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks
            or _nn_module._global_backward_hooks or _nn_module._global_backward_pre_hooks):
        return "global module hooks are registered"
    mods = layer._modules
    base = mods["base_layer"]
    while base is not None:
        if _hooked(base):
            return "hook or replaced forward on base_layer"
        base = base._modules.get("base_layer")
    for attr in _SUB_LAYERS:
        holder = mods.get(attr)
        if holder is None:
            continue
        subs = holder._modules
        for a in adapters:
            sub = subs.get(a)
            if sub is not None and _hooked(sub):
                return f"hook on {attr}[{a!r}]"
    return None


def _plan(layer):
    """(fuser, adapters) that can run this layer's next plain call, or the reason (a str) that none can."""
    if layer.disable_adapters:
        return _DISABLED
    if layer.merged:
        return _MERGED
    adapters = _active(layer)
    if not adapters:
        return _INACTIVE
    reason = _hook_reason(layer, adapters)
    if reason is not None:
        return reason
    chosen = None
    for a in adapters:
        f = registry.fuser_for(layer, a)
        if f is None:
            return f"no fastlora fuser for {type(layer).__name__}"
        why = f.why_not(layer, a)
        if why is not None:
            return why if len(adapters) == 1 else f"adapter {a!r}: {why}"
        if chosen is not None and f is not chosen:
            return "adapters of different kinds active together"
        chosen = f
    return chosen, adapters


class _RoutedForward:
    """The instance-level ``forward`` of an accelerated PEFT LoRA layer: a fuser where one can run the call, PEFT's
    own forward otherwise (an object rather than a closure, so the model still pickles and deep-copies)."""

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def __call__(self, x, *args, **kwargs):
        layer = self.layer
        if "adapter_names" not in kwargs:
            plan = _plan(layer)
            if not isinstance(plan, str):
                fuser, adapters = plan
                if fuser.takes_args:  # an experts module's routing arguments
                    return fuser.forward(layer, x, adapters, *args, **kwargs)
                if not args and not kwargs:
                    return fuser.forward(layer, x, adapters)
        elif not args and len(kwargs) == 1 and kwargs["adapter_names"] is not None:  # a mixed batch
            y = mixed.forward(layer, x, kwargs["adapter_names"])
            if y is not None:
                return y
        return type(layer).forward(layer, x, *args, **kwargs)  # variant kwargs, and what PEFT runs its own way


class _ThenClearNormCache:
    """An accelerated layer's ``merge`` / ``unmerge``: PEFT's own, then the DoRA norm kept for its base weight is
    dropped. They are the PEFT operations that write a base weight in place (``weight.data += ...`` for LoRA
    adapters), which no version counter records; adapter loads and hot-swaps write A and B, which the norm cache
    compares element by element anyway (``fastlora.dora``)."""

    def __init__(self, layer: nn.Module, name: str):
        self.layer, self.name = layer, name

    def __call__(self, *args, **kwargs):
        try:
            return getattr(type(self.layer), self.name)(self.layer, *args, **kwargs)
        finally:
            weight = getattr(self.layer.get_base_layer(), "weight", None)
            if weight is not None:
                from ..dora import clear_norm_cache

                clear_norm_cache(weight)


class _AccelerateAfter:
    """Wraps a PEFT tuner's ``inject_adapter`` so that layers made by a later ``add_adapter`` / ``load_adapter``
    are routed too."""

    def __init__(self, tuner: nn.Module):
        self.tuner = tuner

    def __call__(self, *args, **kwargs):
        out = type(self.tuner).inject_adapter(self.tuner, *args, **kwargs)
        accelerate_peft(self.tuner)
        return out


def is_accelerated(module: nn.Module) -> bool:
    return bool(module.__dict__.get(_FLAG, False))


# --------------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------------

def accelerate_peft(model: nn.Module) -> nn.Module:
    """Route every PEFT LoRA layer of ``model`` through fastlora's fused ops; returns ``model``, changed in place.

    Only the layers' ``forward`` changes, so parameters, optimizer state, ``save_pretrained`` and PEFT's adapter
    management are untouched. Each call goes to a fuser when one can run it (``fused_layers`` says which layers
    do) and to PEFT's own forward otherwise: adapters disabled or merged, hooks on
    ``base_layer`` / ``lora_A`` / ``lora_B``, a layer kind or variant fastlora has no fuser for. Mixed-adapter
    batches (``adapter_names=``) run fused on the same layers, with PEFT's rules (``peft_interop.mixed``). The layers routed
    by this call that cannot run fused are named in one warning. Adapters added or loaded later are routed as
    well. Calling it twice is harmless.
    """
    _peft("accelerate_peft")
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate_peft expects a PEFT model (an nn.Module), got {type(model).__name__}")
    from peft.tuners.tuners_utils import BaseTuner

    LoraLayer = _lora_layer_class()
    found, new = 0, set()
    for name, module in model.named_modules():
        if isinstance(module, BaseTuner) and "inject_adapter" not in module.__dict__:
            module.inject_adapter = _AccelerateAfter(module)
        if isinstance(module, LoraLayer):
            found += 1
            if not is_accelerated(module):
                new.add(name)
                # a forward already replaced by another library (an accelerate device hook, ...) stays in charge
                if "forward" not in module.__dict__:
                    module.forward = _RoutedForward(module)
                    for op in ("merge", "unmerge"):
                        if op not in module.__dict__ and callable(getattr(type(module), op, None)):
                            module.__dict__[op] = _ThenClearNormCache(module, op)
                    module.__dict__[_FLAG] = True
    if found == 0:
        warnings.warn("fastlora.accelerate_peft: the model has no PEFT LoRA layer; nothing was changed", stacklevel=2)
        return model
    # Warn once about the layers routed by this call that cannot run fused; states that pass (adapters disabled,
    # merged, not active here) are not warned about, fused_layers lists them.
    unfused = {name: why for name, why in fused_layers(model).items()
               if name in new and why is not None and not why.startswith(_PASSING_STATES)}
    if unfused:
        listing = ", ".join(f"{name} ({why})" for name, why in unfused.items())
        warnings.warn(f"fastlora.accelerate_peft: {len(unfused)} of {found} LoRA layers run PEFT's forward: "
                      f"{listing}. fastlora.fused_layers(model) lists them.", stacklevel=2)
    return model


def fused_layers(model: nn.Module) -> dict[str, Optional[str]]:
    """Every PEFT LoRA layer of ``model`` by module name: None if its next plain forward runs fused, else the
    reason it runs PEFT's forward (e.g. ``"DoRA"``, ``"adapters disabled"``, ``"hook on lora_A['default']"``)."""
    _peft("fused_layers")
    LoraLayer = _lora_layer_class()
    out: dict[str, Optional[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            if not is_accelerated(module):
                out[name] = ("its forward is replaced by another library (e.g. an accelerate hook)"
                             if "forward" in module.__dict__ else "not accelerated (call fastlora.accelerate_peft)")
            else:
                plan = _plan(module)
                out[name] = plan if isinstance(plan, str) else None
    return out


def get_peft_model(model: nn.Module, peft_config, *args, **kwargs):
    """``peft.get_peft_model(model, peft_config, ...)`` (same arguments, a genuine ``peft.PeftModel`` back), with
    its LoRA layers routed through fastlora (``accelerate_peft``)."""
    peft = _peft("get_peft_model")
    return accelerate_peft(peft.get_peft_model(model, peft_config, *args, **kwargs))


def from_pretrained(model: nn.Module, model_id, adapter_name: str = "default", is_trainable: bool = False,
                    config=None, **kwargs):
    """``peft.PeftModel.from_pretrained`` (same arguments: ``is_trainable=True`` to train on, PEFT's task classes
    chosen from the adapter's config), with its LoRA layers routed through fastlora (``accelerate_peft``)."""
    peft = _peft("from_pretrained")
    loaded = peft.PeftModel.from_pretrained(model, model_id, adapter_name=adapter_name, is_trainable=is_trainable,
                                            config=config, **kwargs)
    return accelerate_peft(loaded)
