r"""The LoRA embedding op (``LORA_EMBEDDING``), PEFT's ``lora.Embedding`` update, in the op protocol
(``fastlora.op_common.FusedOp``).

With ids (M,), the table W (V, D), A (r, V), B (D, r) and s the scaling, ``a = Aᵀ[ids]`` (M, r)::

    y  = W[ids] + s · a Bᵀ               (M, D)   a saved (M·r values)
    dW = scatter-add of dY over ids      (V, D)   only when W requires grad (frozen in LoRA)
    dA = (scatter-add of s·dY B over ids)ᵀ  (r, V)
    dB = s · dYᵀ a                       (D, r)

The scatter-adds are ``aten.embedding_backward``, the backward of ``F.embedding`` itself, so ``nn.Embedding``'s
options (padding_idx: no gradient for that row; scale_grad_by_freq; sparse) act as they do in PEFT. The low-rank
terms run in the adapters' dtype and the sum is rounded once into W's, as PEFT's. There is no Triton kernel: the
lookups are gathers, and the rest is an (M, r) × (r, D) product added in place into the output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .op_common import EmbeddingOp, FusedOp

__all__ = ["LORA_EMBEDDING", "LoRAEmbeddingOp", "add_embedding_update"]


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _scaled(t: Tensor, scaling) -> Tensor:
    return t * (scaling.to(t.dtype) if isinstance(scaling, Tensor) else scaling)


def add_embedding_update(result: Tensor, input: Tensor, lora_A: Tensor, lora_B: Tensor, scaling, opts) -> Tensor:
    """``result + scaling · (lora_Aᵀ[input]) @ lora_Bᵀ`` (``opts``: F.embedding's options after the weight), in
    place on ``result`` when it has the adapters' dtype; differentiable (PyTorch's autograd)."""
    after_A = _scaled(F.embedding(input, lora_A.t(), *opts), scaling)  # (..., r): the cheap side for the scaling
    if result.dtype == lora_B.dtype:
        result.view(-1, result.shape[-1]).addmm_(after_A.reshape(-1, after_A.shape[-1]), lora_B.t())
        return result
    return (result + after_A @ lora_B.t()).to(result.dtype)


def _padding(padding_idx, num_embeddings: int) -> int:
    """F.embedding's normalization of padding_idx for aten's embedding_backward (-1: none)."""
    if padding_idx is None:
        return -1
    return padding_idx + num_embeddings if padding_idx < 0 else padding_idx


class TorchLoRAEmbedding:
    @staticmethod
    def forward(ids, weight, lora_A, lora_B, scaling, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                sparse, *, seed, save):
        opts = (padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
        result = F.embedding(ids, weight, *opts)  # (M, D)
        after_A = F.embedding(ids, lora_A.t(), *opts)  # (M, r)
        s_a = after_A * scaling  # the cheap (M, r) side for the scaling
        if result.dtype == lora_B.dtype:
            y = result.addmm_(s_a, lora_B.t())  # in place: nothing (M, D) beside the output
        else:  # fp32 adapters on a half table: the update in fp32, rounded once into the sum (PEFT's dtypes)
            y = (result + s_a @ lora_B.t()).to(result.dtype)
        return y, ((after_A if save else None),)

    @staticmethod
    def backward(grad_y, ids, weight, lora_A, lora_B, after_A, scaling, padding_idx, max_norm, norm_type,
                 scale_grad_by_freq, sparse, *, seed, needs):
        _, nw, na, nb = needs
        V = weight.shape[0]
        pad = _padding(padding_idx, V)
        ld = torch.promote_types(grad_y.dtype, lora_A.dtype)
        dW = dA = dB = None
        if nw:
            dW = torch.ops.aten.embedding_backward(grad_y, ids, V, pad, scale_grad_by_freq, sparse)
        if na:
            dh = torch.mm(grad_y.to(ld), lora_B.to(ld)).mul_(scaling)  # (M, r)
            dA = torch.ops.aten.embedding_backward(dh, ids, V, pad, scale_grad_by_freq, sparse).t()
        if nb:
            dB = torch.mm(grad_y.to(ld).t(), after_A.to(ld)).mul_(scaling)  # (D, r)
        return None, dW, dA, dB


class LoRAEmbeddingOp(EmbeddingOp):
    """``y = W[ids] + s·Aᵀ[ids] Bᵀ``; saves Aᵀ[ids]."""

    name = "lora_embedding"
    tensors = ("input", "weight", "lora_A", "lora_B")
    not_floating = frozenset({"input"})
    no_grad = frozenset({"input"})
    consts = (("scaling", "float"), ("padding_idx", "int?"), ("max_norm", "float?"), ("norm_type", "float"),
              ("scale_grad_by_freq", "bool"), ("sparse", "bool"))
    saved = ("after_A",)
    scaled = "lora_B"
    dropout = None
    torch_impl = TorchLoRAEmbedding

    def check(self, a):
        ids, weight, lora_A, lora_B = (a[n] for n in self.tensors)
        if ids.is_floating_point() or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"lora_embedding: input must be an integer tensor of indices, got {ids.dtype}")
        for name in ("weight", "lora_A", "lora_B"):
            if a[name].dim() != 2:
                raise ValueError(f"lora_embedding: {name} must be a 2-D tensor, got {_shape(a[name])}")
        if lora_A.shape[1] != weight.shape[0] or lora_B.shape != (weight.shape[1], lora_A.shape[0]):
            raise ValueError(f"lora_embedding: lora_A {_shape(lora_A)} must be (r, {weight.shape[0]}) and lora_B "
                             f"{_shape(lora_B)} (embedding_dim={weight.shape[1]}, r) for weight {_shape(weight)}")

    def fake(self, ids, weight, lora_A, lora_B, *consts):
        M = ids.shape[0]
        return weight.new_empty(M, weight.shape[1]), lora_A.new_empty(M, lora_A.shape[0])

    def differentiable_forward(self, tensors, saved, consts, seed, use_triton):
        ids, weight, lora_A, lora_B = tensors
        scaling, *opts = consts
        base = F.embedding(ids, weight, *opts)
        low = F.embedding(ids, lora_A.t(), *opts) @ lora_B.t() * scaling
        return (base + low).to(base.dtype)


LORA_EMBEDDING = LoRAEmbeddingOp()
