r"""LoRA on mixture-of-experts weights: the grouped op ``lora_experts`` and ``lora_experts_forward``, a
transformers 5.x experts module's forward (routing, top-k, gating, routing weights) with LoRA on its 3-D expert
parameters, both free of any (E, out, in) or (out, in) delta.

The op, for the rows of x routed to expert e (rows sorted by expert, expert e owning ``offsets[e-1]:offsets[e]``,
as ``torch.nn.functional.grouped_mm`` takes them)::

    h_e = x_e A_eᵀ                      (M_e, r)     saved (fp32 with fp32 adapters on a half base)
    y_e = x_e W_eᵀ + b_e + s · h_e B_eᵀ (M_e, N)

Backward, given dY::

    dh_e = s · dY_e B_e                 (M_e, r)
    dB_e = s · dY_eᵀ h_e                (N, r)
    dA_e = dh_eᵀ x_e                    (r, K)
    dx_e = dY_e W_e + dh_e A_e          (M_e, K)
    dW_e = dY_eᵀ x_e                    (N, K)       only when W requires grad
    db_e = Σ_rows dY_e                  (N,)         only when the bias requires grad

Saved: x, h and the offsets (the parameters cost nothing). An expert without rows gets zero gradients; rows past
the last offset (owned by no expert) give zero outputs and zero dx.

PEFT's layout (``ParamWrapper`` on a 3-D parameter, ``LoraConfig(target_parameters=...)``): ``lora_A.weight`` is
(r·E, in), expert-major, and ``lora_B.weight`` is (out, r·E) with the expert index the *fastest* one, so
``A_e = lora_A.weight.view(E, r, in)[e]`` and ``B_e = lora_B.weight.view(out, r, E).permute(2, 0, 1)[e]``
(``peft_layout``: views, no copy; autograd maps the gradients back).
"""
from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import moe_reference
from .moe_reference import lo_dtype, spans
from .op_common import FusedOp

__all__ = ["lora_experts", "lora_experts_forward", "peft_layout", "ExpertLoRA", "LORA_EXPERTS"]


def _shape(t) -> str:
    return str(tuple(t.shape))


def _meta_outputs(x, weight, lora_A):
    S, N, r = x.shape[0], weight.shape[1], lora_A.shape[1]
    return x.new_empty(S, N), x.new_empty(S, r, dtype=lo_dtype(x.dtype, lora_A.dtype))


class TorchLoRAExperts:
    """The PyTorch implementation (``fastlora.moe_reference``); on the meta device, shapes only."""

    @staticmethod
    def forward(x, weight, lora_A, lora_B, offsets, bias, scaling, *, seed, save):
        if x.device.type == "meta":
            y, h = _meta_outputs(x, weight, lora_A)
        else:
            y, h = moe_reference.experts_forward(x, weight, lora_A, lora_B, bias, offsets, scaling, store_h=save)
        return y, ((h if save else None),)

    @staticmethod
    def backward(grad_y, x, weight, lora_A, lora_B, offsets, bias, h, scaling, *, seed, needs):
        nx, nw, na, nb, _, nbias = needs
        if x.device.type == "meta":
            return tuple(t.new_empty(t.shape) if need else None
                         for t, need in zip((x, weight, lora_A, lora_B, offsets, bias), needs))
        dx, dw, da, db, dbias = moe_reference.experts_backward(grad_y, x, weight, lora_A, lora_B, h, offsets,
                                                               scaling, (nx, nw, na, nb, nbias))
        return dx, dw, da, db, None, dbias


class TritonLoRAExperts:
    """The Triton implementation (``fastlora.kernels.moe``): the same signature."""

    @staticmethod
    def forward(x, weight, lora_A, lora_B, offsets, bias, scaling, *, seed, save):
        from fastlora.kernels import moe as kernels

        y, h = kernels.experts_forward(x, weight, lora_A, lora_B, bias, offsets, scaling, store_h=save)
        return y, (h,)

    @staticmethod
    def backward(grad_y, x, weight, lora_A, lora_B, offsets, bias, h, scaling, *, seed, needs):
        from fastlora.kernels import moe as kernels

        nx, nw, na, nb, _, nbias = needs
        dx, dw, da, db, dbias = kernels.experts_backward(grad_y, x, weight, lora_A, lora_B, h, offsets, scaling,
                                                         (nx, nw, na, nb, nbias))
        return dx, dw, da, db, None, dbias


class LoRAExpertsOp(FusedOp):
    """``y_e = x_e W_eᵀ + b_e + s·(x_e A_eᵀ) B_eᵀ`` for the rows of each expert; saves h (S, r)."""

    name = "lora_experts"
    tensors = ("input", "weight", "lora_A", "lora_B", "offsets", "bias")
    optional = frozenset({"bias"})
    not_floating = frozenset({"offsets"})
    no_grad = frozenset({"offsets"})
    consts = (("scaling", "float"),)
    saved = ("h",)
    autocast_args = ("input", "weight", "lora_A", "lora_B", "bias")
    scaled = "lora_B"
    dropout = None
    torch_impl = TorchLoRAExperts
    triton_impl = "fastlora.moe:TritonLoRAExperts"

    def check(self, a):
        who = self.name
        x, weight, lora_A, lora_B, offsets, bias = (a[n] for n in self.tensors)
        if x.dim() != 2 or weight.dim() != 3 or lora_A.dim() != 3 or lora_B.dim() != 3 or offsets.dim() != 1:
            raise ValueError(f"{who}: expected input (S, in), weight (E, out, in), lora_A (E, r, in), lora_B "
                             f"(E, out, r), offsets (E,); got input {_shape(x)}, weight {_shape(weight)}, lora_A "
                             f"{_shape(lora_A)}, lora_B {_shape(lora_B)}, offsets {_shape(offsets)}")
        E, N, K = weight.shape
        r = lora_A.shape[1]
        if (x.shape[1] != K or lora_A.shape != (E, r, K) or lora_B.shape != (E, N, r) or offsets.shape[0] != E
                or (bias is not None and bias.shape != (E, N))):
            raise ValueError(f"{who}: shapes disagree: input {_shape(x)}, weight {_shape(weight)} (E, out, in), "
                             f"lora_A {_shape(lora_A)} (E, r, in), lora_B {_shape(lora_B)} (E, out, r), offsets "
                             f"{_shape(offsets)} (E,), bias {None if bias is None else _shape(bias)} (E, out)")
        if offsets.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{who}: offsets must be int32 or int64 (cumulative rows per expert), got {offsets.dtype}")
        if offsets.device.type == "cpu" and offsets.numel() and not torch.compiler.is_compiling():
            o = offsets.tolist()  # on the host already: checked (on a GPU it would cost a sync)
            if any(b < a for a, b in zip([0] + o, o)) or o[-1] > x.shape[0]:
                raise ValueError(f"{who}: offsets must be non-decreasing and end at most at input's {x.shape[0]} "
                                 f"rows, got {o}")

    def check_dtypes(self, a):
        x, weight, lora_A, lora_B, bias = (a[n] for n in ("input", "weight", "lora_A", "lora_B", "bias"))
        if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
            raise TypeError(f"{self.name}: input is {x.dtype} but weight is {weight.dtype}"
                            + ("" if bias is None else f" and bias {bias.dtype}") + " (outside autocast they must "
                            "agree)")
        if lora_A.dtype != lora_B.dtype:
            raise TypeError(f"{self.name}: lora_A is {lora_A.dtype} but lora_B is {lora_B.dtype}")

    def fake(self, x, weight, lora_A, lora_B, offsets, bias, scaling):
        return _meta_outputs(x, weight, lora_A)

    def differentiable_forward(self, tensors, saved, consts, seed, use_triton):
        x, weight, lora_A, lora_B, offsets, bias = tensors
        (scaling,) = consts
        lo = lo_dtype(x.dtype, lora_A.dtype)
        rows = x.new_zeros(x.shape[0], weight.shape[1])
        for e, a, b in spans(offsets):
            xs = x[a:b]
            ys = xs @ weight[e].t() + ((xs.to(lo) @ lora_A[e].t().to(lo)) @ lora_B[e].t().to(lo) * scaling).to(x.dtype)
            rows = rows.index_copy(0, torch.arange(a, b, device=x.device), ys if bias is None else ys + bias[e])
        return rows


LORA_EXPERTS = LoRAExpertsOp()


def lora_experts(input: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, offsets: Tensor,
                 bias: Optional[Tensor] = None, *, scaling=1.0) -> Tensor:
    """LoRA on a stack of expert weights, rows grouped by expert: for the rows of expert e,
    ``y = x W_eᵀ + b_e + scaling · (x A_eᵀ) B_eᵀ``, with input (S, in) sorted by expert, weight (E, out, in),
    lora_A (E, r, in), lora_B (E, out, r), bias (E, out) or None, offsets (E,) the cumulative row count per expert
    (int32/int64, as ``torch.nn.functional.grouped_mm``'s ``offs``). Any strides: a stack stored (E, in, out) is
    passed as ``weight.transpose(1, 2)``. r may be 0 (a plain grouped linear). Gradients for every input that
    requires one; dW only when the weight requires grad. ``scaling``: a number or a one-element tensor."""
    return LORA_EXPERTS(input, weight, lora_A, lora_B, offsets, bias, scaling=scaling)


# --------------------------------------------------------------------------------------------------------------
# PEFT's layout and a transformers experts module's forward
# --------------------------------------------------------------------------------------------------------------

class ExpertLoRA:
    """The LoRA of one 3-D expert parameter, as the op takes it: A (E, r, in), B (E, out, r), scaling."""

    __slots__ = ("A", "B", "scaling")

    def __init__(self, A: Tensor, B: Tensor, scaling=1.0):
        self.A, self.B, self.scaling = A, B, scaling


def peft_layout(lora_A_weight: Tensor, lora_B_weight: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """(A, B) as (E, r, in), (E, out, r) views of PEFT ``ParamWrapper``'s ``lora_A.weight`` (r·E, in) and
    ``lora_B.weight`` (out, r·E): A's rows are expert-major, B's columns expert-minor (column k·E + e is rank k of
    expert e), as PEFT's ``get_delta_weight`` reads them."""
    rE, K = lora_A_weight.shape
    N = lora_B_weight.shape[0]
    r = rE // num_experts
    A = lora_A_weight.view(num_experts, r, K)
    B = lora_B_weight.view(N, r, num_experts).permute(2, 0, 1)
    return A, B


def combine(loras: Sequence[ExpertLoRA]) -> ExpertLoRA:
    """Several adapters on one parameter as one: their ranks side by side, each B scaled by its own scaling (an
    (E, out, r) product, autograd-visible)."""
    if len(loras) == 1:
        return loras[0]
    As = [lo.A for lo in loras]
    Bs = [lo.B * (lo.scaling.to(lo.B.dtype) if isinstance(lo.scaling, Tensor) else lo.scaling) for lo in loras]
    dtype = torch.promote_types(As[0].dtype, As[-1].dtype)
    return ExpertLoRA(torch.cat([a.to(dtype) for a in As], 1), torch.cat([b.to(dtype) for b in Bs], 2), 1.0)


_PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")
_SIGNATURES: dict = {}


def routing_args(experts, args, kwargs):
    """(hidden_states, top_k_index, top_k_weights) from an experts module's call, whatever its parameter names
    (Qwen3-MoE and Mixtral: top_k_index, top_k_weights; GPT-OSS: router_indices, routing_weights)."""
    cls = type(experts)
    sig = _SIGNATURES.get(cls)
    if sig is None:
        sig = _SIGNATURES[cls] = inspect.signature(cls.forward)
    bound = sig.bind(experts, *args, **kwargs)
    values = list(bound.arguments.values())[1:]
    if len(values) != 3 or any(v is None for v in values):
        raise TypeError(f"{cls.__name__}: expected (hidden_states, top_k_index, top_k_weights)")
    return values


def _expert_weight(experts, name: str) -> Tensor:
    """The (E, out, in) view of an expert stack (transformers' ``is_transposed`` stacks are (E, in, out))."""
    w = getattr(experts, name)
    return w.transpose(1, 2) if experts.is_transposed else w


def _project(x, experts, name, lora: Optional[ExpertLoRA], offsets):
    weight = _expert_weight(experts, name)
    bias = getattr(experts, f"{name}_bias") if experts.has_bias else None
    if lora is None:  # a plain grouped linear: rank 0
        E, N, K = weight.shape
        A = weight.new_zeros(E, 0, K)
        lora = ExpertLoRA(A, weight.new_zeros(E, N, 0), 1.0)
    return lora_experts(x, weight, lora.A, lora.B, offsets, bias, scaling=lora.scaling)


def lora_experts_forward(experts, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                         loras: dict) -> Tensor:
    """The forward of a transformers 5.x experts module (decorated with ``use_experts_implementation``: Qwen3-MoE,
    Mixtral, GPT-OSS, ...) with LoRA on its expert parameters, ``loras`` mapping a parameter name
    (``gate_up_proj`` / ``up_proj`` / ``down_proj``) to an ``ExpertLoRA`` (absent: no LoRA on it).

    The tokens are sorted by expert once (top-k copies of each), run through the gate/up projection, the module's
    own gate (``_apply_gate``) or activation, the down projection, scaled by their routing weights and summed per
    token, as transformers' ``grouped_mm`` implementation does; each projection is one ``lora_experts`` call."""
    num_tokens, hidden = hidden_states.shape
    k = top_k_index.shape[-1]
    E = experts.num_experts
    expert_ids = top_k_index.reshape(-1)
    sorted_ids, perm = torch.sort(expert_ids, stable=True)
    # histc, as transformers counts them: no host sync (bincount reads the maximum), deterministic on CUDA
    ids = sorted_ids.float() if sorted_ids.device.type in ("cpu", "mps") else sorted_ids.int()
    offsets = torch.cumsum(torch.histc(ids, bins=E, min=0, max=E - 1), 0).to(torch.int32)
    x = hidden_states[perm // k]
    up_name = "gate_up_proj" if experts.has_gate else "up_proj"
    up = _project(x, experts, up_name, loras.get(up_name), offsets)
    act = experts._apply_gate(up) if experts.has_gate else experts.act_fn(up)
    out = _project(act, experts, "down_proj", loras.get("down_proj"), offsets)
    if experts.has_post_expert_norm:
        out = experts.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1).to(out.dtype)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return out[inv].view(num_tokens, k, hidden).sum(1).to(hidden_states.dtype)
