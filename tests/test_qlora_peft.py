"""QLoRA at the module and model level: LoRALinear.from_linear over a bitsandbytes Linear4bit, and the PEFT fuser
(fastlora/peft_interop/bnb.py) against PEFT's own ``lora.bnb.Linear4bit`` forward on a tiny LLaMA loaded in 4-bit.
The fuser is called directly here (the router that calls registered fusers lives in peft_interop/__init__.py)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

bnb = pytest.importorskip("bitsandbytes", reason="the 4-bit (QLoRA) path needs bitsandbytes: pip install -e \".[qlora]\"")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft.tuners.lora import bnb as lora_bnb  # noqa: E402  (PEFT's bitsandbytes LoRA layers)

import fastlora  # noqa: E402
from fastlora import reference  # noqa: E402
from fastlora.peft_interop import bnb as fuser_bnb  # noqa: E402
from fastlora.peft_interop.registry import fuser_for  # noqa: E402
from model_helpers import assert_same, perturb_trainable  # noqa: E402
from test_qlora import bnb_dequantize  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("torch_backend")  # the PyTorch path throughout this file


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny LLaMA saved locally (hidden 24, intermediate 40: K values not multiples of the blocksize)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   attention_bias=True)
    path = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def qlora_model(path, quant_type="nf4", double_quant=True, compute_dtype=torch.float32, **lora):
    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                         bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)
    torch.manual_seed(0)  # the same adapters for every model built here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, device_map="cpu")
        model = peft.get_peft_model(model, peft.LoraConfig(target_modules=TARGETS, init_lora_weights=False, **lora))
    perturb_trainable(model)
    return model


def lora4_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, lora_bnb.Linear4bit)]


def trainable(layer):
    return [p for _, p in sorted(layer.named_parameters()) if p.requires_grad]


def compare_layer(layer, x, adapters, atol=1e-5, rtol=1e-5):
    """fuser.forward vs PEFT's forward: output and the gradients of x and every trainable parameter."""
    xs = [x.detach().clone().requires_grad_() for _ in range(2)]
    y_peft = layer(xs[0])
    y_fused = fuser_bnb.FUSER_4BIT.forward(layer, xs[1], adapters)
    assert y_fused.dtype == y_peft.dtype
    assert_same(y_fused, y_peft, atol, rtol, "y")
    gy = torch.randn(y_peft.shape, generator=torch.Generator().manual_seed(2)).to(y_peft.dtype)
    params = trainable(layer)
    g_peft = torch.autograd.grad(y_peft, [xs[0], *params], gy)
    g_fused = torch.autograd.grad(y_fused, [xs[1], *params], gy)
    for i, (a, e) in enumerate(zip(g_fused, g_peft)):
        assert_same(a, e, atol, rtol, "dx" if i == 0 else f"d param {i}")


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_fuser_matches_peft_layer(llama_dir, quant_type, double_quant):
    model = qlora_model(llama_dir, quant_type, double_quant, lora_dropout=0.1)
    layers = lora4_layers(model)
    assert len(layers) == 3
    model.eval()  # PEFT's dropout off, so both sides compute the same function
    for name, layer in layers:
        assert fuser_for(layer, "default") is fuser_bnb.FUSER_4BIT, name
        assert fuser_bnb.FUSER_4BIT.why_not(layer, "default") is None, name
        x = torch.randn(2, 3, layer.in_features)
        compare_layer(layer, x, ["default"])


def test_fuser_through_the_triton_kernels(llama_dir, monkeypatch):
    model = qlora_model(llama_dir, "nf4", True)
    fastlora.set_backend("triton")
    for path in ("fused4bit", "dequant"):
        monkeypatch.setenv("FASTLORA_QLORA_PATH", path)
        _, layer = lora4_layers(model)[0]
        compare_layer(layer, torch.randn(5, layer.in_features), ["default"], 1e-4, 1e-4)


def test_fuser_fp16_compute_dtype(llama_dir, monkeypatch):
    """bnb_4bit_compute_dtype=fp16 with an fp32 model: the op runs in fp16, the output is back in fp32."""
    model = qlora_model(llama_dir, "nf4", True, compute_dtype=torch.float16)
    _, layer = lora4_layers(model)[0]
    assert layer.get_base_layer().compute_dtype == torch.float16
    seen = []
    real = fuser_bnb.lora_linear_4bit
    monkeypatch.setattr(fuser_bnb, "lora_linear_4bit", lambda x, *a, **k: seen.append(x.dtype) or real(x, *a, **k))
    # PEFT computes the LoRA branch in fp32, fastlora in the compute dtype: fp16 rounding apart
    compare_layer(layer, torch.randn(4, layer.in_features), ["default"], 2e-2, 2e-2)
    assert seen == [torch.float16]


def test_fuser_several_adapters(llama_dir):
    model = qlora_model(llama_dir, "fp4", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("other", peft.LoraConfig(target_modules=TARGETS, init_lora_weights=False, r=3,
                                                   lora_alpha=5))
    perturb_trainable(model, seed=4)
    _, layer = lora4_layers(model)[1]
    layer.set_adapter(["default", "other"])
    layer.requires_grad_(False)
    for p in layer.lora_A.parameters():
        p.requires_grad_(True)
    for p in layer.lora_B.parameters():
        p.requires_grad_(True)
    compare_layer(layer, torch.randn(3, layer.in_features), ["default", "other"])


def test_whole_model_logits_and_grads(llama_dir):
    """Every 4-bit LoRA layer's forward swapped for the fuser's (what the router does): logits and every
    adapter gradient as PEFT's."""
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(0))
    models = [qlora_model(llama_dir, "nf4", True) for _ in range(2)]
    for _, layer in lora4_layers(models[1]):
        layer.forward = lambda x, _l=layer: fuser_bnb.FUSER_4BIT.forward(_l, x, _l.active_adapters)
    outs = []
    for m in models:
        m.train()
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append((out.logits, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    assert_same(outs[1][0], outs[0][0], 1e-5, 1e-5, "logits")
    assert outs[0][1].keys() == outs[1][1].keys() and outs[0][1]
    for n, g in outs[0][1].items():
        assert_same(outs[1][1][n], g, 1e-5, 1e-4, n)


def test_fuser_training_dropout_changes_the_branch_only(llama_dir):
    model = qlora_model(llama_dir, "nf4", False, lora_dropout=0.5)
    _, layer = lora4_layers(model)[0]
    model.train()
    x = torch.randn(64, layer.in_features)
    torch.manual_seed(0)
    y1 = fuser_bnb.FUSER_4BIT.forward(layer, x, ["default"])
    torch.manual_seed(0)
    y2 = fuser_bnb.FUSER_4BIT.forward(layer, x, ["default"])
    model.eval()
    y_eval = fuser_bnb.FUSER_4BIT.forward(layer, x, ["default"])
    assert torch.equal(y1, y2) and not torch.equal(y1, y_eval)


def test_why_not_names_dora_and_8bit(llama_dir):
    model = qlora_model(llama_dir, "nf4", True, use_dora=True)
    _, layer = lora4_layers(model)[0]
    # (a DoRA fuser registered with a higher priority may claim this adapter first: the router's choice)
    assert fuser_bnb.FUSER_4BIT.claims(layer, "default")
    assert fuser_bnb.FUSER_4BIT.why_not(layer, "default") == "DoRA on a 4-bit base"

    # PEFT's own 8-bit LoRA layer (what get_peft_model builds over a model loaded with load_in_8bit)
    layer8 = lora_bnb.Linear8bitLt(bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False), "default",
                                               config=peft.LoraConfig(), r=4, lora_alpha=8)
    f = fuser_for(layer8, "default")
    assert f is fuser_bnb.FUSER_8BIT and "8-bit" in f.why_not(layer8, "default")
    assert not fuser_bnb.FUSER_4BIT.claims(layer8, "default")


# ---------------------------------------------------------------------------------------------------------
# LoRALinear.from_linear over a Linear4bit
# ---------------------------------------------------------------------------------------------------------

def linear4bit(K=48, N=20, bias=True, compute_dtype=None, quant_type="nf4", double_quant=True, seed=0):
    torch.manual_seed(seed)
    return bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=compute_dtype, quant_type=quant_type,
                             compress_statistics=double_quant).to("cpu")


def test_from_linear_accepts_linear4bit_and_matches_bitsandbytes():
    base = linear4bit()
    layer = fastlora.LoRALinear.from_linear(base, r=4, lora_alpha=8, init_lora_weights=False)
    assert isinstance(layer, fastlora.LoRALinear4bit) and layer.base_layer is base
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    x = torch.randn(3, 5, 48, requires_grad=True)
    y = layer(x)
    Wd = bnb_dequantize(base.weight, base.weight.quant_state)
    xr = x.detach().clone().requires_grad_()
    A, B = (t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B))
    y_ref = reference.unfused_lora_linear(xr, Wd, A, B, base.bias, scaling=layer.scaling)
    assert_same(y, y_ref, 1e-5, 1e-5, "y")
    gy = torch.randn_like(y)
    for a, e, n in zip(torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), gy),
                       torch.autograd.grad(y_ref, (xr, A, B), gy), ("dx", "dA", "dB")):
        assert_same(a, e, 1e-5, 1e-5, n)
    dense = layer.to_linear()
    assert_same(dense(x), y, 1e-5, 1e-5, "to_linear")
    # merge / unmerge quantize again, as PEFT's 4-bit merge: equal to the quantized W̃ + s·B@A, within its rounding
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
        with pytest.warns(UserWarning, match="quantizes it again"):
            layer.merge()
        assert layer.merged
        Wm = bnb_dequantize(base.weight, base.weight.quant_state)
        err = (Wm - (Wd + layer.delta_weight())).abs().max()
        assert err <= 0.15 * (Wd + layer.delta_weight()).abs().max(), err  # NF4 rounding (half a step), no more
        assert_same(layer(x), F.linear(x, Wm, base.bias), 1e-5, 1e-5, "merged forward")
        assert (layer(x) - y_eval).abs().max() < (y_eval - F.linear(x, Wd, base.bias)).abs().max()
        with pytest.warns(UserWarning, match="quantizes it again"):
            layer.unmerge()
        assert not layer.merged
        Wu = bnb_dequantize(base.weight, base.weight.quant_state)  # the update taken out, within two roundings
        assert (Wu - Wd).norm() < 0.5 * layer.delta_weight().norm(), (Wu - Wd).norm()  # not still merged
        assert_same(layer(x), F.linear(x, Wu, base.bias) + F.linear(F.linear(x, layer.lora_A), layer.lora_B)
                    * layer.scaling, 1e-5, 1e-5, "unmerged forward")


def test_new_layer_equals_its_base_and_compute_dtype():
    base = linear4bit(K=64, compute_dtype=torch.float16, quant_type="fp4", double_quant=False)
    layer = fastlora.LoRALinear.from_linear(base, r=2)  # B = 0: the layer starts as its base
    x = torch.randn(4, 64)
    with torch.no_grad():
        y = layer(x)
    base.train()  # bitsandbytes' eval-mode CPU forward would repack the weight: keep its training-mode path
    with torch.enable_grad():
        y_base = base(x.requires_grad_())
    assert y.dtype == torch.float32
    assert_same(y, y_base, 1e-3, 1e-3, "y")


def test_cpu_inference_repacking_is_undone():
    """bitsandbytes repacks a Linear4bit's weight for its AVX512-BF16 CPU kernel on an eval, no-grad forward;
    the layer restores the canonical layout (as bitsandbytes does before saving) and still matches."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks only on CPUs with AVX512-BF16")
    base = linear4bit(K=64, N=32, double_quant=False)
    layer = fastlora.LoRALinear.from_linear(base, r=2, init_lora_weights=False)
    x = torch.randn(3, 64)
    y_before = layer(x)
    base.eval()
    with torch.no_grad():
        base(x)
    assert getattr(base.weight.quant_state, "packing_format_for_cpu", False)
    y_after = layer(x)
    assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
    assert_same(y_after, y_before, 2e-2, 2e-2, "y")  # the repacking rounds absmax to bf16


def test_from_linear_refuses_8bit():
    with pytest.raises(TypeError, match="8-bit"):
        fastlora.LoRALinear.from_linear(bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False))


_PEAK_SCRIPT = """
import importlib.util, json, os, sys
import torch
from fastlora import bench
path = os.path.join(sys.argv[1], "benchmarks", "qlora_check.py")
spec = importlib.util.spec_from_file_location("fastlora_qlora_check", path)
qlora_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(qlora_check)
torch.manual_seed(0)
case = bench.Case(32, 256, 384, r=8, dtype="float32", dropout=float(sys.argv[2]), device="cpu")
layer = qlora_check.qlora_layer(case)
peaks, saved = {}, {}
for provider in ("fastlora", "peft"):
    runner = qlora_check.build_runner(provider, case, layer)
    runner.step()
    peaks[provider] = bench.peak_memory_bytes(runner)
    saved[provider] = bench.saved_activation_bytes(runner, include_input=False)
print(json.dumps({"peaks": peaks, "saved": saved}))
"""


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_training_step_peak_memory_not_above_peft(dropout):
    """One forward+backward of a QLoRA layer (CPU, the profiler's allocation events): fastlora's peak is no
    higher than PEFT's on the same layer, and it saves only x and h (no dequantized W).

    Measured in a fresh interpreter: after other tests in this process, the profiler's peak for the same step
    moved by ~130 KB (state left in bitsandbytes / the allocator), which says nothing about either layer."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, root, str(dropout)], capture_output=True, text=True,
                         timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    peaks, saved = result["peaks"], result["saved"]
    if peaks["peft"] is None:
        pytest.skip("the profiler reports no memory events here")
    M, r = 32, 8
    assert peaks["fastlora"] <= peaks["peft"], peaks
    assert saved["fastlora"] == M * r * 4, saved  # h (M, r) fp32, beyond x itself
