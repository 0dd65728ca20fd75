"""The measured-choice dispatcher: which of several equivalent compositions of an op is faster, decided by timing
them, never by a threshold. Every such decision in fastlora goes through one ``MeasuredChoice``: the LoRA GEMMs'
fused Triton kernel or cuBLAS (``kernels/lora_linear.py``, ``FASTLORA_BASE_GEMM``), the 4-bit op's in-register
dequantizing GEMM or a transient dequantized weight (``fastlora/qlora.py``, ``FASTLORA_QLORA_PATH``), and the ops
that come next.

``choose(key, candidates, device)`` returns the name to run:

1. the environment variable's value when it is not ``auto`` (a pinned choice: CUDA graph capture, debugging);
2. else the choice cached for ``key`` (everything that can change the answer: op, bucketed M, sizes, dtypes,
   flags, device), made once per process;
3. else, where timing is possible (CUDA, outside graph capture and outside a torch.compile trace; or any device
   with an injected ``timer``), every candidate is timed (``triton.testing.do_bench``: CUDA events, L2 flushed
   between runs, median) and the fastest is cached; a candidate that raises loses (all raising: the error is
   raised);
4. else the ``default`` (a name, or a function of the key): the interpreter, whose kernels are what is tested.

A candidate is a callable running the full composition (timing it also writes its outputs); the caller runs the
chosen one (``run`` does both). The choice depends only on the problem's shape class, never on values, so a
cached choice is never stale (see NOTES.md, "Caches, audited").
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Union

import torch

__all__ = ["MeasuredChoice", "cuda_timer"]


def cuda_timer(name: str, fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream (CUDA events, L2 flushed between runs)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=40, return_mode="median")


class MeasuredChoice:
    """The faster of equivalent compositions, measured once per key and cached (see the module docstring).

    ``env``: the variable that pins a choice (``auto`` or one of ``names``); ``default``: the name (or
    ``default(key) -> name``) used where nothing can be timed; ``timer(name, fn) -> ms`` replaces the CUDA timer
    (tests)."""

    def __init__(self, env: str, names: tuple, default: Union[str, Callable[[tuple], str]], timer=None):
        self.env, self.names, self.default, self.timer = env, tuple(names), default, timer
        self.choices: dict = {}
        self.timings: dict = {}

    def forced(self):
        """The pinned choice from the environment, None for ``auto``."""
        value = os.environ.get(self.env, "auto").lower()
        if value == "auto":
            return None
        if value not in self.names:
            raise ValueError(f"{self.env} must be 'auto' or one of {self.names}, got {value!r}")
        return value

    def can_time(self, device: torch.device) -> bool:
        if torch.compiler.is_compiling():  # a traced region: nothing is timed there
            return False
        if self.timer is not None:
            return True
        return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()

    def choose(self, key, candidates: dict, device: torch.device) -> str:
        forced = self.forced()
        if forced is not None:
            return forced
        if key in self.choices:
            return self.choices[key]
        if not self.can_time(device):
            return self.default(key) if callable(self.default) else self.default
        timer = self.timer or cuda_timer
        times, errors = {}, {}
        for name, fn in candidates.items():
            try:
                times[name] = float(timer(name, fn))
            except Exception as exc:  # noqa: BLE001 - a candidate that cannot run loses; all failing: raise
                times[name], errors[name] = float("inf"), exc
        if len(errors) == len(candidates):
            raise next(iter(errors.values()))
        for name, exc in errors.items():
            warnings.warn(f"fastlora: the {name!r} composition failed on {key} and is not used: {exc!r}")
        choice = min(times, key=times.get)
        self.choices[key], self.timings[key] = choice, times
        return choice

    def run(self, key, candidates: dict, device: torch.device):
        """Choose, then run the chosen candidate once: its result."""
        return candidates[self.choose(key, candidates, device)]()

    def report(self):
        """[(key, choice, {name: ms})] of every timed problem (benchmarks/dispatch_report.py, gpu_check.sh)."""
        return [(k, self.choices[k], self.timings[k]) for k in self.choices]

    def clear(self):
        self.choices.clear()
        self.timings.clear()
