"""What every checkpoint format shares: reading packed int32 words, and the checks of the config
values a format knows and of the tensors a quantized linear must have, each declared by its format
as data (:class:`Spec`: a shape and the dtypes the format's published layout allows)."""
from __future__ import annotations

import math
import sys
from typing import NamedTuple

import torch

#: read packed int32 words as their bytes (low bits first): true on little-endian hosts; the formats
#: unpack value by value otherwise
BYTE_VIEWS = sys.byteorder == "little"

#: the dtypes the formats store, by role
PACKED = (torch.int32,)  # words of packed integers
SCALE = (torch.float16, torch.bfloat16, torch.float32)
INDEX = (torch.int32, torch.int64)  # group indices, stored shapes
INT8 = (torch.int8,)  # unpacked int8 values
E4M3 = (torch.float8_e4m3fn,)  # float8 weights (HF fp8, compressed-tensors float-quantized)
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # a bias, cast to the model's


class Spec(NamedTuple):
    """One stored tensor of a quantized linear: the dtypes its format allows and, per dim, the layer
    axis it runs along ("K" / "N"; None: a dim of size 1 along neither, as compressed-tensors' ``[N, 1]``
    per-channel scale) and how many features one element spans (1, a packed word, a group): its shape,
    and the slice of it a slice of the layer reads (:mod:`.split`). ``dims`` None: the tensor holds the
    layer's shape ``[N, K]``."""
    dtypes: tuple
    dims: tuple | None

    def shape(self, in_features: int, out_features: int) -> tuple:
        full = {"K": in_features, "N": out_features}
        if self.dims is None:
            return (2,)
        return tuple(1 if axis is None else math.ceil(full[axis] / unit) for axis, unit in self.dims)


#: a linear's optional bias, any float dtype (cast to the model's)
BIAS = Spec(FLOAT, (("N", 1),))


def word_bytes(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., W]`` -> uint8 ``[..., 4 W]``, the words' bytes in memory order (low bits first on
    the hosts :data:`BYTE_VIEWS` is true on). Copies ``words`` into row-major order first when it is
    not (a transpose, or a size-1 dim torch calls contiguous with other strides)."""
    if words.stride() != torch.empty(words.shape, dtype=words.dtype, device="meta").stride():
        words = torch.empty(words.shape, dtype=words.dtype).copy_(words)
    return words.view(torch.uint8)


def unpack_words(words: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """int32 words -> int64 values in ``[0, 2**bits)``, ``32 / bits`` a word along ``axis``, the
    first value in the low bits (arithmetic: right on any host, unlike :func:`word_bytes`)."""
    axis, per = axis % words.dim(), 32 // bits
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(per, *[1] * (words.dim() - 1 - axis))
    values = ((words.to(torch.int64) & 0xFFFFFFFF).unsqueeze(axis + 1) >> shifts) & ((1 << bits) - 1)
    return values.flatten(axis, axis + 1)


def check_config(fmt: str, key: str, value, known: tuple, why: str = ""):
    """A config ``value`` (already defaulted by the caller), checked to be one of ``known``: a value a
    format does not know is an error, never read as the default. Types must match (``1`` is not ``True``);
    ``why`` goes into the message."""
    if not any(type(value) is type(k) and value == k for k in known):
        raise ValueError(f"{fmt} {key}={value!r} is not supported (known: {', '.join(repr(k) for k in known)})"
                         f"{f': {why}' if why else ''}")
    return value


def _names(dtypes) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensors(name: str, tensors: dict, expected: dict, in_features: int, out_features: int, fmt: str,
                  context: str, optional=()) -> None:
    """Each ``name.suffix`` of ``expected`` (suffix -> :class:`Spec`) is present (unless ``optional``)
    with an allowed dtype (else ``TypeError``) and its shape (else ``ValueError``); a tensor the format
    does not hold is an error. ``context`` (e.g. "in=64, out=48, bits=4, group_size=16") goes into
    the message."""
    for suffix in tensors:
        if suffix not in expected:
            raise ValueError(f"unexpected tensor {name}.{suffix} ({fmt} for {context} holds "
                             f"{', '.join(sorted(expected))})")
    for suffix, spec in expected.items():
        t, shape, dtypes = tensors.get(suffix), spec.shape(in_features, out_features), spec.dtypes
        if t is None:
            if suffix in optional:
                continue
            raise ValueError(f"missing tensor {name}.{suffix} ({fmt}, shape {shape}, {_names(dtypes)})")
        if t.dtype not in dtypes:
            raise TypeError(f"{name}.{suffix}: expected {_names(dtypes)} ({fmt}), got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}.{suffix}: expected shape {shape} for {context}, got {tuple(t.shape)}")


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating" if dtype.is_floating_point else "integer"


def check_kind(key: str, held: torch.dtype, stored: torch.dtype) -> None:
    """A stored tensor loads into the model's (``load_state_dict`` casts) only within its kind: a float
    parameter takes any float dtype, never integers (a quantized tensor where a float one belongs), and
    never float8 values (a quantized weight whose scale the checkpoint does not hold)."""
    if _kind(held) != _kind(stored):
        raise TypeError(f"{key}: the model holds {held}, the checkpoint stores {stored} "
                        f"({_kind(stored)}, expected {_kind(held)})")
    if stored in FLOAT8 and held not in FLOAT8:
        raise TypeError(f"{key}: the checkpoint stores {stored} values for the model's {held} tensor: float8 values "
                        f"are a quantized weight and mean nothing without their scale, which the checkpoint does "
                        f"not hold (missing {key}_scale_inv / {key}_scale?)")
