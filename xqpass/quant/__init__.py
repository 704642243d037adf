"""Layouts and quantize/pack helpers (pure torch; the one place that defines each layout)."""
from .layouts import (
    PER_CHANNEL,
    Layout,
    blockwise_to_per_channel,
    dequantize,
    pack_int4,
    per_channel_to_blockwise,
    unpack_int4,
    unpacked_weight,
    value_range,
)
from .quantize import QuantizedWeight, quantize_per_token, quantize_weight

__all__ = [
    "PER_CHANNEL",
    "Layout",
    "QuantizedWeight",
    "blockwise_to_per_channel",
    "dequantize",
    "pack_int4",
    "per_channel_to_blockwise",
    "quantize_per_token",
    "quantize_weight",
    "unpack_int4",
    "unpacked_weight",
    "value_range",
]
