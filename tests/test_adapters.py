"""PEFT-format adapter files, both directions, against the real peft."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

import fastlora  # noqa: E402
from fastlora import LoraConfig  # noqa: E402
from model_helpers import (assert_same, assert_unchanged, perturb_trainable, state_snapshot, tiny_llama,  # noqa: E402
                           tiny_opt)

CASES = {
    "llama-embed-patterns-rslora": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "embed_tokens"],
                                                     rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3},
                                                     use_rslora=True)),
    "llama-all-linear-bias-all-saved-norm": (lambda: tiny_llama(bias=True),
                                             dict(target_modules="all-linear", bias="all", modules_to_save=["norm"])),
    "opt-lora_only-regex-saved": (tiny_opt, dict(target_modules=r".*\.(q_proj|v_proj|fc1)", bias="lora_only",
                                                 modules_to_save=["project_in"], exclude_modules=["layers.1.fc1"])),
}
IDS = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")
    return ctx


@pytest.mark.parametrize("case", list(CASES))
def test_fastlora_writes_what_peft_loads(case, tmp_path):
    make, kw = CASES[case]
    ours = fastlora.get_peft_model(make(), LoraConfig(init_lora_weights=False, **kw))
    perturb_trainable(ours)
    ours.eval()
    ours.save_pretrained(tmp_path)
    ctx = _quiet()
    theirs = peft.PeftModel.from_pretrained(make(), str(tmp_path)).eval()
    ctx.__exit__(None, None, None)
    assert_same(_logits(theirs), _logits(ours), 1e-5, 1e-5, "logits, PEFT loading fastlora's files")
    # and fastlora reads its own files back
    again = fastlora.LoraModel.from_pretrained(make(), tmp_path)
    assert_same(_logits(again), _logits(ours), 1e-6, 1e-6, "logits, fastlora loading its own files")


@pytest.mark.parametrize("case", list(CASES))
def test_fastlora_loads_what_peft_writes(case, tmp_path):
    make, kw = CASES[case]
    ctx = _quiet()
    theirs = peft.get_peft_model(make(), peft.LoraConfig(init_lora_weights=False, **kw))
    perturb_trainable(theirs)
    theirs.eval()
    theirs.save_pretrained(str(tmp_path))
    ctx.__exit__(None, None, None)
    ours = fastlora.LoraModel.from_pretrained(make(), tmp_path)
    assert not ours.training and ours.get_nb_trainable_parameters()[0] == 0  # is_trainable=False, as PEFT
    assert_same(_logits(ours), _logits(theirs), 1e-5, 1e-5, "logits, fastlora loading PEFT's files")
    trainable = fastlora.LoraModel.from_pretrained(make(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_file_keys_dtypes_and_config_fields_match_peft(tmp_path, dtype):
    kw = dict(target_modules=["q_proj", "v_proj", "embed_tokens"], bias="all", modules_to_save=["lm_head"], r=4,
              lora_alpha=8, lora_dropout=0.05)
    ours = fastlora.get_peft_model(tiny_opt().to(dtype), LoraConfig(**kw))
    ours.save_pretrained(tmp_path / "ours")
    ctx = _quiet()
    peft.get_peft_model(tiny_opt().to(dtype), peft.LoraConfig(**kw)).save_pretrained(str(tmp_path / "peft"))
    ctx.__exit__(None, None, None)
    a = safetensors_torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    b = safetensors_torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
    assert a["base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight"].dtype == torch.float32
    assert "base_model.model.model.decoder.embed_tokens.lora_embedding_A" in a
    ca = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    cb = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for field, value in ca.items():
        assert field in cb, f"{field} is not a PEFT field"
        if field == "target_modules":
            assert sorted(value) == sorted(cb[field])
        elif field != "base_model_name_or_path":
            assert value == cb[field], field


def test_save_embedding_layers_switch(tmp_path):
    ours = fastlora.get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "embed_tokens"]))
    ours.save_pretrained(tmp_path / "auto")
    ours.save_pretrained(tmp_path / "off", save_embedding_layers=False)
    auto = safetensors_torch.load_file(tmp_path / "auto" / "adapter_model.safetensors")
    off = safetensors_torch.load_file(tmp_path / "off" / "adapter_model.safetensors")
    assert set(auto) - set(off) == {"base_model.model.model.embed_tokens.base_layer.weight"}
    fastlora.LoraModel.from_pretrained(tiny_llama(), tmp_path / "off")  # the base table is optional on load


def _saved_dir(tmp_path, **kw):
    kw = {"target_modules": ["q_proj", "v_proj"], **kw}
    fastlora.get_peft_model(tiny_llama(), LoraConfig(init_lora_weights=False, **kw)).save_pretrained(tmp_path)
    return tmp_path


def _edit_config(path, **changes):
    p = path / "adapter_config.json"
    d = json.loads(p.read_text())
    d.update(changes)
    p.write_text(json.dumps(d))


def _edit_tensors(path, fn):
    p = path / "adapter_model.safetensors"
    t = safetensors_torch.load_file(p)
    fn(t)
    safetensors_torch.save_file(t, p)


BAD = {
    "no-dir": (lambda d: d / "nowhere", FileNotFoundError, "not a directory"),
    "no-config": (lambda d: (os.remove(d / "adapter_config.json"), d)[1], FileNotFoundError, "adapter_config.json"),
    "no-weights": (lambda d: (os.remove(d / "adapter_model.safetensors"), d)[1], FileNotFoundError,
                   "adapter_model.safetensors"),
    "bad-json": (lambda d: ((d / "adapter_config.json").write_text("{r: 4"), d)[1], ValueError, "not valid JSON"),
    "damaged-weights": (lambda d: ((d / "adapter_model.safetensors").write_bytes(b"\x00" * 20), d)[1], ValueError,
                        "safetensors"),
    "rank-mismatch": (lambda d: (_edit_config(d, r=5), d)[1], ValueError, "shape mismatch"),
    "more-targets-in-config": (lambda d: (_edit_config(d, target_modules=["q_proj", "v_proj", "k_proj"]), d)[1],
                               ValueError, "missing tensor"),
    "fewer-targets-in-config": (lambda d: (_edit_config(d, target_modules=["q_proj"]), d)[1], ValueError,
                                "match nothing"),
    "tensor-dropped": (lambda d: (_edit_tensors(d, lambda t: t.pop(sorted(t)[0])), d)[1], ValueError, "missing"),
    "dora": (lambda d: (_edit_config(d, use_dora=True), d)[1], ValueError, "use_dora"),
    "not-lora": (lambda d: (_edit_config(d, peft_type="IA3"), d)[1], ValueError, "peft_type"),
    "bad-bias": (lambda d: (_edit_config(d, bias="everything"), d)[1], ValueError, "bias"),
    "target-missing-in-model": (lambda d: (_edit_config(d, target_modules=["attention.wq"]), d)[1], ValueError,
                                "attention.wq"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_dirs_raise_and_leave_the_model_unchanged(case, tmp_path):
    damage, exc, match = BAD[case]
    path = damage(_saved_dir(tmp_path))
    model = tiny_llama(seed=3)
    snap = state_snapshot(model)
    with pytest.raises(exc, match=match):
        fastlora.LoraModel.from_pretrained(model, path)
    assert_unchanged(model, snap)
