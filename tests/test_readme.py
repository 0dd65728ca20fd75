"""Every ```python block of README.md runs as written, in the environment that the README's quick start installs.

Each block runs in a fresh namespace, so it cannot lean on another block's names, and in an empty folder of its
own (files a block writes, e.g. an adapter, land there). All blocks run in one child interpreter, apart from this
test process's state and imports, with a timeout, the Hugging Face hub offline and the auto backend; one child
for all keeps the cost of importing torch and peft to once.

The child does not see this test environment (which has every test dependency): it sees only what the quick
start's own install line (``pip install -e ".[EXTRAS]" && python -m fastlora bench ...``, read from README.md)
would install. ``quick_start_site`` resolves that line's requirements (setup.py as it is now, then each installed
package's declared dependencies, recursively, plus what a fresh virtualenv brings) and links just those
distributions into a folder that the child uses as its only site-packages (``python -S`` + ``site.addsitedir``).
A block that needs a package the quick start does not install fails here with the ModuleNotFoundError a
newcomer would get. CI's quickstart lane (.ci/run) also runs this file in a virtualenv built by that line itself.

A block may be left out only for a stated reason, with an HTML comment on the line right above its fence:

    <!-- readme-test: skip: downloads a 7B model -->      never run here, for the reason given
    <!-- readme-test: needs-cuda -->                       run only where CUDA is present

Blocks in other languages (``bash``, plain indented text) are not run.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import runpy
import subprocess
import sys
import sysconfig
import types
from pathlib import Path
from unittest import mock

import pytest
import torch
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TIMEOUT_S = 180
QUICK_START_LINE = re.compile(r'pip install -e "\.\[([\w,-]+)\]" && python -m fastlora bench')

FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->\s*$")


def python_blocks(text: str) -> list[dict]:
    """The ```python blocks of a markdown text: {"line", "code", "skip" (a reason or None), "needs_cuda"}."""
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        skip, needs_cuda = None, False
        if marker:
            directive = marker.group(1)
            if directive == "needs-cuda":
                needs_cuda = True
            elif directive.startswith("skip:") and directive[len("skip:"):].strip():
                skip = directive[len("skip:"):].strip()
            else:
                raise ValueError(f"README.md line {line - 1}: unknown or reasonless marker {directive!r}; use "
                                 "'readme-test: skip: REASON' or 'readme-test: needs-cuda'")
        blocks.append({"line": line, "code": match.group(1), "skip": skip, "needs_cuda": needs_cuda})
    return blocks


def quick_start_extras(text: str) -> list[str]:
    """The extras of the quick start's install line (the one that goes on to run the benchmark)."""
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    lines = QUICK_START_LINE.findall(section)
    assert len(lines) == 1, f"README's quick start should have one 'pip install -e \".[...]\" && python -m fastlora " \
                            f"bench' line, found {len(lines)}"
    return lines[0].split(",")


def declared_requirements(extras) -> list[Requirement]:
    """fastlora's requirements with ``extras``, read from setup.py as it is now (not from an install that may
    predate an edit)."""
    captured = {}
    setuptools = types.SimpleNamespace(setup=lambda **kw: captured.update(kw), find_packages=lambda **kw: [])
    cwd = os.getcwd()
    os.chdir(ROOT)  # setup.py reads README.md by a relative path
    try:
        with mock.patch.dict(sys.modules, {"setuptools": setuptools}):
            runpy.run_path(str(ROOT / "setup.py"))
    finally:
        os.chdir(cwd)
    unknown = set(extras) - set(captured["extras_require"])
    assert not unknown, f"the quick start installs extras that setup.py does not declare: {sorted(unknown)}"
    reqs = list(captured["install_requires"]) + [r for e in extras for r in captured["extras_require"][e]]
    return [Requirement(r) for r in reqs]


def _fresh_venv_packages() -> set[str]:
    """What ``python -m venv`` installs by itself: the wheels ensurepip bundles (pip; setuptools before 3.12)."""
    import ensurepip

    bundled = Path(ensurepip.__file__).parent / "_bundled"
    return {canonicalize_name(w.name.split("-")[0]) for w in bundled.glob("*.whl")} if bundled.is_dir() else {"pip"}


def resolve_installed(requirements, site_dir: Path) -> tuple[set[str], set[str]]:
    """(distributions of ``site_dir`` that ``requirements`` pull in, recursively with their extras and markers;
    requirements that nothing in ``site_dir`` provides)."""
    installed = {canonicalize_name(d.metadata["Name"]): d
                 for d in importlib.metadata.distributions(path=[str(site_dir)])}
    wanted, missing = set(), set()
    todo = [(r, "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**default_environment(), "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        dist = installed.get(name)
        if dist is None:
            missing.add(str(req))
            continue
        for wanted_extra in sorted(req.extras) + [""]:
            if (name, wanted_extra) in wanted:
                continue
            wanted.add((name, wanted_extra))
            todo += [(Requirement(r), wanted_extra) for r in dist.requires or []]
    return {name for name, _ in wanted}, missing


def quick_start_site(extras, view: Path) -> Path:
    """Fill ``view`` with links to the distributions that ``pip install -e ".[EXTRAS]"`` installs into a fresh
    virtualenv, taken from this environment's site-packages: whole top-level folders where only those own them,
    file by file where a folder is shared with a package they leave out."""
    site_dir = Path(sysconfig.get_paths()["purelib"])
    wanted, missing = resolve_installed(declared_requirements(extras), site_dir)
    assert not missing, (f"this environment lacks what the quick start installs ({sorted(missing)}): run the tests "
                         "after pip install -e \".[test]\", which includes every extra")
    wanted |= {canonicalize_name("fastlora-fused")} | _fresh_venv_packages()
    owners: dict[str, set[str]] = {}
    files: dict[str, list[str]] = {}
    for dist in importlib.metadata.distributions(path=[str(site_dir)]):
        name = canonicalize_name(dist.metadata["Name"])
        for f in dist.files or []:
            parts = Path(str(f)).parts
            if not parts or parts[0] == "..":  # console scripts and other files outside site-packages
                continue
            owners.setdefault(parts[0], set()).add(name)
            if name in wanted:
                files.setdefault(parts[0], []).append(str(f))
    view.mkdir(parents=True, exist_ok=True)
    for top, names in owners.items():
        if not names & wanted or not (site_dir / top).exists():
            continue
        if names <= wanted:
            (view / top).symlink_to(site_dir / top)
            continue
        for rel in files[top]:  # a folder shared with a left-out package: link only the wanted files
            target = view / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists() and (site_dir / rel).exists():
                target.symlink_to(site_dir / rel)
    return view


_CHILD = r"""
import json, os, sys, traceback
blocks, root = json.loads(sys.stdin.read()), sys.argv[1]
results = []
for i, code in enumerate(blocks):
    folder = os.path.join(root, f"block{i}")
    os.makedirs(folder)
    os.chdir(folder)
    try:
        exec(compile(code, f"<README block {i}>", "exec"), {"__name__": "__main__"})
        results.append(None)
    except BaseException:
        results.append(traceback.format_exc())
print("\n@@RESULTS@@" + json.dumps(results))
"""
_ONLY_SITE = "import site, sys; site.addsitedir(sys.argv.pop(2))\n"  # the view as the only site-packages


def run_blocks(codes: list[str], cwd: Path, timeout: float = TIMEOUT_S, site_dir: Path | None = None
               ) -> list[str | None]:
    """Run each code string in a fresh namespace and folder of one child interpreter, which sees only
    ``site_dir``'s packages when given (else this environment's). Returns, per block, None or the traceback
    that stopped it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLORA_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # fastlora as installed, not this checkout's folders (its kernels/ would shadow)
    if site_dir is None:
        cmd = [sys.executable, "-c", _CHILD, str(cwd)]
    else:
        cmd = [sys.executable, "-S", "-c", _ONLY_SITE + _CHILD, str(cwd), str(site_dir)]
    proc = subprocess.run(cmd, input=json.dumps(codes), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if "@@RESULTS@@" not in proc.stdout:
        raise RuntimeError(f"the README runner died (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.rsplit("@@RESULTS@@", 1)[1])


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3, "README.md lost its ```python examples (or the fence pattern no longer matches)"


@pytest.fixture(scope="module")
def block_results(tmp_path_factory):
    runnable = [b for b in BLOCKS if not b["skip"] and (torch.cuda.is_available() or not b["needs_cuda"])]
    site = quick_start_site(quick_start_extras(README.read_text(encoding="utf-8")),
                            tmp_path_factory.mktemp("quick-start-site"))
    errors = run_blocks([b["code"] for b in runnable], tmp_path_factory.mktemp("readme"),
                        timeout=TIMEOUT_S * max(len(runnable), 1), site_dir=site)
    return {b["line"]: e for b, e in zip(runnable, errors)}


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{b['line']}" for b in BLOCKS])
def test_readme_block_runs(block, block_results):
    if block["skip"]:
        pytest.skip(block["skip"])
    if block["needs_cuda"] and not torch.cuda.is_available():
        pytest.skip("the README marks this block as CUDA-only")
    error = block_results[block["line"]]
    assert error is None, f"README.md block at line {block['line']} failed:\n{block['code']}\n--- error ---\n{error}"


def test_block_extraction_and_markers():
    text = ("intro\n```python\na = 1\n```\n\n<!-- readme-test: skip: needs a 7B model -->\n```python\nb = 2\n```\n"
            "<!-- readme-test: needs-cuda -->\n```python\nc = 3\n```\n```bash\nls\n```\n    indented = 4\n")
    blocks = python_blocks(text)
    assert [b["code"] for b in blocks] == ["a = 1\n", "b = 2\n", "c = 3\n"]
    assert [b["line"] for b in blocks] == [2, 7, 11]
    assert [b["skip"] for b in blocks] == [None, "needs a 7B model", None]
    assert [b["needs_cuda"] for b in blocks] == [False, False, True]
    with pytest.raises(ValueError, match="reasonless"):
        python_blocks("<!-- readme-test: skip -->\n```python\nx = 1\n```\n")


def test_a_failing_block_fails(tmp_path):
    codes = ["import fastlora\nfastlora.lora_linear(*base_model)",   # an undefined name
             "y = f(x, *, scaling=1.0)",                                # a signature is not code
             "import torch\nbase_model = torch.nn.Linear(2, 2)",       # defines base_model...
             "base_model(None)"]                                        # ...which the next block cannot see
    errors = run_blocks(codes, tmp_path, timeout=TIMEOUT_S)
    assert "NameError" in errors[0] and "SyntaxError" in errors[1]
    assert errors[2] is None and "NameError" in errors[3]


def test_the_quick_start_site_holds_what_its_extras_install_and_nothing_else(tmp_path):
    """The mechanism above catches a missing extra: with the plot extra alone (the quick start's line before the
    all extra existed), peft and bitsandbytes are missing as in a fresh virtualenv, and matplotlib is there."""
    site = quick_start_site(["plot"], tmp_path / "site")
    codes = ["import matplotlib, torch, fastlora", "import peft", "import bitsandbytes", "import pytest"]
    errors = run_blocks(codes, tmp_path, site_dir=site)
    assert errors[0] is None, errors[0]
    assert all("ModuleNotFoundError" in (e or "") for e in errors[1:]), errors


def test_the_test_extra_holds_the_quick_start():
    """pip install -e ".[test]" (the README's test command, and CI) must bring everything the quick start does,
    or this file could not build the quick start's site from the test environment."""
    quick = {canonicalize_name(r.name) for r in declared_requirements(quick_start_extras(README.read_text("utf-8")))}
    test = {canonicalize_name(r.name) for r in declared_requirements(["test"])}
    assert quick <= test, sorted(quick - test)
