"""The XLA lowerings of ``xq::quantized_grouped_matmul``: two routes, each in the canonical (TPU, GPU) and
the XLA:CPU form.

* **gather** (few rows): the stored bytes of the experts the rows name are gathered (``index_select`` on
  the expert axis: an HLO gather reading ``T * top_k`` experts' bytes, not ``E``), unpacked and converted
  in the graph, and each row meets its own experts in one dot batched over the rows.
* **dense** (many rows): every expert's weight meets every row in one dot (``E`` experts' bytes read once,
  ``E / top_k`` times the products a row needs), and each row's experts are picked from the result by a
  gather of rows.

Canonical keeps the weight integer (or float8) up to the dot, scales after it; XLA:CPU dequantizes into
float32 first and puts the weight on the dot's left (as :mod:`.xla_cpu` does: XLA:CPU's integer and
16-bit dots are slow, and the weight-as-LHS dot is faster). Every layout is seen as groups: ``G`` groups
of ``B`` values along K (per-channel: one group of K).
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import torch

from ...quant.layouts import unpack_int4
from ..grouped import GroupedSpec
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
    scale: torch.Tensor  # [E, N, G]
    zero_point: torch.Tensor | None  # [E, N, G]
    bias: torch.Tensor | None  # [E, N] compute dtype
    packed: bool
    compute_dtype: torch.dtype

    @property
    def groups(self) -> tuple[int, int]:
        """(G, B): groups along K and the values a group holds."""
        layout, k = self.spec.layout, self.spec.in_features
        return layout.num_groups(k), layout.group_size(k)

    def selected(self, t: torch.Tensor) -> torch.Tensor:
        """``t [E, ...]``'s entries of each row's experts, ``[T * top_k, ...]``: a gather on the expert axis."""
        return torch.index_select(t, 0, self.ids.reshape(-1))


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
    x, w = _canonical_operands(call, call.selected(call.w))
    acc = dot(x.reshape(rows, g, b), w.reshape(rows, top_k * n, g, b), ([2], [3]), ([0, 1], [0, 2]))
    acc = acc.to(call.compute_dtype) * call.selected(call.scale).reshape(rows, top_k * n, g).permute(0, 2, 1)
    if call.zero_point is not None:
        sums = call.x_values.reshape(rows, g, b).sum(dim=-1)[:, :, None]  # [T, G, 1]
        acc = acc - sums * call.selected(call.zero_point).reshape(rows, top_k * n, g).permute(0, 2, 1)
    return finish(call, acc.sum(dim=1).reshape(rows, top_k, n))


def canonical_dense(call: GroupedCall) -> torch.Tensor:
    """Every expert against every row: ``[T, G, B] . [E, N, G, B] -> [G, T, E, N]`` batched over groups,
    group scales after it, then each row's experts picked."""
    rows, (e, n, _), (g, b) = call.x.shape[0], call.w.shape, call.groups
    x, w = _canonical_operands(call, call.w)
    acc = dot(x.reshape(rows, g, b), w.reshape(e, n, g, b), ([2], [3]), ([1], [2]))
    acc = acc.to(call.compute_dtype) * call.scale.permute(2, 0, 1)[:, None]  # [G, 1, E, N]
    if call.zero_point is not None:
        sums = call.x_values.reshape(rows, g, b).sum(dim=-1).t()[:, :, None, None]  # [G, T, 1, 1]
        acc = acc - sums * call.zero_point.permute(2, 0, 1)[:, None]
    return finish(call, pick(call, acc.sum(dim=0)))


# -- XLA:CPU: dequantized into float32, the weight on the dot's left ---------------------------------------------

def _dequantized_halves(call: GroupedCall, w: torch.Tensor, scale: torch.Tensor, zero_point):
    """``[(w_deq [..., N, K'], x [T, K'])]``: the whole weight, or packed int4's low and high nibbles apart
    (even and odd k, never interleaved), each dequantized in float32 with its group's scale."""
    cdt, k, (g, _) = call.compute_dtype, call.spec.in_features, call.groups
    if call.packed:
        low, high = nibbles(w)
        parts = ((low, take(call.x_values, 1, 0, k, 2)), (high, take(call.x_values, 1, 1, k, 2)))
    else:
        parts = ((w, call.x_values),)

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


def cpu_dense(call: GroupedCall) -> torch.Tensor:
    """The bank dequantized, ``[E * N, K] . [T, K] -> [E * N, T]``; each row's experts picked along E of
    ``[E, N, T]`` (a gather, then the transpose: one right after the dot would be folded into it, making x
    the left operand)."""
    (rows, top_k), (e, n, _) = call.ids.shape, call.w.shape
    halves = _dequantized_halves(call, call.w, call.scale, call.zero_point)
    dots = (dot(w.reshape(e * n, -1), x, ([1], [1]), out=call.compute_dtype) for w, x in halves)
    acc = functools.reduce(operator.add, dots).reshape(e, n, rows)
    index = call.ids.t()[:, None, :].expand(top_k, n, rows)  # [top_k, N, T]: row t's j-th expert
    return finish(call, torch.gather(acc, 0, index).permute(2, 0, 1))


#: form -> route -> lowering
ROUTES = {"canonical": {"gather": canonical_gather, "dense": canonical_dense},
          "cpu": {"gather": cpu_gather, "dense": cpu_dense}}
