"""Bounds of integer values, proved from the graph: what every value of a node can be, for any values of
the tensors it is computed from. The pass chooses the storage of a weight the graph unpacks by them
(:mod:`.fold`), and accepts integer arithmetic on the weight (``(q - z).to(dt)``) only where they prove it
does not wrap around."""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node

from .spellings import canonical

aten = torch.ops.aten

#: ops whose value is the value of (a selection of) their first operand: bounds pass through
SELECTIONS = {operator.getitem, torch.index_select, torch.gather, torch.take_along_dim, torch.narrow,
              torch.roll, torch.flip, aten.index.Tensor, aten.index_select.default, aten.gather.default,
              aten.slice.Tensor, aten.select.int, aten.narrow.default, aten.roll.default, aten.flip.default}
_SELECTION_METHODS = {"index_select", "gather", "narrow", "roll", "flip", "__getitem__", "repeat_interleave",
                      "repeat"}
#: ops copying their first operand's values into a new tensor: bounds pass through
_COPIES = {torch.repeat_interleave, aten.repeat_interleave.self_int, aten.repeat.default}
#: ops writing their second operand into their first: bounds of both
_SCATTERS = {aten.slice_scatter.default, aten.select_scatter.default, torch.slice_scatter, torch.select_scatter,
             aten.index_put.default, torch.index_put}


def _full(dtype: torch.dtype) -> tuple[int, int] | None:
    if dtype == torch.bool:
        return (0, 1)
    if dtype is None or dtype.is_floating_point or dtype.is_complex:
        return None
    info = torch.iinfo(dtype)
    return (info.min, info.max)


def value_bounds(ctx, node: Any, memo: dict | None = None) -> tuple[int, int] | None:
    """Inclusive ``(lo, hi)`` that every value of an integer ``node`` lies in, for any values of the
    tensors it is computed from; the dtype's range where nothing tighter is proved (a result that may
    wrap around included), None for floats. ``ctx``: anything with ``dtype(node)``."""
    if isinstance(node, bool):
        return (int(node), int(node))
    if isinstance(node, int):
        return (node, node)
    if not isinstance(node, Node):
        return None
    memo = _memo(ctx) if memo is None else memo
    if node not in memo:
        dtype = ctx.dtype(node)
        if dtype is not None and dtype.is_floating_point:
            memo[node] = _integral(ctx, node, dtype, memo)
        else:
            bounds = exact_bounds(ctx, node, memo)
            memo[node] = _full(dtype) if bounds is None else bounds
    return memo[node]


_SIGNIFICAND_BITS = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8,
                     torch.float8_e4m3fn: 4, torch.float8_e5m2: 3}
#: what a float tensor holding integers can be computed by and stay exact
_INTEGRAL_KINDS = ("noop", "reshape", "transpose", "permute", "expand", "convert", "stack", "cat", "take")


def _integral(ctx, node: Node, dtype: torch.dtype, memo: dict) -> tuple[int, int] | None:
    """Bounds of a float tensor proved to hold integers (converted from integers, or an ``empty`` float
    tensor filled with them), each exactly representable in ``dtype``; None otherwise."""
    canon = canonical(node)
    if node.target in _EMPTY:
        bounds = _filled(ctx, node, memo)
    elif canon is not None and canon.kind in _INTEGRAL_KINDS or node.target in SELECTIONS:
        bounds = _derived(ctx, node, memo)
    else:
        return None
    exact = 2 ** _SIGNIFICAND_BITS.get(dtype, 0)  # every integer up to this is exact in dtype
    return bounds if bounds is not None and -exact <= bounds[0] and bounds[1] <= exact else None


def _memo(ctx) -> dict:
    """The context's memo of bounds (a match tries a node many times; an ``empty`` tensor's coverage is a
    pass over its elements), or a fresh one for a context that keeps none."""
    memo = getattr(ctx, "bounds_memo", None)
    return {} if memo is None else memo


def exact_bounds(ctx, node: Node, memo: dict | None = None) -> tuple[int, int] | None:
    """The bounds of an integer ``node`` derived from its operands' when they lie within its dtype (it
    computes exactly, without wrapping around); None when they do not, or nothing tighter is known."""
    full = _full(ctx.dtype(node))
    if full is None:
        return None
    bounds = _derived(ctx, node, _memo(ctx) if memo is None else memo)
    return None if bounds is None or bounds[0] < full[0] or bounds[1] > full[1] else bounds


def _union(*bounds):
    if any(b is None for b in bounds) or not bounds:
        return None
    return (min(b[0] for b in bounds), max(b[1] for b in bounds))


#: ops making a tensor whose values are whatever its memory held
_EMPTY = {torch.empty, torch.empty_like, aten.empty.memory_format, aten.empty_like.default, "new_empty"}


def _filled(ctx, node: Node, memo: dict) -> tuple[int, int] | None:
    """The bounds of an ``empty`` tensor every element of which is written (``w[:, 0::2] = lo`` ...) before
    anything reads it: those of the values written."""
    writes = [u for u in node.users if u.target is operator.setitem and u.args[0] is node]
    reads = [u for u in node.users if u not in writes]
    shape = ctx.shape(node)
    if not writes or shape is None or any(w > r for w in writes for r in reads):
        return None
    try:
        covered = torch.zeros([int(s) for s in shape], dtype=torch.bool)
        for w in writes:
            covered[w.args[1]] = True
    except (TypeError, IndexError, RuntimeError, ValueError):  # a symbolic size, an index that is a tensor
        return None
    return _union(*(value_bounds(ctx, w.args[2], memo) for w in writes)) if bool(covered.all()) else None


#: libraries' unpack ops, by qualified name: the bounds of what they return
_LIBRARY_BOUNDS = {
    "quanto::unpack": lambda node: (0, 2 ** node.args[1] - 1),  # unpack(packed, bits): unsigned bits-bit values
}


def _derived(ctx, node: Node, memo: dict) -> tuple[int, int] | None:
    bound = lambda a: value_bounds(ctx, a, memo)  # noqa: E731
    canon = canonical(node)
    if node.target in _EMPTY:
        return _filled(ctx, node, memo)
    if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.name in _LIBRARY_BOUNDS:
        return _LIBRARY_BOUNDS[node.target._schema.name](node)
    if canon is None:
        if node.target in SELECTIONS or node.target in _COPIES or \
                node.op == "call_method" and node.target in _SELECTION_METHODS:
            return bound(node.args[0])
        if node.target in _SCATTERS:
            return _union(bound(node.args[0]), bound(node.args[1] if len(node.args) > 1 else None))
        if node.target in (torch.remainder, operator.mod, aten.remainder.Scalar) and isinstance(node.args[1], int) \
                and node.args[1] > 0:
            return (0, node.args[1] - 1)
        return None
    kind, ins = canon.kind, canon.inputs
    if kind in ("noop", "reshape", "transpose", "permute", "expand", "convert", "take"):
        return bound(ins[0])
    if kind in ("stack", "cat"):
        return _union(*(bound(t) for t in ins[0]))
    a, b = (bound(ins[0]), bound(ins[1])) if len(ins) == 2 else (None, None)
    if a is None or b is None:
        return None
    if kind == "bitand":  # x & m with m >= 0 lies in [0, m] whatever x is (two's complement)
        masks = [x[1] for x in (a, b) if x[0] >= 0]
        return (0, min(masks)) if masks else None
    if kind in ("rshift", "lshift"):
        if b[0] < 0 or b[1] >= 64:
            return None
        op = operator.rshift if kind == "rshift" else operator.lshift
        ends = [op(v, s) for v in a for s in b]  # monotonic in each operand: the corners bound it
        return (min(ends), max(ends))
    if kind in ("add", "sub", "mul"):
        op = {"add": operator.add, "sub": operator.sub, "mul": operator.mul}[kind]
        ends = [op(x, y) for x in a for y in b]
        return (min(ends), max(ends))
    return None
