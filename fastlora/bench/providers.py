"""Who is measured: the providers, each computing the same LoRA linear on a ``Case``.

* ``fastlora``   ``fastlora.lora_linear`` (Triton kernels on CUDA, the factored torch fallback elsewhere);
* ``peft``       PEFT's unfused math ``base(x) + B(A(drop(x)))·s`` (``fastlora.reference.peft_lora_linear``);
* ``peft_layer`` the real ``peft.tuners.lora.Linear`` (when peft is installed);
* ``naive``      the seed notebook's ``W + s·B@A`` rebuilt every call (``fastlora.reference.merged_lora_linear``);
                 it cannot apply dropout, so with dropout > 0 it runs without: ``as_asked`` is False and the
                 report keeps that case out of its comparisons;
* ``base``       the frozen ``nn.Linear`` alone: the floor (no LoRA work, no dropout), not a competitor;
* ``compiled``   ``torch.compile`` of the unfused math.

Only fastlora's public op and ``fastlora.reference`` are used here; nothing from the model-level modules.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import fastlora
from fastlora import reference

from .cases import Case

PROVIDERS = ("fastlora", "peft", "peft_layer", "naive", "base", "compiled")
PEERS = tuple(p for p in PROVIDERS if p not in ("fastlora", "base"))  # competitors; base is the floor
DEFAULT_PROVIDERS = ("fastlora", "peft", "naive", "base")
FLOOR = "base"




def _cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        unit = {"K": 2**10, "M": 2**20}.get(text[-1], 1)
        return int(text.rstrip("KM")) * unit
    except (OSError, ValueError):
        return 32 * 2**20


# Display names of the providers (reports, plots)
NAMES = {"fastlora": "fastlora", "peft": "PEFT math", "peft_layer": "PEFT layer", "naive": "W+BA",
         "base": "frozen linear", "compiled": "compiled"}
SHORT = {**NAMES, "peft": "PEFT", "peft_layer": "layer"}  # terminal headers: "vs PEFT", "vs layer"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """A ready-to-time provider on one case. ``step()`` runs one iteration on the next pooled input and
    synchronizes before returning (``call()`` does not); ``forward(x)`` gives the output (for memory and
    correctness checks). ``as_asked`` is False where the provider could not run the case as specified (the
    W+BA reconstruction with dropout > 0 runs without dropout): such a timing is not comparable."""

    def __init__(self, case: Case, provider: str, fn: Callable, params: list, grad_inputs: Callable,
                 pool_x: list, pool_dy: list, dropout_applied: bool, note: str = ""):
        self.case, self.provider = case, provider
        self.fn, self.params = fn, params
        self.grad_inputs = grad_inputs  # x → the tensors torch.autograd.grad differentiates
        self.pool_x, self.pool_dy = pool_x, pool_dy
        self.dropout_applied, self.note = dropout_applied, note
        self.device = pool_x[0].device
        self._i = 0

    @property
    def as_asked(self) -> bool:
        return self.provider == FLOOR or self.dropout_applied or not (self.case.dropout > 0 and self.case.training)

    def forward(self, x):
        if self.case.mode == "inference":
            with torch.no_grad():
                return self.fn(x)
        return self.fn(x)

    def call(self) -> None:
        """One step on the next pooled input, without synchronizing (for CUDA-event timers)."""
        i = self._i = (self._i + 1) % len(self.pool_x)
        x = self.pool_x[i]
        if self.case.mode == "inference":
            with torch.no_grad():
                self.fn(x)
        elif self.case.mode == "forward":
            self.fn(x)
        else:
            y = self.fn(x)
            torch.autograd.grad(y, self.grad_inputs(x), self.pool_dy[i])

    def step(self) -> None:
        """One step, synchronized: what a host timer (pytest-benchmark, the CPU lane) may time."""
        self.call()
        sync(self.device)


def _peft_layer(case: Case, weight, bias, lora_A, lora_B):
    """The real peft.tuners.lora.Linear around a frozen nn.Linear holding ``weight``; adapters in the base dtype
    (``autocast_adapter_dtype=False``) and copied from lora_A / lora_B."""
    import torch.nn as nn
    from peft import LoraConfig, get_peft_model

    class _One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(case.K, case.N, bias=case.bias, device=weight.device, dtype=weight.dtype)

        def forward(self, x):
            return self.proj(x)

    holder = _One()
    with torch.no_grad():
        holder.proj.weight.copy_(weight)
        if bias is not None:
            holder.proj.bias.copy_(bias)
    config = LoraConfig(r=case.r, lora_alpha=case.scaling * case.r, lora_dropout=case.dropout,
                        target_modules=["proj"], bias="none")
    try:
        model = get_peft_model(holder, config, autocast_adapter_dtype=False)
    except TypeError:  # peft older than 0.12 has no autocast_adapter_dtype
        model = get_peft_model(holder, config)
    layer = model.base_model.model.proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        A.data = lora_A.detach().clone().to(A.device, weight.dtype)
        B.data = lora_B.detach().clone().to(B.device, weight.dtype)
    layer.train(case.training)
    return layer, [A, B]


def build_runner(provider: str, case: Case, *, seed: int = 0, pool_size: int | None = None) -> Runner:
    """Allocate the case's tensors on its device and wrap ``provider``'s call. Raises ImportError for
    ``peft_layer`` without peft."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    device, dtype = torch.device(case.device), case.torch_dtype
    M, K, N, r = case.M, case.K, case.N, case.r
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: fast for GPU-sized grids

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)

    weight = rand(N, K, scale=K ** -0.5)
    bias = rand(N, scale=0.1) if case.bias else None
    lora_A = rand(r, K, scale=K ** -0.5).requires_grad_(case.training)
    lora_B = rand(N, r, scale=0.1).requires_grad_(case.training)  # nonzero: every gradient is exercised
    s, p, training = case.scaling, case.dropout, case.training

    if pool_size is None:
        per_step = (M * K + (M * N if case.mode == "forward+backward" else 0)) * torch.finfo(dtype).bits // 8
        pool_size = min(16, max(2, math.ceil(2 * _cache_bytes(device) / max(per_step, 1))))
    pool_x = [rand(M, K).requires_grad_(training) for _ in range(pool_size)]
    pool_dy = [rand(M, N) for _ in range(pool_size)] if case.mode == "forward+backward" else [None] * pool_size

    params = [weight, lora_A, lora_B] + ([bias] if bias is not None else [])
    lora_inputs = lambda x: (x, lora_A, lora_B)  # noqa: E731
    dropout_applied = p > 0 and training
    note = ""

    if provider == "fastlora":
        def fn(x):
            return fastlora.lora_linear(x, weight, lora_A, lora_B, bias, scaling=s, dropout_p=p, training=training)
        grad_inputs = lora_inputs
    elif provider == "peft":
        def fn(x):
            return reference.peft_lora_linear(x, weight, lora_A, lora_B, bias, scaling=s, dropout_p=p,
                                              training=training)
        grad_inputs = lora_inputs
    elif provider == "compiled":
        import torch._dynamo as dynamo

        dynamo.reset()  # a fresh cache per case: static shapes, no recompile limit across a grid
        compiled = torch.compile(reference.peft_lora_linear, dynamic=False)

        def fn(x):
            return compiled(x, weight, lora_A, lora_B, bias, scaling=s, dropout_p=p, training=training)
        grad_inputs = lora_inputs
    elif provider == "naive":
        def fn(x):
            return reference.merged_lora_linear(x, weight, lora_A, lora_B, bias, scaling=s)
        grad_inputs = lora_inputs
        if dropout_applied:
            dropout_applied = False
            note = "W+BA cannot apply dropout: timed without it"
    elif provider == "base":
        def fn(x):
            return F.linear(x, weight, bias)
        grad_inputs = lambda x: (x,)  # noqa: E731
        dropout_applied = False
        if training:
            note = "frozen linear: no LoRA work, no dropout"
    else:  # peft_layer
        layer, (A, B) = _peft_layer(case, weight, bias, lora_A, lora_B)
        fn = layer
        params = params + [A, B] + [t for t in layer.parameters()]
        grad_inputs = lambda x: (x, A, B)  # noqa: E731
    return Runner(case, provider, fn, params, grad_inputs, pool_x, pool_dy, dropout_applied, note)


def provider_available(provider: str) -> tuple[bool, str]:
    """(available, why not) for a provider on this machine, without building anything."""
    if provider == "peft_layer":
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            return False, "peft is not installed (pip install peft)"
    return True, ""

