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

from W Aᵀ (N, r: one pass over W, 2NKr FLOPs), A Aᵀ (r, r: 2r²K) and ‖W_i‖² (N: cached while W is unchanged,
keyed on its storage, data pointer and version counter; the whole norm is reused while W, A and B are
unchanged, i.e. in evaluation and decoding). Everything accumulates in fp32 (fp64 for fp64 inputs)
and n² is clamped at 0 before the square root (cancellation can make it slightly negative when W_i + s(BA)_i ≈ 0).

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

Eager code runs ``DoRALinearFunction`` (an autograd.Function); code being compiled runs the same forward and
backward bodies as ``torch.library`` custom ops with fake kernels and a registered autograd, so
``torch.compile(fullgraph=True)`` traces through without a graph break, as ``fastlora.autograd`` does for LoRA.

The Embedding variant (``DoraEmbeddingVariant``) is ``y = g ⊙ (base(x) + s·embed_scale·A[:, x]ᵀ Bᵀ)`` with the
norm over the vocabulary, i.e. the norm above applied to Wᵀ (D, V): it runs PEFT's own ops with that norm.
"""
from __future__ import annotations

import numbers
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import backend as _backend
from . import reference
from .functional import _autocast  # the op's autocast rule, as nn.Linear's

__all__ = ["dora_linear", "dora_embedding", "dora_weight_norm", "weight_row_sq", "clear_norm_cache",
           "dora_forward_torch", "dora_backward_torch"]


# ---------------------------------------------------------------------------------------------------------
# The weight norm from small products
# ---------------------------------------------------------------------------------------------------------

def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32, fp64 for fp64: the dtype the norm pieces accumulate in."""
    return torch.promote_types(dtype, torch.float32)


# ‖W_i‖² per weight: id(storage owner) -> (weakref to it, key, tensor). The key changes whenever W's values can
# have changed through autograd-visible ops (in-place ops bump _version, `.data =` changes data_ptr).
_ROW_SQ: dict[int, tuple] = {}


def clear_norm_cache() -> None:
    """Forget every cached ‖W_i‖² and norm (needed only after writing into a weight or an adapter through
    ``.data``, which bypasses the version counter that the caches key on)."""
    _ROW_SQ.clear()
    _NORM.clear()


def _row_sq_key(weight: Tensor):
    return (weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape),
            tuple(weight.stride()), weight.storage_offset())


def _owner(weight: Tensor) -> Tensor:
    return weight if weight._base is None else weight._base  # a transposed view (Embedding) keys on its base


def _cache_get(weight: Tensor) -> Optional[Tensor]:
    hit = _ROW_SQ.get(id(_owner(weight)))
    if hit is not None and hit[0]() is _owner(weight) and hit[1] == _row_sq_key(weight):
        return hit[2]
    return None


def _cache_put(weight: Tensor, sq: Tensor) -> None:
    owner = _owner(weight)
    oid = id(owner)
    try:
        ref = weakref.ref(owner, lambda _r, oid=oid: _ROW_SQ.pop(oid, None))
    except TypeError:  # not weak-referenceable: no caching
        return
    _ROW_SQ[oid] = (ref, _row_sq_key(weight), sq)


def weight_row_sq(weight: Tensor) -> Tensor:
    """‖W_i‖² (N,) in ``acc_dtype``, cached while ``weight`` is unchanged: any in-place change bumps its
    version counter, and a new tensor (``.data = ...``) has a new storage, so both miss the cache."""
    sq = _cache_get(weight)
    if sq is None:
        with torch.no_grad():
            sq = torch.linalg.vector_norm(weight, 2, dim=1, dtype=acc_dtype(weight.dtype)).square_()  # no (N, K) temp
        _cache_put(weight, sq)
    return sq


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


# The last norm per weight: id(W's owner) -> (weakrefs to W's owner, A, B; key; norm). In training A and B
# change every step (an optimizer step bumps their version counters), so this only saves the pass over W where
# nothing changed between calls: evaluation and decoding.
_NORM: dict[int, tuple] = {}


def _tensor_key(t: Tensor):
    return (t.data_ptr(), t._version, t.dtype, tuple(t.shape), tuple(t.stride()))


def _norm(weight, lora_A, lora_B, scaling, use_triton) -> Tensor:
    """The detached norm (computed under no_grad), reused while W, A, B (the same objects, with unchanged data
    pointers and version counters) and the scaling are. ``weight`` is undetached, so that the caches key on
    the caller's tensors. The result is shared: callers must not modify it in place."""
    owner = _owner(weight)
    key = (_row_sq_key(weight), _tensor_key(lora_A), _tensor_key(lora_B), float(scaling), bool(use_triton))
    hit = _NORM.get(id(owner))
    if (hit is not None and hit[0]() is owner and hit[1]() is lora_A and hit[2]() is lora_B
            and hit[3] == key):
        return hit[4]
    with torch.no_grad():
        norm = _norm_impl(weight, lora_A, lora_B, scaling, use_triton)
    oid = id(owner)
    try:
        refs = (weakref.ref(owner, lambda _r, oid=oid: _NORM.pop(oid, None)), weakref.ref(lora_A),
                weakref.ref(lora_B))
    except TypeError:  # not weak-referenceable: no caching
        return norm
    _NORM[oid] = (*refs, key, norm)
    return norm


def _norm_impl(weight, lora_A, lora_B, scaling, use_triton) -> Tensor:
    if use_triton:
        from fastlora.kernels import dora as kdora

        row_sq = _cache_get(weight)
        if row_sq is not None:
            return kdora.dora_weight_norm(weight, lora_A, lora_B, scaling, row_sq)
        norm, row_sq = kdora.dora_weight_norm(weight, lora_A, lora_B, scaling, return_row_sq=True)
        _cache_put(weight, row_sq)
        return norm
    return dora_weight_norm_torch(weight, lora_A, lora_B, scaling)


def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float = 1.0) -> Tensor:
    """‖W + scaling·lora_B @ lora_A‖ per row of ``weight`` (out,), fp32 (fp64 for fp64), detached, computed
    without forming lora_B @ lora_A (see the module docstring)."""
    use_triton = _backend.use_triton(weight.device, weight.dtype)
    return _norm(weight, lora_A, lora_B, float(scaling), use_triton).clone()


# ---------------------------------------------------------------------------------------------------------
# Pure-PyTorch forward / backward (the CPU fallback)
# ---------------------------------------------------------------------------------------------------------

def _scale_columns(z: Tensor, g: Tensor, bias: Optional[Tensor], rest: Optional[Tensor] = None,
                   inplace: bool = False) -> Tensor:
    """y = rest + b + g ⊙ z (rest, b optional), computed in g's dtype (fp32+) and rounded once to z's."""
    if z.dtype == g.dtype:
        y = z.mul_(g) if inplace else z * g
    else:
        y = z.to(g.dtype) * g
    if rest is not None:
        y = y.add_(rest)
    if bias is not None:
        y = y.add_(bias)
    return y.to(z.dtype)


def _keep(seed, x, p):
    return reference.dropout_keep_mask(seed, x.shape, p, x.device)


def dora_forward_torch(x, weight, lora_A, lora_B, bias, g, scaling: float, dropout_p: float, seed: int,
                       save: bool = True):
    """(y, z, h): the forward above in PyTorch ops; z, h None unless ``save``."""
    cd = x.dtype
    if dropout_p == 0.0:
        z, h = reference.lora_forward(x, weight, lora_A, lora_B, None, scaling, 0.0, 0, save_h=save)
        y = _scale_columns(z, g, bias, inplace=not save)
        return y, (z if save else None), h
    keep = _keep(seed, x, dropout_p)
    x_d = torch.where(keep, x * (1.0 / (1.0 - dropout_p)), 0.0).to(cd)  # (M, K) temporaries, never saved
    del keep
    t = torch.mm(x - x_d, weight.t())  # PEFT's x Wᵀ and x_d Wᵀ become (x − x_d) Wᵀ and x_d Wᵀ: still two GEMMs
    z, h = reference.lora_forward(x_d, weight, lora_A, lora_B, None, scaling, 0.0, 0, save_h=save)
    del x_d
    y = _scale_columns(z, g, bias, rest=t, inplace=not save)
    return y, (z if save else None), h


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
# autograd
# ---------------------------------------------------------------------------------------------------------

def _draw_seed(dropout_p: float) -> int:
    """As fastlora.autograd: from torch's default generator, so torch.manual_seed makes runs repeatable."""
    if dropout_p > 0.0:
        return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    return 0


def _forward(x, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p, use_triton, save):
    """(y, z, h, norm, g, seed)."""
    seed = _draw_seed(dropout_p)
    norm = _norm(weight, lora_A, lora_B, scaling, use_triton)  # no grad: detached, as PEFT
    g = magnitude.detach().to(norm.dtype) / norm
    fwd = _forward_triton if use_triton else dora_forward_torch
    y, z, h = fwd(x, weight, lora_A, lora_B, bias, g, scaling, dropout_p, seed, save)
    return y, z, h, norm, g, seed


class DoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p, use_triton):
        y, z, h, norm, g, seed = _forward(x, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p,
                                          use_triton, save=True)
        ctx.save_for_backward(x, weight, lora_A, lora_B, h, z, norm, g)
        ctx.seed, ctx.scaling, ctx.dropout_p, ctx.use_triton = seed, scaling, dropout_p, use_triton
        ctx.has_bias = bias is not None
        ctx.mag_dtype = magnitude.dtype
        return y

    @staticmethod
    @once_differentiable  # first-order only
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, h, z, norm, g = ctx.saved_tensors
        nx, nw, na, nb, nm, nbias = ctx.needs_input_grad[:6]
        needs = (nx, nw, na, nb, nm, nbias and ctx.has_bias)
        if not any(needs):
            return (None,) * 9
        bwd = _backward_triton if ctx.use_triton else dora_backward_torch
        dx, dW, dA, dB, dm, dbias = bwd(grad_y.contiguous(), x, weight, lora_A, lora_B, h, z, g, norm,
                                        ctx.scaling, ctx.dropout_p, ctx.seed, needs)
        if dm is not None:
            dm = dm.to(ctx.mag_dtype)
        return dx, dW, dA, dB, dm, dbias, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Compiled: torch.library custom ops (torch.compile(fullgraph=True) traces through without a graph break)
# ---------------------------------------------------------------------------------------------------------

@torch.library.custom_op("fastlora::dora_linear_fwd", mutates_args=())
def _dora_linear_fwd(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, bias: Optional[Tensor],
    scaling: float, dropout_p: float, use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, z, h, norm, g, seed): the seed a CPU int64 scalar; norm a copy (the cached one is shared)."""
    y, z, h, norm, g, seed = _forward(x, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p, use_triton,
                                      save=True)
    return y, z, h, norm.clone(), g, torch.full((), seed, dtype=torch.int64)


@_dora_linear_fwd.register_fake
def _(x, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p, use_triton):
    M, N, r = x.shape[0], weight.shape[0], lora_A.shape[0]
    acc = acc_dtype(weight.dtype)
    return (x.new_empty(M, N), x.new_empty(M, N), x.new_empty(M, r, dtype=reference.h_dtype(x.dtype)),
            weight.new_empty(N, dtype=acc), weight.new_empty(N, dtype=acc),
            torch.empty((), dtype=torch.int64, device="cpu"))


@torch.library.custom_op("fastlora::dora_linear_infer", mutates_args=())
def _dora_linear_infer(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, bias: Optional[Tensor],
    scaling: float, dropout_p: float, use_triton: bool,
) -> Tensor:
    return _forward(x, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p, use_triton, save=False)[0]


@_dora_linear_infer.register_fake
def _(x, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p, use_triton):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("fastlora::dora_linear_bwd", mutates_args=())
def _dora_linear_bwd(
    grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor, z: Tensor, g: Tensor,
    norm: Tensor, seed: Tensor, scaling: float, dropout_p: float, use_triton: bool, needs_grad: list[bool],
) -> list[Tensor]:
    """[dx, dW, dA, dB, dm (in the norm's dtype), dbias]; one not needed comes back as an empty tensor."""
    bwd = _backward_triton if use_triton else dora_backward_torch
    grads = bwd(grad_y.contiguous(), x, weight, lora_A, lora_B, h, z, g, norm, scaling, dropout_p, int(seed),
                tuple(needs_grad))
    return [t.contiguous() if t is not None else grad_y.new_empty(0) for t in grads]


@_dora_linear_bwd.register_fake
def _(grad_y, x, weight, lora_A, lora_B, h, z, g, norm, seed, scaling, dropout_p, use_triton, needs_grad):
    N = weight.shape[0]
    like = (x, weight, lora_A, lora_B, norm, grad_y.new_empty(N))
    return [t.new_empty(t.shape) if need else grad_y.new_empty(0) for t, need in zip(like, needs_grad)]


def _setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p, use_triton = inputs
    _, z, h, norm, g, seed = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, h, z, norm, g, seed)
    ctx.scaling, ctx.dropout_p, ctx.use_triton = scaling, dropout_p, use_triton
    ctx.has_bias, ctx.mag_dtype = bias is not None, magnitude.dtype


def _custom_op_backward(ctx, grad_y, grad_z, grad_h, grad_norm, grad_g, grad_seed):
    # z, h, norm, g and the seed are internal outputs that callers never use: their gradients are ignored
    x, weight, lora_A, lora_B, h, z, norm, g, seed = ctx.saved_tensors
    nx, nw, na, nb, nm, nbias = ctx.needs_input_grad[:6]
    needs = [nx, nw, na, nb, nm, nbias and ctx.has_bias]
    if not any(needs):
        return (None,) * 9
    grads = _dora_linear_bwd(grad_y, x, weight, lora_A, lora_B, h, z, g, norm, seed, ctx.scaling, ctx.dropout_p,
                             ctx.use_triton, needs)
    grads = [t if need else None for t, need in zip(grads, needs)]
    if grads[4] is not None:
        grads[4] = grads[4].to(ctx.mag_dtype)
    return (*grads, None, None, None)


torch.library.register_autograd("fastlora::dora_linear_fwd", _custom_op_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------
# Functional
# ---------------------------------------------------------------------------------------------------------

def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _validate(input, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p) -> None:
    named = {"input": input, "weight": weight, "lora_A": lora_A, "lora_B": lora_B, "magnitude": magnitude}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"dora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"dora_linear: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if len({t.device for t in named.values()}) > 1:
        listing = ", ".join(f"{n} on {t.device}" for n, t in named.items())
        raise ValueError(f"dora_linear: all tensors must be on one device, got {listing}")
    if input.dim() < 1:
        raise ValueError("dora_linear: input must have at least 1 dimension (..., in_features), got a scalar")
    for name in ("weight", "lora_A", "lora_B"):
        if named[name].dim() != 2:
            raise ValueError(f"dora_linear: {name} must be 2-D, got shape {_shape(named[name])}")
    N, K = weight.shape
    r = lora_A.shape[0]
    if input.shape[-1] != K:
        raise ValueError(f"dora_linear: input {_shape(input)} has {input.shape[-1]} features but weight "
                         f"{_shape(weight)} expects in_features={K}")
    if lora_A.shape[1] != K or r < 1:
        raise ValueError(f"dora_linear: lora_A {_shape(lora_A)} must be (r >= 1, in_features={K})")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"dora_linear: lora_B {_shape(lora_B)} must be (out_features={N}, r={r})")
    if magnitude.dim() != 1 or magnitude.shape[0] != N:
        raise ValueError(f"dora_linear: magnitude {_shape(magnitude)} must be (out_features={N},)")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        raise ValueError(f"dora_linear: bias {_shape(bias)} must be (out_features={N},)")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dora_linear: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"dora_linear: scaling must be a real number, got {scaling!r}")




def dora_linear(
    input: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    bias: Optional[Tensor] = None,
    *,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    r"""PEFT's DoRA linear, fused, without forming lora_B @ lora_A::

        g = magnitude / ‖weight + scaling·lora_B lora_A‖_row     (detached norm)
        y = x Wᵀ + b + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ scaling·(x_d lora_Aᵀ) lora_Bᵀ,   x_d = dropout(x)

    input (..., in), weight (out, in), lora_A (r, in), lora_B (out, r), magnitude (out,), bias (out,) or None.
    Dropout only when ``training`` and ``dropout_p > 0``. The output has input's dtype; the adapters and the
    magnitude may be wider (fp32 on a bf16 base, as PEFT keeps them). Gradients flow to input, lora_A, lora_B
    and magnitude, and to weight and bias only if they require grad. Derivation: ``fastlora.dora``.
    """
    _validate(input, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p)
    input, weight, lora_A, lora_B, bias = _autocast(input.device.type, input, weight, lora_A, lora_B, bias)
    if weight.dtype != input.dtype:
        raise TypeError(f"dora_linear: input dtype {input.dtype} and weight dtype {weight.dtype} differ (as in "
                        "nn.Linear, they must match; use torch.autocast for mixed precision)")
    if bias is not None and bias.dtype != input.dtype:
        raise TypeError(f"dora_linear: bias dtype {bias.dtype} must match input dtype {input.dtype}")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"dora_linear: lora_A dtype {lora_A.dtype} and lora_B dtype {lora_B.dtype} differ")

    p = float(dropout_p) if training else 0.0
    use_triton = _backend.use_triton(input.device, input.dtype)
    x2d = input if input.dim() == 2 else input.reshape(-1, input.shape[-1])
    args = (x2d, weight, lora_A, lora_B, magnitude, bias, float(scaling), p, use_triton)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, lora_A, lora_B, magnitude, bias))
    if torch.compiler.is_compiling():  # custom ops: no graph break
        y = _dora_linear_fwd(*args)[0] if needs_grad else _dora_linear_infer(*args)
    elif needs_grad:
        y = DoRALinearFunction.apply(*args)
    else:
        y = _forward(*args, save=False)[0]
    return y if input.dim() == 2 else y.reshape(*input.shape[:-1], weight.shape[0])


def dora_embedding(input: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, *,
                   scaling: float = 1.0, base_output: Optional[Tensor] = None, embed_scale=None,
                   embed_fn=None) -> Tensor:
    r"""PEFT's DoRA embedding: ``g ⊙ (base + scaling·embed_scale·lora_A[:, input]ᵀ lora_Bᵀ)``,
    g = magnitude / ‖weightᵀ + scaling·lora_B lora_A‖_row (detached), the norm over the vocabulary computed
    without forming lora_B @ lora_A (D × V).

    input (...) integer ids, weight (V, D), lora_A (r, V), lora_B (D, r), magnitude (D,). ``base_output``
    defaults to ``F.embedding(input, weight)``; ``embed_fn(ids, table)`` (default F.embedding) looks up
    lora_Aᵀ, as PEFT's ``_embed`` (padding_idx, ...). Runs in PyTorch ops (autograd by torch); only the norm
    uses the kernels where the backend picks them.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError("dora_embedding: weight must be a 2-D tensor (num_embeddings, embedding_dim)")
    V, D = weight.shape
    if lora_A.dim() != 2 or lora_A.shape[1] != V or tuple(lora_B.shape) != (D, lora_A.shape[0]):
        raise ValueError(f"dora_embedding: lora_A {_shape(lora_A)} must be (r, {V}) and lora_B {_shape(lora_B)} "
                         f"({D}, r)")
    if magnitude.dim() != 1 or magnitude.shape[0] != D:
        raise ValueError(f"dora_embedding: magnitude {_shape(magnitude)} must be ({D},)")
    embed_fn = embed_fn if embed_fn is not None else F.embedding
    if base_output is None:
        base_output = F.embedding(input, weight)
    use_triton = _backend.use_triton(weight.device, weight.dtype)
    norm = _norm(weight.t(), lora_A, lora_B, float(scaling), use_triton)
    # PEFT's norm has the dtype of W + s·lora_weight: the promotion of the base's and the adapters' dtypes
    norm = norm.to(torch.promote_types(weight.dtype, lora_A.dtype))
    g = magnitude / norm
    lora = (embed_fn(input, lora_A.t()) @ lora_B.t()) * scaling
    if embed_scale is not None:
        lora = lora * embed_scale.to(lora.dtype)
    return g * base_output + g * lora
