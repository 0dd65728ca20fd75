"""Property-based tests: the interpreted kernels against the PyTorch oracle on randomly drawn problems.

Hypothesis draws shapes (1 to a few tiles, odd sizes), ranks (both sides of the fused small-M path's limit and
of the rank chunk), dtypes (fp32, fp16; fp32 adapters on fp16), dropout, bias, scaling, the base-GEMM
composition, and memory layouts (transposed views and row-sliced views, so strides are not the contiguous
ones), then checks the forward (y, h) and every gradient against fp64 autograd through ``reference``, with the
kernels' own dropout mask. Derandomized, few examples, tiny shapes: ~1 minute on 2 cores.
"""
from __future__ import annotations

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastlora import reference  # noqa: E402
from helpers import assert_close, assert_low_precision_close  # noqa: E402

kernels = pytest.importorskip("fastlora.kernels.lora_linear")
from fastlora.kernels.dropout import dropout_keep_mask  # noqa: E402
from fastlora.kernels import lora_linear as kl  # noqa: E402

pytestmark = [pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter lane (CPU tensors)"),
              pytest.mark.usefixtures("poisoned_kernels")]

# No shrinking: on the interpreter it would cost minutes; the failing draw is printed as drawn.
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``t`` under another memory layout: column-major, or a row slice of a wider buffer."""
    if how == "transposed":
        return t.t().contiguous().t()
    if how == "sliced":  # rows of a wider buffer: stride(0) > shape[1]
        wide = torch.full((t.shape[0], t.shape[1] + 3), float("nan"), dtype=t.dtype)
        wide[:, 1:1 + t.shape[1]] = t
        return wide[:, 1:1 + t.shape[1]]
    return t


# Each path of the launch helpers gets its own draws, so every one is reached whatever hypothesis picks.
PATHS = {
    # M <= 64, no dropout, r <= 64: the shrink rides in the GEMM's K loop (one launch)
    "small_m_fused": dict(M=[1, 2, 5, 16, 17, 33, 64], r=[1, 3, 16, 17, 64], p=[0.0], base=["triton"]),
    # the separate shrink kernel: dropout, or M > 64
    "shrink": dict(M=[1, 5, 65, 70, 100], r=[1, 2, 7, 33, 65], p=[0.0, 0.3], base=["triton"]),
    # r > 128: every rank kernel runs in chunks
    "rank_chunks": dict(M=[1, 9, 70], r=[129, 130], p=[0.0, 0.3], base=["triton", "cublas"]),
    # the cuBLAS composition of both large GEMMs
    "cublas": dict(M=[1, 5, 17, 65, 70], r=[1, 3, 16, 65], p=[0.0, 0.3], base=["cublas"]),
}


@st.composite
def problems(draw, path):
    c = PATHS[path]
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    return dict(
        M=draw(st.sampled_from(c["M"])), K=draw(st.integers(1, 40)), N=draw(st.integers(1, 40)),
        r=draw(st.sampled_from(c["r"])), dtype=dtype, adt=draw(st.sampled_from([dtype, torch.float32])),
        bias=draw(st.booleans()),
        p=draw(st.sampled_from(c["p"])),
        scaling=draw(st.sampled_from([0.5, 2.0])),
        base=draw(st.sampled_from(c["base"])),
        layouts=[draw(st.sampled_from(["contiguous", "transposed", "sliced"])) for _ in range(5)],
        seed=draw(st.integers(0, 2**31 - 2)),
        needs=draw(st.sampled_from([(True, True, True), (True, False, True), (False, True, False)])),
    )


def _tensors(pb):
    g = torch.Generator().manual_seed(pb["seed"] % 1000)
    M, K, N, r = pb["M"], pb["K"], pb["N"], pb["r"]

    def rnd(*shape, scale=1.0, dt=pb["dtype"]):
        return (torch.randn(*shape, generator=g) * scale).to(dt)

    x = rnd(M, K)
    w = rnd(N, K, scale=K**-0.5)
    a = rnd(r, K, scale=K**-0.5, dt=pb["adt"])
    b = rnd(N, r, scale=0.5, dt=pb["adt"])
    dy = rnd(M, N)
    x, w, a, b, dy = (_layout(t, how) for t, how in zip((x, w, a, b, dy), pb["layouts"]))
    bias = rnd(N) if pb["bias"] else None
    return x, w, a, b, bias, dy


def _oracle(pb, x, w, a, b, bias, dy, keep, dtype):
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in (x, w, a, b, bias)]
    y = reference.unfused_lora_linear(*leaves, pb["scaling"], keep_mask=keep, dropout_p=pb["p"])
    y.backward(dy.to(dtype))
    return y.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("path", list(PATHS))
def test_kernels_match_the_oracle_forward_and_backward(path):
    @SETTINGS
    @given(pb=problems(path))
    def prop(pb):
        _run_with_base(pb)

    prop()


def _run_with_base(pb):
    saved = os.environ.get("FASTLORA_BASE_GEMM")
    os.environ["FASTLORA_BASE_GEMM"] = pb["base"]
    try:
        _check(pb)
    finally:
        if saved is None:
            os.environ.pop("FASTLORA_BASE_GEMM", None)
        else:
            os.environ["FASTLORA_BASE_GEMM"] = saved


def _check(pb):
    x, w, a, b, bias, dy = _tensors(pb)
    p, s, seed = pb["p"], pb["scaling"], pb["seed"]
    needs_input, needs_A, needs_B = pb["needs"]
    y, h = kernels.lora_forward(x, w, a, b, bias, s, p, seed)
    dx, dW, dA, dB, dbias = kernels.lora_backward(dy, x, w, a, b, h, s, p, seed, needs_input, False, needs_A,
                                                  needs_B, bias is not None)
    assert dW is None and (dx is None) != needs_input and (dA is None) != needs_A and (dB is None) != needs_B

    keep = dropout_keep_mask(seed, x.shape, p, "cpu") if p > 0 else None
    y64, g64 = _oracle(pb, x, w, a, b, bias, dy, keep, torch.float64)
    xd = x.double() * keep / (1 - p) if keep is not None else x.double()
    h64 = xd @ a.double().t()
    got = {"y": y, "dx": dx, "dA": dA, "dB": dB, "dbias": dbias}
    ref = {"y": y64, "dx": g64[0], "dA": g64[2], "dB": g64[3], "dbias": g64[4]}
    assert y.dtype == pb["dtype"] and h.dtype == reference.h_dtype(pb["dtype"])
    if pb["dtype"] == torch.float32:
        assert_close(h, h64, 2e-5, 2e-5, "h")
        for name, t in got.items():
            if t is not None:
                assert_close(t, ref[name], 2e-5 * max(1.0, ref[name].abs().max().item()), 2e-5, name)
    else:
        assert_close(h, h64, 2e-3 * max(1.0, h64.abs().max().item()), 1e-3, "h")
        y16, g16 = _oracle(pb, x, w, a, b, bias, dy, keep, pb["dtype"])
        same = {"y": y16, "dx": g16[0], "dA": g16[2], "dB": g16[3], "dbias": g16[4]}
        for name, t in got.items():
            if t is not None:
                scale = max(1.0, ref[name].abs().max().item())
                assert_low_precision_close(t, ref[name], same[name].to(t.dtype), 2e-3 * scale, name)
    for name, t in (("dA", dA), ("dB", dB)):
        if t is not None:
            assert t.dtype == pb["adt"], name
