"""fastlora: fused-kernel LoRA for PyTorch."""
from . import reference
from .backend import get_backend, set_backend
from .config import LoraConfig
from .functional import lora_linear
from .layers import LoRAEmbedding, LoRALinear
from .model import LoraModel, get_peft_model
from .peft_interop import accelerate_peft

__version__ = "0.1.0"

__all__ = [
    "lora_linear",
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
