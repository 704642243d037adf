"""Layouts and quantize/pack helpers (pure torch; the one place that defines each layout)."""
from .layouts import (
    FLOAT8_DTYPES,
    PER_CHANNEL,
    PER_TENSOR,
    Layout,
    blockwise_to_per_channel,
    dequantize,
    pack_int4,
    per_channel_to_blockwise,
    unpack_int4,
    unpacked_weight,
    value_range,
)
from .quantize import QuantizedWeight, quantize_per_token, quantize_per_token_float8, quantize_weight

__all__ = [
    "FLOAT8_DTYPES",
    "PER_CHANNEL",
    "PER_TENSOR",
    "Layout",
    "QuantizedWeight",
    "blockwise_to_per_channel",
    "dequantize",
    "pack_int4",
    "per_channel_to_blockwise",
    "quantize_per_token",
    "quantize_per_token_float8",
    "quantize_weight",
    "unpack_int4",
    "unpacked_weight",
    "value_range",
]
