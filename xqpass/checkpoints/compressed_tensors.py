"""compressed-tensors checkpoints (``quant_method: compressed-tensors``, as llm-compressor writes and
vLLM reads them) into the op's layouts, ``format: pack-quantized`` (int4 / int8 weights) and
``int-quantized`` (W8A8: int8 weights, dynamic per-token int8 activations); ``float-quantized`` (float8
weights) is :mod:`.float8`'s. Integers and scales are
moved, never re-quantized.

Per quantized linear ``<name>`` (N = out features, K = in features, b = num_bits, 4 or 8):

* ``<name>.weight_packed`` int32 ``[N, ceil(K * b / 32)]``: signed values shifted by ``2**(b-1)`` to
  unsigned, ``32 / b`` a word packed along **K** (the last dim), first value in the low bits, the row
  padded with zeros to whole words.
* ``<name>.weight_scale`` float ``[N, K / g]`` (strategy ``group``) or ``[N, 1]`` (``channel``);
  ``<name>.weight_shape`` int32 or int64 ``[2]`` = ``[N, K]``.
* ``<name>.weight_zero_point`` (asymmetric only): signed, shifted and packed the same way but along
  **N** (dim 0): int32 ``[ceil(N * b / 32), K / g]``.
* dequantization: ``w = (q - zero_point) * scale`` with signed ``q`` and ``zero_point``.
* ``<name>.bias`` float ``[N]``, optional. Symmetric layers store no zero point (the library drops it).
* ``actorder: group`` (a stored ``weight_g_idx``) is refused; ``weight`` / ``static`` order only how
  the weights were quantized, not the layout.

``int-quantized``: ``<name>.weight`` int8 ``[N, K]`` unpacked, ``weight_scale`` as above,
``weight_zero_point`` int8 ``[N, K/g]`` (asymmetric); ``input_activations`` must be dynamic symmetric
int8 per token, which is the op's ``quantize_activation=True`` (``x_scale = amax|x| / 127`` a row,
round to nearest even).

Into the op: int8 storage (4-bit: packed two a byte, signed nibbles), per-channel ``[N]`` or blockwise
by rows ``[N, K/g]`` scales, ``zero_point = zero * scale`` in float32.
"""
from __future__ import annotations

import torch

from ..quant.layouts import pack_int4
from . import tensors as shared
from .float8 import CompressedTensorsFloat
from .format import CheckpointFormat, ConvertedLayer
from .tensors import BIAS, INDEX, INT8, PACKED, SCALE, Spec, check_config, check_tensors, unpack_words

FORMATS = ("pack-quantized", "int-quantized", "float-quantized")  # float-quantized: .float8
ACTORDERS = (None, "weight", "static")  # "group" / "dynamic" store a weight_g_idx, not read here


def unpack_signed(words: torch.Tensor, bits: int, length: int, dim: int) -> torch.Tensor:
    """Signed int64 values of ``bits`` bits (stored ``+ 2**(bits-1)``) along ``dim``, cut to ``length``."""
    return unpack_words(words, bits, dim).narrow(dim, 0, length) - (1 << (bits - 1))


class CompressedTensors(CheckpointFormat):
    quant_method = "compressed-tensors"
    TENSORS = ("weight_packed", "weight", "weight_scale", "weight_shape", "weight_zero_point")

    @classmethod
    def for_config(cls, config: dict) -> CheckpointFormat:
        """``format: float-quantized`` (float8 weights) is :class:`.float8.CompressedTensorsFloat`'s."""
        if config.get("format") == "float-quantized":
            return CompressedTensorsFloat(config)
        return cls(config)

    def __init__(self, config: dict):  # one config group's weights; activations: none, or W8A8's per token
        self.format = check_config("compressed-tensors", "format", config.get("format") or "pack-quantized", FORMATS)
        if self.format == "float-quantized":
            raise ValueError("compressed-tensors float-quantized is CompressedTensorsFloat's (xqpass/checkpoints/"
                             "float8.py): build the format with CompressedTensors.for_config(config)")
        self.w8a8 = self.format == "int-quantized"  # int8 weights as they are, one a byte
        groups = config.get("config_groups") or {}
        args = [g.get("weights") for g in groups.values() if isinstance(g, dict) and g.get("weights")]
        if len(args) != 1:
            raise ValueError(f"compressed-tensors: expected one config group with weights, got {len(args)}")
        activations = [g.get("input_activations") for g in groups.values()
                       if isinstance(g, dict) and g.get("input_activations")]
        if not self.w8a8 and activations:
            raise ValueError("compressed-tensors: quantized input activations are not supported with pack-quantized")
        if self.w8a8:
            act = activations[0] if len(activations) == 1 else {}
            scheme = (act.get("num_bits"), act.get("type", "int"), act.get("strategy"), act.get("dynamic"),
                      act.get("symmetric", True))
            if scheme != (8, "int", "token", True, True):
                raise ValueError("compressed-tensors int-quantized: expected input_activations {num_bits: 8, type: "
                                 f"int, strategy: token, dynamic: true, symmetric: true}} (W8A8), got {act or None}")
        args, weights = args[0], "compressed-tensors weights"
        check_config(weights, "type", args.get("type", "int"), ("int",))
        self.bits = check_config(weights, "num_bits", args.get("num_bits", 4), (8,) if self.w8a8 else (4, 8))
        strategy = check_config(weights, "strategy", args.get("strategy", "group"), ("group", "channel"))
        self.channel = strategy == "channel"
        self.symmetric = check_config(weights, "symmetric", args.get("symmetric", True), (True, False))
        check_config(weights, "actorder", args.get("actorder"), ACTORDERS)
        self.group_size = None if self.channel else args.get("group_size")  # no -1 here
        if not self.channel and (type(self.group_size) is not int or self.group_size <= 0):
            raise ValueError(f"compressed-tensors: strategy group needs a positive group_size, got {self.group_size!r}")

    def group(self, name: str, in_features: int) -> int:
        """All of K for ``channel``; ``group_size`` for ``group``."""
        return in_features if self.channel else super().group(name, in_features)

    def specs(self, group: int) -> dict[str, Spec]:
        word = 32 // self.bits
        if self.w8a8:  # int8, one a byte, nothing packed
            specs = {"weight": Spec(INT8, (("N", 1), ("K", 1))), "weight_scale": Spec(SCALE, (("N", 1), ("K", group))),
                     "weight_zero_point": Spec(INT8, (("N", 1), ("K", group)))}
        else:
            specs = {"weight_packed": Spec(PACKED, (("N", 1), ("K", word))),
                     "weight_scale": Spec(SCALE, (("N", 1), ("K", group))), "weight_shape": Spec(INDEX, None),
                     "weight_zero_point": Spec(PACKED, (("N", word), ("K", group)))}
        if self.symmetric:  # the library stores no zero point
            del specs["weight_zero_point"]
        return dict(specs, bias=BIAS)

    def convert(self, name: str, tensors: dict, in_features: int, out_features: int,
                k_offset: int = 0) -> ConvertedLayer:
        bits, symmetric, k, n = self.bits, self.symmetric, in_features, out_features
        group = self.group(name, k)
        check_tensors(name, tensors, self.specs(group), k, n, f"compressed-tensors {self.format}",
                      f"in={k}, out={n}, bits={bits}, group_size={group}, symmetric={symmetric}", optional=("bias",))
        if self.w8a8:
            w = tensors["weight"]
            zeros = None if symmetric else tensors["weight_zero_point"].to(torch.int64)
        else:
            if tensors["weight_shape"].tolist() != [n, k]:
                raise ValueError(f"{name}.weight_shape: expected [{n}, {k}], got {tensors['weight_shape'].tolist()}")
            if shared.BYTE_VIEWS and (k * bits) % 8 == 0:
                # the words' bytes are already two values a byte along K, low nibble first (8-bit: one);
                # the offset 2**(b-1) comes off every value with one XOR: (v - 8) mod 16 == v ^ 8
                raw = shared.word_bytes(tensors["weight_packed"])[:, : k * bits // 8]
                w = (raw ^ (0x88 if bits == 4 else 0x80)).view(torch.int8)
            else:
                q = unpack_signed(tensors["weight_packed"], bits, k, 1).to(torch.int8)  # [N, K] signed
                w = pack_int4(q, axis=1) if bits == 4 else q  # 4-bit: signed nibbles, two a byte
            zeros = None if symmetric else unpack_signed(tensors["weight_zero_point"], bits, n, 0)  # [N, K/g]
        scale = tensors["weight_scale"]
        zero_point = None if zeros is None else (zeros.float() * scale.float()).contiguous()
        if self.channel:
            scale = scale[:, 0]
            zero_point = None if zero_point is None else zero_point[:, 0].contiguous()
        return ConvertedLayer(w.contiguous(), scale.contiguous(), zero_point, bits, -1 if self.channel else group,
                              symmetric, bias=tensors.get("bias"), quantize_activation=self.w8a8)
