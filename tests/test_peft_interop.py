"""accelerate_peft: each kind of PEFT LoRA layer and adapter combination runs fused, with PEFT's outputs and every
gradient, on the PyTorch fallback and on the (interpreted) Triton kernels."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastlora  # noqa: E402
from fastlora import reference  # noqa: E402
from fastlora.peft_interop import is_accelerated  # noqa: E402
from model_helpers import assert_same, perturb_trainable, tiny_gpt2, tiny_llama, tiny_opt  # noqa: E402

IDS = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(0))


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _peft(make, second=None, active=None, **kw):
    """A PEFT model with non-trivial adapters (and an optional second adapter, both active)."""
    model = quiet(peft.get_peft_model, make(), peft.LoraConfig(init_lora_weights=False, **kw))
    if second is not None:
        quiet(model.add_adapter, "b", peft.LoraConfig(init_lora_weights=False, **second))
        model.base_model.set_adapter(active or ["default", "b"])
    perturb_trainable(model)
    return model


CASES = {
    "llama-all-linear-bias": (lambda: _peft(lambda: tiny_llama(bias=True), target_modules="all-linear",
                                            bias="all")),
    "opt-embedding-rank-pattern": (lambda: _peft(tiny_opt, target_modules=["q_proj", "v_proj", "fc2", "embed_tokens"],
                                                 r=3, use_rslora=True, rank_pattern={"fc2": 5},
                                                 modules_to_save=["project_out"])),
    "gpt2-conv1d-lora-bias": (lambda: _peft(tiny_gpt2, target_modules=["c_attn", "c_proj", "c_fc"], lora_bias=True)),
    "gpt2-embedding": (lambda: _peft(tiny_gpt2, target_modules=["wte", "c_attn"], r=2)),
    "llama-two-adapters": (lambda: _peft(tiny_llama, target_modules=["q_proj", "v_proj", "embed_tokens"], r=2,
                                         second=dict(target_modules=["q_proj", "o_proj", "embed_tokens"], r=3,
                                                     lora_alpha=5))),
    "llama-two-adapters-lora-bias": (lambda: _peft(tiny_llama, target_modules=["q_proj", "down_proj"],
                                                   lora_bias=True,
                                                   second=dict(target_modules=["q_proj"], r=1, lora_bias=True))),
}


def _check_against_peft(ref, atol=1e-5):
    fast = copy.deepcopy(ref)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fastlora.accelerate_peft(fast) is fast
    assert not [w for w in caught if "fastlora" in str(w.message)], [str(w.message) for w in caught]
    routes = fastlora.fused_layers(fast)
    assert routes and all(why is None for why in routes.values()), routes
    fast.train()
    ref.train()
    loss_fast = fast(IDS, labels=IDS).loss
    loss_ref = ref(IDS, labels=IDS).loss
    assert_same(loss_fast, loss_ref, atol, atol, "loss")
    logits_fast = fast(IDS).logits
    assert_same(logits_fast, ref(IDS).logits, atol, atol, "logits")
    loss_fast.backward()
    loss_ref.backward()
    grads = dict(ref.named_parameters())
    checked = 0
    for name, p in fast.named_parameters():
        g_ref = grads[name].grad
        assert (p.grad is None) == (g_ref is None), name
        if p.grad is not None:
            assert_same(p.grad, g_ref, atol, atol, name)
            checked += 1
    assert checked > 0
    return fast


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_every_gradient_equal_peft(case, backend):
    torch.manual_seed(0)
    _check_against_peft(CASES[case]())


def test_the_fused_path_is_taken(monkeypatch):
    """Every routed linear call reaches lora_linear (PEFT's own nn.Linear calls of lora_A / lora_B never run)."""
    fast = fastlora.accelerate_peft(CASES["llama-two-adapters"]())
    calls = []
    from fastlora.peft_interop import linear

    real = linear.lora_linear_multi
    monkeypatch.setattr(linear, "lora_linear_multi", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    fast(IDS)
    # q_proj has both adapters in each of the 2 decoder layers, v_proj and o_proj one each
    assert sorted(calls) == [1, 1, 1, 1, 2, 2]


def test_dropout_uses_each_adapters_p_and_its_own_mask(backend):
    """Two identical adapters with dropout: each draws its own mask (their gradients differ); p is read from each
    adapter's nn.Dropout, and without dropout (eval) the output is PEFT's."""
    torch.manual_seed(0)
    cfg = dict(target_modules=["q_proj"], r=2, lora_dropout=0.5)
    fast = fastlora.accelerate_peft(_peft(tiny_llama, second=cfg, **cfg))
    layer = fast.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_A["b"].weight.copy_(layer.lora_A["default"].weight)
        layer.lora_B["b"].weight.copy_(layer.lora_B["default"].weight)
    fast.train()
    x = torch.randn(3, 16)
    y = layer(x)
    y.square().sum().backward()
    gA, gB = layer.lora_A["default"].weight.grad, layer.lora_A["b"].weight.grad
    assert not torch.allclose(gA, gB), "the two adapters shared one dropout mask"
    # p comes from PEFT's nn.Dropout, per adapter: eval mode (no dropout) equals PEFT's own forward
    layer.lora_dropout["default"].p = 0.25
    fast.eval()
    with torch.no_grad():
        assert_same(layer(x), type(layer).forward(layer, x), 1e-6, 1e-6, "eval")


def test_multi_adapter_dropout_matches_its_oracle(backend):
    """lora_linear_multi with two dropout adapters and one plain: the lead dropout adapter uses the op's seeded
    mask (the backend's own: torch generator or Philox), the second PEFT's F.dropout in order; output and every
    gradient against that oracle."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 7, generator=g, requires_grad=True)
    W, b = torch.randn(5, 7, generator=g), torch.randn(5, generator=g)
    As = [torch.randn(r, 7, generator=g, requires_grad=True) for r in (2, 3, 1)]
    Bs = [torch.randn(5, r, generator=g, requires_grad=True) for r in (2, 3, 1)]
    ss, ps = [0.5, torch.tensor(1.5), 2.0], [0.3, 0.0, 0.6]
    torch.manual_seed(11)
    y = fastlora.lora_linear_multi(x, W, As, Bs, b, scalings=ss, dropout_ps=ps)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    if backend == "torch":
        keep = reference.dropout_keep_mask(seed, x.shape, 0.3, x.device)
    else:
        from fastlora.kernels.dropout import dropout_keep_mask

        keep = dropout_keep_mask(seed, x.shape, 0.3, x.device)
    x2 = torch.nn.functional.dropout(x, 0.6, True)
    y_ref = (x @ W.t() + b + 0.5 * ((x * keep / 0.7) @ As[0].t()) @ Bs[0].t()
             + 1.5 * (x @ As[1].t()) @ Bs[1].t() + 2.0 * (x2 @ As[2].t()) @ Bs[2].t())
    assert_same(y, y_ref, 1e-5, 1e-5, "y")
    gy = torch.randn_like(y)
    leaves = [x, *As, *Bs]
    for got, want, name in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(y_ref, leaves, gy),
                               ["x", "A0", "A1", "A2", "B0", "B1", "B2"]):
        assert_same(got, want, 1e-5, 1e-5, name)


def test_half_precision_base_follows_the_low_precision_rule():
    """fp16 base, fp32 adapters (PEFT's autocast_adapter_dtype): |fused - fp64| <= 2·|PEFT fp16 - fp64| + atol."""
    torch.manual_seed(0)
    ref = _peft(tiny_llama, target_modules=["q_proj", "v_proj"])
    ref64 = copy.deepcopy(ref).double()
    half = copy.deepcopy(ref)
    for layer in [m for m in half.modules() if isinstance(m, peft.tuners.lora.layer.Linear)]:
        layer.base_layer.half()
    fast = fastlora.accelerate_peft(copy.deepcopy(half))
    layer_f = fast.base_model.model.model.layers[0].self_attn.q_proj
    layer_h = half.base_model.model.model.layers[0].self_attn.q_proj
    layer_64 = ref64.base_model.model.model.layers[0].self_attn.q_proj
    assert layer_f.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(6, 16)
    y = layer_f(x.half())
    assert y.dtype == torch.float16
    err = (y.double() - layer_64(x.double())).abs().max()
    base = (layer_h(x.half()).double() - layer_64(x.double())).abs().max()
    assert err <= 2 * base + 1e-3, (err, base)


def test_deep_copy_and_pickle_keep_the_routing():
    import io

    fast = fastlora.accelerate_peft(CASES["gpt2-embedding"]())
    for clone in (copy.deepcopy(fast), torch.load(io.BytesIO(_saved(fast)), weights_only=False)):
        layers = [m for m in clone.modules() if isinstance(m, peft.tuners.lora.layer.LoraLayer)]
        assert layers and all(is_accelerated(m) and m.forward.layer is m for m in layers)
        assert_same(clone(IDS).logits, fast(IDS).logits, 0, 0, "logits")


def _saved(model) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(model, buf)
    return buf.getvalue()


def test_conv1d_weight_is_passed_transposed_by_strides_without_a_copy(monkeypatch):
    fast = fastlora.accelerate_peft(CASES["gpt2-conv1d-lora-bias"]())
    from fastlora.peft_interop import linear

    seen = []
    real = linear.lora_linear_multi
    monkeypatch.setattr(linear, "lora_linear_multi", lambda x, w, *a, **k: seen.append(w) or real(x, w, *a, **k))
    fast(IDS)
    conv = fast.base_model.model.transformer.h[0].attn.c_attn.base_layer
    w = seen[0]
    assert w.shape == (conv.nf, conv.weight.shape[0]) and w.data_ptr() == conv.weight.data_ptr()
    assert w.stride() == (1, conv.nf)  # the (in, out) storage read as (out, in)
