"""Backend selection: which implementation `lora_linear` runs.

``auto`` (the default) runs the Triton kernels on CUDA tensors of a kernel dtype (fp16, bf16, fp32) and the
pure-PyTorch path everywhere else; ``torch`` always runs the pure-PyTorch path; ``triton`` always runs the
kernels and fails loudly where they cannot run. The environment variable ``FASTLORA_BACKEND`` sets the
initial choice.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import warnings

import torch

BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_backend: str | None = None  # None: not chosen yet, read FASTLORA_BACKEND


def _check(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def set_backend(name: str) -> None:
    """Choose the implementation: ``"auto"``, ``"torch"`` or ``"triton"``. ``"triton"`` is refused here, with the
    reason, on a machine where the kernels cannot run at all (no triton package; no CUDA device and no Triton
    interpreter), rather than at the first forward."""
    global _backend
    name = _check(name, "backend")
    if name == "triton":
        reason = triton_unusable()
        if reason:
            raise RuntimeError(reason)
    _backend = name


def get_backend() -> str:
    """The current choice: set_backend's last value, else ``$FASTLORA_BACKEND`` (read when fastlora is imported),
    else ``"auto"``."""
    global _backend
    if _backend is None:
        _backend = _check(os.environ.get("FASTLORA_BACKEND", "auto"), "FASTLORA_BACKEND")
    return _backend


def triton_interpreted() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None  # looks for the package, does not import it


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def triton_unusable() -> str | None:
    """Why backend 'triton' cannot run anything on this machine, or None: it needs the triton package, and a CUDA
    device or the CPU through Triton's interpreter."""
    if not triton_available():
        return ("fastlora backend 'triton' needs the triton package: pip install triton (CUDA builds of torch bring "
                "it), or use backend 'auto' or 'torch'")
    if not torch.cuda.is_available() and not triton_interpreted():
        return ("fastlora backend 'triton' cannot run here: no CUDA device, and the Triton interpreter is off (set "
                "TRITON_INTERPRET=1 before triton is imported to run the kernels on the CPU); use backend 'auto' or "
                "'torch'")
    return None


_INTERPRETER_BF16 = (
    "fastlora: bf16 inputs run on the PyTorch path, not on the Triton kernels: Triton's CPU interpreter "
    "(TRITON_INTERPRET=1) computes bf16 tl.dot wrongly (errors of 1e10). On a GPU the kernels run bf16."
)
_warned_bf16 = False


def use_triton(device: torch.device, dtype: torch.dtype) -> bool:
    """Resolve the backend for tensors on ``device`` with compute dtype ``dtype``.

    Raises where ``triton`` was asked for but cannot run, instead of silently falling back. The one exception:
    bf16 on Triton's CPU interpreter, whose bf16 ``tl.dot`` returns garbage, runs the PyTorch path (a warning
    says so, once per process).
    """
    global _warned_bf16
    backend = _backend if _backend is not None else get_backend()
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda" and dtype in KERNEL_DTYPES and triton_available()
    if dtype == torch.bfloat16 and device.type == "cpu" and triton_interpreted():
        if not _warned_bf16:
            _warned_bf16 = True
            warnings.warn(_INTERPRETER_BF16, stacklevel=3)
        return False
    kernel_device = device.type == "cuda" or (device.type == "cpu" and triton_interpreted())
    if not triton_available():
        raise RuntimeError(triton_unusable())
    if not kernel_device:
        raise RuntimeError(
            f"fastlora backend 'triton' cannot run on {device.type} tensors: the kernels need CUDA, or the CPU "
            "through the Triton interpreter (set TRITON_INTERPRET=1 before triton is imported)"
        )
    if dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"fastlora backend 'triton' supports input dtypes {[str(d) for d in KERNEL_DTYPES]}, got {dtype}; "
            "use backend 'torch' or 'auto' for it"
        )
    return True


# Triton's interpreter runs a kernel by patching triton.language globally for the duration of the launch: two
# threads interpreting kernels at once corrupt each other's launches ("x >= grid_dim[0]"). Interpreted kernel
# sections of every op hold this lock (re-entrant: an op's section may call another op's).
_INTERPRETER_LOCK = threading.RLock()


def kernel_section(use_triton: bool):
    """The context an op's kernel launches run in: serialized across threads under Triton's interpreter (CPU), free
    on a GPU."""
    if use_triton and triton_interpreted():
        return _INTERPRETER_LOCK
    return contextlib.nullcontext()


def _backend_from_env() -> str | None:
    """``$FASTLORA_BACKEND``, resolved at import so that the first compiled call does not change a global that
    dynamo guards on (which would recompile once). A bad value is left for get_backend to raise, naming it;
    'triton' where it cannot run is kept (the first call raises why) and warned about now, at import."""
    try:
        name = _check(os.environ.get("FASTLORA_BACKEND", "auto"), "FASTLORA_BACKEND")
    except ValueError:
        return None
    reason = triton_unusable() if name == "triton" else None
    if reason:
        warnings.warn(f"FASTLORA_BACKEND=triton: {reason}", RuntimeWarning, stacklevel=2)
    return name


_backend = _backend_from_env()
