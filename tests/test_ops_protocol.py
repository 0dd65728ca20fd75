"""What holds for every fused op alike, because it comes from the op protocol (fastlora/op_common.py), tested once over
all of them (tests/op_cases.py: a new op adds its case there): a tensor scaling (PEFT's hot-swap scaling) equals the
float, torch.compile(fullgraph=True) traces the op without a graph break and matches eager (dropout masks
included) and a changed tensor scaling does not recompile, autocast gives PEFT's formula under the same autocast,
the meta device runs (big-model loading), the custom ops pass torch.library.opcheck, a double backward is exact,
and the Function, the custom ops and the checks are those of the protocol."""
from __future__ import annotations

import pytest
import torch

from helpers import assert_close
from op_cases import CASES

DROPOUT_CASES = [(case, p) for case in CASES for p in ((0.0, 0.1) if case.dropout else (0.0,))]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles its own lambda: dynamo's cache (per code object) must not carry one case's graph into the
    next."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _ids(params):
    return [f"{case}-p{p}" for case, p in params]


def _step(call, fn, dy=None):
    y = fn()
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float32).to(y)
    grads = torch.autograd.grad(y, call.leaves, dy)
    return y.detach(), [g.detach() for g in grads], dy


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_tensor_scaling_equals_the_float(case):
    call = case.make()
    y_f, g_f, dy = _step(call, lambda: call.run(scaling=1.25))
    for scale in (torch.tensor(1.25), torch.tensor([1.25])):  # 0-d (PEFT's hot swap) and one-element
        y_t, g_t, _ = _step(call, lambda: call.run(scaling=scale), dy)
        assert_close(y_t, y_f, 1e-5, 1e-5, f"{case} y")
        for a, e in zip(g_t, g_f):
            assert_close(a, e, 1e-5, 1e-5, f"{case} grad")
    with pytest.raises(ValueError, match="scaling gets no gradient"):
        call.run(scaling=torch.tensor(1.0, requires_grad=True))
    with pytest.raises(ValueError, match="finite"):
        call.run(scaling=float("nan"))


@pytest.mark.parametrize("case,p", DROPOUT_CASES, ids=_ids(DROPOUT_CASES))
def test_compiled_fullgraph_matches_eager(case, p):
    """fullgraph=True raises on any graph break; the dropout seed is drawn inside the op, so eager and compiled code
    seeded alike draw the same mask."""
    call = case.make(dropout=p)
    torch.manual_seed(3)
    y_e, g_e, dy = _step(call, call.run)
    compiled = torch.compile(lambda: call.run(), fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    y_c, g_c, _ = _step(call, compiled, dy)
    assert_close(y_c, y_e, 1e-5, 1e-5, f"{case} y")
    for a, e in zip(g_c, g_e):
        assert_close(a, e, 1e-5, 1e-5, f"{case} grad")
    with torch.no_grad():  # the inference custom op
        torch.manual_seed(4)
        y_e = call.run()
        torch.manual_seed(4)
        assert_close(compiled(), y_e, 1e-5, 1e-5, f"{case} y without autograd")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_changed_tensor_scaling_does_not_recompile(case):
    call = case.make()
    scale = torch.tensor(0.5)
    compiled = torch.compile(lambda s: call.run(scaling=s), fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for value in (0.5, 1.75):
            scale.fill_(value)
            y_c, g_c, dy = _step(call, lambda: compiled(scale))
            y_e, g_e, _ = _step(call, lambda: call.run(scaling=value), dy)
            assert_close(y_c, y_e, 1e-5, 1e-5, f"{case} y at {value}")
            for a, e in zip(g_c, g_e):
                assert_close(a, e, 1e-5, 1e-5, f"{case} grad at {value}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_autocast_gives_peft_formula_under_the_same_autocast(case):
    call = case.make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = call.run()
        want = call.reference()
    assert y.dtype == want.dtype, f"{case}: {y.dtype} under autocast, PEFT's formula gives {want.dtype}"
    assert_close(y.float(), want.float(), 5e-2, 2e-2, f"{case} y under autocast")
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == t.dtype for t in call.leaves)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_meta_device(case):
    if case.meta:
        pytest.skip(case.meta)
    want = case.make().run()
    call = case.make(device="meta")
    y = call.run()
    assert y.device.type == "meta" and y.shape == want.shape and y.dtype == want.dtype
    y.sum().backward()
    assert all(t.grad is not None and t.grad.device.type == "meta" and t.grad.shape == t.shape for t in call.leaves)


@pytest.mark.parametrize("case,p", DROPOUT_CASES, ids=_ids(DROPOUT_CASES))
def test_custom_ops_pass_opcheck(case, p):
    """torch.library's own consistency checks of the op's three custom ops: schema, fake kernels, registered
    autograd."""
    call = case.make(dropout=p)
    op = call.op
    tensors, consts, use_triton = op.prepare(*call.op_args, **call.op_kwargs)
    args = (*tensors, *consts, use_triton)
    torch.library.opcheck(op.fwd_op, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    detached = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    torch.library.opcheck(op.infer_op, detached, test_utils=("test_schema", "test_faketensor"))
    y, *saved, seed = op.fwd_op(*detached)
    grad_y = torch.randn_like(y)
    needs = [t is not None and t.requires_grad for t in tensors]
    bwd_args = (grad_y, *detached[:len(tensors)], *consts, *saved, seed, use_triton, needs)
    torch.library.opcheck(op.bwd_op, bwd_args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_double_backward_is_exact(case):
    """A gradient differentiated again (a gradient penalty) equals fp64 autograd of PEFT's formula."""
    call = case.make(dtype=torch.float64)
    first = call.leaves[0]

    def penalized(fn):
        for t in call.leaves:
            t.grad = None
        y = fn()
        (g,) = torch.autograd.grad(y.sum(), first, create_graph=True)
        (y.sum() + g.pow(2).sum()).backward()
        return [t.grad.clone() for t in call.leaves]

    for a, e in zip(penalized(call.run), penalized(call.reference)):
        assert_close(a, e, 1e-8, 1e-8, f"{case} grad of a gradient penalty")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_every_op_runs_through_the_protocol(case):
    """The op's autograd.Function is the protocol's, its custom ops are registered under its name, and a bad
    argument is refused by the shared checks (a tensor of another device type) before anything runs."""
    from fastlora.op_common import FusedOp, _OpFunction

    call = case.make()
    op = call.op
    assert isinstance(op, FusedOp) and issubclass(op.function, _OpFunction) and op.function.op is op
    for suffix in ("fwd", "infer", "bwd"):
        assert hasattr(getattr(torch.ops.fastlora, f"{op.name}_{suffix}"), "default")
    y = call.run()
    nodes, seen = [y.grad_fn], set()
    while nodes:  # the autograd graph reaches the op's Function (under the reshape of the rows)
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.extend(n for n, _ in node.next_functions)
    assert any(type(n).__name__.startswith(op.function.__name__) for n in seen), [type(n).__name__ for n in seen]
    with pytest.raises(TypeError, match="by name"):
        op(*call.op_args, **{**call.op_kwargs, "bogus": 1})
    with pytest.raises(ValueError, match="one device"):
        bad = list(call.op_args)
        i = next(i for i, (n, t) in enumerate(zip(op.tensors, bad)) if n not in op.any_device and i > 0
                 and isinstance(t, torch.Tensor))
        bad[i] = bad[i].detach().to("meta")
        op(*bad, **call.op_kwargs)


def test_compile_caches_are_keyed_on_the_ops_schemas(monkeypatch):
    """torch.compile's disk caches must not hand this fastlora a graph compiled against other op schemas (an
    upgrade did: "expected at most 8 argument(s) but received 9"). The import puts a hash of every registered
    schema into torch.compiler.config.cache_key_tag, beside the user's own tag; another schema, another tag."""
    from fastlora import op_common

    tag = torch.compiler.config.cache_key_tag
    marks = [t for t in tag.split("|") if t.startswith("fastlora-ops-")]
    assert len(marks) == 1, tag
    registered = {s.split("(")[0] for s in op_common._SCHEMAS}
    for op in ("lora_linear", "lora_embedding", "dora_linear", "dora_embedding", "lora_linear_4bit", "lora_experts",
               "lora_linear_mixed"):
        assert {f"fastlora::{op}_{part}" for part in ("fwd", "infer", "bwd")} <= registered, op
    monkeypatch.setattr(torch.compiler.config, "cache_key_tag", "user-tag|" + tag)
    assert op_common.tag_compile_caches() == "user-tag|" + marks[0]  # the user's tag kept, ours not doubled
    monkeypatch.setattr(op_common, "_SCHEMAS", op_common._SCHEMAS[:-1] + [op_common._SCHEMAS[-1] + ", int extra"])
    changed = op_common.tag_compile_caches()
    assert changed.startswith("user-tag|fastlora-ops-") and changed != "user-tag|" + marks[0]
