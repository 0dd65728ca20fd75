r"""Mixed-adapter batches: several LoRA adapters on one base layer, each row of the batch with its own adapter (or
none), in one fused op, for inference and for training (``lora_linear_mixed``, ``lora_embedding_mixed``).

PEFT's ``adapter_names=`` runs this as a loop over the adapters (gather each one's rows, run its lora_A / lora_B,
scatter back) and refuses it in training. Here the base GEMM runs once for all rows and the low-rank terms run as
segmented shrink / expand over the rows grouped by adapter, each adapter with its own rank, scaling and dropout;
the math, its gradients and the packed layout are derived in ``fastlora.mixed_reference`` (the PyTorch
implementation) and run on CUDA by the kernels of ``fastlora.kernels.mixed``. The op is written in the op protocol
(``fastlora.op_common.FusedOp``): ``MIXED_LORA_LINEAR``.

In training, each adapter's gradients are those of a separate run on its own rows (summed over them), each adapter
draws its own dropout mask, and adapters whose parameters do not require grad get none.
"""
from __future__ import annotations

import collections
import functools
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .autograd import check_linear_dtypes
from .mixed_reference import MixedTorch, keep_mask
from .op_common import FusedOp, check_dropout, check_scaling
from .reference import h_dtype

__all__ = ["MIXED_LORA_LINEAR", "lora_linear_mixed", "lora_embedding_mixed", "pack_adapters", "row_index",
           "scalings_tensor"]


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


class MixedLoRALinearOp(FusedOp):
    """``y[m] = x[m] Wᵀ + b + s_a · (drop_a(x[m]) A_aᵀ) B_aᵀ`` with a = adapter_index[m] (-1: no low-rank term);
    adapters packed (``pack_adapters``); saves h (M, max r)."""

    name = "lora_linear_mixed"
    tensors = ("input", "weight", "bias", "lora_A", "lora_B", "adapter_index", "scalings")
    optional = frozenset({"bias"})
    not_floating = frozenset({"adapter_index"})
    no_grad = frozenset({"adapter_index", "scalings"})
    consts = (("ranks", "int[]"), ("dropout_ps", "float[]"))
    saved = ("h",)
    autocast_args = ("input", "weight", "bias", "lora_A", "lora_B")
    dropout = "dropout_ps"  # one p per adapter (the protocol draws a seed when any is > 0)
    torch_impl = MixedTorch
    triton_impl = "fastlora.kernels.mixed:MixedTriton"

    def check(self, a):
        who = self.name
        x, weight, bias, lora_A, lora_B, index, scalings = (a[n] for n in self.tensors)
        ranks, ps = list(a["ranks"]), list(a["dropout_ps"])
        if x.dim() < 1:
            raise ValueError(f"{who}: input must have at least 1 dimension (..., in_features), got a scalar")
        if weight.dim() != 2:
            raise ValueError(f"{who}: weight must be 2-D (out_features, in_features), got {_shape(weight)}")
        N, K = weight.shape
        if x.shape[-1] != K:
            raise ValueError(f"{who}: input {_shape(x)} has {x.shape[-1]} features but weight {_shape(weight)} "
                             f"expects in_features={K}")
        if bias is not None and bias.shape != (N,):
            raise ValueError(f"{who}: bias {_shape(bias)} must be (out_features={N},)")
        n = len(ranks)
        if n == 0 or any(int(r) < 1 for r in ranks):
            raise ValueError(f"{who}: needs one or more adapters, each of rank >= 1, got ranks {ranks}")
        if len(ps) != n:
            raise ValueError(f"{who}: {n} adapters but {len(ps)} dropout_ps")
        R = sum(int(r) for r in ranks)
        if lora_A.shape != (R, K):
            raise ValueError(f"{who}: packed lora_A {_shape(lora_A)} must be (sum of ranks={R}, in_features={K})")
        if lora_B.shape != (N * R,):
            raise ValueError(f"{who}: packed lora_B {_shape(lora_B)} must be (out_features·sum of ranks={N * R},)")
        if scalings.shape != (n,):
            raise ValueError(f"{who}: scalings {_shape(scalings)} must be ({n},), one per adapter")
        if scalings.requires_grad:
            raise ValueError(f"{who}: scalings get no gradient; pass scalings.detach()")
        if index.dtype not in (torch.int64, torch.int32) or index.dim() != 1 or index.numel() != math.prod(
                x.shape[:-1]):
            raise ValueError(f"{who}: adapter_index must be an int64 or int32 tensor of one adapter per row "
                             f"({math.prod(x.shape[:-1])} rows for input {_shape(x)}), got {_shape(index)} "
                             f"{index.dtype}")

    def check_dtypes(self, a):
        check_linear_dtypes(self.name, a["input"], a["weight"], a["lora_A"], a["lora_B"], a["bias"])

    def fake(self, x, weight, bias, lora_A, lora_B, index, scalings, ranks, dropout_ps):
        M = x.shape[0]
        return x.new_empty(M, weight.shape[0]), x.new_empty(M, max(ranks), dtype=h_dtype(x.dtype))

    def differentiable_forward(self, tensors, saved, consts, seed, use_triton):
        """The formula adapter by adapter in differentiable ops, with the forward's masks (double backward)."""
        x, weight, bias, lora_A, lora_B, index, scalings = tensors
        ranks, ps = consts
        M, K = x.shape
        N = weight.shape[0]
        keep = (_triton_keep(seed, index, K, ps) if use_triton else keep_mask(seed, index, K, ps, x.device))
        ld = torch.promote_types(x.dtype, lora_A.dtype)
        xd = x.to(ld) if keep is None else x.to(ld) * keep.to(ld)
        y = F.linear(x, weight, bias)
        o = 0
        for a, r in enumerate(ranks):
            rows = (index == a).nonzero().view(-1)
            low = (xd[rows] @ lora_A[o:o + r].to(ld).t()) @ lora_B[N * o:N * (o + r)].view(N, r).to(ld).t()
            y = y.index_add(0, rows, (low * scalings[a].to(ld)).to(y.dtype))
            o += r
        return y


def _triton_keep(seed, index, K, ps):
    """(M, K) keep/(1-p_a) factors of the Triton kernels' Philox masks (None without dropout)."""
    if not any(p > 0.0 for p in ps):
        return None
    from fastlora.kernels.dropout import dropout_keep_mask

    M = index.numel()
    out = torch.ones((M, K), dtype=torch.float32, device=index.device)
    for a, p in enumerate(ps):
        if p > 0.0:
            rows = (index == a).nonzero().view(-1)
            keep = dropout_keep_mask(seed, (M, K), p, index.device)[rows]
            out[rows] = keep.float() / (1.0 - p)
    return out


MIXED_LORA_LINEAR = MixedLoRALinearOp()


# --------------------------------------------------------------------------------------------------------------
# Packing and the public functions
# --------------------------------------------------------------------------------------------------------------

def pack_adapters(lora_As: Sequence[Tensor], lora_Bs: Sequence[Tensor]):
    """(lora_A (R, K), lora_B (N·R,), ranks): the adapters' A stacked along the rank and their B flattened one
    after the other, in one dtype (the widest); differentiable, so gradients reach each adapter's own tensors."""
    dtypes = {t.dtype for t in lora_As} | {t.dtype for t in lora_Bs}
    ranks = [a.shape[0] for a in lora_As]
    if len(lora_As) == 1 and len(dtypes) == 1 and lora_As[0].is_contiguous() and lora_Bs[0].is_contiguous():
        # one adapter: its own tensors (views), nothing copied
        return lora_As[0], lora_Bs[0].reshape(-1), ranks
    if len(dtypes) == 1:  # the usual case: no per-adapter cast
        A = torch.cat(lora_As, 0)
        if len(set(ranks)) == 1 and all(b.is_contiguous() for b in lora_Bs):  # (n·N, r): the same memory order
            B = torch.cat(lora_Bs, 0).view(-1)
        else:
            B = torch.cat([b.reshape(-1) for b in lora_Bs])
    else:
        dt = functools.reduce(torch.promote_types, dtypes)
        A = torch.cat([a.to(dt) for a in lora_As], 0)
        B = torch.cat([b.to(dt).reshape(-1) for b in lora_Bs])
    return A, B, ranks


_SCALINGS: "collections.OrderedDict" = collections.OrderedDict()


def scalings_tensor(scalings: Sequence, device) -> Tensor:
    """(n,) float32 on ``device``: numbers cached by value (no host-to-device copy per call), 0-d tensors (PEFT's
    hot-swap scalings) stacked as they are."""
    if any(isinstance(s, Tensor) for s in scalings):
        return torch.stack([torch.as_tensor(s).reshape(()).to(device=device, dtype=torch.float32) for s in scalings])
    if torch.compiler.is_compiling():  # a constant of the graph: no cache to consult while tracing
        return torch.tensor([float(s) for s in scalings], dtype=torch.float32, device=device)
    # an inference-mode tensor cannot be saved for a backward outside inference mode: one entry per mode
    key = (tuple(float(s) for s in scalings), str(device), torch.is_inference_mode_enabled())
    hit = _SCALINGS.get(key)
    if hit is None:
        hit = _SCALINGS[key] = torch.tensor(key[0], dtype=torch.float32).to(device)
        if len(_SCALINGS) > 256:
            _SCALINGS.popitem(last=False)
    return hit


def row_index(adapter_index: Tensor, leading_shape, who: str) -> Tensor:
    """The adapter of every row (M,), int64: ``adapter_index`` of shape ``leading_shape`` (one per row) or
    ``leading_shape[:1]`` (one per sample, repeated over the sample's rows)."""
    if not isinstance(adapter_index, Tensor) or adapter_index.is_floating_point() or adapter_index.is_complex():
        raise TypeError(f"{who}: adapter_index must be an integer tensor, got "
                        f"{getattr(adapter_index, 'dtype', type(adapter_index).__name__)}")
    shape = tuple(leading_shape)
    idx = adapter_index.to(torch.int64)
    if tuple(idx.shape) == shape:
        return idx.reshape(-1)
    if len(shape) >= 1 and tuple(idx.shape) == shape[:1]:
        return idx[:, None].expand(shape[0], math.prod(shape[1:])).reshape(-1)
    raise ValueError(f"{who}: adapter_index {_shape(adapter_index)} must be one adapter per row {shape} or per "
                     f"sample {shape[:1]}")


def _check_index_values(index: Tensor, n: int, who: str) -> None:
    """Every index in [-1, n): one host read, skipped where values are not there to read (the meta device,
    torch.compile tracing)."""
    if index.numel() and index.device.type != "meta" and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(index))
        if lo < -1 or hi >= n:
            raise ValueError(f"{who}: adapter_index values must be in [-1, {n}) (-1: base layer only), got "
                             f"[{lo}, {hi}]")


def lora_linear_mixed(
    input: Tensor,
    weight: Tensor,
    lora_As: Sequence[Tensor],
    lora_Bs: Sequence[Tensor],
    adapter_index: Tensor,
    bias: Optional[Tensor] = None,
    *,
    scalings: Sequence,
    dropout_ps: Optional[Sequence[float]] = None,
    training: bool = True,
) -> Tensor:
    r"""Each row with its own adapter: ``y[m] = x[m] Wᵀ + b + s_a · (dropout_a(x[m]) A_aᵀ) B_aᵀ``, a =
    ``adapter_index[m]``, -1 for the base layer alone.

    input (..., in); weight (out, in); ``lora_As[a]`` (r_a, in) and ``lora_Bs[a]`` (out, r_a), ranks free to differ;
    ``adapter_index``: integers in [-1, n), one per row (shape ``input.shape[:-1]``) or one per sample (shape
    ``input.shape[:1]``); ``scalings``: one number or 0-d tensor per adapter; ``dropout_ps``: one p per adapter
    (default none), active only when ``training``. The base GEMM runs once; the low-rank terms run per adapter
    group, never padded to the largest rank. Gradients reach input, every adapter's A and B (each from its own rows
    only) and weight / bias if they require grad.
    """
    who = "lora_linear_mixed"
    n = len(lora_As)
    if n == 0 or len(lora_Bs) != n or len(scalings) != n or (dropout_ps is not None and len(dropout_ps) != n):
        raise ValueError(f"{who}: needs one or more adapters and as many lora_Bs, scalings and dropout_ps, got "
                         f"{n}, {len(lora_Bs)}, {len(scalings)}, {None if dropout_ps is None else len(dropout_ps)}")
    if not isinstance(input, Tensor) or not isinstance(weight, Tensor):
        raise TypeError(f"{who}: input and weight must be tensors")
    for a, (A, B) in enumerate(zip(lora_As, lora_Bs)):
        if not isinstance(A, Tensor) or not isinstance(B, Tensor) or A.dim() != 2 or B.dim() != 2:
            raise ValueError(f"{who}: adapter {a}: lora_A and lora_B must be 2-D tensors")
        if B.shape[1] != A.shape[0]:
            raise ValueError(f"{who}: adapter {a}: rank mismatch: lora_A {_shape(A)} has r={A.shape[0]} but lora_B "
                             f"{_shape(B)} has r={B.shape[1]}")
        if weight.dim() == 2 and (A.shape[1] != weight.shape[1] or B.shape[0] != weight.shape[0]):
            raise ValueError(f"{who}: adapter {a}: lora_A {_shape(A)} must be (r, {weight.shape[1]}) and lora_B "
                             f"{_shape(B)} ({weight.shape[0]}, r) for weight {_shape(weight)}")
        if A.dtype != B.dtype:
            raise TypeError(f"{who}: adapter {a}: lora_A dtype {A.dtype} and lora_B dtype {B.dtype} differ")
    for s in scalings:
        check_scaling(s, input.device, who)
    ps = [0.0] * n if dropout_ps is None else list(dropout_ps)
    for p in ps:
        check_dropout(p, who)
    index = row_index(adapter_index, input.shape[:-1], who)
    _check_index_values(index, n, who)
    A, B, ranks = pack_adapters(lora_As, lora_Bs)
    s = scalings_tensor(scalings, input.device)
    return MIXED_LORA_LINEAR(input, weight, bias, A, B, index.to(input.device), s, ranks=ranks, dropout_ps=ps,
                             training=training)


def lora_embedding_mixed(
    input: Tensor,
    weight: Tensor,
    lora_As: Sequence[Tensor],
    lora_Bs: Sequence[Tensor],
    adapter_index: Tensor,
    *,
    scalings: Sequence,
    padding_idx: Optional[int] = None,
    max_norm: Optional[float] = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Tensor:
    r"""Each token with its sample's (or its own) adapter: ``weight[id] + s_a · Aᵀ_a[id] B_aᵀ``, PEFT's
    ``lora.Embedding`` update (-1: the base lookup alone). ``lora_As[a]`` (r_a, num_embeddings), ``lora_Bs[a]``
    (dim, r_a); ``adapter_index`` per token (``input.shape``) or per sample (``input.shape[:1]``).

    The base lookup runs once; the tokens are sorted by adapter (one ``argsort``) and each adapter gathers its own
    tokens' rows of Aᵀ, multiplies them into its B and adds them into the output in place: work in proportion to
    its own tokens (an embedding's A is (r, vocabulary): stacking the adapters' A would copy vocabulary-sized
    tables every call). Differentiable by PyTorch's autograd, each adapter from its own tokens.
    """
    who = "lora_embedding_mixed"
    n = len(lora_As)
    if n == 0 or len(lora_Bs) != n or len(scalings) != n:
        raise ValueError(f"{who}: needs one or more adapters and as many lora_Bs and scalings, got {n}, "
                         f"{len(lora_Bs)}, {len(scalings)}")
    if not isinstance(input, Tensor) or input.is_floating_point():
        raise TypeError(f"{who}: input must be an integer tensor of indices, got "
                        f"{getattr(input, 'dtype', type(input).__name__)}")
    V, D = weight.shape
    for a, (A, B) in enumerate(zip(lora_As, lora_Bs)):
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != V or B.shape != (D, A.shape[0]):
            raise ValueError(f"{who}: adapter {a}: lora_A {_shape(A)} must be (r, {V}) and lora_B {_shape(B)} "
                             f"({D}, r) for weight {_shape(weight)}")
    for s in scalings:
        check_scaling(s, weight.device, who)
    index = row_index(adapter_index, input.shape, who)
    _check_index_values(index, n, who)
    opts = (padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    result = F.embedding(input, weight, *opts)
    flat = result.view(-1, D)
    ids = input.reshape(-1)
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index + 1, minlength=n + 1).tolist()
    at = counts[0]
    for a in range(n):
        c = counts[a + 1]
        if c == 0:
            continue
        rows = order[at:at + c]
        at += c
        A, B = lora_As[a], lora_Bs[a]
        after_A = F.embedding(ids[rows], A.t(), *opts)                   # (c, r_a)
        s = scalings[a]
        after_A = after_A * (s.to(after_A.dtype) if isinstance(s, Tensor) else s)
        flat.index_add_(0, rows, (after_A @ B.t()).to(flat.dtype))  # in place: nothing (M, dim) beside it
    return flat.view(result.shape)
