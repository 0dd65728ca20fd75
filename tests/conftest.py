"""Test setup shared by every test file.

Without CUDA, the Triton kernels run on the CPU through Triton's interpreter, which must be switched on before
anything imports triton: hence this block comes first. ``import torch`` does not import triton, so torch can be
asked whether CUDA is there.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Deterministic-mode tests call cuBLAS under torch.use_deterministic_algorithms(True), which raises on CUDA unless
# this is set before the first cuBLAS handle is made (harmless without CUDA).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py importable from every test file

import pytest  # noqa: E402

from helpers import nan_poisoned_allocations, spy_kernel_launches  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (bf16 kernels, large shapes, autotuning)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poisoned_kernels(monkeypatch):
    """Run ``fastlora.kernels``' entry points with NaN-filled ``torch.empty``-style allocations, so an output
    element that a kernel never writes shows up as NaN (the flash-linear-attention trick)."""
    from fastlora.kernels import lora_linear as kernels

    for name in ("lora_forward", "lora_backward"):
        fn = getattr(kernels, name)

        def wrapped(*args, _fn=fn, **kwargs):
            with nan_poisoned_allocations():
                return _fn(*args, **kwargs)

        monkeypatch.setattr(kernels, name, wrapped)
    yield


def _using_backend(name):
    """Run with fastlora's backend set to ``name``; the previous choice is restored after."""
    import fastlora
    from fastlora import backend

    saved = backend._backend
    fastlora.set_backend(name)
    try:
        yield name
    finally:
        backend._backend = saved


@pytest.fixture
def triton_backend():
    """Force the Triton kernels (on CPU tensors through the interpreter when CUDA is absent); restored after."""
    yield from _using_backend("triton")


@pytest.fixture
def torch_backend():
    """Force the pure-PyTorch path; restored after."""
    yield from _using_backend("torch")


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Each test twice: on the PyTorch path and on the Triton kernels (the interpreter on CPU)."""
    yield from _using_backend(request.param)


@pytest.fixture
def kernel_spy():
    """A ``helpers.KernelLaunches`` recording every Triton kernel launch (name, arguments, constexprs) and, under
    the interpreter, every atomic op of this test: the proof that a kernel path ran, and how."""
    pytest.importorskip("triton")
    with spy_kernel_launches() as rec:
        yield rec
