"""compressed-tensors checkpoints (``quant_method: compressed-tensors``, as llm-compressor writes and
vLLM reads them) into the op's layouts, ``format: pack-quantized`` (int4 / int8 weights) and
``int-quantized`` (W8A8: int8 weights, dynamic per-token int8 activations). Integers and scales are
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

import math
import torch

from ..quant.layouts import pack_int4
from . import tensors as shared
from .tensors import FLOAT, INDEX, INT8, PACKED, SCALE, Spec, check_config, check_tensors, resolve_group

SUFFIXES = ("weight_packed", "weight", "weight_scale", "weight_shape", "weight_zero_point")
FORMATS = ("pack-quantized", "int-quantized")
ACTORDERS = (None, "weight", "static")  # "group" / "dynamic" store a weight_g_idx, not read here


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
    fmt = check_config("compressed-tensors", "format", config.get("format") or "pack-quantized", FORMATS)
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
    args = args[0]
    check_config("compressed-tensors weights", "type", args.get("type", "int"), ("int",))
    check_config("compressed-tensors weights", "num_bits", args.get("num_bits", 4), (8,) if fmt == "int-quantized" else (4, 8))
    check_config("compressed-tensors weights", "strategy", args.get("strategy", "group"), ("group", "channel"))
    check_config("compressed-tensors weights", "symmetric", args.get("symmetric", True), (True, False))
    check_config("compressed-tensors weights", "actorder", args.get("actorder"), ACTORDERS)
    return dict(args, format=fmt)


def stored_axes(config: dict, in_features: int, out_features: int) -> dict:
    """Per stored tensor and dim: the layer axis ("K" / "N") and the features one stored element spans;
    "shape": a tensor holding the layer's shape (a slice gets its own)."""
    args = _weights_args(config)
    per = 32 // args.get("num_bits", 4)
    group = _group(args, "compressed-tensors", in_features)
    if args["format"] == "int-quantized":  # int8, one a byte, nothing packed
        return {"weight": (("N", 1), ("K", 1)), "weight_scale": (("N", 1), ("K", group)),
                "weight_zero_point": (("N", 1), ("K", group)), "bias": (("N", 1),)}
    return {"weight_packed": (("N", 1), ("K", per)), "weight_scale": (("N", 1), ("K", group)),
            "weight_zero_point": (("N", per), ("K", group)), "weight_shape": "shape", "bias": (("N", 1),)}


def _group(args: dict, name: str, in_features: int) -> int:
    """The group size along K: all of K for ``channel``; ``group_size`` (no -1 here) for ``group``."""
    if args.get("strategy", "group") == "channel":
        return in_features
    size = args.get("group_size")
    if type(size) is not int or size <= 0:
        raise ValueError(f"{name}: compressed-tensors strategy group needs a positive group_size, got {size!r}")
    return resolve_group(name, size, in_features)


def expected_tensors(args: dict, symmetric: bool, in_features: int, out_features: int, group: int) -> dict:
    """suffix -> :class:`Spec` of one layer's tensors (the layout in the module docstring)."""
    k, n = in_features, out_features
    bits = args.get("num_bits", 4)
    if args["format"] == "int-quantized":
        expected = {"weight": Spec((n, k), INT8), "weight_scale": Spec((n, k // group), SCALE),
                    "weight_zero_point": Spec((n, k // group), INT8)}
    else:
        per = 32 // bits
        expected = {"weight_packed": Spec((n, math.ceil(k / per)), PACKED),
                    "weight_scale": Spec((n, k // group), SCALE), "weight_shape": Spec((2,), INDEX),
                    "weight_zero_point": Spec((math.ceil(n / per), k // group), PACKED)}
    if symmetric:
        del expected["weight_zero_point"]
    return dict(expected, bias=Spec((n,), FLOAT))


def convert_layer(name: str, tensors: dict, config: dict, in_features: int, out_features: int, k_offset: int = 0) -> dict:
    args = _weights_args(config)
    bits, strategy, symmetric = args.get("num_bits", 4), args.get("strategy", "group"), args.get("symmetric", True)
    k, n = in_features, out_features
    group = _group(args, name, k)
    w8a8 = args["format"] == "int-quantized"
    check_tensors(name, tensors, expected_tensors(args, symmetric, k, n, group), f"compressed-tensors {args['format']}",
                  f"in={k}, out={n}, bits={bits}, group_size={group}, symmetric={symmetric}", optional=("bias",))
    if w8a8:
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
