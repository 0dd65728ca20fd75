"""Every code path of the Triton kernels runs on CPU (through the interpreter), and each test PROVES the path it
is about ran, by spying on the kernel launches (``kernel_spy``: kernel names, arguments, constexprs such as
EVEN_K / HAS_DROPOUT / FUSE_SHRINK, and the atomic ops executed). Values are checked against a float64 oracle
whose dropout mask comes from the independent Philox reference (tests/philox_reference.py), never from the
kernels' own mask helper. Outputs the kernels allocate are NaN-poisoned, so an unwritten element fails.

Paths: split dA (rows over several programs) with dropout at M > 256; EVEN_K loops and masked K tails in the
shrink, the forward GEMM, the fused small-M GEMM and the dX GEMM (whose K is N); the cuBLAS composition at M
above the small-M threshold; deterministic mode (no atomics); the fused small-M path; rank chunks; fp16.
"""
from __future__ import annotations

import pytest
import torch

import fastlora
import philox_reference
from helpers import assert_close, assert_low_precision_close, lora_inputs, lora_oracle, run_leaves

kernels = pytest.importorskip("fastlora.kernels.lora_linear")
from fastlora.kernels import lora_linear as kl  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("triton_backend", "poisoned_kernels")


@pytest.fixture(autouse=True)
def _fixed_configs(monkeypatch):
    monkeypatch.setenv("FASTLORA_AUTOTUNE", "0")
    monkeypatch.delenv("FASTLORA_BASE_GEMM", raising=False)


def _inputs(M, K, N, r, dtype=torch.float32, adapter_dtype=None, bias=True, seed=0):
    return lora_inputs(M, K, N, r, dtype, adapter_dtype, bias, seed, device=DEVICE)


def _peek_seed():
    """The dropout seed fastlora.autograd draws next (torch's default generator), without consuming it."""
    state = torch.random.get_rng_state()
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    torch.random.set_rng_state(state)
    return seed


def _check(M, K, N, r, dtype=torch.float32, adapter_dtype=None, p=0.0, scaling=1.5, bias=True,
           trainable=(True, False, True, True, True), no_grad=False):
    """lora_linear on the kernels against the float64 oracle (mask from the Philox reference); returns y."""
    x, weight, lora_A, lora_B, b, grad = _inputs(M, K, N, r, dtype, adapter_dtype, bias)
    tensors = [x, weight, lora_A, lora_B, b]
    seed = _peek_seed()
    keep = torch.from_numpy(philox_reference.keep_mask(seed, (M, K), p)) if p > 0 else None
    if no_grad:
        with torch.no_grad():
            y = fastlora.lora_linear(x, weight, lora_A, lora_B, b, scaling=scaling, dropout_p=p)
        grads = [None] * 5
        trainable = (False,) * 5
    else:
        y, grads = run_leaves(fastlora.lora_linear, tensors, trainable, grad, scaling=scaling, dropout_p=p)
    y64, g64 = run_leaves(lora_oracle, [t.double() if t is not None else None for t in tensors], trainable,
                          grad.double(), scaling=scaling, keep=keep, p=p)
    names = ["dx", "dW", "dA", "dB", "dbias"]
    if dtype == torch.float32:
        assert_close(y, y64, 2e-5, 2e-5, "y")
        for name, g, e in zip(names, grads, g64):
            assert (g is None) == (e is None), name
            if e is not None:
                assert_close(g, e, 2e-5 * max(1.0, e.abs().max().item()), 2e-5, name)
    else:
        ys, gs = run_leaves(lora_oracle, tensors, trainable, grad, scaling=scaling, keep=keep, p=p, dtype=dtype)
        assert_low_precision_close(y, y64, ys, 2e-3 * y64.abs().max().item(), "y")
        for name, g, e, t in zip(names, grads, g64, gs):
            assert (g is None) == (e is None), name
            if e is not None:
                assert_low_precision_close(g, e, t, 2e-3 * max(1.0, e.abs().max().item()), name)
    return y


def test_split_dA_with_dropout_at_large_M(kernel_spy):
    """M = 600 > 256: dA's rows are split over several programs; each must key the mask by the absolute row."""
    M, K, N, r, p = 600, 40, 24, 4, 0.3
    _check(M, K, N, r, p=p, scaling=2.0, trainable=(True, False, True, True, False))
    (launch,) = kernel_spy.of("lora_grad_a_kernel")
    assert launch["HAS_DROPOUT"] is True
    assert launch["M"] == M and launch["rows_per_split"] < M, "dA did not split its rows"
    splits = -(-M // launch["rows_per_split"])
    assert splits >= 2, splits


def test_split_dA_without_dropout_fp16(kernel_spy):
    M, K, N, r = 520, 33, 20, 3
    _check(M, K, N, r, dtype=torch.float16, trainable=(False, False, True, False, False))
    (launch,) = kernel_spy.of("lora_grad_a_kernel")
    assert launch["HAS_DROPOUT"] is False and launch["rows_per_split"] < M


@pytest.mark.parametrize("K,N", [(64, 41), (53, 64), (48, 80)], ids=["evenK-maskedN", "maskedK-evenN", "K48-N80"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_even_k_and_masked_k_tails(K, N, p, kernel_spy):
    """K (forward GEMM and shrink) and N (the dX GEMM's reduction) each a multiple of 32 and not: the unmasked
    EVEN_K loop and the masked tail both run, in every kernel that has them. K = 48 is a multiple of 16 only."""
    M, r = 70, 5
    _check(M, K, N, r, p=p, trainable=(True, False, True, True, True))
    gemm = kernel_spy.of("gemm_lora_kernel")
    fwd = [a for a in gemm if a["K"] == K and a["N"] == N]
    dx = [a for a in gemm if a["K"] == N and a["N"] == K]
    assert fwd and dx, kernel_spy.summary()
    block_k = fwd[0]["BLOCK_K"]
    assert {a["EVEN_K"] for a in fwd} == {K % block_k == 0}
    assert {a["EVEN_K"] for a in dx} == {N % dx[0]["BLOCK_K"] == 0}
    (shrink,) = kernel_spy.of("lora_shrink_kernel")
    assert shrink["EVEN_K"] == (K % shrink["BLOCK_K"] == 0) and shrink["HAS_DROPOUT"] == (p > 0)
    assert {dx[0]["LO_DROPOUT"]} == {p > 0}


def test_both_k_loops_ran_somewhere(kernel_spy):
    """Across one even and one odd problem, every kernel with a K loop ran both EVEN_K variants."""
    _check(70, 64, 41, 5, trainable=(True, False, True, True, False))
    _check(8, 128, 41, 16, trainable=(True, False, True, True, False))  # the fused small-M GEMM with EVEN_K
    _check(70, 53, 64, 5, trainable=(True, False, True, True, False))
    _check(8, 53, 41, 16, trainable=(True, False, True, True, False))
    for name in ("gemm_lora_kernel", "lora_shrink_kernel"):
        assert kernel_spy.values(name, "EVEN_K") == {True, False}, (name, kernel_spy.summary())
    fused = [a for a in kernel_spy.of("gemm_lora_kernel") if a["FUSE_SHRINK"]]
    assert {a["EVEN_K"] for a in fused} == {True, False}


@pytest.mark.parametrize("dtype,p", [(torch.float32, 0.0), (torch.float32, 0.25), (torch.float16, 0.1)])
def test_cublas_composition_at_large_M(dtype, p, kernel_spy, monkeypatch):
    """FASTLORA_BASE_GEMM=cublas with M above the fused small-M threshold: the Triton GEMM runs with an empty K
    loop (it writes only bias + the low-rank term) and torch's addmm_ adds x@Wᵀ (forward) and dY@W (dX)."""
    monkeypatch.setenv("FASTLORA_BASE_GEMM", "cublas")
    M = kl.FUSED_SHRINK_MAX_M + 36
    K, N, r = 45, 38, 6
    addmm_calls = []
    original = torch.Tensor.addmm_

    def spy(self, *args, **kwargs):
        addmm_calls.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "addmm_", spy)
    _check(M, K, N, r, dtype=dtype, p=p, trainable=(True, False, True, True, True))
    gemm = kernel_spy.of("gemm_lora_kernel")
    assert len(gemm) == 2 and all(a["FUSE_SHRINK"] is False for a in gemm), kernel_spy.summary()
    assert [a["K"] for a in gemm] == [0, 0], "the Triton GEMM still ran the base GEMM's K loop"
    assert (M, N) in addmm_calls and (M, K) in addmm_calls, addmm_calls


@pytest.mark.parametrize("base_gemm", ["triton", "cublas"])
def test_base_gemm_setting_at_small_M(base_gemm, kernel_spy, monkeypatch):
    """FASTLORA_BASE_GEMM applies at small M too: ``triton`` runs the single fused launch (shrink in the K loop),
    ``cublas`` the shrink, a Triton pass without the K loop (K = 0) and cuBLAS for x @ Wᵀ."""
    monkeypatch.setenv("FASTLORA_BASE_GEMM", base_gemm)
    _check(9, 40, 30, 8, no_grad=True)
    (launch,) = kernel_spy.of("gemm_lora_kernel")
    if base_gemm == "triton":
        assert launch["FUSE_SHRINK"] is True and launch["K"] == 40, kernel_spy.summary()
        assert not kernel_spy.of("lora_shrink_kernel"), kernel_spy.summary()
    else:
        assert launch["FUSE_SHRINK"] is False and launch["K"] == 0, kernel_spy.summary()
        assert kernel_spy.of("lora_shrink_kernel"), kernel_spy.summary()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deterministic_mode_no_atomics_s_ne_1_with_dropout(dtype, kernel_spy):
    """torch.use_deterministic_algorithms(True): the dY pass computes no dB / dbias (no atomics at all), they
    come from cuBLAS / torch.sum, and the values, with s = 2.5 and dropout on, are the float64 oracle's."""
    M, K, N, r, p = 100, 36, 40, 6, 0.3
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _check(M, K, N, r, dtype=dtype, p=p, scaling=2.5, trainable=(True, False, True, True, True))
    finally:
        torch.use_deterministic_algorithms(was)
    dy = kernel_spy.of("lora_grad_dy_kernel")
    assert dy and all(not a.get("NEED_DB") and not a.get("NEED_DBIAS") for a in dy), kernel_spy.summary()
    if not torch.cuda.is_available():
        assert kernel_spy.atomics == 0, f"{kernel_spy.atomics} atomic ops in deterministic mode"


def test_default_mode_uses_the_atomics_the_spy_counts(kernel_spy):
    """The counterpart of the deterministic test: the spy does see the dY kernel's atomics when they are used."""
    _check(100, 36, 40, 6, p=0.3, scaling=2.5, trainable=(True, False, True, True, True))
    dy = kernel_spy.of("lora_grad_dy_kernel")
    assert all(a.get("NEED_DB", True) and a.get("NEED_DBIAS", True) for a in dy)
    if not torch.cuda.is_available():
        assert kernel_spy.atomics > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_small_M_path_training_and_inference(dtype, kernel_spy):
    """M <= 64, no dropout, r <= 64: one GEMM launch accumulates h in its K loop and stores it (training) from the
    first column tile; N spans several column tiles."""
    M, K, N, r = 11, 37, 70, 16
    _check(M, K, N, r, dtype=dtype, trainable=(True, False, True, True, True))
    fwd = [a for a in kernel_spy.of("gemm_lora_kernel") if a["FUSE_SHRINK"]]
    assert len(fwd) == 1 and fwd[0]["STORE_L"] is True and fwd[0]["M"] == M
    assert not kernel_spy.of("lora_shrink_kernel")
    kernel_spy.clear()
    _check(M, K, N, r, dtype=dtype, no_grad=True)
    assert kernel_spy.names() == ["gemm_lora_kernel"]
    (launch,) = kernel_spy.of("gemm_lora_kernel")
    assert launch["FUSE_SHRINK"] is True and launch["STORE_L"] is False


def test_small_M_with_dropout_takes_the_separate_shrink(kernel_spy):
    _check(11, 37, 30, 16, p=0.4, trainable=(True, False, True, True, True))
    (shrink,) = kernel_spy.of("lora_shrink_kernel")
    assert shrink["HAS_DROPOUT"] is True
    assert not any(a["FUSE_SHRINK"] for a in kernel_spy.of("gemm_lora_kernel"))


def test_rank_chunks_above_128(kernel_spy):
    """r = 150 > 128: shrink, dY and dA run several rank chunks (grid axis), the GEMM epilogue loops over r."""
    _check(40, 24, 20, 150, p=0.2, scaling=0.5, trainable=(True, False, True, True, True))
    for name in ("lora_shrink_kernel", "lora_grad_dy_kernel", "lora_grad_a_kernel"):
        (launch,) = kernel_spy.of(name)
        assert launch["R"] == 150 and launch["R_BLOCK"] < 150, name


def test_every_kernel_and_flag_value_runs(kernel_spy):
    """A compact sweep: each kernel and each value of each compile-time flag is launched at least once."""
    _check(70, 64, 41, 5, p=0.2, trainable=(True, True, True, True, True))
    _check(9, 53, 40, 4, trainable=(True, False, True, True, False))
    _check(9, 53, 40, 4, no_grad=True, bias=False)
    seen = {name: {} for name in set(kernel_spy.names())}
    for name, args in kernel_spy.launches:
        for k, v in args.items():
            if isinstance(v, bool):
                seen[name].setdefault(k, set()).add(v)
    assert set(seen) == {"lora_shrink_kernel", "gemm_lora_kernel", "lora_grad_dy_kernel", "lora_grad_a_kernel"}
    assert seen["gemm_lora_kernel"]["FUSE_SHRINK"] == {True, False}
    assert seen["gemm_lora_kernel"]["STORE_L"] == {True, False}
    assert seen["gemm_lora_kernel"]["HAS_BIAS"] == {True, False}
    assert seen["gemm_lora_kernel"]["LO_DROPOUT"] == {True, False}
    assert seen["lora_grad_dy_kernel"]["NEED_DB"] == {True}
