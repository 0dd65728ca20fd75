"""torch.compile without graph breaks, DDP and FSDP2, autocast, determinism and activation checkpointing.

Runs on the CPU (the PyTorch path) everywhere and, where CUDA is present, on the GPU too (the kernels)."""
from __future__ import annotations

import contextlib
import os
import sys
import time

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as checkpoint

import fastlora
from fastlora import LoRALinear, reference
from helpers import assert_close, assert_low_precision_close, spy_kernel_launches

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# "triton" on the CPU runs the real kernels through the Triton interpreter (tests/conftest.py switches it on).
PATHS = [("cpu", "auto"), ("cpu", "triton")] + ([("cuda", "auto")] if torch.cuda.is_available() else [])


@pytest.fixture
def path(request):
    """(device, backend) for one test; the backend is restored afterwards."""
    device, name = request.param
    previous = fastlora.backend._backend
    fastlora.set_backend(name)
    yield device
    fastlora.backend._backend = previous


class TwoLayer(nn.Module):
    def __init__(self, d_in=24, d_hidden=40, d_out=12, dropout=0.0, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.fc1 = LoRALinear(d_in, d_hidden, r=4, lora_alpha=8, lora_dropout=dropout, dtype=dtype, device=device)
        self.fc2 = LoRALinear(d_hidden, d_out, r=3, lora_alpha=6, lora_dropout=dropout, dtype=dtype, device=device)
        with torch.no_grad():  # non-zero B so the LoRA path matters
            self.fc1.lora_B.normal_(std=0.5)
            self.fc2.lora_B.normal_(std=0.5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _kernel_launches() -> int:
    from fastlora.backend import triton_available

    if not triton_available():
        return 0
    from fastlora.kernels import lora_linear as kernels

    return sum(kernels.launch_counts.values())


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, x, seed=0, owner=None):
    """One forward/backward under a fixed seed; the gradients of ``owner`` (default: model)."""
    torch.manual_seed(seed)
    y = model(x)
    loss = (y.float() ** 2).mean()
    loss.backward()
    return y.detach(), _grads(owner or model)


@pytest.mark.parametrize("path", PATHS, indirect=True, ids=lambda p: "-".join(p))
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_compile_fullgraph_equals_eager(path, dropout):
    device = path
    torch.manual_seed(0)
    model = TwoLayer(dropout=dropout, device=device)
    model.fc2.bias.requires_grad_(True)  # a trainable bias: the custom op's backward must return its gradient
    x = torch.randn(3, 5, 24, device=device, requires_grad=True)
    y_eager, g_eager = _step(model, x)
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    launches = _kernel_launches()
    y_comp, g_comp = _step(compiled, x, owner=model)
    if fastlora.get_backend() == "triton" or device == "cuda":
        assert _kernel_launches() > launches  # the compiled graph ran the Triton kernels
    assert_close(y_comp, y_eager, 1e-5, 1e-5, "y")
    assert set(g_comp) == set(g_eager) == {"fc1.lora_A", "fc1.lora_B", "fc2.lora_A", "fc2.lora_B", "fc2.bias"}
    for name in g_eager:
        assert_close(g_comp[name], g_eager[name], 1e-5, 1e-5, name)


def test_compile_dynamic_lengths_do_not_recompile_each_time():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    model = TwoLayer()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for length in (5, 7, 9, 11, 13, 17):
        x = torch.randn(2, length, 24, requires_grad=True)
        out = compiled(x)
        out.sum().backward()
        assert_close(out, model(x), 1e-5, 1e-5, f"length {length}")
    assert counter.frame_count <= 2, f"recompiled {counter.frame_count} times for 6 lengths"


@pytest.mark.parametrize("path", PATHS, indirect=True, ids=lambda p: "-".join(p))
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_activation_checkpointing_same_gradients(path, dropout):
    device = path
    torch.manual_seed(0)
    model = TwoLayer(dropout=dropout, device=device)
    x = torch.randn(4, 6, 24, device=device, requires_grad=True)
    y_plain, g_plain = _step(model, x, seed=11)
    gx_plain = x.grad.clone()
    model.zero_grad()
    x.grad = None

    class Checkpointed(nn.Module):
        def forward(self, inp):
            return checkpoint.checkpoint(model, inp, use_reentrant=False)

    y_ckpt, g_ckpt = _step(Checkpointed(), x, seed=11, owner=model)
    assert torch.equal(y_ckpt, y_plain)
    for name in g_plain:
        assert torch.equal(g_ckpt[name], g_plain[name]), name  # the recompute regenerated the same mask
    assert torch.equal(x.grad, gx_plain)


@pytest.mark.parametrize("path", PATHS, indirect=True, ids=lambda p: "-".join(p))
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_deterministic_mode_bitwise_repeatable(path, dropout):
    """Deterministic mode: two steps are bitwise equal (which only a GPU can get wrong), AND the deterministic
    code path (dB by cuBLAS, dbias by torch.sum, no atomics) gives the default path's gradients, with s = 2 and
    dropout (same seeds, so same masks): that part can fail on CPU too. On the interpreted kernels the spy also
    shows that no atomic op ran."""
    device = path
    torch.manual_seed(0)
    model = TwoLayer(dropout=dropout, device=device)
    for layer in (model.fc1, model.fc2):
        layer.bias.requires_grad_(True)
    x = torch.randn(64, 24, device=device, requires_grad=True)
    _, default = _step(model, x, seed=5)
    model.zero_grad()
    spy_kernels = fastlora.get_backend() == "triton" and not torch.cuda.is_available()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with spy_kernel_launches() if spy_kernels else contextlib.nullcontext() as spy:
            _, first = _step(model, x, seed=5)
        model.zero_grad()
        _, second = _step(model, x, seed=5)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert set(first) == set(default) and {"fc1.bias", "fc2.lora_B"} <= set(first)
    for name in first:
        assert torch.equal(first[name], second[name]), name
        assert_close(first[name], default[name], 1e-5, 1e-5, name)
    if spy_kernels:
        assert spy.of("lora_grad_dy_kernel") and spy.atomics == 0, spy.summary()


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_matches_linear_behaviour(device):
    """bf16 autocast: output dtype as nn.Linear's, and the output's and the gradients' VALUES within twice PEFT's
    own bf16 error of the float64 math. The bias is ~4, so a dropped bias term misses by far more than that."""
    torch.manual_seed(0)
    layer = LoRALinear(48, 40, r=8, lora_alpha=16, device=device)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.bias.normal_().add_(4.0)
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 9, 48, device=device, requires_grad=True)
    params = (x, layer.lora_A, layer.lora_B, layer.bias)
    gy = torch.randn(2, 9, 40, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer(x)
        y_peft = reference.peft_lora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.bias, layer.scaling)
        y_linear = nn.functional.linear(x, layer.weight, layer.bias)
    assert y.dtype == y_peft.dtype == y_linear.dtype == torch.bfloat16
    leaves64 = [t.detach().double().requires_grad_() for t in params]
    y64 = reference.merged_lora_linear(leaves64[0], layer.weight.double(), leaves64[1], leaves64[2], leaves64[3],
                                       layer.scaling)
    atol = 1.6e-2
    assert_low_precision_close(y, y64, y_peft, atol, "y")
    grads = torch.autograd.grad(y, params, gy.to(y.dtype))
    grads_peft = torch.autograd.grad(y_peft, params, gy.to(y.dtype))
    grads64 = torch.autograd.grad(y64, leaves64, gy.double())
    for name, g, gp, g64 in zip(["x", "lora_A", "lora_B", "bias"], grads, grads_peft, grads64):
        assert g.dtype == torch.float32, name  # grads come back in the parameter dtype
        assert_low_precision_close(g, g64, gp, atol * max(1.0, g64.abs().max().item()), f"d{name}")
    assert layer.weight.grad is None and not layer.weight.requires_grad


# ---------------------------------------------------------------------------------------------------------
# Distributed: two processes on loopback, gloo (CPU)
# ---------------------------------------------------------------------------------------------------------

def _dist_worker(rank, world, init_file, mode, result_file):
    import torch.distributed as dist
    from datetime import timedelta

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    torch.manual_seed(0)
    model = TwoLayer()
    x = torch.randn(8, 24, generator=torch.Generator().manual_seed(1))
    shard = x.chunk(world)[rank]
    if mode == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in (model.fc1, model.fc2):
            fully_shard(layer)
        wrapped = fully_shard(model)
    loss = (wrapped(shard) ** 2).mean()
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad
        if hasattr(g, "full_tensor"):  # FSDP2: a sharded DTensor gradient
            g = g.full_tensor()
        grads[name] = g.detach().clone()
    torch.save(grads, f"{result_file}.{rank}.tmp")
    os.replace(f"{result_file}.{rank}.tmp", f"{result_file}.{rank}")
    dist.barrier()
    # The results are on disk: leave without gloo's teardown, which on this 2-core machine was seen to abort or
    # hang now and then at process exit — not what this test is about.
    os._exit(0)


def _single_process_grads():
    torch.manual_seed(0)
    model = TwoLayer()
    x = torch.randn(8, 24, generator=torch.Generator().manual_seed(1))
    (model(x) ** 2).mean().backward()
    return _grads(model)


def _fsdp2_available():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return torch.distributed.is_available()


@pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32", reason="needs gloo")
@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp2", marks=pytest.mark.skipif(
    not _fsdp2_available(), reason="torch.distributed.fsdp.fully_shard not in this torch"))])
def test_distributed_gradients_equal_single_process(tmp_path, mode):
    import torch.multiprocessing as mp

    world = 2
    result = tmp_path / "grads"
    context = mp.start_processes(_dist_worker, args=(world, str(tmp_path / "init"), mode, str(result)),
                                 nprocs=world, join=False, start_method="spawn")
    files = [f"{result}.{rank}" for rank in range(world)]
    deadline = time.monotonic() + 300  # a hung collective fails the test instead of hanging CI
    try:
        while not all(os.path.exists(f) for f in files):
            # join() raises if a worker failed; it returns True once all have exited
            if context.join(timeout=1) and not all(os.path.exists(f) for f in files):
                pytest.fail(f"{mode} workers exited without writing their gradients")
            assert time.monotonic() < deadline, f"{mode} workers did not finish in 300 s"
    finally:
        for process in context.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
    expected = _single_process_grads()
    for rank in range(world):
        got = torch.load(f"{result}.{rank}")
        assert set(got) == set(expected)
        for name in expected:
            assert_close(got[name], expected[name], 1e-5, 1e-5, f"rank {rank} {name}")


class _PlainNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(24, 40)
        self.fc2 = nn.Linear(40, 12)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compile_fullgraph_accelerated_peft_and_lora_model(dropout):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], lora_dropout=dropout)
    model = fastlora.accelerate_peft(peft.get_peft_model(_PlainNet(), config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    x = torch.randn(3, 5, 24)
    y_eager, g_eager = _step(model, x)
    model.zero_grad()
    y_comp, g_comp = _step(torch.compile(model, fullgraph=True), x, owner=model)
    assert_close(y_comp, y_eager, 1e-5, 1e-5, "y")
    assert len(g_eager) == 4
    for name in g_eager:
        assert_close(g_comp[name], g_eager[name], 1e-5, 1e-5, name)

    ours = fastlora.get_peft_model(_PlainNet(), fastlora.LoraConfig(r=4, target_modules=["fc1", "fc2"],
                                                                   lora_dropout=dropout))
    y_eager, g_eager = _step(ours, x)
    ours.zero_grad()
    y_comp, g_comp = _step(torch.compile(ours, fullgraph=True), x, owner=ours)
    assert_close(y_comp, y_eager, 1e-5, 1e-5, "LoraModel y")
    for name in g_eager:
        assert_close(g_comp[name], g_eager[name], 1e-5, 1e-5, name)
