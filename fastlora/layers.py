"""nn.Modules. No math of their own: they hold parameters and call ``fastlora.functional``."""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .functional import lora_embedding, lora_linear
from .qlora import is_linear4bit, lora_linear_4bit, restore_canonical_layout

__all__ = ["LoRALinear", "LoRAEmbedding", "LoRALinear4bit"]


def _check_lora_args(r, lora_alpha, lora_dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)):
        raise TypeError(f"lora_alpha must be a number, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be a float in [0, 1), got {lora_dropout!r}")


def _check_init(init_lora_weights) -> None:
    if not (init_lora_weights is True or init_lora_weights is False or init_lora_weights == "gaussian"):
        raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """PEFT's default: adapters stay fp32 on an fp16/bf16 base; otherwise they take the base's dtype."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


class _LoRAModule(nn.Module):
    """What LoRALinear and LoRAEmbedding share: the scaling and merging the update s·B@A into ``weight``.
    Subclasses define ``delta_weight()`` (the update shaped like ``weight``, in its dtype)."""

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def _product_BA(self) -> torch.Tensor:
        """s · B @ A computed in fp32 at least: the only place B@A is ever formed."""
        wide = torch.promote_types(self.lora_A.dtype, torch.float32)
        return (self.lora_B.to(wide) @ self.lora_A.to(wide)) * self.scaling

    def _new_adapters(self, a_shape: tuple, b_shape: tuple) -> None:
        """Fresh (uninitialised) lora_A / lora_B on weight's device, in PEFT's adapter dtype for weight's dtype."""
        adapter = {"device": self.weight.device, "dtype": adapter_dtype(self.weight.dtype)}
        self.lora_A = nn.Parameter(torch.empty(a_shape, **adapter))
        self.lora_B = nn.Parameter(torch.empty(b_shape, **adapter))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight`` in place; forward then runs the plain base layer."""
        if self.merged:
            warnings.warn(f"{type(self).__name__}.merge(): already merged, nothing to do")
            return
        self._add_to_weight(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): subtract the update from ``weight`` (exact up to the weight dtype's rounding)."""
        if not self.merged:
            warnings.warn(f"{type(self).__name__}.unmerge(): not merged, nothing to do")
            return
        self._add_to_weight(-self.delta_weight())
        self.merged = False

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        self.weight.add_(delta)


class LoRALinear(_LoRAModule):
    r"""Drop-in for ``nn.Linear`` with a LoRA update: ``y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ``.

    ``weight`` (out, in) and ``bias`` (out,) are frozen (set ``bias.requires_grad_(True)`` to train the bias);
    ``lora_A`` (r, in) and ``lora_B`` (out, r) train. ``scaling`` is ``lora_alpha / r``, or ``lora_alpha / √r``
    with ``use_rslora``. Initialised as PEFT: A kaiming-uniform (a=√5), B zeros, so a new layer equals its base.
    Adapters are fp32 on an fp16/bf16 base (PEFT's default); the output has the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        _check_lora_args(r, lora_alpha, lora_dropout)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.merged = False
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._new_adapters((r, in_features), (out_features, r))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation of weight and bias, then PEFT's of the adapters."""
        if self.weight.device.type != "meta":
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
                if self.bias is not None:
                    bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
                    nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """PEFT's ``init_lora_weights``: True — A kaiming-uniform (a=√5), B zeros (the layer starts as its base);
        ``"gaussian"`` — A ~ N(0, 1/r²), B zeros; False — both as nn.Linear initialises its weight (a random,
        non-zero update, for tests)."""
        _check_init(init_lora_weights)
        if self.lora_A.device.type == "meta":
            return
        with torch.no_grad():
            if init_lora_weights is True:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B)
            elif init_lora_weights is False:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
                nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: bool | str = True) -> "LoRALinear":
        """Wrap ``linear``, sharing its weight and bias tensors (no copy) and freezing them. A bitsandbytes
        ``Linear4bit`` gives a ``LoRALinear4bit`` (QLoRA) instead."""
        if _quantized_base(linear):  # [qlora] 4-bit bases: see the QLoRA block at the end of this file
            return LoRALinear4bit.from_linear(linear, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                              use_rslora=use_rslora, init_lora_weights=init_lora_weights)
        if isinstance(linear, nn.Embedding):
            raise TypeError("from_linear expects an nn.Linear, got an nn.Embedding: wrap it with "
                            "fastlora.LoRAEmbedding.from_embedding(embedding, r=..., lora_alpha=...)")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        _check_lora_args(r, lora_alpha, lora_dropout)
        _check_init(init_lora_weights)
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                    dtype=linear.weight.dtype, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                    use_rslora=use_rslora)
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        if linear.bias is not None:
            layer.bias = linear.bias
            layer.bias.requires_grad_(False)
        layer._new_adapters((r, linear.in_features), (linear.out_features, r))
        layer.reset_lora_parameters(init_lora_weights)
        return layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(input, self.weight, self.bias)
        return lora_linear(input, self.weight, self.lora_A, self.lora_B, self.bias, scaling=self.scaling,
                           dropout_p=self.lora_dropout, training=self.training)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s · B @ A (out, in) in the weight's dtype."""
        return self._product_BA().to(self.weight.dtype)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear computing this layer's current function (W + s·B@A); this layer is unchanged."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        merged = self.weight if self.merged else self.weight + self.delta_weight()
        linear.weight.copy_(merged)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}"
                + (", use_rslora=True" if self.use_rslora else "") + (", merged=True" if self.merged else ""))


class LoRAEmbedding(_LoRAModule):
    r"""Drop-in for ``nn.Embedding`` with a LoRA update, as PEFT's ``lora.Embedding``:
    ``y = E[ids] + s · (Aᵀ[ids]) Bᵀ``.

    ``weight`` (num_embeddings, embedding_dim) is frozen; ``lora_A`` (r, num_embeddings) and ``lora_B``
    (embedding_dim, r) train (PEFT's ``lora_embedding_A`` / ``lora_embedding_B``). ``scaling`` is ``lora_alpha / r``,
    or ``lora_alpha / √r`` with ``use_rslora``. Initialised as PEFT: A zeros, B ~ N(0, 1), so a new layer equals its
    base. No dropout: PEFT applies none to embeddings. The lookups honour ``padding_idx``, ``max_norm`` and the
    other ``nn.Embedding`` options for both the base table and ``Aᵀ``, as PEFT's do.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, device=None, dtype=None, *, r: int = 8, lora_alpha: float = 8,
                 use_rslora: bool = False):
        super().__init__()
        _check_lora_args(r, lora_alpha, 0.0)
        factory = {"device": device, "dtype": dtype}
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num_embeddings
        self.padding_idx = padding_idx
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.scale_grad_by_freq = scale_grad_by_freq
        self.sparse = sparse
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = bool(use_rslora)
        self.merged = False
        self.weight = nn.Parameter(torch.empty((num_embeddings, embedding_dim), **factory), requires_grad=False)
        self._new_adapters((r, num_embeddings), (embedding_dim, r))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Embedding's initialisation of weight (N(0, 1), padding row zero), then PEFT's of the adapters."""
        if self.weight.device.type != "meta":
            with torch.no_grad():
                nn.init.normal_(self.weight)
                if self.padding_idx is not None:
                    self.weight[self.padding_idx].fill_(0)
        self.reset_lora_parameters()

    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """PEFT's ``init_lora_weights`` for embeddings: True or ``"gaussian"`` — A zeros, B ~ N(0, 1); False — both
        ~ N(0, 1) (a random, non-zero update, for tests)."""
        _check_init(init_lora_weights)
        if self.lora_A.device.type == "meta":
            return
        with torch.no_grad():
            if init_lora_weights is False:
                nn.init.normal_(self.lora_A)
            else:
                nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, *, r: int = 8, lora_alpha: float = 8, use_rslora: bool = False,
                       init_lora_weights: bool | str = True) -> "LoRAEmbedding":
        """Wrap ``embedding``, sharing its weight tensor (no copy, so weight tying survives) and freezing it."""
        if isinstance(embedding, nn.Linear):
            raise TypeError("from_embedding expects an nn.Embedding, got an nn.Linear: wrap it with "
                            "fastlora.LoRALinear.from_linear(linear, r=..., lora_alpha=...)")
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"from_embedding expects an nn.Embedding, got {type(embedding).__name__}")
        _check_lora_args(r, lora_alpha, 0.0)
        _check_init(init_lora_weights)
        e = embedding
        layer = cls(e.num_embeddings, e.embedding_dim, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq,
                    e.sparse, device="meta", dtype=e.weight.dtype, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora)
        layer.weight = e.weight
        layer.weight.requires_grad_(False)
        layer._new_adapters((r, e.num_embeddings), (e.embedding_dim, r))
        layer.reset_lora_parameters(init_lora_weights)
        return layer

    def _lookup(self, input: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(input, table, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self._lookup(input, self.weight)
        return lora_embedding(input, self.weight, self.lora_A, self.lora_B, scaling=self.scaling,
                              padding_idx=self.padding_idx, max_norm=self.max_norm, norm_type=self.norm_type,
                              scale_grad_by_freq=self.scale_grad_by_freq, sparse=self.sparse)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s · (B @ A)ᵀ, shaped like weight (num_embeddings, embedding_dim), in the weight's dtype."""
        return self._product_BA().t().to(self.weight.dtype)

    @torch.no_grad()
    def to_embedding(self) -> nn.Embedding:
        """A plain nn.Embedding computing this layer's current function; this layer is unchanged."""
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse, device=self.weight.device, dtype=self.weight.dtype)
        emb.weight.copy_(self.weight if self.merged else self.weight + self.delta_weight())
        return emb

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return (s + f", r={self.r}, lora_alpha={self.lora_alpha}" + (", use_rslora=True" if self.use_rslora else "")
                + (", merged=True" if self.merged else ""))


# ==============================================================================================================
# [qlora] LoRA over a bitsandbytes 4-bit base (QLoRA). Owned by the qlora work; the math is fastlora.qlora's.
# ==============================================================================================================

def _quantized_base(linear) -> bool:
    """True for a bitsandbytes 4-bit base (handled by LoRALinear4bit); raises for an 8-bit one, which is an
    nn.Linear subclass too but whose weight is int8 with its own scales."""
    if type(linear).__name__ == "Linear8bitLt" and type(linear).__module__.startswith("bitsandbytes"):
        raise TypeError("from_linear: 8-bit bases (bitsandbytes Linear8bitLt) are not supported; use a 4-bit "
                        "(Linear4bit) base, or PEFT's own 8-bit LoRA layer")
    return is_linear4bit(linear)


class LoRALinear4bit(_LoRAModule):
    r"""QLoRA: a LoRA update over a frozen bitsandbytes ``Linear4bit`` (NF4 or FP4, any blocksize, with or without
    double quantization): ``y = x W̃ᵀ + b + s · (dropout(x) Aᵀ) Bᵀ`` with W̃ = dequantize_4bit(W), run by
    ``fastlora.lora_linear_4bit`` (no dequantized W kept between calls or saved for the backward).

    ``base_layer`` is the Linear4bit itself (its packed weight, bias and ``compute_dtype``, shared, not copied).
    As bitsandbytes' forward: x is cast to the base's compute dtype for the product and the output cast back to
    x's dtype. ``lora_A`` (r, in) and ``lora_B`` (out, r) are fp32 by default (PEFT's QLoRA adapters) and
    initialised as PEFT's (``init_lora_weights``). ``merge()`` / ``unmerge()`` quantize W̃ ± s·B@A again, as PEFT
    does (lossy, with a warning); ``to_linear()`` returns a dense nn.Linear with W̃ + s·B@A.
    """

    def __init__(self, base_layer: nn.Module, *, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True,
                 adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not is_linear4bit(base_layer):
            raise TypeError(f"LoRALinear4bit expects a bitsandbytes Linear4bit, got {type(base_layer).__name__}")
        _check_lora_args(r, lora_alpha, lora_dropout)
        _check_init(init_lora_weights)
        if getattr(base_layer.weight, "quant_state", None) is None and getattr(base_layer, "quant_state", None) is None:
            raise ValueError("LoRALinear4bit: the Linear4bit is not quantized yet (bitsandbytes quantizes its weight "
                             "when the layer is moved to a device, e.g. .to('cpu') or .cuda())")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.merged = False
        base_layer.weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(False)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty((r, self.in_features), device=device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.empty((self.out_features, r), device=device, dtype=adapter_dtype))
        LoRALinear.reset_lora_parameters(self, init_lora_weights)

    @classmethod
    def from_linear(cls, linear: nn.Module, *, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: bool | str = True) -> "LoRALinear4bit":
        """Wrap a bitsandbytes Linear4bit (shared, frozen)."""
        return cls(linear, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                   init_lora_weights=init_lora_weights)

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        LoRALinear.reset_lora_parameters(self, init_lora_weights)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        base = self.base_layer
        fix_4bit_weight_quant_state_from_module(base)
        restore_canonical_layout(base.weight)  # undo bitsandbytes' CPU eval-mode repacking, if it happened
        if not base.compute_type_is_set:  # as Linear4bit.forward: the first input may set the compute dtype
            base.set_compute_type(input)
            base.compute_type_is_set = True
        x = input.to(base.compute_dtype) if base.compute_dtype is not None else input
        bias = base.bias.to(x.dtype) if base.bias is not None else None
        # merged: the update is in the 4-bit weight, and the same op runs the base alone (a zero LoRA term)
        y = lora_linear_4bit(x, base.weight, self.lora_A, self.lora_B, bias,
                             scaling=0.0 if self.merged else self.scaling, dropout_p=self.lora_dropout,
                             training=self.training and not self.merged)
        return y.to(input.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s · B @ A (out, in) in fp32 at least."""
        return self._product_BA()

    @torch.no_grad()
    def _add_to_weight(self, delta: torch.Tensor) -> None:
        """W ← quantize(W̃ + delta), as PEFT merges into a 4-bit base: lossy (the sum is quantized again)."""
        import bitsandbytes as bnb

        from .qlora import dequantize_weight

        warnings.warn("LoRALinear4bit: merging into (or out of) a 4-bit weight quantizes it again; outputs differ "
                      "by that rounding. to_linear() gives a dense nn.Linear without it.", stacklevel=3)
        weight = self.base_layer.weight
        restore_canonical_layout(weight)
        dense = (dequantize_weight(weight, dtype=torch.float32) + delta.float()).to(weight.quant_state.dtype)
        kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs.update(bnb_quantized=False, requires_grad=False)
        self.base_layer.weight = bnb.nn.Params4bit(dense.to("cpu"), **kwargs).to(weight.device)

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense nn.Linear computing W̃ + s·B@A (and the bias), in ``dtype`` (default: the dtype the weight was
        quantized from); this layer is unchanged."""
        from .qlora import dequantize_weight

        restore_canonical_layout(self.base_layer.weight)
        w = dequantize_weight(self.base_layer.weight, dtype=torch.float32) + self.delta_weight().float()
        dtype = dtype or self.base_layer.weight.quant_state.dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                           dtype=dtype)
        linear.weight.copy_(w)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        qs = self.base_layer.weight.quant_state
        quant = f"{qs.quant_type}, blocksize={qs.blocksize}" + (", double_quant=True" if qs.nested else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{quant}, r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}"
                + (", use_rslora=True" if self.use_rslora else ""))
