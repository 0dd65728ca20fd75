"""Every ```python block of README.md runs as written.

Each block runs in a fresh namespace, so it cannot lean on another block's names, and in an empty folder of its
own (files a block writes, e.g. an adapter, land there). All blocks run in one child interpreter, apart from this
test process's state and imports, with a timeout, the Hugging Face hub offline and the auto backend; one child
for all keeps the cost of importing torch and peft to once.

A block may be left out only for a stated reason, with an HTML comment on the line right above its fence:

    <!-- readme-test: skip: downloads a 7B model -->      never run here, for the reason given
    <!-- readme-test: needs-cuda -->                       run only where CUDA is present

Blocks in other languages (``bash``, plain indented text) are not run.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
TIMEOUT_S = 180

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


def run_blocks(codes: list[str], cwd: Path, timeout: float = TIMEOUT_S) -> list[str | None]:
    """Run each code string in a fresh namespace and folder of one child interpreter. Returns, per block, None
    or the traceback that stopped it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLORA_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # fastlora as installed, not this checkout's folders (its kernels/ would shadow)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(cwd)], input=json.dumps(codes), cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if "@@RESULTS@@" not in proc.stdout:
        raise RuntimeError(f"the README runner died (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.rsplit("@@RESULTS@@", 1)[1])


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3, "README.md lost its ```python examples (or the fence pattern no longer matches)"


@pytest.fixture(scope="module")
def block_results(tmp_path_factory):
    runnable = [b for b in BLOCKS if not b["skip"] and (torch.cuda.is_available() or not b["needs_cuda"])]
    errors = run_blocks([b["code"] for b in runnable], tmp_path_factory.mktemp("readme"),
                        timeout=TIMEOUT_S * max(len(runnable), 1))
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
