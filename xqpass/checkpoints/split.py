"""Sharded loading: each local device's slice of a quantized layer is read from the checkpoint and
converted on its own, then placed as that device's shard (torch_xla SPMD, :mod:`xqpass.sharding`).

A slice of K (row-parallel) or N (column-parallel) of a layer is a slice of each stored tensor, found
from the format's ``specs``: which layer axis each stored dim runs along and how many features one
stored element spans (a packed word, a group). Converting the slice gives exactly the slice of the
converted layer, because every format packs and groups locally. Where a slice would cut a packed word
or a group, or the format's groups span all of K (GPTQ act-order, row-parallel), the layer is read and
converted whole on the host and then split.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from ..nn import XlaQuantizedLinear
from ..sharding import (QUANTIZED_LINEAR_TENSORS, linear_partition_specs, load_local_shards, local_ranges,
                        local_shard_indices, xla_device)
from .format import CheckpointFormat, ConvertedLayer


def stored_slice(dims, ranges: dict, full: dict) -> tuple | None:
    """The index into one stored tensor for the logical ``ranges`` (``{"K": (k0, k1)}`` or ``{"N": ...}``),
    or None when a range boundary falls inside a stored element (a packed word, a group)."""
    index = []
    for axis, unit in dims:
        if axis not in ranges or unit >= full[axis]:  # not split here, or one element spans the axis
            index.append(slice(None))
            continue
        start, stop = ranges[axis]
        if start % unit or (stop % unit and stop != full[axis]):
            return None
        index.append(slice(start // unit, math.ceil(stop / unit)))
    return tuple(index)


def build_module(converted: ConvertedLayer, in_features: int, out_features: int, bias: bool,
                 device=None) -> XlaQuantizedLinear:
    """An ``XlaQuantizedLinear`` for a converted layer; on ``device="meta"`` it holds no bytes (a
    template for partition specs and buffer shapes)."""
    return XlaQuantizedLinear(
        in_features, out_features, is_symmetric=converted.zero_point is None, block_size=converted.group,
        int4_weight=converted.bits == 4, packed=converted.bits == 4, quantize_activation=converted.quantize_activation,
        bias=bias, weight_dtype=converted.weight.dtype, scale_dtype=converted.scale.dtype, block_layout="rows",
        device=device, block_n=converted.block_n,
    )


def load_layer(converted: ConvertedLayer, linear: nn.Linear) -> XlaQuantizedLinear:
    """A whole converted layer into a module on the host (built on "meta": no zero-filled buffers)."""
    q = build_module(converted, linear.in_features, linear.out_features, linear.bias is not None, device="meta")
    q.load_quantized_weight(converted.weight, converted.scale, converted.zero_point)
    if converted.bias is not None:
        q.bias = nn.Parameter(converted.bias.to(linear.bias.dtype), requires_grad=False)
    if converted.perm is not None:
        q.set_input_permutation(converted.perm)
    return q


def load_split_layer(name: str, linear: nn.Linear, fmt: CheckpointFormat, reader, suffixes, style: str, mesh,
                     axis: str, axis_size: int) -> tuple[XlaQuantizedLinear, ConvertedLayer]:
    """One quantized layer, split ``style``-parallel over ``mesh``'s ``axis`` as it loads.

    ``reader(key, index=None)`` reads a checkpoint tensor (or the slice ``index`` of it). Returns the
    module (buffers on the XLA devices, each local device holding its shard) and the converted first
    slice (bits, group, symmetric, perm)."""
    k, n = linear.in_features, linear.out_features
    group = fmt.group(name, k)
    # divisibility, whole blocks (float8 2-D blocks: the config's layout), before reading anything
    linear_partition_specs(name, linear, style, axis, axis_size, layout=fmt.layout(group))
    full = {"K": k, "N": n}
    stored = fmt.specs(group)
    split_axis = "N" if style == "column" else "K"
    ranges = local_ranges(full[split_axis], mesh, axis)
    exact = style == "column" or fmt.row_slices_exact(lambda s: reader(f"{name}.{s}") if s in suffixes else None,
                                                      k, group)
    shape_names = [s for s in suffixes if s in stored and stored[s].dims is None]  # hold [N, K]: no slice
    # a tensor the format does not declare: read whole, and convert names it
    indices = [{s: stored_slice(stored[s].dims, {split_axis: r}, full) if s in stored else None
                for s in suffixes if s not in shape_names} for r in ranges]
    exact = exact and all(index is not None for per_device in indices for index in per_device.values())

    local = []
    if exact:  # each device's slice, read and converted on its own
        shape_tensors = {s: reader(f"{name}.{s}") for s in shape_names}  # checked whole, each slice its own
        for s, t in shape_tensors.items():
            if t.tolist() != [n, k]:
                raise ValueError(f"{name}.{s}: expected [{n}, {k}], got {t.tolist()}")
        for (start, stop), index in zip(ranges, indices):
            tensors = {s: reader(f"{name}.{s}", index[s]) for s in index}
            shape = {"K": k, "N": n, split_axis: stop - start}
            tensors.update({s: torch.tensor([shape["N"], shape["K"]], dtype=t.dtype) for s, t in shape_tensors.items()})
            local.append(fmt.convert(name, tensors, shape["K"], shape["N"], k_offset=start if split_axis == "K" else 0))
        # symmetric only when every slice's zeros are (GPTQ reads it from the zeros)
        whole = replace(local[0], symmetric=all(converted.symmetric for converted in local))
    else:  # the whole layer on the host, then sliced after conversion
        whole = fmt.convert(name, {s: reader(f"{name}.{s}") for s in suffixes}, k, n)
    template = build_module(whole, k, n, linear.bias is not None, device="meta")
    specs = linear_partition_specs(name, template, style, axis, axis_size)

    placed = {}
    for attr, key in QUANTIZED_LINEAR_TENSORS.items():
        shape_source = getattr(template, attr, None)
        if shape_source is None:
            continue
        # the converted dtypes (a float32 zero point beside float16 scales); the bias: the model's
        dtype = linear.bias.dtype if attr == "bias" else getattr(whole, key).dtype
        if attr not in specs:  # whole on every device (e.g. a per-channel scale of a row split)
            placed[attr] = getattr(whole, key).to(dtype).to(xla_device())
            continue
        target, shard_indices = local_shard_indices(shape_source.shape, dtype, mesh, specs[attr])
        if exact:
            shards = [getattr(converted, key) for converted in local]
        else:
            shards = [getattr(whole, key)[index] for index in shard_indices]
        placed[attr] = load_local_shards(target, shard_indices, shards)
    for attr, tensor in placed.items():  # every tensor the template holds on "meta" gets its placed twin
        setattr(template, attr, nn.Parameter(tensor, requires_grad=False) if attr == "bias" else tensor)
    if whole.perm is not None:
        template.set_input_permutation(whole.perm.to(xla_device()))
    return template, whole
