"""The op's weight layouts and the int4 packing: the one place that defines them.

Pure torch (no torch_xla): every function here runs on CPU tensors, XLA tensors and fake tensors.

Layouts (N = out_features, K = in_features, B = block_size, G = K/B groups): one :class:`Layout` each,
which knows the shapes and where N and K sit (axis tags; ``g``: the B values of one group):

=======================  ================  ================  ===============  =============
layout                   weight            scale, zero       weight axes      scale axes
=======================  ================  ================  ===============  =============
per-channel (B = -1)     ``[N, K]``        ``[N]``           ``(N, K)``       ``(N,)``
blockwise (the seed's)   ``[K/B, B, N]``   ``[K/B, N]``      ``(G, g, N)``    ``(G, N)``
blockwise by rows        ``[N, K]``        ``[N, K/B]``      ``(N, K)``       ``(N, G)``
per-tensor (float8)      ``[N, K]``        ``[]``            ``(N, K)``       ``()``
2-D blocks (float8)      ``[N, K]``        ``[N/Bn, K/B]``   ``(N, K)``       ``(N, G)``
=======================  ================  ================  ===============  =============

Block ``s`` holds input features ``s*B ... s*B + B - 1``. Blockwise by rows (ours) is the per-channel
storage with one scale a group of B input features, as GPTQ, AWQ, compressed-tensors and hand-written
groupwise code keep it (no transpose to the seed's layout). The op tells the two blockwise layouts apart
by ``w.dim()`` (:meth:`Layout.recognise`); the module and ``quantize_weight`` by ``block_layout``.

How many output features share a scale is ``block_n`` (Bn; torchao's one ``block_size`` tuple is
``(block_n, block_size)``): 1 in the layouts above it, -1 (all of N, with ``block_size=-1``: all of K)
per-tensor, Bn > 1 **2-D blocks** of Bn x B (HF native fp8, compressed-tensors FP8_BLOCK, DeepSeek:
128 x 128), whose scale is ``[ceil(N/Bn), ceil(K/B)]``: N and K need not be multiples of the block,
the last block along each is partial. Block ``(i, s)`` holds rows ``i*Bn ...`` and input features
``s*B ...``. The per-tensor and 2-D layouts are the float8 weights' (``torch.float8_e4m3fn``,
``torch.float8_e5m2``, symmetric: no zero point); float8 weights take the others too.

Dequantization (the seed's convention: a *float* zero point subtracted after scaling), in every
layout seen as groups (:meth:`Layout.grouped_weight`: ``[N, G, B]``, scales ``[N, G]``, per-channel G = 1)::

    w_deq[n, s, b] = w[n, s, b] * scale[n, s] - zero_point[n, s]

An integer zero point ``z`` (``w_deq = (w - z) * scale``) maps to ``zero_point = z * scale``.

Float8 weights dequantize the same way, each stored value converted exactly (NaN stays NaN)::

    w_deq[n, k] = float(w[n, k]) * scale[n // Bn, k // B]

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
False        False        float8  one ``float8_e4m3fn`` (finite to +-448, NaN, no Inf) or ``float8_e5m2``
===========  ===========  ======  =========================================================

**Packed int4** halves the storage again: two 4-bit values a byte along **dim 1 of the weight** in
every layout, which holds K or B (``[N, K/2]``, ``[K/B, B/2, N]``). The element at even index ``2j``
sits in the **low** nibble (bits 0-3) of byte ``j``, the element at ``2j + 1`` in the **high** nibble
(bits 4-7). Signedness follows the dtype (an ``int8`` byte holds two signed nibbles, a ``uint8`` byte two
unsigned ones). Packing needs an even K (per-channel) or even B (blockwise).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

PER_CHANNEL = -1
#: ``block_n`` of a per-tensor scale: every output feature shares it (with ``block_size=-1``: one scale)
PER_TENSOR = -1

WEIGHT_DTYPES = (torch.int8, torch.uint8)
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


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


@dataclass(frozen=True)
class Layout:
    """One layout of the table above (``by_rows`` False per-channel), packed int4 or not: its shapes,
    and where N and K sit. :meth:`of` builds one from ``block_layout``, :meth:`recognise` from an op call.
    ``block_n``: output features a scale covers (1; -1 per-tensor; Bn > 1 2-D blocks, stored by rows)."""

    block_size: int = PER_CHANNEL
    by_rows: bool = False
    packed: bool = False
    block_n: int = 1

    def __post_init__(self):
        if self.block_size != PER_CHANNEL and self.block_size <= 0:
            raise ValueError(f"block_size must be -1 (per-channel) or positive, got {self.block_size}")
        if self.by_rows and self.block_size == PER_CHANNEL:
            raise ValueError("blockwise by rows needs a block_size (per-channel is stored by rows already)")
        if self.packed and self.block_size != PER_CHANNEL and self.block_size % 2:
            raise ValueError(f"packed int4 needs an even block_size, got {self.block_size}")
        if self.block_n == 1:
            return
        if self.block_n != PER_TENSOR and self.block_n <= 0:
            raise ValueError(f"block_n must be 1 (a scale a row), -1 (per-tensor) or a positive block of rows, "
                             f"got {self.block_n}")
        if self.packed:
            raise ValueError(f"block_n={self.block_n} is for float8 weights, one value a byte: packed must be False")
        if self.block_n == PER_TENSOR and self.block_size != PER_CHANNEL:
            raise ValueError(f"per-tensor (block_n=-1) covers all of K: block_size must be -1, got {self.block_size}")
        if self.block_n > 1 and not self.by_rows:
            raise ValueError(f"2-D blocks (block_n={self.block_n}) need a block_size and the weight stored by rows "
                             f"[N, K]")

    @classmethod
    def of(cls, block_size: int = PER_CHANNEL, packed: bool = False, block_layout: str = "seed",
           block_n: int = 1) -> Layout:
        """The layout for ``block_size``, ``packed`` and ``block_layout`` ("seed" or "rows"; 2-D blocks
        are by rows whatever it says)."""
        by_rows = (block_layout == "rows" or block_n > 1) and block_size != PER_CHANNEL
        return cls(block_size, by_rows, packed, block_n)

    @classmethod
    def recognise(cls, weight_shape, block_size: int, packed: bool, block_n: int = 1) -> Layout:
        """The layout of an op call: ``block_size``, ``packed`` and ``block_n`` as given, and blockwise, the
        weight's rank (3-D: the seed's, 2-D: by rows). A ``ValueError`` says which ranks the arguments allow."""
        dims = len(weight_shape)
        if block_n != 1 and dims != 2:
            raise ValueError(f"{'per-tensor' if block_n == PER_TENSOR else '2-D block'} w must be 2-D [N, K], "
                             f"got shape {tuple(weight_shape)}")
        args = (block_size, block_size != PER_CHANNEL and dims == 2, packed, block_n)
        hashable = isinstance(block_size, int) and isinstance(block_n, int)  # a SymInt is not hashable
        layout = _interned(*args) if hashable else cls(*args)
        if dims != len(layout.weight_axes):
            half, got = "/2" if packed else "", tuple(weight_shape)
            if block_size == PER_CHANNEL:
                raise ValueError(f"per-channel w must be 2-D [N, K{half}], got shape {got}"
                                 + (" (a 3-D weight is blockwise: pass block_size)" if dims == 3 else ""))
            raise ValueError(f"blockwise w must be 3-D [K/B, B{half}, N] or, by rows, 2-D [N, K{half}], "
                             f"got shape {got}")
        return layout

    @property
    def name(self) -> str:
        """``"per-channel"``, ``"blockwise"`` (the seed's), ``"blockwise by rows"`` (packing aside),
        ``"per-tensor"`` or ``"2-D blocks"``."""
        if self.block_n == PER_TENSOR:
            return "per-tensor"
        if self.block_n > 1:
            return "2-D blocks"
        if self.block_size == PER_CHANNEL:
            return "per-channel"
        return "blockwise by rows" if self.by_rows else "blockwise"

    @functools.cached_property
    def weight_axes(self) -> tuple[str, ...]:
        """What each dim of the weight holds: ``N``, ``K``, ``G`` (the groups) or ``g`` (one group)."""
        return ("G", "g", "N") if self.block_size != PER_CHANNEL and not self.by_rows else ("N", "K")

    @functools.cached_property
    def scale_axes(self) -> tuple[str, ...]:
        """What each dim of the scale (and of the zero point) holds (2-D blocks: N in blocks of
        :attr:`n_unit`; per-tensor: nothing)."""
        if self.block_n == PER_TENSOR:
            return ()
        if self.block_size == PER_CHANNEL:
            return ("N",)
        return ("N", "G") if self.by_rows else ("G", "N")

    @property
    def k_unit(self) -> int:
        """The multiple of input features a slice of K must hold to cut no group and no packed byte."""
        if self.block_size != PER_CHANNEL:
            return self.block_size
        return 2 if self.packed else 1

    @property
    def n_unit(self) -> int:
        """The multiple of output features a slice of N must hold to cut no block: Bn for 2-D blocks, else 1."""
        return self.block_n if self.block_n > 1 else 1

    def group_size(self, k: int) -> int:
        """Input features one scale covers: K per-channel, B blockwise (the length of one integer dot)."""
        return k if self.block_size == PER_CHANNEL else self.block_size

    def num_groups(self, k: int) -> int:
        """Scales along K: 1 per-channel, K/B blockwise (2-D blocks: ceil(K/B), the last one partial)."""
        return 1 if self.block_size == PER_CHANNEL else -(-k // self.block_size)

    def weight_shape(self, n: int, k: int) -> tuple[int, ...]:
        """The stored weight's shape for N out and K in features (K or B halved when packed)."""
        pack = 2 if self.packed else 1
        if len(self.weight_axes) == 3:  # (G, g, N)
            return (k // self.block_size, self.block_size // pack, n)
        return (n, k // pack)

    def scale_shape(self, n: int, k: int) -> tuple[int, ...]:
        """The scale's (and the zero point's) shape for N out and K in features."""
        if self.block_n == PER_TENSOR:
            return ()
        if self.block_n > 1:
            return (-(-n // self.block_n), self.num_groups(k))
        if self.block_size == PER_CHANNEL:
            return (n,)
        return (n, k // self.block_size) if self.by_rows else (k // self.block_size, n)

    def features(self, weight_shape) -> tuple[int, int]:
        """``(N, K)`` of a stored weight of this layout (the inverse of :meth:`weight_shape`)."""
        pack = 2 if self.packed else 1
        if len(self.weight_axes) == 3:  # (G, g, N)
            groups, group, n = weight_shape
            return n, groups * group * pack
        n, k = weight_shape
        return n, k * pack

    def arrange(self, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None):
        """``(weight, scale, zero_point)`` in this layout from integers ``q [N, K]`` (one value an element)
        and ``[N, G]`` scales and zero points (G = 1 per-channel): the inverse of :meth:`grouped_weight`
        and :meth:`grouped_scale`, packed when packed. Per-tensor and 2-D blocks, whose scales are not
        one a row, take ``scale`` (and ``zero_point``) in their :meth:`scale_shape` and keep it."""
        shared = self.block_n != 1  # a scale shared across rows comes in its own shape
        if self.block_size == PER_CHANNEL and not shared:
            scale, zero_point = scale[:, 0], None if zero_point is None else zero_point[:, 0]
        elif not self.by_rows and not shared:
            q = per_channel_to_blockwise(q, self.block_size)
            scale, zero_point = scale.t(), None if zero_point is None else zero_point.t()
        if self.packed:
            q = pack_int4(q, axis=1)
        return q.contiguous(), scale.contiguous(), None if zero_point is None else zero_point.contiguous()

    def grouped_weight(self, w: torch.Tensor) -> torch.Tensor:
        """An unpacked stored weight seen as ``[N, G, B]`` (per-channel ``[N, 1, K]``), a view."""
        if len(self.weight_axes) == 3:  # (G, g, N)
            return w.permute(2, 0, 1)
        n, k = w.shape
        return w.reshape(n, self.num_groups(k), self.group_size(k))

    def grouped_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """A scale or zero point seen as ``[N, G]`` (per-channel ``[N, 1]``), a view; per-tensor ``[1, 1]``
        and 2-D blocks ``[N/Bn, G]``, which broadcast against ``[N, G]`` only once repeated
        (:meth:`expanded_scale`)."""
        if self.block_n == PER_TENSOR:
            return scale.reshape(1, 1)
        if self.block_size == PER_CHANNEL:
            return scale[:, None]
        return scale if self.by_rows else scale.t()

    def expanded_scale(self, scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """The scale (or zero point) of each weight element, ``[N, K]`` (per-tensor ``[1, 1]``,
        broadcasting): every scale repeated over its block, the partial last blocks cut."""
        grouped = self.grouped_scale(scale)
        if self.block_n > 1:
            grouped = grouped.repeat_interleave(self.block_n, dim=0)[:n]
        if self.block_n == PER_TENSOR:
            return grouped
        return grouped.repeat_interleave(self.group_size(k), dim=1)[:, :k]

    def rows_of_blocks(self, scale: torch.Tensor, n: int) -> torch.Tensor:
        """A 2-D block scale ``[..., ceil(N/Bn), G]`` (any leading dims: an expert bank's ``[E, ...]``) as
        one scale a row, ``[..., N, G]``: each repeated over its Bn rows, the partial last block cut. A
        broadcast, a reshape and a slice (``slice_copy``): no gather on XLA."""
        *lead, blocks, groups = scale.shape
        repeated = scale.unsqueeze(-2).expand(*lead, blocks, self.block_n, groups)
        repeated = repeated.reshape(*lead, blocks * self.block_n, groups)
        if blocks * self.block_n == n:
            return repeated
        return torch.ops.aten.slice_copy.Tensor(repeated, len(lead), 0, n)

    def dequantize(self, w, scale, zero_point=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[N, K]`` in ``dtype``: ``w * scale - zero_point``."""
        if self.block_n != 1:  # scales shared across rows: expanded, not grouped
            n, k = self.features(w.shape)
            deq = w.to(dtype) * self.expanded_scale(scale.to(dtype), n, k)
            return deq if zero_point is None else deq - self.expanded_scale(zero_point.to(dtype), n, k)
        deq = self.grouped_weight(unpacked_weight(w, self.packed)).to(dtype)  # [N, G, B]
        deq = deq * self.grouped_scale(scale).to(dtype)[:, :, None]
        if zero_point is not None:
            deq = deq - self.grouped_scale(zero_point).to(dtype)[:, :, None]
        n, groups, group = deq.shape
        return deq.reshape(n, groups * group)


#: one object a layout, for the op's every call (a lookup costs less than building a frozen dataclass)
_interned = functools.lru_cache(maxsize=None)(Layout)


def dequantize(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None,
               block_size: int = PER_CHANNEL, packed: bool = False, dtype: torch.dtype = torch.float32,
               block_n: int = 1) -> torch.Tensor:
    """Dequantized weight as ``[N, K]`` in ``dtype`` for any layout (``w * scale - zero_point``)."""
    return Layout.recognise(w.shape, block_size, packed, block_n).dequantize(w, scale, zero_point, dtype)
