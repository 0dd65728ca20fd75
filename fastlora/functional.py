"""The public ops on plain tensors: ``lora_linear``, ``lora_linear_multi``, ``lora_embedding``. Each is a thin entry
into its op (``fastlora.autograd.LORA_LINEAR``, ``fastlora.embedding.LORA_EMBEDDING``), which validates, autocasts,
flattens to 2-D, dispatches (Triton | PyTorch) and reshapes (``fastlora.op_common``)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .autograd import LORA_LINEAR
from .embedding import LORA_EMBEDDING
from .op_common import autocast as _autocast

__all__ = ["lora_linear", "lora_linear_multi", "lora_embedding"]


def lora_linear(
    input: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    bias: Tensor | None = None,
    *,
    scaling: float | Tensor = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    r"""``input @ weightᵀ + bias + scaling · (dropout(input) @ lora_Aᵀ) @ lora_Bᵀ`` without forming B@A.

    ``scaling`` is a number or a one-element tensor without gradient (as PEFT's
    ``prepare_model_for_compiled_hotswap`` makes it): a tensor is an input of the op, so a compiled graph reads
    its current value instead of being recompiled when it changes.

    input (..., in), weight (out, in), lora_A (r, in), lora_B (out, r), bias (out,) or None. Dropout acts on the
    LoRA branch only, and only when ``training`` and ``dropout_p > 0``. The output has input's dtype; the
    adapters may be in a wider dtype than input and weight (fp32 adapters on a bf16 base, as PEFT keeps them).
    Gradients flow to input, lora_A and lora_B, and to weight and bias only if they require grad.
    """
    return LORA_LINEAR(input, weight, lora_A, lora_B, bias, scaling=scaling, dropout_p=dropout_p, training=training)


def _scaled(t: Tensor, scaling) -> Tensor:
    return t * (scaling.to(t.dtype) if isinstance(scaling, Tensor) else scaling)


def lora_linear_multi(
    input: Tensor,
    weight: Tensor,
    lora_As: Sequence[Tensor],
    lora_Bs: Sequence[Tensor],
    bias: Tensor | None = None,
    *,
    scalings: Sequence[float | Tensor],
    dropout_ps: Sequence[float],
    training: bool = True,
) -> Tensor:
    r"""Several adapters on one base layer:
    ``input @ weightᵀ + bias + Σᵢ sᵢ · (dropoutᵢ(input) @ Aᵢᵀ) @ Bᵢᵀ``, each adapter with its own, independent dropout mask (as PEFT draws them).

    Adapters without active dropout (``p = 0`` or not ``training``) share one fused call: their A's are stacked
    to one (Σr, in) matrix and their sᵢ·B's to one (out, Σr), which is exact (autograd takes the gradients back
    through the stacking). The first adapter with dropout runs fused with the base GEMM instead; the stacked
    group and any further dropout adapters then add their branch ``sᵢ · (dropoutᵢ(x) Aᵢᵀ) Bᵢᵀ`` with PyTorch
    ops.
    """
    n = len(lora_As)
    if n == 0 or len(lora_Bs) != n or len(scalings) != n or len(dropout_ps) != n:
        raise ValueError(f"lora_linear_multi: needs one or more adapters and as many lora_Bs, scalings and "
                         f"dropout_ps, got {n}, {len(lora_Bs)}, {len(scalings)}, {len(dropout_ps)}")
    if n == 1:
        return lora_linear(input, weight, lora_As[0], lora_Bs[0], bias, scaling=scalings[0],
                           dropout_p=dropout_ps[0], training=training)
    for A, B, s, p in zip(lora_As, lora_Bs, scalings, dropout_ps):
        LORA_LINEAR.validate(input, weight, A, B, bias, scaling=s, dropout_p=p)  # as lora_linear checks each
    active = [float(p) if training else 0.0 for p in dropout_ps]
    plain = [i for i in range(n) if active[i] == 0.0]
    dropped = [i for i in range(n) if active[i] > 0.0]
    group = None  # (A, B, scaling) of the plain adapters, stacked
    if len(plain) == 1:
        i = plain[0]
        group = (lora_As[i], lora_Bs[i], scalings[i])
    elif plain:
        dt = lora_As[plain[0]].dtype
        for i in plain[1:]:
            dt = torch.promote_types(dt, lora_As[i].dtype)
        A_cat = torch.cat([lora_As[i].to(dt) for i in plain], 0)                          # (Σr, in)
        B_cat = torch.cat([_scaled(lora_Bs[i].to(dt), scalings[i]) for i in plain], 1)   # (out, Σr)
        group = (A_cat, B_cat, 1.0)
    if not dropped:
        A, B, s = group
        return lora_linear(input, weight, A, B, bias, scaling=s, training=training)
    lead = dropped[0]
    y = lora_linear(input, weight, lora_As[lead], lora_Bs[lead], bias, scaling=scalings[lead],
                    dropout_p=active[lead], training=True)
    (x,) = _autocast(input.device.type, input)
    branches = [group + (0.0,)] if group is not None else []
    branches += [(lora_As[i], lora_Bs[i], scalings[i], active[i]) for i in dropped[1:]]
    for A, B, s, p in branches:
        xd = F.dropout(x, p, True) if p > 0.0 else x
        # in the adapters' dtype, as PEFT (fp32 adapters on a half base: no fp16 overflow in the low-rank terms)
        y = y + _scaled(F.linear(F.linear(xd.to(A.dtype), A), B.to(A.dtype)), s).to(y.dtype)
    return y


def lora_embedding(
    input: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    *,
    scaling: float | Tensor = 1.0,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Tensor:
    r"""``weight[input] + scaling · (lora_Aᵀ[input]) @ lora_Bᵀ``, PEFT's ``lora.Embedding`` update.

    weight (num_embeddings, dim), lora_A (r, num_embeddings), lora_B (dim, r); the lookups take
    ``nn.Embedding``'s options. The (…, r) rows of Aᵀ are gathered and multiplied into the base rows in place
    (one ``addmm_``): nothing (…, dim) is allocated beside the output. The update is computed in the adapters'
    dtype and the sum has weight's dtype, as in PEFT.
    """
    return LORA_EMBEDDING(input, weight, lora_A, lora_B, scaling=scaling, padding_idx=padding_idx, max_norm=max_norm,
                          norm_type=norm_type, scale_grad_by_freq=scale_grad_by_freq, sparse=sparse)
