"""Comparison and allocation helpers for the tests: one error report, the low-precision rule, NaN poisoning."""
from __future__ import annotations

import contextlib

import torch
import torch.utils._python_dispatch


def error_report(actual: torch.Tensor, expected: torch.Tensor, name: str = "tensor") -> str:
    """Max absolute / relative error, where it is, and the NaN / inf counts of both sides."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    lines = [f"{name}: shape {tuple(a.shape)}, dtype {actual.dtype} vs {expected.dtype}"]
    lines.append(f"  NaN: actual {int(a.isnan().sum())}, expected {int(e.isnan().sum())}; "
                 f"inf: actual {int(a.isinf().sum())}, expected {int(e.isinf().sum())}")
    if a.numel() and a.shape == e.shape:
        diff = (a - e).abs().nan_to_num(nan=float("inf"))
        flat = int(diff.argmax())
        pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
        lines.append(f"  max abs error {diff.max().item():.3e} at {pos}: actual {a.flatten()[flat].item():.6g}, "
                     f"expected {e.flatten()[flat].item():.6g}; max |expected| {e.abs().max().item():.3e}")
    return "\n".join(lines)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "tensor"):
    """|actual - expected| <= atol + rtol·|expected| elementwise, no NaN/inf, same shape; reports on failure."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    ok = bool(torch.isfinite(a).all()) and bool(((a - e).abs() <= atol + rtol * e.abs()).all())
    assert ok, f"not close (atol={atol}, rtol={rtol})\n" + error_report(actual, expected, name)


def assert_low_precision_close(fused: torch.Tensor, ref64: torch.Tensor, torch_same_dtype: torch.Tensor,
                               atol: float, name: str = "tensor"):
    """The flash-attention rule for fp16/bf16: max|fused − ref64| <= 2·max|torch_same_dtype − ref64| + atol,
    where ``torch_same_dtype`` is the plain-PyTorch result in the same low precision."""
    assert fused.shape == ref64.shape == torch_same_dtype.shape, f"{name}: shapes differ"
    f, r, t = (x.detach().double().cpu() for x in (fused, ref64, torch_same_dtype))
    err = (f - r).abs().max().item() if f.numel() else 0.0
    base = (t - r).abs().max().item() if t.numel() else 0.0
    ok = bool(torch.isfinite(f).all()) and err <= 2 * base + atol
    assert ok, (f"{name}: fused error {err:.3e} > 2 x torch's own error {base:.3e} + atol {atol}\n"
                + error_report(fused, ref64, name))


_FACTORIES = ("empty", "empty_like", "empty_strided")


def _poison(t):
    if isinstance(t, torch.Tensor) and t.numel():
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-77)  # an integer sentinel: masks / indices that are never written stand out too
    return t


@contextlib.contextmanager
def nan_poisoned_allocations():
    """Within the block, torch.empty / empty_like / empty_strided / Tensor.new_empty return poisoned memory."""
    saved = {name: getattr(torch, name) for name in _FACTORIES}
    saved_new_empty = torch.Tensor.new_empty

    def wrap(fn):
        def poisoned(*args, **kwargs):
            return _poison(fn(*args, **kwargs))
        return poisoned

    try:
        for name, fn in saved.items():
            setattr(torch, name, wrap(fn))
        torch.Tensor.new_empty = wrap(saved_new_empty)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)
        torch.Tensor.new_empty = saved_new_empty


# ---------------------------------------------------------------------------------------------------------
# Kernel launch spy: which @triton.jit kernels ran, with which arguments and constexprs, and how many atomics
# ---------------------------------------------------------------------------------------------------------

class KernelLaunches:
    """Records every launch of a @triton.jit kernel while installed (tests/conftest.py's ``kernel_spy``).

    Each launch is ``(name, args)`` where ``args`` maps the kernel's parameter names to what was passed, after
    ``triton.heuristics`` / the autotuner added theirs (``EVEN_K``, ``BLOCK_M``, ...). Under the interpreter,
    ``atomics`` counts the atomic read-modify-write ops the kernels executed (one per tl.atomic_* call)."""

    def __init__(self):
        self.launches: list[tuple[str, dict]] = []
        self.atomics = 0

    def clear(self):
        self.launches.clear()
        self.atomics = 0

    def names(self) -> list[str]:
        return [name for name, _ in self.launches]

    def of(self, name: str) -> list[dict]:
        return [args for n, args in self.launches if n == name]

    def values(self, name: str, key: str) -> set:
        """The set of values ``key`` took over the launches of kernel ``name``."""
        return {args.get(key) for args in self.of(name)}

    def summary(self) -> str:
        flags = ("EVEN_K", "HAS_DROPOUT", "LO_DROPOUT", "FUSE_SHRINK", "STORE_L", "NEED_DH", "NEED_DB", "NEED_DBIAS",
                 "HAS_BIAS", "M", "N", "K")
        return "; ".join(f"{n}({', '.join(f'{k}={a[k]}' for k in flags if k in a)})" for n, a in self.launches)


@contextlib.contextmanager
def spy_kernel_launches():
    """Install a ``KernelLaunches`` recorder on Triton's kernel classes (the interpreter's InterpretedFunction and
    the compiled JITFunction) and on the interpreter's atomic op; restored on exit. The library is untouched."""
    import inspect

    import triton.runtime.jit as jit

    rec = KernelLaunches()
    patched = []
    classes = [jit.JITFunction]
    builder = None
    try:
        from triton.runtime import interpreter

        classes.append(interpreter.InterpretedFunction)
        builder = interpreter.InterpreterBuilder
    except ImportError:  # pragma: no cover - depends on the triton version
        pass

    def make_run(original):
        def run(self, *args, **kwargs):
            params = list(inspect.signature(self.fn).parameters)
            bound = dict(zip(params, args))
            bound.update({k: v for k, v in kwargs.items() if k in params})
            rec.launches.append((self.fn.__name__, bound))
            return original(self, *args, **kwargs)
        return run

    for cls in classes:
        original = cls.__dict__.get("run")
        if original is not None:
            patched.append((cls, "run", original))
            cls.run = make_run(original)
    if builder is not None:
        original_rmw = builder.create_atomic_rmw
        original_cas = builder.create_atomic_cas

        def rmw(self, *args, **kwargs):
            rec.atomics += 1
            return original_rmw(self, *args, **kwargs)

        def cas(self, *args, **kwargs):
            rec.atomics += 1
            return original_cas(self, *args, **kwargs)

        patched += [(builder, "create_atomic_rmw", original_rmw), (builder, "create_atomic_cas", original_cas)]
        builder.create_atomic_rmw = rmw
        builder.create_atomic_cas = cas
    try:
        yield rec
    finally:
        for cls, name, original in reversed(patched):
            setattr(cls, name, original)


# ---------------------------------------------------------------------------------------------------------
# A float64 oracle of the LoRA linear with an explicit keep mask, and leaf-copy forward/backward runs
# ---------------------------------------------------------------------------------------------------------

def lora_oracle(x, weight, lora_A, lora_B, bias, scaling, keep=None, p=0.0, dtype=torch.float64):
    """x Wᵀ + b + s·((x ⊙ keep/(1-p)) Aᵀ) Bᵀ computed in ``dtype`` from the given tensors (plain torch ops)."""
    def cast(t):
        return None if t is None else t.to(dtype)

    x, weight, lora_A, lora_B, bias = (cast(t) for t in (x, weight, lora_A, lora_B, bias))
    xd = x if keep is None else x * keep.to(device=x.device, dtype=dtype) / (1.0 - p)
    y = x @ weight.t() + scaling * ((xd @ lora_A.t()) @ lora_B.t())
    return y if bias is None else y + bias


def run_leaves(fn, tensors, trainable, grad_y, **kwargs):
    """Forward + backward of ``fn(*leaves, **kwargs)`` on detached copies of ``tensors``; ``trainable[i]`` says
    whether leaf i requires grad. Returns (y, [grad or None per leaf]); backward only if y requires grad."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(bool(req))
              for t, req in zip(tensors, trainable)]
    y = fn(*leaves, **kwargs)
    if y.requires_grad:
        y.backward(grad_y)
    return y.detach(), [None if t is None else t.grad for t in leaves]


def lora_inputs(M, K, N, r, dtype=torch.float32, adapter_dtype=None, bias=True, seed=0, device="cpu", lead=None):
    """(x, weight, lora_A, lora_B, bias or None, dY) from a seeded generator, scaled so that every term of
    y = x Wᵀ + b + s·(x Aᵀ) Bᵀ is O(1); |b| ~ 3, so that a dropped bias is far outside any tolerance. ``lead``:
    x's leading shape (default (M,)), dY's too."""
    g = torch.Generator().manual_seed(seed)
    adt = adapter_dtype or dtype

    def rnd(*shape, scale=1.0, dt=dtype, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dt)

    rows = tuple(lead) if lead else (M,)
    x = rnd(*rows, K)
    weight = rnd(N, K, scale=K**-0.5)
    lora_A = rnd(r, K, scale=K**-0.5, dt=adt)
    lora_B = rnd(N, r, scale=0.5, dt=adt)  # nonzero B so that dA is not trivially zero
    b = rnd(N, shift=3.0) if bias else None
    grad = rnd(*rows, N)
    return x, weight, lora_A, lora_B, b, grad


class AllocatedShapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Every shape an op allocates while the mode is on (``shapes``): views and in-place results allocate nothing and
    are left out. The tests that a path never forms a full-size (out, in) tensor read it."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(ret.alias_info is not None for ret in func._schema.returns):
            return out
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out
