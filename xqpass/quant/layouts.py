"""The op's weight layouts and the int4 packing: the one place that defines them.

Pure torch (no torch_xla): every function here runs on CPU tensors, XLA tensors and fake tensors.

Layouts (N = out_features, K = in_features, B = block_size):

* **per-channel** (``block_size == -1``): ``w [N, K]``, ``scale [N]``, ``zero_point [N]``.
* **blockwise** (``block_size == B``, ``B`` divides ``K``): ``w [K/B, B, N]``, ``scale [K/B, N]``,
  ``zero_point [K/B, N]``. Block ``s`` holds input features ``s*B ... s*B + B - 1``.
* **blockwise by rows** (ours; ``block_size == B`` with a 2-D ``w``): ``w [N, K]``, ``scale [N, K/B]``,
  ``zero_point [N, K/B]``: the per-channel storage with one scale a group of B input features, as GPTQ,
  AWQ, compressed-tensors and hand-written groupwise code keep it (no transpose to the seed's layout).

Dequantization (the seed's convention: a *float* zero point subtracted after scaling)::

    per-channel:  w_deq[n, k]    = w[n, k]    * scale[n]    - zero_point[n]
    blockwise:    w_deq[s, b, n] = w[s, b, n] * scale[s, n] - zero_point[s, n]
    by rows:      w_deq[n, k]    = w[n, k]    * scale[n, k // B] - zero_point[n, k // B]

An integer zero point ``z`` (``w_deq = (w - z) * scale``) maps to ``zero_point = z * scale``.

Weight storage (``w.dtype`` and two flags of the op):

===========  ===========  ======  =========================================================
int4_weight  packed       dtype   values a byte
===========  ===========  ======  =========================================================
False        False        int8    one int8 value in [-128, 127]
False        False        uint8   one uint8 value in [0, 255]
True         False        int8    one int4 value in [-8, 7] (the seed's "int8 container")
True         False        uint8   one uint4 value in [0, 15]
True         True         int8    two int4 values, each a two's-complement nibble in [-8, 7]
True         True         uint8   two uint4 values, each an unsigned nibble in [0, 15]
===========  ===========  ======  =========================================================

**Packed int4** halves the storage again: two 4-bit values a byte, packed along **K, the input
(contraction) axis** of the layout — dim 1 of a per-channel ``[N, K]`` weight (stored ``[N, K/2]``),
dim 1 of a blockwise ``[K/B, B, N]`` weight (stored ``[K/B, B/2, N]``), dim 1 of a blockwise-by-rows
``[N, K]`` weight (stored ``[N, K/2]``). Nibble order: the element at
even index ``2j`` sits in the **low** nibble (bits 0-3) of byte ``j``, the element at ``2j + 1`` in
the **high** nibble (bits 4-7). Signedness follows the dtype: an ``int8`` byte holds two signed
nibbles, a ``uint8`` byte two unsigned ones. Packing needs an even K (per-channel) or even B
(blockwise); a device that holds part of K (row-parallel sharding) holds whole bytes.
"""
from __future__ import annotations

import torch

PER_CHANNEL = -1

WEIGHT_DTYPES = (torch.int8, torch.uint8)


def value_range(dtype: torch.dtype, int4_weight: bool) -> tuple[int, int]:
    """Inclusive ``(min, max)`` of one stored weight value for a container dtype."""
    if dtype not in WEIGHT_DTYPES:
        raise TypeError(f"quantized weight dtype must be torch.int8 or torch.uint8, got {dtype}")
    if int4_weight:
        return (-8, 7) if dtype == torch.int8 else (0, 15)
    return (-128, 127) if dtype == torch.int8 else (0, 255)


def pack_int4(values: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """Pack 4-bit integers two a byte along ``axis`` (low nibble = even index).

    ``values``: int8 in [-8, 7] (packed to int8, signed nibbles) or uint8 in [0, 15] (packed to uint8,
    unsigned nibbles); ``values.shape[axis]`` must be even. Returns the same dtype with
    ``shape[axis]`` halved.
    """
    if values.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"pack_int4 expects int8 or uint8 values, got {values.dtype}")
    axis = axis % values.dim()
    if values.shape[axis] % 2:
        raise ValueError(f"pack_int4 needs an even size along axis {axis}, got shape {tuple(values.shape)}")
    lo_min, hi_max = value_range(values.dtype, True)
    if values.numel() and (int(values.min()) < lo_min or int(values.max()) > hi_max):
        raise ValueError(
            f"pack_int4: {values.dtype} values must lie in [{lo_min}, {hi_max}], "
            f"got [{int(values.min())}, {int(values.max())}]"
        )
    pairs = values.to(torch.int16).unflatten(axis, (values.shape[axis] // 2, 2))
    low, high = pairs.select(axis + 1, 0), pairs.select(axis + 1, 1)
    byte = (low & 0xF) | ((high & 0xF) * 16)  # unsigned byte value in [0, 255]
    if values.dtype == torch.int8:
        byte = torch.where(byte > 127, byte - 256, byte)  # reinterpret as two's complement
    return byte.to(values.dtype)


def unpack_int4(packed: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``shape[axis]`` doubles, dtype and signedness are kept.

    Written with ``&``, multiplication and exact integer division only: torch_xla 2.9 gets the
    arithmetic right shift of negative int8 values wrong (``-1 >> 4 == 0`` on XLA), so no shifts.
    """
    if packed.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"unpack_int4 expects int8 or uint8 bytes, got {packed.dtype}")
    axis = axis % packed.dim()
    byte = packed.to(torch.int16) & 0xFF  # unsigned byte value, whatever the container's sign
    low = byte & 0xF
    high = torch.div(byte - low, 16, rounding_mode="trunc")
    if packed.dtype == torch.int8:  # sign-extend each nibble: 8..15 -> -8..-1
        low = low - (low & 8) * 2
        high = high - (high & 8) * 2
    values = torch.stack([low, high], dim=axis + 1).flatten(axis, axis + 1)
    return values.to(packed.dtype)


def per_channel_to_blockwise(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[N, K]`` -> ``[K/B, B, N]`` (any dtype; B must divide K)."""
    n, k = w.shape
    if block_size <= 0 or k % block_size:
        raise ValueError(f"block_size must be a positive divisor of K={k}, got {block_size}")
    return w.t().reshape(k // block_size, block_size, n).contiguous()


def blockwise_to_per_channel(w: torch.Tensor) -> torch.Tensor:
    """``[K/B, B, N]`` -> ``[N, K]`` (any dtype)."""
    s, b, n = w.shape
    return w.reshape(s * b, n).t().contiguous()


def unpacked_weight(w: torch.Tensor, packed: bool) -> torch.Tensor:
    """The stored weight with one value an element (unpacks along the K axis when ``packed``)."""
    return unpack_int4(w, axis=1) if packed else w


def dequantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    block_size: int = PER_CHANNEL,
    packed: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantized weight as ``[N, K]`` in ``dtype`` for any layout (``w * scale - zero_point``)."""
    w = unpacked_weight(w, packed).to(dtype)
    if block_size != PER_CHANNEL and w.dim() == 2:  # blockwise by rows
        n, k = w.shape
        deq = w.reshape(n, k // block_size, block_size) * scale.to(dtype)[:, :, None]
        if zero_point is not None:
            deq = deq - zero_point.to(dtype)[:, :, None]
        return deq.reshape(n, k)
    if block_size == PER_CHANNEL:
        deq = w * scale.to(dtype)[:, None]
        if zero_point is not None:
            deq = deq - zero_point.to(dtype)[:, None]
        return deq
    deq = w * scale.to(dtype)[:, None, :]
    if zero_point is not None:
        deq = deq - zero_point.to(dtype)[:, None, :]
    return blockwise_to_per_channel(deq)


#: Megatron tensor parallelism: "column" splits the output features N, "row" the input features K
SPLIT_STYLES = ("column", "row")


def tensor_parallel_dims(style: str, block_size: int, by_rows: bool) -> dict[str, int | None]:
    """Which dim of each of the op's tensors a tensor-parallel split cuts (None: replicated).

    Keys: ``weight``, ``scale``, ``zero_point``, ``bias``. ``"column"`` cuts N wherever it is (dim 0 of
    ``[N, K]`` and ``[N]``, dim 2 of the seed's ``[K/B, B, N]``, dim 1 of its ``[K/B, N]`` scales).
    ``"row"`` cuts K: dim 1 of ``[N, K]`` (packed: of ``[N, K/2]``), whole blocks of the seed's layout
    (dim 0 of ``[K/B, B, N]`` and ``[K/B, N]``), whole groups by rows (dim 1 of ``[N, K/B]``); a
    per-channel scale and the bias stay whole. See :func:`row_split_unit` for what a cut may not split.
    """
    if style not in SPLIT_STYLES:
        raise ValueError(f"tensor-parallel style must be one of {SPLIT_STYLES}, got {style!r}")
    per_channel = block_size == PER_CHANNEL
    if style == "column":
        if per_channel or by_rows:
            return {"weight": 0, "scale": 0, "zero_point": 0, "bias": 0}
        return {"weight": 2, "scale": 1, "zero_point": 1, "bias": 0}
    if per_channel:
        return {"weight": 1, "scale": None, "zero_point": None, "bias": None}
    if by_rows:
        return {"weight": 1, "scale": 1, "zero_point": 1, "bias": None}
    return {"weight": 0, "scale": 0, "zero_point": 0, "bias": None}


def row_split_unit(block_size: int, packed: bool) -> int:
    """The input features a row-parallel shard must hold a multiple of: a whole block (blockwise), a
    whole byte (packed int4: 2), else 1."""
    if block_size != PER_CHANNEL:
        return block_size
    return 2 if packed else 1
