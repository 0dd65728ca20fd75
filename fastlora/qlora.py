r"""QLoRA: the LoRA linear over a bitsandbytes 4-bit (NF4 / FP4) base weight, ``lora_linear_4bit``.

With W̃ = dequantize_4bit(W) (N, K), the frozen base as bitsandbytes would reconstruct it, x (M, K), A (r, K),
B (N, r), s the scaling and m the dropout keep mask (scaled by 1/(1-p), all ones without dropout)::

    h = (x ⊙ m) Aᵀ                      (M, r)   saved, fp32 for half inputs
    y = x W̃ᵀ + b + s · h Bᵀ             (M, N)

Backward, given dY = ∂L/∂y (M, N)::

    dh = s · dY B                       (M, r)
    dB = s · dYᵀ h                      (N, r)
    dA = dhᵀ (x ⊙ m)                    (r, K)
    dx = dY W̃ + (dh A) ⊙ m              (M, K)    W̃ is dequantized AGAIN here (or read packed by the kernel)
    db = Σ_rows dY                      (N,)      only when b requires grad
    dW                                            never: a 4-bit weight is not differentiable (it is frozen)

These are the gradients of ``fastlora.autograd`` with W replaced by the constant W̃. Saved for backward: x, h
and the dropout seed, plus references to the packed weight and its quant_state (no memory). No dequantized W̃
survives a call: it is either never formed (the fused kernel dequantizes tiles of W in registers) or formed in a
transient buffer that is freed before the call returns, and formed again in the backward when dx is needed.

Implementations, picked per call:

* ``torch`` (CPU, and the ``torch`` backend anywhere): dequantize with bitsandbytes (its own CPU/CUDA kernels),
  then ``fastlora.reference``'s factored math.
* ``fused4bit`` (Triton): ``fastlora.kernels.qlora``'s GEMM reads the packed weight inside its K loop and
  dequantizes in registers (a quarter of a bf16 weight's traffic): the small-M (decode) path.
* ``dequant`` (Triton): dequantize into a transient buffer with bitsandbytes, then the fused kernels of
  ``fastlora.kernels`` (``lora_forward`` / ``lora_backward``): the large-M path, where the GEMM is compute-bound.

Between the two Triton paths, the measured-choice dispatcher (``fastlora.kernels.dispatch.MeasuredChoice``, the
same as the LoRA GEMMs'): on CUDA the first call for a shape class (phase, bucketed M, N, K, r, dtypes,
quantization) times both and caches the faster (``dispatch_choices()`` shows the cache); under the interpreter,
M ≤ 64 takes ``fused4bit`` and larger M ``dequant``. ``FASTLORA_QLORA_PATH=fused4bit|dequant`` forces one.

bitsandbytes is optional for fastlora as a whole; this module imports it on first use only.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .autograd import check_linear_dtypes, check_linear_shapes, dropped
from .op_common import FusedOp

__all__ = [
    "lora_linear_4bit",
    "dequantize_weight",
    "is_linear4bit",
    "restore_canonical_layout",
    "dispatch_choices",
    "FUSED4BIT_DEFAULT_MAX_M",
    "LORA_4BIT",
    "LoRA4bitOp",
]

# Under the interpreter (no timing possible) the fused 4-bit GEMM runs up to this many rows.
FUSED4BIT_DEFAULT_MAX_M = 64
_PATHS = ("fused4bit", "dequant")
_QUANT_TYPES = ("nf4", "fp4")
_W_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("fastlora's 4-bit (QLoRA) path needs bitsandbytes: pip install bitsandbytes "
                          '(or pip install -e ".[qlora]" in a fastlora clone)') from e
    return bitsandbytes


def is_linear4bit(module) -> bool:
    """True for a ``bitsandbytes.nn.Linear4bit`` (checked without importing bitsandbytes)."""
    import sys

    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def restore_canonical_layout(weight) -> None:
    """Undo bitsandbytes' CPU inference repacking of a ``Params4bit`` in place (bitsandbytes applies it on the
    first eval-mode, no-grad CPU forward when the CPU has AVX512-BF16, and undoes it itself before saving or
    moving to CUDA). No-op for a weight in the canonical layout."""
    qs = getattr(weight, "quant_state", None)
    if qs is not None and getattr(qs, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, qs)
        if getattr(weight, "module", None) is not None:
            weight.module.quant_state = weight.quant_state


# ---------------------------------------------------------------------------------------------------------
# The packed weight
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Quant:
    """What the op needs of a quant_state besides its tensors: W is (N, K), quantized from ``dtype``."""
    N: int
    K: int
    blocksize: int
    quant_type: str
    dtype: torch.dtype

    def dequantize(self, q: Tensor, absmax: Tensor, dtype: torch.dtype) -> Tensor:
        """W̃ (N, K) in ``dtype`` from the packed bytes and the fp32 block scales (``absmax_fp32``): bitsandbytes'
        dequantize_4bit, then a cast (as bnb.matmul_4bit does).

        On CPU with K not a multiple of the blocksize, the flat-layout dequantization below instead: bitsandbytes'
        CPU kernel (0.50) indexes blocks per row (row·⌊K/blocksize⌋ + k//blocksize) when K is a multiple of 16
        but not of the blocksize, which disagrees with the layout its own quantize_4bit writes and its reference
        and CUDA implementations read (tests/test_qlora.py shows it); real models have K % blocksize == 0."""
        if q.device.type == "cpu" and self.K % self.blocksize:
            return _dequantize_flat(q, absmax, _code(self.quant_type, q.device), self.N, self.K, self.blocksize,
                                    self.dtype).to(dtype)
        w = torch.ops.bitsandbytes.dequantize_4bit.default(q.view(-1, 1), absmax, self.blocksize, self.quant_type,
                                                           [self.N, self.K], self.dtype)
        return w.reshape(self.N, self.K).to(dtype)


def absmax_fp32(absmax: Tensor, absmax2: Optional[Tensor], code2: Optional[Tensor], offset: Optional[Tensor],
                blocksize2: int) -> Tensor:
    """The per-block scales (N·K/blocksize,) fp32; with double quantization (``absmax2``: the second level's scales,
    ``code2`` its table) dequantized first, exactly as bitsandbytes' dequantize_4bit does (a small vector; computed
    per call from the quant_state's own tensors, never cached or saved)."""
    if absmax2 is None:
        return absmax.float().contiguous()
    from bitsandbytes.functional import QuantState, dequantize_blockwise

    state2 = QuantState(absmax=absmax2, code=code2, blocksize=blocksize2, dtype=torch.float32)
    out = dequantize_blockwise(absmax, state2)
    out += offset
    return out.float().contiguous()


def _dequantize_flat(q: Tensor, absmax: Tensor, code: Tensor, N: int, K: int, blocksize: int,
                     w_dtype: torch.dtype) -> Tensor:
    """bitsandbytes' packed layout read in PyTorch: element i = n·K + k of W is nibble i of the byte stream (the
    HIGH nibble of byte i//2 for even i), scaled by absmax[i // blocksize]; fp32 products rounded to w_dtype."""
    n = N * K
    nib = torch.stack((q >> 4, q & 0xF), dim=1).reshape(-1)[:n].int()
    vals = code[nib]
    vals *= absmax.repeat_interleave(blocksize)[:n]
    return vals.to(w_dtype).reshape(N, K)


@functools.lru_cache(maxsize=None)
def _code(quant_type: str, device: torch.device) -> Tensor:
    """The 16-entry code table of bitsandbytes (values in [-1, 1], index = the 4-bit nibble)."""
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type(quant_type, device=device).float().contiguous()


def _packed_bytes(weight: Tensor) -> Tensor:
    """The weight's storage as a flat contiguous uint8 tensor (a view: quant_storage may be another dtype), as a
    plain Tensor (Params4bit is a subclass whose methods would re-wrap results)."""
    w = weight.detach()
    if type(w) is not torch.Tensor:
        w = torch.Tensor.as_subclass(w, torch.Tensor)
    if w.dtype != torch.uint8:
        w = w.contiguous().view(torch.uint8)
    return w.reshape(-1)


def _resolve_quant(weight, quant_state) -> _Quant:
    if not isinstance(weight, Tensor):
        raise TypeError(f"lora_linear_4bit: weight must be a bitsandbytes Params4bit or a packed uint8 tensor, got "
                        f"{type(weight).__name__}")
    qs = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
    if qs is None:
        raise TypeError("lora_linear_4bit: weight has no quant_state: pass a bitsandbytes Params4bit that has been "
                        "quantized (moved to a device), or the packed tensor and quant_state=")
    for attr in ("absmax", "shape", "blocksize", "quant_type", "dtype"):
        if not hasattr(qs, attr):
            raise TypeError(f"lora_linear_4bit: quant_state must be a bitsandbytes QuantState, got {type(qs).__name__}")
    if getattr(qs, "packing_format_for_cpu", False):
        raise ValueError("lora_linear_4bit: the weight is in bitsandbytes' CPU inference layout (repacked by an "
                         "eval-mode forward): call fastlora.qlora.restore_canonical_layout(weight) first")
    if qs.shape is None or len(qs.shape) != 2:
        raise ValueError(f"lora_linear_4bit: quant_state.shape must be 2-D (out_features, in_features), got {qs.shape}")
    N, K = (int(s) for s in qs.shape)
    if qs.quant_type not in _QUANT_TYPES:
        raise ValueError(f"lora_linear_4bit: quant_type must be one of {_QUANT_TYPES}, got {qs.quant_type!r}")
    bs = qs.blocksize
    if not isinstance(bs, int) or bs < 2 or bs & (bs - 1):
        raise ValueError(f"lora_linear_4bit: blocksize must be a power of two, got {bs!r}")
    if qs.dtype not in _W_DTYPES:
        raise TypeError(f"lora_linear_4bit: quant_state.dtype must be fp16, bf16 or fp32, got {qs.dtype}")
    nbytes = weight.numel() * weight.element_size()
    if nbytes != (N * K + 1) // 2:
        raise ValueError(f"lora_linear_4bit: the packed weight has {nbytes} bytes but quant_state.shape {tuple(qs.shape)} "
                         f"needs {(N * K + 1) // 2} (two 4-bit values per byte)")
    if qs.nested and getattr(qs.state2, "blocksize", None) is None:
        raise ValueError("lora_linear_4bit: a nested quant_state needs state2 (double quantization)")
    return qs, _Quant(N, K, bs, qs.quant_type, qs.dtype)


def _quant_tensors(qs) -> tuple:
    """(absmax, absmax2, code2, offset, blocksize2): the quant_state's own tensors (no copies)."""
    if qs.nested:
        return qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset, int(qs.state2.blocksize)
    return qs.absmax, None, None, None, 0


# ---------------------------------------------------------------------------------------------------------
# Path choice: measured on CUDA, by M under the interpreter
# ---------------------------------------------------------------------------------------------------------

_PATH_CHOICE = None  # the MeasuredChoice between the two Triton paths, made on first use (it imports triton)


def _path_choice():
    global _PATH_CHOICE
    if _PATH_CHOICE is None:
        from fastlora.kernels.dispatch import MeasuredChoice

        # where nothing can be timed (the interpreter), M <= 64 takes the 4-bit GEMM (key[1]: the bucketed M)
        _PATH_CHOICE = MeasuredChoice("FASTLORA_QLORA_PATH", _PATHS,
                                      lambda key: "fused4bit" if key[1] <= FUSED4BIT_DEFAULT_MAX_M else "dequant")
    return _PATH_CHOICE


def dispatch_choices() -> dict:
    """The measured choices so far: {(phase, M bucket, N, K, r, dtype, adapter dtype, quant_type, blocksize,
    bias, dropout, device): "fused4bit" | "dequant"}."""
    return dict(_PATH_CHOICE.choices) if _PATH_CHOICE is not None else {}


def _pick(phase: str, x: Tensor, quant: _Quant, lora_A: Tensor, has_bias: bool, p: float,
          candidates: dict[str, Callable[[], object]]):
    """Run the faster Triton path for this problem class (``fastlora.kernels.dispatch``: measured once per key on
    CUDA, pinned by FASTLORA_QLORA_PATH, by M under the interpreter)."""
    m_bucket = max(16, 1 << max(0, (x.shape[0] - 1).bit_length()))
    key = (phase, m_bucket, quant.N, quant.K, lora_A.shape[0], x.dtype, lora_A.dtype, quant.quant_type,
           quant.blocksize, has_bias, p > 0.0, str(x.device))
    return _path_choice().run(key, candidates, x.device)


# ---------------------------------------------------------------------------------------------------------
# Forward / backward bodies
# ---------------------------------------------------------------------------------------------------------

def _standin(x: Tensor, rows: int, cols: int) -> Tensor:
    """A (rows, cols) tensor of x's dtype with no storage of its own: a weight argument that is never read."""
    return x.new_zeros(()).expand(rows, cols)


class TorchLoRA4bit:
    """The PyTorch implementation: bitsandbytes' dequantization, then ``fastlora.reference``'s math, ordered so that
    the transient W̃ never coexists with the dropout temporaries."""

    @staticmethod
    def forward(x, q, absmax, absmax2, code2, offset, lora_A, lora_B, bias, N, K, blocksize, quant_type,
                quant_dtype, blocksize2, scaling, p, *, seed, save):
        quant = _Quant(N, K, blocksize, quant_type, quant_dtype)
        cd = x.dtype
        # h first (the reference op with zero output features), then x W̃ᵀ with W̃ freed at once, then s·h Bᵀ
        h = reference.lora_forward(x, _standin(x, 0, K), lora_A, lora_B[:0], None, scaling, p, seed, save_h=True)[1]
        w = quant.dequantize(q, absmax_fp32(absmax, absmax2, code2, offset, blocksize2), cd)
        y = torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
        del w
        ld = reference.low_rank_dtype(cd, lora_A.dtype)  # h was computed in it
        hs = h.to(ld) * scaling  # s on the (M, r) side: alpha = 0 would hide a NaN in A or B
        if ld == cd:
            y.addmm_(hs, lora_B.to(cd).t())
        else:  # fp32 adapters on a half base: the branch in fp32, rounded once into y (as PEFT)
            y.add_(torch.mm(hs, lora_B.to(ld).t()))
        return y, ((h if save else None),)

    @staticmethod
    def backward(grad_y, x, q, absmax, absmax2, code2, offset, lora_A, lora_B, bias, h, N, K, blocksize, quant_type,
                 quant_dtype, blocksize2, scaling, p, *, seed, needs):
        """dA, dB, db first (no W̃ needed), then dx = dY W̃ with W̃ dequantized again and freed before the masked
        low-rank term (dh A) ⊙ m / (1-p) is added."""
        nx, na, nb, nbias = needs[0], needs[6], needs[7], needs[8]
        cd = grad_y.dtype
        _, _, dA, dB, dbias = reference.lora_backward(grad_y, x, _standin(x, N, K), lora_A, lora_B, h, scaling, p,
                                                      seed, False, False, na, nb, nbias)
        dx = None
        if nx:
            quant = _Quant(N, K, blocksize, quant_type, quant_dtype)
            w = quant.dequantize(q, absmax_fp32(absmax, absmax2, code2, offset, blocksize2), cd)
            dx = torch.mm(grad_y, w)  # (M, K)
            del w
            ld = reference.low_rank_dtype(cd, lora_A.dtype)  # dh and the low-rank term in it, as the reference's
            dh = torch.mm(grad_y.to(ld), lora_B.to(ld)).mul_(scaling)  # (M, r)
            if p == 0.0:
                dx.add_(torch.mm(dh, lora_A.to(ld)))
            else:  # the reference's mask, regenerated from the seed
                keep = reference.dropout_keep_mask(seed, x.shape, p, x.device)
                dx.add_(torch.mm(dh, (lora_A * (1.0 / (1.0 - p))).to(ld)).masked_fill_(~keep, 0.0))
        return dx, None, None, None, None, None, dA, dB, dbias


class TritonLoRA4bit:
    """The Triton implementation, two compositions picked per call (``_pick``): ``fused4bit`` (the 4-bit GEMM of
    ``fastlora.kernels.qlora``, W dequantized in registers) and ``dequant`` (a transient W̃, then the LoRA kernels)."""

    @staticmethod
    def forward(x, q, absmax, absmax2, code2, offset, lora_A, lora_B, bias, N, K, blocksize, quant_type,
                quant_dtype, blocksize2, scaling, p, *, seed, save):
        from fastlora.kernels import lora_linear as kernels
        from fastlora.kernels import qlora as qk

        quant = _Quant(N, K, blocksize, quant_type, quant_dtype)
        x = x.contiguous()
        cd = x.dtype
        scales = absmax_fp32(absmax, absmax2, code2, offset, blocksize2)

        def dequant():
            w = quant.dequantize(q, scales, cd)
            return kernels.lora_forward(x, w, lora_A, lora_B, bias, scaling, p, seed, save_h=save)

        def fused4bit():
            r = lora_A.shape[0]
            h = None
            if p > 0.0 or r > qk.QLORA_FUSED_MAX_R:
                # The LoRA op with zero output features computes only h = drop(x) Aᵀ: fastlora's shrink kernel, with
                # the Philox mask that its backward kernels regenerate.
                h = kernels.lora_forward(x, _standin(x, 0, K), lora_A, lora_B[:0], None, scaling, p, seed,
                                         save_h=True)[1]
            y, h = qk.qlora_gemm_forward(x, q, scales, _code(quant_type, x.device), blocksize, quant_dtype, N,
                                         lora_A, lora_B, bias, scaling, h=h, save_h=save)
            return y, (h if save else None)

        y, h = _pick("forward", x, quant, lora_A, bias is not None, p, {"fused4bit": fused4bit, "dequant": dequant})
        return y, (h,)

    @staticmethod
    def backward(grad_y, x, q, absmax, absmax2, code2, offset, lora_A, lora_B, bias, h, N, K, blocksize, quant_type,
                 quant_dtype, blocksize2, scaling, p, *, seed, needs):
        from fastlora.kernels import lora_linear as kernels
        from fastlora.kernels import qlora as qk

        nx, na, nb, nbias = needs[0], needs[6], needs[7], needs[8]
        quant = _Quant(N, K, blocksize, quant_type, quant_dtype)
        x = x.contiguous()
        cd = grad_y.dtype
        standin = _standin(x, N, K)
        scales = absmax_fp32(absmax, absmax2, code2, offset, blocksize2) if nx else None

        def dequant():
            w = quant.dequantize(q, scales, cd) if nx else standin  # dequantized again, only when dx is wanted
            dx, _, dA, dB, dbias = kernels.lora_backward(grad_y, x, w, lora_A, lora_B, h, scaling, p, seed,
                                                         nx, False, na, nb, nbias)
            return dx, dA, dB, dbias

        def fused4bit():
            _, _, dA, dB, dbias = kernels.lora_backward(grad_y, x, standin, lora_A, lora_B, h, scaling, p, seed,
                                                        False, False, na, nb, nbias)
            dx = None
            if nx:
                dh = torch.mm(grad_y.float(), lora_B.float()).mul_(scaling)  # (M, r) fp32: cheap at small M
                dx = qk.qlora_gemm_dx(grad_y, q, scales, _code(quant_type, x.device), blocksize, quant_dtype, K, dh,
                                      lora_A, p, seed)
            return dx, dA, dB, dbias

        dx, dA, dB, dbias = _pick("backward", x, quant, lora_A, nbias, p, {"fused4bit": fused4bit, "dequant": dequant})
        return dx, None, None, None, None, None, dA, dB, dbias


class LoRA4bitOp(FusedOp):
    """``y = x W̃ᵀ + b + s·(drop(x) Aᵀ) Bᵀ`` over a packed 4-bit W; saves h. The quant_state enters as its own tensors
    (packed bytes, block scales and, with double quantization, the second level's scales, table and offset) and
    its sizes, so the custom ops see nothing but tensors and numbers."""

    name = "lora_linear_4bit"
    tensors = ("input", "packed", "absmax", "absmax2", "code2", "offset", "lora_A", "lora_B", "bias")
    optional = frozenset({"absmax2", "code2", "offset", "bias"})
    not_floating = frozenset({"packed", "absmax"})  # absmax is uint8 with double quantization
    no_grad = frozenset({"packed", "absmax", "absmax2", "code2", "offset"})
    any_device = frozenset({"code2", "offset"})  # bitsandbytes moves them where it reads them
    consts = (("out_features", "int"), ("in_features", "int"), ("blocksize", "int"), ("quant_type", "str"),
              ("quant_dtype", "ScalarType"), ("blocksize2", "int"), ("scaling", "float"), ("dropout_p", "float"))
    saved = ("h",)
    autocast_args = ("input", "lora_A", "lora_B", "bias")
    scaled = "lora_B"
    torch_impl = TorchLoRA4bit
    triton_impl = "fastlora.qlora:TritonLoRA4bit"

    def check(self, a):
        check_linear_shapes(self.name, a["input"], None, a["lora_A"], a["lora_B"], a["bias"], N=a["out_features"],
                            K=a["in_features"])

    def check_dtypes(self, a):
        check_linear_dtypes(self.name, a["input"], None, a["lora_A"], a["lora_B"], a["bias"])

    def fake(self, x, *rest):
        lora_A, N = rest[5], rest[8]
        M = x.shape[0]
        return x.new_empty(M, N), x.new_empty(M, lora_A.shape[0], dtype=reference.h_dtype(x.dtype))

    def differentiable_forward(self, tensors, saved, consts, seed, use_triton):
        """The op's formula in differentiable PyTorch ops, W̃ a constant and the op's own dropout mask."""
        x, q, absmax, absmax2, code2, offset, lora_A, lora_B, bias = tensors
        N, K, blocksize, quant_type, quant_dtype, blocksize2, scaling, p = consts
        w = _Quant(N, K, blocksize, quant_type, quant_dtype).dequantize(
            q, absmax_fp32(absmax, absmax2, code2, offset, blocksize2), x.dtype)
        xd = dropped(x, p, seed, use_triton)
        low = F.linear(F.linear(xd.to(lora_A.dtype), lora_A), lora_B.to(lora_A.dtype)) * scaling
        return F.linear(x, w, bias) + low.to(x.dtype)


LORA_4BIT = LoRA4bitOp()


# ---------------------------------------------------------------------------------------------------------
# The functional op
# ---------------------------------------------------------------------------------------------------------

def dequantize_weight(weight, quant_state=None, dtype: Optional[torch.dtype] = None) -> Tensor:
    """W̃ (out, in): bitsandbytes' dequantize_4bit of a Params4bit (or packed tensor + quant_state), in ``dtype``
    (default: the dtype it was quantized from). For merging and exporting; the op never keeps one."""
    _bnb()
    qs, quant = _resolve_quant(weight, quant_state)
    return quant.dequantize(_packed_bytes(weight), absmax_fp32(*_quant_tensors(qs)), dtype or quant.dtype)


def lora_linear_4bit(
    input: Tensor,
    weight,
    lora_A: Tensor,
    lora_B: Tensor,
    bias: Optional[Tensor] = None,
    *,
    quant_state=None,
    scaling: float | Tensor = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    r"""``input @ W̃ᵀ + bias + scaling · (dropout(input) @ lora_Aᵀ) @ lora_Bᵀ`` with W̃ = dequantize_4bit(weight).

    weight: a quantized bitsandbytes ``Params4bit`` (its ``quant_state`` is used), or the packed uint8 tensor with
    ``quant_state=`` (a bitsandbytes QuantState: NF4 or FP4, any blocksize, with or without double quantization).
    input (..., in) is the compute dtype (fp16, bf16 or fp32): W̃ is dequantized as bitsandbytes does (to the
    quantized dtype) and cast to it, as ``bnb.matmul_4bit``. lora_A (r, in), lora_B (out, r) (may be wider than
    input, e.g. fp32 adapters), bias (out,) or None. Dropout acts on the LoRA branch only, when ``training`` and
    ``dropout_p > 0``. Gradients flow to input, lora_A, lora_B (and bias if it requires grad), never to weight.
    ``scaling`` is a number or a one-element tensor without gradient (PEFT's hot-swap scaling), as in
    ``lora_linear``. No dequantized copy of the weight is kept between calls or saved for the backward.
    """
    _bnb()
    qs, quant = _resolve_quant(weight, quant_state)
    absmax, absmax2, code2, offset, blocksize2 = _quant_tensors(qs)
    return LORA_4BIT(input, _packed_bytes(weight), absmax, absmax2, code2, offset, lora_A, lora_B, bias,
                     out_features=quant.N, in_features=quant.K, blocksize=quant.blocksize, quant_type=quant.quant_type,
                     quant_dtype=quant.dtype, blocksize2=blocksize2, scaling=scaling, dropout_p=dropout_p,
                     training=training)
