"""The model-level entry points: PEFT's objects back, PEFT's arguments accepted, clear errors."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastlora  # noqa: E402
from model_helpers import tiny_llama  # noqa: E402


def test_lora_config_is_peft_s():
    assert fastlora.LoraConfig is peft.LoraConfig


def test_get_peft_model_passes_peft_s_arguments_through():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastlora.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], r=2),
                                        adapter_name="mine", autocast_adapter_dtype=False)
    assert type(model) is peft.PeftModel
    assert model.active_adapter == "mine" and list(model.peft_config) == ["mine"]
    assert fastlora.fused_layers(model)["base_model.model.model.layers.0.self_attn.q_proj"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        causal = fastlora.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], r=2,
                                                                       task_type="CAUSAL_LM"))
    assert isinstance(causal, peft.PeftModelForCausalLM)
    assert inspect.signature(fastlora.from_pretrained).parameters.keys() >= {
        "model", "model_id", "adapter_name", "is_trainable", "config"}


def test_plain_torch_models_and_layers_without_a_fuser():
    """A plain nn.Module target (no transformers); a Conv2d LoRA layer has no fuser and keeps PEFT's forward."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Conv2d(5, 4, 1))
    config = peft.LoraConfig(target_modules=["0", "2"], r=2, init_lora_weights=False)
    with pytest.warns(UserWarning, match=r"1 of 2 LoRA layers run PEFT's forward: base_model.model.2 \(no fastlora"):
        model = fastlora.get_peft_model(net, config)
    assert fastlora.fused_layers(model) == {"base_model.model.0": None,
                                            "base_model.model.2": "no fastlora fuser for Conv2d"}


def test_rejects_what_is_not_a_model_and_warns_when_nothing_is_lora():
    with pytest.raises(TypeError, match="nn.Module"):
        fastlora.accelerate_peft("model")
    with pytest.warns(UserWarning, match="no PEFT LoRA layer"):
        fastlora.accelerate_peft(nn.Linear(3, 3))


def test_accelerating_twice_is_harmless():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastlora.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], r=2))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    routed = layer.forward
    assert fastlora.accelerate_peft(model) is model and layer.forward is routed


def test_a_forward_replaced_by_another_library_is_left_alone():
    """An accelerate-style hook that replaced a LoRA layer's forward before acceleration keeps working."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], r=2))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    calls = []
    original = layer.forward
    layer.forward = lambda x, *a, **k: calls.append(1) or original(x, *a, **k)
    with pytest.warns(UserWarning, match="1 of 2 LoRA layers"):
        fastlora.accelerate_peft(model)
    reason = fastlora.fused_layers(model)["base_model.model.model.layers.0.self_attn.q_proj"]
    assert "replaced by another library" in reason
    model(torch.randint(0, 61, (1, 4)))
    assert calls == [1]


def test_dora_and_quantized_bases_are_named_as_not_the_linear_fuser_s(monkeypatch):
    """With only this package's fusers registered (the DoRA and 4-bit ones come from their own modules), the
    reason names the kind of layer."""
    from fastlora.peft_interop import embedding, linear, registry

    monkeypatch.setattr(registry, "_FUSERS", [linear.FUSER, embedding.FUSER])

    class FakeLinear4bit(nn.Linear):
        pass

    net = nn.Sequential(nn.Linear(6, 5), FakeLinear4bit(5, 4))
    with pytest.warns(UserWarning, match="2 of 2 LoRA layers"):
        model = fastlora.get_peft_model(net, peft.LoraConfig(target_modules=["0", "1"], r=2, use_dora=True))
    assert fastlora.fused_layers(model) == {"base_model.model.0": "DoRA", "base_model.model.1": "DoRA"}
    model.base_model.model[1].lora_variant.clear()  # a plain adapter on the "4-bit" base
    assert fastlora.fused_layers(model)["base_model.model.1"] == "4-bit base"


def test_router_follows_the_registry_priorities(monkeypatch):
    """A fuser registered with a higher priority (as the 4-bit and DoRA ones are) is asked first and runs the
    layers it claims; adapters of two kinds on one layer keep PEFT's forward."""
    from fastlora.peft_interop import registry

    monkeypatch.setattr(registry, "_FUSERS", list(registry._FUSERS))
    calls = []

    def forward(layer, x, adapters):
        calls.append(tuple(adapters))
        return type(layer).forward(layer, x)

    registry.register(registry.Fuser("special", lambda layer, a: a == "special", lambda layer, a: None, forward,
                                     priority=10))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5))
    model = fastlora.get_peft_model(net, peft.LoraConfig(target_modules=["0"], r=2))
    model.add_adapter("special", peft.LoraConfig(target_modules=["0"], r=3))
    model.set_adapter("special")
    model(torch.randn(2, 6))
    assert calls == [("special",)] and fastlora.fused_layers(model) == {"base_model.model.0": None}
    model.base_model.set_adapter(["default", "special"])
    assert fastlora.fused_layers(model) == {"base_model.model.0": "adapters of different kinds active together"}


def test_adding_an_adapter_warns_only_about_new_layers_that_cannot_run_fused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Conv2d(5, 4, 1), nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="Conv2d"):
        model = fastlora.get_peft_model(net, peft.LoraConfig(target_modules=["0", "1"], r=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.add_adapter("b", peft.LoraConfig(target_modules=["2"], r=2))  # a new layer, inactive for now
    assert not [w for w in caught if "fastlora" in str(w.message)], [str(w.message) for w in caught]
    assert fastlora.fused_layers(model)["base_model.model.2"] == "no active adapter on this layer"
    model.set_adapter("b")
    assert fastlora.fused_layers(model)["base_model.model.2"] is None


def test_peft_s_own_4bit_layer_is_named_when_no_4bit_fuser_is_registered(monkeypatch):
    """PEFT's lora.bnb.Linear4bit (not a lora.Linear) is claimed by the linear fuser only to name its base."""
    bnb = pytest.importorskip("bitsandbytes")
    from fastlora.peft_interop import embedding, linear, registry

    monkeypatch.setattr(registry, "_FUSERS", [linear.FUSER, embedding.FUSER])
    net = nn.Sequential(bnb.nn.Linear4bit(16, 8, compute_dtype=torch.float32))
    net[0].weight = bnb.nn.Params4bit(torch.randn(8, 16), requires_grad=False, quant_type="nf4")
    net = net.to("cpu")
    net.is_loaded_in_4bit = True  # what transformers sets: PEFT then makes its lora.bnb.Linear4bit layer
    with pytest.warns(UserWarning, match="4-bit base"):
        model = fastlora.get_peft_model(net, peft.LoraConfig(target_modules=["0"], r=2))
    assert type(model.base_model.model[0]).__name__ == "Linear4bit"
    assert fastlora.fused_layers(model) == {"base_model.model.0": "4-bit base"}
    assert model(torch.randn(2, 16)).shape == (2, 8)
