"""PEFT's mixed-adapter batches (``model(..., adapter_names=[...])`` and ``model.generate(..., adapter_names=...)``)
on accelerated layers: one fused call per layer (``fastlora.lora_linear_mixed`` for ``lora.Linear`` on an
``nn.Linear`` or Conv1D base, ``fastlora.lora_embedding_mixed`` for ``lora.Embedding``) instead of PEFT's loop over
the adapters, with PEFT's rules:

* ``adapter_names`` has one name per sample (PEFT repeats it over beams in ``generate``); ``"__base__"`` and names
  of adapters this layer does not hold run the base layer alone;
* each adapter adds ``lora_B(lora_A(dropout(x))) · scaling`` on its own rows, ``lora_bias`` included;
* whatever PEFT refuses or runs its own way stays PEFT's: adapters disabled or merged, a length mismatch, DoRA and
  other variants, hooks on the sub-layers, bases fastlora does not fuse (the fusers' ``why_not``).

Training on mixed batches is fastlora's extension (``allow_mixed_batch_training``): PEFT raises "Cannot pass
`adapter_names` when the model is in training mode"; with the opt-in, each adapter trains on its own rows in one
step, with its own dropout.
"""
from __future__ import annotations

import collections
import contextlib
from typing import Optional

import torch
import torch.nn as nn

from ..mixed import MIXED_LORA_LINEAR, lora_embedding_mixed, pack_adapters, scalings_tensor
from ..op_common import autocast_enabled
from . import embedding as embedding_fuser
from . import linear as linear_fuser
from . import registry

__all__ = ["forward", "why_not", "allow_mixed_batch_training", "mixed_batch_training_allowed"]

BASE = "__base__"
_INDEX: "collections.OrderedDict" = collections.OrderedDict()


def _sample_index(names, adapters, device) -> torch.Tensor:
    """(batch,) int64 on ``device``: each sample's position in ``adapters``, -1 for the others; cached by value."""
    key = (tuple(names), tuple(adapters), str(device))
    hit = _INDEX.get(key)
    if hit is None:
        pos = {a: i for i, a in enumerate(adapters)}
        hit = _INDEX[key] = torch.tensor([pos.get(n, -1) for n in names], dtype=torch.int64).to(device)
        if len(_INDEX) > 64:
            _INDEX.popitem(last=False)
    else:
        _INDEX.move_to_end(key)
    return hit


def _kind(layer) -> Optional[str]:
    if isinstance(layer, registry.peft_lora_class("Embedding")):
        return "embedding"
    if isinstance(layer, registry.peft_lora_class("Linear")):
        return "linear"
    return None


def _used(layer, names, kind) -> list:
    """The adapters of ``names`` that this layer holds, in first-appearance order (PEFT's set, made stable)."""
    held = layer._modules["lora_A"]._modules if kind == "linear" else layer._modules["lora_embedding_A"]._parameters
    return [a for a in dict.fromkeys(names) if a != BASE and a in held]


def why_not(layer, x, names) -> Optional[str]:
    """Why this mixed-batch call runs PEFT's forward, or None when it runs fused."""
    from . import _hook_reason  # the router's own check of hooks that a fused call would skip

    kind = _kind(layer)
    if kind is None:
        return f"no fastlora mixed-batch path for {type(layer).__name__}"
    if layer.disable_adapters or layer.merged:
        return "adapters disabled or merged"
    if not isinstance(names, (list, tuple)) or not isinstance(x, torch.Tensor) or x.dim() < 1 or len(names) != len(x):
        return "adapter_names is not one name per sample"  # PEFT raises its own error
    used = _used(layer, names, kind)
    if not used:
        return "no adapter of this layer in the batch"
    fuser = linear_fuser.FUSER if kind == "linear" else embedding_fuser.FUSER
    first = used[0]  # the fuser's full check once (the layer's base, forward, ...), per adapter only what differs
    if registry.fuser_for(layer, first) is not fuser:
        return f"adapter {first!r}: not a plain LoRA {kind}"
    why = fuser.why_not(layer, first)
    if why is not None:
        return f"adapter {first!r}: {why}"
    for a in used[1:]:
        why = _adapter_reason(layer, a, kind)
        if why is not None:
            return f"adapter {a!r}: {why}"
    return _hook_reason(layer, used)


def _adapter_reason(layer, a, kind) -> Optional[str]:
    """What makes adapter ``a`` unfit where the layer's first adapter passed its fuser's whole check: a variant
    (DoRA, ...), custom or non-float modules, a dropout module fastlora does not run."""
    variant = linear_fuser.variant_name(layer, a)
    if variant is not None:
        return variant
    mods = layer._modules
    if kind == "embedding":
        return None if layer.lora_embedding_A[a].is_floating_point() else "non-float adapter weights"
    A, B = mods["lora_A"]._modules[a], mods["lora_B"]._modules[a]
    if type(A) is not nn.Linear or type(B) is not nn.Linear or A._parameters["bias"] is not None:
        return "custom lora_A / lora_B modules"
    if not A._parameters["weight"].is_floating_point() or not B._parameters["weight"].is_floating_point():
        return "non-float adapter weights"
    return registry.dropout_reason(mods["lora_dropout"]._modules[a])


def forward(layer, x, names):
    """PEFT's ``layer(x, adapter_names=names)``, fused; None where PEFT's forward must run it (``why_not``)."""
    if why_not(layer, x, names) is not None:
        return None
    kind = _kind(layer)
    used = _used(layer, names, kind)
    if kind == "embedding":
        return _embedding(layer, x, names, used)
    return _linear(layer, x, names, used)


def _linear(layer, x, names, used):
    base = linear_fuser.base_of(layer)
    weight = base.weight.t() if linear_fuser.is_conv1d(base) else base.weight
    if not x.is_floating_point() or (x.dtype != weight.dtype and not autocast_enabled(x.device.type)):
        return None  # PEFT's base layer raises or casts its own way
    mods = layer._modules
    A_mods, B_mods, drops = mods["lora_A"]._modules, mods["lora_B"]._modules, mods["lora_dropout"]._modules
    # adapters of one rank next to each other: each rank class is then one block of the packed buffers
    used = sorted(used, key=lambda a: A_mods[a]._parameters["weight"].shape[0])
    As = [A_mods[a]._parameters["weight"] for a in used]
    Bs = [B_mods[a]._parameters["weight"] for a in used]
    scalings = [layer.scaling[a] for a in used]
    ps = [registry.dropout_p(drops[a]) if drops[a].training else 0.0 for a in used]
    sample = _sample_index(names, used, x.device)
    rows_per_sample = 1
    for d in x.shape[1:-1]:
        rows_per_sample *= d
    index = sample if rows_per_sample == 1 else sample[:, None].expand(len(names), rows_per_sample).reshape(-1)
    A, B, ranks = pack_adapters(As, Bs)
    s = scalings_tensor(scalings, x.device)
    y = MIXED_LORA_LINEAR(x, weight, base.bias, A, B, index, s, ranks=ranks, dropout_ps=ps)
    lora_biases = [B_mods[a]._parameters.get("bias") for a in used]
    if any(b is not None for b in lora_biases):  # lora_bias: s_a · b_a on adapter a's rows
        zero = y.new_zeros(y.shape[-1])
        table = torch.stack([zero] + [zero if b is None else linear_fuser._scaled(b, s).to(y.dtype)
                                      for b, s in zip(lora_biases, scalings)])
        y = y + table[index + 1].view(y.shape)
    return y


def _embedding(layer, x, names, used):
    base = layer.get_base_layer()
    A = [layer.lora_embedding_A[a] for a in used]
    B = [layer.lora_embedding_B[a] for a in used]
    sample = _sample_index(names, used, x.device)
    return lora_embedding_mixed(x, base.weight, A, B, sample, scalings=[layer.scaling[a] for a in used],
                                padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
                                scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)


# --------------------------------------------------------------------------------------------------------------
# Training on mixed batches: the opt-in
# --------------------------------------------------------------------------------------------------------------

_ALLOWED = "_fastlora_mixed_training"


class _PeftHooksAllowingTraining:
    """A PEFT tuner's ``_enable_peft_forward_hooks`` that accepts ``adapter_names`` in training mode: PEFT's own
    context manager (its name checks, beam-search expansion and encoder handling, the hooks that hand
    ``adapter_names`` to every LoRA layer) entered with the tuner's own ``training`` flag down for the moment of
    PEFT's training-mode check, and restored before the forward runs. The modules keep their training mode, so
    dropout stays on."""

    def __init__(self, tuner: nn.Module):
        self.tuner = tuner

    def __call__(self, *args, **kwargs):
        return self._hooks(*args, **kwargs)

    @contextlib.contextmanager
    def _hooks(self, *args, **kwargs):
        tuner = self.tuner
        cm = type(tuner)._enable_peft_forward_hooks(tuner, *args, **kwargs)
        lowered = kwargs.get("adapter_names") is not None and tuner.training
        if lowered and any(getattr(m, "gradient_checkpointing", False) is True for m in tuner.modules()):
            # the hooks that hand adapter_names to the layers live for the forward only: a checkpointed layer
            # recomputed in the backward would run its active adapters instead, and the gradients would be wrong
            raise ValueError("fastlora: training on mixed-adapter batches does not support gradient checkpointing "
                             "(the recomputed forward would not see adapter_names); disable it for this model")
        with contextlib.ExitStack() as stack:
            if lowered:
                tuner.__dict__["training"] = False  # the tuner alone: its children keep training (dropout on)
            try:
                stack.enter_context(cm)
            finally:
                if lowered:
                    tuner.__dict__["training"] = True
            yield


def allow_mixed_batch_training(model: nn.Module, allow: bool = True) -> nn.Module:
    """Let ``model(..., adapter_names=[...])`` train (fastlora's extension; PEFT refuses it in training mode).

    ``model`` is a PEFT model whose LoRA layers fastlora runs (``fastlora.get_peft_model`` / ``accelerate_peft``).
    With it, each sample of a batch trains the adapter named for it, all in one forward and backward: every
    adapter's gradients are those of a separate run on its own samples (summed over them: give the loss as a sum or
    mean over the whole batch as usual), each adapter draws its own dropout mask, ``"__base__"`` samples train no
    adapter, and adapters whose parameters do not require grad get none. Make the adapters you train require grad
    (PEFT's ``model.base_model.set_adapter([...])`` with several names, or ``requires_grad_`` on their parameters).
    ``allow=False`` restores PEFT's behaviour. Returns ``model``.
    """
    from peft.tuners.tuners_utils import BaseTuner

    from . import is_accelerated

    tuners = [m for m in model.modules() if isinstance(m, BaseTuner)]
    if not tuners:
        raise TypeError(f"allow_mixed_batch_training expects a PEFT model, got {type(model).__name__}")
    LoraLayer = registry.peft_lora_class("LoraLayer")
    if allow and not any(is_accelerated(m) for m in model.modules() if isinstance(m, LoraLayer)):
        raise ValueError("allow_mixed_batch_training: the model's LoRA layers are not run by fastlora; call "
                         "fastlora.accelerate_peft(model) first (or build it with fastlora.get_peft_model)")
    for tuner in tuners:
        if not hasattr(type(tuner), "_enable_peft_forward_hooks"):
            continue
        if allow:
            tuner.__dict__["_enable_peft_forward_hooks"] = _PeftHooksAllowingTraining(tuner)
            tuner.__dict__[_ALLOWED] = True
        else:
            tuner.__dict__.pop("_enable_peft_forward_hooks", None)
            tuner.__dict__.pop(_ALLOWED, None)
    return model


def mixed_batch_training_allowed(model: nn.Module) -> bool:
    return any(m.__dict__.get(_ALLOWED, False) for m in model.modules())
