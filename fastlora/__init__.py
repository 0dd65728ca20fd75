"""fastlora: fused-kernel LoRA for PyTorch."""
from . import reference
from .backend import get_backend, set_backend
from .config import LoraConfig
from .functional import lora_linear
from .layers import LoRAEmbedding, LoRALinear, LoRALinear4bit
from .model import LoraModel, get_peft_model
from .peft_interop import accelerate_peft
from .qlora import lora_linear_4bit

__version__ = "0.1.0"

__all__ = [
    "lora_linear",
    "lora_linear_4bit",
    "LoRALinear",
    "LoRALinear4bit",
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
