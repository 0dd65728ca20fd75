"""Backend selection: which implementation `lora_linear` runs.

``auto`` (the default) runs the Triton kernels on CUDA tensors of a kernel dtype (fp16, bf16, fp32) and the
pure-PyTorch path everywhere else; ``torch`` always runs the pure-PyTorch path; ``triton`` always runs the
kernels and fails loudly where they cannot run. The environment variable ``FASTLORA_BACKEND`` sets the
initial choice.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_backend: str | None = None  # None: not chosen yet, read FASTLORA_BACKEND


def _check(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def set_backend(name: str) -> None:
    """Choose the implementation: ``"auto"``, ``"torch"`` or ``"triton"``."""
    global _backend
    _backend = _check(name, "backend")


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


def use_triton(device: torch.device, dtype: torch.dtype) -> bool:
    """Resolve the backend for tensors on ``device`` with compute dtype ``dtype``.

    Raises where ``triton`` was asked for but cannot run, instead of silently falling back.
    """
    backend = _backend if _backend is not None else get_backend()
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda" and dtype in KERNEL_DTYPES and triton_available()
    kernel_device = device.type == "cuda" or (device.type == "cpu" and triton_interpreted())
    if not triton_available():
        raise RuntimeError("fastlora backend 'triton' needs the triton package: pip install triton")
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


def _backend_from_env() -> str | None:
    """``$FASTLORA_BACKEND``, resolved at import so that the first compiled call does not change a global that
    dynamo guards on (which would recompile once). A bad value is left for get_backend to raise, naming it."""
    try:
        return _check(os.environ.get("FASTLORA_BACKEND", "auto"), "FASTLORA_BACKEND")
    except ValueError:
        return None


_backend = _backend_from_env()
