"""PEFT's own test suite with every PEFT model routed through fastlora, against plain PEFT.

    python benchmarks/peft_suite.py                       # the LoRA-related selection below
    python benchmarks/peft_suite.py --files test_mixed.py # one file (names under the sdist's tests/)
    python benchmarks/peft_suite.py --both                # also run plain PEFT on every test, not only on failures
    python benchmarks/peft_suite.py --json out.json       # also write every test's outcomes

The tests are those of PEFT's source distribution for the installed peft version (``pip download --no-deps
--no-binary :all: peft==X``, fetched once into ``--cache``; ``--peft-src DIR`` uses an unpacked one). The
accelerated run loads ``benchmarks/peft_suite_plugin.py``, which wraps ``BaseTuner.inject_adapter`` so that every
PEFT model with a LoRA layer goes through ``fastlora.accelerate_peft`` whatever entry point the test used. Then the
tests that failed accelerated run again on plain PEFT: those that pass there are fastlora's regressions (exit
status 1 when there is any); those that fail there too (the Hugging Face Hub is not reachable offline, a GPU is
missing) say nothing about fastlora and are only counted.

PEFT's test dependencies beyond fastlora's test extra: ``pip install parameterized diffusers datasets scipy attrs
scikit-learn pytest-timeout`` (pytest-timeout: a few tests wait forever on the unreachable Hub; with it they fail
after ``--test-timeout`` seconds, in both runs). Runs offline (``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))

# Files whose tests build LoRA models; test_custom_models.py parametrizes every tuner, so only its LoRA cases run.
FILES = ("test_custom_models.py", "test_mixed.py", "test_lora_variants.py", "test_initialization.py",
         "test_other.py", "test_low_level_api.py", "test_target_parameters.py", "test_tuners_utils.py",
         "test_trainable_tokens.py", "test_helpers.py")
K_FILTER = {"test_custom_models.py": "lora or Lora or LoRA or LORA or dora or Dora or DoRA",
            "test_initialization.py": "lora or Lora or LoRA or LORA or dora or Dora or DoRA"}


def peft_sources(cache: str, peft_src: str | None) -> str:
    """The unpacked sdist of the installed peft version, with tests/ importable as a package."""
    if peft_src is None:
        import peft

        version = peft.__version__
        peft_src = os.path.join(cache, f"peft-{version}")
        if not os.path.isdir(peft_src):
            os.makedirs(cache, exist_ok=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            f"peft=={version}", "-d", cache], check=True)
            with tarfile.open(os.path.join(cache, f"peft-{version}.tar.gz")) as tar:
                tar.extractall(cache, filter="data")
    tests = os.path.join(peft_src, "tests")
    if not os.path.isdir(tests):
        raise SystemExit(f"{peft_src} has no tests/ folder")
    init = os.path.join(tests, "__init__.py")  # the tests import each other relatively (from .testing_common)
    if not os.path.exists(init):
        open(init, "w").close()
    return peft_src


def _has_timeout_plugin() -> bool:
    import importlib.util

    return importlib.util.find_spec("pytest_timeout") is not None


def run(peft_src: str, files, accelerated: bool, xml_dir: str, timeout: float,
        test_timeout: float = 300.0, only: dict[str, list[str]] | None = None) -> dict[str, str]:
    """{test id: passed | failed | skipped} for one run; each file in its own pytest process (``only``: per file,
    the node ids to run instead of the file's selection)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    if accelerated:
        env["PYTHONPATH"] = HERE + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    outcomes: dict[str, str] = {}
    for f in files:
        if only is not None and not only.get(f):
            continue
        xml = os.path.join(xml_dir, f"{'fast' if accelerated else 'plain'}-{f}.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               f"--junitxml={xml}"]
        if _has_timeout_plugin():  # a test that waits on the unreachable Hub (backoff) fails instead of hanging
            cmd += [f"--timeout={test_timeout:.0f}"]
        if only is not None:
            cmd += only[f]
        else:
            cmd += [os.path.join("tests", f)] + (["-k", K_FILTER[f]] if f in K_FILTER else [])
        if accelerated:
            cmd += ["-p", "peft_suite_plugin"]
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=peft_src, env=env, capture_output=True, text=True, timeout=timeout)
            lines = (proc.stdout + proc.stderr).strip().splitlines()
            tail = [ln for ln in lines if re.search(r"\d+ (passed|failed|error)", ln)][-1:] or lines[-1:] or [""]
        except subprocess.TimeoutExpired:
            tail = [f"timed out after {timeout:.0f} s"]
        print(f"  {'accelerated' if accelerated else 'plain':11s} {f:28s} {time.monotonic() - start:7.1f} s  "
              f"{tail[0]}", flush=True)
        if os.path.exists(xml):
            outcomes.update(_outcomes(xml))
    return outcomes


def _node_id(case) -> str:
    """pytest's node id of a junit testcase: tests/test_x.py::Class::name (classname is tests.test_x.Class)."""
    parts = case.get("classname").split(".")
    i = max(j for j, part in enumerate(parts) if part.startswith("test_"))
    path = "/".join(parts[:i + 1]) + ".py"
    return "::".join([path, *parts[i + 1:], case.get("name")])


def _outcomes(xml: str) -> dict[str, str]:
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = _node_id(case)
        kids = {child.tag for child in case}
        if kids & {"failure", "error"}:
            out[name] = "failed"
        elif "skipped" in kids:
            out[name] = "skipped"
        else:
            out[name] = "passed"
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peft-src", help="an unpacked peft sdist (default: fetched into --cache)")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/fastlora/peft-sdist"))
    parser.add_argument("--files", help="comma-separated test files of PEFT's tests/ (default: the LoRA selection)")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per file and run")
    parser.add_argument("--test-timeout", type=float, default=120.0, help="seconds per test (pytest-timeout)")
    parser.add_argument("--json", help="write {test: [plain, accelerated]} here")
    parser.add_argument("--both", action="store_true", help="run plain PEFT on every test, not only on failures")
    args = parser.parse_args(argv)
    files = tuple(f.strip() for f in args.files.split(",")) if args.files else FILES
    src = peft_sources(args.cache, args.peft_src)
    import peft
    import torch

    print(f"PEFT {peft.__version__} tests from {src}; torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fastlora-peft-suite-") as tmp:
        fast = run(src, files, True, tmp, args.timeout, args.test_timeout)
        failed = {}
        for n, o in fast.items():
            if o == "failed":
                failed.setdefault(n.split("::")[0].removeprefix("tests/"), []).append(n)
        plain = run(src, files, False, tmp, args.timeout, args.test_timeout, only=None if args.both else failed)
    names = sorted(set(plain) | set(fast))
    regressions = [n for n in names if plain.get(n) == "passed" and fast.get(n) != "passed"]
    fixed = [n for n in names if plain.get(n) == "failed" and fast.get(n) == "passed"]
    count = lambda d, o: sum(v == o for v in d.values())  # noqa: E731
    print(f"\n{len(fast)} tests accelerated: {count(fast, 'passed')} passed, {count(fast, 'failed')} failed, "
          f"{count(fast, 'skipped')} skipped; on plain PEFT ({'all' if args.both else 'the failed ones'}): "
          f"{count(plain, 'passed')} passed, {count(plain, 'failed')} failed, {count(plain, 'skipped')} skipped")
    print(f"pass on plain PEFT, fail accelerated: {len(regressions)}")
    for n in regressions:
        print(f"  {n}  ({fast.get(n, 'missing')})")
    if fixed:
        print(f"fail on plain PEFT, pass accelerated: {len(fixed)}")
        for n in fixed:
            print(f"  {n}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({n: [plain.get(n), fast.get(n)] for n in names}, f, indent=1)
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
