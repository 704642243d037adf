"""The XLA lowerings of ``xq::quantized_grouped_matmul``: three routes, picked by the rows (T) and top-k.

* **one row** (decode at batch 1): the row's ``top_k`` experts' stored bytes gathered (``index_select`` on
  the expert axis: an HLO gather reading ``top_k`` experts' bytes, not ``E``) and multiplied as one weight
  ``[top_k * N, K]`` by ``xq::quantized_matmul`` (its forms: XLA:CPU's split-K, the canonical dot).
* **gather** (a few rows): each row's experts gathered the same way, ``[T * top_k, N, K]``, unpacked and
  converted in the graph, each row meeting its own experts in one dot batched over the rows (canonical:
  the weight as stored up to the convert, group scales after; XLA:CPU: dequantized into float32 first,
  the weight on the dot's left).
* **dense** (many rows): the bank as one weight ``[E * N, K]`` through ``xq::quantized_matmul`` (``E``
  experts' bytes read once, ``E / top_k`` times the products a row needs), each row's experts picked from
  ``[T, E, N]`` by a gather of rows.

**Each expert's input order** (``perm``, GPTQ act-order): the XLA kernel first takes every (row, slot)
out as a row of its own, read in its expert's order (:func:`~xqpass.ops.grouped.in_own_order`: a gather
of ``perm``'s rows, a gather of x's values), one expert a row; the routes here then run unchanged on
those ``T * top_k`` rows. The dense route thereby does ``top_k`` times the products (each row also meets
the other experts, in the wrong order, and those results are not picked): the simplest form correct on
every route, not a measured one.

Every layout is seen as groups: ``G`` groups of ``B`` values along K (per-channel: one group of K).
Float8 2-D blocks (Bn x B) are groups too, each scale repeated over its Bn rows (the gather routes), or
as blocks of the flattened bank where Bn divides N (the matmul op's 2-D lowering: one row, dense); a
partial last block along K is padded with zeros where a route needs whole groups.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, replace

import torch

from ...quant.layouts import unpack_int4
from ..grouped import GroupedSpec, flat_bank, flat_bank_matmul
from .common import dot, nibbles, take
from .xla_cpu import values


@dataclass(frozen=True)
class GroupedCall:
    """One checked call, its ids as ``[T, top_k]``, scales and zero points as ``[E, N, G]`` in the compute dtype."""

    spec: GroupedSpec
    x: torch.Tensor  # [T, K] as given
    x_values: torch.Tensor  # [T, K] compute dtype
    ids: torch.Tensor  # [T, top_k]
    w: torch.Tensor  # [E, N, K or K/2] as stored
    scale: torch.Tensor  # [E, N, G] (2-D blocks: each block's scale repeated over its rows)
    zero_point: torch.Tensor | None  # [E, N, G]
    bias: torch.Tensor | None  # [E, N] compute dtype
    int4_weight: bool
    packed: bool
    compute_dtype: torch.dtype
    block_scale: torch.Tensor | None = None  # 2-D blocks: [E, ceil(N/Bn), G] as stored, compute dtype

    @property
    def groups(self) -> tuple[int, int]:
        """(G, B): groups along K and the values a group holds."""
        layout, k = self.spec.layout, self.spec.in_features
        return layout.num_groups(k), layout.group_size(k)

    def selected(self, t: torch.Tensor) -> torch.Tensor:
        """``t [E, ...]``'s entries of each row's experts, ``[T * top_k, ...]``: a gather on the expert axis."""
        return torch.index_select(t, 0, self.ids.reshape(-1))

    def whole_groups(self, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, K]`` and ``w [..., K]`` with K padded by zeros to ``G * B`` (2-D blocks may end partial
        along K; the zeros add nothing): the shapes the group-batched dots reshape to."""
        (g, b), k = self.groups, self.spec.in_features
        padding = g * b - k
        if not padding:
            return x, w
        # a concatenate: torch_xla pads a float8 array with a float64 constant, which XLA refuses
        return (torch.cat([x, x.new_zeros((x.shape[0], padding))], dim=1),
                torch.cat([w, w.new_zeros((*w.shape[:-1], padding))], dim=-1))


def finish(call: GroupedCall, out: torch.Tensor) -> torch.Tensor:
    """``out [T, top_k, N]`` in the compute dtype plus each row's expert's bias, rounded once to x's dtype."""
    if call.bias is not None:
        out = out + call.selected(call.bias).reshape(out.shape)
    return out.to(call.x.dtype).reshape(call.spec.out_shape)


def pick(call: GroupedCall, per_expert: torch.Tensor) -> torch.Tensor:
    """``per_expert [T, E, N]`` -> ``[T, top_k, N]``, each row's experts' entries (one gather of rows of
    ``[T * E, N]``, indices made on the device from the ids)."""
    rows, experts, n = per_expert.shape
    top_k = call.ids.shape[1]
    flat = torch.arange(rows, device=call.ids.device, dtype=call.ids.dtype)[:, None] * experts + call.ids
    return torch.index_select(per_expert.reshape(rows * experts, n), 0, flat.reshape(-1)).reshape(rows, top_k, n)


# -- canonical (TPU, GPU): the weight as stored up to the convert before the dot, scales after ------------------

def _canonical_operands(call: GroupedCall, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(activation ``[T, K]``, weight values ``[..., N, K]``) in the dot's type: 16-bit activations take a
    16-bit dot (int8, int4 and float8 values are exact in bfloat16 and float16), others the compute dtype."""
    dtype = call.x.dtype if call.x.dtype in (torch.bfloat16, torch.float16) else call.compute_dtype
    w = unpack_int4(w, axis=-1) if call.packed else w
    return call.x.to(dtype), w.to(dtype)


def canonical_gather(call: GroupedCall) -> torch.Tensor:
    """Each row's experts gathered as stored ``[T, top_k * N, G, B]``; one dot batched over rows and groups
    ``[T, G, B] . [T, top_k * N, G, B] -> [T, G, top_k * N]``; group scales after it."""
    (rows, top_k), n, (g, b) = call.ids.shape, call.spec.out_features, call.groups
    x, w = call.whole_groups(*_canonical_operands(call, call.selected(call.w)))
    acc = dot(x.reshape(rows, g, b), w.reshape(rows, top_k * n, g, b), ([2], [3]), ([0, 1], [0, 2]))
    acc = acc.to(call.compute_dtype) * call.selected(call.scale).reshape(rows, top_k * n, g).permute(0, 2, 1)
    if call.zero_point is not None:
        sums = call.x_values.reshape(rows, g, b).sum(dim=-1)[:, :, None]  # [T, G, 1]
        acc = acc - sums * call.selected(call.zero_point).reshape(rows, top_k * n, g).permute(0, 2, 1)
    return finish(call, acc.sum(dim=1).reshape(rows, top_k, n))


# -- XLA:CPU: dequantized into float32, the weight on the dot's left ---------------------------------------------

def _dequantized_halves(call: GroupedCall, w: torch.Tensor, scale: torch.Tensor, zero_point):
    """``[(w_deq [..., N, K'], x [T, K'])]``: the whole weight, or packed int4's low and high nibbles apart
    (even and odd k, never interleaved), each dequantized in float32 with its group's scale."""
    cdt, k, (g, _) = call.compute_dtype, call.spec.in_features, call.groups
    if call.packed:
        low, high = nibbles(w)
        parts = ((low, take(call.x_values, 1, 0, k, 2)), (high, take(call.x_values, 1, 1, k, 2)))
    else:
        x, w = call.whole_groups(call.x_values, w)
        parts = ((w, x),)

    def dequantized(part):
        deq = values(part, cdt).reshape(*part.shape[:-1], g, -1) * scale[..., None]
        deq = deq if zero_point is None else deq - zero_point[..., None]
        return deq.reshape(part.shape)

    return [(dequantized(part), x) for part, x in parts]


def cpu_gather(call: GroupedCall) -> torch.Tensor:
    """Each row's experts gathered and dequantized, ``[T, top_k * N, K]``; one dot batched over rows with
    the weight on the left, ``-> [T, top_k * N]``."""
    (rows, top_k), n = call.ids.shape, call.spec.out_features
    zero_point = None if call.zero_point is None else call.selected(call.zero_point)
    halves = _dequantized_halves(call, call.selected(call.w), call.selected(call.scale), zero_point)
    dots = (dot(w.reshape(rows, top_k * n, -1), x, ([2], [1]), ([0], [0]), out=call.compute_dtype) for w, x in halves)
    return finish(call, functools.reduce(operator.add, dots).reshape(rows, top_k, n))


# -- both forms: the matmul op on experts flattened into one weight [experts * N, K] ---------------------------

def _matmul(call: GroupedCall, w, scale, zero_point, bias) -> torch.Tensor:
    """``xq::quantized_matmul`` of the rows with ``w [X, N, K]`` seen as one weight ``[X * N, K]``
    (:func:`~xqpass.ops.grouped.flat_bank`; ``scale`` and ``zero_point`` ``[X, N, G]``, 2-D blocks
    ``[X, ceil(N/Bn), G]``): ``[T, X * N]`` in x's dtype, traced into the same graph in the same form (its
    XLA:CPU split-K for a few rows, its dots past them), rounded once."""
    layout = call.spec.layout
    if layout.block_size == -1:  # per-channel: the stored [X, N]
        scale, zero_point = (None if t is None else t.reshape(t.shape[:2]) for t in (scale, zero_point))
    bank = flat_bank(layout, call.x, w, scale, zero_point, bias)
    return flat_bank_matmul(bank, call.int4_weight, call.packed)


def _own_experts(call: GroupedCall) -> torch.Tensor:
    """``call``'s rows times the experts they select, gathered and multiplied as one weight
    ``[rows * top_k * N, K]`` by the matmul op: ``[rows, rows * top_k * N]``."""
    zero_point, bias = (None if t is None else call.selected(t) for t in (call.zero_point, call.bias))
    scale = call.selected(call.scale if call.block_scale is None else call.block_scale)
    return _matmul(call, call.selected(call.w), scale, zero_point, bias)


def one_row(call: GroupedCall) -> torch.Tensor:
    """One row (decode at batch 1): its ``top_k`` experts' stored bytes gathered and multiplied as one
    weight ``[top_k * N, K]`` by the matmul op."""
    return _own_experts(call).reshape(call.spec.out_shape)


def each_row(call: GroupedCall) -> torch.Tensor:
    """A few rows (decode's down projection: a row per token and slot), each one :func:`one_row` product
    of its own: ``rows * top_k`` experts' bytes read, where the dense route reads ``E`` and the batched
    gather is slow on XLA:CPU."""
    rows = [_own_experts(replace(call, x=call.x[r:r + 1], x_values=call.x_values[r:r + 1], ids=call.ids[r:r + 1]))
            for r in range(call.x.shape[0])]
    return torch.cat(rows).reshape(call.spec.out_shape)


def dense(call: GroupedCall) -> torch.Tensor:
    """The whole bank as one weight ``[E * N, K]`` through the matmul op, ``[T, E * N]``; each row's
    experts picked (the bias rides along per expert: one rounding)."""
    rows, (e, n, _) = call.x.shape[0], call.w.shape
    scale = call.scale if call.block_scale is None else call.block_scale
    out = _matmul(call, call.w, scale, call.zero_point, call.bias).reshape(rows, e, n)
    return pick(call, out).reshape(call.spec.out_shape)


#: form -> route -> lowering
ROUTES = {"canonical": {"one row": one_row, "each row": each_row, "gather": canonical_gather, "dense": dense},
          "cpu": {"one row": one_row, "each row": each_row, "gather": cpu_gather, "dense": dense}}
