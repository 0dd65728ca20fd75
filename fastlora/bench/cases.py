"""What is measured: one ``Case`` is a LoRA linear y = x Wᵀ + s·(drop(x) Aᵀ) Bᵀ with x (M, K), W (N, K) frozen,
A (r, K) and B (N, r) trained, run in one mode:

* ``forward``: the training forward (grad enabled, x requires grad, the graph and saved tensors are built);
* ``forward+backward``: that forward, then ``torch.autograd.grad`` of x, A and B (W frozen, so no dW);
* ``inference``: ``torch.no_grad()``, dropout off.

Also here: the shape presets, the grids of the CLI and of the pytest-benchmark suite, and the FLOP count.
"""
from __future__ import annotations

import dataclasses

import torch

MODES = ("forward", "forward+backward", "inference")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _grid(Ms, KNs):
    return tuple((M, K, K) for K in KNs for M in Ms)


# Shapes are (M, K, N): x (M, K) → y (M, N).
SHAPE_PRESETS = {
    # LLM-sized square projections: K = N ∈ {4096, 5120, 8192} × M ∈ {2048, 4096, 8192} tokens (GPU, bf16)
    "llm-grid": _grid((2048, 4096, 8192), (4096, 5120, 8192)),
    # LLaMA MLP up/gate (4096→14336) and down (14336→4096) projections, 4096 tokens
    "llama-mlp": ((4096, 4096, 14336), (4096, 14336, 4096)),
    # decode: a few tokens through a 4096×4096 projection
    "decode": ((1, 4096, 4096), (16, 4096, 4096), (64, 4096, 4096)),
    # one square 2048×2048 projection of 2048 tokens: the CPU fallback's reference shape
    "square-2048": ((2048, 2048, 2048),),
    # scaled-down CPU grids (fp32)
    "cpu": _grid((256, 512, 1024, 2048), (1024, 2048)),
    "cpu-quick": _grid((256, 1024), (1024,)),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark point. ``scaling`` is lora_alpha / r with PEFT's common alpha = 2r."""

    M: int
    K: int
    N: int
    r: int = 16
    dtype: str = "float32"
    dropout: float = 0.0
    mode: str = "forward+backward"
    device: str = "cpu"
    bias: bool = False
    scaling: float = 2.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.dtype not in DTYPE_NAMES.values():
            raise ValueError(f"dtype must be one of {sorted(set(DTYPE_NAMES.values()))}, got {self.dtype!r}")
        if min(self.M, self.K, self.N, self.r) < 1:
            raise ValueError(f"M, K, N and r must be >= 1, got M={self.M} K={self.K} N={self.N} r={self.r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def training(self) -> bool:
        return self.mode != "inference"

    @property
    def shape(self) -> str:
        return f"{self.M}x{self.K}x{self.N}"

    def label(self) -> str:
        return f"{self.mode} M={self.M} K={self.K} N={self.N} r={self.r} p={self.dropout:g} {self.dtype}"


def lora_flops(case: Case, provider: str) -> float:
    """Useful FLOPs of one step: the LoRA layer's own work (the base GEMMs plus the low-rank products),
    whatever extra a provider spends (naive's B@A and its gradient count for nothing). ``base`` is credited
    with the base GEMMs only."""
    M, K, N, r = case.M, case.K, case.N, case.r
    base_fwd = 2.0 * M * N * K
    lora_fwd = 2.0 * M * K * r + 2.0 * M * N * r
    if case.mode == "forward+backward":
        base_total = 2 * base_fwd  # forward + dX (W frozen: no dW)
        lora_total = 3 * lora_fwd  # forward; dh and dB; dh@A and dA
    else:
        base_total, lora_total = base_fwd, lora_fwd
    return base_total if provider == "base" else base_total + lora_total


def parse_shapes(spec: str) -> list[tuple[int, int, int]]:
    """'MxKxN' tokens and preset names, comma-separated: '2048x4096x4096,decode'."""
    shapes = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token in SHAPE_PRESETS:
            shapes.extend(SHAPE_PRESETS[token])
            continue
        parts = token.lower().split("x")
        try:
            M, K, N = (int(v) for v in parts)
        except ValueError:
            raise ValueError(
                f"bad shape {token!r}: use MxKxN (x is (M, K), y is (M, N)), e.g. 2048x4096x4096, or a preset: "
                f"{', '.join(SHAPE_PRESETS)}") from None
        if min(M, K, N) < 1:
            raise ValueError(f"bad shape {token!r}: M, K and N must be >= 1")
        shapes.append((M, K, N))
    if not shapes:
        raise ValueError("no shapes given")
    return list(dict.fromkeys(shapes))


def make_cases(shapes, ranks, dropouts, modes, dtype: str, device: str, bias: bool = False) -> list[Case]:
    """The cross product, skipping inference with dropout > 0 (dropout is off in inference: a duplicate)."""
    cases = []
    for mode in modes:
        for p in dropouts:
            if mode == "inference" and p > 0:
                continue
            for r in ranks:
                for M, K, N in shapes:
                    cases.append(Case(M, K, N, r=r, dtype=dtype, dropout=p, mode=mode, device=device, bias=bias))
    return cases


SUITE_GRIDS = ("quick", "full")


def default_suite_grid(device: str) -> str:
    """The pytest-benchmark suite's grid when none is asked for: the full grid on CUDA, the quick one
    (about two minutes on 2 CPU cores) elsewhere."""
    return "full" if torch.device(device).type == "cuda" else "quick"


def suite_cases(device: str, dtype: str | None = None, grid: str | None = None) -> list[Case]:
    """The pytest-benchmark suite's cases, r = 16 unless said.

    CUDA (bf16): ``quick`` is the llm-grid with dropout 0 and 0.1; ``full`` adds r = 64, the LLaMA MLP shapes
    and the decode shapes. CPU (fp32): ``quick`` is cpu-quick (M ∈ {256, 1024}, K = N = 1024) with dropout 0
    and 0.1; ``full`` adds the square-2048 shape.
    """
    grid = grid or default_suite_grid(device)
    if grid not in SUITE_GRIDS:
        raise ValueError(f"grid must be one of {SUITE_GRIDS}, got {grid!r}")
    cuda = torch.device(device).type == "cuda"
    dtype = dtype or ("bfloat16" if cuda else "float32")
    if cuda:
        ranks = [16] if grid == "quick" else [16, 64]
        cases = make_cases(SHAPE_PRESETS["llm-grid"], ranks, [0.0, 0.1], MODES, dtype, device)
        if grid == "full":
            cases += make_cases(SHAPE_PRESETS["llama-mlp"], ranks, [0.0, 0.1], MODES, dtype, device)
            cases += make_cases(SHAPE_PRESETS["decode"], ranks, [0.0], MODES, dtype, device)
        return cases
    shapes = SHAPE_PRESETS["cpu-quick"] + (SHAPE_PRESETS["square-2048"] if grid == "full" else ())
    return make_cases(shapes, [16], [0.0, 0.1], MODES, dtype, device)
