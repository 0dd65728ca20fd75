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

import contextlib
import operator
import threading
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
_INDEX: dict = {}
_USED = "_fastlora_mixed_used"


class _Names:
    """One batch's ``adapter_names``: the names as a tuple (``key``) and its distinct names in first-appearance order
    (``distinct``). Identity stands for the value: ``_names`` hands every layer of a forward the same object, and
    the caches of the layers compare it with ``is``, since hashing the names again on every layer costs a cache
    miss per distinct name once the previous layer's GEMM has evicted them."""

    __slots__ = ("key", "distinct")

    def __init__(self, key: tuple):
        self.key = key
        self.distinct = tuple(dict.fromkeys(key))


_LAST_NAMES: Optional[_Names] = None


def _names(names) -> Optional[_Names]:
    """The ``_Names`` of ``names`` (a list or tuple; else None): the last one made while the names are equal."""
    global _LAST_NAMES
    if not isinstance(names, (list, tuple)):
        return None
    key = tuple(names)
    last = _LAST_NAMES
    if last is None or last.key != key:  # the same string objects compare by identity: one pass over two tuples
        last = _LAST_NAMES = _Names(key)
    return last


def _positions(batch: _Names, pos: dict, device) -> torch.Tensor:
    """(batch,) int64 on ``device``: each sample's adapter's position in ``pos``, -1 for names outside it."""
    return torch.tensor([pos.get(n, -1) for n in batch.key], dtype=torch.int64).to(device)


def _sample_index(batch: _Names, adapters, device) -> torch.Tensor:
    """(batch,) int64 on ``device``: each sample's position in ``adapters``, -1 for the others; cached for the
    batch's ``_Names``, the adapters' names and the inference mode (a tensor made in inference mode cannot be saved
    for a backward outside it, and the op saves the index)."""
    if torch.compiler.is_compiling():  # a constant of the graph: no cache (dynamo cannot read the inference mode)
        return _positions(batch, {a: i for i, a in enumerate(adapters)}, device)
    key = (batch, tuple(adapters), str(device), torch.is_inference_mode_enabled())
    hit = _INDEX.get(key)
    if hit is None:
        hit = _positions(batch, {a: i for i, a in enumerate(adapters)}, device)
        if len(_INDEX) >= 64:  # emptied rather than trimmed: one atomic call, safe across threads without a lock
            _INDEX.clear()
        _INDEX[key] = hit
    return hit


def _kind(layer) -> Optional[str]:
    if isinstance(layer, registry.peft_lora_class("Embedding")):
        return "embedding"
    if isinstance(layer, registry.peft_lora_class("Linear")):
        return "linear"
    return None


def _used(layer, batch: Optional[_Names], kind) -> Optional[tuple]:
    """The adapters of the batch that this layer holds, in first-appearance order (PEFT's set, made stable); None
    where ``adapter_names`` is not a list of names or the layer no kind of ours. Kept per layer for the last batch
    and the adapters the layer held then."""
    if kind is None or batch is None:
        return None
    holder = layer._modules["lora_A"]._modules if kind == "linear" else layer._modules["lora_embedding_A"]._parameters
    held = tuple(holder)
    hit = layer.__dict__.get(_USED)
    if hit is not None and hit[0] is batch and hit[1] == held:
        return hit[2]
    used = tuple(a for a in batch.distinct if a != BASE and a in holder)
    layer.__dict__[_USED] = (batch, held, used)
    return used


def why_not(layer, x, names) -> Optional[str]:
    """Why this mixed-batch call runs PEFT's forward, or None when it runs fused."""
    kind = _kind(layer)
    used = _used(layer, _names(names), kind)
    why = _layer_reason(layer, x, names, kind, used)
    if why is not None or kind != "linear":
        return why
    found = _linear_adapters(layer, used)
    return found if isinstance(found, str) else None


def _layer_reason(layer, x, names, kind, used) -> Optional[str]:
    """``why_not`` but for the per-adapter checks of a linear layer (``_linear_adapters``)."""
    from . import _hook_reason  # the router's own check of hooks that a fused call would skip

    if kind is None:
        return f"no fastlora mixed-batch path for {type(layer).__name__}"
    if layer.disable_adapters or layer.merged:
        return "adapters disabled or merged"
    if not isinstance(names, (list, tuple)) or not isinstance(x, torch.Tensor) or x.dim() < 1 or len(names) != len(x):
        return "adapter_names is not one name per sample"  # PEFT raises its own error
    if not used:
        return "no adapter of this layer in the batch"
    fuser = linear_fuser.FUSER if kind == "linear" else embedding_fuser.FUSER
    first = used[0]  # the fuser's full check once (the layer's base, forward, ...), per adapter only what differs
    if registry.fuser_for(layer, first) is not fuser:
        return f"adapter {first!r}: not a plain LoRA {kind}"
    why = fuser.why_not(layer, first)
    if why is not None:
        return f"adapter {first!r}: {why}"
    if kind == "linear":
        return _hook_reason(layer, [])  # the sub-layers' hooks: in _linear_adapters, with the other checks
    for a in used[1:]:
        why = _adapter_reason(layer, a, kind)
        if why is not None:
            return f"adapter {a!r}: {why}"
    return _hook_reason(layer, used)


def _linear_adapters(layer, used):
    """What makes an adapter of ``used`` unfit (``_adapter_reason``; the first passed its fuser's whole check) or
    hooked (the router's ``_hook_reason`` on its sub-layers), as a str; else what the call needs of them, read in
    the same pass: (lora_A weights, lora_B weights, lora_B biases, scalings, dropout ps), one entry per adapter of
    ``used``.

    One pass with the checks inlined, because a mixed batch may hold dozens of adapters and host work here is
    bound by cache misses, not by instructions: the GEMM before the call evicts the modules' objects, so each
    object costs a miss the first time it is read and little after. 64 adapters after a GEMM on this CPU: the
    checks, the bank's check and the call's lists took 0.45–0.6 ms as four passes, 0.34 ms as this one and the
    bank's check; the checks alone take 65 µs warm."""
    from . import _RoutedForward, _hooked

    mods = layer._modules
    A_mods, B_mods, drops = mods["lora_A"]._modules, mods["lora_B"]._modules, mods["lora_dropout"]._modules
    mags = mods.get("lora_magnitude_vector")
    mags = {} if mags is None else mags._modules
    variants = layer.__dict__.get("lora_variant")
    scaling = layer.__dict__["scaling"]
    Linear, Dropout, Identity = nn.Linear, nn.Dropout, nn.Identity
    As, Bs, biases, scalings, ps = [], [], [], [], []
    first = used[0]
    for a in used:
        A, B, d = A_mods[a], B_mods[a], drops[a]
        a_params, b_params = A._parameters, B._parameters
        a_w, b_w = a_params["weight"], b_params["weight"]
        if a is not first:
            if variants is None or variants.get(a) is not None:
                why = linear_fuser.variant_name(layer, a)
                if why is not None:
                    return f"adapter {a!r}: {why}"
            if type(A) is not Linear or type(B) is not Linear or a_params["bias"] is not None:
                return f"adapter {a!r}: custom lora_A / lora_B modules"
            if not a_w.is_floating_point() or not b_w.is_floating_point():
                return f"adapter {a!r}: non-float adapter weights"
            if type(d) is not Identity and (type(d) is not Dropout or d.training and d.p >= 1.0):
                return f"adapter {a!r}: {registry.dropout_reason(d)}"
        for attr, sub in (("lora_A", A), ("lora_B", B), ("lora_dropout", d)):
            # the router's _hooked, inlined
            if (sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks or sub._backward_pre_hooks
                    or ("forward" in sub.__dict__ and not isinstance(sub.__dict__["forward"], _RoutedForward))):
                return f"hook on {attr}[{a!r}]"
        if mags and a in mags and _hooked(mags[a]):
            return f"hook on lora_magnitude_vector[{a!r}]"
        As.append(a_w)
        Bs.append(b_w)
        biases.append(b_params.get("bias"))
        scalings.append(scaling[a])
        ps.append(float(d.p) if d.training and type(d) is Dropout else 0.0)
    return As, Bs, biases, scalings, ps


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
    kind = _kind(layer)
    batch = _names(names)
    used = _used(layer, batch, kind)
    if _layer_reason(layer, x, names, kind, used) is not None:
        return None
    if kind == "embedding":
        return _embedding(layer, x, batch, used)
    found = _linear_adapters(layer, used)
    if isinstance(found, str):
        return None
    return _linear(layer, x, batch, used, *found)


def _linear(layer, x, batch, used, As, Bs, biases, scalings, ps):
    base = linear_fuser.base_of(layer)
    weight = base.weight.t() if linear_fuser.is_conv1d(base) else base.weight
    if not x.is_floating_point() or (x.dtype != weight.dtype and not autocast_enabled(x.device.type)):
        return None  # PEFT's base layer raises or casts its own way
    found = _bank(layer, used, As, Bs) if not torch.is_grad_enabled() else None
    if found is not None:  # the layer's adapters where they lie, no copy; those outside the batch get no rows
        bank, at = found
        members, A, B, ranks = bank.names, bank.A, bank.B, bank.ranks
        order = [None] * len(members)
        for i, j in enumerate(at):
            order[j] = i
    else:
        # adapters of one rank next to each other: each rank class is then one block of the packed buffers
        order = sorted(range(len(used)), key=lambda i: As[i].shape[0])
        members = [used[i] for i in order]
        A, B, ranks = pack_adapters([As[i] for i in order], [Bs[i] for i in order])
    scalings = [1.0 if i is None else scalings[i] for i in order]
    ps = [0.0 if i is None else ps[i] for i in order]
    if found is not None:
        sample, s = bank.index(batch, x.device), bank.scalings(scalings, x.device)
    else:
        sample, s = _sample_index(batch, members, x.device), scalings_tensor(scalings, x.device)
    rows_per_sample = 1
    for d in x.shape[1:-1]:
        rows_per_sample *= d
    index = sample if rows_per_sample == 1 else sample[:, None].expand(len(batch.key), rows_per_sample).reshape(-1)
    lora_biases = [None if i is None else biases[i] for i in order]
    y = MIXED_LORA_LINEAR(x, weight, base.bias, A, B, index, s, ranks=ranks, dropout_ps=ps)
    if any(b is not None for b in lora_biases):  # lora_bias: s_a · b_a on adapter a's rows
        zero = y.new_zeros(y.shape[-1])
        table = torch.stack([zero] + [zero if b is None else linear_fuser._scaled(b, s).to(y.dtype)
                                      for b, s in zip(lora_biases, scalings)])
        y = y + table[index + 1].view(y.shape)
    return y


# --------------------------------------------------------------------------------------------------------------
# The adapter bank: a layer's adapters in the op's packed layout, in place
# --------------------------------------------------------------------------------------------------------------

_BANK = "_fastlora_adapter_bank"
_BANK_LOCK = threading.Lock()


class _Bank:
    """A layer's LoRA adapters moved into the op's packed layout: one (Σr, in) buffer for every lora_A weight and
    one (out·Σr,) buffer for every lora_B weight, adapters sorted by rank; each adapter's parameters are views of
    them (``param.data``), with their values, so that a mixed batch reads them where they lie instead of packing a
    copy per call.

    Nothing is cached: every call checks that each adapter of its batch is in the bank and still *is* its view (its
    parameters' data pointers and shapes, contiguous; the bank holds its buffers, so no other tensor can be
    allocated at those addresses), and
    whatever writes the parameters in place (an optimizer, ``load_state_dict``, ``.data.copy_``) writes the
    buffers. A parameter given new storage (``param.data = ...``, ``.to()``, ``load_state_dict(assign=True)``),
    an adapter added or deleted: the next call builds the bank again (one copy, as packing once)."""

    def __init__(self, layer, names, A_mods, B_mods):
        As = [A_mods[a]._parameters["weight"] for a in names]
        Bs = [B_mods[a]._parameters["weight"] for a in names]
        self.held = tuple(A_mods)
        self.names = list(names)
        self.ranks = [a.shape[0] for a in As]
        self.pos = {a: i for i, a in enumerate(names)}
        K, N = As[0].shape[1], Bs[0].shape[0]
        R = sum(self.ranks)
        with torch.inference_mode(False), torch.no_grad():  # plain tensors, even when called in inference mode
            self.A = torch.empty((R, K), dtype=As[0].dtype, device=As[0].device)
            self.B = torch.empty((N * R,), dtype=Bs[0].dtype, device=Bs[0].device)
            o = 0
            for a_w, b_w, r in zip(As, Bs, self.ranks):
                self.A[o:o + r].copy_(a_w)
                self.B[N * o:N * (o + r)].copy_(b_w.reshape(-1))
                a_w.data = self.A[o:o + r]
                b_w.data = self.B[N * o:N * (o + r)].view(N, r)
                o += r
        self.a_ptrs, self.b_ptrs = list(map(_data_ptr, As)), list(map(_data_ptr, Bs))
        self.a_shapes, self.b_shapes = [t.shape for t in As], [t.shape for t in Bs]
        self._index = self._scalings = None

    def index(self, batch: _Names, device) -> torch.Tensor:
        """(batch,) int64 on ``device``: each sample's adapter, its position in the bank, -1 for the others; kept
        for the last batch."""
        hit = self._index
        if hit is not None and hit[0] is batch and hit[1] == device:
            return hit[2]
        index = _positions(batch, self.pos, device)
        self._index = (batch, device, index)
        return index

    def scalings(self, scalings: list, device) -> torch.Tensor:
        """``scalings_tensor(scalings, device)``, kept for the last list while it holds the same objects: Python
        numbers, which cannot change (a tensor scaling can, in place: those are stacked anew every call)."""
        hit = self._scalings
        if (hit is not None and hit[1] == device and len(hit[0]) == len(scalings)
                and all(map(operator.is_, hit[0], scalings))):
            return hit[2]
        s = scalings_tensor(scalings, device)
        if all(type(v) in (float, int) for v in scalings):
            self._scalings = (scalings, device, s)
        return s

    def holds(self, used, As, Bs, A_mods) -> Optional[list]:
        """Each adapter's position in the bank, for the adapters of ``used`` (their lora_A / lora_B weights ``As``,
        ``Bs``), where the layer holds the same adapters as when the bank was built and those weights are still the
        bank's views: the same data pointer and shape, contiguous (the dtype cannot differ at the same address short
        of a reinterpreting ``.view(dtype)``); else None. About 0.4 µs an adapter."""
        if tuple(A_mods) != self.held:
            return None
        at = list(map(self.pos.get, used))
        if None in at:  # an adapter outside the bank (another dtype, say)
            return None
        a_ptrs, b_ptrs, a_shapes, b_shapes = self.a_ptrs, self.b_ptrs, self.a_shapes, self.b_shapes
        if ([a_ptrs[i] for i in at] == list(map(_data_ptr, As)) and [b_ptrs[i] for i in at] == list(map(_data_ptr, Bs))
                and [a_shapes[i] for i in at] == [t.shape for t in As]
                and [b_shapes[i] for i in at] == [t.shape for t in Bs]
                and all(map(_contiguous, As)) and all(map(_contiguous, Bs))):
            return at
        return None


_data_ptr = torch.Tensor.data_ptr
_contiguous = torch.Tensor.is_contiguous


def _bankable(layer, a, A_mods, B_mods, like) -> bool:
    """Adapter ``a`` may live in the bank: a plain LoRA adapter whose weights are nn.Parameters of plain tensors,
    with the dtype and device of ``like`` (the batch's first adapter's lora_A weight)."""
    if _adapter_reason(layer, a, "linear") is not None:
        return False
    a_w, b_w = A_mods[a]._parameters["weight"], B_mods[a]._parameters["weight"]
    return all(type(w) is nn.Parameter and type(w.data) is torch.Tensor and w.dtype == like.dtype
               and w.device == like.device and w.layout == torch.strided for w in (a_w, b_w))


def _bank(layer, used, As, Bs) -> Optional[tuple]:
    """(the layer's bank holding every adapter of ``used``, each one's position in it), the bank built (or rebuilt)
    where needed; None where one cannot hold them (an adapter of another dtype or device, tensor subclasses,
    tracing). ``As`` and ``Bs``: the lora_A and lora_B weights of ``used``."""
    if torch.compiler.is_compiling():
        return None
    A_mods, B_mods = layer._modules["lora_A"]._modules, layer._modules["lora_B"]._modules
    bank = layer.__dict__.get(_BANK)
    at = None if bank is None else bank.holds(used, As, Bs, A_mods)
    if at is not None:
        return bank, at
    with _BANK_LOCK:
        bank = layer.__dict__.get(_BANK)
        at = None if bank is None else bank.holds(used, As, Bs, A_mods)
        if at is not None:
            return bank, at
        names = [a for a in A_mods if _bankable(layer, a, A_mods, B_mods, As[0])]
        if not set(used) <= set(names):
            return None
        names.sort(key=lambda a: A_mods[a]._parameters["weight"].shape[0])  # each rank class one block
        bank = _Bank(layer, names, A_mods, B_mods)
        layer.__dict__[_BANK] = bank
        return bank, [bank.pos[a] for a in used]


def _embedding(layer, x, batch, used):
    base = layer.get_base_layer()
    A = [layer.lora_embedding_A[a] for a in used]
    B = [layer.lora_embedding_B[a] for a in used]
    sample = _sample_index(batch, used, x.device)
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
