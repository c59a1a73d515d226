"""One pipeline per command: plan from headers, stream tensors through pure maths, commit atomically.

Names load on first use: most pipelines import torch, which ``info`` and ``verify`` do without.
"""

from adaptertool._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "combine": ("CombineConfig", "CombineReport", "combine"),
    "convert": ("ConvertConfig", "ConvertReport", "convert"),
    "convert_gguf": ("GgufConvertConfig", "GgufConvertReport", "convert_to_gguf"),
    "demo": ("DemoConfig", "DemoReport", "demo"),
    "dequantize": ("DequantConfig", "DequantReport", "dequantize"),
    "info": ("InfoReport", "info"),
    "init": ("InitConfig", "InitReport", "init_adapter"),
    "merge": ("MergeConfig", "MergeReport", "merge", "subtract"),
    "quantize": ("QuantConfig", "QuantReport", "quantize"),
    "quantized": ("QuantSummary", "QuantizedView", "describe_quantization", "open_quantized_view", "read_quantized_weight"),
    "extract": ("ExtractConfig", "ExtractReport", "extract"),
    "hub": ("PullConfig", "PullReport", "PushConfig", "PushReport", "model_card", "pull", "push"),
    "reshard": ("ReshardConfig", "ReshardReport", "reshard"),
    "train": ("TrainConfig", "TrainReport", "train"),
    "verify": ("VerifyReport", "verify"),
})
