"""fastlora: fused-kernel LoRA for PyTorch.

The op (``lora_linear``) and the layers (``LoRALinear``, ``LoRAEmbedding``) need only torch. The model level is
PEFT's own, accelerated: ``get_peft_model``, ``from_pretrained``, ``accelerate_peft``, ``fused_layers`` and
``LoraConfig`` (``peft.LoraConfig`` itself) need peft: ``pip install -e ".[peft]"`` in a clone.
"""
import os as _os


def _bind_source_kernels() -> None:
    """Make ``fastlora.kernels`` the repository's top-level ``kernels/`` folder when fastlora runs from its
    source tree (an editable install, or Python started in the repository root).

    ``kernels/`` has no ``__init__.py`` on purpose: a regular package there would answer ``import kernels`` from
    the repository root and shadow Hugging Face's ``kernels``, which transformers 5.x imports (NOTES.md,
    "Why kernels/ has no __init__.py"). A wheel or ``pip install .`` copies the folder to ``fastlora/kernels/``,
    where Python finds it as a namespace subpackage with no help; in a source tree nothing maps it below
    ``fastlora``, so its spec is made here, by the standard path finder, before anything imports it.
    """
    import importlib.machinery
    import importlib.util
    import sys

    here = _os.path.dirname(_os.path.abspath(__file__))
    if "fastlora.kernels" in sys.modules or _os.path.isdir(_os.path.join(here, "kernels")):
        return  # installed copy (or already bound): the import system finds it itself
    spec = importlib.machinery.PathFinder.find_spec("fastlora.kernels", [_os.path.dirname(here)])
    if spec is not None and spec.submodule_search_locations:
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastlora.kernels"] = module
        globals()["kernels"] = module  # as the import system does for a subpackage it loads itself


_bind_source_kernels()

from . import reference  # noqa: E402
from .backend import get_backend, set_backend  # noqa: E402
from .dora import dora_embedding, dora_linear, dora_weight_norm  # noqa: E402
from .functional import lora_embedding, lora_linear, lora_linear_multi  # noqa: E402
from .layers import LoRAEmbedding, LoRALinear, LoRALinear4bit  # noqa: E402
from .mixed import lora_embedding_mixed, lora_linear_mixed  # noqa: E402
from .moe import lora_experts, lora_experts_forward  # noqa: E402
from .peft_interop import (accelerate_peft, allow_mixed_batch_training, from_pretrained, fused_layers,  # noqa: E402
                           get_peft_model)
from .qlora import lora_linear_4bit  # noqa: E402
from .op_common import tag_compile_caches as _tag_compile_caches  # noqa: E402

_tag_compile_caches()  # every op is registered by now: torch.compile's disk caches key on their schemas

__version__ = "0.1.0"

__all__ = [
    "lora_linear",
    "lora_linear_multi",
    "lora_embedding",
    "lora_linear_mixed",
    "lora_embedding_mixed",
    "dora_linear",
    "dora_embedding",
    "dora_weight_norm",
    "lora_linear_4bit",
    "lora_experts",
    "lora_experts_forward",
    "LoRALinear",
    "LoRALinear4bit",
    "LoRAEmbedding",
    "get_peft_model",
    "from_pretrained",
    "accelerate_peft",
    "allow_mixed_batch_training",
    "fused_layers",
    "set_backend",
    "get_backend",
    "reference",
    "__version__",
]  # LoraConfig (peft's) is left out so that `from fastlora import *` works without peft


def __getattr__(name: str):
    if name == "LoraConfig":  # peft's own class; imported on first use so that fastlora does not need peft
        try:
            from peft import LoraConfig
        except ImportError as e:
            raise ImportError('fastlora.LoraConfig is peft.LoraConfig: pip install peft transformers safetensors '
                              '(or pip install -e ".[peft]" in a fastlora clone)') from e
        return LoraConfig
    raise AttributeError(f"module 'fastlora' has no attribute {name!r}")
