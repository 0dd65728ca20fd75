"""The repository's ``kernels/`` folder must never answer ``import kernels``.

transformers 5.x depends on Hugging Face's ``kernels`` package and imports it from ``transformers.modeling_utils``.
Python puts the working directory first on ``sys.path`` (``python -m pytest``, ``python -c``), so a regular
package ``kernels/`` in the repository root used to shadow it (NOTES.md, "Why kernels/ has no __init__.py").
These checks run Python in a subprocess with the repository root as working directory, as a user who just cloned
the repository does, and check that both names resolve where they should: ``kernels`` to the installed package,
``fastlora.kernels`` to this repository's folder (source tree) or to ``fastlora/kernels/`` (a wheel).
"""
import glob
import importlib.metadata
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, *args] if not code else [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _transformers_requires_kernels() -> bool:
    reqs = importlib.metadata.requires("transformers") or []
    return any(r.split(";")[0].strip().startswith("kernels") and "extra ==" not in r for r in reqs)


def test_kernels_folder_is_not_a_regular_package():
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py")), (
        "kernels/__init__.py makes the folder a regular package that shadows Hugging Face's `kernels` when Python "
        "runs from the repository root; fastlora/__init__.py binds the folder as fastlora.kernels instead")


def test_transformers_peft_and_fastlora_import_from_the_repository_root():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    code = ("import importlib.util, os, sys\n"
            "import transformers.modeling_utils, peft, fastlora, fastlora.kernels\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print('KERNELS', spec.origin if spec else None)\n"
            "print('FASTLORA_KERNELS', list(fastlora.kernels.__path__))\n")
    out = _run(code)
    assert out.returncode == 0, f"import from the repository root failed:\n{out.stdout}\n{out.stderr[-3000:]}"
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("KERNELS", "FASTLORA")))
    kernels_origin = lines["KERNELS"]
    if _installed("kernels"):
        # Hugging Face's package is installed: `import kernels` must reach it, not this repository's folder.
        expected = os.path.realpath(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py"))
        assert kernels_origin != "None" and os.path.realpath(kernels_origin) == expected, (
            f"`import kernels` from the repository root resolves to {kernels_origin}, not to the installed "
            f"Hugging Face package ({expected}): the repository shadows it")
    fastlora_kernels = [os.path.realpath(p) for p in eval(lines["FASTLORA_KERNELS"])]
    assert os.path.realpath(os.path.join(ROOT, "kernels")) in fastlora_kernels


def test_ci_really_exercises_the_collision():
    """Where transformers depends on Hugging Face's ``kernels`` (5.x), it must be installed here: otherwise the
    test above would pass without ever meeting the collision it guards against."""
    pytest.importorskip("transformers")
    if not _transformers_requires_kernels():
        pytest.skip(f"transformers {importlib.metadata.version('transformers')} does not depend on `kernels`")
    assert _installed("kernels"), "transformers requires Hugging Face's `kernels`, which is not installed"


def test_cli_version_from_the_repository_root():
    import fastlora

    out = _run("", "-m", "fastlora", "--version")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == f"fastlora {fastlora.__version__}"


def test_wheel_installs_the_kernels_as_fastlora_kernels(tmp_path):
    """A wheel (what `pip install .` builds too) holds the folder as fastlora/kernels/ and nothing at top level
    named kernels."""
    pytest.importorskip("setuptools")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), ROOT], capture_output=True, text=True, timeout=600,
                         cwd=str(tmp_path))
    if out.returncode != 0 and "No module named pip" in out.stderr:
        pytest.skip("pip is not available in this environment")
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = glob.glob(str(tmp_path / "*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    sources = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "kernels", "*.py")))
    assert sources and all(f"fastlora/kernels/{name}" in names for name in sources), names
    assert not [n for n in names if n.startswith("kernels/")], "the wheel installs a top-level `kernels`"
