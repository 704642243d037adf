"""XLA kernel of ``xq::quantized_grouped_matmul``: checks the call, prepares it and picks a lowering of
:mod:`.lowering.grouped` by form (canonical / XLA:CPU, as :func:`.xla.lowering_for` says for the matmul
op, ``xla_lowering`` included) and by route: **one row** / **gather** (the selected experts' bytes) while
the rows T are at most :attr:`GroupedTuning.gather_max_rows`, else **dense** over the whole bank (and
always dense while T is symbolic). ``grouped_tuning(GroupedTuning(...))`` sets the threshold while a
graph is traced (benchmarks/bench_moe.py measures both routes). With ``perm`` (each expert's input
order) every (row, slot) first becomes a row of its own in its expert's order
(:func:`.grouped.in_own_order`), and the route is picked by those ``T * top_k`` rows.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

from .checks import compute_dtype
from .grouped import check_grouped_inputs, in_own_order, quantized_grouped_matmul
from .lowering.grouped import ROUTES, GroupedCall
from .xla import lowering_for

__all__ = ["GroupedTuning", "grouped_tuning", "route_for"]


@dataclass(frozen=True)
class GroupedTuning:
    """Where the grouped op's XLA lowering turns from gathering experts to the dense bank (measured by
    benchmarks/bench_moe.py, docs/ops.md)."""

    #: rows (T) up to which each row's experts are gathered; past it the whole bank meets every row. 1: on
    #: XLA:CPU the dense route (split-K over the bank) beats the batched gather from 2 rows (docs/ops.md)
    gather_max_rows: int = 1
    #: rows (T) up to which each row past ``gather_max_rows`` is a product with its own experts' bytes
    #: (``rows * top_k`` experts read); past it the dense route
    each_row_max_rows: int = 2


_tuning: contextvars.ContextVar[GroupedTuning] = contextvars.ContextVar("xqpass_grouped_tuning",
                                                                         default=GroupedTuning())


@contextlib.contextmanager
def grouped_tuning(tuning: GroupedTuning):
    """Inside the block, trace the grouped op with ``tuning`` (this thread / task only)."""
    token = _tuning.set(tuning)
    try:
        yield
    finally:
        _tuning.reset(token)


def route_for(rows) -> str:
    """"one row", "gather", "each row" or "dense" for ``rows`` (T; a symbolic T: "dense")."""
    tuning = _tuning.get()
    if not isinstance(rows, int) or rows > max(tuning.gather_max_rows, tuning.each_row_max_rows):
        return "dense"
    if rows == 1:
        return "one row"
    return "gather" if rows <= tuning.gather_max_rows else "each row"


@quantized_grouped_matmul.register_kernel("xla")
def quantized_grouped_matmul_xla(x, expert_ids, w, scale, zero_point=None, block_size=-1, int4_weight=False,
                                 bias=None, perm=None, *, packed=False, block_n=1):
    spec = check_grouped_inputs(x, expert_ids, w, scale, zero_point, block_size, int4_weight, bias, packed, block_n,
                                perm)
    ids = expert_ids if expert_ids.dim() == 2 else expert_ids.reshape(-1, 1)  # [T, top_k]
    rows, top_k = ids.shape
    if (isinstance(rows, int) and rows == 0) or (isinstance(top_k, int) and top_k == 0):
        return x.new_empty(spec.out_shape)  # XLA has no implementation of the views of an empty tensor
    if perm is not None:
        x, ids = in_own_order(x, ids, perm)  # [T * top_k, K], [T * top_k, 1]
        rows = ids.shape[0]
    cdt = compute_dtype(x.dtype)
    layout = spec.layout
    e, n, groups = spec.experts, spec.out_features, layout.num_groups(spec.in_features)
    block_scale = scale.to(cdt) if layout.block_n > 1 else None  # [E, ceil(N/Bn), G]
    rows_scale = layout.rows_of_blocks(block_scale, n) if block_scale is not None else scale.to(cdt).reshape(e, n, groups)
    call = GroupedCall(spec=spec, x=x, x_values=x.to(cdt), ids=ids, w=w, scale=rows_scale,
                       zero_point=None if zero_point is None else zero_point.to(cdt).reshape(e, n, groups),
                       bias=None if bias is None else bias.to(cdt), int4_weight=int4_weight, packed=packed,
                       compute_dtype=cdt, block_scale=block_scale)
    return ROUTES[lowering_for(x)][route_for(rows)](call)
