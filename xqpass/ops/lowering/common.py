"""What both XLA lowerings share: the prepared call, helpers that stay plain HLO under torch_xla, and
the one epilogue.

torch_xla pitfalls these helpers avoid (each found and tested in tests/test_op_xla.py):

* ``>>`` on int8 is lowered as a truncating division (``-1 >> 4 == 0``): :func:`nibbles` shifts
  multiples of 16 only.
* Inside the op torch_xla gets the tensors without functionalization and lowers a strided view of them
  (``t[..., 0::2]``, ``narrow`` on an inner dim) as a gather with indices made on the host every call:
  :func:`take` is a ``slice_copy``; a select of a computed tensor comes out wrong, so there is none.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import MatmulSpec


@dataclass(frozen=True)
class Call:
    """One checked call of the op, its activation flattened to ``[M, K]`` rows."""

    spec: MatmulSpec
    x: torch.Tensor  # [M, K] as given
    x_values: torch.Tensor  # [M, K] the values the products see (x, or W8A8's int8 x_q), compute dtype
    x_q: torch.Tensor | None  # [M, K] int8 when activations are quantized (float8 weights: float8_e4m3fn)
    x_scale: torch.Tensor | None  # [M, 1] their per-token scale
    w: torch.Tensor  # as stored
    scale: torch.Tensor  # compute dtype
    zero_point: torch.Tensor | None  # compute dtype
    bias: torch.Tensor | None
    packed: bool
    compute_dtype: torch.dtype
    out_shape: tuple  # (*x.shape[:-1], N)

    @property
    def rows(self) -> int | None:
        """M, or None while it is symbolic."""
        m = self.x.shape[0]
        return m if isinstance(m, int) else None


def dot(lhs: torch.Tensor, rhs: torch.Tensor, contracting, batch=([], []), out=torch.float32) -> torch.Tensor:
    """``dot_general`` with a chosen result type (int32 for integer operands); mixed integer operands
    (a uint8 weight with int8 activations) are widened to int32 first, still exact."""
    import torch_xla  # only imported when an XLA tensor reaches the op

    if lhs.dtype != rhs.dtype and not lhs.is_floating_point():
        lhs, rhs = lhs.to(torch.int32), rhs.to(torch.int32)
    return torch_xla._XLAC._xla_dot_general(lhs, rhs, (contracting, batch), preferred_element_type=out)


def nibbles(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) nibble values of packed bytes, same shape as ``w``: even and odd k."""
    low = w & 15
    if w.dtype == torch.int8:  # two's complement nibbles; (w & -16) is a multiple of 16: any shift is exact
        return low - (low & 8) * 2, (w & -16) >> 4
    return low, w >> 4  # unsigned: logical and arithmetic shifts agree


def take(t: torch.Tensor, dim: int, start: int, end: int, step: int = 1) -> torch.Tensor:
    """``t``'s slice along ``dim`` as an HLO slice (``slice_copy``), never a gather."""
    return torch.ops.aten.slice_copy.Tensor(t, dim, start, end, step)


def rows_of_blocks(scale: torch.Tensor, block_n: int, n: int) -> torch.Tensor:
    """A 2-D block scale ``[ceil(N/Bn), G]`` repeated over its rows: ``[N, G]`` (a broadcast, a reshape
    and a slice: no gather)."""
    blocks, groups = scale.shape
    repeated = scale[:, None, :].expand(blocks, block_n, groups).reshape(blocks * block_n, groups)
    return repeated if blocks * block_n == n else take(repeated, 0, 0, n)


def is_split(t: torch.Tensor) -> bool:
    """Whether GSPMD splits ``t`` over devices (torch_xla SPMD; see xqpass.sharding)."""
    import torch_xla

    return torch_xla._XLAC._get_xla_sharding_spec(t) not in ("", "{replicated}")


def sum_blocks(call: Call, acc: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """Per-block products ``acc [S, M, N]`` scaled by their block's ``scale [S, N]`` (less
    ``zero_point [S, N]`` times the block's activation sum), summed over the blocks: ``[M, N]``. The zero
    point comes off per block, before the one sum (one all-reduce when GSPMD splits K)."""
    s, block = call.spec.num_blocks, call.spec.block_size
    acc = acc.to(call.compute_dtype) * scale[:, None, :]
    if zero_point is not None:
        acc = acc - call.x_values.reshape(-1, s, block).sum(dim=-1).t()[:, :, None] * zero_point[:, None, :]
    return acc.sum(dim=0)


def epilogue(call: Call, out: torch.Tensor, features_first: bool, scale=None, zero_point=None) -> torch.Tensor:
    """The dot's result, ``[M, N]`` or (``features_first``) ``[N, M]``, times the per-feature ``scale``
    ``[N]``, less ``zero_point [N]`` times each row's activation sum, times the activation's scale, plus
    the bias, cast to x's dtype and shaped as the op's result.

    Everything runs in the orientation the dot produced and ``[N, M]`` is transposed last: XLA folds a
    transpose that directly follows a dot into the dot by swapping its operands, which would make the
    activation the left operand (2x slower on XLA:CPU at 256 rows, docs/benchmarks.md)."""
    feature = (lambda v: v[:, None]) if features_first else (lambda v: v)  # [N] against out
    row = (lambda v: v.t()) if features_first else (lambda v: v)  # [M, 1] against out
    out = out.to(call.compute_dtype)
    if scale is not None:
        out = out * feature(scale)
    if zero_point is not None:
        out = out - feature(zero_point) * row(call.x_values.sum(dim=-1, keepdim=True))
    if call.x_scale is not None:
        out = out * row(call.x_scale)
    if call.bias is not None:
        out = out + feature(call.bias.to(call.compute_dtype))
    out = out.to(call.x.dtype)
    return (out.t() if features_first else out).reshape(call.out_shape)
