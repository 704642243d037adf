"""Expert banks stacked from per-expert tensors, dequantized expert by expert.

Code that batches a Mixtral-style list of per-expert linears for static shapes stacks the experts'
weights and gathers them by the router's ids::

    w1 = torch.stack([e.w1.weight for e in self.experts])[ids]     # each weight q_e.to(dt) * s_e

so the bank the pattern looks for, ``q.to(dt) * s`` on ``[E, N, K]``, appears as ``E`` dequantizations
stacked. Stacking commutes with elementwise work on operands of equal shapes:
``stack([f(a_e, b_e)]) == f(stack([a_e]), stack([b_e]))``, with an operand of lower rank than the result
stacked as ``[E, 1, .., *shape]`` so that it broadcasts as it did per expert, and constants shared by every
expert kept as they are. :func:`hoist_stacked_banks` rewrites such a stack into that form before matching,
so that the bank's storage is ``stack([q_e])`` (computed once by the rewrite, :mod:`.fold`) and its
dequantization one of the usual weight forms. It touches only stacks along dim 0 whose every user gathers
experts from them (``bank[ids]``), and every value it computes is the value the graph computed before.
"""
from __future__ import annotations

import torch
from torch.fx import Node

from .dsl import Context
from .fold import mutates
from .replacement import Builder
from .spellings import canonical

aten = torch.ops.aten

#: elementwise kinds stacking commutes with, and the op emitted for the stacked operands
_ELEMENTWISE = {"mul": aten.mul.Tensor, "sub": aten.sub.Tensor, "add": aten.add.Tensor, "div": aten.div.Tensor}


def _gathered(bank: Node) -> bool:
    """Whether every user of ``bank`` gathers experts from it (``bank[ids]``), through casts and copies."""
    for user in bank.users:
        canon = canonical(user)
        if canon is None or canon.inputs[0] is not bank or canon.kind not in ("take", "convert", "noop") or \
                canon.kind != "take" and not _gathered(user):
            return False
    return True


class _Unstackable(Exception):
    pass


def _emit(ctx: Context, b: Builder, target, *args, **kwargs) -> Node:
    """``target(*args)`` as a node, its metadata computed in its inputs' own fake mode (the matching that
    follows reads the new nodes' shapes)."""
    vals = [[ctx.val(i) for i in a] if isinstance(a, list) else ctx.val(a) if isinstance(a, Node) else a for a in args]
    fakes = [v for a in vals for v in (a if isinstance(a, list) else [a]) if isinstance(v, torch.Tensor)]
    mode = getattr(fakes[0], "fake_mode", None) if fakes else None
    if mode is None:
        raise _Unstackable
    with mode:
        val = target(*vals, **kwargs)
    return b.call(target, *args, val=val, **kwargs)


def _hoist(ctx: Context, b: Builder, items: list) -> object:
    """One node computing ``stack(items)`` with the elementwise work common to ``items`` after the stack."""
    if all(not isinstance(i, Node) for i in items):
        if any(i != items[0] for i in items[1:]) or not isinstance(items[0], (int, float, bool)):
            raise _Unstackable
        return items[0]  # a constant every expert shares
    if not all(isinstance(i, Node) for i in items):
        raise _Unstackable
    shapes, dtypes = [ctx.shape(i) for i in items], [ctx.dtype(i) for i in items]
    if shapes[0] is None or any(s != shapes[0] for s in shapes) or any(d != dtypes[0] for d in dtypes):
        raise _Unstackable
    canons = [canonical(i) for i in items]
    kind = canons[0].kind if canons[0] is not None else None
    same = all(c is not None and c.kind == kind and c.params == canons[0].params and len(c.inputs) == len(canons[0].inputs)
               for c in canons) and all(len(i.users) == 1 for i in items)
    if same and kind in ("convert", "noop"):
        inner = _hoist(ctx, b, [c.inputs[0] for c in canons])
        if kind == "noop":
            return inner
        return _emit(ctx, b, aten._to_copy.default, inner, dtype=canons[0].params["dtype"])
    if same and kind in _ELEMENTWISE:
        operands = []
        for position in range(len(canons[0].inputs)):
            column = [c.inputs[position] for c in canons]
            stacked = _hoist(ctx, b, column)
            rank = ctx.shape(column[0]) if isinstance(column[0], Node) else None
            if isinstance(stacked, Node) and rank is not None and len(rank) < len(shapes[0]):
                # an operand of lower rank broadcast against each expert's value: [E, 1, .., *shape]
                stacked = _emit(ctx, b, aten.reshape.default, stacked,
                                 [len(items), *([1] * (len(shapes[0]) - len(rank))), *rank])
            operands.append(stacked)
        if not any(isinstance(o, Node) for o in operands):
            raise _Unstackable
        return _emit(ctx, b, _ELEMENTWISE[kind], *operands)
    # where the experts' computations differ or end: their values stacked
    return _emit(ctx, b, aten.stack.default, items, 0)


def hoist_stacked_banks(ctx: Context) -> None:
    """Rewrite every ``stack`` of per-expert dequantizations that is gathered by ids into the
    dequantization of stacked storages (module docstring). In place; the values are unchanged."""
    graph = ctx.gm.graph
    for node in list(graph.nodes):
        canon = canonical(node) if node.op in ("call_function", "call_method") else None
        if canon is None or canon.kind != "stack" or canon.params.get("dim") not in (0,) or not node.users or \
                not _gathered(node):
            continue
        items = list(canon.inputs[0])
        b = Builder(ctx, node, None)
        try:
            hoisted = _hoist(ctx, b, items)
        except _Unstackable:
            hoisted = None
        if not isinstance(hoisted, Node) or hoisted.target is aten.stack.default:
            for created in reversed(b.created):  # nothing common to hoist: the graph stays as it was
                graph.erase_node(created)
            continue
        node.replace_all_uses_with(hoisted)
        dead, erased = [node], set()
        while dead:  # the per-expert dequantizations nothing reads any more
            n = dead.pop()
            if n in erased or n.users or n.op not in ("call_function", "call_method") or mutates(n):
                continue
            dead.extend(n.all_input_nodes)
            graph.erase_node(n)
            erased.add(n)


__all__ = ["hoist_stacked_banks"]
