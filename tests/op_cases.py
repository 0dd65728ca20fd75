"""One small call of every fused op, for the tests that hold for all of them (tests/test_ops_protocol.py: tensor
scaling, torch.compile(fullgraph=True), autocast, the meta device, torch.library.opcheck of the custom ops).

A new op adds a builder below and one line to ``CASES``. A builder ``make(device, dtype, dropout)`` returns an
``OpCall``: the public function with its arguments (``run(**overrides)`` calls it, e.g. ``run(scaling=t)``), the
op and the arguments it is called with (``op_args`` / ``op_kwargs``: what ``FusedOp.__call__`` takes, for opcheck),
the leaves that get gradients, and ``reference(**overrides)``: PEFT's formula in differentiable PyTorch ops
(without dropout), the oracle of the autocast test.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F

import fastlora


@dataclasses.dataclass
class OpCall:
    fn: Callable                 # the public function
    args: tuple                  # its positional arguments
    kwargs: dict                 # its keyword arguments (``scaling`` among them)
    op: object                   # the FusedOp
    op_args: tuple               # the tensors FusedOp.__call__ takes
    op_kwargs: dict              # its consts (and ``training``)
    leaves: tuple                # tensors that require grad
    reference: Callable          # reference(**overrides) -> y

    def run(self, **overrides):
        return self.fn(*self.args, **{**self.kwargs, **overrides})


@dataclasses.dataclass(frozen=True)
class OpCase:
    name: str
    make: Callable  # make(device, dtype, dropout) -> OpCall
    meta: Optional[str] = None  # why the meta device does not apply (None: it does)
    dropout: bool = True  # the op has dropout

    def __str__(self):
        return self.name


def _rand(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def _leaf(t, device, dtype):
    return t.to(device=device, dtype=dtype).requires_grad_()


def lora_linear_case(device="cpu", dtype=torch.float32, dropout=0.0) -> OpCall:
    g = torch.Generator().manual_seed(0)
    x = _leaf(_rand(g, 2, 3, 8), device, dtype)
    W, b = _rand(g, 6, 8, scale=0.3).to(device, dtype), _rand(g, 6).to(device, dtype)
    A, B = _leaf(_rand(g, 3, 8, scale=0.3), device, dtype), _leaf(_rand(g, 6, 3), device, dtype)
    kwargs = dict(scaling=0.75, dropout_p=dropout)

    def reference(scaling=0.75, **_):
        return F.linear(x, W, b) + F.linear(F.linear(x, A), B) * scaling

    return OpCall(fastlora.lora_linear, (x, W, A, B, b), kwargs, fastlora.autograd.LORA_LINEAR, (x, W, A, B, b),
                  kwargs, (x, A, B), reference)


# F.embedding's options as the embedding ops take them: padding row 1, the rest at their defaults
_EMBEDDING_OPTIONS = dict(padding_idx=1, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False)


def _embedding_inputs(device, dtype):
    """(generator, ids, W, A, B) of the embedding cases: 10 × 6 table, rank 3, the padding row twice in the ids."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 10, (2, 3), generator=g)
    ids[0, 0] = ids[1, 2] = 1  # the padding row, twice: it gets no gradient
    ids = ids.to(device)
    W = _rand(g, 10, 6).to(device, dtype)
    A, B = _leaf(_rand(g, 3, 10), device, dtype), _leaf(_rand(g, 6, 3), device, dtype)
    return g, ids, W, A, B


def lora_embedding_case(device="cpu", dtype=torch.float32, dropout=0.0) -> OpCall:
    _, ids, W, A, B = _embedding_inputs(device, dtype)
    kwargs = dict(scaling=0.75, padding_idx=1)
    op_kwargs = dict(scaling=0.75, **_EMBEDDING_OPTIONS)

    def reference(scaling=0.75, **_):
        return F.embedding(ids, W, padding_idx=1) + F.embedding(ids, A.t(), padding_idx=1) @ B.t() * scaling

    from fastlora.embedding import LORA_EMBEDDING

    return OpCall(fastlora.lora_embedding, (ids, W, A, B), kwargs, LORA_EMBEDDING, (ids, W, A, B), op_kwargs,
                  (A, B), reference)


def dora_linear_case(device="cpu", dtype=torch.float32, dropout=0.0) -> OpCall:
    from fastlora.dora import DORA_LINEAR

    g = torch.Generator().manual_seed(0)
    x = _leaf(_rand(g, 2, 3, 8), device, dtype)
    W, b = _rand(g, 6, 8, scale=0.3).to(device, dtype), _rand(g, 6).to(device, dtype)
    A, B = _leaf(_rand(g, 3, 8, scale=0.3), device, dtype), _leaf(_rand(g, 6, 3), device, dtype)
    m = _leaf(_rand(g, 6).abs() + 0.5, device, dtype)
    kwargs = dict(scaling=0.75, dropout_p=dropout)

    def reference(scaling=0.75, **_):
        norm = torch.linalg.vector_norm(W + scaling * (B @ A), dim=1).detach()
        base = F.linear(x, W)
        # PEFT returns its base layer's output dtype (the autocast dtype under autocast)
        return ((m / norm) * (base + F.linear(F.linear(x, A), B) * scaling) + b).to(base.dtype)

    return OpCall(fastlora.dora_linear, (x, W, A, B, m, b), kwargs, DORA_LINEAR, (x, W, A, B, m, b), kwargs,
                  (x, A, B, m), reference)


def dora_embedding_case(device="cpu", dtype=torch.float32, dropout=0.0) -> OpCall:
    from fastlora.dora import DORA_EMBEDDING

    g, ids, W, A, B = _embedding_inputs(device, dtype)
    m = _leaf(_rand(g, 6).abs() + 0.5, device, dtype)
    es = torch.tensor(1.5).to(device, dtype)  # an embed scale (Gemma's), applied to the DoRA term too
    base = F.embedding(ids, W, padding_idx=1)
    kwargs = dict(scaling=0.75, base_output=base, embed_scale=es, padding_idx=1)
    op_kwargs = dict(scaling=0.75, **_EMBEDDING_OPTIONS)

    def reference(scaling=0.75, **_):
        norm = torch.linalg.vector_norm(W.t() + scaling * (B @ A), dim=1).detach()
        low = (F.embedding(ids, A.t(), padding_idx=1) @ B.t()) * scaling * es
        return (m / norm) * base + (m / norm) * low

    return OpCall(fastlora.dora_embedding, (ids, W, A, B, m), kwargs, DORA_EMBEDDING, (ids, W, A, B, m, base, es),
                  op_kwargs, (A, B, m), reference)


def lora_linear_4bit_case(device="cpu", dtype=torch.float32, dropout=0.0) -> OpCall:
    bnbF = pytest.importorskip("bitsandbytes.functional")
    from fastlora import qlora

    g = torch.Generator().manual_seed(0)
    N, K = 16, 64  # K a multiple of the blocksize: bitsandbytes' CPU dequantization reads it right
    q, qs = bnbF.quantize_4bit(_rand(g, N, K, scale=0.3), blocksize=64, quant_type="nf4", compress_statistics=True)
    W = bnbF.dequantize_4bit(q, qs)
    x = _leaf(_rand(g, 2, 3, K), device, dtype)
    A, B = _leaf(_rand(g, 3, K, scale=0.2), device, dtype), _leaf(_rand(g, N, 3), device, dtype)
    b = _rand(g, N).to(device, dtype)
    kwargs = dict(quant_state=qs, scaling=0.75, dropout_p=dropout)
    absmax, absmax2, code2, offset, blocksize2 = qlora._quant_tensors(qs)
    op_args = (x, qlora._packed_bytes(q), absmax, absmax2, code2, offset, A, B, b)
    op_kwargs = dict(out_features=N, in_features=K, blocksize=64, quant_type="nf4", quant_dtype=torch.float32,
                     blocksize2=blocksize2, scaling=0.75, dropout_p=dropout)

    def reference(scaling=0.75, **_):
        return F.linear(x, W.to(x.dtype), b) + F.linear(F.linear(x, A), B) * scaling

    return OpCall(fastlora.lora_linear_4bit, (x, q, A, B, b), kwargs, qlora.LORA_4BIT, op_args, op_kwargs, (x, A, B),
                  reference)


def lora_experts_case(device="cpu", dtype=torch.float32, dropout=0.0) -> OpCall:
    """Three experts (the middle one without rows), GPT-OSS-style transposed stack with biases."""
    from fastlora.moe import LORA_EXPERTS

    g = torch.Generator().manual_seed(0)
    counts = (3, 0, 2)
    x = _leaf(_rand(g, 5, 8), device, dtype)
    W = _rand(g, 3, 8, 6, scale=0.3).to(device, dtype).transpose(1, 2)  # (E, out, in) view of an (E, in, out) stack
    A, B = _leaf(_rand(g, 3, 2, 8, scale=0.3), device, dtype), _leaf(_rand(g, 3, 6, 2), device, dtype)
    b = _rand(g, 3, 6).to(device, dtype)
    offsets = torch.tensor(counts).cumsum(0).to(device=device, dtype=torch.int32)
    kwargs = dict(scaling=0.75)

    def reference(scaling=0.75, **_):
        rows, start = [], 0
        for e, n in enumerate(counts):
            xs = x[start:start + n]
            rows.append(F.linear(xs, W[e], b[e]) + F.linear(F.linear(xs, A[e]), B[e]) * scaling)
            start += n
        return torch.cat(rows)

    return OpCall(fastlora.lora_experts, (x, W, A, B, offsets, b), kwargs, LORA_EXPERTS, (x, W, A, B, offsets, b),
                  kwargs, (x, A, B), reference)

def lora_linear_mixed_case(device="cpu", dtype=torch.float32, dropout=0.0) -> OpCall:
    """Two adapters of ranks 3 and 2 and base rows, each row with its own adapter; ``scaling`` and ``dropout_p`` go
    to adapter 0 (adapter 1: 0.5 and half the rate)."""
    from fastlora.mixed import MIXED_LORA_LINEAR, pack_adapters

    g = torch.Generator().manual_seed(0)
    x = _leaf(_rand(g, 2, 3, 8), device, dtype)
    W, b = _rand(g, 6, 8, scale=0.3).to(device, dtype), _rand(g, 6).to(device, dtype)
    A0, B0 = _leaf(_rand(g, 3, 8, scale=0.3), device, dtype), _leaf(_rand(g, 6, 3), device, dtype)
    A1, B1 = _leaf(_rand(g, 2, 8, scale=0.3), device, dtype), _leaf(_rand(g, 6, 2), device, dtype)
    index = torch.tensor([[0, -1, 1], [1, 1, 0]]).to(device)

    def fn(x, W, b, scaling=0.75, dropout_p=0.0):
        return fastlora.lora_linear_mixed(x, W, [A0, A1], [B0, B1], index, b, scalings=[scaling, 0.5],
                                          dropout_ps=[dropout_p, dropout_p / 2])

    def reference(scaling=0.75, **_):
        low0 = F.linear(F.linear(x, A0), B0) * scaling
        low1 = F.linear(F.linear(x, A1), B1) * 0.5
        return F.linear(x, W, b) + low0 * (index == 0)[..., None] + low1 * (index == 1)[..., None]

    A, B, ranks = pack_adapters([A0, A1], [B0, B1])
    s = torch.tensor([0.75, 0.5], device=device)
    op_kwargs = dict(ranks=ranks, dropout_ps=[dropout, dropout / 2])
    return OpCall(fn, (x, W, b), dict(scaling=0.75, dropout_p=dropout), MIXED_LORA_LINEAR,
                  (x, W, b, A, B, index.reshape(-1), s), op_kwargs, (x, A0, B0, A1, B1), reference)


CASES = [
    OpCase("lora_linear", lora_linear_case),
    OpCase("lora_embedding", lora_embedding_case, dropout=False),
    OpCase("dora_linear", dora_linear_case),
    OpCase("dora_embedding", dora_embedding_case, dropout=False),
    OpCase("lora_linear_4bit", lora_linear_4bit_case, meta="bitsandbytes quantizes on a real device"),
    OpCase("lora_experts", lora_experts_case, dropout=False),

    OpCase("lora_linear_mixed", lora_linear_mixed_case),
]
