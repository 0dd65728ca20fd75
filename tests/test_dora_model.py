"""DoRA at the model level: a PEFT DoRA model whose DoRA layers run through the DoRA fuser (the way the router
calls a registered fuser) trains exactly as PEFT's, and PEFT's merge / unmerge / save / load still agree."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from fastlora.peft_interop import dora as dora_fuser  # noqa: E402
from model_helpers import assert_same, perturb_trainable, tiny_llama  # noqa: E402

IDS = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(0))


class _FusedForward:
    """What the router installs on a layer whose adapters the fuser can run (PEFT's forward otherwise)."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x, *args, **kwargs):
        layer = self.layer
        active = [a for a in layer.active_adapters if a in layer.lora_A or a in layer.lora_embedding_A]
        if args or kwargs or layer.disable_adapters or layer.merged or not active or any(
                dora_fuser.why_not(layer, a) is not None for a in active):
            return type(layer).forward(layer, x, *args, **kwargs)
        return dora_fuser.forward(layer, x, active)


def _dora_model(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_llama(bias=True), peft.LoraConfig(
            use_dora=True, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj",
                                                                    "embed_tokens"], **kw))
    perturb_trainable(model)
    return model


def _fuse(model):
    fused = 0
    for _, layer in model.named_modules():
        if hasattr(layer, "lora_variant") and any(dora_fuser.claims(layer, a) for a in layer.lora_variant):
            assert all(dora_fuser.why_not(layer, a) is None for a in layer.lora_variant)
            layer.forward = _FusedForward(layer)
            fused += 1
    return fused


def test_training_step_equals_peft():
    fast = _dora_model(r=3)
    ref = copy.deepcopy(fast)
    assert _fuse(fast) == 2 * 3 + 1
    fast.train()
    ref.train()
    loss, loss_ref = fast(IDS, labels=IDS).loss, ref(IDS, labels=IDS).loss
    assert_same(loss, loss_ref, 1e-6, 1e-6, "loss")
    loss.backward()
    loss_ref.backward()
    grads = dict(ref.named_parameters())
    names = [n for n, p in fast.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names) and any("embed_tokens" in n for n in names)
    for n in names:
        assert_same(fast.get_parameter(n).grad, grads[n].grad, 1e-5, 1e-5, f"grad of {n}")


def test_merge_unmerge_save_load_match_peft(tmp_path):
    fast = _dora_model(r=2)
    ref = copy.deepcopy(fast)
    _fuse(fast)
    fast.eval()
    ref.eval()
    with torch.no_grad():
        before = ref(IDS).logits
        assert_same(fast(IDS).logits, before, 1e-5, 1e-5, "fused eval")
        fast.merge_adapter()
        ref.merge_adapter()
        assert_same(fast(IDS).logits, ref(IDS).logits, 1e-5, 1e-5, "merged")
        assert_same(fast(IDS).logits, before, 1e-4, 1e-4, "merged vs unmerged")
        fast.unmerge_adapter()
        ref.unmerge_adapter()
        assert_same(fast(IDS).logits, ref(IDS).logits, 1e-5, 1e-5, "unmerged")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fast.save_pretrained(tmp_path / "a")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = peft.PeftModel.from_pretrained(tiny_llama(bias=True), tmp_path / "a")
        _fuse(loaded)
        loaded.eval()
        assert_same(loaded(IDS).logits, before, 1e-5, 1e-5, "saved and loaded")
        merged = fast.merge_and_unload()
        assert_same(merged(IDS).logits, before, 1e-4, 1e-4, "merge_and_unload")
