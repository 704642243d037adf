"""The XLA:CPU lowering: split-K for a few rows, float32 dots with the weight as the left operand
otherwise (measured in docs/benchmarks.md; re-measure the tuning with benchmarks/bench_lowering.py).

Weights stored by rows (per channel, blockwise by rows) skip the dot up to ``XlaCpuTuning.split_k_max_m``
rows: :func:`split_k`. Otherwise XLA:CPU runs a 16-bit dot as a float32 dot and its integer dot is slow,
so every form here is a float32 dot (W8A8 too: products of int8 values are exact in float32).
``convert(w) . x -> [N, M]`` is ~5x faster at small M than ``x . w``; the epilogue runs on ``[N, M]``
and transposes last (see :func:`.common.epilogue`). Packed int4 is never interleaved: low nibbles
(even k) and high nibbles (odd k) meet ``x[..., 0::2]`` and ``x[..., 1::2]`` in two half-size dots,
unless GSPMD splits the weight (each half-size dot would be an all-reduce of its own, and x's strided
halves would be resharded).
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from dataclasses import dataclass

import torch

from ...quant.layouts import FLOAT8_DTYPES, unpacked_weight
from .common import Call, dot, epilogue, is_split, nibbles, rows_of_blocks, sum_blocks, take


@dataclass(frozen=True)
class XlaCpuTuning:
    """Thresholds of the XLA:CPU lowering, measured by benchmarks/bench_lowering.py (docs/benchmarks.md,
    "choosing r" for the pieces; the same for 1 to 64 rows)."""

    #: rows (M) from which seed-layout blockwise weights are dequantized before one dot instead of
    #: taking dots batched over the blocks
    large_m: int = 16
    #: rows up to which weights stored by rows take split-K (packed int4: ``split_k_max_m_packed``)
    split_k_max_m: int = 32
    split_k_max_m_packed: int = 16
    #: packed groups of fewer bytes than this (g32: 16) in rows that are not whole virtual groups (K not a
    #: multiple of 128) take one short reduce a group, ~3x the cost a row of g64's: split-K to
    #: ``split_k_max_m_small_groups`` rows only (and never past the packed limit)
    small_group_bytes: int = 32
    split_k_max_m_small_groups: int = 4
    #: a per-channel row is cut into virtual groups of this many values (packed: bytes), cut into pieces
    #: as a real group is and summed after by a dot with ones
    row_group: int = 128
    row_group_packed: int = 64
    #: an int8 group: at most this many pieces, each a multiple of ``piece_multiple`` values (a row that
    #: no virtual group divides: ``row_max_pieces``; more than 128 terms are 4-10x slower)
    group_max_pieces: int = 16
    row_max_pieces: int = 128
    piece_multiple: int = 8
    #: packed int4: pieces of ``packed_min_piece`` to ``packed_max_piece`` bytes, ``packed_pieces`` where that
    #: allows, at most ``packed_max_pieces`` (each piece is two terms, low and high nibbles)
    packed_pieces: int = 2
    packed_min_piece: int = 16
    packed_max_piece: int = 32
    packed_max_pieces: int = 8

    def pieces(self, length: int, packed: bool, grouped: bool) -> int:
        """How many equal pieces to cut a reduction of ``length`` stored elements (bytes when packed) into."""
        if packed:
            piece = length // self.packed_pieces
            if length % self.packed_pieces == 0 and self.packed_min_piece <= piece <= self.packed_max_piece:
                return self.packed_pieces
            if length <= self.packed_max_piece:
                return 1
            for r in range(self.packed_pieces + 1, self.packed_max_pieces + 1):
                if length % r == 0 and length // r <= self.packed_max_piece:
                    return r
            return self.packed_pieces if length % self.packed_pieces == 0 else 1
        most = self.group_max_pieces if grouped else self.row_max_pieces
        for r in range(min(most, length // self.piece_multiple), 1, -1):
            if length % r == 0 and (length // r) % self.piece_multiple == 0:
                return r
        return 1


def values(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stored weight values in ``dtype``; float8 through float16, exactly (every e4m3fn and e5m2 value,
    NaN included, is a float16): XLA:CPU converts f8 -> f16 in vector code and f16 -> f32 with F16C, but
    f8 -> f32 one element at a time, 1.7-5x slower (docs/ops.md, Kernels)."""
    if w.dtype in FLOAT8_DTYPES and dtype != torch.float16:
        return w.to(torch.float16).to(dtype)
    return w.to(dtype)


def _computed_once(x: torch.Tensor, pairs: bool) -> torch.Tensor:
    """``x [M, K]`` (K even) through a dot with a 2 x 2 identity: the same values, computed once.

    XLA:CPU fuses cheap producers of x (a norm's scaling, the multiply after an activation function, the
    bfloat16 roundings between them) into their consumer, and split-K reads every x element once per
    output feature: the producers would run N times. A dot is never fused into its consumer (an
    optimization barrier is dropped before fusion). ``pairs``: ``[2, M, K/2]``, even k then odd k; else
    ``[M, K]``. Exact for finite x; an infinite x turns its neighbour NaN (``inf * 0``), so its whole
    output row is NaN (docs/ops.md, NaN / Inf)."""
    m, k = x.shape
    eye = torch.eye(2, dtype=x.dtype, device=x.device)
    x3 = x.reshape(m, k // 2, 2)
    if pairs:
        return dot(eye, x3, ([1], [2]), out=x.dtype)
    return dot(x3, eye, ([2], [0]), out=x.dtype).reshape(m, k)


def split_k(call: Call, tuning: XlaCpuTuning, groups: int, piece_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group products ``acc[n, g, m] = sum_b values(w)[n, g*B + b] * x[m, g*B + b]`` of a weight stored
    by rows (``groups`` of B values a row), ``[N, groups, M]``, without a dot: each group is cut into ``r``
    equal pieces summed as ``r`` terms of one fused multiply-and-reduce, which XLA:CPU then iterates B/r
    times a group instead of B (its reduction over the minor dimension is one serial chain). The rows are
    the minor dimension of the result, so a group's weight bytes are read from memory once and from cache
    for every other row. Exact float32 products, float32 accumulation in another order than a dot.

    ``piece_scale [N, groups, 1, r]``: each group is cut into its ``r`` pieces instead, and piece ``j``'s
    products are multiplied by ``piece_scale[..., j]`` inside the loop (small real groups, one a piece,
    summed in larger ``groups``: fewer, longer reduces)."""
    w, cdt = call.w, call.compute_dtype
    (n, width), (m, k) = w.shape, call.x_values.shape
    per_group = width // groups  # bytes a group
    r = tuning.pieces(per_group, call.packed, grouped=groups > 1) if piece_scale is None else piece_scale.shape[-1]
    piece = per_group // r

    def scaled(term, j):
        return term if piece_scale is None else term * take(piece_scale, 3, j, j + 1)

    def by_groups(x):  # [M, groups * per_group] -> [1, groups, M, per_group]
        return x.reshape(m, groups, per_group).permute(1, 0, 2).reshape(1, groups, m, per_group)

    if not call.packed:
        x = by_groups(_computed_once(call.x_values, pairs=False) if k % 2 == 0 else call.x_values)
        w = w.reshape(n, groups, 1, per_group)
        terms = (scaled(values(take(w, 3, j * piece, (j + 1) * piece), cdt) * take(x, 3, j * piece, (j + 1) * piece), j)
                 for j in range(r))
        return functools.reduce(operator.add, terms).sum(dim=-1)
    offset = w.dtype == torch.int8  # signed nibbles v read as unsigned v + 8 (w ^ 0x88: two ops fewer a
    if offset:  # byte, 10-30% faster); 8 * sum(x) comes off each group's sum
        w = w.to(torch.uint8) ^ 0x88
    w = w.reshape(n, groups, 1, per_group)
    pairs = _computed_once(call.x_values, pairs=True)
    x_even, x_odd = (by_groups(take(pairs, 0, i, i + 1).reshape(m, -1)) for i in (0, 1))

    def term(j):  # nibbles in 32-bit lanes: XLA:CPU's vector code has no 8-bit shift (10-20% faster)
        byte = take(w, 3, j * piece, (j + 1) * piece).to(torch.int32)
        return scaled((byte & 15).to(cdt) * take(x_even, 3, j * piece, (j + 1) * piece)
                      + (byte >> 4).to(cdt) * take(x_odd, 3, j * piece, (j + 1) * piece), j)

    acc = functools.reduce(operator.add, (term(j) for j in range(r))).sum(dim=-1)
    if not offset:
        return acc
    if piece_scale is None:
        return acc - 8 * (x_even.sum(dim=-1) + x_odd.sum(dim=-1))
    x_pieces = (x_even + x_odd).reshape(1, groups, m, r, piece).sum(dim=-1)  # [1, groups, M, r]
    return acc - 8 * (piece_scale * x_pieces).sum(dim=-1)


def _split_k_rows(call: Call, tuning: XlaCpuTuning, short_groups: bool = False) -> bool:
    limit = tuning.split_k_max_m_packed if call.packed else tuning.split_k_max_m
    if short_groups:
        limit = min(limit, tuning.split_k_max_m_small_groups)
    return call.rows is not None and call.rows <= limit


def _halves(call: Call):
    """(weight part, activation columns it meets): both nibble halves of packed bytes, or the whole."""
    k = call.spec.in_features
    if call.packed and not is_split(call.w):
        low, high = nibbles(call.w)
        return ((low, take(call.x_values, 1, 0, k, 2)), (high, take(call.x_values, 1, 1, k, 2)))
    return ((unpacked_weight(call.w, call.packed), call.x_values),)


def per_channel(call: Call, tuning: XlaCpuTuning) -> torch.Tensor:
    """Split-K over virtual groups, unless GSPMD splits the weight (it would move int8 pieces between
    devices); else ``sum over halves of convert(w) [N, K'] . x [M, K'] -> [N, M]``; the scales after."""
    cdt = call.compute_dtype
    if _split_k_rows(call, tuning) and not is_split(call.w):
        group = tuning.row_group_packed if call.packed else tuning.row_group
        virtual = call.w.shape[1] // group if call.w.shape[1] % group == 0 else 1
        acc = split_k(call, tuning, virtual)  # [N, virtual, M]
        # the groups are summed by a dot with ones: a sum would merge with the pieces' reduce into one
        # long reduce, 4x slower
        acc = dot(acc, torch.ones(virtual, dtype=cdt, device=acc.device), ([1], [0]), out=cdt)
        return epilogue(call, acc, True, call.scale, call.zero_point)
    acc = functools.reduce(operator.add, (dot(values(w, cdt), x, ([1], [1]), out=cdt) for w, x in _halves(call)))
    return epilogue(call, acc, True, call.scale, call.zero_point)


def blockwise_by_rows(call: Call, tuning: XlaCpuTuning) -> torch.Tensor:
    """Split-K, the block scales after (packed groups under a virtual group: inside, see :func:`split_k`);
    past it ``w [N, K]`` dequantized (each half on its own when packed), then the dot -> ``[N, M]``."""
    n, s, cdt = call.spec.out_features, call.spec.num_blocks, call.compute_dtype
    group_bytes, virtual_bytes = call.w.shape[1] // s, tuning.row_group_packed
    small = call.packed and group_bytes < virtual_bytes and call.w.shape[1] % virtual_bytes == 0

    def x_sums():  # [M, S]: each group's activation sum, which its zero point multiplies
        return call.x_values.reshape(-1, s, call.spec.block_size).sum(dim=-1)

    if small and _split_k_rows(call, tuning) and not is_split(call.w):
        # groups smaller than a virtual group (packed g32, g64): each scaled inside the loop and summed in
        # virtual groups: fewer and longer reduces than one a group (not when GSPMD splits the weight: the
        # regrouping costs an all-gather there, where the form below needs one f32 all-reduce)
        v = call.w.shape[1] // virtual_bytes
        acc = split_k(call, tuning, v, piece_scale=call.scale.reshape(n, v, 1, -1))  # [N, V, M]
        acc = dot(acc, torch.ones(v, dtype=cdt, device=acc.device), ([1], [0]), out=cdt)
        if call.zero_point is not None:  # the sum over groups of zero * x_sums: a dot
            acc = acc - dot(call.zero_point, x_sums(), ([1], [1]), out=cdt)
        return epilogue(call, acc, True)
    if _split_k_rows(call, tuning, short_groups=call.packed and group_bytes < tuning.small_group_bytes):
        acc = split_k(call, tuning, s) * call.scale[:, :, None]  # [N, S, M]
        if call.zero_point is not None:  # per block, before the one sum (one all-reduce when GSPMD splits K)
            acc = acc - x_sums().t() * call.zero_point[:, :, None]
        if call.packed:  # a dot with ones: a sum would merge with the nibbles' short reduce into one long one
            return epilogue(call, dot(acc, torch.ones(s, dtype=cdt, device=acc.device), ([1], [0]), out=cdt), True)
        return epilogue(call, acc.sum(dim=1), True)

    def dequantized(w):
        w_deq = values(w, cdt).reshape(n, s, -1) * call.scale[:, :, None]
        return w_deq if call.zero_point is None else w_deq - call.zero_point[:, :, None]

    dots = (dot(dequantized(w).reshape(n, -1), x, ([1], [1]), out=cdt) for w, x in _halves(call))
    return epilogue(call, functools.reduce(operator.add, dots), True)


def blockwise(call: Call, tuning: XlaCpuTuning) -> torch.Tensor:
    """Seed layout ``w [S, B, N]`` (N contiguous). From ``tuning.large_m`` rows: dequantized, then one dot
    -> ``[N, M]``; below: dots batched over the blocks, ``[S, B, N] . [M, S, B] -> [S, N, M]``, each
    block's scale after its dot."""
    spec, cdt, x = call.spec, call.compute_dtype, call.x_values
    if call.rows is not None and call.rows >= tuning.large_m:
        w_deq = values(unpacked_weight(call.w, call.packed), cdt) * call.scale[:, None, :]
        if call.zero_point is not None:
            w_deq = w_deq - call.zero_point[:, None, :]
        return epilogue(call, dot(w_deq.reshape(spec.in_features, -1), x, ([0], [1]), out=cdt), True)
    blocks = x.reshape(-1, spec.num_blocks, spec.block_size)  # [M, S, B]
    if call.packed:
        low, high = nibbles(call.w)  # [S, B/2, N]
        acc = (dot(low.to(cdt), take(blocks, 2, 0, spec.block_size, 2), ([1], [2]), ([0], [1]), out=cdt)
               + dot(high.to(cdt), take(blocks, 2, 1, spec.block_size, 2), ([1], [2]), ([0], [1]), out=cdt))
    else:
        acc = dot(values(call.w, cdt), blocks, ([1], [2]), ([0], [1]), out=cdt)
    return epilogue(call, sum_blocks(call, acc.permute(0, 2, 1), call.scale, call.zero_point), False)


def per_tensor(call: Call, tuning: XlaCpuTuning) -> torch.Tensor:
    """One scale: per-channel's forms with the scale broadcast over N."""
    return per_channel(dataclasses.replace(call, scale=call.scale.expand(call.spec.out_features)), tuning)


def blocks_2d(call: Call, tuning: XlaCpuTuning) -> torch.Tensor:
    """Bn x B blocks: blockwise by rows' forms with each scale repeated over its Bn rows; a partial last K
    block is padded with zeros."""
    spec = call.spec
    n, k, groups = spec.out_features, spec.in_features, spec.num_blocks
    padding = groups * spec.block_size - k
    w, x = call.w, call.x_values
    if padding:  # a concatenate: torch_xla pads a float8 array with a float64 constant, which XLA refuses
        w = torch.cat([w, w.new_zeros((n, padding))], dim=1)
        x = torch.cat([x, x.new_zeros((x.shape[0], padding))], dim=1)
    scale = rows_of_blocks(call.scale, spec.layout.block_n, n)  # [N, G]
    return blockwise_by_rows(dataclasses.replace(call, w=w, x_values=x, scale=scale), tuning)


#: layout -> lowering
LAYOUTS = {"per-channel": per_channel, "blockwise": blockwise, "blockwise by rows": blockwise_by_rows,
           "per-tensor": per_tensor, "2-D blocks": blocks_2d}
