"""Checks every checkpoint format shares: the group size and the tensors a quantized linear must have."""
from __future__ import annotations

import sys

import torch

#: read packed int32 words as their bytes (low bits first): true on little-endian hosts; the formats
#: unpack value by value otherwise
BYTE_VIEWS = sys.byteorder == "little"


def word_bytes(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., W]`` -> uint8 ``[..., 4 W]``, the words' bytes in memory order (low bits first on
    the hosts :data:`BYTE_VIEWS` is true on). Copies ``words`` into row-major order first when it is
    not (a transpose, or a size-1 dim torch calls contiguous with other strides)."""
    if words.stride() != torch.empty(words.shape, dtype=words.dtype, device="meta").stride():
        words = torch.empty(words.shape, dtype=words.dtype).copy_(words)
    return words.view(torch.uint8)


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
