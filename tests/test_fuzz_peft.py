"""A differential fuzzer: random PEFT models and random sequences of PEFT operations, run on plain PEFT and on the
same model accelerated by fastlora, compared after every operation (outputs and every gradient).

Models: Linear stacks, a tiny Llama (embeddings, attention, MLP), GPT-2 (transformers Conv1D, fan_in_fan_out).
Configs: r, lora_alpha, rslora, dropout (0, in (0, 1) and 1.0), PEFT's bias modes, lora_bias, DoRA, embedding targets,
several adapters. Dtypes: fp32 on either backend; fp16 and bf16 on the PyTorch path (the interpreter runs no bf16).
Operations: add / set / delete adapters, several active, disable, merge / unmerge, scale / unscale, PEFT's hot-swap
preparation (tensor scalings, padded ranks) and a hot-swap from a state dict, train / eval, optimizer steps (torch
SGD, AdamW, fused AdamW; bitsandbytes AdamW8bit, PagedAdamW, AdamW32bit) and ``.data`` writes. Whatever PEFT
refuses is skipped; whatever PEFT runs, the accelerated model must run and match (``fused_layers()`` never calls
fused a layer that then raises). With dropout in (0, 1) in training the masks differ by design (fastlora draws its
own): outputs are compared in eval mode then, and optimizer steps run with dropout off.

CI runs a fixed budget (derandomized, ~20 examples). The long run is one command; its last result is in
benchmarks/NOTES.md ("Differential fuzzer")::

    FASTLORA_FUZZ_EXAMPLES=1000 python -m pytest tests/test_fuzz_peft.py -q -p no:randomly --hypothesis-seed=1
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastlora  # noqa: E402
from fastlora import backend as fbackend  # noqa: E402
from model_helpers import assert_same, tiny_gpt2, tiny_llama  # noqa: E402

EXAMPLES = int(os.environ.get("FASTLORA_FUZZ_EXAMPLES", "0"))
# (output, gradient): fp32 against PEFT directly; fp16 / bf16 the atol of the low-precision rule
TOL = {torch.float32: (2e-5, 2e-4), torch.float16: (1e-3, 2e-3), torch.bfloat16: (8e-3, 1.6e-2)}
GRAD_REL = {torch.float16: 0.05, torch.bfloat16: 0.2}  # Llama / GPT-2 gradients in half precision (see the rule)


class Mlp(nn.Module):
    def __init__(self, dims, bias):
        super().__init__()
        self.lin0 = nn.Linear(dims[0], dims[1], bias=bias)
        self.lin1 = nn.Linear(dims[1], dims[2], bias=bias)
        self.lin2 = nn.Linear(dims[2], dims[3], bias=not bias)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(torch.relu(self.lin0(x)))))


TARGETS = {
    "mlp": ["lin0", "lin1", "lin2"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"],
    "gpt2": ["c_attn", "c_proj", "c_fc", "wte"],
}


# ---------------------------------------------------------------------------------------------------------
# Drawing a scenario
# ---------------------------------------------------------------------------------------------------------

@st.composite
def lora_configs(draw, kind):
    targets = draw(st.lists(st.sampled_from(TARGETS[kind]), min_size=1, max_size=3, unique=True))
    use_dora = draw(st.booleans())
    kwargs = dict(
        target_modules=targets,
        r=draw(st.sampled_from([1, 2, 3, 4, 8])),
        lora_alpha=draw(st.sampled_from([1, 3, 8, 16])),
        use_rslora=draw(st.booleans()),
        lora_dropout=draw(st.sampled_from([0.0, 0.0, 0.25, 1.0])),
        bias=draw(st.sampled_from(["none", "none", "all", "lora_only"])),
        use_dora=use_dora,
        init_lora_weights=draw(st.sampled_from([False, True, "gaussian"])),
    )
    if not use_dora and draw(st.booleans()):
        kwargs["lora_bias"] = True
    if kind == "gpt2":
        kwargs["fan_in_fan_out"] = True
    return kwargs


OPTIMIZERS = ["sgd", "adamw", "adamw_fused", "AdamW8bit", "PagedAdamW", "AdamW32bit"]


@st.composite
def operations(draw, kind, n_ops):
    ops = []
    for _ in range(n_ops):
        op = draw(st.sampled_from(["step", "step", "write", "add", "set", "delete", "disable", "merge", "scale",
                                   "hotswap_prep", "hotswap", "mode"]))
        if op == "step":
            ops.append(("step", draw(st.sampled_from(OPTIMIZERS))))
        elif op == "write":
            ops.append(("write", draw(st.integers(0, 10**6)), draw(st.sampled_from(["copy_", "mul_", "assign"]))))
        elif op == "add":
            ops.append(("add", draw(lora_configs(kind))))
        elif op == "set":
            ops.append(("set", draw(st.integers(1, 3)), draw(st.integers(0, 10**6))))
        elif op == "delete":
            ops.append(("delete", draw(st.integers(0, 10**6))))
        elif op == "scale":
            ops.append(("scale", draw(st.sampled_from([0.0, 0.5, 2.0, None]))))
        elif op == "hotswap":
            ops.append(("hotswap", draw(st.sampled_from([1, 5, 16]))))
        else:
            ops.append((op,))
    return ops


@st.composite
def scenarios(draw):
    backend = draw(st.sampled_from(["torch", "torch", "torch", "triton"]))
    kind = "mlp" if backend == "triton" else draw(st.sampled_from(["mlp", "mlp", "llama", "gpt2"]))
    dtype = torch.float32
    if backend == "torch":
        dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16]))
    dims = draw(st.lists(st.integers(1, 12), min_size=4, max_size=4))
    return dict(
        backend=backend, kind=kind, dtype=dtype, dims=dims, mlp_bias=draw(st.booleans()),
        config=draw(lora_configs(kind)), batch=draw(st.integers(1, 5)), seed=draw(st.integers(0, 2**16)),
        ops=draw(operations(kind, draw(st.integers(1, 4)))),
    )


# ---------------------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------------------

class Pair:
    """The plain PEFT model and its accelerated twin, the same weights, driven by the same operations."""

    def __init__(self, sc):
        self.sc, self.dtype, self.kind = sc, sc["dtype"], sc["kind"]
        torch.manual_seed(sc["seed"])
        if self.kind == "mlp":
            base = Mlp(sc["dims"], sc["mlp_bias"])
        elif self.kind == "llama":
            base = tiny_llama(bias=sc["mlp_bias"], seed=sc["seed"])
        else:
            base = tiny_gpt2(seed=sc["seed"])
        base = base.to(self.dtype)
        self.plain = peft.get_peft_model(base, peft.LoraConfig(**sc["config"]))
        self.fast = copy.deepcopy(self.plain)
        fastlora.accelerate_peft(self.fast)
        self.names = ["default"]
        self._perturb(seed=sc["seed"])
        self.opts = {}
        g = torch.Generator().manual_seed(sc["seed"] + 1)
        if self.kind == "mlp":
            self.x = torch.randn(sc["batch"], sc["dims"][0], generator=g).to(self.dtype)
        else:
            self.x = torch.randint(1, 61, (sc["batch"], 5), generator=g)

    # -- both models at once ------------------------------------------------------------------------------
    def both(self, fn):
        """fn on both twins; True when PEFT ran it. Where PEFT raises, the twin must raise too (PEFT may have
        changed some weights before raising, e.g. a merge of lora_bias into a base without bias: both twins are
        left in that same state, and the comparisons go on from there)."""
        try:
            fn(self.plain)
        except Exception as e:  # noqa: BLE001 - PEFT's refusal defines what is valid
            with pytest.raises(type(e)):
                fn(self.fast)
            return False
        fn(self.fast)
        return True

    def _perturb(self, seed, names=None):
        """Move trainable weights off their init (B = 0 would hide most bugs); copied to the twin."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(self.plain.named_parameters(), key=lambda kv: kv[0]):
                if p.requires_grad and p.is_floating_point() and (names is None or any(f".{n}." in name or
                                                                                        name.endswith(f".{n}")
                                                                                        for n in names)):
                    p.add_(torch.randn(p.shape, generator=g).to(p) * 0.2)
        self.sync()

    def sync(self):
        self.fast.load_state_dict(self.plain.state_dict())

    def dropout_active(self):
        """Some active adapter drops with 0 < p < 1 in training: the masks differ by design."""
        for m in self.plain.modules():
            drops = getattr(m, "lora_dropout", None)
            if isinstance(drops, nn.ModuleDict):
                for a in m.active_adapters:
                    d = drops[a] if a in drops else None
                    if isinstance(d, nn.Dropout) and d.training and 0.0 < d.p < 1.0:
                        return True
        return False

    @contextlib.contextmanager
    def comparable(self):
        """Eval mode for the block where training-mode dropout would draw different masks."""
        modes = (self.plain.training, self.fast.training)
        if self.dropout_active():
            self.plain.eval(), self.fast.eval()
        try:
            yield
        finally:
            self.plain.train(modes[0]), self.fast.train(modes[1])

    def run(self, model, grads: bool, x=None):
        x = self.x if x is None else x
        if grads and x.is_floating_point():
            x = x.clone().requires_grad_(True)
        out = model(x)
        out = out.logits if hasattr(out, "logits") else out
        if not grads:
            return out, {}
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
        (out.float() * cot.float()).sum().backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        if x.requires_grad:
            got["<input>"] = x.grad
        model.zero_grad(set_to_none=True)
        return out, got

    def check(self, what, grads=True):
        """Outputs and every gradient. fp32: fastlora against PEFT directly. fp16 / bf16: both against the same
        model in fp64, by the project's low-precision rule |fastlora − fp64| <= 2·|PEFT − fp64| + atol (PEFT's own
        half-precision error is the yardstick: fastlora's fp32 low-rank terms are often closer than PEFT's)."""
        out_tol, grad_tol = TOL[self.dtype]
        with self.comparable():
            try:
                y_plain, g_plain = self.run(self.plain, grads)
            except Exception:  # noqa: BLE001 - nothing to compare where PEFT itself cannot run
                return
            y_fast, g_fast = self.run(self.fast, grads)
            ref = None
            if self.dtype != torch.float32:
                ref_model = copy.deepcopy(self.plain).double()
                ref = self.run(ref_model, grads, self.x.double() if self.x.is_floating_point() else self.x)
        assert set(g_fast) == set(g_plain), f"after {what}: gradients of {sorted(set(g_fast) ^ set(g_plain))}"
        pairs = [("output", y_fast, y_plain, out_tol)]
        pairs += [(f"grad of {n}", g_fast[n], gp, grad_tol) for n, gp in g_plain.items()]
        for i, (name, fast, plain, tol) in enumerate(pairs):
            scale = float(plain.detach().abs().max()) if plain.numel() else 0.0
            if ref is None:
                assert_same(fast, plain, tol * (1.0 + scale), tol, f"{name} after {what}")
                continue
            exact = ref[0] if i == 0 else ref[1][name.removeprefix("grad of ")]
            rel = 0.0 if i == 0 or self.kind == "mlp" else GRAD_REL[self.dtype]
            _low_precision_rule(fast, plain, exact, tol * (1.0 + scale), f"{name} after {what}", rel)

    # -- the operations -------------------------------------------------------------------------------------
    def apply(self, op):
        kind = op[0]
        if kind == "step":
            return self.step(op[1])
        if kind == "write":
            return self.write(op[1], op[2])
        if kind == "add":
            name = f"a{len(self.names)}"
            if not self.both(lambda m: m.add_adapter(name, peft.LoraConfig(**op[1]))):
                return False
            self.names.append(name)
            self._perturb(seed=len(self.names), names=[name])
            self.opts.clear()
            return True
        if kind == "set":
            k = min(op[1], len(self.names))
            start = op[2] % len(self.names)
            active = [self.names[(start + i) % len(self.names)] for i in range(k)]
            ok = self.both(lambda m: m.base_model.set_adapter(active if len(active) > 1 else active[0]))
            self.opts.clear()
            return ok
        if kind == "delete":
            if len(self.names) < 2:
                return False
            name = self.names[op[1] % len(self.names)]
            if not self.both(lambda m: m.delete_adapter(name)):
                return False
            self.names.remove(name)
            self.opts.clear()
            return True
        if kind == "disable":
            with self.plain.disable_adapter(), self.fast.disable_adapter():
                self.check("disable_adapter()")
            return False  # checked inside the context
        if kind == "merge":
            if not self.both(lambda m: m.merge_adapter()):
                return False
            self.check("merge_adapter()", grads=False)
            return self.both(lambda m: m.unmerge_adapter())
        if kind == "scale":
            s = op[1]
            layers = lambda m: [x for x in m.modules() if isinstance(x, peft.tuners.lora.LoraLayer)]  # noqa: E731
            if s is None:
                return self.both(lambda m: [x.unscale_layer() for x in layers(m)])
            return self.both(lambda m: [x.scale_layer(s) for x in layers(m)])
        if kind == "hotswap_prep":
            from peft.utils.hotswap import prepare_model_for_compiled_hotswap

            r = max(c.r for c in self.plain.peft_config.values()) + 1
            return self.both(lambda m: prepare_model_for_compiled_hotswap(m, target_rank=r, check_compiled="ignore"))
        if kind == "hotswap":
            return self.hotswap(op[1])
        if kind == "mode":
            train = not self.plain.training
            self.both(lambda m: m.train(train))
            return True
        raise AssertionError(op)

    def step(self, name):
        if name not in self.opts:
            self.opts[name] = [self._optimizer(name, m) for m in (self.plain, self.fast)]
        if self.opts[name][0] is None:
            return False
        if self.dtype != torch.float32:
            self.check(f"the gradients of a {name} step")  # by the low-precision rule, before the step
        with self.comparable():
            for model, opt in zip((self.plain, self.fast), self.opts[name]):
                opt.zero_grad(set_to_none=True)
                out = model(self.x)
                out = out.logits if hasattr(out, "logits") else out
                out.float().pow(2).mean().backward()
                opt.step()
        if self.dtype != torch.float32:
            # half precision: the twins' steps differ by rounding, and the fp64 yardstick is built from PEFT's
            # weights; the twin takes PEFT's updated weights so that later checks measure fastlora's own error
            with torch.no_grad():
                fast = dict(self.fast.named_parameters())
                for n, p in self.plain.named_parameters():
                    if p.requires_grad:
                        fast[n].copy_(p)
        return True

    def _optimizer(self, name, model):
        params = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
        if not params:
            return None
        if name == "sgd":
            return torch.optim.SGD(params, lr=0.05)
        if self.dtype != torch.float32:
            # Adam's first steps are ±lr wherever a gradient is nonzero: a half-precision rounding difference in a
            # gradient near 0 flips a whole step, and the twins diverge for reasons that are no bug. SGD only.
            return None
        if name == "adamw":
            return torch.optim.AdamW(params, lr=0.02)
        if name == "adamw_fused":
            return torch.optim.AdamW(params, lr=0.02, fused=True)
        try:
            import bitsandbytes as bnb
        except ImportError:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return getattr(bnb.optim, name)(params, lr=0.02)

    def write(self, index, how):
        names = [n for n, p in sorted(self.plain.named_parameters()) if p.requires_grad and p.is_floating_point()]
        if not names:
            return False
        name = names[index % len(names)]
        g = torch.Generator().manual_seed(index)
        p_plain = dict(self.plain.named_parameters())[name]
        new = torch.randn(p_plain.shape, generator=g).to(p_plain) * 0.3
        for model in (self.plain, self.fast):
            p = dict(model.named_parameters())[name]
            if how == "copy_":
                p.data.copy_(new)
            elif how == "mul_":
                p.data.mul_(1.5)
            else:
                p.data = new.clone()
        return True

    def hotswap(self, alpha):
        """PEFT's hot-swap of the first adapter from a state dict: new values of the same shapes, a new alpha."""
        from peft.utils.hotswap import hotswap_adapter_from_state_dict

        name = self.names[0]
        state = {k: v for k, v in self.plain.state_dict().items() if "lora_" in k and f".{name}." in k}
        g = torch.Generator().manual_seed(len(state))
        state = {k: v + torch.randn(v.shape, generator=g).to(v) * 0.1 for k, v in state.items()}
        config = copy.copy(self.plain.peft_config[name])
        config.lora_alpha = alpha
        return self.both(lambda m: hotswap_adapter_from_state_dict(m, {k: v.clone() for k, v in state.items()},
                                                                   name, config))


def _low_precision_rule(fast, plain, exact, atol, name, rel=0.0):
    """max|fast − exact| <= 2·max|plain − exact| + atol, or (``rel``: gradients of deep half-precision models, where
    rounding differences upstream land anywhere) the same in Frobenius norm with rel·‖exact‖ as the slack. Gross
    bugs (a lost scaling, a wrong mask, inf) are far outside either; fp32 scenarios check the fine math."""
    f, p, e = (t.detach().double() for t in (fast, plain, exact))
    assert torch.isfinite(f).all() or not torch.isfinite(p).all(), f"{name}: not finite where PEFT is"
    finite = torch.isfinite(p) & torch.isfinite(e)
    if not finite.any():
        return
    df, dp, ee = (f - e)[finite], (p - e)[finite], e[finite]
    err, base = float(df.abs().max()), float(dp.abs().max())
    if err <= 2.0 * base + atol:
        return
    nf, np_, ne = float(df.norm()), float(dp.norm()), float(ee.norm())
    assert rel and nf <= 2.0 * np_ + rel * ne, (
        f"{name}: fastlora's error {err:.3e} > 2 x PEFT's {base:.3e} + {atol:.3e} (norms: {nf:.3e}, PEFT's "
        f"{np_:.3e}, exact {ne:.3e})")


def run_scenario(sc):
    saved = fbackend._backend
    fastlora.set_backend(sc["backend"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                pair = Pair(sc)
            except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
                if isinstance(e, RuntimeError) and "fastlora" in str(e):
                    raise
                hypothesis.reject()  # a config PEFT refuses (e.g. lora_bias on an embedding)
            reasons = fastlora.fused_layers(pair.fast)
            event(f"{sc['kind']} {str(sc['dtype'])[6:]} {sc['backend']}: "
                  f"{'some' if any(r is None for r in reasons.values()) else 'no'} layer fused")
            pair.check("get_peft_model")
            for i, op in enumerate(sc["ops"]):
                applied = pair.apply(op)
                event(f"op {op[0]}: {'applied' if applied else 'skipped or checked inside'}")
                if applied:
                    pair.check(f"op {i} {op[0]}")
    finally:
        fbackend._backend = saved


_SETTINGS = settings(
    max_examples=EXAMPLES or 20,
    derandomize=not EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


@_SETTINGS
@given(scenarios())
def test_accelerated_peft_matches_plain_peft(sc):
    run_scenario(sc)
