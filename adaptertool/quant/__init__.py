"""NF4/FP4 quantisation maths and the bitsandbytes 4-bit checkpoint layout (pure tensors)."""

from adaptertool.quant.bnb_format import (
    FLOAT_DTYPES,
    FourBitState,
    QuantizedKeys,
    dequantize_weight,
    entry_layout,
    find_quantized_weights,
    quant_state_key,
    quantization_config,
)
from adaptertool.quant.fourbit import (
    BLOCKSIZES,
    block_absmax,
    block_count,
    dequantize_4bit,
    packed_size,
    quantize_4bit,
)
from adaptertool.quant.nested import (
    NESTED_BLOCKSIZE,
    NestedAbsmax,
    NestedCodebook,
    dequantize_absmax,
    nearest_codes,
    nested_codebook,
    quantize_absmax,
)
from adaptertool.quant.selection import Selection, matches_module, select_weights
from adaptertool.quant.tables import (
    QUANT_TYPES,
    Codebook,
    codebook,
    dynamic_map,
    fourbit_values,
)

__all__ = [
    "BLOCKSIZES",
    "FLOAT_DTYPES",
    "NESTED_BLOCKSIZE",
    "QUANT_TYPES",
    "Codebook",
    "FourBitState",
    "NestedAbsmax",
    "NestedCodebook",
    "QuantizedKeys",
    "Selection",
    "block_absmax",
    "block_count",
    "codebook",
    "dequantize_4bit",
    "dequantize_absmax",
    "dequantize_weight",
    "dynamic_map",
    "entry_layout",
    "find_quantized_weights",
    "fourbit_values",
    "matches_module",
    "nearest_codes",
    "nested_codebook",
    "packed_size",
    "quant_state_key",
    "quantization_config",
    "quantize_4bit",
    "quantize_absmax",
    "select_weights",
]
