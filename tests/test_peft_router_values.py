"""The PEFT router by value: after ``accelerate_peft``, whatever PEFT state the model is put into (several active
adapters, one adapter frozen, scaling changed after acceleration), the output and the gradients equal PEFT's own.
These hold whichever layers the router decides to fuse, so they survive changes in what it can fuse."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastlora  # noqa: E402
from model_helpers import assert_same, perturb_trainable, tiny_llama  # noqa: E402

IDS = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("torch_backend")  # the PyTorch path throughout this file


def _pair(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_llama(bias=True), peft.LoraConfig(init_lora_weights=False, **kw))
        model.add_adapter("other", peft.LoraConfig(init_lora_weights=False, lora_alpha=24, **kw))
    perturb_trainable(model)
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastlora.accelerate_peft(model)
    return model, ref


def _loss_and_grads(model):
    model.zero_grad()
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same(fast, ref, what):
    lf, gf = _loss_and_grads(fast)
    lr, gr = _loss_and_grads(ref)
    assert_same(lf, lr, 1e-6, 1e-6, f"{what}: loss")
    assert set(gf) == set(gr), f"{what}: gradients of {sorted(set(gf) ^ set(gr))} differ in presence"
    for name in gr:
        assert_same(gf[name], gr[name], 1e-5, 1e-5, f"{what}: grad of {name}")


def test_two_active_adapters_after_acceleration():
    fast, ref = _pair(target_modules=["q_proj", "v_proj"])
    for model in (fast, ref):
        model.base_model.set_adapter(["default", "other"])
        model.train()
    _same(fast, ref, "two active adapters")


def test_adapter_switch_and_frozen_halves():
    """Only lora_A (or only lora_B) trainable: the other gets no gradient and the trainable one PEFT's."""
    fast, ref = _pair(target_modules=["q_proj", "v_proj"])
    for which in ("lora_A", "lora_B"):
        for model in (fast, ref):
            model.train()
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(which in name and ".default." in name)
        _same(fast, ref, f"only {which} trainable")


def test_scaling_changed_after_acceleration():
    """PEFT's scale_layer / a changed scaling dict is read at call time, not frozen at acceleration."""
    fast, ref = _pair(target_modules=["q_proj", "v_proj"])
    for model in (fast, ref):
        model.train()
        for module in model.modules():
            if isinstance(module, peft.tuners.lora.layer.Linear):
                module.scaling["default"] = 0.3
    _same(fast, ref, "changed scaling")
