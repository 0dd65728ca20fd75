"""Build, for sm_90 and without a GPU, every kernel config that the autotuner may pick over a problem grid, and
check that each one can launch on an H100 / H200: shared memory within the card's 227 KB and no spilled registers.

How: the real launch helpers (``lora_forward`` / ``lora_backward``) run on ``meta`` tensors with the launch step
replaced by a recorder, so the kernels, argument dtypes, constexprs and autotune pruning seen here are exactly
those of a CUDA run. For every recorded launch the prune hook is applied as the autotuner applies it, and every
config it keeps (plus the fixed config used with FASTLORA_AUTOTUNE=0) is compiled to a cubin with Triton's
offline compiler; ``cuobjdump -res-usage`` gives registers, stack and local memory (spills) of the cubin.
Identical builds (same kernel, signature, constexprs and config) are compiled once.

    python benchmarks/offline_build.py                 # the declared grid (minutes on 2 cores)
    python benchmarks/offline_build.py --grid ci       # the slice tests/test_kernels_compile.py runs
    python benchmarks/offline_build.py --grid fp16-fp32  # fp16 inputs, fp32 adapters (fp32 rank-r products)
    python benchmarks/offline_build.py --list          # only count the builds
    /tmp/venv36/bin/python benchmarks/offline_build.py # the same with another Triton (3.6: the GPU machine's)

Exit status 0 when every build fits, 1 otherwise (the failing builds are printed).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # a real (offline) build: must be unset before triton is imported
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ["FASTLORA_AUTOTUNE"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

from fastlora.kernels import common as kc  # noqa: E402
from fastlora.kernels import lora_linear as kl  # noqa: E402
from fastlora.kernels import resources  # noqa: E402

SM90_SMEM_LIMIT = 227 * 1024  # H100 / H200: the opt-in maximum of dynamic shared memory per block
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# The declared grid (issue 10). Shapes only matter through the prune hooks (M) and specialization (K, N).
FULL_GRID = dict(
    M=[1, 16, 64, 2048, 8192],
    KN=[(4096, 4096), (8192, 8192), (1000, 1537)],
    r=[1, 16, 64, 128, 256],
    dtype=["fp16", "bf16", "fp32"],
    adapters=["half", "fp32"],
    dropout=[0.0, 0.1],
    bias=[False, True],
    tf32=[False, True],  # fp32 only: TF32 tensor cores or exact IEEE products
)
# CI's slice: every M class (decode, the small-M path, large), the largest rank and the one that crashed (128),
# fp32 adapters, dropout and bias on bf16; per launch, the two most demanding configs by the resource model.
CI_GRID = dict(
    M=[1, 64, 2048],
    KN=[(4096, 4096)],
    r=[128, 256],
    dtype=["bf16"],
    adapters=["fp32"],
    dropout=[0.0, 0.1],
    bias=[True],
    tf32=[False],
)

# fp16 inputs with fp32 adapters: the builds whose rank-r products take fp32 operands (LO_FP32, issue 20).
FP16_FP32_GRID = dict(FULL_GRID, dtype=["fp16"], adapters=["fp32"], tf32=[False])
GRIDS = {"full": FULL_GRID, "ci": CI_GRID, "fp16-fp32": FP16_FP32_GRID}


def problems(grid):
    for M, (K, N), r, dt, ad, p, bias, tf32 in itertools.product(
            grid["M"], grid["KN"], grid["r"], grid["dtype"], grid["adapters"], grid["dropout"], grid["bias"],
            grid["tf32"]):
        if tf32 and dt != "fp32":
            continue
        yield dict(M=M, K=K, N=N, r=r, dtype=dt, adapters=ad, dropout=p, bias=bias, tf32=tf32)


@contextlib.contextmanager
def recording():
    """Replace the launch step by a recorder; the SM count is an H100's."""
    launches = []
    saved_launch, saved_sm = kl._launch, kc.sm_count

    def record(name, tuned, fixed_fn, fixed_cfgs, grid, m_bucket, *args, **kwargs):
        launches.append((name, tuned, fixed_cfgs, m_bucket, args, kwargs))

    kl._launch, kc.sm_count = record, (lambda device, off_cuda=4: 132)
    try:
        yield launches
    finally:
        kl._launch, kc.sm_count = saved_launch, saved_sm


def run_problem(pb, base):
    """Record the launches of a forward and a training backward of one problem with the given base GEMM."""
    dt = DTYPES[pb["dtype"]]
    adt = torch.float32 if pb["adapters"] == "fp32" else dt
    M, K, N, r = pb["M"], pb["K"], pb["N"], pb["r"]
    meta = dict(device="meta")
    x = torch.empty(M, K, dtype=dt, **meta)
    w = torch.empty(N, K, dtype=dt, **meta)
    a = torch.empty(r, K, dtype=adt, **meta)
    b = torch.empty(N, r, dtype=adt, **meta)
    bias = torch.empty(N, dtype=dt, **meta) if pb["bias"] else None
    saved_env = os.environ.get("FASTLORA_BASE_GEMM")
    os.environ["FASTLORA_BASE_GEMM"] = base
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = pb["tf32"]
    try:
        with recording() as launches:
            for save_h in (True, False):  # training and inference forwards
                y, h = kl.lora_forward(x, w, a, b, bias, 2.0, pb["dropout"], 1, save_h=save_h)
            y, h = kl.lora_forward(x, w, a, b, bias, 2.0, pb["dropout"], 1)
            kl.lora_backward(torch.empty(M, N, dtype=dt, **meta), x, w, a, b, h, 2.0, pb["dropout"], 1,
                             True, False, True, True, pb["bias"])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
        if saved_env is None:
            os.environ.pop("FASTLORA_BASE_GEMM", None)
        else:
            os.environ["FASTLORA_BASE_GEMM"] = saved_env
    return launches


def _jit_of(tuned):
    fn, heuristics = tuned.fn, {}
    while not isinstance(fn, triton.runtime.JITFunction):
        heuristics.update(getattr(fn, "values", {}))
        fn = fn.fn
    return fn, heuristics


def _do_not_specialize(jit):
    out = set()
    for d in getattr(jit, "do_not_specialize", ()):
        out.add(jit.arg_names[d] if isinstance(d, int) else d)
    return out


_MODELS = resources.MODELS


def build_specs(launch, pick="all"):
    """The builds one recorded launch may need: every config the prune hook keeps (``pick="extremes"``: only
    the ones with the most shared memory and the most live registers by the resource model), and the fixed
    config."""
    name, tuned, fixed_cfgs, m_bucket, args, kwargs = launch
    jit, heuristics = _jit_of(tuned)
    nargs = dict(zip(jit.arg_names, args))
    kept = tuned.early_config_prune(tuned.configs, nargs, **kwargs) if tuned.early_config_prune else tuned.configs
    if pick == "extremes" and len(kept) > 2:
        model = _MODELS[name]
        res = {id(c): model(c, {**nargs, **kwargs}) for c in kept}
        kept = list({id(c): c for c in (max(kept, key=lambda c: res[id(c)][0]),
                                         max(kept, key=lambda c: res[id(c)][1]))}.values())
    configs = [(c.kwargs, c.num_warps, c.num_stages, "tuned") for c in kept]
    fixed = kl.fixed_config(tuned, fixed_cfgs, m_bucket, args, kwargs)  # what FASTLORA_AUTOTUNE=0 launches
    warps, stages = fixed.pop("num_warps"), fixed.pop("num_stages")
    configs.append((fixed, warps, stages, "fixed"))
    dns = _do_not_specialize(jit)
    specs = []
    for cfg_kwargs, warps, stages, origin in configs:
        consts = dict(kwargs, **cfg_kwargs)
        for hname, hfn in heuristics.items():
            consts[hname] = hfn({**nargs, **consts})
        signature, attrs = {}, {}
        for i, an in enumerate(jit.arg_names):
            if an in consts:
                signature[an] = "constexpr"
                continue
            v = nargs[an]
            if isinstance(v, torch.Tensor):
                signature[an] = "*" + TRITON_TYPES[v.dtype]
                attrs[i] = True  # data pointers of fresh tensors are 16-byte aligned
            elif isinstance(v, bool) or v is None:
                raise TypeError(f"{name}: argument {an}={v!r} is not a kernel argument type")
            elif isinstance(v, int):
                if an not in dns and v == 1:
                    signature[an] = "constexpr"
                    consts[an] = 1
                    continue
                signature[an] = "i32" if -2**31 <= v < 2**31 else "i64"
                if an not in dns and v % 16 == 0:
                    attrs[i] = True
            else:
                signature[an] = "fp32"
        kconsts = {k: v for k, v in consts.items() if k in jit.arg_names}
        key = (jit.__name__, tuple(sorted(signature.items())), tuple(sorted(kconsts.items())),
               tuple(sorted(attrs)), warps, stages)
        specs.append(dict(key=key, kernel=name, jit=jit, signature=signature, consts=kconsts, attrs=sorted(attrs),
                          warps=warps, stages=stages, origin=origin, nargs=nargs))
    return specs


_CUOBJDUMP = None


def _cuobjdump():
    global _CUOBJDUMP
    if _CUOBJDUMP is None:
        _CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return _CUOBJDUMP


@contextlib.contextmanager
def _fresh_build():
    """An empty Triton cache (so ptxas runs) whose ptxas log is printed, captured here."""
    import io

    saved = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TRITON_DUMP_PTXAS_LOG")}
    buf = io.StringIO()
    with tempfile.TemporaryDirectory() as cache:
        os.environ.update(TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1")
        try:
            with contextlib.redirect_stdout(buf):
                yield buf
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def compile_spec(spec):
    """Compile one spec for sm_90 with Triton's own ptxas flags; returns shared bytes and, from ptxas's log,
    registers, stack frame and spill bytes (``cuobjdump -res-usage`` of the cubin where the log is silent)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = spec["jit"]
    attrs = {(jit.arg_names.index(n) if isinstance(n, str) else n,): [["tt.divisibility", 16]]
             for n in spec["attrs"]}
    t0 = time.time()
    try:
        with _fresh_build() as log:
            k = triton.compile(ASTSource(jit, spec["signature"], spec["consts"], attrs),
                               target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": spec["warps"], "num_stages": spec["stages"]})
    except Exception as exc:  # noqa: BLE001 - reported as a failed build
        return dict(error=f"{type(exc).__name__}: {str(exc)[:300]}", seconds=time.time() - t0)
    text = log.getvalue()
    res = dict(shared=int(k.metadata.shared), seconds=time.time() - t0)
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    r = re.search(r"Used (\d+) registers", text)
    if m and r:
        res.update(regs=int(r.group(1)), stack=int(m.group(1)), spill_stores=int(m.group(2)),
                   spill_loads=int(m.group(3)))
    else:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True).stdout
        usage = {m.group(1): int(m.group(2)) for m in re.finditer(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}
        res.update(regs=usage.get("REG", -1), stack=usage.get("STACK", 0), spill_stores=usage.get("LOCAL", 0),
                   spill_loads=usage.get("LOCAL", 0))
    return res


_SPECS: list = []


def _compile_index(i):
    return i, compile_spec(_SPECS[i])


def collect(grid, pick="all"):
    """Every unique build of the grid, each with the problems that need it (the first one kept)."""
    specs, seen = [], {}
    for pb in problems(grid):
        for base in ("triton", "cublas"):
            for launch in run_problem(pb, base):
                for spec in build_specs(launch, pick):
                    if spec["key"] not in seen:
                        seen[spec["key"]] = spec
                        spec["problem"] = dict(pb, base=base)
                        specs.append(spec)
    return specs


def describe(spec):
    c = spec["consts"]
    tiles = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in c)
    flags = ",".join(k for k in ("HAS_BIAS", "LO_DROPOUT", "FUSE_SHRINK", "STORE_L", "HAS_DROPOUT", "NEED_DB",
                                 "NEED_DBIAS", "EVEN_K", "LO_FP32") if c.get(k))
    ptrs = ",".join(f"{k}={v[1:]}" for k, v in spec["signature"].items() if v.startswith("*"))
    return (f"{spec['kernel']:<13} {tiles:<11} R{c.get('R_BLOCK')} w{spec['warps']} s{spec['stages']} "
            f"{spec['origin']:<5} {c.get('DOT_PRECISION')} [{flags}] ({ptrs})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", choices=tuple(GRIDS), default="full")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--list", action="store_true", help="count and list the builds, compile nothing")
    ap.add_argument("--smem-limit", type=int, default=SM90_SMEM_LIMIT)
    ap.add_argument("--json", help="write every build's figures here")
    ap.add_argument("--limit", type=int, default=0, help="build only the first N (a quick look)")
    ap.add_argument("--sample", type=int, default=0, help="build a seeded random sample of N of them")
    ap.add_argument("--worst", type=int, default=0,
                    help="build the N most demanding by the resource model (with --sample: both sets)")
    ap.add_argument("--shard", default="", help="i/n: build every n-th spec starting at i (split over machines)")
    ap.add_argument("--pick", choices=("all", "extremes"), default=None,
                    help="all kept configs (the full grid's default) or, per launch, the two most demanding by "
                         "the resource model (the ci grid's default)")
    args = ap.parse_args(argv)
    grid = GRIDS[args.grid]
    t0 = time.time()
    pick = args.pick or ("extremes" if args.grid == "ci" else "all")
    specs = collect(grid, pick)
    if args.limit:
        specs = specs[:args.limit]
    if args.sample or args.worst:
        import random

        def demand(spec):
            tile = {k: spec["consts"][k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in spec["consts"]}
            cfg = triton.Config(tile, num_warps=spec["warps"], num_stages=spec["stages"])
            return resources.overflow(_MODELS[spec["kernel"]](cfg, {**spec["nargs"], **spec["consts"]}))

        chosen = sorted(specs, key=demand, reverse=True)[:args.worst] if args.worst else []
        rest = [s for s in specs if s not in chosen]
        chosen += random.Random(0).sample(rest, min(args.sample, len(rest)))
        specs = chosen
    if args.shard:
        i, n = (int(v) for v in args.shard.split("/"))
        specs = specs[i::n]
    print(f"triton {triton.__version__}: {len(specs)} unique sm_90 builds over the {args.grid} grid "
          f"(collected in {time.time() - t0:.1f}s)", flush=True)
    if args.list:
        for s in specs:
            print("  ", describe(s))
        return 0
    _SPECS[:] = specs
    results = [None] * len(specs)
    if args.jobs > 1:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            for done, (i, res) in enumerate(pool.imap_unordered(_compile_index, range(len(specs))), 1):
                results[i] = res
                if done % 50 == 0:
                    print(f"  {done}/{len(specs)} built ({time.time() - t0:.0f}s)", flush=True)
    else:
        for i in range(len(specs)):
            results[i] = compile_spec(specs[i])
    bad = []
    for spec, res in zip(specs, results):
        problems_ = []
        if "error" in res:
            problems_.append(res["error"])
        else:
            if res["shared"] > args.smem_limit:
                problems_.append(f"shared {res['shared'] / 1024:.1f} KB > {args.smem_limit / 1024:.0f} KB")
            if res["spill_stores"] > 0 or res["spill_loads"] > 0:
                problems_.append(f"spills: {res['spill_stores']} B stored, {res['spill_loads']} B loaded "
                                 f"(stack frame {res['stack']} B)")
        if problems_:
            bad.append((spec, res, problems_))
    worst = max((r.get("regs", 0) for r in results), default=0)
    most = max((r.get("shared", 0) for r in results), default=0)
    print(f"built {len(specs)} in {time.time() - t0:.0f}s: max {worst} registers, max {most / 1024:.1f} KB shared; "
          f"{len(bad)} failing")
    for spec, res, why in bad:
        print(f"FAIL {describe(spec)}: {'; '.join(why)} (regs {res.get('regs')}) e.g. {spec['problem']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(build=describe(s), problem=s["problem"], **r) for s, r in zip(specs, results)], f,
                      indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
