"""PEFT's LoRA on expert parameters (``LoraConfig(target_parameters=...)``, ``ParamWrapper``) run by fastlora's
experts fuser, against PEFT itself on tiny random Qwen3-MoE, Mixtral and GPT-OSS models: logits and every
gradient (adapters and the input embeddings), fp16/bf16 by the low-precision rule, nested and single wrappers,
several adapters, save/load, merge/unmerge, HF Trainer losses, the reasons for PEFT's path, and a dispatch-mode
shape log proving that no (E, out, in) tensor is allocated in a training step."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fastlora  # noqa: E402
from helpers import AllocatedShapes, assert_close, assert_low_precision_close  # noqa: E402

BOTH = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss"]


def tiny_moe(family: str, seed: int = 0, experts: int = 4, top_k: int = 2):
    torch.manual_seed(seed)
    common = dict(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=16, num_experts_per_tok=top_k)
    if family == "qwen3_moe":
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            intermediate_size=64, moe_intermediate_size=24, num_experts=experts, decoder_sparse_step=1, **common))
    elif family == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            intermediate_size=24, num_local_experts=experts, **common))
    else:
        model = transformers.GptOssForCausalLM(transformers.GptOssConfig(
            intermediate_size=24, num_local_experts=experts, **common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or "router" in name or "gate.weight" in name:
                p.normal_(0, 0.2)
    return model


def lora_config(targets=BOTH, r=3, alpha=5, **kw):
    return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=[], target_parameters=list(targets),
                           init_lora_weights=False, **kw)


def twins(family, targets=BOTH, dtype=torch.float32, **kw):
    """(PEFT's model, the same model accelerated by fastlora)."""
    base = tiny_moe(family).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = peft.get_peft_model(copy.deepcopy(base), lora_config(targets, **kw))
        fused = fastlora.accelerate_peft(copy.deepcopy(plain))
    return plain, fused


def _experts_wrappers(model):
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "ParamWrapper"}


def _step(model, ids, embeds_dtype=None):
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    out = model(inputs_embeds=emb, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.logits, out.loss, emb.grad, grads


class _NoPeftForward:
    """Counts calls of PEFT's own ParamWrapper.forward (the path that builds the (E, out, in) deltas)."""

    def __enter__(self):
        from peft.tuners.lora.layer import ParamWrapper

        self.cls, self.orig, self.calls = ParamWrapper, ParamWrapper.forward, 0

        def counting(layer, *a, **k):
            self.calls += 1
            return self.orig(layer, *a, **k)

        ParamWrapper.forward = counting
        return self

    def __exit__(self, *exc):
        self.cls.forward = self.orig


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets", [BOTH, BOTH[:1], BOTH[1:]], ids=["both", "gate_up", "down"])
def test_logits_and_every_gradient_equal_peft(family, targets, torch_backend):
    plain, fused = twins(family, targets)
    reasons = fastlora.fused_layers(fused)
    assert reasons and all(v is None for v in reasons.values()), reasons
    ids = torch.randint(0, 48, (2, 7))
    want = _step(plain, ids)
    with _NoPeftForward() as spy:
        got = _step(fused, ids)
    assert spy.calls == 0, "PEFT's ParamWrapper.forward ran"
    assert_close(got[0], want[0], 1e-5, 1e-5, "logits")
    assert_close(got[2], want[2], 1e-5, 1e-5, "d inputs_embeds")
    assert set(got[3]) == set(want[3]) and len(got[3]) == 2 * len(targets) * 2
    for name in want[3]:
        assert_close(got[3][name], want[3][name], 1e-5, 1e-5, name)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_kernels_equal_peft(family, triton_backend):
    """The same through the Triton kernels (the interpreter on CPU)."""
    plain, fused = twins(family)
    ids = torch.randint(0, 48, (1, 5))
    want, got = _step(plain, ids), _step(fused, ids)
    assert_close(got[0], want[0], 1e-4, 1e-4, "logits")
    for name in want[3]:
        assert_close(got[3][name], want[3][name], 1e-4, 1e-4, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_half_precision_by_the_low_precision_rule(family, dtype, torch_backend):
    """fp16/bf16 models (PEFT keeps the adapters in fp32): fastlora within twice PEFT's own error of the float64
    result, plus a small atol, for the logits and the adapters' gradients."""
    plain, fused = twins(family, dtype=dtype)
    ref = copy.deepcopy(plain).double()
    ref.base_model.model.set_experts_implementation("eager")  # torch's grouped_mm has no float64
    ids = torch.randint(0, 48, (2, 6))
    want, got, exact = _step(plain, ids), _step(fused, ids), _step(ref, ids)
    assert got[0].dtype == dtype
    assert_low_precision_close(got[0], exact[0], want[0], 2e-2, "logits")
    for name in want[3]:
        assert_low_precision_close(got[3][name], exact[3][name], want[3][name], 2e-2, name)


def test_several_adapters_and_switching(torch_backend):
    plain, fused = twins("qwen3_moe")
    for m in (plain, fused):
        torch.manual_seed(1)
        m.add_adapter("other", lora_config(r=2, alpha=3))
        m.base_model.set_adapter(["default", "other"])
    assert all(v is None for v in fastlora.fused_layers(fused).values())
    ids = torch.randint(0, 48, (2, 5))
    want, got = _step(plain, ids), _step(fused, ids)
    assert_close(got[0], want[0], 1e-5, 1e-5, "logits, two adapters")
    for name in want[3]:
        assert_close(got[3][name], want[3][name], 1e-5, 1e-5, name)
    for m in (plain, fused):
        m.set_adapter("other")
    assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, 1e-5, 1e-5, "logits, other")


def test_save_load_merge_unmerge(tmp_path, torch_backend):
    plain, fused = twins("mixtral")
    ids = torch.randint(0, 48, (2, 6))
    plain.save_pretrained(tmp_path / "plain")
    fused.save_pretrained(tmp_path / "fused")
    a = (tmp_path / "plain" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "fused" / "adapter_model.safetensors").read_bytes()
    loaded = fastlora.from_pretrained(tiny_moe("mixtral"), tmp_path / "fused")
    assert all(v is None for v in fastlora.fused_layers(loaded).values())
    assert_close(loaded(input_ids=ids).logits, plain(input_ids=ids).logits, 1e-5, 1e-5, "loaded")
    before = fused(input_ids=ids).logits
    fused.merge_adapter()
    assert all(v is not None and "merged" in v for v in fastlora.fused_layers(fused).values())
    assert_close(fused(input_ids=ids).logits, before, 1e-5, 1e-5, "merged")
    fused.unmerge_adapter()
    assert all(v is None for v in fastlora.fused_layers(fused).values())
    assert_close(fused(input_ids=ids).logits, before, 1e-5, 1e-5, "unmerged")
    with fused.disable_adapter():
        with plain.disable_adapter():
            assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, 1e-6, 1e-6, "disabled")
    merged = fused.merge_and_unload()
    assert_close(merged(input_ids=ids).logits, before, 1e-5, 1e-5, "merge_and_unload")


def test_reasons_for_peft_path(torch_backend):
    plain, fused = twins("qwen3_moe")
    outer = next(m for n, m in _experts_wrappers(fused).items() if n.endswith("layers.0.mlp.experts"))
    inner = outer.base_layer
    handle = inner.lora_A["default"].register_forward_hook(lambda *a: None)
    name = next(n for n, m in fused.named_modules() if m is outer)
    assert "hook on gate_up_proj lora_A['default']" in fastlora.fused_layers(fused)[name]
    handle.remove()
    experts = inner.base_layer
    experts.config._experts_implementation_internal = "sonicmoe"
    assert "experts implementation 'sonicmoe'" in fastlora.fused_layers(fused)[name]
    experts.config._experts_implementation_internal = "grouped_mm"
    assert fastlora.fused_layers(fused)[name] is None
    ids = torch.randint(0, 48, (1, 4))
    assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, 1e-5, 1e-5, "after")



@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_no_expert_sized_tensor_in_a_training_step(family, backend):
    """A forward and backward allocates no (E, out, in) / (E, in, out) tensor (nor one expert's (out, in)), on
    either backend; PEFT's path does (the proof that the log sees them)."""
    plain, fused = twins(family)
    stacks = {tuple(p.shape) for n, p in fused.named_parameters() if p.dim() == 3}
    stacks |= {(s[0], s[2], s[1]) for s in stacks} | {s[1:] for s in stacks} | {(s[2], s[1]) for s in stacks}
    ids = torch.randint(0, 48, (2, 5))
    with AllocatedShapes() as log:
        fused(input_ids=ids, labels=ids).loss.backward()
    assert not (log.shapes & stacks), sorted(log.shapes & stacks)
    with AllocatedShapes() as log:
        plain(input_ids=ids, labels=ids).loss.backward()
    assert log.shapes & stacks


def test_saved_bytes_below_peft(torch_backend):
    """Autograd saves less than PEFT's path (which keeps the merged (E, out, in) stacks for backward)."""
    plain, fused = twins("qwen3_moe")
    ids = torch.randint(0, 48, (2, 16))

    def saved(model):
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids).loss
        return sum(seen.values())

    assert saved(fused) < saved(plain)


def test_trainer_losses_equal_peft(tmp_path, torch_backend):
    """HF Trainer, a few AdamW steps on a tiny Qwen3-MoE: the same losses as PEFT's."""
    from torch.utils.data import Dataset

    class Ids(Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(3)
            self.rows = torch.randint(0, 48, (8, 12), generator=g)

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return {"input_ids": self.rows[i], "labels": self.rows[i]}

    losses = {}
    plain, fused = twins("qwen3_moe")
    for name, model in (("peft", plain), ("fastlora", fused)):
        args = transformers.TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=4,
                                              max_steps=4, learning_rate=1e-2, logging_steps=1, report_to=[],
                                              save_strategy="no", use_cpu=True, seed=0, data_seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Ids())
        trainer.train()
        losses[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses["peft"]) == 4
    assert_close(torch.tensor(losses["fastlora"]), torch.tensor(losses["peft"]), 1e-4, 1e-4, "losses")


def test_compiled_fullgraph_matches_eager(torch_backend):
    """The accelerated PEFT MoE model under torch.compile(fullgraph=True): routing, the fuser and the op's custom
    ops trace without a graph break; logits and the adapters' gradients equal eager."""
    torch._dynamo.reset()
    _, fused = twins("qwen3_moe")
    ids = torch.randint(0, 48, (2, 7))
    want = _step(fused, ids)
    for p in fused.parameters():
        p.grad = None
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    assert_close(out.logits, want[0], 1e-5, 1e-5, "logits")
    for name, p in fused.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, want[3][name], 1e-5, 1e-5, name)
    torch._dynamo.reset()


@pytest.mark.parametrize("experts,top_k", [(4, 1), (4, 4), (8, 3)])
def test_top_k_and_expert_counts(experts, top_k, torch_backend):
    """top-1, every expert (top-k = E), and more experts than tokens reach (empty and one-token experts)."""
    base = tiny_moe("qwen3_moe", experts=experts, top_k=top_k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = peft.get_peft_model(copy.deepcopy(base), lora_config())
        fused = fastlora.accelerate_peft(copy.deepcopy(plain))
    ids = torch.randint(0, 48, (1, 3))
    want, got = _step(plain, ids), _step(fused, ids)
    assert_close(got[0], want[0], 1e-5, 1e-5, "logits")
    assert_close(got[2], want[2], 1e-5, 1e-5, "d inputs_embeds")
    for name in want[3]:
        assert_close(got[3][name], want[3][name], 1e-5, 1e-5, name)
