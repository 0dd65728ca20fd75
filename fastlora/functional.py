"""``lora_linear``: validate → autocast → flatten to 2-D → dispatch (Triton | PyTorch) → reshape."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend as _backend
from .autograd import lora_linear_infer, lora_linear_train
from .op_common import autocast as _autocast
from .op_common import check_dropout, check_scaling, flatten_rows

__all__ = ["lora_linear", "lora_linear_multi", "lora_embedding"]


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _validate(input, weight, lora_A, lora_B, bias, scaling, dropout_p) -> None:
    named = {"input": input, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"lora_linear: {name} must be a floating-point tensor, got dtype {t.dtype}")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"lora_linear: all tensors must be on one device, got {listing}")
    if input.dim() < 1:
        raise ValueError(f"lora_linear: input must have at least 1 dimension (..., in_features), got a scalar")
    for name in ("weight", "lora_A", "lora_B"):
        if named[name].dim() != 2:
            raise ValueError(f"lora_linear: {name} must be 2-D, got shape {_shape(named[name])}")
    if bias is not None and bias.dim() != 1:
        raise ValueError(f"lora_linear: bias must be 1-D (out_features,), got shape {_shape(bias)}")
    N, K = weight.shape
    r = lora_A.shape[0]
    if input.shape[-1] != K:
        raise ValueError(
            f"lora_linear: input {_shape(input)} has {input.shape[-1]} features but weight {_shape(weight)} "
            f"expects in_features={K}"
        )
    if lora_A.shape[1] != K:
        raise ValueError(
            f"lora_linear: lora_A {_shape(lora_A)} must be (r, in_features={K}) to match weight {_shape(weight)}"
        )
    if r < 1:
        raise ValueError(f"lora_linear: rank must be >= 1, got lora_A {_shape(lora_A)}")
    if lora_B.shape[1] != r:
        raise ValueError(
            f"lora_linear: rank mismatch: lora_A {_shape(lora_A)} has r={r} but lora_B {_shape(lora_B)} has "
            f"r={lora_B.shape[1]}"
        )
    if lora_B.shape[0] != N:
        raise ValueError(
            f"lora_linear: lora_B {_shape(lora_B)} must be (out_features={N}, r) to match weight {_shape(weight)}"
        )
    if bias is not None and bias.shape[0] != N:
        raise ValueError(f"lora_linear: bias {_shape(bias)} must be (out_features={N},) to match weight {_shape(weight)}")
    check_dropout(dropout_p, "lora_linear")
    check_scaling(scaling, input.device, "lora_linear")


def _check_dtypes(input, weight, lora_A, lora_B, bias) -> None:
    if weight.dtype != input.dtype:
        raise TypeError(
            f"lora_linear: input dtype {input.dtype} and weight dtype {weight.dtype} differ (as in nn.Linear, "
            "they must match; use torch.autocast for mixed precision)"
        )
    if bias is not None and bias.dtype != input.dtype:
        raise TypeError(f"lora_linear: bias dtype {bias.dtype} must match input dtype {input.dtype}")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_linear: lora_A dtype {lora_A.dtype} and lora_B dtype {lora_B.dtype} differ")


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
    _validate(input, weight, lora_A, lora_B, bias, scaling, dropout_p)
    input, weight, lora_A, lora_B, bias = _autocast(input.device.type, input, weight, lora_A, lora_B, bias)
    _check_dtypes(input, weight, lora_A, lora_B, bias)

    p = float(dropout_p) if training else 0.0
    use_triton = _backend.use_triton(input.device, input.dtype)

    x2d = flatten_rows(input)
    if isinstance(scaling, Tensor):
        scaling = scaling.reshape(())
    else:
        scaling = float(scaling)
    args = (x2d, weight, lora_A, lora_B, bias, scaling, p, use_triton)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, lora_A, lora_B, bias)
    )
    y = lora_linear_train(*args) if needs_grad else lora_linear_infer(*args)
    return y if input.dim() == 2 else y.reshape(*input.shape[:-1], weight.shape[0])


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
        _validate(input, weight, A, B, bias, s, p)
        _check_dtypes(*_autocast(input.device.type, input, weight, A, B, bias))  # as lora_linear checks each
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
    if not isinstance(input, Tensor) or input.is_floating_point():
        raise TypeError(f"lora_embedding: input must be an integer tensor of indices, got "
                        f"{getattr(input, 'dtype', type(input).__name__)}")
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"lora_embedding: {name} must be a 2-D tensor, got "
                             f"{_shape(t) if isinstance(t, Tensor) else type(t).__name__}")
    if lora_A.shape[1] != weight.shape[0] or lora_B.shape != (weight.shape[1], lora_A.shape[0]):
        raise ValueError(f"lora_embedding: lora_A {_shape(lora_A)} must be (r, {weight.shape[0]}) and lora_B "
                         f"{_shape(lora_B)} (embedding_dim={weight.shape[1]}, r) for weight {_shape(weight)}")
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not t.is_floating_point():
            raise TypeError(f"lora_embedding: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_embedding: lora_A dtype {lora_A.dtype} and lora_B dtype {lora_B.dtype} differ")
    devices = {"input": input.device, "weight": weight.device, "lora_A": lora_A.device, "lora_B": lora_B.device}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"lora_embedding: all tensors must be on one device, got {listing}")
    check_scaling(scaling, weight.device, "lora_embedding")
    opts = (padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    result = F.embedding(input, weight, *opts)                 # (..., dim)
    return add_embedding_update(result, input, lora_A, lora_B, scaling, opts)


def add_embedding_update(result: Tensor, input: Tensor, lora_A: Tensor, lora_B: Tensor, scaling, opts) -> Tensor:
    """``result + scaling · (lora_Aᵀ[input]) @ lora_Bᵀ`` (``opts``: F.embedding's options after the weight), in
    place on ``result`` when it has the adapters' dtype."""
    after_A = _scaled(F.embedding(input, lora_A.t(), *opts), scaling)  # (..., r): the cheap side for the scaling
    if result.dtype == lora_B.dtype:
        result.view(-1, result.shape[-1]).addmm_(after_A.reshape(-1, after_A.shape[-1]), lora_B.t())
        return result
    return (result + after_A @ lora_B.t()).to(result.dtype)
