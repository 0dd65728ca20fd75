r"""The op protocol: the one shape every fused op of fastlora is written in, and the plumbing they share, written once.

An op (LoRA linear, LoRA embedding, DoRA linear, 4-bit LoRA, ...) is a ``FusedOp`` subclass that declares its
arguments and supplies only what is its own:

* its checks (``check``: shapes, ranks, options; ``check_dtypes``: after autocast);
* its math, twice with ONE signature: a PyTorch implementation (the CPU fallback and the oracle's twin) and a
  Triton one (``torch_impl`` / ``triton_impl``), each an object with::

      forward(*tensors, *consts, seed, save)            -> (y, saved)   saved: a tuple, one tensor per name in
                                                                        ``saved`` (None allowed when not save)
      backward(grad_y, *tensors, *saved, *consts, seed, needs) -> one gradient (or None) per tensor argument

  (``tensors`` / ``consts`` in the order the op declares them; ``needs[i]``: autograd wants tensors[i]'s gradient);
* what its outputs look like (``fake``: the meta outputs ``(y, *saved)`` torch.compile traces with);
* its formula in differentiable PyTorch ops (``differentiable_forward``: what a double backward differentiates).

Everything else is this module's, for every op alike (``FusedOp.__call__``):

1. argument checks: tensors are tensors, floating where they must be, on one device; ``scaling`` (a finite number or
   a one-element tensor without gradient, PEFT's hot-swap scaling) and ``dropout_p`` (in [0, 1)); then ``check``;
2. autocast (the declared ``autocast_args``, as nn.Linear's matmul), then ``check_dtypes``;
3. ``training=False`` turns dropout off; the backend picks Triton or PyTorch (``fastlora.backend.use_triton``);
4. rows flattened to 2-D (``flatten`` / ``unflatten``); a tensor scaling folded into the ``scaled`` argument by an
   autograd-visible product (``fold_tensor_scaling``), so implementations always see a float;
5. dispatch: with autograd, eager code runs the op's generated ``torch.autograd.Function`` (a few µs of host
   overhead) and code being compiled runs the op's ``torch.library`` custom ops ``fastlora::<name>_fwd`` (with
   ``register_fake`` and ``register_autograd``) and ``fastlora::<name>_bwd``: ``torch.compile(fullgraph=True)``
   traces through without a graph break; without autograd, eager code calls the implementation's forward with
   ``save=False`` (nothing saved) and compiled code ``fastlora::<name>_infer``;
6. the dropout seed is drawn once per call from torch's default generator (``draw_seed``), saved, and handed to
   forward and backward: implementations regenerate their mask from it and never store one;
7. the backward asks only for the gradients autograd needs; a differentiable gradient (``create_graph=True``: gradient
   penalties, Hessian-vector products) is the autograd of ``differentiable_forward`` instead (``recompute_grads``),
   so second derivatives are exact while the first-order backward pays nothing for it;
8. kernel launches run inside ``fastlora.backend.kernel_section`` (serialized under Triton's CPU interpreter).

A new op is a new file with its ``FusedOp`` subclass, one module-level instance, and a public function that calls it
(see benchmarks/NOTES.md, "How to write an op", for a worked skeleton). Tests get the op-independent properties
(tensor scaling, torch.compile without graph break, autocast, meta device) by adding one case to
``tests/op_cases.py``.

The module also holds the shared checks and helpers the ops use directly (``check_scaling``, ``check_dropout``,
``autocast``, ``flatten_rows``, ``draw_seed``, ``fold_tensor_scaling``, ``recompute_grads``).
"""
from __future__ import annotations

import abc
import importlib
import math
import numbers
from typing import Any, Optional

import torch
from torch import Tensor

from . import backend as _backend

# The schemas of every custom op registered here, in registration order (see ``tag_compile_caches``).
_SCHEMAS: list[str] = []

__all__ = ["FusedOp", "check_scaling", "check_dropout", "autocast_enabled", "autocast", "flatten_rows", "draw_seed",
           "fold_tensor_scaling", "recompute_grads", "lazy_impl"]

AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves float64 alone


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def check_scaling(scaling, device, who: str) -> None:
    """A finite real number, or a one-element floating-point tensor without gradient (PEFT's hot-swap scaling,
    ``prepare_model_for_compiled_hotswap``). A NaN or infinite number is refused: PEFT would turn every output of
    the layer into NaN / inf, and no scaling of a trained adapter is meant to."""
    if isinstance(scaling, Tensor):
        if scaling.numel() != 1 or not scaling.is_floating_point():
            raise TypeError(f"{who}: a tensor scaling must be a one-element floating-point tensor, got "
                            f"shape {_shape(scaling)} dtype {scaling.dtype}")
        if scaling.requires_grad:
            raise ValueError(f"{who}: scaling gets no gradient; pass scaling.detach()")
        if scaling.device != device and scaling.device.type != "cpu":
            raise ValueError(f"{who}: scaling is on {scaling.device} but input on {device}")
        return
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"{who}: scaling must be a real number or a 0-d tensor, got {scaling!r}")
    if not math.isfinite(float(scaling)):
        raise ValueError(f"{who}: scaling must be finite, got {scaling!r}")


def check_dropout(dropout_p, who: str) -> None:
    if type(dropout_p) is float and 0.0 <= dropout_p < 1.0:  # the usual case, without the ABC check below
        return
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"{who}: dropout_p must be a float in [0, 1), got {dropout_p!r}")


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for the meta device (which autocast does not know: big-model
    loading runs modules on meta tensors)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def autocast(device_type: str, *tensors, eligible=AUTOCAST_ELIGIBLE):
    """Cast to the autocast dtype where autocast is on for this device, as nn.Linear's matmul is."""
    if not autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.dtype in eligible else t for t in tensors)


def flatten_rows(input: Tensor) -> Tensor:
    """(..., K) as (M, K), M the product of the leading sizes (K = 0 included, where reshape(-1, 0) is ambiguous)."""
    if input.dim() == 2:
        return input
    return input.reshape(math.prod(input.shape[:-1]), input.shape[-1])


def draw_seed(dropout_p: float) -> int:
    """The dropout seed, from torch's default (CPU) generator: torch.manual_seed makes runs repeatable, and
    activation checkpointing, which restores the RNG state, recomputes the same mask. Eager and compiled code
    draw it the same way (inside the op), so they consume the generator alike and see the same masks."""
    if dropout_p > 0.0:
        return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    return 0


def fold_tensor_scaling(lora_B: Tensor, scaling):
    """(B', s') with s'·B' = scaling·B, s' a Python float: a tensor scaling (PEFT's hot-swap scaling) is folded into
    B by an autograd-visible product, so dL/dB = scaling·dL/dB' comes from autograd, and the op underneath sees a
    plain float. An (N, r) product on B's device: its value is never read on the host."""
    if isinstance(scaling, Tensor):
        return lora_B * scaling.reshape(()).to(lora_B.dtype), 1.0
    return lora_B, float(scaling)


def recompute_grads(forward, inputs, needs, grad_y: Tensor):
    """Gradients of ``forward(*inputs)`` (a differentiable PyTorch formula of the op) wrt the inputs flagged in
    ``needs`` (None elsewhere), with ``create_graph=True``: what an op's backward returns when autograd asks for a
    differentiable gradient (double backward). ``inputs`` are the tensors the forward saved (the caller's own,
    so that the returned gradients are functions of them)."""
    wrt = [t for t, need in zip(inputs, needs) if need and t is not None]
    with torch.enable_grad():
        y = forward(*inputs)
        grads = iter(torch.autograd.grad(y, wrt, grad_y, create_graph=True, allow_unused=True))
    out = []
    for t, need in zip(inputs, needs):
        if need and t is not None:
            g = next(grads)
            out.append(torch.zeros_like(t) if g is None else g)
        else:
            out.append(None)
    return out


def lazy_impl(path: str):
    """``"package.module:Name"`` resolved on first use (the Triton implementations import triton, which is slow and
    optional): the object, cached on the op."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


# ---------------------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------------------

class FusedOp(abc.ABC):
    """Base of every op; see the module docstring. Subclasses set the class attributes and implement ``check``,
    ``fake`` and ``differentiable_forward`` (and ``check_dtypes``, ``flatten`` / ``unflatten`` where the defaults do
    not fit). One instance per op, made at import: it registers the op's custom ops."""

    name: str = ""                        # custom ops fastlora::<name>_fwd / _infer / _bwd; error messages
    tensors: tuple = ()                   # tensor arguments, in order; tensors[0] is the input (its rows flatten)
    optional: frozenset = frozenset()     # tensor arguments that may be None (a bias)
    not_floating: frozenset = frozenset()  # tensor arguments that are not floating point (ids, packed weights)
    no_grad: frozenset = frozenset()      # tensor arguments that never get a gradient (ids, packed weights)
    any_device: frozenset = frozenset()   # tensor arguments exempt from the one-device check (lookup tables)
    consts: tuple = ()                    # (name, schema type) of the other arguments: "float", "int", "bool",
    #                                       "str", "int?", "float?", "ScalarType", "float[]", "int[]"
    saved: tuple = ()                     # names of the tensors the forward saves for the backward
    row_args: tuple = ()                  # tensor arguments with the input's rows (..., D): flattened to (M, D) too
    autocast_args: tuple = ()             # tensor arguments cast to the autocast dtype
    scaled: Optional[str] = None          # the tensor argument a tensor ``scaling`` is folded into
    dropout: Optional[str] = "dropout_p"  # the const holding the dropout probability, a float or a list of floats
    #                                       ("float[]": one per adapter); None: the op has no dropout
    torch_impl: Any = None                # the PyTorch implementation (an object or class with forward / backward)
    triton_impl: Optional[str] = None     # "module:Name" of the Triton one (None: the op always runs PyTorch)

    def __init__(self):
        assert self.name and self.tensors, "an op declares its name and its tensor arguments"
        self._const_names = tuple(n for n, _ in self.consts)
        self._triton = None
        self.function = type(f"{type(self).__name__}Function", (_OpFunction,), {"op": self})
        self._register_custom_ops()

    # --- what an op supplies -----------------------------------------------------------------------------
    def check(self, a: dict) -> None:
        """Op-specific checks of the arguments (a: name -> value, before autocast); raise ValueError / TypeError."""

    def check_dtypes(self, a: dict) -> None:
        """Op-specific dtype agreement, after autocast."""

    @abc.abstractmethod
    def fake(self, *args):
        """(y, *saved) as empty tensors of the right shapes, dtypes and devices, for (*tensors, *consts)."""

    @abc.abstractmethod
    def differentiable_forward(self, tensors: tuple, saved: tuple, consts: tuple, seed: int, use_triton: bool):
        """y from ``tensors`` in differentiable PyTorch ops, with the forward's dropout mask (``seed``)."""

    def flatten(self, x: Tensor) -> Tensor:
        """The input as the 2-D rows the implementations take."""
        return flatten_rows(x)

    def unflatten(self, y: Tensor, x: Tensor) -> Tensor:
        """The 2-D output back in the input's leading shape."""
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])

    def compute_dtype(self, a: dict) -> torch.dtype:
        """The dtype the backend decides on (the input's)."""
        return a[self.tensors[0]].dtype

    # --- the shared plumbing -----------------------------------------------------------------------------
    def impl(self, use_triton: bool):
        if not use_triton:
            return self.torch_impl
        if self._triton is None:
            self._triton = lazy_impl(self.triton_impl)
        return self._triton

    def _check_common(self, a: dict) -> None:
        who = self.name
        devices = {}
        for name in self.tensors:
            t = a[name]
            if t is None and name in self.optional:
                continue
            if not isinstance(t, Tensor):
                raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if name not in self.not_floating and not t.is_floating_point():
                raise TypeError(f"{who}: {name} must be a floating-point tensor, got dtype {t.dtype}")
            if name not in self.any_device:
                devices[name] = t.device
        if len(set(devices.values())) > 1:
            listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
            raise ValueError(f"{who}: all tensors must be on one device, got {listing}")
        if self.dropout is not None:
            p = a[self.dropout]
            for q in (p if isinstance(p, (list, tuple)) else (p,)):  # a list: one probability per adapter / group
                check_dropout(q, who)
        if "scaling" in a:
            check_scaling(a["scaling"], a[self.tensors[0]].device, who)

    def __call__(self, *tensors, training: bool = True, **consts):
        """Run the op: the arguments are the op's tensors (positionally, in declared order) and its consts (by
        name); ``training=False`` turns its dropout off."""
        x = tensors[0]
        prepared, consts, use_triton = self.prepare(*tensors, training=training, **consts)
        return self.unflatten(self.apply(prepared, consts, use_triton), x)

    def prepare(self, *tensors, training: bool = True, **consts):
        """(tensors, consts, use_triton) as the implementations and the custom ops take them: checked, autocast,
        dropout off unless training, rows flattened, a tensor scaling folded in."""
        a = self._checked(tensors, consts)
        if self.dropout is not None:
            p = a[self.dropout]
            if isinstance(p, (list, tuple)):
                a[self.dropout] = [float(q) if training else 0.0 for q in p]
            else:
                a[self.dropout] = float(p) if training else 0.0
        x = a[self.tensors[0]]
        use_triton = self.triton_impl is not None and _backend.use_triton(x.device, self.compute_dtype(a))
        a[self.tensors[0]] = flat = self.flatten(x)
        for name in self.row_args:
            t = a[name]
            a[name] = t.reshape(flat.shape[0], *t.shape[t.dim() - 1:]) if t is not None else None
        if self.scaled is not None and "scaling" in a:
            a[self.scaled], a["scaling"] = fold_tensor_scaling(a[self.scaled], a["scaling"])
        return tuple(a[n] for n in self.tensors), tuple(a[n] for n in self._const_names), use_triton

    def _checked(self, tensors, consts) -> dict:
        """name -> argument, checked and autocast."""
        if len(tensors) != len(self.tensors):
            raise TypeError(f"{self.name}: takes the tensors {self.tensors}, got {len(tensors)}")
        if consts.keys() != set(self._const_names):
            missing, unknown = set(self._const_names) - consts.keys(), consts.keys() - set(self._const_names)
            raise TypeError(f"{self.name}: takes the arguments {self._const_names} by name; missing "
                            f"{sorted(missing)}, unknown {sorted(unknown)}")
        a = dict(zip(self.tensors, tensors))
        a.update(consts)
        self._check_common(a)
        self.check(a)
        if self.autocast_args:
            cast = autocast(a[self.tensors[0]].device.type, *(a[n] for n in self.autocast_args))
            a.update(zip(self.autocast_args, cast))
        self.check_dtypes(a)
        return a

    def validate(self, *tensors, **consts) -> None:
        """The checks of ``__call__`` (shared and op-specific, dtypes after autocast), without running the op."""
        self._checked(tensors, consts)

    def apply(self, tensors: tuple, consts: tuple, use_triton: bool) -> Tensor:
        """The op on prepared arguments (rows flattened, scaling a float): the autograd.Function, the custom ops
        or the bare forward, as the caller's context asks."""
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for n, t in zip(self.tensors, tensors) if n not in self.no_grad)
        if torch.compiler.is_compiling():
            if needs_grad:
                return self.fwd_op(*tensors, *consts, use_triton)[0]
            return self.infer_op(*tensors, *consts, use_triton)
        if needs_grad:
            return self.function.apply(use_triton, consts, *tensors)
        return self.forward(tensors, consts, use_triton, save=False)[0]

    def dropout_p(self, consts: tuple) -> float:
        """The op's dropout probability (the largest, for a list): a seed is drawn when it is > 0."""
        if self.dropout is None:
            return 0.0
        p = consts[self._const_names.index(self.dropout)]
        return max(p, default=0.0) if isinstance(p, (list, tuple)) else p

    def forward(self, tensors, consts, use_triton, save: bool):
        """(y, saved, seed): the seed drawn, the implementation run inside the kernel section."""
        seed = draw_seed(self.dropout_p(consts))
        with _backend.kernel_section(use_triton):
            y, saved = self.impl(use_triton).forward(*tensors, *consts, seed=seed, save=save)
        return y, tuple(saved), seed

    def backward(self, grad_y, tensors, saved, consts, seed: int, use_triton: bool, needs):
        """One gradient (or None) per tensor argument, in the arguments' dtypes."""
        with _backend.kernel_section(use_triton):
            grads = self.impl(use_triton).backward(grad_y.contiguous(), *tensors, *saved, *consts, seed=seed,
                                                   needs=tuple(needs))
        return [g.to(t.dtype) if g is not None and g.dtype != t.dtype and not g.is_sparse else g
                for g, t in zip(grads, tensors)]

    def needs(self, needs_input_grad, tensors) -> list:
        return [bool(n) and t is not None and name not in self.no_grad
                for n, t, name in zip(needs_input_grad, tensors, self.tensors)]

    # --- torch.library custom ops ------------------------------------------------------------------------
    def _schema_args(self) -> str:
        ts = [f"Tensor{'?' if n in self.optional else ''} {n}" for n in self.tensors]
        cs = [f"{t} {n}" for n, t in self.consts]
        return ", ".join(ts + cs + ["bool use_triton"])

    def _register_custom_ops(self) -> None:
        n_t, n_s = len(self.tensors), len(self.saved)
        outs = ", ".join(["Tensor"] * (2 + n_s))  # y, *saved, seed
        op = self

        def fwd(*args):
            tensors, consts, use_triton = args[:n_t], args[n_t:-1], args[-1]
            y, saved, seed = op.forward(tensors, consts, use_triton, save=True)
            # outputs may not alias inputs or each other (a custom op's contract)
            return (y, *saved, torch.full((), seed, dtype=torch.int64))

        def fwd_fake(*args):
            y, *saved = op.fake(*args[:-1])
            return (y, *saved, torch.empty((), dtype=torch.int64, device="cpu"))

        def infer(*args):
            tensors, consts, use_triton = args[:n_t], args[n_t:-1], args[-1]
            return op.forward(tensors, consts, use_triton, save=False)[0]

        def infer_fake(*args):
            return op.fake(*args[:-1])[0]

        saved_decl = ", ".join(f"Tensor {n}" for n in self.saved)
        bwd_schema = (f"(Tensor grad_y, {self._schema_args().replace(', bool use_triton', '')}"
                      f"{', ' + saved_decl if saved_decl else ''}, Tensor seed, bool use_triton, bool[] needs)"
                      f" -> Tensor[]")

        def bwd(grad_y, *args):
            tensors = args[:n_t]
            consts = args[n_t:n_t + len(self.consts)]
            saved = args[n_t + len(self.consts):n_t + len(self.consts) + n_s]
            seed, use_triton, needs = args[-3:]
            grads = op.backward(grad_y, tensors, saved, consts, int(seed), use_triton, needs)
            # contiguous, as the fake promises; an empty tensor for a gradient not asked for (custom ops return
            # no None)
            return [g.contiguous() if g is not None else grad_y.new_empty(0) for g in grads]

        def bwd_fake(grad_y, *args):
            tensors, needs = args[:n_t], args[-1]
            return [t.new_empty(t.shape) if need and t is not None else grad_y.new_empty(0)
                    for t, need in zip(tensors, needs)]

        lib = f"fastlora::{self.name}"
        _SCHEMAS.extend([f"{lib}_fwd({self._schema_args()}) -> ({outs})", f"{lib}_infer({self._schema_args()})",
                         f"{lib}_bwd{bwd_schema}"])
        self.fwd_op = torch.library.custom_op(f"{lib}_fwd", fwd, mutates_args=(),
                                              schema=f"({self._schema_args()}) -> ({outs})")
        self.fwd_op.register_fake(fwd_fake)
        self.infer_op = torch.library.custom_op(f"{lib}_infer", infer, mutates_args=(),
                                                schema=f"({self._schema_args()}) -> Tensor")
        self.infer_op.register_fake(infer_fake)
        self.bwd_op = torch.library.custom_op(f"{lib}_bwd", bwd, mutates_args=(), schema=bwd_schema)
        self.bwd_op.register_fake(bwd_fake)

        def setup_context(ctx, inputs, output):
            tensors, consts, use_triton = inputs[:n_t], inputs[n_t:-1], inputs[-1]
            ctx.save_for_backward(*tensors, *output[1:])  # the inputs, what the forward saved, the seed
            ctx.consts, ctx.use_triton = consts, use_triton

        def backward(ctx, grad_y, *ignored):  # gradients of the saved outputs and the seed: never used
            stored = ctx.saved_tensors
            tensors, saved, seed = stored[:n_t], stored[n_t:n_t + n_s], stored[-1]
            needs = op.needs(ctx.needs_input_grad[:n_t], tensors)
            if not any(needs):
                return (None,) * (n_t + len(self.consts) + 1)
            grads = op.bwd_op(grad_y, *tensors, *ctx.consts, *saved, seed, ctx.use_triton, needs)
            return (*[g if need else None for g, need in zip(grads, needs)], *([None] * (len(self.consts) + 1)))

        self.fwd_op.register_autograd(backward, setup_context=setup_context)


class _OpFunction(torch.autograd.Function):
    """The eager autograd.Function of an op (one subclass per op, ``op`` set on it)."""

    op: FusedOp

    @staticmethod
    def forward(ctx, use_triton, consts, *tensors):
        op = ctx._forward_cls.op
        y, saved, seed = op.forward(tensors, consts, use_triton, save=True)
        ctx.save_for_backward(*tensors, *saved)
        ctx.consts, ctx.use_triton, ctx.seed = consts, use_triton, seed
        return y

    @staticmethod
    def backward(ctx, grad_y):
        op = ctx._forward_cls.op
        n_t = len(op.tensors)
        stored = ctx.saved_tensors
        tensors, saved = stored[:n_t], stored[n_t:]
        needs = op.needs(ctx.needs_input_grad[2:], tensors)
        if not any(needs):
            return (None,) * (2 + n_t)
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is differentiated again
            def forward(*ts):
                return op.differentiable_forward(ts, saved, ctx.consts, ctx.seed, ctx.use_triton)

            grads = recompute_grads(forward, tensors, needs, grad_y)
        else:
            grads = op.backward(grad_y, tensors, saved, ctx.consts, ctx.seed, ctx.use_triton, needs)
        return (None, None, *[g if need else None for g, need in zip(grads, needs)])


def tag_compile_caches() -> str:
    """Make torch.compile's on-disk caches tell fastlora's custom ops apart from those of another fastlora version.

    Inductor's FX-graph cache (``/tmp/torchinductor_$USER`` by default) can hand a process a graph compiled by an
    earlier fastlora whose custom ops had other schemas; the graph then calls, e.g., ``fastlora::lora_linear_fwd``
    with the old argument list and fails ("expected at most 8 argument(s) but received 9"): measured after an
    upgrade across issue 21's protocol (benchmarks/NOTES.md, "Compiled graphs from another fastlora"). A hash of every
    registered schema goes into ``torch.compiler.config.cache_key_tag``, which inductor's and AOTAutograd's cache
    keys include, beside whatever tag the user set. The ops' bodies need no part in it: a compiled graph calls them
    at run time, so only their schemas are baked into it. Returns the tag."""
    import hashlib

    digest = hashlib.sha256("\n".join(_SCHEMAS).encode()).hexdigest()[:16]
    mark = f"fastlora-ops-{digest}"
    config = getattr(getattr(torch, "compiler", None), "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return mark  # a torch without the tag (older than 2.6): nothing to key on
    kept = [t for t in str(config.cache_key_tag or "").split("|") if t and not t.startswith("fastlora-ops-")]
    config.cache_key_tag = "|".join(kept + [mark])
    return config.cache_key_tag


class EmbeddingOp(FusedOp):
    """An op whose input is a tensor of ids (a lookup in ``weight``, the table): its rows are the flattened ids, it
    computes in the table's dtype, and ``lora_A`` and ``lora_B`` share one dtype."""

    def check_dtypes(self, a):
        if a["lora_A"].dtype != a["lora_B"].dtype:
            raise TypeError(f"{self.name}: lora_A dtype {a['lora_A'].dtype} and lora_B dtype {a['lora_B'].dtype} "
                            "differ")

    def compute_dtype(self, a):
        return a["weight"].dtype

    def flatten(self, ids):
        return ids.reshape(-1)

    def unflatten(self, y, ids):
        return y.reshape(*ids.shape, y.shape[-1])
