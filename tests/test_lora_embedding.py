"""LoRAEmbedding, LoRALinear's init modes and LoraConfig: torch only (no transformers / peft needed)."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastlora import LoRAEmbedding, LoRALinear
from model_helpers import assert_same


def _peft_embedding_math(ids, weight, A, B, scaling, padding_idx=None):
    """PEFT's lora.Embedding forward: base lookup + (Aᵀ[ids] @ Bᵀ) · s."""
    base = F.embedding(ids, weight, padding_idx)
    return (base + (F.embedding(ids, A.t(), padding_idx) @ B.t()) * scaling).to(base.dtype)


@pytest.mark.parametrize("r", [1, 3, 16])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_embedding_forward_and_grads_match_peft_math(r, dtype, atol):
    torch.manual_seed(0)
    emb = nn.Embedding(37, 11, padding_idx=2, dtype=dtype)
    layer = LoRAEmbedding.from_embedding(emb, r=r, lora_alpha=5, init_lora_weights=False)
    assert layer.weight is emb.weight and not layer.weight.requires_grad
    assert layer.lora_A.shape == (r, 37) and layer.lora_B.shape == (11, r)
    ids = torch.tensor([[0, 2, 5, 36], [2, 2, 1, 7]])
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    y = layer(ids)
    y_ref = _peft_embedding_math(ids, emb.weight, A, B, 5 / r, padding_idx=2)
    assert_same(y, y_ref, atol, atol, "output")
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert_same(layer.lora_A.grad, A.grad, atol, atol, "dA")
    assert_same(layer.lora_B.grad, B.grad, atol, atol, "dB")
    assert float(layer.lora_A.grad[:, 2].abs().max()) == 0.0  # padding_idx gets no gradient, as in PEFT


def test_embedding_init_modes_and_dtype():
    emb = nn.Embedding(20, 6)
    for init in (True, "gaussian"):
        layer = LoRAEmbedding.from_embedding(emb, r=4, init_lora_weights=init)
        assert bool((layer.lora_A == 0).all()) and float(layer.lora_B.detach().std()) > 0.3  # A zeros, B ~ N(0, 1)
        assert torch.equal(layer(torch.arange(20)), emb(torch.arange(20)))  # starts as its base
    layer = LoRAEmbedding.from_embedding(emb, r=4, init_lora_weights=False)
    assert float(layer.lora_A.detach().abs().sum()) > 0 and not torch.equal(layer(torch.arange(20)), emb(torch.arange(20)))
    half = LoRAEmbedding.from_embedding(nn.Embedding(20, 6, dtype=torch.bfloat16), r=2)
    assert half.lora_A.dtype == torch.float32 and half(torch.arange(3)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoRAEmbedding.from_embedding(emb, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="rank"):
        LoRAEmbedding.from_embedding(emb, r=0)
    with pytest.raises(TypeError, match="nn.Embedding"):
        LoRAEmbedding.from_embedding(nn.Linear(2, 2))


def test_embedding_merge_unmerge_to_embedding():
    torch.manual_seed(0)
    emb = nn.Embedding(23, 5)
    original = emb.weight.detach().clone()
    layer = LoRAEmbedding.from_embedding(emb, r=3, lora_alpha=6, use_rslora=True, init_lora_weights=False)
    assert layer.scaling == pytest.approx(6 / math.sqrt(3))
    ids = torch.randint(0, 23, (4, 9))
    with torch.no_grad():
        y = layer(ids)
        plain = layer.to_embedding()
        assert_same(plain(ids), y, 1e-6, 1e-6, "to_embedding")
        layer.merge()
        assert layer.merged and "merged=True" in repr(layer)
        assert_same(layer(ids), y, 1e-6, 1e-6, "merged")
        assert_same(layer.to_embedding()(ids), y, 1e-6, 1e-6, "to_embedding after merge")
        with pytest.warns(UserWarning, match="already merged"):
            layer.merge()
        layer.unmerge()
        assert_same(emb.weight, original, 1e-6, 1e-6, "unmerged weight")
        assert_same(layer(ids), y, 1e-6, 1e-6, "unmerged")


def test_wrapping_the_wrong_layer_names_the_right_class():
    with pytest.raises(TypeError, match=r"nn\.Embedding: wrap it with fastlora\.LoRAEmbedding\.from_embedding"):
        LoRALinear.from_linear(nn.Embedding(10, 4), r=2)
    with pytest.raises(TypeError, match=r"got an nn\.Linear: wrap it with fastlora\.LoRALinear\.from_linear"):
        LoRAEmbedding.from_embedding(nn.Linear(4, 10), r=2)
    with pytest.raises(TypeError, match="expects an nn.Linear, got Conv1d"):
        LoRALinear.from_linear(nn.Conv1d(4, 4, 1), r=2)


def test_embedding_on_meta_device():
    layer = LoRAEmbedding(50, 8, r=4, device="meta")
    assert layer.weight.is_meta and layer.lora_A.is_meta and layer.lora_A.shape == (4, 50)


def test_linear_init_modes():
    torch.manual_seed(0)
    lin = nn.Linear(64, 10)
    x = torch.randn(3, 64)
    a = LoRALinear.from_linear(lin, r=8, init_lora_weights=True)
    assert bool((a.lora_B == 0).all()) and float(a.lora_A.detach().abs().max()) <= 1 / math.sqrt(64)
    g = LoRALinear.from_linear(lin, r=8, init_lora_weights="gaussian")
    assert bool((g.lora_B == 0).all()) and float(g.lora_A.detach().std()) == pytest.approx(1 / 8, rel=0.2)
    f = LoRALinear.from_linear(lin, r=8, init_lora_weights=False)
    assert float(f.lora_B.detach().abs().max()) <= 1 / math.sqrt(8) and float(f.lora_B.detach().abs().sum()) > 0
    with torch.no_grad():
        assert torch.equal(a(x), lin(x)) and torch.equal(g(x), lin(x)) and not torch.equal(f(x), lin(x))
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoRALinear.from_linear(lin, init_lora_weights="olora")


def test_layers_and_op_work_without_peft_and_the_model_level_names_the_extra():
    """With transformers, peft and safetensors unimportable: ``import fastlora``, the op and both layers work; the
    model-level functions and ``fastlora.LoraConfig`` raise an ImportError that names the extra to install."""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('transformers', 'peft', 'safetensors'):\n"
            "            raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import fastlora, torch\n"
            "lin = fastlora.LoRALinear(4, 3, r=2)\n"
            "emb = fastlora.LoRAEmbedding(5, 3, r=2)\n"
            "lin(torch.randn(2, 4)).sum().backward()\n"
            "emb(torch.tensor([1, 4])).sum().backward()\n"
            "fastlora.lora_linear(torch.randn(2, 4), lin.weight, lin.lora_A, lin.lora_B)\n"
            "calls = [lambda: fastlora.get_peft_model(lin, None), lambda: fastlora.from_pretrained(lin, 'x'),\n"
            "         lambda: fastlora.accelerate_peft(lin), lambda: fastlora.fused_layers(lin),\n"
            "         lambda: fastlora.LoraConfig]\n"
            "for call in calls:\n"
            "    try:\n"
            "        call()\n"
            "    except ImportError as e:\n"
            "        assert '.[peft]' in str(e), e\n"
            "    else:\n"
            "        raise AssertionError('no ImportError')\n"
            "assert 'peft' not in sys.modules\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
