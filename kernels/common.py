"""Launch helpers every kernel file shares (LoRA, 4-bit, DoRA, and the ops that come next): where and how the
kernels run (interpreter, autotuning, device guard, SM count) and the small decisions every launcher makes the same
way (M bucket, rank padding, dot precision, the dtype of the low-rank products, stride-safe views). No kernels here."""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton

__all__ = ["interpreted", "autotune_enabled", "on_device", "sm_count", "m_bucket", "r_block", "dot_precision",
           "low_rank_fp32", "kernel_view", "SUPPORTED", "MAX_STRIDE"]

SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
# Strides up to this bound keep every in-loop pointer step (BLOCK <= 256 times a stride) within int32; an
# operand with a larger stride is copied once to contiguous memory.
MAX_STRIDE = 2**23


def interpreted() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    """Off under the interpreter and with FASTLORA_AUTOTUNE=0: one fixed config per M class then."""
    return not interpreted() and os.environ.get("FASTLORA_AUTOTUNE", "1") not in ("", "0")


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one (cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device, off_cuda: int = 4) -> int:
    """Streaming multiprocessors of a CUDA device; ``off_cuda`` elsewhere (the interpreter: a few, so that the
    split paths are exercised on CPU too)."""
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return off_cuda


def m_bucket(m: int) -> int:
    """Next power of two of M (at least 16): a new sequence length in the same bucket does not retune."""
    return max(16, triton.next_power_of_2(m))


def r_block(r: int, cap: int = 1 << 30) -> int:
    """Rank padded to what tl.dot needs: a power of two >= 16, at most ``cap`` (larger r runs in chunks)."""
    return min(max(16, triton.next_power_of_2(r)), cap)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch: TF32 only where torch allows it for matmuls (``torch.backends.cuda.matmul.allow_tf32``),
    exact IEEE products otherwise and under the interpreter. One rule for every kernel."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreted():
        return "tf32"
    return "ieee"


def low_rank_fp32(dtype: torch.dtype, adapter_dtype: torch.dtype) -> bool:
    """The rank-r products run with fp32 operands: fp16 inputs with fp32 adapters (PEFT's default on an fp16 base),
    whose low-rank terms PEFT computes in fp32 and which would overflow in fp16 (s·h, dh above 65504). bf16 shares
    fp32's range: its rank-r products keep bf16 operands."""
    return dtype == torch.float16 and adapter_dtype == torch.float32


def kernel_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its strides are safe for the kernels' pointer steps, else one contiguous copy."""
    if t.dim() == 2 and all(abs(s) < MAX_STRIDE and s >= 0 for s in t.stride()):
        return t
    return t.contiguous()
