"""LoRALinear: the nn.Linear drop-in."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import fastlora
from fastlora import LoRALinear, reference
from helpers import assert_close


def test_signature_and_attributes():
    layer = LoRALinear(12, 7, r=3, lora_alpha=6, lora_dropout=0.1)
    assert (layer.in_features, layer.out_features, layer.r, layer.lora_alpha) == (12, 7, 3, 6)
    assert layer.weight.shape == (7, 12) and layer.bias.shape == (7,)
    assert layer.lora_A.shape == (3, 12) and layer.lora_B.shape == (7, 3)
    assert layer.scaling == 2.0
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert bool((layer.lora_B == 0).all())
    assert LoRALinear(12, 7, r=4, lora_alpha=8, use_rslora=True).scaling == pytest.approx(8 / math.sqrt(4))
    assert LoRALinear(12, 7, bias=False).bias is None
    positional = LoRALinear(12, 7, False, "cpu", torch.float64)  # nn.Linear's own positional order
    assert positional.bias is None and positional.weight.dtype == torch.float64
    assert "in_features=12, out_features=7, bias=True, r=3, lora_alpha=6, lora_dropout=0.1" in repr(layer)


def test_adapter_dtype_follows_peft():
    assert LoRALinear(8, 4, dtype=torch.bfloat16).lora_A.dtype == torch.float32
    assert LoRALinear(8, 4, dtype=torch.float64).lora_A.dtype == torch.float64


def test_kaiming_init_of_A():
    torch.manual_seed(0)
    layer = LoRALinear(400, 5, r=64)
    bound = 1.0 / math.sqrt(400)  # kaiming_uniform with a=√5 gives U(-1/√fan_in, 1/√fan_in)
    largest = float(layer.lora_A.detach().abs().max())
    assert 0.9 * bound < largest <= bound


@pytest.mark.parametrize("r", [0, -1, 1.5, True])
def test_bad_rank(r):
    with pytest.raises(ValueError, match="rank r must be a positive int"):
        LoRALinear(4, 4, r=r)


def test_bad_dropout():
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRALinear(4, 4, lora_dropout=1.0)


def test_fresh_layer_equals_base():
    base = nn.Linear(13, 9)
    layer = LoRALinear.from_linear(base, r=4, lora_alpha=16)
    x = torch.randn(3, 5, 13)
    assert torch.equal(layer(x), base(x))


def test_from_linear_shares_storage_and_freezes():
    base = nn.Linear(13, 9)
    layer = LoRALinear.from_linear(base, r=2)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.device == base.weight.device
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="rank"):
        LoRALinear.from_linear(base, r=0)


def _trained_layer(dtype=torch.float64, bias=True):
    torch.manual_seed(0)
    layer = LoRALinear(19, 11, bias=bias, dtype=dtype, r=3, lora_alpha=6)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_forward_and_gradients_match_seed_reconstruction():
    layer = _trained_layer()
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 7, 19, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    params = (layer.weight, layer.lora_A, layer.lora_B, layer.bias)
    ref_params = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    x_ref = x.detach().clone().requires_grad_()
    y_ref = reference.merged_lora_linear(x_ref, ref_params[0], ref_params[1], ref_params[2], ref_params[3],
                                         layer.scaling)
    assert_close(y, y_ref, 1e-10, 1e-10, "y")
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    assert layer.weight.grad is None
    for name, p, q in zip(["A", "B", "bias"], params[1:], ref_params[1:]):
        assert_close(p.grad, q.grad, 1e-10, 1e-10, f"d{name}")
    assert_close(x.grad, x_ref.grad, 1e-10, 1e-10, "dx")


def test_eval_disables_dropout():
    layer = _trained_layer()
    layer.lora_dropout = 0.5
    x = torch.randn(16, 19, dtype=torch.float64)
    layer.eval()
    expected = reference.merged_lora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.bias, layer.scaling)
    assert_close(layer(x), expected, 1e-10, 1e-10, "eval")
    layer.train()
    assert not torch.allclose(layer(x), expected)


@pytest.mark.parametrize("bias", [True, False])
def test_merge_unmerge_round_trip(bias):
    layer = _trained_layer(bias=bias)
    x = torch.randn(5, 19, dtype=torch.float64)
    w0 = layer.weight.detach().clone()
    y0 = layer(x)
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    assert_close(layer(x), y0, 1e-10, 1e-10, "merged forward")
    assert_close(layer.weight, w0 + layer.scaling * layer.lora_B @ layer.lora_A, 1e-12, 1e-12, "merged W")
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    assert_close(layer.weight, w0, 1e-12, 1e-12, "unmerged W")
    assert_close(layer(x), y0, 1e-10, 1e-10, "unmerged forward")
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_merge_in_bf16_is_close():
    layer = _trained_layer(dtype=torch.bfloat16)
    x = torch.randn(5, 19, dtype=torch.bfloat16)
    y0 = layer(x).double()
    layer.merge()
    assert_close(layer(x), y0, 0.1, 0.05, "merged bf16")


def test_to_linear():
    layer = _trained_layer()
    x = torch.randn(4, 19, dtype=torch.float64)
    w0 = layer.weight.detach().clone()
    linear = layer.to_linear()
    assert type(linear) is nn.Linear and linear.weight.dtype == torch.float64
    assert_close(linear(x), layer(x), 1e-10, 1e-10, "to_linear")
    assert torch.equal(layer.weight, w0) and not layer.merged  # the layer itself is unchanged
    layer.merge()
    assert_close(layer.to_linear()(x), linear(x), 1e-10, 1e-10, "to_linear of merged")


def test_state_dict_and_dtype_moves():
    layer = _trained_layer(dtype=torch.float32)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    half = layer.to(torch.float16)
    x = torch.randn(3, 19, dtype=torch.float16)
    assert half(x).dtype == torch.float16


# ---------------------------------------------------------------------------------------------------------
# The seed notebook's example
# ---------------------------------------------------------------------------------------------------------

class SimpleLM(nn.Module):
    def __init__(self, vocab_size, hidden_size):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.linear1 = nn.Linear(hidden_size, hidden_size)
        self.linear2 = nn.Linear(hidden_size, vocab_size)

    def forward(self, x):
        return self.linear2(torch.relu(self.linear1(self.embed(x))))


def _lora_simple_lm(vocab=10000, hidden=512):
    model = SimpleLM(vocab, hidden)
    model.embed.weight.requires_grad_(False)
    model.linear1 = LoRALinear.from_linear(model.linear1, r=4, lora_alpha=16)
    model.linear2 = LoRALinear.from_linear(model.linear2, r=4, lora_alpha=16)
    for layer in (model.linear1, model.linear2):
        layer.bias.requires_grad_(True)  # the notebook trains the biases
    return model


def test_seed_simple_lm_trainable_parameter_count():
    torch.manual_seed(0)
    model = _lora_simple_lm()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 56_656


def test_seed_simple_lm_trains():
    torch.manual_seed(0)
    vocab = 200
    model = _lora_simple_lm(vocab=vocab, hidden=64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, vocab, (16, 12))
    targets = (tokens * 7 + 3) % vocab  # a fixed token map the adapters can learn
    losses = []
    for _ in range(60):
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert model.linear1.weight.grad is None  # frozen base weights get no gradient
