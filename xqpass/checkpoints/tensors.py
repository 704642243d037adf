"""Checks every checkpoint format shares: the group size and the tensors a quantized linear must have."""
from __future__ import annotations

import sys

#: read packed int32 words as their bytes (low bits first): true on little-endian hosts; the formats
#: unpack value by value otherwise
BYTE_VIEWS = sys.byteorder == "little"


def resolve_group(name: str, group: int, in_features: int) -> int:
    """``group`` (``-1``: one group over all of K), checked to divide K."""
    group = in_features if group == -1 else group
    if group <= 0 or in_features % group:
        raise ValueError(f"{name}: group_size={group} does not divide in_features={in_features}")
    return group


def check_shapes(name: str, tensors: dict, expected: dict, fmt: str, context: str, optional=()) -> None:
    """Each ``name.suffix`` of ``expected`` is present (unless ``optional``) with its expected shape;
    ``context`` (e.g. "in=64, out=48, bits=4, group_size=16") goes into the message."""
    for suffix, shape in expected.items():
        t = tensors.get(suffix)
        if t is None:
            if suffix in optional:
                continue
            raise ValueError(f"missing tensor {name}.{suffix} ({fmt}, shape {shape})")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}.{suffix}: expected shape {shape} for {context}, got {tuple(t.shape)}")
