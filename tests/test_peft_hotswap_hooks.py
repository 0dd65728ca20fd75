"""Two things PEFT users rely on: a tensor ``scaling`` (PEFT's compiled hot-swap, no recompile when it changes)
and forward hooks on ``base_layer`` / ``lora_A`` / ``lora_B`` (they fire: the layer takes PEFT's path)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap  # noqa: E402

import fastlora  # noqa: E402
from model_helpers import assert_same, perturb_trainable, tiny_llama  # noqa: E402

IDS = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(0))


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _model(r=2, alpha=4, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    model = quiet(peft.get_peft_model, tiny_llama(),
                  peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=r, lora_alpha=alpha,
                                  lora_dropout=dropout, init_lora_weights=False))
    perturb_trainable(model, seed=seed + 1)
    return model


def test_tensor_scaling_eager_outputs_and_gradients_equal_peft(backend):
    ref = _model()
    prepare_model_for_compiled_hotswap(ref, target_rank=3)
    layer = ref.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.scaling["default"], torch.Tensor)
    fast = fastlora.accelerate_peft(copy.deepcopy(ref))
    assert all(why is None for why in fastlora.fused_layers(fast).values())
    losses = [m(IDS, labels=IDS).loss for m in (ref, fast)]
    assert_same(losses[1], losses[0], 1e-6, 1e-6, "loss")
    for loss in losses:
        loss.backward()
    grads = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        if p.grad is not None:
            assert_same(p.grad, grads[name].grad, 1e-5, 1e-5, name)


def test_compiled_hotswap_reads_the_new_scaling_without_recompiling(tmp_path):
    """A compiled accelerated model, hot-swapped to an adapter of another rank and alpha: the compiled graph
    gives the new adapter's outputs (as PEFT's eager model loaded with it) and is not recompiled."""
    first, second = _model(r=2, alpha=4, seed=0), _model(r=3, alpha=9, seed=7)
    quiet(first.save_pretrained, tmp_path / "first")
    quiet(second.save_pretrained, tmp_path / "second")
    fast = quiet(fastlora.from_pretrained, tiny_llama(), tmp_path / "first")
    prepare_model_for_compiled_hotswap(fast, target_rank=3)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()  # graphs other tests compiled for PEFT's forward would count as recompiles
    compiled = torch.compile(fast, backend=recording_backend)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        assert_same(compiled(IDS).logits, first(IDS).logits, 1e-5, 1e-5, "first adapter")
        hotswap_adapter(fast, str(tmp_path / "second"), adapter_name="default")
        assert_same(compiled(IDS).logits, second(IDS).logits, 1e-5, 1e-5, "after hot swap")
    assert len(graphs) == 1  # one graph, no break, not recompiled
    ops = [n.target for n in graphs[0].graph.nodes if "fastlora" in str(n.target)]
    assert len(ops) == 4, ops  # q_proj and v_proj of both decoder layers run fastlora's op


def test_tensor_scaling_is_validated():
    x, W, A, B = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
    y = fastlora.lora_linear(x, W, A, B, scaling=torch.tensor(0.5))
    assert_same(y, fastlora.lora_linear(x, W, A, B, scaling=0.5), 1e-6, 1e-6, "0-d tensor scaling")
    with pytest.raises(TypeError, match="one-element"):
        fastlora.lora_linear(x, W, A, B, scaling=torch.ones(2))
    with pytest.raises(ValueError, match="no gradient"):
        fastlora.lora_linear(x, W, A, B, scaling=torch.tensor(0.5, requires_grad=True))


@pytest.mark.parametrize("where", ["base_layer", "lora_A", "lora_B"])
def test_forward_hooks_on_sub_layers_fire_and_take_peft_s_path(where):
    ref = _model()
    fast = fastlora.accelerate_peft(copy.deepcopy(ref))
    seen = []

    def double(module, args, output):  # a hook that changes the output, so a skipped hook shows in the result
        seen.append(module)
        return output * 2

    for model in (ref, fast):
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        sub = layer.base_layer if where == "base_layer" else getattr(layer, where)["default"]
        handle = sub.register_forward_hook(double)
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    assert fastlora.fused_layers(fast)[name].startswith("hook")
    assert fastlora.fused_layers(fast)[name.replace("q_proj", "v_proj")] is None
    with torch.no_grad():
        assert_same(fast(IDS).logits, ref(IDS).logits, 1e-5, 1e-5, "logits with hook")
    assert len(seen) == 2  # once in each model
    handle.remove()
    assert fastlora.fused_layers(fast)[name] is None  # removed: fused again


def test_one_warning_names_every_layer_that_runs_peft_s_forward():
    torch.manual_seed(0)
    model = quiet(peft.get_peft_model, tiny_llama(),
                  peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=2, init_lora_weights=False))
    model.base_model.model.model.layers[1].self_attn.v_proj.lora_dropout["default"] = torch.nn.Dropout1d(0.1)
    with pytest.warns(UserWarning) as caught:
        fastlora.accelerate_peft(model)
    messages = [str(w.message) for w in caught if "fastlora" in str(w.message)]
    assert len(messages) == 1 and "1 of 4 LoRA layers" in messages[0] and "layers.1.self_attn.v_proj" in messages[0]
    assert "Dropout1d" in fastlora.fused_layers(model)["base_model.model.model.layers.1.self_attn.v_proj"]


def test_compiled_training_with_a_tensor_scaling_follows_its_value():
    """The custom op's autograd with a tensor scaling (aot_eager traces forward and backward): gradients as with
    the float, and a new value in the same tensor is used without recompiling."""
    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g), torch.randn(5, generator=g)
    A = torch.randn(3, 6, generator=g, requires_grad=True)
    B = torch.randn(5, 3, generator=g, requires_grad=True)
    scale = torch.tensor(0.5)

    def step(fn, s):
        y = fn(x, W, A, B, b, scaling=s)
        return (y, *torch.autograd.grad(y.square().sum(), (A, B)))

    fastlora.get_backend()  # resolved before tracing, so the guard on it holds
    torch._dynamo.reset()
    compiled = torch.compile(fastlora.lora_linear, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for value in (0.5, 1.75):
            scale.fill_(value)
            got = step(compiled, scale)
            want = step(fastlora.lora_linear, value)
            for a, e, name in zip(got, want, ("y", "dA", "dB")):
                assert_same(a, e, 1e-5, 1e-5, f"{name} at scaling {value}")
