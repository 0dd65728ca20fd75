"""pytest plugin: every PEFT model that PEFT's own test suite builds runs through ``fastlora.accelerate_peft``.

Loaded by ``benchmarks/peft_suite.py`` (``-p peft_suite_plugin``) for the accelerated run of PEFT's tests. Every
PEFT tuner (``get_peft_model``, ``PeftModel``, ``PeftMixedModel``, ``LoraModel(...)``, ``inject_adapter_in_model``,
``add_adapter`` / ``load_adapter``) injects its layers through ``BaseTuner.inject_adapter``; wrapping that one
method routes every LoRA layer the moment PEFT creates it, whatever entry point the test used. Models without a
LoRA layer (a LoHa-only model, say) are left alone.

fastlora's own summary warning ("fastlora.accelerate_peft: N of M LoRA layers run PEFT's forward: ...") is not
raised here: a user calls accelerate_peft after PEFT's get_peft_model returns, while the plugin calls it inside
that call, where the summary would follow PEFT's own warnings and fail tests that assert PEFT's warning is the
last one (test_custom_models.py::TestDynamicDispatch::test_custom_lora_layer_issues_warning). Every other warning,
fastlora's included, passes through.
"""
from __future__ import annotations

import functools
import warnings

_ROUTED = {"calls": 0}


def _install() -> None:
    import fastlora
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import BaseTuner

    original = BaseTuner.inject_adapter
    if getattr(original, "_fastlora_suite", False):
        return

    @functools.wraps(original)
    def inject_adapter(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if any(isinstance(m, LoraLayer) for m in self.modules()):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"fastlora\.accelerate_peft: ")
                fastlora.accelerate_peft(self)
            _ROUTED["calls"] += 1
        return out

    inject_adapter._fastlora_suite = True
    BaseTuner.inject_adapter = inject_adapter


def pytest_configure(config):
    _install()


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"fastlora: accelerate_peft ran on {_ROUTED['calls']} PEFT tuners")
