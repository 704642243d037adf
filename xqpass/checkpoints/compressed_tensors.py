"""compressed-tensors checkpoints (``quant_method: compressed-tensors``, as llm-compressor writes and
vLLM reads them) into the op's layouts, ``format: pack-quantized`` (int4 / int8 weights) and
``int-quantized`` (W8A8: int8 weights, dynamic per-token int8 activations). Integers and scales are
moved, never re-quantized.

Per quantized linear ``<name>`` (N = out features, K = in features, b = num_bits, 4 or 8):

* ``<name>.weight_packed`` int32 ``[N, ceil(K * b / 32)]``: signed values shifted by ``2**(b-1)`` to
  unsigned, ``32 / b`` a word packed along **K** (the last dim), first value in the low bits, the row
  padded with zeros to whole words.
* ``<name>.weight_scale`` ``[N, K / g]`` (strategy ``group``) or ``[N, 1]`` (``channel``);
  ``<name>.weight_shape`` int ``[2]`` = ``[N, K]``.
* ``<name>.weight_zero_point`` (asymmetric only): signed, shifted and packed the same way but along
  **N** (dim 0): int32 ``[ceil(N * b / 32), K / g]``.
* dequantization: ``w = (q - zero_point) * scale`` with signed ``q`` and ``zero_point``.

``int-quantized``: ``<name>.weight`` int8 ``[N, K]`` unpacked, ``weight_scale`` as above,
``weight_zero_point`` int8 ``[N, K/g]`` (asymmetric); ``input_activations`` must be dynamic symmetric
int8 per token, which is the op's ``quantize_activation=True`` (``x_scale = amax|x| / 127`` a row,
round to nearest even).

Into the op: int8 storage (4-bit: packed two a byte, signed nibbles), per-channel ``[N]`` or blockwise
by rows ``[N, K/g]`` scales, ``zero_point = zero * scale`` in float32.
"""
from __future__ import annotations

import math
import torch

from ..quant.layouts import pack_int4
from . import tensors as shared
from .tensors import check_shapes, resolve_group

SUFFIXES = ("weight_packed", "weight", "weight_scale", "weight_shape", "weight_zero_point")
KEY = "weight_scale"  # both formats have it; a float linear's "weight" alone is not quantized
FORMATS = ("pack-quantized", "int-quantized")


def unpack_int32(words: torch.Tensor, bits: int, length: int, dim: int) -> torch.Tensor:
    """Signed int64 values of ``bits`` bits unpacked along ``dim`` and cut to ``length``."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = w.unsqueeze(dim + 1)
    shape = [1] * w.dim()
    shape[dim + 1] = per
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(shape)
    values = ((w >> shifts) & ((1 << bits) - 1)).flatten(dim, dim + 1)
    return values.narrow(dim, 0, length) - (1 << (bits - 1))


def _weights_args(config: dict) -> dict:
    """The one config group's ``weights`` arguments, with the activation scheme checked: none for
    pack-quantized, dynamic symmetric int8 per token for int-quantized (W8A8)."""
    fmt = config.get("format") or "pack-quantized"
    if fmt not in FORMATS:
        raise ValueError(f"compressed-tensors format {fmt!r} is not supported (supported: {', '.join(FORMATS)})")
    groups = config.get("config_groups") or {}
    args = [g.get("weights") for g in groups.values() if isinstance(g, dict) and g.get("weights")]
    if len(args) != 1:
        raise ValueError(f"compressed-tensors: expected one config group with weights, got {len(args)}")
    activations = [g.get("input_activations") for g in groups.values() if isinstance(g, dict) and g.get("input_activations")]
    if fmt == "pack-quantized" and activations:
        raise ValueError("compressed-tensors: quantized input activations are not supported with pack-quantized")
    if fmt == "int-quantized":
        act = activations[0] if len(activations) == 1 else {}
        scheme = (act.get("num_bits"), act.get("type", "int"), act.get("strategy"), act.get("dynamic"),
                  act.get("symmetric", True))
        if scheme != (8, "int", "token", True, True):
            raise ValueError("compressed-tensors int-quantized: expected input_activations {num_bits: 8, type: int, "
                             f"strategy: token, dynamic: true, symmetric: true}} (W8A8), got {act or None}")
    return dict(args[0], format=fmt)


def stored_axes(config: dict, in_features: int, out_features: int) -> dict:
    """Per stored tensor and dim: the layer axis ("K" / "N") and the features one stored element spans;
    "shape": a tensor holding the layer's shape (a slice gets its own)."""
    args = _weights_args(config)
    per = 32 // int(args.get("num_bits", 4))
    size = int(args.get("group_size") or 0)
    group = size if args.get("strategy", "group") == "group" and size > 0 else in_features
    if args["format"] == "int-quantized":  # int8, one a byte, nothing packed
        return {"weight": (("N", 1), ("K", 1)), "weight_scale": (("N", 1), ("K", group)),
                "weight_zero_point": (("N", 1), ("K", group)), "bias": (("N", 1),)}
    return {"weight_packed": (("N", 1), ("K", per)), "weight_scale": (("N", 1), ("K", group)),
            "weight_zero_point": (("N", per), ("K", group)), "weight_shape": "shape", "bias": (("N", 1),)}


def convert_layer(name: str, tensors: dict, config: dict, in_features: int, out_features: int, k_offset: int = 0) -> dict:
    args = _weights_args(config)
    bits = int(args.get("num_bits", 4))
    if bits not in (4, 8) or args.get("type", "int") != "int":
        raise ValueError(f"{name}: compressed-tensors {args.get('type')} num_bits={bits} is not supported "
                         f"(expected int 4 or 8)")
    strategy = args.get("strategy", "group")
    k, n = in_features, out_features
    if strategy == "channel":
        group = k
    elif strategy == "group":
        group = resolve_group(name, max(int(args.get("group_size") or 0), 0), k)  # -1 is no group here
    else:
        raise ValueError(f"{name}: compressed-tensors strategy {strategy!r} is not supported (group, channel)")
    symmetric = bool(args.get("symmetric", True))
    w8a8 = args["format"] == "int-quantized"
    per = 32 // bits
    context = f"in={k}, out={n}, bits={bits}, group_size={group}"
    if w8a8:
        if bits != 8:
            raise ValueError(f"{name}: compressed-tensors int-quantized num_bits={bits} is not supported (expected 8)")
        expected = {"weight": (n, k), "weight_scale": (n, k // group)}
        if not symmetric:
            expected["weight_zero_point"] = (n, k // group)
        check_shapes(name, tensors, expected, "compressed-tensors int-quantized", context)
        if tensors["weight"].dtype != torch.int8:
            raise ValueError(f"{name}.weight: expected int8 (int-quantized), got {tensors['weight'].dtype}")
        w = tensors["weight"]
        zeros = None if symmetric else tensors["weight_zero_point"].to(torch.int64)
    else:
        expected = {"weight_packed": (n, math.ceil(k / per)), "weight_scale": (n, k // group), "weight_shape": (2,)}
        if not symmetric:
            expected["weight_zero_point"] = (math.ceil(n / per), k // group)
        check_shapes(name, tensors, expected, "compressed-tensors", context)
        if tensors["weight_shape"].tolist() != [n, k]:
            raise ValueError(f"{name}.weight_shape: expected [{n}, {k}], got {tensors['weight_shape'].tolist()}")
        if shared.BYTE_VIEWS and (k * bits) % 8 == 0:
            # the words' bytes are already two values a byte along K, low nibble first (8-bit: one);
            # the offset 2**(b-1) comes off every value with one XOR: (v - 8) mod 16 == v ^ 8
            raw = shared.word_bytes(tensors["weight_packed"])[:, : k * bits // 8]
            w = (raw ^ (0x88 if bits == 4 else 0x80)).view(torch.int8)
        else:
            q = unpack_int32(tensors["weight_packed"], bits, k, 1).to(torch.int8)  # [N, K] signed
            w = pack_int4(q, axis=1) if bits == 4 else q  # 4-bit: signed nibbles, two a byte
        zeros = None if symmetric else unpack_int32(tensors["weight_zero_point"], bits, n, 0)  # [N, K/g] signed
    scale = tensors["weight_scale"]
    zero_point = None if zeros is None else (zeros.float() * scale.float()).contiguous()
    if strategy == "channel":
        scale = scale[:, 0].contiguous()
        zero_point = None if zero_point is None else zero_point[:, 0].contiguous()
    return dict(weight=w.contiguous(), scale=scale.contiguous(), zero_point=zero_point, bits=bits,
                group=-1 if strategy == "channel" else group, perm=None, symmetric=symmetric,
                bias=tensors.get("bias"), quantize_activation=w8a8)
