"""fastlora: fused-kernel LoRA for PyTorch."""
from . import reference
from .backend import get_backend, set_backend
from .config import LoraConfig
from .dora import dora_embedding, dora_linear, dora_weight_norm
from .functional import lora_linear
from .layers import LoRAEmbedding, LoRALinear
from .model import LoraModel, get_peft_model
from .peft_interop import accelerate_peft

__version__ = "0.1.0"

__all__ = [
    "lora_linear",
    "dora_linear",
    "dora_embedding",
    "dora_weight_norm",
    "LoRALinear",
    "LoRAEmbedding",
    "LoraConfig",
    "get_peft_model",
    "LoraModel",
    "accelerate_peft",
    "set_backend",
    "get_backend",
    "reference",
    "__version__",
]
