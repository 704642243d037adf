"""Round-to-nearest quantization of float weights into the op's layouts, and of activations per token.

Pure torch. Layouts, packing and the zero-point convention are defined in :mod:`xqpass.quant.layouts`.

Integer weights (:func:`quantize_weight`): int8 / uint8, 8 or 4 bits, sym or asym. Float8 weights
(``quantize_weight(..., weight_dtype=torch.float8_e4m3fn)``, :func:`quantize_weight_float8`): symmetric,
``scale = amax / fmax`` a group (``fmax`` the format's largest finite value: 448 for e4m3fn, 57344 for
e5m2), ``w_q = float8(clamp(w / scale, -fmax, fmax))`` rounded to nearest even; per-tensor, per-channel,
blockwise and 2-D blocks (``block_n``, the output features a scale covers; DeepSeek / HF fp8: 128 x 128).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layouts import FLOAT8_DTYPES, PER_CHANNEL, PER_TENSOR, Layout

ACTIVATION_QMAX = 127  # per-token int8 activations use the symmetric range [-127, 127]
FLOAT8_ACTIVATION_MAX = 448.0  # per-token float8 activations: e4m3fn's largest finite value


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight in one of the op's layouts (:attr:`layout`): the arguments of
    ``torch.ops.xq.quantized_matmul`` after ``x``. ``weight``: int8/uint8 or float8; ``zero_point``: shaped
    like ``scale``, or ``None``; ``block_n``: output features a scale covers (float8: -1 per-tensor, Bn
    2-D blocks; else 1)."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    block_size: int
    int4_weight: bool
    packed: bool
    block_n: int = 1

    @property
    def bits(self) -> int:
        return 4 if self.int4_weight else 8

    @property
    def layout(self) -> Layout:
        return Layout.recognise(self.weight.shape, self.block_size, self.packed, self.block_n)

    @property
    def out_features(self) -> int:
        return self.layout.features(self.weight.shape)[0]

    @property
    def in_features(self) -> int:
        return self.layout.features(self.weight.shape)[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float weight ``[N, K]`` (``w * scale - zero_point``)."""
        return self.layout.dequantize(self.weight, self.scale, self.zero_point, dtype)

    def op_kwargs(self) -> dict:
        """Keyword arguments of the op for this weight (everything but ``x``)."""
        return dict(
            w=self.weight,
            scale=self.scale,
            zero_point=self.zero_point,
            block_size=self.block_size,
            int4_weight=self.int4_weight,
            packed=self.packed,
            block_n=self.block_n,
        )


def quantize_weight(
    weight: torch.Tensor,
    bits: int = 8,
    block_size: int = PER_CHANNEL,
    symmetric: bool = True,
    packed: bool | None = None,
    scale_dtype: torch.dtype = torch.float32,
    block_layout: str = "seed",
    *,
    weight_dtype: torch.dtype | None = None,
    block_n: int = 1,
) -> QuantizedWeight:
    """Round-to-nearest quantization of a float ``weight [N, K]`` (an ``nn.Linear`` weight).

    ``weight_dtype``: None (int8 / uint8 by ``bits`` and ``symmetric``) or ``torch.float8_e4m3fn`` /
    ``torch.float8_e5m2``, which :func:`quantize_weight_float8` stores (``bits`` 8, ``symmetric``,
    ``packed`` None or False; ``block_n`` only there).

    * ``bits``: 8 or 4. ``packed`` (default: ``True`` for 4 bits) stores two 4-bit values a byte.
    * ``block_size``: ``-1`` for one scale per output channel, else groups of ``block_size`` input
      features (must divide K) in the blockwise layout: ``block_layout="seed"`` the seed's
      ``[K/B, B, N]`` with ``[K/B, N]`` scales, ``"rows"`` the per-channel storage ``[N, K]`` with
      ``[N, K/B]`` scales (faster on XLA:CPU, the layout of GPTQ / AWQ checkpoints).
    * ``symmetric=True``: int8 storage, ``scale = amax / (2**(bits-1) - 1)``, no zero point.
      ``symmetric=False``: uint8 storage in ``[0, 2**bits - 1]``, ``scale = (max - min) / (2**bits - 1)``
      over a range that includes 0, integer zero ``z = round(-min / scale)``, returned in the op's float
      convention ``zero_point = z * scale`` (so ``w_deq = (q - z) * scale``).

    Every element of the dequantized weight lies within ``scale / 2`` (plus float rounding) of ``weight``.
    An all-zero group gets ``scale = 0`` and dequantizes to exactly 0.

    Raises ``TypeError`` for a non-float or non-2-D weight or an argument of the wrong type (``bits=8.0``,
    ``scale_dtype=torch.int32``), ``ValueError`` for a value the formats do not have (``bits=3``,
    ``block_size=0``), a weight that cannot take the format (``block_size`` not dividing K, an odd group
    for packed int4, K = 0), a weight without values (lazy, meta) and a non-finite weight.
    """
    if weight_dtype is not None:
        check_float8_format(weight_dtype, bits, block_size, symmetric, packed, block_n)
        return quantize_weight_float8(weight, weight_dtype, block_size, block_n, scale_dtype, block_layout)
    if block_n != 1:
        raise ValueError(f"block_n={block_n} (per-tensor or 2-D block scales) is for float8 weights: pass "
                         f"weight_dtype=torch.float8_e4m3fn")
    packed = check_format(bits, block_size, symmetric, packed, scale_dtype, block_layout)
    check_weight(weight, block_size, packed)
    n, k = weight.shape
    layout = Layout.of(block_size, packed, block_layout)
    check_finite(weight)

    w = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    grouped = w.reshape(n, layout.num_groups(k), layout.group_size(k))  # [N, G, group]
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax - 1
        scale = (grouped.abs().amax(dim=-1) / qmax).to(scale_dtype)  # [N, G]
        zero = None
        dtype = torch.int8
    else:
        qmin, qmax = 0, 2**bits - 1
        lo = grouped.amin(dim=-1).clamp(max=0)
        hi = grouped.amax(dim=-1).clamp(min=0)
        scale = ((hi - lo) / qmax).to(scale_dtype)
        dtype = torch.uint8
    s = scale.to(w.dtype)  # quantize against the scale as it is stored
    safe = torch.where(s == 0, torch.ones_like(s), s)[..., None]
    if symmetric:
        q = torch.round(grouped / safe)
    else:
        zero = torch.round(-lo[..., None] / safe).clamp(qmin, qmax)
        q = torch.round(grouped / safe) + zero
    q = q.clamp(qmin, qmax).to(dtype).reshape(n, k)
    zero_point = None if zero is None else (zero[..., 0] * s).to(scale_dtype)  # float convention
    return QuantizedWeight(*layout.arrange(q, scale, zero_point), block_size, bits == 4, packed)


def check_finite(weight: torch.Tensor) -> None:
    """An infinity makes its group's scale infinite and its other values NaN: refused here."""
    finite = torch.isfinite(weight.detach())
    if not bool(finite.all()):
        first = tuple(int(i) for i in (~finite).nonzero()[0])
        raise ValueError(f"weight has {int((~finite).sum())} non-finite values (first at {list(first)}: "
                         f"{weight[first].item()}); round-to-nearest needs finite values")


def quantize_weight_float8(
    weight: torch.Tensor,
    dtype: torch.dtype = torch.float8_e4m3fn,
    block_size: int = PER_CHANNEL,
    block_n: int = 1,
    scale_dtype: torch.dtype = torch.float32,
    block_layout: str = "rows",
) -> QuantizedWeight:
    """Round-to-nearest float8 quantization of a float ``weight [N, K]`` (the module docstring's formula).

    * ``block_n=1, block_size=-1``: per-channel, ``scale [N]`` (compressed-tensors FP8_DYNAMIC's weights);
    * ``block_n=-1, block_size=-1``: per-tensor, a 0-d ``scale``;
    * ``block_n=1, block_size=B``: blockwise (``block_layout`` "rows" ``[N, K/B]`` or "seed"), B dividing K;
    * ``block_n=Bn > 1, block_size=B``: 2-D blocks, ``scale [ceil(N/Bn), ceil(K/B)]`` (HF fp8, FP8_BLOCK,
      DeepSeek: 128 x 128); N and K need not be multiples of the block, the last ones are partial.

    The scale is computed in float64 for a float64 weight, else float32, stored in ``scale_dtype``, and
    the weight divided by the stored scale. An all-zero block gets ``scale = 0`` and dequantizes to 0.
    Every dequantized element lies within half a float8 step (at its magnitude, times the scale) of the
    weight. Errors as :func:`quantize_weight` (a non-finite weight, a block that does not fit).
    """
    check_float8_format(dtype, 8, block_size, True, None, block_n)
    two_d = block_n > 1
    check_weight(weight, PER_CHANNEL if two_d else block_size, False)  # 2-D blocks may end partial
    if not isinstance(scale_dtype, torch.dtype) or not scale_dtype.is_floating_point:
        raise TypeError(f"scale_dtype must be a floating torch.dtype (torch.float32, torch.bfloat16, ...), "
                        f"got {scale_dtype!r}")
    if block_layout not in ("seed", "rows"):
        raise ValueError(f"block_layout must be 'seed' or 'rows', got {block_layout!r}")
    check_finite(weight)
    n, k = weight.shape
    fmax = torch.finfo(dtype).max
    layout = Layout.of(block_size, False, block_layout, block_n)
    w = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    if block_n == PER_TENSOR:
        amax = w.abs().amax(dim=(0, 1))  # explicit dims: torch_xla 2.9's dim-less amax is wrong
    elif two_d:
        rows, cols = -(-n // block_n) * block_n, layout.num_groups(k) * block_size
        padded = torch.nn.functional.pad(w, (0, cols - k, 0, rows - n))  # zeros change no amax
        amax = padded.reshape(rows // block_n, block_n, cols // block_size, block_size).abs().amax(dim=(1, 3))
    else:
        amax = w.reshape(n, layout.num_groups(k), layout.group_size(k)).abs().amax(dim=-1)  # [N, G]
    scale = (amax / fmax).to(scale_dtype)
    s = scale.to(w.dtype)
    safe = torch.where(s == 0, torch.ones_like(s), s)
    if block_n == 1:
        q = (w.reshape(n, layout.num_groups(k), layout.group_size(k)) / safe[..., None]).reshape(n, k)
    else:
        q = w / layout.expanded_scale(safe, n, k)
    q = q.clamp(-fmax, fmax).to(dtype)
    if block_n == 1:
        return QuantizedWeight(*layout.arrange(q, scale), block_size, False, False)
    return QuantizedWeight(q.contiguous(), scale.contiguous(), None, block_size, False, False, block_n)


def check_float8_format(dtype, bits, block_size: int, symmetric, packed, block_n) -> None:
    """Check the float8 format arguments of :func:`quantize_weight` (``weight_dtype`` given): ``TypeError``
    for a wrong type, ``ValueError`` for a value float8 weights do not take."""
    if dtype not in FLOAT8_DTYPES:
        raise TypeError(f"weight_dtype must be None (int8 / uint8) or torch.float8_e4m3fn / torch.float8_e5m2, "
                        f"got {dtype!r}")
    if bits != 8 or isinstance(bits, bool):
        raise ValueError(f"float8 weights are 8 bits: bits must be 8, got {bits!r}")
    if symmetric is not True:
        raise ValueError(f"float8 weights are symmetric (no zero point): symmetric must be True, got {symmetric!r}")
    if packed not in (None, False):
        raise ValueError(f"float8 weights are one value a byte: packed must be None or False, got {packed!r}")
    for name, value in (("block_size", block_size), ("block_n", block_n)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if block_size != PER_CHANNEL and block_size <= 0:
        raise ValueError(f"block_size must be -1 (per-channel) or a positive group size, got {block_size}")
    if block_n == 0 or block_n < PER_TENSOR:
        raise ValueError(f"block_n must be 1 (a scale a row), -1 (per-tensor) or a positive block of rows, got {block_n}")
    if block_n == PER_TENSOR and block_size != PER_CHANNEL:
        raise ValueError(f"per-tensor (block_n=-1) covers all of K: block_size must be -1, got {block_size}")
    if block_n > 1 and block_size == PER_CHANNEL:
        raise ValueError(f"2-D blocks (block_n={block_n}) need a block_size (the input features a block holds, "
                         f"e.g. 128)")


def check_format(
    bits: int,
    block_size: int,
    symmetric: bool,
    packed: bool | None,
    scale_dtype: torch.dtype,
    block_layout: str,
) -> bool:
    """Check the format arguments of :func:`quantize_weight` (and of ``from_float`` / ``quantize_model``,
    which pass them on) without a weight; returns ``packed`` with its default resolved.

    Raises ``TypeError`` for an argument of the wrong type, ``ValueError`` for a value outside the formats.
    """
    # bool is an int: bits=True would quantize with a made-up range
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise TypeError(f"bits must be the int 8 or 4, got {type(bits).__name__} {bits!r}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise TypeError(f"block_size must be an int (-1 for per-channel, else the group size), "
                        f"got {type(block_size).__name__} {block_size!r}")
    if block_size != PER_CHANNEL and block_size <= 0:
        raise ValueError(f"block_size must be -1 (per-channel) or a positive group size, got {block_size}")
    # a truthy string ("False") would silently pick the other format
    for name, value in (("symmetric", symmetric), ("packed", packed)):
        if not isinstance(value, bool) and not (name == "packed" and value is None):
            raise TypeError(f"{name} must be True or False{' or None' if name == 'packed' else ''}, "
                            f"got {type(value).__name__} {value!r}")
    if not isinstance(scale_dtype, torch.dtype) or not scale_dtype.is_floating_point:
        raise TypeError(f"scale_dtype must be a floating torch.dtype (torch.float32, torch.bfloat16, ...), "
                        f"got {scale_dtype!r}")
    if not isinstance(block_layout, str) or block_layout not in ("seed", "rows"):
        raise ValueError(f"block_layout must be 'seed' or 'rows', got {block_layout!r}")
    if packed is None:
        packed = bits == 4
    if packed and bits != 4:
        raise ValueError("packed=True needs bits=4 (two 4-bit values a byte), got bits=8")
    return packed


def check_weight(weight, block_size: int, packed: bool) -> None:
    """Check that a float ``weight [N, K]`` can take the format, from its metadata only (no values read):
    a materialized floating 2-D tensor, ``K > 0``, ``block_size`` dividing K, an even group when packed."""
    if isinstance(weight, torch.nn.parameter.UninitializedParameter):
        raise ValueError("weight is uninitialized (a lazy module's parameter): run one forward pass first, "
                         "so that its shape is known and its values are set")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        got = f"{weight.dtype} {weight.dim()}-D tensor" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"quantize_weight expects a floating [out_features, in_features] tensor, got {got}")
    if weight.device.type == "meta":
        raise ValueError("weight is on the meta device (a shape without values): load or initialize it first "
                         "(e.g. module.to_empty(device=...) and load the state dict)")
    n, k = weight.shape
    if k == 0:
        raise ValueError(f"weight [{n}, {k}] has in_features=0: there is nothing to quantize (the layer "
                         f"computes its bias alone)")
    if block_size != PER_CHANNEL and k % block_size:
        raise ValueError(f"block_size must be -1 or a positive divisor of in_features={k}, got {block_size}")
    group = k if block_size == PER_CHANNEL else block_size
    if packed and group % 2:
        raise ValueError(f"packed int4 needs an even {'in_features' if block_size == PER_CHANNEL else 'block_size'}, "
                         f"got {group} (pass packed=False to store one 4-bit value a byte)")


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 quantization of each row of ``x`` along its last dim (the seed's scheme).

    Returns ``(x_q, x_scale)``: ``x_q`` int8 in ``[-127, 127]`` shaped like ``x``, and
    ``x_scale = amax(|x|, dim=-1, keepdim=True) / 127`` in ``x.dtype``, so ``x ~= x_q * x_scale``.
    Unlike the seed, an all-zero row quantizes to zeros (no 0/0), values are clamped (no int8
    wrap-around at 127.5), and a NaN never reaches the int8 cast (undefined behaviour): a row with a
    NaN or an infinity has a NaN or infinite ``x_scale``, which carries it to the output.
    """
    amax = x.abs().amax(dim=-1, keepdim=True)  # explicit dim: torch_xla 2.9's dim-less amax is wrong
    # XLA:CPU's max does not propagate NaN: say it explicitly so every device agrees
    amax = torch.where(torch.isnan(x).any(dim=-1, keepdim=True), torch.full_like(amax, float("nan")), amax)
    x_scale = amax / ACTIVATION_QMAX
    safe = torch.where(x_scale == 0, torch.ones_like(x_scale), x_scale)
    q = torch.round(x / safe).clamp(-ACTIVATION_QMAX, ACTIVATION_QMAX)
    q = torch.where(torch.isnan(q), torch.zeros_like(q), q)
    return q.to(torch.int8), x_scale


def quantize_per_token_float8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric ``float8_e4m3fn`` quantization of each row of ``x`` along its last dim
    (compressed-tensors' FP8_DYNAMIC, vLLM's per-token FP8).

    Returns ``(x_q, x_scale)``: ``x_q`` e4m3fn shaped like ``x`` (``x / x_scale`` rounded to nearest
    even, clamped to [-448, 448] first: e4m3fn has no infinity and would turn an overflow into NaN), and
    ``x_scale = amax(|x|, dim=-1, keepdim=True) / 448`` in ``x.dtype``. NaN and all-zero rows as in
    :func:`quantize_per_token` (a NaN or infinite row carries a NaN or infinite ``x_scale``).
    """
    amax = x.abs().amax(dim=-1, keepdim=True)  # explicit dim: torch_xla 2.9's dim-less amax is wrong
    amax = torch.where(torch.isnan(x).any(dim=-1, keepdim=True), torch.full_like(amax, float("nan")), amax)
    x_scale = amax / FLOAT8_ACTIVATION_MAX
    safe = torch.where(x_scale == 0, torch.ones_like(x_scale), x_scale)
    q = (x / safe).clamp(-FLOAT8_ACTIVATION_MAX, FLOAT8_ACTIVATION_MAX)
    q = torch.where(torch.isnan(q), torch.zeros_like(q), q)
    return q.to(torch.float8_e4m3fn), x_scale
