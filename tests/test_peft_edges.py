"""Accelerated PEFT models where PEFT's own behaviour is the oracle, at the edges issue 20 found: tuner layers nested
in a PeftMixedModel, ``lora_dropout=1.0``, DoRA under PEFT's hot-swap (tensor) scaling, fp16 bases with fp32
adapters, DoRA as a no-op at initialization. Plain PEFT and the accelerated model hold the same weights; outputs and
every gradient are compared, and ``fused_layers()`` must never call fused a layer that then raises.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")

import fastlora  # noqa: E402
from model_helpers import assert_same  # noqa: E402


class Net(nn.Module):
    def __init__(self, dtype=torch.float32, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias, dtype=dtype)
        self.lin1 = nn.Linear(20, 16, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def _pair(build):
    """(plain PEFT model, accelerated copy): the same weights."""
    torch.manual_seed(0)
    plain = build()
    fast = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastlora.accelerate_peft(fast)
    return plain, fast


def _compare(plain, fast, x, atol=1e-6, rtol=1e-6, grads=True):
    y_plain, y_fast = plain(x), fast(x)
    assert_same(y_fast, y_plain, atol, rtol, "output")
    if not grads:
        return
    gy = torch.randn(y_plain.shape, generator=torch.Generator().manual_seed(4)).to(y_plain.dtype)
    y_plain.backward(gy)
    y_fast.backward(gy)
    named = dict(fast.named_parameters())
    for name, p in plain.named_parameters():
        if p.requires_grad:
            assert_same(named[name].grad, p.grad, atol, rtol, f"grad of {name}")


def _perturb(model, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p) * scale)


@pytest.mark.parametrize("other", ["LoHa", "LoKr"])
@pytest.mark.parametrize("lora_first", [False, True], ids=["other-first", "lora-first"])
def test_nested_tuner_layers_of_a_mixed_model(other, lora_first):
    """PeftMixedModel: a LoRA layer over a LoHa / LoKr layer (or the reverse) on the same Linear. The LoRA layer's
    base_layer is the other tuner's layer, whose forward (and adapter) must run: PEFT's forward, not a fused call
    on the innermost weight."""
    other_cfg = getattr(peft, f"{other}Config")(target_modules=["lin0", "lin1"], init_weights=False)
    lora_cfg = peft.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False)
    first, second = (lora_cfg, other_cfg) if lora_first else (other_cfg, lora_cfg)

    def build():
        model = peft.PeftMixedModel(Net().eval(), first, "a")
        model.add_adapter("b", second)
        model.set_adapter(["a", "b"])
        return model

    plain, fast = _pair(build)
    reasons = fastlora.fused_layers(fast)
    assert len(reasons) == 2
    if lora_first:  # the LoRA layer is the inner one, over the plain Linear: fused, called by the other layer
        assert all(r is None for r in reasons.values()), reasons
    else:
        assert all(r is not None and "tuner layer" in r for r in reasons.values()), reasons
    x = torch.randn(7, 10)
    _compare(plain, fast, x, grads=False)
    with torch.no_grad():  # the other adapter contributes: the mixed output is not the LoRA-only one
        fast.set_adapter(["a"] if lora_first else ["b"])
        assert not torch.allclose(fast(x), plain(x))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_dropout_one_runs_as_peft(use_dora):
    """LoraConfig(lora_dropout=1.0): PEFT drops the branch's whole input in training. Never 'fused' and raising."""
    plain, fast = _pair(lambda: peft.get_peft_model(Net(), peft.LoraConfig(target_modules=["lin0", "lin1"],
                                                                           lora_dropout=1.0, use_dora=use_dora,
                                                                           init_lora_weights=False)))
    _perturb(plain)
    fast.load_state_dict(plain.state_dict())
    plain.train(), fast.train()
    reasons = fastlora.fused_layers(fast)
    assert all(r is not None and "lora_dropout=1.0" in r for r in reasons.values()), reasons
    _compare(plain, fast, torch.randn(6, 10))
    plain.eval(), fast.eval()  # eval: the dropout is off, the layers run fused
    assert all(r is None for r in fastlora.fused_layers(fast).values())
    _compare(plain, fast, torch.randn(6, 10), grads=False)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_hot_swap_tensor_scaling_runs_fused(use_dora):
    """prepare_model_for_compiled_hotswap turns every scaling into a 0-d tensor: DoRA (and LoRA) run it fused."""
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    def build():
        model = peft.get_peft_model(Net(), peft.LoraConfig(target_modules=["lin0", "lin1"], use_dora=use_dora,
                                                           lora_alpha=12, init_lora_weights=False))
        prepare_model_for_compiled_hotswap(model, target_rank=8)
        return model

    plain, fast = _pair(build)
    layer = fast.base_model.model.lin0
    assert isinstance(layer.scaling["default"], torch.Tensor)
    assert all(r is None for r in fastlora.fused_layers(fast).values()), fastlora.fused_layers(fast)
    _perturb(plain)
    fast.load_state_dict(plain.state_dict())
    _compare(plain, fast, torch.randn(6, 10), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_fp16_base_fp32_adapters_as_peft(backend_name, request):
    """The issue's numbers through a PEFT model: fp16 base, PEFT's fp32 adapters, scaling 200. PEFT's branch is
    fp32 and finite; fastlora's must be too, in the output and in every gradient at |dY| ≈ 1e3."""
    request.getfixturevalue(f"{backend_name}_backend")
    g = torch.Generator().manual_seed(0)

    def build():
        base = nn.Sequential(nn.Linear(64, 16, bias=False, dtype=torch.float16))
        with torch.no_grad():
            base[0].weight.copy_(torch.randn(16, 64, generator=g) * 0.01)
        model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["0"], r=2, lora_alpha=400))
        layer = model.base_model.model[0]
        assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(torch.randn(2, 64, generator=g) * 2)
            layer.lora_B["default"].weight.copy_(torch.randn(16, 2, generator=g) * 1e-3)
        return model

    plain, fast = _pair(build)
    x = (torch.randn(4, 64, generator=g) * 30).half()
    y_plain, y_fast = plain(x), fast(x)
    assert torch.isfinite(y_plain).all()
    assert torch.isfinite(y_fast).all(), f"{int((~torch.isfinite(y_fast)).sum())} of 64 outputs not finite"
    assert_same(y_fast.float(), y_plain.float(), 0.05, 2e-3, "output")
    gy = (torch.randn(4, 16, generator=g) * 1e3).half()
    y_plain.backward(gy)
    y_fast.backward(gy)
    grads = {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}
    for n, p in plain.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p.grad).all()
            assert torch.isfinite(grads[n]).all(), f"{n}: {int((~torch.isfinite(grads[n])).sum())} not finite"
            assert_same(grads[n], p.grad, 1e-3 * float(p.grad.abs().max()), 1e-2, f"grad of {n}")


def test_dora_at_initialization_is_a_no_op(torch_backend):
    """PEFT's test_lora_use_dora_linear: a new DoRA adapter (B = 0, magnitude = ‖W‖) returns the base layer's
    output bit for bit on the PyTorch path (the base product is nn.Linear's own, the correction exactly 0)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(1000, 64))
    x = torch.rand(10, 1000)
    expected = base(x)
    model = fastlora.get_peft_model(base, peft.LoraConfig(target_modules=["0"], use_dora=True))
    assert fastlora.fused_layers(model) == {"base_model.model.0": None}
    assert torch.equal(model(x), expected)
    model.eval()
    assert torch.equal(model(x), expected)


def test_merge_and_unmerge_clear_the_dora_norm(torch_backend):
    """PEFT's merge / unmerge write the base weight in place (no version bump for a LoRA adapter's merge): the
    evaluation-time DoRA norm kept for that weight is dropped by both."""
    from fastlora import dora as fdora

    def build():
        model = peft.get_peft_model(Net(), peft.LoraConfig(target_modules=["lin0"], use_dora=True,
                                                           init_lora_weights=False))
        model.add_adapter("plain", peft.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
        return model

    plain, fast = _pair(build)
    fast.eval(), plain.eval()
    layer = fast.base_model.model.lin0
    weight = layer.base_layer.weight
    x = torch.randn(5, 10)
    with torch.no_grad():
        fast(x)
        assert id(weight) in fdora._NORM
        layer.merge(adapter_names=["plain"])
        assert id(weight) not in fdora._NORM
        fast(x)  # merged: PEFT's forward
        layer.unmerge()
        assert id(weight) not in fdora._NORM
        plain.base_model.model.lin0.merge(adapter_names=["plain"])
        plain.base_model.model.lin0.unmerge()
        assert_same(fast(x), plain(x), 1e-6, 1e-6, "after merge + unmerge")
