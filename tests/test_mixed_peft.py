"""Mixed-adapter batches at the model level: PEFT's ``adapter_names=`` (forward and generate) on accelerated models
runs fastlora's fused op and equals PEFT's own mixed batch (the oracle); training on mixed batches
(``fastlora.allow_mixed_batch_training``) gives every adapter what training it alone gives."""
from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import fastlora  # noqa: E402
from fastlora.mixed import MIXED_LORA_LINEAR  # noqa: E402
from model_helpers import assert_same, perturb_trainable, tiny_gpt2, tiny_llama  # noqa: E402


# The model-level tests run the PyTorch path (the kernels are checked in tests/test_mixed.py): fast on CPU.
pytestmark = pytest.mark.usefixtures("torch_backend")


def refuse_peft_mixed_loop(monkeypatch):
    """From now on PEFT's own mixed-batch loop raises: what runs must be fastlora's."""
    from peft.tuners.lora import layer

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"PEFT's _mixed_batch_forward ran on {type(self).__name__}")

    for cls in (layer.Linear, layer.Embedding):
        monkeypatch.setattr(cls, "_mixed_batch_forward", refuse)


class _Calls(list):
    """The ``ranks`` of every call of the mixed op, in order; ``args``: each call's tensors."""

    def __init__(self):
        super().__init__()
        self.args = []


@pytest.fixture
def op_calls(monkeypatch):
    calls = _Calls()
    original = type(MIXED_LORA_LINEAR).__call__

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("ranks"))
        calls.args.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(MIXED_LORA_LINEAR), "__call__", counted)
    return calls


def _configs(targets, embedding=None):
    from peft import LoraConfig

    base = dict(target_modules=targets, init_lora_weights=False)
    if embedding:
        base["target_modules"] = targets + [embedding]
    return {
        "en": LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, **base),
        "de": LoraConfig(r=5, lora_alpha=3, **base),
        "fr": LoraConfig(r=3, lora_alpha=6, lora_bias=True, **dict(base, target_modules=targets)),
    }


def _twins(make_model, targets, embedding=None):
    """(plain PEFT model, the same model accelerated), three adapters of ranks 2, 5, 3 (c with lora_bias)."""
    from peft import get_peft_model

    cfgs = _configs(targets, embedding)
    model = get_peft_model(make_model(), cfgs["en"], adapter_name="en")
    for name in ("de", "fr"):
        model.add_adapter(name, cfgs[name])
    perturb_trainable(model)
    model.eval()
    return model, fastlora.accelerate_peft(copy.deepcopy(model))


NAMES = ["en", "de", "__base__", "fr", "de", "en"]


@pytest.mark.parametrize("make_model, targets, embedding", [
    (tiny_llama, ["q_proj", "v_proj", "down_proj"], "embed_tokens"),
    (tiny_gpt2, ["c_attn", "c_fc"], "wte"),  # transformers Conv1D bases
])
def test_forward_equals_peft_mixed_batch(make_model, targets, embedding, monkeypatch):
    plain, fused = _twins(make_model, targets, embedding)
    ids = torch.randint(1, 61, (len(NAMES), 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = plain(input_ids=ids, adapter_names=NAMES).logits  # the oracle: PEFT's own loop
        refuse_peft_mixed_loop(monkeypatch)
        actual = fused(input_ids=ids, adapter_names=NAMES).logits
    assert_same(actual, expected, atol=2e-5, rtol=2e-5, name="logits")


def test_generate_with_adapter_names_and_beams():
    plain, fused = _twins(tiny_llama, ["q_proj", "v_proj"], "embed_tokens")
    ids = torch.randint(1, 61, (3, 5), generator=torch.Generator().manual_seed(1))
    names = ["de", "__base__", "en"]
    for kwargs in (dict(do_sample=False), dict(do_sample=False, num_beams=2)):
        expected = plain.generate(input_ids=ids, adapter_names=names, max_new_tokens=4, pad_token_id=0, **kwargs)
        actual = fused.generate(input_ids=ids, adapter_names=names, max_new_tokens=4, pad_token_id=0, **kwargs)
        assert torch.equal(actual, expected), kwargs


def test_mixed_batch_runs_the_fused_op(op_calls):
    plain, fused = _twins(tiny_llama, ["q_proj", "v_proj"])
    ids = torch.randint(1, 61, (4, 3), generator=torch.Generator().manual_seed(2))
    fused.train()  # in training (with the opt-in) and with gradients: the batch's adapters packed, a copy
    fastlora.allow_mixed_batch_training(fused)
    fused(input_ids=ids, adapter_names=["fr", "en", "en", "__base__"])
    # 2 layers x 2 targets, each with the two adapters of the batch (fr: rank 3, en: rank 2), packed by rank
    assert op_calls == [[2, 3]] * 4
    fused.eval()
    del op_calls[:], op_calls.args[:]
    with torch.no_grad():  # inference: every adapter of the layer, read where it lies (the bank), no copy
        fused(input_ids=ids, adapter_names=["fr", "en", "en", "__base__"])
    assert op_calls == [[2, 3, 5]] * 4
    layer = fused.base_model.model.model.layers[0].self_attn.q_proj
    A, B = op_calls.args[0][3], op_calls.args[0][4]
    for a in ("en", "fr", "de"):
        for w, packed in ((layer.lora_A[a].weight, A), (layer.lora_B[a].weight, B)):
            assert w.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr(), a


def test_peft_rules_kept():
    plain, fused = _twins(tiny_llama, ["q_proj", "v_proj"])
    ids = torch.randint(1, 61, (2, 3))
    for model in (plain, fused):
        with pytest.raises(ValueError, match="non-existing adapter"):
            model(input_ids=ids, adapter_names=["en", "nope"])
        model.train()
        with pytest.raises(ValueError, match="training mode"):  # PEFT's rule without fastlora's opt-in
            model(input_ids=ids, adapter_names=["en", "de"])
        model.eval()
    with torch.no_grad():  # all base: the base model's output
        with fused.disable_adapter():
            base = fused(input_ids=ids).logits
        assert_same(fused(input_ids=ids, adapter_names=["__base__"] * 2).logits, base, name="all __base__")


def test_dora_adapter_in_a_mixed_batch_raises_as_peft():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="plain")
    model.add_adapter("dora", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    model = fastlora.accelerate_peft(model)
    model.eval()
    with pytest.raises(ValueError, match="DoRA"):
        model(input_ids=torch.randint(1, 61, (2, 3)), adapter_names=["plain", "dora"])


def test_fused_layers_reason_for_a_mixed_call():
    from fastlora.peft_interop import mixed

    plain, fused = _twins(tiny_llama, ["q_proj"])
    layer = fused.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 16)
    assert mixed.why_not(layer, x, ["en", "de"]) is None
    assert mixed.why_not(layer, x, ["en"]) == "adapter_names is not one name per sample"
    assert mixed.why_not(layer, x, ["__base__", "zzz"]) == "no adapter of this layer in the batch"
    layer.lora_A["en"].register_forward_hook(lambda *args: None)
    assert mixed.why_not(layer, x, ["en", "de"]) == "hook on lora_A['en']"


# --------------------------------------------------------------------------------------------------------------
# Training several adapters in one pass
# --------------------------------------------------------------------------------------------------------------

def _sum_loss(model, ids, labels, **kwargs):
    """Cross-entropy summed over every token of every sample: a sum of per-sample terms, so each adapter's
    gradient is the sum over its own samples."""
    logits = model(input_ids=ids, **kwargs).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), reduction="sum")


def _two_adapter_model(dropout=0.0):
    from peft import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=dropout,
                     init_lora_weights=False)
    model = fastlora.get_peft_model(tiny_llama(), cfg, adapter_name="task_a")
    model.add_adapter("task_b", cfg)
    model.add_adapter("frozen", cfg)
    perturb_trainable(model)
    return model


def _task_batches(steps=3):
    """Two toy tasks: copy a sequence (task a) and reverse it (task b)."""
    g = torch.Generator().manual_seed(4)
    out = []
    for _ in range(steps):
        xa = torch.randint(1, 61, (2, 6), generator=g)
        xb = torch.randint(1, 61, (3, 6), generator=g)
        out.append(((xa, xa.clone()), (xb, xb.flip(1))))
    return out


def _lora_params(model, adapter):
    return {n: p for n, p in model.named_parameters() if f".{adapter}." in n}


def test_training_requires_the_opt_in_and_the_fastlora_router():
    model = _two_adapter_model()
    with pytest.raises(ValueError, match="accelerate_peft"):
        from peft import LoraConfig, get_peft_model

        fastlora.allow_mixed_batch_training(get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])))
    fastlora.allow_mixed_batch_training(model)
    model.train()
    ids = torch.randint(1, 61, (2, 4))
    model(input_ids=ids, adapter_names=["task_a", "task_b"])  # no error
    fastlora.allow_mixed_batch_training(model, allow=False)
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=ids, adapter_names=["task_a", "task_b"])


def test_gradient_checkpointing_is_refused_not_silently_wrong():
    """A checkpointed layer recomputed in the backward would not see adapter_names (PEFT's hooks live for the
    forward): refused with a reason instead of wrong gradients."""
    model = _two_adapter_model()
    fastlora.allow_mixed_batch_training(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids=torch.randint(1, 61, (2, 4)), adapter_names=["task_a", "task_b"])


def test_one_step_gradients_equal_separate_runs_and_frozen_adapters_get_none():
    model = _two_adapter_model()
    model.base_model.set_adapter(["task_a", "task_b"])  # trainable; "frozen" stays frozen
    fastlora.allow_mixed_batch_training(model)
    model.train()
    (xa, ya), (xb, yb) = _task_batches(1)[0]
    ids = torch.cat([xa, xb.new_zeros(1, 6) + 5, xb])
    labels = torch.cat([ya, yb.new_zeros(1, 6) + 5, yb])
    names = ["task_a"] * 2 + ["frozen"] + ["task_b"] * 3
    _sum_loss(model, ids, labels, adapter_names=names).backward()
    mixed = {a: {n: p.grad.clone() for n, p in _lora_params(model, a).items()} for a in ("task_a", "task_b")}
    assert all(p.grad is None for p in _lora_params(model, "frozen").values())
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    for adapter, (x, y) in (("task_a", (xa, ya)), ("task_b", (xb, yb))):
        model.zero_grad(set_to_none=True)
        _sum_loss(model, x, y, adapter_names=[adapter] * len(x)).backward()
        for n, p in _lora_params(model, adapter).items():
            assert_same(mixed[adapter][n], p.grad, atol=1e-5, rtol=1e-4, name=f"{n} grad")


def test_two_adapters_trained_in_one_loop_match_each_trained_alone():
    """The issue's check: two adapters, two toy tasks, one loop over mixed batches; each adapter ends where training
    it alone (its own model, its own rows, the same optimizer) ends."""
    start = _two_adapter_model()
    mixed = copy.deepcopy(start)
    mixed.base_model.set_adapter(["task_a", "task_b"])
    fastlora.allow_mixed_batch_training(mixed)
    mixed.train()
    opt = torch.optim.AdamW([p for p in mixed.parameters() if p.requires_grad], lr=1e-2)
    for (xa, ya), (xb, yb) in _task_batches():
        opt.zero_grad()
        loss = _sum_loss(mixed, torch.cat([xa, xb]), torch.cat([ya, yb]),
                         adapter_names=["task_a"] * len(xa) + ["task_b"] * len(xb))
        loss.backward()
        opt.step()
    for adapter, task in (("task_a", 0), ("task_b", 1)):
        alone = copy.deepcopy(start)
        alone.set_adapter(adapter)
        alone.train()
        opt = torch.optim.AdamW([p for p in alone.parameters() if p.requires_grad], lr=1e-2)
        for batch in _task_batches():
            x, y = batch[task]
            opt.zero_grad()
            _sum_loss(alone, x, y).backward()
            opt.step()
        trained, expected = _lora_params(mixed, adapter), _lora_params(alone, adapter)
        moved = max(float((p - _lora_params(start, adapter)[n]).detach().abs().max()) for n, p in expected.items())
        assert moved > 1e-3  # training did move the adapter
        for n, p in expected.items():
            assert_same(trained[n], p, atol=1e-5, rtol=1e-4, name=n)


def test_dropout_is_per_adapter_in_training():
    """Adapter en drops (p = 0.5), adapter de does not: in training, de's rows equal the eval output, en's differ."""
    from peft import LoraConfig

    model = fastlora.get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.5,
                                 init_lora_weights=False), adapter_name="en")
    model.add_adapter("de", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    fastlora.allow_mixed_batch_training(model)
    ids = torch.randint(1, 61, (4, 5), generator=torch.Generator().manual_seed(3))
    names = ["en", "de", "en", "de"]
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids, adapter_names=names).logits
        model.train()
        out = model(input_ids=ids, adapter_names=names).logits
    assert_same(out[1::2], ref[1::2], name="rows of the adapter without dropout")
    assert float((out[0::2] - ref[0::2]).abs().max()) > 1e-3


def test_a_batch_run_in_inference_mode_then_trains():
    """Adapters of two dtypes (no bank: packed per call) run in inference mode, then train on the same names: the
    cached row index and scalings made in inference mode must not reach the training call, whose op saves them
    for the backward (torch refuses to save inference tensors). Gradients equal PEFT's loop on the same layer."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(32, 24)),
                           LoraConfig(r=4, target_modules=["0"], init_lora_weights=False), adapter_name="en")
    model.add_adapter("de", LoraConfig(r=8, target_modules=["0"], init_lora_weights=False))
    model.base_model.set_adapter(["en", "de"])
    layer = model.base_model.model[0]
    for n, p in layer.named_parameters():
        if ".de." in n:
            p.data = p.data.double()
    fused = fastlora.accelerate_peft(copy.deepcopy(model)).base_model.model[0]
    x = torch.randn(4, 32)
    names = ["en", "de", "en", "__base__"]
    with torch.inference_mode():
        fused(x, adapter_names=names)
    expected, actual = layer(x, adapter_names=names), fused(x, adapter_names=names)
    assert_same(actual, expected, name="training-mode output")
    expected.square().sum().backward()
    actual.square().sum().backward()
    mine = dict(fused.named_parameters())
    for n, p in layer.named_parameters():
        if p.requires_grad:
            assert_same(mine[n].grad, p.grad, name=n)


def test_a_mixed_batch_compiles_in_one_graph():
    """torch.compile(fullgraph=True) of an accelerated layer called with adapter_names: the PEFT-level call
    (checks, names, row index) traces without a graph break, and two batches of other names give PEFT's output."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(32, 24)),
                           LoraConfig(r=4, target_modules=["0"], init_lora_weights=False), adapter_name="en")
    model.add_adapter("de", LoraConfig(r=8, target_modules=["0"], init_lora_weights=False))
    model.eval()
    layer = model.base_model.model[0]
    fused = fastlora.accelerate_peft(copy.deepcopy(model)).base_model.model[0]
    compiled = torch.compile(fused, fullgraph=True, backend="eager")
    x = torch.randn(4, 3, 32)
    with torch.no_grad():
        for names in (["en", "de", "__base__", "de"], ["de", "de", "en", "__base__"]):
            assert_same(compiled(x, adapter_names=names), layer(x, adapter_names=names), name=str(names))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_base_with_fp32_adapters_equals_peft(dtype):
    """PEFT keeps the adapters in fp32 on a half base: the low-rank terms in fp32, rounded once into the half
    output, as PEFT's loop does."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(32, 24)),
                           LoraConfig(r=4, target_modules=["0"], init_lora_weights=False), adapter_name="en")
    model.add_adapter("de", LoraConfig(r=8, target_modules=["0"], init_lora_weights=False))
    layer = model.base_model.model[0]
    layer.base_layer.to(dtype)
    assert layer.lora_A["en"].weight.dtype == torch.float32
    fused = fastlora.accelerate_peft(copy.deepcopy(model)).base_model.model[0]
    names = ["en", "de", "__base__", "de", "en", "en"]
    x = torch.randn(len(names), 5, 32).to(dtype)
    with torch.no_grad():
        expected = layer(x, adapter_names=names)
        actual = fused(x, adapter_names=names)
    assert actual.dtype == expected.dtype == dtype
    assert_same(actual, expected, atol=1e-2, rtol=1e-2, name=str(dtype))


# --------------------------------------------------------------------------------------------------------------
# The adapter bank: inference reads each layer's adapters where they lie
# --------------------------------------------------------------------------------------------------------------

def _same_logits(plain, fused, ids, names, what):
    with torch.no_grad():
        expected = plain(input_ids=ids, adapter_names=names).logits
        actual = fused(input_ids=ids, adapter_names=names).logits
    assert_same(actual, expected, atol=2e-5, rtol=2e-5, name=what)


def _lora_weights(model, adapter):
    return [p for n, p in model.named_parameters() if f"lora_A.{adapter}." in n or f"lora_B.{adapter}." in n]


def test_the_bank_reads_the_parameters_live():
    """After a mixed inference call every adapter of a layer is a view of the layer's bank; whatever changes the
    adapters afterwards (in-place writes that no version counter records, new storage, an optimizer step, an adapter
    added or deleted, a dtype change) shows in the next call, which equals PEFT's."""
    from fastlora.peft_interop.mixed import _BANK
    from peft import LoraConfig

    plain, fused = _twins(tiny_llama, ["q_proj", "v_proj"])
    ids = torch.randint(1, 61, (len(NAMES), 5), generator=torch.Generator().manual_seed(5))
    before = {n: p.detach().clone() for n, p in fused.named_parameters()}
    _same_logits(plain, fused, ids, NAMES, "first call")
    layer = fused.base_model.model.model.layers[0].self_attn.q_proj
    bank = layer.__dict__[_BANK]
    for a in ("en", "de", "fr"):  # moved, values kept
        assert layer.lora_A[a].weight.untyped_storage().data_ptr() == bank.A.untyped_storage().data_ptr()
    for n, p in fused.named_parameters():
        assert torch.equal(p, before[n]), n

    for model in (plain, fused):  # in place through .data: the version counter does not move
        for p in _lora_weights(model, "de"):
            p.data.mul_(-1.5)
    _same_logits(plain, fused, ids, NAMES, "in-place .data write")
    assert layer.__dict__[_BANK] is bank  # read where it lies: no rebuild was needed

    for model in (plain, fused):  # new storage for one adapter's weights
        for p in _lora_weights(model, "fr"):
            p.data = p.data * 0.5 + 0.01
    _same_logits(plain, fused, ids, NAMES, "param.data replaced")

    for model in (plain, fused):  # an optimizer step (fused AdamW writes the parameters in place)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.ones_like(p)
        torch.optim.AdamW(params, lr=0.1, fused=True).step()
        model.eval()
    _same_logits(plain, fused, ids, NAMES, "after an optimizer step")

    for model in (plain, fused):  # an adapter deleted: the bank is rebuilt without it (its memory freed)
        model.delete_adapter("de")
    names = ["fr", "en", "__base__", "fr", "en", "en"]
    _same_logits(plain, fused, ids, names, "adapter deleted")
    assert layer.__dict__[_BANK].names == ["en", "fr"]
    for model in (plain, fused):  # an adapter added (the same random init in both)
        torch.manual_seed(7)
        model.add_adapter("it", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    names = ["it", "en", "__base__", "fr", "it", "en"]
    _same_logits(plain, fused, ids, names, "adapter added")
    assert layer.__dict__[_BANK].names == ["en", "fr", "it"]  # ranks 2, 3, 4

    for model in (plain, fused):
        model.double()
    _same_logits(plain, fused, ids, names, "float64")


def test_the_bank_survives_inference_mode_save_and_load(tmp_path):
    """A bank built in inference mode holds plain tensors (the adapters then train); PEFT saves the moved adapters
    and loads them back, values equal."""
    from peft import PeftModel

    plain, fused = _twins(tiny_llama, ["q_proj", "v_proj"])
    ids = torch.randint(1, 61, (len(NAMES), 5), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        fused(input_ids=ids, adapter_names=NAMES)
    fused.train()
    fused.base_model.set_adapter(["en", "de"])
    fastlora.allow_mixed_batch_training(fused)
    loss = fused(input_ids=ids, adapter_names=["en", "de"] * 3).logits.square().mean()
    loss.backward()  # an inference tensor would refuse to be saved for backward
    assert all(p.grad is not None for p in _lora_weights(fused, "en"))

    fused.eval()
    fused.save_pretrained(tmp_path, selected_adapters=["en", "de", "fr"])
    for a in ("en", "de", "fr"):  # PEFT saves adapters not named "default" in folders of their names
        model = PeftModel.from_pretrained(tiny_llama(), tmp_path / a, adapter_name=a)
        mine = {n: p for n, p in fused.named_parameters() if f".{a}." in n and "lora_" in n}
        theirs = {n: p for n, p in model.named_parameters() if f".{a}." in n and "lora_" in n}
        assert mine.keys() == theirs.keys() and mine, a
        for n in mine:
            assert torch.equal(mine[n], theirs[n]), n


def test_what_a_layer_keeps_for_the_last_batch_follows_the_layer(op_calls):
    """Each layer keeps, for the last batch's names, the adapters it runs, their row index and their scalings; the
    same names again after the layer changed (an adapter deleted from one layer only, a scaling set, a tensor
    scaling written in place as PEFT's hot-swap does) give PEFT's output, not the last call's."""
    from peft.tuners.lora import LoraLayer

    plain, fused = _twins(tiny_llama, ["q_proj", "v_proj"])
    layers = sum(isinstance(m, LoraLayer) for m in fused.modules())
    ids = torch.randint(1, 61, (len(NAMES), 5), generator=torch.Generator().manual_seed(9))
    _same_logits(plain, fused, ids, NAMES, "first call")
    _same_logits(plain, fused, ids, list(NAMES), "the same names again")

    for model in (plain, fused):  # one layer loses an adapter that the others keep
        model.base_model.model.model.layers[1].self_attn.v_proj.delete_adapter("de")
    _same_logits(plain, fused, ids, NAMES, "de deleted from one layer")

    for model in (plain, fused):  # PEFT's scale setters put new floats into layer.scaling
        for layer in _lora_layers(model):
            layer.set_scale("fr", 3.0)
            layer.scaling["en"] = layer.scaling["en"] * -0.5
    _same_logits(plain, fused, ids, NAMES, "scalings set")

    for model in (plain, fused):  # 0-d tensor scalings, then written in place
        for layer in _lora_layers(model):
            layer.scaling["de"] = torch.tensor(float(layer.scaling["de"]))
    _same_logits(plain, fused, ids, NAMES, "tensor scalings")
    for model in (plain, fused):
        for layer in _lora_layers(model):
            layer.scaling["de"].fill_(-4.0)
    _same_logits(plain, fused, ids, NAMES, "tensor scalings written in place")
    assert len(op_calls) == 6 * layers  # every call fused


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and "de" in m.scaling]


def test_the_bank_never_stands_in_for_an_adapter_it_does_not_hold():
    """A layer whose adapters differ in dtype: the bank holds those of one dtype; a batch naming as many adapters
    as the bank holds, one of them outside it, runs every adapter (PEFT's output), never the bank's others."""
    plain, fused = _twins(tiny_llama, ["q_proj", "v_proj"])
    for model in (plain, fused):
        for n, p in model.named_parameters():
            if ".fr." in n and "lora_" in n:
                p.data = p.data.double()
    ids = torch.randint(1, 61, (4, 5), generator=torch.Generator().manual_seed(8))
    _same_logits(plain, fused, ids, ["en", "de", "en", "__base__"], "the bank of en and de")
    _same_logits(plain, fused, ids, ["en", "fr", "en", "__base__"], "fr outside the bank, as many adapters")
    _same_logits(plain, fused, ids, ["fr", "de", "__base__", "en"], "all three")
