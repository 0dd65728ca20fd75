"""The mutation script's mutants still apply to the current sources (fast, no mutant is run).

Each mutant's original snippet must occur exactly once in its file: when the code moves on, a stale mutant fails
here instead of silently testing nothing. Run the mutants themselves with ``python tests/mutants.py``."""
from __future__ import annotations

import os

import pytest

import mutants

ISSUE_16 = {"dA_mask_relative_row", "deterministic_dB_without_scaling", "deterministic_mode_ignored",
            "philox_word_reused_across_quad", "autograd_A_B_needs_swapped"}


def test_mutant_list_is_sound():
    names = [m.name for m in mutants.MUTANTS]
    assert len(names) == len(set(names)), "mutant names must be unique"
    assert len(names) >= 20
    assert ISSUE_16 <= set(names)
    areas = {m.file.split("/")[0] if m.file.startswith("kernels") else m.file for m in mutants.MUTANTS}
    assert {"kernels", "fastlora/reference.py", "fastlora/autograd.py", "fastlora/peft_interop/__init__.py"} <= areas
    assert any(m.file == "kernels/dropout.py" for m in mutants.MUTANTS)


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=lambda m: m.name)
def test_mutant_applies_to_the_current_sources(mutant):
    path = os.path.join(mutants.ROOT, mutant.file)
    assert os.path.isfile(path), f"{mutant.name}: {mutant.file} does not exist"
    with open(path, encoding="utf-8") as f:
        text = f.read()
    count = text.count(mutant.original)
    assert count == 1, f"{mutant.name}: the original snippet occurs {count} times in {mutant.file} (must be 1)"
    assert mutant.replacement != mutant.original
    for sel in mutant.tests:
        test_file = sel.split("::")[0]
        assert os.path.isfile(os.path.join(mutants.ROOT, test_file)), f"{mutant.name}: no {test_file}"
        if "::" in sel:
            func = sel.split("::")[1].split("[")[0]
            with open(os.path.join(mutants.ROOT, test_file), encoding="utf-8") as f:
                assert f"def {func}(" in f.read(), f"{mutant.name}: no test {func} in {test_file}"
