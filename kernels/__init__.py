"""fastlora.kernels: the Triton kernels of the fused LoRA linear and their launch helpers.

``lora_forward`` / ``lora_backward`` have exactly the signatures of ``fastlora.reference``'s;
``dropout_keep_mask`` materializes the kernels' Philox keep mask, for tests only.
"""
from .dropout import dropout_keep_mask
from .lora_linear import launch_counts, lora_backward, lora_forward

__all__ = ["lora_forward", "lora_backward", "dropout_keep_mask", "launch_counts"]
