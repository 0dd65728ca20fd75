r"""DoRA (weight-decomposed LoRA, Liu et al. 2024) as PEFT computes it, without ever forming ``B @ A``.

PEFT's DoRA linear (``peft.tuners.lora.dora.DoraLinearLayer`` + ``variants.DoraLinearVariant``), with x (M, K),
W (N, K), b (N,), A (r, K), B (N, r), the magnitude m (N,), s the scaling and c = keep/(1-p) the dropout mask::

    n  = ‖W + s·B A‖_row                 (N,)   DETACHED: no gradient flows through the norm (DoRA §4.3)
    g  = m / n                           (N,)
    x_d = x ⊙ c                          (M, K) dropout acts on the LoRA branch AND on a second base GEMM
    y  = x Wᵀ + b + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ s·(x_d Aᵀ) Bᵀ

Without dropout (or in eval) PEFT reuses the base output, x_d = x, and this is ``y = g ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b``:
the bias is never scaled. With dropout, since x Wᵀ − x_d Wᵀ = (x − x_d) Wᵀ::

    h  = x_d Aᵀ                          (M, r)  saved
    z  = x_d Wᵀ + s·h Bᵀ                 (M, N)  saved: it is what g multiplies
    t  = (x − x_d) Wᵀ                    (M, N)  zero without dropout
    y  = t + b + g ⊙ z

The norm without B A (N × K). Row i of W + sBA is W_i + s·B_i A, so

    n_i² = ‖W_i‖² + 2s·B_i·(W Aᵀ)_i + s²·B_i (A Aᵀ) B_iᵀ

from W Aᵀ (N, r: one pass over W, 2NKr FLOPs), A Aᵀ (r, r: 2r²K) and ‖W_i‖² (N: from the same pass over W on the
kernel path). Everything accumulates in fp32 (fp64 for fp64 inputs) and n² is clamped at 0 before the square root
(cancellation can make it slightly negative when W_i + s(BA)_i ≈ 0).

When the norm is computed again. Every call that records autograd (training) computes it afresh, as PEFT does:
optimizers write A and B without a trace that could be trusted (torch's fused AdamW, bitsandbytes' 8-bit and paged
optimizers and ``.data`` writes change a tensor without bumping its version counter). Only a call without autograd
on a frozen weight (evaluation, decoding) may reuse the norm of the previous such call (``_norm``), and only when
that provably sees the same data: A and B equal, element for element, to copies kept of them (O(r·(K+N)), against the
O(N·K) pass over W it saves); W the same storage object (a ``.data =`` assignment makes a new one) at the same
version; the same scaling and backend. PEFT's merge / unmerge, the only operations that write a base weight in
place, clear it (``accelerate_peft`` wraps them); ``clear_norm_cache()`` after writing a frozen base weight through
``.data`` by hand.

Backward, given dY (M, N). Write dZ = g ⊙ dY and E = dZ − dY = (g − 1) ⊙ dY::

    ∂L/∂m  = dm = (Σ_rows dY ⊙ z) / n    since y depends on m only through g ⊙ z and n is a constant
    ∂L/∂h  = dh = s · dZ B               (M, r)
    ∂L/∂B  = dB = s · dZᵀ h              (N, r)
    ∂L/∂A  = dA = dhᵀ x_d                (r, K)
    ∂L/∂x  = dx = dY W + (E W + dh A) ⊙ c    (M, K)   y = x Wᵀ + (g−1)⊙x_d Wᵀ + ...; x_d = x ⊙ c
               = dZ W + dh A                          without dropout (c = 1)
    ∂L/∂W  = dW = dYᵀ x + Eᵀ x_d = dZᵀ x_d + dYᵀ (x − x_d)   only when W requires grad
    ∂L/∂b  = db = Σ_rows dY               the bias is outside g: dY, not dZ

So the backward is fastlora's LoRA backward run on dZ (it gives dZ W + dh A, dA, dB), plus, with dropout only,
the correction ((dY − dZ) W) ⊙ (1 − c) on dx: the second base GEMM of the forward has a second one here.
Saved: x, h, z, n, g and the dropout seed (the mask is regenerated, never stored); z is the one (M, N) tensor,
where PEFT's autograd keeps several. ``B @ A`` appears nowhere, in the forward or the backward.

The op is written in the op protocol (``DORA_LINEAR``, a ``fastlora.op_common.FusedOp``): the autograd.Function,
the custom ops ``fastlora::dora_linear_fwd`` / ``_infer`` / ``_bwd`` (torch.compile without a graph break), autocast,
the shared checks and the dispatch come from there; this file holds its math (``TorchDoRA`` / ``TritonDoRA``, one
signature), its checks, what it saves and its differentiable formula.

The Embedding variant (``DoraEmbeddingVariant``) is ``y = g ⊙ (base(x) + s·embed_scale·A[:, x]ᵀ Bᵀ)`` with the
norm over the vocabulary, i.e. the norm above applied to Wᵀ (D, V): ``DORA_EMBEDDING``, its gradients derived in
``TorchDoRAEmbedding``.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend as _backend
from . import reference
from .autograd import check_linear_dtypes, check_linear_shapes, dropped
from .op_common import EmbeddingOp, FusedOp

__all__ = ["dora_linear", "dora_embedding", "dora_weight_norm", "weight_row_sq", "clear_norm_cache",
           "dora_forward_torch", "dora_backward_torch", "DORA_LINEAR", "DoRALinearOp", "DORA_EMBEDDING",
           "DoRAEmbeddingOp"]


# ---------------------------------------------------------------------------------------------------------
# The weight norm from small products
# ---------------------------------------------------------------------------------------------------------

def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32, fp64 for fp64: the dtype the norm pieces accumulate in."""
    return torch.promote_types(dtype, torch.float32)


def clear_norm_cache(weight: Optional[Tensor] = None) -> None:
    """Forget the norm kept for ``weight`` (every weight's without one): needed only after writing into a frozen
    base weight through ``.data`` between two evaluation calls (PEFT's merge / unmerge clear it themselves under
    ``accelerate_peft``; changes to A and B are always seen)."""
    if weight is None:
        _NORM.clear()
    else:
        _NORM.pop(id(_owner(weight)), None)


def _owner(weight: Tensor) -> Tensor:
    return weight if weight._base is None else weight._base  # a transposed view (Embedding) keys on its base


def weight_row_sq(weight: Tensor) -> Tensor:
    """‖W_i‖² (N,) in ``acc_dtype`` (no (N, K) temporary)."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight, 2, dim=1, dtype=acc_dtype(weight.dtype)).square_()


def _mm_acc(a: Tensor, b: Tensor) -> Tensor:
    """a @ b accumulated and returned in ``acc_dtype`` (a is (N, K) large; b small)."""
    acc = acc_dtype(a.dtype)
    if a.dtype != acc and a.is_cuda:
        try:
            return torch.mm(a, b.to(a.dtype), out_dtype=acc)  # fp32 accumulate and output, no fp32 copy of a
        except (RuntimeError, TypeError):
            pass
    return torch.mm(a.to(acc), b.to(acc))


def norm_from_pieces(row_sq: Tensor, wa: Tensor, aat: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """n = sqrt(max(0, ‖W_i‖² + 2s·B_i·(WAᵀ)_i + s²·B_i (AAᵀ) B_iᵀ)), all in ``row_sq``'s dtype."""
    B = lora_B.to(row_sq.dtype)
    cross = (B * wa).sum(1)
    quad = (torch.mm(B, aat) * B).sum(1)
    return (row_sq + (2.0 * scaling) * cross + (scaling * scaling) * quad).clamp_min_(0.0).sqrt_()


def dora_weight_norm_torch(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                           row_sq: Optional[Tensor] = None) -> Tensor:
    """‖W + s·B A‖_row (N,) in ``acc_dtype(weight.dtype)``, from W Aᵀ, A Aᵀ and ‖W_i‖²: never B A."""
    with torch.no_grad():
        acc = acc_dtype(weight.dtype)
        if row_sq is None:
            row_sq = weight_row_sq(weight)
        wa = _mm_acc(weight, lora_A.t())  # (N, r): one pass over W
        A = lora_A.to(acc)
        aat = torch.mm(A, A.t())  # (r, r)
        return norm_from_pieces(row_sq.to(acc), wa, aat, lora_B, scaling)


# The last evaluation-time norm per weight: id(W's owner) -> (weakref to the owner, weakref to W's storage object,
# W's layout and version, copies of A and B, scaling, backend, norm). See "When the norm is computed again" above.
_NORM: dict[int, tuple] = {}


def _weight_key(weight: Tensor):
    return (weight.storage_offset(), tuple(weight.shape), tuple(weight.stride()), weight.dtype, weight.device,
            weight._version)


def _can_reuse(weight: Tensor) -> bool:
    """A frozen weight on a real device, outside CUDA graph capture (whose replays would not rerun the check)."""
    if weight.requires_grad or weight.device.type == "meta":
        return False
    return not (weight.is_cuda and torch.cuda.is_current_stream_capturing())


def _norm(weight, lora_A, lora_B, scaling, use_triton, reuse: bool = False) -> Tensor:
    """The detached norm (computed under no_grad). With ``reuse`` (a call without autograd) the previous
    evaluation-time norm of this weight is returned when W's storage and version, A's and B's values, the scaling
    and the backend are all those it was computed for; otherwise it is computed, and kept when ``reuse``. The result
    may be shared: callers must not modify it in place."""
    if not (reuse and _can_reuse(weight)):
        with torch.no_grad():
            return _norm_impl(weight, lora_A, lora_B, scaling, use_triton)
    owner = _owner(weight)
    storage = weight.untyped_storage()
    key = (_weight_key(weight), float(scaling), bool(use_triton))
    hit = _NORM.get(id(owner))
    if (hit is not None and hit[0]() is owner and hit[1]() is storage and hit[2] == key
            and _same_values(hit[3], lora_A) and _same_values(hit[4], lora_B)):
        return hit[5]
    with torch.no_grad():
        norm = _norm_impl(weight, lora_A, lora_B, scaling, use_triton)
        copies = (lora_A.detach().clone(), lora_B.detach().clone())
    oid = id(owner)
    try:
        refs = (weakref.ref(owner, lambda _r, oid=oid: _NORM.pop(oid, None)), weakref.ref(storage))
    except TypeError:  # not weak-referenceable: nothing kept
        return norm
    _NORM[oid] = (*refs, key, *copies, norm)
    return norm


def _same_values(kept: Tensor, t: Tensor) -> bool:
    return (kept.shape == t.shape and kept.dtype == t.dtype and kept.device == t.device
            and bool(torch.equal(kept, t.detach())))


def _norm_impl(weight, lora_A, lora_B, scaling, use_triton) -> Tensor:
    if use_triton:
        from fastlora.kernels import dora as kdora

        with _backend.kernel_section(True):
            return kdora.dora_weight_norm(weight, lora_A, lora_B, scaling)  # ‖W_i‖² from the same pass over W
    return dora_weight_norm_torch(weight, lora_A, lora_B, scaling)


def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float = 1.0) -> Tensor:
    """‖W + scaling·lora_B @ lora_A‖ per row of ``weight`` (out,), fp32 (fp64 for fp64), detached, computed
    without forming lora_B @ lora_A (see the module docstring)."""
    use_triton = _backend.use_triton(weight.device, weight.dtype)
    return _norm(weight, lora_A, lora_B, float(scaling), use_triton)


# ---------------------------------------------------------------------------------------------------------
# Pure-PyTorch forward / backward (the CPU fallback)
# ---------------------------------------------------------------------------------------------------------

def _keep(seed, x, p):
    return reference.dropout_keep_mask(seed, x.shape, p, x.device)


def dora_forward_torch(x, weight, lora_A, lora_B, bias, g, scaling: float, dropout_p: float, seed: int,
                       save: bool = True):
    """(y, z, h): the forward above in PyTorch ops, in PEFT's terms; z, h None unless ``save``.

    y = base + (g − 1) ⊙ x_d Wᵀ + g ⊙ s·h Bᵀ with base = x Wᵀ + b (nn.Linear's own product, as PEFT's base layer)
    and x_d Wᵀ = base − b without dropout (as PEFT reuses the base output): the same y as t + b + g ⊙ z, but where
    DoRA is a no-op (g = 1 and B = 0: a new adapter) it returns the base layer's output bit for bit, as PEFT does.
    The correction is summed in g's dtype (fp32+), the branch never rounded to x's dtype (with g ≪ 1 and a large
    branch, (g − 1) ⊙ z of a rounded z = x_d Wᵀ + s·h Bᵀ would cancel), and rounded once into y."""
    cd = x.dtype
    ld = reference.low_rank_dtype(cd, lora_A.dtype)
    base = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())  # (M, N): becomes y
    if dropout_p == 0.0:
        x_d = x
        z = base - bias if bias is not None else base.clone()  # x Wᵀ, PEFT's base_result − bias
    else:
        keep = _keep(seed, x, dropout_p)
        x_d = torch.where(keep, x * (1.0 / (1.0 - dropout_p)), 0.0).to(cd)  # (M, K) temporary, never saved
        del keep
        z = torch.mm(x_d, weight.t())  # PEFT's second base GEMM, on the dropped input
    h = torch.mm(x_d.to(ld), lora_A.to(ld).t())  # (M, r)
    del x_d
    low = torch.mm(h * scaling, lora_B.to(ld).t())  # (M, N): s·h Bᵀ
    corr = (g - 1.0) * z.to(g.dtype)
    corr.addcmul_(g, low.to(g.dtype))
    z.add_(low)  # z = x_d Wᵀ + s·h Bᵀ, what g multiplies: saved for the magnitude's gradient
    del low
    y = base.add_(corr) if base.dtype == corr.dtype else base.copy_(base.to(corr.dtype).add_(corr))
    return y, (z if save else None), (h.to(reference.h_dtype(cd)) if save else None)


def dora_backward_torch(grad_y, x, weight, lora_A, lora_B, h, z, g, norm, scaling: float, dropout_p: float,
                        seed: int, needs):
    """(dx, dW, dA, dB, dm, dbias) in PyTorch ops, None where ``needs`` (same order) is False."""
    nx, nw, na, nb, nm, nbias = needs
    cd = grad_y.dtype
    dx = dW = dA = dB = dm = dbias = None
    if nm:
        dm = (grad_y.to(g.dtype) * z.to(g.dtype)).sum(0).div_(norm)
    if nbias:
        dbias = grad_y.sum(0)
    if not (nx or nw or na or nb):
        return dx, dW, dA, dB, dm, dbias
    dz = (grad_y.to(g.dtype) * g).to(cd)
    if dropout_p == 0.0:
        dx, dW, dA, dB, _ = reference.lora_backward(dz, x, weight, lora_A, lora_B, h, scaling, 0.0, 0,
                                                    nx, nw, na, nb, False)
        return dx, dW, dA, dB, dm, dbias
    c = 1.0 / (1.0 - dropout_p)
    keep = _keep(seed, x, dropout_p)
    x_d = torch.where(keep, x * c, 0.0).to(cd)
    # dZ W + dh A and dA, dB, as LoRA on the dropped input; dZᵀ x_d for dW
    dx_d, dW, dA, dB, _ = reference.lora_backward(dz, x_d, weight, lora_A, lora_B, h, scaling, 0.0, 0,
                                                  nx, nw, na, nb, False)
    if nx:
        # dx = dY W + (dZ W + dh A − dY W) ⊙ c  =  where(keep, c·dx_d + (1 − c)·dY W, dY W)
        dyw = torch.mm(grad_y, weight)
        dx = torch.where(keep, dx_d * c + dyw * (1.0 - c), dyw).to(cd)
    if nw:
        dW = dW + torch.mm(grad_y.t(), x - x_d)
    return dx, dW, dA, dB, dm, dbias


# ---------------------------------------------------------------------------------------------------------
# Triton composition: fastlora's LoRA kernels plus fastlora.kernels.dora
# ---------------------------------------------------------------------------------------------------------

def _forward_triton(x, weight, lora_A, lora_B, bias, g, scaling, dropout_p, seed, save):
    from fastlora.kernels import lora_linear as kernels
    from fastlora.kernels import dora as kdora

    # y' = x Wᵀ + s·h Bᵀ with h = x_d Aᵀ (the LoRA kernels apply the Philox mask to the LoRA branch only)
    yp, h = kernels.lora_forward(x, weight, lora_A, lora_B, None, scaling, dropout_p, seed, save_h=save)
    if dropout_p == 0.0:
        y = kdora.scale_columns(yp, g, bias, inplace=not save)  # y = g ⊙ z + b, z = y'
        return y, (yp if save else None), h
    # t = (x − x_d) Wᵀ; z = y' − t; y = t + b + g ⊙ z  (one epilogue pass writes z over y' and y over t)
    x_rest = kdora.dropout_scale(x, seed, dropout_p, keep_scale=1.0 - 1.0 / (1.0 - dropout_p), drop_scale=1.0)
    t = torch.mm(x_rest, weight.t())
    del x_rest
    y = kdora.scale_columns(yp, g, bias, rest=t)
    return y, (yp if save else None), h


def _backward_triton(grad_y, x, weight, lora_A, lora_B, h, z, g, norm, scaling, dropout_p, seed, needs):
    from fastlora.kernels import lora_linear as kernels
    from fastlora.kernels import dora as kdora

    nx, nw, na, nb, nm, nbias = needs
    dx = dW = dA = dB = dm = dbias = None
    lora_needed = nx or nw or na or nb
    # one pass over dY and z: dZ = g ⊙ dY, Σ dY ⊙ z, Σ dY, and with dropout F = dY − dZ
    dz, dg, dsum, fdy = kdora.grad_scale(grad_y, z, g, need_dz=lora_needed, need_dg=nm, need_dsum=nbias,
                                         need_rest=nx and dropout_p > 0.0)
    if nm:
        dm = dg.div_(norm)
    if nbias:
        dbias = dsum.to(grad_y.dtype)
    if not lora_needed:
        return dx, dW, dA, dB, dm, dbias
    if dropout_p == 0.0:
        dx, dW, dA, dB, _ = kernels.lora_backward(dz, x, weight, lora_A, lora_B, h, scaling, 0.0, 0,
                                                  nx, nw, na, nb, False)
        return dx, dW, dA, dB, dm, dbias
    c = 1.0 / (1.0 - dropout_p)
    # dx' = dZ W + (dh A) ⊙ c, dA = dhᵀ x_d, dB: LoRA's backward on dZ, same seed, same Philox mask
    dx, _, dA, dB, _ = kernels.lora_backward(dz, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed,
                                             nx, False, na, nb, False)
    if nx:  # dx = dx' + ((dY − dZ) W) ⊙ (1 − c)
        fw = torch.mm(fdy, weight)
        kdora.dropout_scale(fw, seed, dropout_p, keep_scale=1.0 - c, drop_scale=1.0, out=dx, accumulate=True)
    if nw:  # dW = dZᵀ x_d + dYᵀ (x − x_d)
        x_d = kdora.dropout_scale(x, seed, dropout_p, keep_scale=c, drop_scale=0.0)
        dW = torch.mm(dz.t(), x_d).add_(torch.mm(grad_y.t(), x - x_d))
    return dx, dW, dA, dB, dm, dbias


# ---------------------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------------------

def differentiable_forward(x, weight, lora_A, lora_B, magnitude, bias, norm, scaling, dropout_p, seed, use_triton):
    """PEFT's DoRA formula in differentiable PyTorch ops, the norm a constant (``norm``, saved by the forward) and the
    op's own dropout mask: what a double backward differentiates (op_common.recompute_grads)."""
    xd = dropped(x, dropout_p, seed, use_triton)
    g = magnitude.to(norm.dtype) / norm
    ld = torch.promote_types(g.dtype, lora_A.dtype)
    low = F.linear(F.linear(xd.to(ld), lora_A.to(ld)), lora_B.to(ld)) * scaling
    y = F.linear(x, weight, bias) + (g - 1) * F.linear(xd, weight).to(ld) + g * low
    return y.to(x.dtype)


class _DoRAImpl:
    """forward / backward of the op around one implementation's bodies (``use_triton`` picks them)."""

    use_triton = False

    @classmethod
    def forward(cls, x, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p, *, seed, save):
        # the norm: detached, as PEFT; a call without autograd (not save) may reuse the previous one (``_norm``)
        norm = _norm(weight, lora_A, lora_B, scaling, cls.use_triton, reuse=not save)
        g = magnitude.detach().to(norm.dtype) / norm
        fwd = _forward_triton if cls.use_triton else dora_forward_torch
        y, z, h = fwd(x, weight, lora_A, lora_B, bias, g, scaling, dropout_p, seed, save)
        return y, (z, h, norm, g)

    @classmethod
    def backward(cls, grad_y, x, weight, lora_A, lora_B, magnitude, bias, z, h, norm, g, scaling, dropout_p, *,
                 seed, needs):
        bwd = _backward_triton if cls.use_triton else dora_backward_torch
        return bwd(grad_y, x, weight, lora_A, lora_B, h, z, g, norm, scaling, dropout_p, seed, needs)


class TorchDoRA(_DoRAImpl):
    """The PyTorch implementation (``dora_forward_torch`` / ``dora_backward_torch``)."""


class TritonDoRA(_DoRAImpl):
    """The Triton implementation: fastlora's LoRA kernels plus ``fastlora.kernels.dora``."""

    use_triton = True


class DoRALinearOp(FusedOp):
    """PEFT's DoRA linear; saves z, h, the norm and g."""

    name = "dora_linear"
    tensors = ("input", "weight", "lora_A", "lora_B", "magnitude", "bias")
    optional = frozenset({"bias"})
    consts = (("scaling", "float"), ("dropout_p", "float"))
    saved = ("z", "h", "norm", "g")
    autocast_args = ("input", "weight", "lora_A", "lora_B", "bias")
    scaled = "lora_B"
    torch_impl = TorchDoRA
    triton_impl = "fastlora.dora:TritonDoRA"

    def check(self, a):
        weight, magnitude = a["weight"], a["magnitude"]
        check_linear_shapes(self.name, a["input"], weight, a["lora_A"], a["lora_B"], a["bias"])
        N = weight.shape[0]
        if magnitude.dim() != 1 or magnitude.shape[0] != N:
            raise ValueError(f"dora_linear: magnitude {_shape(magnitude)} must be (out_features={N},)")

    def check_dtypes(self, a):
        check_linear_dtypes(self.name, a["input"], a["weight"], a["lora_A"], a["lora_B"], a["bias"])

    def fake(self, x, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p):
        M, N, r = x.shape[0], weight.shape[0], lora_A.shape[0]
        acc = acc_dtype(weight.dtype)
        return (x.new_empty(M, N), x.new_empty(M, N), x.new_empty(M, r, dtype=reference.h_dtype(x.dtype)),
                weight.new_empty(N, dtype=acc), weight.new_empty(N, dtype=acc))

    def differentiable_forward(self, tensors, saved, consts, seed, use_triton):
        x, weight, lora_A, lora_B, magnitude, bias = tensors
        norm = saved[2]
        return differentiable_forward(x, weight, lora_A, lora_B, magnitude, bias, norm, *consts, seed, use_triton)


DORA_LINEAR = DoRALinearOp()


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def dora_linear(
    input: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    bias: Optional[Tensor] = None,
    *,
    scaling: float | Tensor = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    r"""PEFT's DoRA linear, fused, without forming lora_B @ lora_A::

        g = magnitude / ‖weight + scaling·lora_B lora_A‖_row     (detached norm)
        y = x Wᵀ + b + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ scaling·(x_d lora_Aᵀ) lora_Bᵀ,   x_d = dropout(x)

    input (..., in), weight (out, in), lora_A (r, in), lora_B (out, r), magnitude (out,), bias (out,) or None.
    Dropout only when ``training`` and ``dropout_p > 0``. The output has input's dtype; the adapters and the
    magnitude may be wider (fp32 on a bf16 base, as PEFT keeps them). Gradients flow to input, lora_A, lora_B
    and magnitude, and to weight and bias only if they require grad. ``scaling`` is a number or a one-element
    tensor without gradient (PEFT's hot-swap scaling), as in ``lora_linear``. Derivation: ``fastlora.dora``.
    """
    return DORA_LINEAR(input, weight, lora_A, lora_B, magnitude, bias, scaling=scaling, dropout_p=dropout_p,
                       training=training)


class TorchDoRAEmbedding:
    """The DoRA embedding's math in PyTorch ops (PEFT's ``DoraEmbeddingVariant``), with ids (M,), the table W (V, D),
    a = Aᵀ[ids] (M, r), e the embed scale (1 without), g = m / n (n detached, over the vocabulary)::

        y  = g ⊙ base + g ⊙ (s·e·a Bᵀ)           (M, D)   a saved; base is the caller's W[ids]
        d base = g ⊙ dY,   dm = Σ_rows dY ⊙ (base + s·e·a Bᵀ) / n
        dB = s·e·(g ⊙ dY)ᵀ a,   dA = (scatter-add of s·e·(g ⊙ dY) B over ids)ᵀ   (aten.embedding_backward)

    The norm is fastlora's (kernels where the backend picks them); the lookups take nn.Embedding's options."""

    use_triton = False

    @classmethod
    def forward(cls, ids, weight, lora_A, lora_B, magnitude, base_output, embed_scale, scaling, padding_idx, max_norm,
                norm_type, scale_grad_by_freq, sparse, *, seed, save):
        norm = _norm(weight.t(), lora_A, lora_B, scaling, cls.use_triton, reuse=not save)
        # PEFT's norm has the dtype of W + s·lora_weight: the promotion of the base's and the adapters' dtypes
        norm = norm.to(torch.promote_types(weight.dtype, lora_A.dtype))
        g = magnitude.detach() / norm
        after_A = F.embedding(ids, lora_A.t(), padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
        lora = (after_A @ lora_B.t()) * scaling
        if embed_scale is not None:
            lora = lora * embed_scale.to(lora.dtype)
        y = g * base_output + g * lora
        return y, ((after_A if save else None), (norm if save else None))

    @classmethod
    def backward(cls, grad_y, ids, weight, lora_A, lora_B, magnitude, base_output, embed_scale, after_A, norm, scaling,
                 padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse, *, seed, needs):
        _, _, na, nb, nm, nbase, _ = needs
        g = magnitude.detach().to(norm.dtype) / norm
        ld = torch.promote_types(torch.promote_types(grad_y.dtype, g.dtype), lora_A.dtype)
        es = embed_scale.to(ld) if embed_scale is not None else 1.0
        dy = grad_y.to(ld)
        dA = dB = dm = dbase = None
        if nbase:
            dbase = g.to(ld) * dy
        if nm:
            lora = (after_A.to(ld) @ lora_B.to(ld).t()) * scaling * es
            dm = (dy * (base_output.to(ld) + lora)).sum(0) / norm.to(ld)
        if na or nb:
            dlow = dy * (g.to(ld) * scaling) * es  # (M, D): the gradient of a Bᵀ
            if nb:
                dB = dlow.t() @ after_A.to(ld)  # (D, r)
            if na:
                V = weight.shape[0]
                pad = -1 if padding_idx is None else (padding_idx + V if padding_idx < 0 else padding_idx)
                dh = dlow @ lora_B.to(ld)  # (M, r)
                dA = torch.ops.aten.embedding_backward(dh, ids, V, pad, scale_grad_by_freq, sparse).t()
        return None, None, dA, dB, dm, dbase, None


class TritonDoRAEmbedding(TorchDoRAEmbedding):
    """The same ops around the Triton norm kernel (``fastlora.kernels.dora``): the lookups are gathers."""

    use_triton = True


class DoRAEmbeddingOp(EmbeddingOp):
    """PEFT's DoRA embedding; saves Aᵀ[ids] and the norm."""

    name = "dora_embedding"
    tensors = ("input", "weight", "lora_A", "lora_B", "magnitude", "base_output", "embed_scale")
    optional = frozenset({"embed_scale"})
    not_floating = frozenset({"input"})
    no_grad = frozenset({"input", "weight", "embed_scale"})  # the norm is detached: W's gradient is base's
    row_args = ("base_output",)
    consts = (("scaling", "float"), ("padding_idx", "int?"), ("max_norm", "float?"), ("norm_type", "float"),
              ("scale_grad_by_freq", "bool"), ("sparse", "bool"))
    saved = ("after_A", "norm")
    scaled = "lora_B"
    dropout = None
    torch_impl = TorchDoRAEmbedding
    triton_impl = "fastlora.dora:TritonDoRAEmbedding"

    def check(self, a):
        ids, weight, lora_A, lora_B, magnitude = (a[n] for n in self.tensors[:5])
        if ids.is_floating_point() or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"dora_embedding: input must be an integer tensor of indices, got {ids.dtype}")
        if weight.dim() != 2:
            raise ValueError("dora_embedding: weight must be a 2-D tensor (num_embeddings, embedding_dim)")
        V, D = weight.shape
        if lora_A.dim() != 2 or lora_A.shape[1] != V or tuple(lora_B.shape) != (D, lora_A.shape[0]):
            raise ValueError(f"dora_embedding: lora_A {_shape(lora_A)} must be (r, {V}) and lora_B "
                             f"{_shape(lora_B)} ({D}, r)")
        if magnitude.dim() != 1 or magnitude.shape[0] != D:
            raise ValueError(f"dora_embedding: magnitude {_shape(magnitude)} must be ({D},)")
        base = a["base_output"]
        if tuple(base.shape) != (*ids.shape, D):
            raise ValueError(f"dora_embedding: base_output {_shape(base)} must be {(*ids.shape, D)}")

    def fake(self, ids, weight, lora_A, lora_B, magnitude, base_output, embed_scale, *consts):
        M, D = ids.shape[0], weight.shape[1]
        norm_dtype = torch.promote_types(weight.dtype, lora_A.dtype)
        low = torch.promote_types(lora_A.dtype, lora_B.dtype)
        out = torch.promote_types(torch.promote_types(magnitude.dtype, norm_dtype),
                                  torch.promote_types(base_output.dtype, low))
        return (base_output.new_empty(M, D, dtype=out), lora_A.new_empty(M, lora_A.shape[0]),
                weight.new_empty(D, dtype=norm_dtype))

    def differentiable_forward(self, tensors, saved, consts, seed, use_triton):
        ids, weight, lora_A, lora_B, magnitude, base_output, embed_scale = tensors
        scaling, *opts = consts
        g = magnitude / saved[1]
        lora = (F.embedding(ids, lora_A.t(), *opts) @ lora_B.t()) * scaling
        if embed_scale is not None:
            lora = lora * embed_scale.to(lora.dtype)
        return g * base_output + g * lora


DORA_EMBEDDING = DoRAEmbeddingOp()


def dora_embedding(input: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, *,
                   scaling: float | Tensor = 1.0, base_output: Optional[Tensor] = None, embed_scale=None,
                   padding_idx: Optional[int] = None, max_norm: Optional[float] = None, norm_type: float = 2.0,
                   scale_grad_by_freq: bool = False, sparse: bool = False) -> Tensor:
    r"""PEFT's DoRA embedding: ``g ⊙ (base + scaling·embed_scale·lora_A[:, input]ᵀ lora_Bᵀ)``,
    g = magnitude / ‖weightᵀ + scaling·lora_B lora_A‖_row (detached), the norm over the vocabulary computed
    without forming lora_B @ lora_A (D × V).

    input (...) integer ids, weight (V, D), lora_A (r, V), lora_B (D, r), magnitude (D,). ``base_output`` (..., D)
    defaults to ``F.embedding(input, weight)``; the lookup of lora_Aᵀ takes ``nn.Embedding``'s options
    (``padding_idx``, ...), as PEFT's ``_embed``; ``embed_scale``: a scale the base layer applies in its forward
    (Gemma's), applied to the DoRA term too. Gradients flow to lora_A, lora_B, magnitude and base_output; the norm
    uses the kernels where the backend picks them. ``scaling`` is a number or a one-element tensor without
    gradient, as in ``lora_linear``.
    """
    opts = (padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    if base_output is None and isinstance(weight, Tensor) and isinstance(input, Tensor):
        base_output = F.embedding(input, weight, *opts)
    return DORA_EMBEDDING(input, weight, lora_A, lora_B, magnitude, base_output, embed_scale, scaling=scaling,
                          padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
                          scale_grad_by_freq=scale_grad_by_freq, sparse=sparse)
