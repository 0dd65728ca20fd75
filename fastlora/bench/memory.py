"""Memory per case: the bytes autograd saves for backward (``saved_tensors_hooks``; each storage counted once,
parameters excluded) and the peak memory of one step above what was allocated before it (CUDA allocator
statistics; on CPU the profiler's allocation events)."""
from __future__ import annotations

import contextlib
import os
import sys

import torch

from .providers import Runner, sync


def _with_quant_states(params):
    """The parameters, and the tensors of a bitsandbytes 4-bit parameter's quant_state (block scales, tables: held by
    the parameter, so an op that saves them saves no memory)."""
    for t in params:
        yield t
        qs = getattr(t, "quant_state", None)
        if qs is None:
            continue
        yield from (getattr(qs, name, None) for name in ("absmax", "code", "offset"))
        state2 = getattr(qs, "state2", None)
        if state2 is not None:
            yield from (getattr(state2, name, None) for name in ("absmax", "code"))


def saved_activation_bytes(runner: Runner, include_input: bool = True) -> int | None:
    """Bytes that autograd saves for backward in one training forward: each storage once, the parameters
    (weight, bias, adapters and views of them) excluded. 0 in inference mode. With ``include_input=False``
    the input x is excluded too: what remains is memory that lives only because autograd saved it (x is
    held by the caller or the previous layer anyway)."""
    if not runner.case.training:
        return 0
    x = runner.pool_x[0]
    held = list(_with_quant_states(runner.params)) + ([] if include_input else [x])
    param_ptrs = {t.untyped_storage().data_ptr() for t in held if t is not None}
    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in param_ptrs:
                seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        except (RuntimeError, NotImplementedError):  # a tensor without storage (a subclass): not counted
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = runner.fn(x)
    del y
    return sum(seen.values())


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C-level stderr (the profiler's start/stop lines) while profiling."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def peak_memory_bytes(runner: Runner) -> int | None:
    """Peak memory of one step above what was allocated before it (output, saved tensors, gradients and
    temporaries; not the inputs or parameters). CUDA: allocator statistics. CPU: the profiler's allocation
    events, summed in time order. None where neither is available."""
    device = runner.device
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        runner.step()
        return int(torch.cuda.max_memory_allocated(device) - before)
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    try:
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            runner.step()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except (RuntimeError, AttributeError):
        return None
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return int(peak)
