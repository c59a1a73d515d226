"""The minimal LoRA/QLoRA training loop: a native decoder, LoRA layers and their loader.

Names load on first use, so importing the package does not import torch.
"""

from adaptertool._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "fourbit": ("FourBitWeight",),
    "fp8weight": ("Fp8Weight",),
    "lora": ("FrozenLinear", "LoRALinear", "LoraSpec"),
    "model": ("SUPPORTED_ARCHITECTURES", "Decoder", "DecoderConfig"),
    "weights": ("load_decoder",),
})
