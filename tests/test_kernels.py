"""The Triton kernels (``fastlora.kernels``) against the pure-torch oracles.

On a machine without CUDA they run on CPU tensors through the Triton interpreter (set up by conftest.py): fp32
and fp16, tiny odd shapes. The tests marked ``gpu`` (bf16, large shapes, autotuning, int64 offsets) run only
with CUDA. Outputs the kernels allocate are NaN-poisoned (``poisoned_kernels``), so an unwritten element fails.
"""
from __future__ import annotations


import pytest
import torch

import fastlora
from fastlora import reference
import philox_reference
from helpers import assert_close, assert_low_precision_close, lora_inputs

kernels = pytest.importorskip("fastlora.kernels.lora_linear")
from fastlora.kernels.dropout import dropout_keep_mask  # noqa: E402
from fastlora.kernels import common as kc  # noqa: E402
from fastlora.kernels import lora_configs as cfgs  # noqa: E402
from fastlora.kernels import lora_linear as kl  # noqa: E402
from fastlora.kernels import resources as res  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

pytestmark = pytest.mark.usefixtures("triton_backend", "poisoned_kernels")


@pytest.fixture(autouse=True)
def _fixed_configs(monkeypatch):
    """One fixed config per M class: on a GPU, autotuning every odd test shape would compile ~10x more kernels.
    The GPU tests below turn autotuning back on where they mean to test it."""
    monkeypatch.setenv("FASTLORA_AUTOTUNE", "0")

# (dtype, atol, rtol) for fp32 against the fp64 oracle; fp16 uses the low-precision rule plus this atol
FP32_TOL = (torch.float32, 2e-5, 2e-5)
LOW_ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _make(M, K, N, r, dtype, adapter_dtype=None, bias=True, seed=0, lead=None):
    return lora_inputs(M, K, N, r, dtype, adapter_dtype, bias, seed, device=DEVICE, lead=lead)


def _run(fn, x, weight, lora_A, lora_B, bias, grad, want_weight_grad, **kw):
    """Forward + backward of ``fn`` on leaf copies; returns y and the gradients (None where not asked)."""
    leaves = [x, weight, lora_A, lora_B, bias]
    leaves = [None if t is None else t.detach().clone().requires_grad_(i != 1 or want_weight_grad)
              for i, t in enumerate(leaves)]
    y = fn(*leaves, **kw)
    y.backward(grad)
    return y.detach(), [None if t is None else t.grad for t in leaves]


def _oracle(x, weight, lora_A, lora_B, bias, scaling, keep, p, dtype=torch.float64):
    def f(x, weight, lora_A, lora_B, bias):
        if keep is None:
            return reference.merged_lora_linear(x, weight, lora_A, lora_B, bias, scaling)
        return reference.unfused_lora_linear(x, weight, lora_A, lora_B, bias, scaling, keep_mask=keep, dropout_p=p)

    def cast(t):
        return None if t is None else t.to(dtype)

    return f, [cast(t) for t in (x, weight, lora_A, lora_B, bias)]


def _reference_mask(seed, shape, p, device=DEVICE):
    """The keep mask the kernels must use, from the independent Philox reference (not the kernels' helper)."""
    return torch.from_numpy(philox_reference.keep_mask(seed, shape, p)).to(device)


def _seed_of_next_call():
    """The seed fastlora.autograd will draw next (from torch's default CPU generator), without consuming it."""
    state = torch.random.get_rng_state()
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    torch.random.set_rng_state(state)
    return seed


CASES = [
    # M,   K,   N,   r,   dtype,          adapters,       bias,  p,   weight grad
    (37, 53, 29, 3, torch.float32, None, True, 0.0, True),
    (37, 53, 29, 3, torch.float32, None, True, 0.3, False),
    (5, 40, 24, 16, torch.float32, None, False, 0.0, False),  # small-M path: shrink fused into the GEMM
    (70, 67, 41, 1, torch.float16, torch.float32, True, 0.2, False),  # fp32 adapters on an fp16 base
    (1, 8, 9, 100, torch.float32, None, True, 0.0, True),  # M = 1, r = 100 (not a power of two)
    (33, 48, 36, 64, torch.float16, None, False, 0.0, False),
    (66, 40, 34, 130, torch.float32, None, True, 0.1, False),  # r > 128: rank chunks in every kernel
    (19, 31, 17, 128, torch.float16, torch.float32, True, 0.0, True),
]


@pytest.mark.parametrize("M,K,N,r,dtype,adt,bias,p,wgrad", CASES,
                         ids=[f"M{c[0]}-K{c[1]}-N{c[2]}-r{c[3]}-{str(c[4])[6:]}-{'b' if c[6] else 'nb'}-p{c[7]}"
                              for c in CASES])
def test_forward_and_every_gradient(M, K, N, r, dtype, adt, bias, p, wgrad):
    x, weight, lora_A, lora_B, b, grad = _make(M, K, N, r, dtype, adt, bias)
    scaling = 0.75
    seed = _seed_of_next_call()
    before = sum(kl.launch_counts.values())
    y, grads = _run(fastlora.lora_linear, x, weight, lora_A, lora_B, b, grad, wgrad, scaling=scaling, dropout_p=p)
    assert sum(kl.launch_counts.values()) > before, "the Triton kernels did not run"
    assert y.dtype == dtype

    keep = _reference_mask(seed, (M, K), p, x.device) if p > 0 else None
    f, ref_in = _oracle(x, weight, lora_A, lora_B, b, scaling, keep, p)
    y64, g64 = _run(f, *ref_in, grad.double(), wgrad)
    names = ["input", "weight", "lora_A", "lora_B", "bias"]
    if dtype == torch.float32:
        _, atol, rtol = FP32_TOL
        assert_close(y, y64, atol, rtol, "y")
        for name, g, e in zip(names, grads, g64):
            if e is None:
                assert g is None, name
                continue
            assert g.dtype == (lora_A.dtype if name.startswith("lora") else dtype), name
            assert_close(g, e, atol * max(1.0, e.abs().max().item()), rtol, f"d{name}")
    else:
        f16, ref16 = _oracle(x, weight, lora_A, lora_B, b, scaling, keep, p, dtype=dtype)
        y16, g16 = _run(f16, *ref16, grad, wgrad)
        atol = LOW_ATOL[dtype]
        assert_low_precision_close(y, y64, y16, atol * y64.abs().max().item(), "y")
        for name, g, e, t in zip(names, grads, g64, g16):
            if e is None:
                assert g is None, name
                continue
            assert g.dtype == (lora_A.dtype if name.startswith("lora") else dtype), name
            assert_low_precision_close(g, e, t, atol * max(1.0, e.abs().max().item()), f"d{name}")


def test_backward_uses_the_forwards_dropout_mask():
    """The gradients match the oracle built with the kernels' own mask for this seed, not another seed's."""
    M, K, N, r, p = 24, 36, 20, 5, 0.5
    x, weight, lora_A, lora_B, b, grad = _make(M, K, N, r, torch.float32)
    seed = _seed_of_next_call()
    y, grads = _run(fastlora.lora_linear, x, weight, lora_A, lora_B, b, grad, False, scaling=2.0, dropout_p=p)
    for s, should_match in ((seed, True), (seed + 1, False)):
        keep = _reference_mask(s, (M, K), p, x.device)
        f, ref_in = _oracle(x, weight, lora_A, lora_B, b, 2.0, keep, p)
        y64, g64 = _run(f, *ref_in, grad.double(), False)
        matches = all(torch.allclose(a.double(), e, atol=1e-4, rtol=1e-4)
                      for a, e in ((y, y64), (grads[0], g64[0]), (grads[2], g64[2]), (grads[3], g64[3])))
        assert matches == should_match, f"seed {s}: expected match={should_match}"


def test_dropout_mask_statistics_and_determinism():
    mask = dropout_keep_mask(123, (67, 301), 0.3, DEVICE)
    assert mask.dtype == torch.bool and mask.shape == (67, 301)
    assert abs(mask.float().mean().item() - 0.7) < 0.02
    # every column phase of the four-words-per-Philox-call layout keeps at the same rate
    for phase in range(4):
        assert abs(mask[:, phase::4].float().mean().item() - 0.7) < 0.04, phase
    assert torch.equal(mask, dropout_keep_mask(123, (67, 301), 0.3, DEVICE))
    other = dropout_keep_mask(124, (67, 301), 0.3, DEVICE)
    assert 0.5 < (mask == other).float().mean().item() < 0.66  # independent masks agree ~ 0.7² + 0.3²
    # the mask of a sub-shape is the top-left block of the mask: it is a function of (seed, row, column) only
    assert torch.equal(dropout_keep_mask(123, (20, 45), 0.3, DEVICE), mask[:20, :45])
    assert dropout_keep_mask(5, (3, 4), 0.0, DEVICE).all()


def test_empty_batch_launches_nothing_and_gives_zero_grads():
    K, N, r = 12, 10, 3
    x, weight, lora_A, lora_B, b, _ = _make(0, K, N, r, torch.float32)
    before = sum(kl.launch_counts.values())
    y, grads = _run(fastlora.lora_linear, x, weight, lora_A, lora_B, b, torch.zeros(0, N, device=DEVICE), True,
                    dropout_p=0.1)
    assert sum(kl.launch_counts.values()) == before
    assert y.shape == (0, N)
    assert grads[0].shape == (0, K)
    for g, shape in zip(grads[1:], [(N, K), (r, K), (N, r), (N,)]):
        assert g.shape == shape and torch.equal(g, torch.zeros_like(g))


def test_3d_input():
    x, weight, lora_A, lora_B, b, grad = _make(0, 20, 18, 4, torch.float32, lead=(3, 7))
    y, grads = _run(fastlora.lora_linear, x, weight, lora_A, lora_B, b, grad, False, scaling=0.5)
    f, ref_in = _oracle(x, weight, lora_A, lora_B, b, 0.5, None, 0.0)
    y64, g64 = _run(f, *ref_in, grad.double(), False)
    assert y.shape == (3, 7, 18)
    assert_close(y, y64, 2e-5, 2e-5, "y")
    for name, i in (("input", 0), ("lora_A", 2), ("lora_B", 3), ("bias", 4)):
        assert_close(grads[i], g64[i], 2e-5, 2e-5, f"d{name}")


def test_non_contiguous_inputs_at_kernel_level():
    """Strided x, grad_y, weight and adapters go straight to the kernels: same results as the torch math."""
    M, K, N, r, p, seed = 21, 26, 19, 6, 0.25, 99
    g = torch.Generator().manual_seed(3)
    x = torch.randn(K, M, generator=g).t()  # (M, K) with strides (1, M)
    weight = torch.randn(2 * N, K, generator=g)[::2]  # every other row
    lora_A = torch.randn(K, r, generator=g).t()
    lora_B = torch.randn(r, N, generator=g).t()
    bias = torch.randn(2 * N, generator=g)[::2]
    grad_y = torch.randn(N, M, generator=g).t()
    x, weight, lora_A, lora_B, bias, grad_y = (t.to(DEVICE) for t in (x, weight, lora_A, lora_B, bias, grad_y))
    assert not x.is_contiguous() and not grad_y.is_contiguous()

    y, h = kernels.lora_forward(x, weight, lora_A, lora_B, bias, 1.5, p, seed)
    keep = _reference_mask(seed, (M, K), p)
    xd = x * keep / (1 - p)
    assert_close(h, xd @ lora_A.t(), 1e-5, 1e-5, "h")
    assert_close(y, reference.unfused_lora_linear(x, weight, lora_A, lora_B, bias, 1.5, keep, p), 1e-5, 1e-5, "y")

    dx, dW, dA, dB, dbias = kernels.lora_backward(grad_y, x, weight, lora_A, lora_B, h, 1.5, p, seed,
                                                  True, True, True, True, True)
    dh = 1.5 * grad_y @ lora_B
    assert_close(dx, grad_y @ weight + (dh @ lora_A) * keep / (1 - p), 1e-5, 1e-5, "dx")
    assert_close(dW, grad_y.t() @ x, 1e-5, 1e-5, "dW")
    assert_close(dA, dh.t() @ xd, 1e-5, 1e-5, "dA")
    assert_close(dB, 1.5 * grad_y.t() @ h, 1e-5, 1e-5, "dB")
    assert_close(dbias, grad_y.sum(0), 1e-5, 1e-5, "dbias")


def test_gradients_not_asked_for_are_none():
    x, weight, lora_A, lora_B, b, grad = _make(9, 16, 12, 2, torch.float32)
    y, h = kernels.lora_forward(x, weight, lora_A, lora_B, b, 1.0, 0.0, 0)
    for needs in ([True, False, False, False, False], [False, False, False, True, False],
                  [False, False, True, False, True]):
        out = kernels.lora_backward(grad, x, weight, lora_A, lora_B, h, 1.0, 0.0, 0, *needs)
        assert [o is not None for o in out] == needs


def test_deterministic_mode_reads_dy_without_atomics(kernel_spy):
    """Deterministic mode with s = 2 and dropout: dB and dbias from cuBLAS / torch.sum (no atomics ran), and every
    gradient equals the float64 math with the reference mask (not just the default mode's kernels)."""
    M, K, N, r, s, p, seed = 40, 24, 22, 3, 2.0, 0.3, 31
    x, weight, lora_A, lora_B, b, grad = _make(M, K, N, r, torch.float32)
    y, h = kernels.lora_forward(x, weight, lora_A, lora_B, b, s, p, seed)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    kernel_spy.clear()
    try:
        det = kernels.lora_backward(grad, x, weight, lora_A, lora_B, h, s, p, seed, True, False, True, True, True)
    finally:
        torch.use_deterministic_algorithms(was)
    assert all(not a.get("NEED_DB") and not a.get("NEED_DBIAS") for a in kernel_spy.of("lora_grad_dy_kernel"))
    if not HAS_CUDA:
        assert kernel_spy.atomics == 0
    keep = _reference_mask(seed, (M, K), p).double()
    x64, w64, a64, b64, g64 = (t.double() for t in (x, weight, lora_A, lora_B, grad))
    xd = x64 * keep / (1 - p)
    dh = s * g64 @ b64
    expected = [g64 @ w64 + (dh @ a64) * keep / (1 - p), None, dh.t() @ xd, s * g64.t() @ (xd @ a64.t()), g64.sum(0)]
    for name, a, e in zip(["dx", "dW", "dA", "dB", "dbias"], det, expected):
        assert (a is None) == (e is None), name
        if e is not None:
            assert_close(a, e, 1e-5 * max(1.0, e.abs().max().item()), 1e-5, name)


@pytest.mark.parametrize("M", [7, 100])
def test_inference_saves_nothing_and_matches(M):
    """no_grad: one op that stores no h; M <= 64 takes the single-launch path (shrink fused into the GEMM)."""
    x, weight, lora_A, lora_B, b, _ = _make(M, 40, 30, 8, torch.float16, torch.float32)
    for t in (x, lora_A, lora_B):
        t.requires_grad_(True)
    before = dict(kl.launch_counts)
    with torch.no_grad():
        y = fastlora.lora_linear(x, weight, lora_A, lora_B, b, scaling=2.0)
    assert y.grad_fn is None
    launched = {k: v - before.get(k, 0) for k, v in kl.launch_counts.items() if v - before.get(k, 0)}
    assert launched == ({"gemm_lora": 1} if M <= kl.FUSED_SHRINK_MAX_M else {"lora_shrink": 1, "gemm_lora": 1})
    y_none, h = kernels.lora_forward(x.detach(), weight, lora_A.detach(), lora_B.detach(), b, 2.0, 0.0, 0,
                                     save_h=False)
    assert h is None
    y64 = reference.merged_lora_linear(*(t.detach().double() for t in (x, weight, lora_A, lora_B, b)), 2.0)
    y16 = reference.merged_lora_linear(x.detach(), weight, lora_A.detach(), lora_B.detach(), b, 2.0)
    assert_low_precision_close(y, y64, y16, 2e-3 * y64.abs().max().item(), "y")
    assert torch.equal(y, y_none)


def test_saved_h_has_the_contract_dtype_and_value():
    for dtype in (torch.float32, torch.float16):
        for M in (5, 90):  # fused small-M path and separate shrink kernel
            x, weight, lora_A, lora_B, b, _ = _make(M, 33, 20, 5, dtype)
            y, h = kernels.lora_forward(x, weight, lora_A, lora_B, b, 1.0, 0.0, 0, save_h=True)
            assert h.dtype == reference.h_dtype(dtype) and h.shape == (M, 5)
            assert_close(h, x.double() @ lora_A.double().t(), 2e-3 if dtype == torch.float16 else 1e-5, 1e-3, "h")


def test_kernels_really_run(monkeypatch):
    """With the torch fallback made to raise, the op still works: the Triton path is the one running."""
    def boom(*args, **kwargs):
        raise AssertionError("fallback called")

    monkeypatch.setattr(reference, "lora_forward", boom)
    monkeypatch.setattr(reference, "lora_backward", boom)
    x, weight, lora_A, lora_B, b, grad = _make(70, 20, 18, 4, torch.float32)
    before = dict(kl.launch_counts)
    _run(fastlora.lora_linear, x, weight, lora_A, lora_B, b, grad, False, dropout_p=0.1)
    launched = {k for k, v in kl.launch_counts.items() if v > before.get(k, 0)}
    assert launched == {"lora_shrink", "gemm_lora", "lora_grad_dy", "lora_grad_a"}


def test_kernel_entry_points_reject_bad_dtypes():
    x, weight, lora_A, lora_B, b, _ = _make(4, 8, 8, 2, torch.float32)
    with pytest.raises(TypeError, match="float64"):
        kernels.lora_forward(x.double(), weight.double(), lora_A, lora_B, None, 1.0, 0.0, 0)
    with pytest.raises(TypeError, match="weight"):
        kernels.lora_forward(x, weight.half(), lora_A, lora_B, None, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="2-D"):
        kernels.lora_forward(x[None], weight, lora_A, lora_B, None, 1.0, 0.0, 0)


def test_autotune_pruning_keeps_valid_configs():
    """The prune hooks never return an empty list and respect the small/large-M split and the smem budget."""
    for esize_dtype in (torch.float16, torch.float32):
        a = torch.empty(1, dtype=esize_dtype)
        for m in (16, 64, 128, 16384):
            for lod in (False, True):
                for rb in (16, 32):
                    args = {"M_BUCKET": m, "a_ptr": a, "K": 4096}
                    kept = res.prune_gemm_lora(cfgs.GEMM_CONFIGS, args, LO_DROPOUT=lod, R_BLOCK=rb)
                    assert kept
                    assert len(res.prune_gemm_lora(cfgs.GEMM_CONFIGS, {**args, "K": 0}, LO_DROPOUT=lod, R_BLOCK=rb)) == 1
                    assert all(c.kwargs["BLOCK_M"] <= max(16, m) for c in kept)
                    assert all(c.fastlora_small_m == (m <= kl.FUSED_SHRINK_MAX_M) for c in kept)
    for configs, hook in ((cfgs.SHRINK_CONFIGS, res.prune_lora_shrink), (cfgs.DY_CONFIGS, res.prune_lora_grad_dy),
                          (cfgs.GRAD_A_CONFIGS, res.prune_lora_grad_a)):
        for m in (16, 4096):
            for rb in (16, 64, 128):
                assert hook(configs, {"M_BUCKET": m}, R_BLOCK=rb)
    assert [kc.m_bucket(m) for m in (1, 16, 17, 1000)] == [16, 16, 32, 1024]
    assert [kc.r_block(r, cfgs.R_CHUNK_MAX) for r in (1, 3, 16, 17, 100, 128, 130)] == [16, 16, 16, 32, 128, 128, 128]


# ---------------------------------------------------------------------------------------------------------
# GPU only: bf16, large shapes, autotuning on, int64 offsets. Run by benchmarks/gpu_check.sh.
# ---------------------------------------------------------------------------------------------------------

GPU_CASES = [
    # M,     K,    N,    r,   dtype,          p,    autotune (compiling every config costs ~1 min per case), base GEMM
    # the autotuned case has no bias: absent outputs must not alias real tensors while the autotuner resets them
    # (fp32 and fp16 also run on the GPU through the small tests above)
    (4096, 4096, 4096, 16, torch.bfloat16, 0.1, True, "triton"),
    (16384, 1024, 2048, 128, torch.bfloat16, 0.0, False, "triton"),
    (2048, 8192, 8192, 64, torch.bfloat16, 0.05, False, "triton"),
    (3001, 1000, 1537, 7, torch.bfloat16, 0.0, False, "triton"),
    (48, 4096, 4096, 16, torch.bfloat16, 0.0, False, "triton"),
    (4096, 4096, 4096, 16, torch.bfloat16, 0.1, False, "cublas"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N,r,dtype,p,autotune,base", GPU_CASES)
def test_gpu_large_shapes(M, K, N, r, dtype, p, autotune, base, monkeypatch):
    monkeypatch.setenv("FASTLORA_AUTOTUNE", "1" if autotune else "0")
    monkeypatch.setenv("FASTLORA_BASE_GEMM", base)
    x, weight, lora_A, lora_B, b, grad = _make(M, K, N, r, dtype, torch.float32, bias=not autotune)
    seed = _seed_of_next_call()
    y, grads = _run(fastlora.lora_linear, x, weight, lora_A, lora_B, b, grad, False, scaling=2.0, dropout_p=p)
    keep = _reference_mask(seed, (M, K), p, x.device) if p > 0 else None
    f, ref_in = _oracle(x, weight, lora_A, lora_B, b, 2.0, keep, p)
    y64, g64 = _run(f, *ref_in, grad.double(), False)
    f_same, ref_same = _oracle(x, weight, lora_A, lora_B, b, 2.0, keep, p, dtype=dtype)
    y_same, g_same = _run(f_same, *ref_same, grad, False)
    atol = LOW_ATOL.get(dtype, 1e-4)
    assert_low_precision_close(y, y64, y_same, atol * y64.abs().max().item(), "y")
    for name, i in (("input", 0), ("lora_A", 2), ("lora_B", 3), ("bias", 4)):
        if g64[i] is not None:
            assert_low_precision_close(grads[i], g64[i], g_same[i], atol * g64[i].abs().max().item(), f"d{name}")


@pytest.mark.gpu
def test_gpu_int64_offsets(monkeypatch):
    """M·K > 2³¹ elements: every row offset must be computed in int64 (needs ~20 GB of GPU memory)."""
    M, K, N, r, p = 2**19 + 3, 4100, 64, 16, 0.1  # M·K ≈ 2.15e9 > 2³¹
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs ~24 GB of free GPU memory")
    monkeypatch.setenv("FASTLORA_AUTOTUNE", "0")  # one fixed config is enough to check the offsets
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
    lora_A = torch.randn(r, K, device="cuda") * K**-0.5
    lora_B = torch.randn(N, r, device="cuda")
    seed = 777
    y, h = kernels.lora_forward(x, weight, lora_A, lora_B, None, 1.0, p, seed)
    grad = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    dx, _, dA, dB, _ = kernels.lora_backward(grad, x, weight, lora_A, lora_B, h, 1.0, p, seed,
                                             True, False, True, True, False)
    # check the last rows, whose element offsets are past 2³¹, against the torch math on those rows
    tail = slice(M - 5, M)
    words = philox_reference.words(seed, torch.arange(M - 5, M)[:, None].numpy(), torch.arange(K)[None, :].numpy())
    keep = torch.from_numpy(words >= philox_reference.threshold(p)).cuda()
    assert torch.equal(keep, dropout_keep_mask(seed, (M, K), p, "cuda")[tail])
    xd = x[tail].float() * keep / (1 - p)
    assert_close(h[tail], xd @ lora_A.t(), 5e-2, 2e-2, "h tail")
    y_ref = x[tail].float() @ weight.float().t() + (xd @ lora_A.t()) @ lora_B.t()
    assert_close(y[tail], y_ref, 0.1, 2e-2, "y tail")
    dh = grad[tail].float() @ lora_B
    dx_ref = grad[tail].float() @ weight.float() + (dh @ lora_A) * keep / (1 - p)
    assert_close(dx[tail], dx_ref, 0.1, 2e-2, "dx tail")
    assert torch.isfinite(dA).all() and torch.isfinite(dB).all()


def test_nan_poisoning_helper_poisons_only_inside_the_block():
    from helpers import nan_poisoned_allocations

    with nan_poisoned_allocations():
        assert torch.empty(5).isnan().all()
        assert torch.empty_like(torch.zeros(2, 3)).isnan().all()
        assert torch.zeros(2).new_empty(4).isnan().all()
        assert (torch.empty(3, dtype=torch.int8) == -77).all()
        assert torch.zeros(3).eq(0).all()  # zero-initialised buffers (the atomics' targets) stay zero
    assert torch.empty is not None and not getattr(torch.empty, "__name__", "") == "poisoned"


CUBLAS_CASES = [CASES[1], CASES[3], (100, 40, 24, 16, torch.float32, None, False, 0.0, True)]


@pytest.mark.parametrize("case", CUBLAS_CASES, ids=["fp32-p0.3", "fp16-fp32adapters-p0.2", "largeM-p0"])
def test_cublas_base_gemm_composition(case, monkeypatch, kernel_spy):
    """FASTLORA_BASE_GEMM=cublas: the Triton kernels write bias + low-rank (masked in dX) terms and torch.addmm_
    adds the big GEMM onto them; same results. Every case here is above the fused small-M path (M > 64 or
    dropout), and the spy shows the Triton GEMM ran with an empty K loop, so the composition really ran."""
    monkeypatch.setenv("FASTLORA_BASE_GEMM", "cublas")
    assert kl.base_gemm() == "cublas"
    test_forward_and_every_gradient(*case)
    gemm = kernel_spy.of("gemm_lora_kernel")
    assert len(gemm) == 2 and all(a["K"] == 0 and not a["FUSE_SHRINK"] for a in gemm), kernel_spy.summary()


def test_base_gemm_setting_is_validated(monkeypatch):
    monkeypatch.setenv("FASTLORA_BASE_GEMM", "cutlass")
    with pytest.raises(ValueError, match="FASTLORA_BASE_GEMM"):
        kl.base_gemm()
