"""accelerate_peft: PEFT's lora.Linear layers run through fastlora.lora_linear, outputs and gradients as PEFT's."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastlora  # noqa: E402
from fastlora import reference  # noqa: E402
from fastlora.peft_interop import is_accelerated  # noqa: E402
from model_helpers import assert_same, perturb_trainable, tiny_gpt2, tiny_llama, tiny_opt  # noqa: E402

IDS = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(0))


def _peft(make, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(make(), peft.LoraConfig(init_lora_weights=False, **kw))
    perturb_trainable(model)
    return model


def _accelerate_quietly(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fastlora.accelerate_peft(model)
    return out, [str(w.message) for w in caught if "accelerate_peft" in str(w.message)]


def _lora_linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.layer.Linear)]


@pytest.mark.parametrize("make, kw", [
    (lambda: tiny_llama(bias=True), dict(target_modules="all-linear", bias="all")),
    (tiny_opt, dict(target_modules=["q_proj", "v_proj", "fc2", "embed_tokens"], r=3, use_rslora=True,
                    rank_pattern={"fc2": 5}, modules_to_save=["project_out"])),
])
def test_outputs_and_gradients_equal_peft(make, kw):
    fast = _peft(make, **kw)
    ref = copy.deepcopy(fast)
    out, messages = _accelerate_quietly(fast)
    assert out is fast and messages == []
    assert all(is_accelerated(m) for _, m in _lora_linears(fast))
    fast.train()
    ref.train()
    loss_fast = fast(IDS, labels=IDS).loss
    loss_ref = ref(IDS, labels=IDS).loss
    assert_same(loss_fast, loss_ref, 1e-6, 1e-6, "loss")
    loss_fast.backward()
    loss_ref.backward()
    grads = dict(ref.named_parameters())
    checked = 0
    for name, p in fast.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert_same(p.grad, grads[name].grad, 1e-5, 1e-5, f"grad of {name}")
            checked += 1
    assert checked > 0
    fast.eval()
    ref.eval()
    with torch.no_grad():
        assert_same(fast(IDS).logits, ref(IDS).logits, 1e-5, 1e-5, "eval logits")


def test_dropout_uses_peft_p_and_fastlora_mask():
    """With p > 0 the layer equals the oracle built on fastlora's own keep mask (same seed draw), and eval mode
    turns dropout off."""
    model = _peft(lambda: tiny_llama(bias=True), target_modules=["q_proj"], lora_dropout=0.4)
    fastlora.accelerate_peft(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, 16, requires_grad=True)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    layer.train()
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))  # the op's draw (fastlora.autograd._draw_seed)
    keep = reference.dropout_keep_mask(seed, (15, 16), 0.4, "cpu")
    x2 = x.detach().clone().requires_grad_(True)
    A2, B2 = A.detach().clone().requires_grad_(True), B.detach().clone().requires_grad_(True)
    y_ref = reference.unfused_lora_linear(x2.reshape(15, 16), W, A2, B2, b, s, keep, 0.4).reshape(3, 5, -1)
    assert_same(y, y_ref, 1e-5, 1e-5, "dropout output")
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert_same(x.grad, x2.grad, 1e-5, 1e-5, "dx")
    assert_same(A.grad, A2.grad, 1e-5, 1e-5, "dA")
    assert_same(B.grad, B2.grad, 1e-5, 1e-5, "dB")
    kept = float(keep.float().mean())
    assert 0.45 < kept < 0.75  # p = 0.4 of PEFT's nn.Dropout was used
    layer.eval()
    with torch.no_grad():
        plain = reference.peft_lora_linear(x, W, A, B, b, s, 0.4, training=False)
        assert_same(layer(x), plain, 1e-6, 1e-6, "eval: no dropout")


def test_defers_to_peft_when_disabled_merged_or_switched():
    fast = _peft(tiny_llama, target_modules=["q_proj", "v_proj"])
    ref = copy.deepcopy(fast)
    fastlora.accelerate_peft(fast)
    fast.eval()
    ref.eval()
    with torch.no_grad():
        with fast.disable_adapter(), ref.disable_adapter():
            assert_same(fast(IDS).logits, ref(IDS).logits, 0, 0, "adapters disabled")
        fast.merge_adapter()
        ref.merge_adapter()
        assert_same(fast(IDS).logits, ref(IDS).logits, 0, 0, "merged")
        fast.unmerge_adapter()
        ref.unmerge_adapter()
        for model in (fast, ref):  # a second adapter, made active after acceleration
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.add_adapter("other", peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
        torch.manual_seed(3)
        for (_, p), (_, q) in zip(fast.named_parameters(), ref.named_parameters()):
            q.copy_(p)
        fast.set_adapter("other")
        ref.set_adapter("other")
        assert_same(fast(IDS).logits, ref(IDS).logits, 1e-5, 1e-5, "switched adapter")


def test_layers_that_cannot_be_accelerated_are_named_in_one_warning():
    dora = _peft(tiny_llama, target_modules=["q_proj", "v_proj"], use_dora=True)
    _, messages = _accelerate_quietly(dora)
    assert len(messages) == 1 and "4 of 4" in messages[0] and "DoRA" in messages[0]
    assert "base_model.model.model.layers.1.self_attn.v_proj" in messages[0]
    assert not any(is_accelerated(m) for _, m in _lora_linears(dora))

    two = _peft(tiny_llama, target_modules=["q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        two.add_adapter("second", peft.LoraConfig(target_modules=["q_proj", "v_proj"]))
    two.base_model.set_adapter(["default", "second"])
    ref = copy.deepcopy(two)
    _, messages = _accelerate_quietly(two)
    assert len(messages) == 1 and "2 active adapters" in messages[0] and "q_proj" in messages[0]
    assert sum(is_accelerated(m) for _, m in _lora_linears(two)) == 2  # the v_proj layers have one adapter
    with torch.no_grad():
        assert_same(two.eval()(IDS).logits, ref.eval()(IDS).logits, 1e-5, 1e-5, "mixed model")

    if "lora_bias" in peft.LoraConfig.__dataclass_fields__:  # peft >= 0.14
        bias = _peft(tiny_llama, target_modules=["q_proj"], lora_bias=True)
        _, messages = _accelerate_quietly(bias)
        assert len(messages) == 1 and "lora_bias" in messages[0]


def test_conv1d_fan_in_fan_out_keeps_peft_path():
    model = _peft(tiny_gpt2, target_modules=["c_attn"], fan_in_fan_out=True)
    ref = copy.deepcopy(model)
    _, messages = _accelerate_quietly(model)
    assert len(messages) == 1 and "fan_in_fan_out" in messages[0]
    with torch.no_grad():
        assert_same(model.eval()(IDS).logits, ref.eval()(IDS).logits, 0, 0, "gpt2")


def test_idempotent_and_rejects_non_modules():
    model = _peft(tiny_llama, target_modules=["q_proj"])
    fastlora.accelerate_peft(model)
    _, messages = _accelerate_quietly(model)
    assert messages == []
    with pytest.raises(TypeError, match="PEFT model"):
        fastlora.accelerate_peft("model")


def test_half_precision_base_follows_the_low_precision_rule():
    """bf16 base, fp32 adapters (PEFT's default): |fast - fp64| <= 2 |PEFT - fp64| + atol, output in bf16."""
    model = _peft(lambda: tiny_llama().to(torch.bfloat16), target_modules=["q_proj"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(4, 6, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        theirs = layer(x)
        fastlora.accelerate_peft(model)
        ours = layer(x)
        W, A, B = (t.double() for t in (layer.base_layer.weight, layer.lora_A["default"].weight,
                                        layer.lora_B["default"].weight))
        ref64 = reference.merged_lora_linear(x.double(), W, A, B, None, layer.scaling["default"])
    assert ours.dtype == torch.bfloat16
    ours_err = float((ours.double() - ref64).abs().max())
    theirs_err = float((theirs.double() - ref64).abs().max())
    assert ours_err <= 2 * theirs_err + 1e-2, (ours_err, theirs_err)


def test_accelerated_model_deep_copies_and_pickles():
    import io

    model = _peft(tiny_llama, target_modules=["q_proj", "v_proj"])
    fastlora.accelerate_peft(model)
    model.eval()
    with torch.no_grad():
        expected = model(IDS).logits
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (clone, loaded):
        layers = _lora_linears(other)
        assert layers and all(is_accelerated(m) and m.forward.module is m for _, m in layers)
        with torch.no_grad():
            assert_same(other(IDS).logits, expected, 0, 0, "copy")
