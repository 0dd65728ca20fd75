"""fastlora: fused-kernel LoRA for PyTorch.

The op (``lora_linear``) and the layers (``LoRALinear``, ``LoRAEmbedding``) need only torch. The model level is
PEFT's own, accelerated: ``get_peft_model``, ``from_pretrained``, ``accelerate_peft``, ``fused_layers`` and
``LoraConfig`` (``peft.LoraConfig`` itself) need peft: ``pip install -e ".[peft]"`` in a clone.
"""
from . import reference
from .backend import get_backend, set_backend
from .dora import dora_embedding, dora_linear, dora_weight_norm
from .functional import lora_embedding, lora_linear, lora_linear_multi
from .layers import LoRAEmbedding, LoRALinear, LoRALinear4bit
from .peft_interop import accelerate_peft, from_pretrained, fused_layers, get_peft_model
from .qlora import lora_linear_4bit

__version__ = "0.1.0"

__all__ = [
    "lora_linear",
    "lora_linear_multi",
    "lora_embedding",
    "dora_linear",
    "dora_embedding",
    "dora_weight_norm",
    "lora_linear_4bit",
    "LoRALinear",
    "LoRALinear4bit",
    "LoRAEmbedding",
    "get_peft_model",
    "from_pretrained",
    "accelerate_peft",
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
