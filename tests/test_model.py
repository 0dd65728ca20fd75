"""get_peft_model / LoraModel against the real peft, on transformers models built from tiny configs."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastlora  # noqa: E402
from fastlora import LoraConfig, LoRAEmbedding, LoRALinear  # noqa: E402
from model_helpers import (assert_same, assert_unchanged, perturb_trainable, state_snapshot, tiny_gpt2,  # noqa: E402
                           tiny_llama, tiny_opt)

llama = tiny_llama
llama_bias = lambda: tiny_llama(bias=True)  # noqa: E731
llama_cls = lambda: tiny_llama(cls="LlamaForSequenceClassification")  # noqa: E731

CASES = {
    "list": (llama, dict(target_modules=["q_proj", "v_proj"])),
    "dotted-suffix-and-full-name": (llama, dict(target_modules=["self_attn.q_proj", "model.layers.0.mlp.up_proj"])),
    "regex-fullmatch": (llama, dict(target_modules=r".*layers\.1\..*(q|k)_proj")),
    "regex-partial-is-no-match": (llama, dict(target_modules=r"q_proj|.*\.v_proj")),
    "all-linear": (llama, dict(target_modules="all-linear")),
    "all-linear-opt-tied-head": (tiny_opt, dict(target_modules="all-linear")),
    "exclude-list": (llama, dict(target_modules="all-linear", exclude_modules=["down_proj", "model.layers.1.mlp.up_proj"])),
    "exclude-regex": (llama, dict(target_modules="all-linear", exclude_modules=r".*layers\.0\..*")),
    "rank-alpha-patterns": (llama, dict(target_modules=["q_proj", "v_proj", "embed_tokens"], use_rslora=True,
                                        rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 5},
                                        alpha_pattern={"v_proj": 3})),
    "bias-none": (llama_bias, dict(target_modules=["q_proj", "v_proj"], bias="none")),
    "bias-all": (llama_bias, dict(target_modules=["q_proj", "v_proj"], bias="all")),
    "bias-lora_only": (llama_bias, dict(target_modules=["q_proj", "v_proj"], bias="lora_only")),
    "opt-bias-all-modules-to-save": (tiny_opt, dict(target_modules=["q_proj", "v_proj"], bias="all",
                                                    modules_to_save=["project_in"])),
    "opt-embedding-tied-head-saved": (tiny_opt, dict(target_modules=["q_proj", "v_proj", "embed_tokens"],
                                                     modules_to_save=["lm_head"])),
    "modules-to-save-suffix": (llama_bias, dict(target_modules=["q_proj"], bias="all", modules_to_save=["norm"])),
    "opt-bias-all-saved-layer-norms": (tiny_opt, dict(target_modules=["v_proj", "fc1"], bias="all",
                                                      modules_to_save=["self_attn_layer_norm"])),
    "seq-cls-head": (llama_cls, dict(target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_counts_targets_and_print_line_match_peft(case, capsys):
    make, kw = CASES[case]
    if "exclude_modules" in kw and "exclude_modules" not in peft.LoraConfig.__dataclass_fields__:
        pytest.skip("this peft has no exclude_modules (peft < 0.14)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = fastlora.get_peft_model(make(), LoraConfig(**kw))
        theirs = peft.get_peft_model(make(), peft.LoraConfig(**kw))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert sorted(ours.targeted_module_names) == sorted(theirs.base_model.targeted_module_names)
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    line_ours, line_theirs = capsys.readouterr().out.strip().splitlines()
    assert line_ours == line_theirs and line_ours.startswith("trainable params: ")
    # per-layer ranks and scalings as PEFT's
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    for name, layer in ours.lora_layers():
        assert (layer.r, layer.scaling) == (peft_layers[name].r["default"], peft_layers[name].scaling["default"])


def test_seed_opt_350m_line(capsys):
    """The seed notebook's facebook/opt-350m (its config, random weights, built on the meta device)."""
    cfg = transformers.OPTConfig(vocab_size=50272, hidden_size=1024, num_hidden_layers=24, ffn_dim=4096,
                                 num_attention_heads=16, max_position_embeddings=2048, word_embed_proj_dim=512,
                                 do_layer_norm_before=False, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                                 dropout=0.1, activation_function="relu")
    with torch.device("meta"):
        model = transformers.OPTForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == 331_196_416
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj", "embed_tokens"],
                        task_type="CAUSAL_LM")
    lora_model = fastlora.get_peft_model(model, config)
    lora_model.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 2,385,408 || all params: 333,581,824 || trainable%: 0.7151\n"
    emb = model.model.decoder.embed_tokens
    assert isinstance(emb, LoRAEmbedding) and emb.lora_A.shape == (16, 50272) and emb.lora_B.shape == (512, 16)
    assert model.lm_head.weight is emb.weight  # tying survives
    assert lora_model.unload() is model and type(model.model.decoder.embed_tokens) is nn.Embedding


def test_layers_share_the_base_tensors_and_forward_like_base_at_init():
    model = tiny_opt().eval()
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    q = model.model.decoder.layers[0].self_attn.q_proj
    lora_model = fastlora.get_peft_model(model, LoraConfig(target_modules=["q_proj", "embed_tokens"], r=4))
    layer = model.model.decoder.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.weight is q.weight and layer.bias is q.bias
    with torch.no_grad():
        assert_same(lora_model(ids).logits, before, 1e-6, 1e-6, "logits at init")
    assert lora_model.config is model.config  # attribute access goes to the wrapped model
    assert lora_model.get_base_model() is model


def test_merge_unmerge_and_merge_and_unload_keep_the_function():
    model = tiny_opt()
    ids = torch.randint(0, 61, (2, 9))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    originals = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    lora_model = fastlora.get_peft_model(
        model, LoraConfig(target_modules=["q_proj", "v_proj", "fc1", "embed_tokens"], r=3, lora_alpha=7,
                          init_lora_weights=False))
    perturb_trainable(lora_model)
    lora_model.eval()
    with torch.no_grad():
        y = lora_model(ids).logits
        with pytest.warns(UserWarning, match="shared with"):
            lora_model.merge_adapter()  # the embedding is tied to lm_head: it says so
        assert all(layer.merged for _, layer in lora_model.lora_layers() if not isinstance(layer, LoRAEmbedding))
        lora_model.unmerge_adapter()
        assert_same(lora_model(ids).logits, y, 1e-5, 1e-5, "after merge/unmerge")
        with pytest.warns(UserWarning, match="own copy"):
            merged = lora_model.merge_and_unload()
        assert merged is model
        assert_same(merged(ids).logits, y, 1e-5, 1e-5, "merge_and_unload")
    assert not any(isinstance(m, (LoRALinear, LoRAEmbedding)) for m in model.modules())
    for n, m in model.named_modules():  # the very module objects that were there before come back
        if n in originals:
            assert m is originals[n], n
    assert not torch.equal(model.state_dict()["model.decoder.layers.0.self_attn.q_proj.weight"],
                           base_state["model.decoder.layers.0.self_attn.q_proj.weight"])


def test_unload_returns_the_same_object_with_original_weights():
    model = tiny_llama(bias=True)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    lora_model = fastlora.get_peft_model(model, LoraConfig(target_modules="all-linear", init_lora_weights=False,
                                                           modules_to_save=["norm"]))
    lora_model.merge_adapter()
    out = lora_model.unload()  # a merged adapter is taken out again
    assert out is model
    assert not any(isinstance(m, (LoRALinear, LoRAEmbedding, fastlora.model.ModulesToSaveWrapper))
                   for m in model.modules())
    for k, v in base_state.items():
        assert_same(model.state_dict()[k], v, 1e-6, 1e-6, k)


def test_modules_to_save_trains_a_copy():
    model = tiny_llama()
    norm = model.model.norm
    lora_model = fastlora.get_peft_model(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["model.norm"]))
    wrapper = model.model.norm
    assert isinstance(wrapper, fastlora.model.ModulesToSaveWrapper) and wrapper.original_module is norm
    assert not norm.weight.requires_grad and wrapper.trainable_module.weight.requires_grad
    assert wrapper.weight is wrapper.trainable_module.weight  # attributes come from the trained copy
    with torch.no_grad():
        wrapper.trainable_module.weight.mul_(2)
    assert lora_model.unload() is model and model.model.norm is wrapper.trainable_module


def test_training_step_moves_only_trainable_parameters():
    model = tiny_llama(bias=True)
    lora_model = fastlora.get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], lora_dropout=0.1,
                                                           bias="lora_only", init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in lora_model.named_parameters()}
    opt = torch.optim.SGD([p for p in lora_model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 61, (2, 9))
    lora_model.train()
    lora_model(ids, labels=ids).loss.backward()
    opt.step()
    for n, p in lora_model.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n


@pytest.mark.parametrize("kw, match", [
    (dict(target_modules=["nonexistent_proj"]), "nonexistent_proj"),
    (dict(target_modules=r"q_proj"), "no module"),  # a regex must match the whole name
    (dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), "excluded"),
    (dict(target_modules=["layers"]), "cannot adapt"),  # a ModuleList
    (dict(target_modules=["rotary_emb"]), "cannot adapt"),
    (dict(target_modules=["q_proj"], modules_to_save=["self_attn"]), "excluded"),
])
def test_bad_targets_raise_and_leave_the_model_unchanged(kw, match):
    model = tiny_llama()
    snap = state_snapshot(model)
    with pytest.raises(ValueError, match=match) as err:
        fastlora.get_peft_model(model, LoraConfig(**kw))
    if "nonexistent" in match:
        assert "q_proj" in str(err.value)  # the message lists what the model's modules are called
    assert_unchanged(model, snap)


def test_conv1d_targets_are_refused_with_the_reason():
    model = tiny_gpt2()
    snap = state_snapshot(model)
    with pytest.raises(ValueError, match="Conv1D"):
        fastlora.get_peft_model(model, LoraConfig(target_modules="all-linear"))
    assert_unchanged(model, snap)


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="bias"):
        LoraConfig(target_modules=["q_proj"], bias="lora")
    with pytest.raises(ValueError, match="r must"):
        LoraConfig(target_modules=["q_proj"], r=0)
    model = tiny_llama()
    fastlora.get_peft_model(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has fastlora"):
        fastlora.get_peft_model(model, LoraConfig(target_modules=["v_proj"]))


def test_default_targets_from_model_type():
    lora_model = fastlora.get_peft_model(tiny_llama(), LoraConfig())
    assert sorted(n.rsplit(".", 1)[-1] for n in lora_model.targeted_module_names) == ["q_proj"] * 2 + ["v_proj"] * 2
    with pytest.raises(ValueError, match="target_modules"):
        fastlora.get_peft_model(nn.Sequential(nn.Linear(2, 2)), LoraConfig())
