"""fastlora: fused-kernel LoRA for PyTorch."""
from . import reference
from .backend import get_backend, set_backend
from .functional import lora_linear
from .layers import LoRALinear

__version__ = "0.1.0"

__all__ = ["lora_linear", "LoRALinear", "set_backend", "get_backend", "reference", "__version__"]
