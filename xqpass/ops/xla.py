"""XLA lowering of ``xq::quantized_matmul`` (the only place in the op that touches torch_xla).

Registered with ``register_kernel("xla")``: the body runs torch ops on XLA tensors, so under eager XLA,
``torch.compile(backend="openxla")`` or lazy tracing it is traced into the caller's HLO graph. The
weight enters the graph as the bytes it is stored in (int8 / uint8, packed int4 as uint8/int8 bytes);
unpacking and the int -> float convert happen inside the compiled graph: no host round trip, no data
dependent Python, so no graph break and one compilation per shape.

Two formulations, numerically equivalent (tested on XLA:CPU), chosen by device type:

* ``"canonical"`` (TPU, GPU): ``dot(x, convert(w))`` with the scale applied after the dot; the weight
  stays int8 up to the dot, where XLA fuses the convert into the matmul.
* ``"cpu"`` (XLA:CPU, measured in docs/benchmarks.md). Weights stored by rows, up to ``CPU_SPLIT_K_MAX_M`` rows
  (packed int4: ``CPU_SPLIT_K_MAX_M_PACKED``), skip the dot: **split-K**, a fused multiply-and-reduce
  of exact float32 products with K cut into groups and each group into ``r`` pieces summed as ``r``
  terms of one loop (per channel: virtual groups of 128 values / 64 packed bytes, summed by a dot with
  ones), the activation computed once before it (:func:`_computed_once`). Otherwise a float32 dot
  with the weight as the left operand (``convert(w) @ x.T``, ``[N, M]``; ~5x faster at small M than
  ``x @ w.T``), the epilogue in that orientation and the transpose last (XLA:CPU runs 16-bit dots as
  float32 dots, and folds a transpose that directly follows the dot into a slower dot). Packed int4
  per channel is never interleaved: low nibbles (even k) and high nibbles (odd k) meet
  ``x[..., 0::2]`` and ``x[..., 1::2]`` in two half-size dots. Blockwise weights take dots batched
  over the blocks below ``CPU_LARGE_M`` rows and are dequantized before one dot from there on (by
  rows: always, outside split-K; packed: two half-size dots, one a nibble). W8A8 takes the float32 dot of its int8 values (exact products;
  XLA:CPU's integer dot is slow).

``xla_lowering("cpu" | "canonical" | "auto")`` (or ``XQPASS_XLA_LOWERING``) forces one, e.g. to test the
TPU form on XLA:CPU. Float work accumulates in float32 (float64 for float64 x); the canonical form
gives 16-bit activations a 16-bit dot (an int8 value is exact in bfloat16) with a float32 result.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ..quant.layouts import PER_CHANNEL, unpacked_weight
from ..quant.quantize import quantize_per_token
from .checks import check_inputs, compute_dtype
from .quantized_matmul import quantized_matmul

LOWERINGS = ("auto", "canonical", "cpu")


def _lowering_from_environment() -> str:
    """``XQPASS_XLA_LOWERING`` checked at import: a typo would otherwise silently pick "auto"."""
    name = os.environ.get("XQPASS_XLA_LOWERING", "auto")
    if name not in LOWERINGS:
        raise ValueError(f"XQPASS_XLA_LOWERING: expected one of {LOWERINGS}, got {name!r}")
    return name


_lowering = _lowering_from_environment()


@contextlib.contextmanager
def xla_lowering(name: str):
    """Force a formulation of the XLA lowering inside the block ("auto": by device type)."""
    global _lowering
    if name not in LOWERINGS:
        raise ValueError(f"xla_lowering: expected one of {LOWERINGS}, got {name!r}")
    previous, _lowering = _lowering, name
    try:
        yield
    finally:
        _lowering = previous


def _resolve_lowering(x: torch.Tensor) -> str:
    if _lowering != "auto":
        return _lowering
    import torch_xla.core.xla_model as xm

    return "cpu" if xm.xla_device_hw(x.device) == "CPU" else "canonical"


def _dot(lhs: torch.Tensor, rhs: torch.Tensor, contracting, batch=([], []), out=torch.float32) -> torch.Tensor:
    """``dot_general`` with a chosen result type (int32 for integer operands); mixed integer operands
    (a uint8 weight with int8 activations) are widened to int32 first, still exact."""
    import torch_xla  # only imported when an XLA tensor reaches the op

    if lhs.dtype != rhs.dtype:
        lhs, rhs = lhs.to(torch.int32), rhs.to(torch.int32)
    return torch_xla._XLAC._xla_dot_general(lhs, rhs, (contracting, batch), preferred_element_type=out)


def _nibbles(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) nibble values of packed bytes, same shape as ``w``: even and odd k.

    Masks and an exact division only: torch_xla 2.9 lowers ``>>`` on int8 as a truncating division
    (``-1 >> 4 == 0``), which is right here only because the operand is a multiple of 16.
    """
    low = w & 15
    if w.dtype == torch.int8:  # two's complement nibbles; (w & -16) is a multiple of 16: any shift is exact
        return low - (low & 8) * 2, (w & -16) >> 4
    return low, w >> 4  # unsigned: logical and arithmetic shifts agree


#: XLA:CPU: from this many activation rows on, seed-layout blockwise weights are dequantized before a
#: single dot instead of a dot batched over the blocks
CPU_LARGE_M = 16
#: XLA:CPU: up to this many rows (packed int4: ``CPU_SPLIT_K_MAX_M_PACKED``), weights stored by rows skip
#: the dot: a fused multiply-and-reduce over K cut into ``r`` pieces (``r`` terms an iteration). It ran
#: 1.2-10x faster than the dot forms of sessions 1-2; since session 3's dot (weight as LHS, epilogue
#: before the transpose) the two are within the noise of each other at 1-32 rows, single linears and
#: whole decode steps alike (docs/benchmarks.md; re-measure with benchmarks/bench_lowering.py)
CPU_SPLIT_K_MAX_M = 32
CPU_SPLIT_K_MAX_M_PACKED = 16


def _slice(t: torch.Tensor, dim: int, start: int, end: int, step: int = 1) -> torch.Tensor:
    """A slice that stays an HLO slice: inside the op torch_xla gets the tensors without
    functionalization, and lowers a strided view of them (``t[..., 0::2]``, ``narrow`` on an inner dim)
    as a gather with indices made on the host for every call; ``slice_copy`` is a plain slice."""
    return torch.ops.aten.slice_copy.Tensor(t, dim, start, end, step)


def _is_split(t: torch.Tensor) -> bool:
    """Whether GSPMD splits ``t`` over devices (torch_xla SPMD; see xqpass.sharding)."""
    import torch_xla

    return torch_xla._XLAC._get_xla_sharding_spec(t) not in ("", "{replicated}")


def _split_factor(length: int, rows: int) -> int:
    """Seed blockwise layout (N contiguous): how many pieces to cut a block's reduction into (measured on
    XLA:CPU: 8 for one row, 16 for a few), keeping pieces of at least 8 elements."""
    preferred = 8 if rows == 1 else 16
    for r in (preferred, 8, 4, 2):
        if length % r == 0 and length // r >= 8:
            return r
    return 1


#: Weights stored by rows (K contiguous): the most pieces, and the piece length they must be a multiple
#: of, measured through the op on XLA:CPU (docs/benchmarks.md, "choosing r"), the same for 1 to 64 rows:
#: a long per-channel row: up to 128 pieces of a multiple of 8 (4096: 128 x 32, 11008: 86 x 128; more
#: than 128 terms, or pieces of 86, are 4-10x slower); an int8 group: up to 16 pieces of a multiple of 8
#: (pieces of 4 are 1.3-5x slower); packed int4: pieces of 16 to 32 bytes, 2 where that allows (each
#: piece is two terms, low and high nibbles; session 3, with the nibbles taken in 32-bit lanes: 32-byte
#: groups (g64) 2 pieces of 16, 64-byte groups 2 of 32; a 16-byte group (g32) in one piece is 1.2x faster
#: than in two of 8, and pieces of 64 bytes are 7-8x slower than pieces of 32).
SPLIT_ROW_MAX_PIECES, SPLIT_ROW_PIECE_MULTIPLE = 128, 8
SPLIT_GROUP_MAX_PIECES, SPLIT_GROUP_PIECE_MULTIPLE = 16, 8
SPLIT_PACKED_PIECES, SPLIT_PACKED_MIN_PIECE, SPLIT_PACKED_MAX_PIECE, SPLIT_PACKED_MAX_PIECES = 2, 16, 32, 8
#: A per-channel row is cut into virtual groups of this many values (packed: bytes), each group cut into
#: pieces as a real group is, the groups summed after by a dot with ones (4096 x 4096, M=1 / 16: 1.5 / 22
#: ms against 1.3 / 24 for the best plain cut; 4096 x 11008: 3.1 / 48 against 5 / 83)
SPLIT_INT8_GROUP = 128
SPLIT_PACKED_GROUP_BYTES = 64


def _row_split_factor(length: int, packed: bool, grouped: bool) -> int:
    """Pieces to cut a reduction of ``length`` stored elements (bytes when packed) into."""
    if packed:
        if length % SPLIT_PACKED_PIECES == 0 and SPLIT_PACKED_MIN_PIECE <= length // SPLIT_PACKED_PIECES <= SPLIT_PACKED_MAX_PIECE:
            return SPLIT_PACKED_PIECES
        if length <= SPLIT_PACKED_MAX_PIECE:
            return 1
        for r in range(SPLIT_PACKED_PIECES + 1, SPLIT_PACKED_MAX_PIECES + 1):  # long groups: pieces of <= 32 bytes
            if length % r == 0 and length // r <= SPLIT_PACKED_MAX_PIECE:
                return r
        return SPLIT_PACKED_PIECES if length % SPLIT_PACKED_PIECES == 0 else 1
    most, multiple = ((SPLIT_GROUP_MAX_PIECES, SPLIT_GROUP_PIECE_MULTIPLE) if grouped
                      else (SPLIT_ROW_MAX_PIECES, SPLIT_ROW_PIECE_MULTIPLE))
    for r in range(min(most, length // multiple), 1, -1):
        if length % r == 0 and (length // r) % multiple == 0:
            return r
    return 1


def _sum_of_pieces(w: torch.Tensor, x: torch.Tensor, dim: int, r: int, piece: int, packed: bool, dtype,
                   x_odd: torch.Tensor | None = None):
    """``sum_j values(w piece j) * (x piece j)``, the pieces cut along ``dim`` of both (``w`` holds bytes,
    ``x`` values: twice as many a piece when packed, byte i holding elements 2i and 2i + 1; or, with
    ``x_odd``, ``x`` holds the even elements and ``x_odd`` the odd ones, one a byte each)."""
    acc = None
    for j in range(r):
        byte = _slice(w, dim, j * piece, (j + 1) * piece)
        if packed:
            if byte.dtype == torch.uint8:  # unsigned nibbles taken in 32-bit lanes: XLA:CPU's vector code
                byte = byte.to(torch.int32)  # has no 8-bit shift (10-20% faster at 1-16 rows, measured)
                low, high = byte & 15, byte >> 4
            else:
                low, high = _nibbles(byte)
            if x_odd is None:
                start = 2 * j * piece
                x_low, x_high = _slice(x, dim, start, start + 2 * piece, 2), _slice(x, dim, start + 1, start + 2 * piece, 2)
            else:
                x_low, x_high = _slice(x, dim, j * piece, (j + 1) * piece), _slice(x_odd, dim, j * piece, (j + 1) * piece)
            term = low.to(dtype) * x_low + high.to(dtype) * x_high
        else:
            term = byte.to(dtype) * _slice(x, dim, j * piece, (j + 1) * piece)
        acc = term if acc is None else acc + term
    return acc


def _computed_once(x: torch.Tensor, pairs: bool) -> torch.Tensor:
    """``x [M, K]`` (K even) through a dot with a 2 x 2 identity: the same values, computed once.

    XLA:CPU fuses cheap producers of x (a norm's scaling, the multiply after an activation, the
    bfloat16 roundings between them) into their consumer, and split-K reads every x element once per
    output feature: the producers would run N times (an 8-layer int4 decoder step: 27 -> 13 ms). A dot is
    never fused into its consumer. ``pairs``: ``[2, M, K/2]``, even k then odd k (packed int4's low and
    high nibbles); else ``[M, K]``. Exact (``x * 1 + y * 0``) for finite x; an infinite x turns its
    neighbour NaN (``inf * 0``), so its whole output row is NaN (docs/ops.md, NaN / Inf)."""
    m, k = x.shape
    eye = torch.eye(2, dtype=x.dtype, device=x.device)
    x3 = x.reshape(m, k // 2, 2)
    if pairs:
        return _dot(eye, x3, ([1], [2]), out=x.dtype)  # [2, M, K/2]
    return _dot(x3, eye, ([2], [0]), out=x.dtype).reshape(m, k)


def _split_k_products(w: torch.Tensor, x: torch.Tensor, packed: bool, dtype, rows: int, groups: int = 1) -> torch.Tensor:
    """Per-group products ``acc[m, n, g] = sum_b values(w)[n, g*B + b] * x[m, g*B + b]`` for a weight
    stored by rows, ``w [N, K]`` (packed ``[N, K/2]``; ``groups`` = K/B, 1 for per-channel), as one fused
    multiply-and-reduce: each group is cut into ``r`` equal pieces summed as ``r`` terms of one loop
    (XLA:CPU then iterates B/r times a group, not B, with K the contiguous axis). Exact products,
    ``dtype`` (float32) accumulation, in another order than a dot. Returns ``[M, N, groups]``."""
    n, width = w.shape
    m, k = x.shape
    per_group = width // groups  # bytes a group
    r = _row_split_factor(per_group, packed, grouped=groups > 1)
    piece = per_group // r
    offset = packed and w.dtype == torch.int8
    if offset:  # signed nibbles v read as unsigned v + 8 (bit 3 of each flipped: v ^ 8), two ops fewer a
        w = w.to(torch.uint8) ^ 0x88  # byte (10-30% faster, measured); 8 * sum(x) comes off each group's sum
    w4 = w.reshape(n, groups, per_group).unsqueeze(0)  # [1, N, G, bytes]
    x = x.to(dtype)
    if packed:  # K is even: x as even and odd k, computed once
        pairs = _computed_once(x, pairs=True)
        x_even, x_odd = (_slice(pairs, 0, i, i + 1).reshape(m, 1, groups, per_group) for i in (0, 1))
        acc = _sum_of_pieces(w4, x_even, 3, r, piece, packed, dtype, x_odd=x_odd).sum(dim=-1)  # [M, N, G]
        return acc - 8 * (x_even.sum(dim=-1) + x_odd.sum(dim=-1)) if offset else acc
    x4 = (_computed_once(x, pairs=False) if k % 2 == 0 else x).reshape(m, 1, groups, per_group)  # [M, 1, G, B]
    return _sum_of_pieces(w4, x4, 3, r, piece, packed, dtype).sum(dim=-1)  # [M, N, G]


def _split_k_blockwise(w: torch.Tensor, x: torch.Tensor, packed: bool, dtype, rows: int, block: int) -> torch.Tensor:
    """Per-block products ``acc[m, s, n] = sum_b values(w)[s, b, n] * x[m, s*B + b]`` for a blockwise
    weight ``w [S, B, N]`` (packed ``[S, B/2, N]``): the multiply-and-reduce of
    :func:`_split_k_products` along B, N staying the contiguous axis. Returns ``[M, S, N]``."""
    s, width, n = w.shape
    r = _split_factor(width, rows)
    piece = width // r
    xb = x.to(dtype).reshape(x.shape[0], s, block, 1)  # [M, S, B, 1]
    return _sum_of_pieces(w.unsqueeze(0), xb, 2, r, piece, packed, dtype).sum(dim=2)  # [M, S, N]


@quantized_matmul.register_kernel("xla")
def quantized_matmul_xla(
    x, w, scale, zero_point=None, block_size=-1, int4_weight=False, quantize_activation=False, bias=None, *,
    packed=False
):
    spec = check_inputs(x, w, scale, zero_point, block_size, int4_weight, quantize_activation, packed, bias)
    cdt = compute_dtype(x.dtype)
    k, n = spec.in_features, spec.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # [M, K]
    rows = x2.shape[0] if isinstance(x2.shape[0], int) else None
    if rows == 0:  # nothing to compute; the lowerings' views of an empty x have no XLA implementation
        return x.new_empty((*lead, n))
    scale = scale.to(cdt)
    zp = None if zero_point is None else zero_point.to(cdt)
    lowering = _resolve_lowering(x)
    large_m = lowering == "cpu" and rows is not None and rows >= CPU_LARGE_M
    half = x.dtype in (torch.bfloat16, torch.float16)

    if quantize_activation:
        x_q, x_scale = quantize_per_token(x2.to(cdt))  # [M, K] int8, [M, 1]
        x_values = x_q.to(cdt)  # the values the products see, in the compute dtype
    else:
        x_values = x2.to(cdt)
    if lowering == "cpu":  # float32 dots (XLA:CPU runs a 16-bit dot as a float32 one anyway), exact integer
        operand, dot_dtype, acc_dtype = x_values, cdt, cdt  # products for W8A8 (its integer dot is slow here)
    elif quantize_activation:  # canonical: the integer dot
        operand, dot_dtype, acc_dtype = x_q, torch.int8, torch.int32
    else:  # canonical: 16-bit operands (int8 is exact in them) with a float32 result, else float32
        dot_dtype, acc_dtype = (x.dtype if half else cdt), cdt
        operand = x2.to(dot_dtype)

    def weight_as(t):  # the convert sits right at the dot (int8 stays int8 for the integer dot)
        return t if dot_dtype == torch.int8 else t.to(dot_dtype)

    # XLA:CPU dots take the weight as the left operand and give [N, M] ("by_features"); the epilogue
    # (scales, zero points, bias, the cast) runs in that orientation and the result is transposed last:
    # transposing the dot's result directly lets XLA fold the transpose into the dot, which then takes
    # the activation as its left operand, 2x slower at 256 rows (measured)
    by_features = False
    # split-K (XLA:CPU): up to CPU_SPLIT_K_MAX_M rows (packed: CPU_SPLIT_K_MAX_M_PACKED), every layout
    small_m = (lowering == "cpu" and rows is not None
               and 0 < rows <= (CPU_SPLIT_K_MAX_M_PACKED if packed else CPU_SPLIT_K_MAX_M))
    # GSPMD partitions a K-split per-channel weight's split-K pieces badly (it moves int8 pieces between
    # devices) and the two nibble dots into two all-reduces; the weight-as-LHS dot partitions cleanly
    split = block_size == PER_CHANNEL and lowering == "cpu" and (small_m or packed) and _is_split(w)
    if block_size == PER_CHANNEL:
        if small_m and not split:  # W8A8 too: integer products are exact in float32, float32 accumulation
            group_bytes = SPLIT_PACKED_GROUP_BYTES if packed else SPLIT_INT8_GROUP
            virtual = w.shape[1] // group_bytes if w.shape[1] % group_bytes == 0 else 1
            acc = _split_k_products(w, x_values, packed, cdt, rows, groups=virtual)  # [M, N, virtual]
            # the groups are summed by a dot with ones: a sum would be merged with the pieces' reduce into
            # one long reduce, 4x slower (measured); no select: inside the op torch_xla computes a select
            # of a computed tensor wrongly (see _slice)
            acc = _dot(acc, torch.ones(virtual, dtype=cdt, device=acc.device), ([2], [0]), out=cdt)
        elif lowering == "cpu" and packed and not split:  # even k: low nibbles, odd k: high nibbles
            low, high = _nibbles(w)  # [N, K/2] each
            acc = (_dot(weight_as(low), _slice(operand, 1, 0, k, 2), ([1], [1]), out=acc_dtype)
                   + _dot(weight_as(high), _slice(operand, 1, 1, k, 2), ([1], [1]), out=acc_dtype))  # [N, M]
            by_features = True
        elif lowering == "cpu":  # weight as the left operand: [N, K] . [M, K] -> [N, M]
            acc = _dot(weight_as(unpacked_weight(w, packed)), operand, ([1], [1]), out=acc_dtype)
            by_features = True
        else:
            acc = _dot(operand, weight_as(unpacked_weight(w, packed)), ([1], [1]), out=acc_dtype)  # [M, N]
        if by_features:
            out = acc.to(cdt) * scale[:, None]
            if zp is not None:
                out = out - zp[:, None] * x_values.sum(dim=-1)[None, :]
        else:
            out = acc.to(cdt) * scale
            if zp is not None:
                out = out - x_values.sum(dim=-1, keepdim=True) * zp
    elif spec.by_rows:  # blockwise with the per-channel storage: w [N, K], scale [N, K/B]
        s = spec.num_blocks
        if small_m:
            acc = _split_k_products(w, x_values, packed, cdt, rows, groups=s) * scale  # [M, N, S]
            if zp is not None:  # per block, before the one sum (one all-reduce when GSPMD splits K)
                acc = acc - x_values.reshape(-1, 1, s, block_size).sum(dim=-1) * zp
            out = acc.sum(dim=-1)
        elif lowering == "cpu":  # dequantize, then a dot (weight as LHS) -> [N, M]; packed int4 is not
            # interleaved: low nibbles (even k) and high nibbles (odd k) dequantized apart, two half-size
            # dots (a third faster at 17-256 rows than unpacking into one [N, K] weight, measured), unless
            # GSPMD splits the weight: it would all-reduce each half-size dot (and reshard x's strided halves)
            halves = packed and not _is_split(w)
            out = None
            for i, part in enumerate(_nibbles(w) if halves else (unpacked_weight(w, packed),)):
                w_deq = part.to(cdt).reshape(n, s, -1) * scale[:, :, None]
                if zp is not None:
                    w_deq = w_deq - zp[:, :, None]
                dot = _dot(w_deq.reshape(n, -1), _slice(operand, 1, i, k, 2) if halves else operand, ([1], [1]), out=cdt)
                out = dot if out is None else out + dot
            by_features = True
        else:  # dots batched over the blocks: [M, S, B] . [N, S, B] -> [S, M, N], block scales after
            w3 = weight_as(unpacked_weight(w, packed)).reshape(n, s, block_size)
            acc = _dot(operand.reshape(-1, s, block_size), w3, ([2], [2]), ([1], [1]), out=acc_dtype)
            acc = acc.to(cdt) * scale.t()[:, None, :]  # [S, M, N]
            if zp is not None:  # per block, before the one sum (one all-reduce when GSPMD splits K)
                acc = acc - x_values.reshape(-1, s, block_size).sum(dim=-1).t()[:, :, None] * zp.t()[:, None, :]
            out = acc.sum(dim=0)
    elif large_m:  # XLA:CPU, large M: dequantize, then one dot -> [N, M]
        w_deq = unpacked_weight(w, packed).to(cdt) * scale[:, None, :]
        if zp is not None:
            w_deq = w_deq - zp[:, None, :]
        out = _dot(w_deq.reshape(k, n), operand, ([0], [1]), out=cdt)
        by_features = True
    elif small_m and rows == 1:  # multiply-and-reduce along B (N contiguous), block scales after
        acc = _split_k_blockwise(w, operand, packed, cdt, rows, block_size) * scale  # [M, S, N]
        if zp is not None:  # per block, before the one sum (one all-reduce when GSPMD splits K)
            acc = acc - x_values.reshape(-1, spec.num_blocks, block_size).sum(dim=-1)[:, :, None] * zp
        out = acc.sum(dim=1)
    else:  # per-block dots batched over the blocks, each block's scale after its dot
        s = spec.num_blocks
        blocks = operand.reshape(-1, s, block_size)  # [M, S, B]
        if lowering == "cpu" and packed:
            low, high = _nibbles(w)  # [S, B/2, N]
            acc = (_dot(weight_as(low), _slice(blocks, 2, 0, block_size, 2), ([1], [2]), ([0], [1]), out=acc_dtype)
                   + _dot(weight_as(high), _slice(blocks, 2, 1, block_size, 2), ([1], [2]), ([0], [1]),
                          out=acc_dtype))
            acc = acc.permute(0, 2, 1)  # [S, N, M] -> [S, M, N]
        elif lowering == "cpu":
            acc = _dot(weight_as(w), blocks, ([1], [2]), ([0], [1]), out=acc_dtype).permute(0, 2, 1)
        else:
            acc = _dot(blocks, weight_as(unpacked_weight(w, packed)), ([2], [1]), ([1], [0]), out=acc_dtype)
        acc = acc.to(cdt) * scale[:, None, :]  # [S, M, N]
        if zp is not None:  # per block, before the one sum (one all-reduce when GSPMD splits K)
            acc = acc - x_values.reshape(-1, s, block_size).sum(dim=-1).t()[:, :, None] * zp[:, None, :]
        out = acc.sum(dim=0)  # [M, N]
    if by_features:  # [N, M]: the epilogue in this orientation, the transpose last
        if quantize_activation:
            out = out * x_scale.t()
        if bias is not None:
            out = out + bias.to(cdt)[:, None]
        return out.to(x.dtype).t().reshape(*lead, n)
    if quantize_activation:
        out = out * x_scale
    if bias is not None:
        out = out + bias.to(cdt)
    return out.to(x.dtype).reshape(*lead, n)
