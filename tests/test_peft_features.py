"""PEFT's LoRA features on an accelerated model: the same calls on a PEFT model and on fastlora's give the same
outputs at every step, and the layers that can run fused do (adapters added or loaded later included)."""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastlora  # noqa: E402
from model_helpers import assert_same, perturb_trainable, tiny_gpt2, tiny_llama, tiny_opt  # noqa: E402

IDS = torch.randint(0, 61, (3, 6), generator=torch.Generator().manual_seed(0))
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
O0 = "base_model.model.model.layers.0.self_attn.o_proj"


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _config(**kw):
    base = dict(target_modules=["q_proj", "v_proj"], r=2, init_lora_weights=False)
    base.update(kw)
    return fastlora.LoraConfig(**base)


def _pair(base=tiny_llama, **kw):
    """The same model and adapter, made by peft.get_peft_model and by fastlora.get_peft_model."""
    models = []
    for make in (peft.get_peft_model, fastlora.get_peft_model):
        torch.manual_seed(0)
        model = quiet(make, base(), _config(**kw))
        perturb_trainable(model)
        models.append(model)
    return models


def _same(ref, fast, name, **kw):
    with torch.no_grad():
        assert_same(fast(IDS, **kw).logits, ref(IDS, **kw).logits, 1e-5, 1e-5, name)


def test_get_peft_model_returns_a_peft_model_with_peft_s_print_line(capsys):
    ref, fast = _pair(modules_to_save=["lm_head"])
    assert type(fast) is type(ref) and isinstance(fast, peft.PeftModel)
    assert isinstance(fast.base_model, peft.LoraModel)
    assert isinstance(fastlora.LoraConfig(), peft.LoraConfig)
    ref.print_trainable_parameters()
    line_ref = capsys.readouterr().out
    fast.print_trainable_parameters()
    assert capsys.readouterr().out == line_ref and line_ref.startswith("trainable params: ")
    assert fastlora.fused_layers(fast) == {f"base_model.model.model.layers.{i}.self_attn.{p}": None
                                           for i in (0, 1) for p in ("q_proj", "v_proj")}
    _same(ref, fast, "logits")


def test_adapter_management_follows_peft_and_later_adapters_are_fused(tmp_path):
    ref, fast = _pair()
    _same(ref, fast, "start")
    second = dict(target_modules=["q_proj", "o_proj"], r=3, lora_alpha=5)
    for m in (ref, fast):
        torch.manual_seed(1)
        quiet(m.add_adapter, "b", _config(**second))
        perturb_trainable(m, seed=2)
        m.set_adapter("b")
    assert fastlora.fused_layers(fast)[O0] is None  # o_proj's layer was made after acceleration
    _same(ref, fast, "set_adapter b")
    for m in (ref, fast):
        m.base_model.set_adapter(["default", "b"])
    assert fastlora.fused_layers(fast)[Q0] is None
    _same(ref, fast, "two active adapters")
    with ref.disable_adapter(), fast.disable_adapter():
        assert fastlora.fused_layers(fast)[Q0] == "adapters disabled"
        _same(ref, fast, "disable_adapter")
    for m in (ref, fast):
        m.set_adapter("default")
        m.eval()
    _same(ref, fast, "mixed batch", adapter_names=["default", "b", "__base__"])
    for m in (ref, fast):
        m.merge_adapter()
    assert fastlora.fused_layers(fast)[Q0].startswith("adapters merged")
    _same(ref, fast, "merged")
    for m in (ref, fast):
        m.unmerge_adapter()
        m.delete_adapter("b")
    assert fastlora.fused_layers(fast)[O0] == "no active adapter on this layer"
    _same(ref, fast, "delete_adapter")
    quiet(ref.save_pretrained, tmp_path / "src", selected_adapters=["default"])
    for m in (ref, fast):
        quiet(m.load_adapter, tmp_path / "src", adapter_name="c")
        m.set_adapter("c")
    routes = fastlora.fused_layers(fast)
    assert all(why is None for name, why in routes.items() if not name.endswith("o_proj")), routes
    _same(ref, fast, "load_adapter")
    merged_ref, merged_fast = quiet(ref.merge_and_unload), quiet(fast.merge_and_unload)
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in merged_fast.modules())
    with torch.no_grad():
        assert_same(merged_fast(IDS).logits, merged_ref(IDS).logits, 1e-5, 1e-5, "merge_and_unload")


def test_modules_to_save_and_trainable_tokens_train_as_in_peft():
    ref, fast = _pair(modules_to_save=["lm_head"], trainable_token_indices={"embed_tokens": [1, 2, 3]})
    grads = []
    for m in (ref, fast):
        m.train()
        m(IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert any("modules_to_save" in n for n in grads[0]) and any("trainable_tokens" in n for n in grads[0])
    for n, g in grads[0].items():
        assert_same(grads[1][n], g, 1e-5, 1e-5, n)


def test_unload_gives_back_the_base_model():
    ref, fast = _pair()
    base_ref, base_fast = ref.unload(), fast.unload()
    with torch.no_grad():
        assert_same(base_fast(IDS).logits, base_ref(IDS).logits, 0, 0, "unload")


SAVE_CASES = {
    "llama-modules-to-save": (tiny_llama, dict(modules_to_save=["lm_head"])),
    "gpt2-conv1d-embedding": (tiny_gpt2, dict(target_modules=["c_attn", "wte"])),
    "gpt2-lora-bias": (tiny_gpt2, dict(target_modules=["c_fc", "c_proj"], lora_bias=True)),
    "opt-embedding-rslora": (tiny_opt, dict(target_modules=["q_proj", "embed_tokens"], use_rslora=True)),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_save_pretrained_files_are_byte_identical_and_load_both_ways(case, tmp_path):
    base, kw = SAVE_CASES[case]
    ref, fast = _pair(base, **kw)
    quiet(ref.save_pretrained, tmp_path / "peft")
    quiet(fast.save_pretrained, tmp_path / "fast")
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "peft" / f).read_bytes() == (tmp_path / "fast" / f).read_bytes(), f
    loaded_fast = quiet(fastlora.from_pretrained, base(), tmp_path / "peft")
    loaded_ref = quiet(peft.PeftModel.from_pretrained, base(), tmp_path / "fast")
    assert type(loaded_fast) is type(loaded_ref) and all(w is None for w in fastlora.fused_layers(loaded_fast).values())
    assert not any(p.requires_grad for p in loaded_fast.parameters())  # PEFT's default: inference mode
    _same(loaded_ref, loaded_fast, "loaded")
    _same(ref, loaded_fast, "loaded vs saved")
    trainable = quiet(fastlora.from_pretrained, base(), tmp_path / "peft", is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or "modules_to_save" in n for n in names)
    quiet(loaded_fast.save_pretrained, tmp_path / "again")
    assert ((tmp_path / "again" / "adapter_model.safetensors").read_bytes()
            == (tmp_path / "peft" / "adapter_model.safetensors").read_bytes())
