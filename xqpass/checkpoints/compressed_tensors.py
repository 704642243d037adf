"""compressed-tensors checkpoints (``quant_method: compressed-tensors``, ``format: pack-quantized``, as
llm-compressor writes and vLLM reads them) into the op's layouts. Integers and scales are moved, never
re-quantized.

Per quantized linear ``<name>`` (N = out features, K = in features, b = num_bits, 4 or 8):

* ``<name>.weight_packed`` int32 ``[N, ceil(K * b / 32)]``: signed values shifted by ``2**(b-1)`` to
  unsigned, ``32 / b`` a word packed along **K** (the last dim), first value in the low bits, the row
  padded with zeros to whole words.
* ``<name>.weight_scale`` ``[N, K / g]`` (strategy ``group``) or ``[N, 1]`` (``channel``);
  ``<name>.weight_shape`` int ``[2]`` = ``[N, K]``.
* ``<name>.weight_zero_point`` (asymmetric only): signed, shifted and packed the same way but along
  **N** (dim 0): int32 ``[ceil(N * b / 32), K / g]``.
* dequantization: ``w = (q - zero_point) * scale`` with signed ``q`` and ``zero_point``.

Into the op: int8 storage (4-bit: packed two a byte, signed nibbles), per-channel ``[N]`` or blockwise
by rows ``[N, K/g]`` scales, ``zero_point = zero * scale`` in float32.
"""
from __future__ import annotations

import math

import torch

from ..quant.layouts import pack_int4
from .tensors import check_shapes, resolve_group

SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
KEY = "weight_packed"


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
    if config.get("format") not in (None, "pack-quantized"):
        raise ValueError(f"compressed-tensors format {config.get('format')!r} is not supported "
                         f"(supported: 'pack-quantized')")
    groups = config.get("config_groups") or {}
    args = [g.get("weights") for g in groups.values() if isinstance(g, dict) and g.get("weights")]
    if len(args) != 1:
        raise ValueError(f"compressed-tensors: expected one config group with weights, got {len(args)}")
    if any(g.get("input_activations") for g in groups.values()):
        raise ValueError("compressed-tensors: quantized input activations are not supported with pack-quantized")
    return args[0]


def stored_axes(config: dict, in_features: int, out_features: int) -> dict:
    """Per stored tensor and dim: the layer axis ("K" / "N") and the features one stored element spans;
    "shape": a tensor holding the layer's shape (a slice gets its own)."""
    args = _weights_args(config)
    per = 32 // int(args.get("num_bits", 4))
    size = int(args.get("group_size") or 0)
    group = size if args.get("strategy", "group") == "group" and size > 0 else in_features
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
    per = 32 // bits
    expected = {"weight_packed": (n, math.ceil(k / per)), "weight_scale": (n, k // group), "weight_shape": (2,)}
    if not symmetric:
        expected["weight_zero_point"] = (math.ceil(n / per), k // group)
    check_shapes(name, tensors, expected, "compressed-tensors", f"in={k}, out={n}, bits={bits}, group_size={group}")
    if tensors["weight_shape"].tolist() != [n, k]:
        raise ValueError(f"{name}.weight_shape: expected [{n}, {k}], got {tensors['weight_shape'].tolist()}")
    q = unpack_int32(tensors["weight_packed"], bits, k, 1).to(torch.int8)  # [N, K] signed
    w = pack_int4(q, axis=1) if bits == 4 else q  # 4-bit: signed nibbles, two a byte
    scale = tensors["weight_scale"]
    zero_point = None
    if not symmetric:
        zeros = unpack_int32(tensors["weight_zero_point"], bits, n, 0)  # [N, K/g] signed
        zero_point = (zeros.float() * scale.float()).contiguous()
    if strategy == "channel":
        scale = scale[:, 0].contiguous()
        zero_point = None if zero_point is None else zero_point[:, 0].contiguous()
    return dict(weight=w.contiguous(), scale=scale.contiguous(), zero_point=zero_point, bits=bits,
                group=-1 if strategy == "channel" else group, perm=None, symmetric=symmetric,
                bias=tensors.get("bias"))
