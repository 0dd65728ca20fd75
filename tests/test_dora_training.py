"""DoRA trained with the optimizers people use, against PEFT and against DoRA's math from scratch.

bitsandbytes' optimizers (AdamW8bit, PagedAdamW, AdamW32bit: QLoRA / QDoRA's usual ones), torch's fused AdamW (HF
Trainer's and TRL's default ``adamw_torch_fused``) and ``.data`` writes change A and B without bumping their version
counters. A norm reused on that evidence goes stale from the second step on; these tests train a few steps and
compare every step's loss with plain PEFT, then evaluate (where the norm may be reused) after writes of each kind.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

peft = pytest.importorskip("peft")

import fastlora  # noqa: E402
from model_helpers import assert_same  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(24, 40)
        self.lin1 = nn.Linear(40, 12)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def _dora_pair(dropout=0.0):
    torch.manual_seed(0)
    plain = peft.get_peft_model(Net(), peft.LoraConfig(target_modules=["lin0", "lin1"], use_dora=True, r=4,
                                                       lora_dropout=dropout, init_lora_weights=False))
    fast = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastlora.accelerate_peft(fast)
    assert all(r is None for r in fastlora.fused_layers(fast).values())
    return plain, fast


def _optimizer(name, params):
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=5e-2, fused=True)
    bnb = pytest.importorskip("bitsandbytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # paged optimizers fall back to unpaged on CPU, and say so
        return getattr(bnb.optim, name)(params, lr=5e-2, min_8bit_size=0)


def dora_from_scratch(layer, x):
    """PEFT's DoRA for one lora.Linear, written out: W' = W + s·B A, y = m ⊙ (x W'ᵀ) / ‖W'‖_row + b."""
    base = layer.base_layer
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m, s = layer.lora_magnitude_vector["default"].weight, layer.scaling["default"]
    merged = base.weight.double() + s * (B.double() @ A.double())
    return (F.linear(x.double(), merged) * (m.double() / torch.linalg.norm(merged, dim=1)) + base.bias.double()).float()


@pytest.mark.parametrize("optim", ["AdamW8bit", "PagedAdamW", "AdamW32bit", "adamw_torch_fused"])
def test_training_steps_match_peft(optim, torch_backend):
    plain, fast = _dora_pair()
    opts = [_optimizer(optim, [p for p in m.parameters() if p.requires_grad]) for m in (plain, fast)]
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        x, target = torch.randn(16, 24, generator=g), torch.randn(16, 12, generator=g)
        losses = []
        for model, opt in zip((plain, fast), opts):
            opt.zero_grad()
            loss = F.mse_loss(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert_same(losses[1], losses[0], 1e-6, 1e-5, f"loss at step {step}")
    # the trained model evaluates and generates with the trained norm
    plain.eval(), fast.eval()
    x = torch.randn(5, 24, generator=g)
    with torch.no_grad():
        assert_same(fast(x), plain(x), 1e-5, 1e-5, "eval after training")
        layer = fast.base_model.model.lin0
        assert_same(layer(x), dora_from_scratch(layer, x), 1e-5, 1e-5, "lin0 against DoRA's math")


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_data_writes_between_evaluations(backend_name, request):
    """Evaluation may reuse the norm; any write to A, B or the base weight in between must be seen."""
    request.getfixturevalue(f"{backend_name}_backend")
    _, fast = _dora_pair()
    fast.eval()
    layer = fast.base_model.model.lin0
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(6, 24)
    writes = [
        ("A.data.copy_", lambda: A.data.copy_(torch.randn_like(A))),
        ("B.data.mul_", lambda: B.data.mul_(1.7)),
        ("B.data =", lambda: setattr(B, "data", torch.randn_like(B))),
        ("A[...] = under no_grad", lambda: A.__setitem__(slice(None), torch.randn_like(A))),
        ("scaling", lambda: layer.scaling.__setitem__("default", layer.scaling["default"] * 0.5)),
        ("base weight .data =", lambda: setattr(layer.base_layer.weight, "data",
                                                layer.base_layer.weight.data * 1.1)),
    ]
    with torch.no_grad():
        assert_same(layer(x), dora_from_scratch(layer, x), 1e-5, 1e-5, "first")
        for name, write in writes:
            layer(x)  # an evaluation call that may keep the norm
            write()
            assert_same(layer(x), dora_from_scratch(layer, x), 1e-5, 1e-5, f"after {name}")


def test_dropout_training_then_eval_with_a_fused_optimizer(torch_backend):
    """With dropout (train-mode masks of fastlora's own), a fused optimizer, then eval against DoRA's math."""
    _, fast = _dora_pair(dropout=0.2)
    opt = torch.optim.AdamW([p for p in fast.parameters() if p.requires_grad], lr=5e-2, fused=True)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        opt.zero_grad()
        fast(torch.randn(8, 24, generator=g)).pow(2).mean().backward()
        opt.step()
    fast.eval()
    x = torch.randn(5, 24, generator=g)
    with torch.no_grad():
        layer = fast.base_model.model.lin1
        h = torch.relu(fast.base_model.model.lin0(x))
        assert_same(layer(h), dora_from_scratch(layer, h), 1e-5, 1e-5, "lin1 against DoRA's math")
