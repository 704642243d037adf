"""From a :class:`~.dsl.Match` to one ``torch.ops.xq.quantized_matmul`` node.

The match says where the integer weight, its scale and zero point live and in which layout they were
seen (:mod:`.dsl`); this module brings each to the op's layout (:mod:`xqpass.quant.layouts`) with
metadata-only views where it can (``reshape``, ``permute``, ``expand``) and elementwise work only where
the conventions differ (an integer zero point ``z`` becomes the op's ``z * scale``; a bias added before
a post-matmul scale becomes ``b * scale``). New nodes are aten ops, valid in torch-level and aten-level
graphs alike, and carry FakeTensor metadata.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.fx import Graph, Node

from ..ops import max_int32_reduction  # importing ..ops registers torch.ops.xq.quantized_matmul
from ..quant.layouts import PER_CHANNEL, WEIGHT_DTYPES, Layout
from .dsl import FLOAT8, KN, NK, Axes, Context, Factor, Match, same_shape, static
from .bounds import value_bounds
from .fold import Fold, Folds, Subgraph, attribute, state_subgraph, unpacks

aten = torch.ops.aten
OP = torch.ops.xq.quantized_matmul.default


class Rejected(Exception):
    """A match that the op cannot express exactly; the message is reported as a miss."""


def _fake_mode_for(values):
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    return detect_fake_mode(values) or FakeTensorMode(allow_non_fake_inputs=True)


# ----------------------------------------------------------------------------------------------
# the op's layouts: their shapes are the Layout's (xqpass.quant.layouts)


def _weight_to_op_layout(b: "Builder", w: Node, tags: Axes, n: int, k: int, layout: Layout) -> Node:
    """The storage ``w`` (with axis tags ``tags``) in ``layout`` by reshapes alone: per-channel and
    blockwise by rows ``[N, K]`` from storage with N first, the seed's blockwise ``[K/B, B, N]`` from
    storage with K first; never a per-call transpose of the weight, except for a per-channel weight
    stored ``[K, N]``."""
    if tags in (NK, ("N", "G", "g"), ("NG", "g"), ("B", "b", "G", "g")):
        return w if tags == NK else b.call(aten.reshape.default, w, list(layout.weight_shape(n, k)))
    if tags in (KN, ("G", "g", "N")) and not layout.packed:
        if layout.block_size == PER_CHANNEL:
            kn = w if tags == KN else b.call(aten.reshape.default, w, [k, n])
            return b.call(aten.t.default, kn)
        if tags == ("G", "g", "N") and same_shape(b.ctx.shape(w)[1:2], (layout.block_size,)):
            return w
        return b.call(aten.reshape.default, w, list(layout.weight_shape(n, k)))
    raise Rejected(f"weight storage layout {'x'.join(tags)} has no exact mapping to the op's layout")


#: the storages a weight unpacked in the graph is kept in, tightest first: (dtype, packed, value bounds)
_STORAGES = ((torch.int8, True, (-8, 7)), (torch.uint8, True, (0, 15)),
             (torch.int8, False, (-128, 127)), (torch.uint8, False, (0, 255)))


@dataclass
class _Storage:
    """The integer weight the op reads: dtype, packing, axis tags; for a weight the graph computes from the
    model's state (or reads in the order of a group index), the subgraph and its sources' values to
    compute it once (:mod:`.fold`)."""

    dtype: torch.dtype
    packed: bool
    tags: Axes
    subgraph: Subgraph | None = None
    values: list | None = None
    seen_tags: Axes = NK  # the computed weight's axis tags, before it is stored [N, K]
    k_index: Node | None = None  # the group index the input features are sorted by
    each_call: bool = False  # computed by the graph on every call: no values to compute it once here

    @classmethod
    def of(cls, ctx: Context, m: Match, k_index: Node | None) -> "_Storage":
        w = m.weight
        if not m.unpacked and k_index is None:
            return cls(ctx.dtype(w), m.packed, m.weight_layout)
        if m.packed:  # the op's nibbles, read in another order: unpacked by the graph's own ops
            raise Rejected("a packed weight read in the order of a group index")
        subgraph = state_subgraph(ctx, w)
        if isinstance(subgraph, str):
            raise Rejected(f"the weight {w.name} is an integer computed in the graph, but {subgraph}")
        if k_index is None and not unpacks(subgraph):
            raise Rejected(f"the weight {w.name} is a view or cast of stored integers, not the storage itself")
        if k_index is not None:
            order = state_subgraph(ctx, k_index)
            if isinstance(order, str):
                raise Rejected(f"the group index {k_index.name} is not the model's state: {order}")
            subgraph = subgraph | order
        values, unknown = _source_values(ctx, subgraph)
        if unknown:
            if ctx.dtype(w) in WEIGHT_DTYPES and k_index is None:  # nothing to compute it from: the graph keeps it
                return cls(ctx.dtype(w), False, m.weight_layout, each_call=True)
            raise Rejected(f"the weight {w.name} is {'unpacked in the graph' if m.unpacked else 'read by a group index'} "
                           f"from {', '.join(unknown)}, whose values are not known here: pass example_inputs (real "
                           f"tensors), or compile with an xqpass backend")
        lo, hi = value_bounds(ctx, w)  # an integer weight: bounds are proved (the dtype's at least)
        for dtype, packed, (low, high) in _STORAGES:
            if low <= lo and hi <= high:
                return cls(dtype, packed, NK, subgraph, values, m.weight_layout, k_index)
        raise Rejected(f"the weight {w.name} is unpacked in the graph into values not provably within int8 or "
                       f"uint8 (bounds proved: [{lo}, {hi}])")

    def compute(self, b: "Builder", w: Node, n: int, groups: int | None) -> Node:
        """Compute the weight once into a new buffer of the graph module; returns its ``get_attr`` node."""
        outputs = w if self.k_index is None else (w, self.k_index)
        fold = Fold.of(self.subgraph, outputs, kind="weight", tags=self.seen_tags, storage=self.dtype,
                       packed=self.packed, groups=groups, n=n)
        return b.computed_once(fold, w, self.subgraph, self.values)

    def order(self, b: "Builder", groups: int) -> Node:
        """The permutation sorting the input features by group, computed once (the activation's order)."""
        fold = Fold.of(self.subgraph, self.k_index, kind="order", groups=groups)
        return b.computed_once(fold, self.k_index, self.subgraph, self.values)


def _source_values(ctx: Context, subgraph: Subgraph) -> tuple[list, list]:
    """The real tensors of a subgraph's sources, and the names of those not known here (a graph traced
    with fake tensors) or not to be computed from once (``ctx.may_compute_once``: split over devices)."""
    values = [ctx.values.get(s) if s.op == "placeholder" else attribute(ctx.gm, str(s.target))
              for s in subgraph.sources]
    unknown = [s.name for s, v in zip(subgraph.sources, values)
               if not isinstance(v, torch.Tensor) or isinstance(v, torch._subclasses.FakeTensor)]
    if not unknown and ctx.may_compute_once is not None and not ctx.may_compute_once(values):
        unknown = [f"{', '.join(s.name for s in subgraph.sources)} (split over devices)"]
    return values, unknown


# ----------------------------------------------------------------------------------------------
# emitting nodes


class Builder:
    """Emits nodes before ``anchor`` and computes their metadata."""

    def __init__(self, ctx: Context, anchor: Node, device: torch.device | None):
        self.ctx = ctx
        self.device = device
        self.graph: Graph = anchor.graph
        self.anchor = anchor
        self.created: list[Node] = []

    def val(self, a: Any) -> Any:
        return self.ctx.val(a) if isinstance(a, Node) else a

    def call(self, target, *args, val: Any = None, **kwargs) -> Node:
        """``target(*args, **kwargs)`` as a node; its metadata is ``val`` when the caller knows it, else
        computed under the inputs' fake mode."""
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        self.created.append(node)
        if val is not None:
            node.meta["val"] = val
            return node
        vals = [self.val(a) for a in args]
        kvals = {k: self.val(v) for k, v in kwargs.items()}
        tensors = [v for v in (*vals, *kvals.values()) if isinstance(v, torch.Tensor)]
        try:
            mode = _fake_mode_for(tensors)
            with mode:
                conv = lambda v: mode.from_tensor(v) if isinstance(v, torch.Tensor) and not \
                    isinstance(v, torch._subclasses.FakeTensor) else v  # noqa: E731
                node.meta["val"] = target(*[conv(v) for v in vals], **{k: conv(v) for k, v in kvals.items()})
        except Exception:  # metadata is best effort; the graph is still right without it
            pass
        return node

    def computed_once(self, fold: Fold, node: Node, subgraph: Subgraph, values: list) -> Node:
        """``node``'s value computed once by ``fold``, as a ``get_attr`` of a new buffer of the graph module."""
        val, gm = self.ctx.val(node), self.ctx.gm
        name = Folds.of(gm).add(gm, fold, subgraph.sources, values, val.device)
        self.ctx.computed_once.update(subgraph.nodes)
        with self.graph.inserting_before(self.anchor):
            attr = self.graph.get_attr(name)
        self.created.append(attr)
        mode = getattr(val, "fake_mode", None) or _fake_mode_for([val])
        attr.meta["val"] = mode.from_tensor(getattr(gm, name))
        return attr

    def unpacked_once(self, node: Any) -> Any:
        """A scale or zero point the graph unpacks from the model's state (integer work on parameters and
        buffers only, e.g. zero points in int32 words) computed once, where its sources' values are known;
        else ``node`` itself."""
        if not isinstance(node, Node) or node.op in ("placeholder", "get_attr") or node in self.created:
            return node
        subgraph = state_subgraph(self.ctx, node)
        if isinstance(subgraph, str) or not unpacks(subgraph):
            return node
        values, unknown = _source_values(self.ctx, subgraph)
        if unknown:
            return node
        return self.computed_once(Fold.of(subgraph, node), node, subgraph, values)

    def full(self, shape: list, value: float) -> Node:
        """A constant made on the activation's device (a CPU constant would not mix with XLA tensors)."""
        return self.call(aten.full.default, shape, value, dtype=torch.float32, device=self.device)

    def vector(self, node: Node, padded: tuple, tags: Axes, n: int, k: int, layout: Layout) -> Node:
        """A scale / zero point tensor seen with ``padded`` shape against a weight of axis tags ``tags``,
        as the op's ``layout.scale_shape(n, k)``."""
        want = list(layout.scale_shape(n, k))
        if tuple(self.ctx.shape(node) or ()) != tuple(padded):
            node = self.call(aten.reshape.default, node, [static(s) for s in padded])
        axes = [tags.index(t) for t in layout.scale_axes if t in tags]
        perm = axes + [i for i in range(len(tags)) if i not in axes]
        if perm != list(range(len(tags))):
            node = self.call(aten.permute.default, node, perm)
        # the op's axes, a 1 where the factor was seen without one (broadcast below)
        keep = [static(padded[tags.index(t)]) if t in tags else 1 for t in layout.scale_axes]
        if keep != [static(padded[i]) for i in perm]:
            node = self.call(aten.reshape.default, node, keep)
        if keep != want:  # broadcast along what does not vary
            node = self.call(aten.expand.default, node, want)
        return node

    def last_dim_vector(self, operand: Any, n: int) -> Any:
        """A vector that varies along the output's last dim only (post-matmul scale, bias), as ``[N]``."""
        if not isinstance(operand, Node):
            return self.full([n], float(operand))
        shape = self.ctx.shape(operand)
        node = operand
        if len(shape) != 1:
            node = self.call(aten.reshape.default, node, [-1])
        if static(shape[-1] if shape else 1) != n:
            node = self.call(aten.expand.default, node, [n])
        return node


GROUPED = torch.ops.xq.quantized_grouped_matmul.default


def build_grouped_call(ctx: Context, root: Node, m: Match) -> tuple[Node, dict]:
    """Emit the grouped op call equivalent to ``root``, a product with an expert bank's weights gathered by
    ``m.expert_ids``: the bank as stored ``[E, N, K]``, per-expert per-channel scales ``[E, N]``."""
    x, w, ids = m.activation, m.weight, m.expert_ids
    bank, out_shape, x_shape = ctx.shape(w), ctx.shape(root), ctx.shape(x)
    if m.weight_layout != ("E", "N", "K") or m.packed or ctx.dtype(w) not in WEIGHT_DTYPES:
        raise Rejected("an expert bank the grouped op reads is stored [E, N, K] (int8, uint8 or float8)")
    if bank is None or out_shape is None or x_shape is None or any(static(d) is None for d in bank):
        raise Rejected("no static shapes for the expert bank")
    e, n, k = (static(d) for d in bank)
    for f in (m.scale, m.zero):
        if f is not None and f.granularity not in ("tensor", "channel"):
            raise Rejected(f"{f.granularity} scales of an expert bank (per expert and channel only)")
    if m.quantize_activation or m.bias is not None:
        raise Rejected("an expert bank with activation quantization or a bias")
    if ctx.dtype(w) in FLOAT8 and m.zero is not None:
        raise Rejected(f"a zero point with a {ctx.dtype(w)} weight (float8 weights are symmetric in the op)")
    reason = ctx.from_activation(w, x, f"the weight {w.name}")
    if reason:
        raise Rejected(reason)
    x_val = ctx.val(x)
    b = Builder(ctx, root, x_val.device if isinstance(x_val, torch.Tensor) else None)
    if m.unpacked:  # a bank the graph assembles from the model's state (experts stacked): computed once
        subgraph = state_subgraph(ctx, w)
        if isinstance(subgraph, str):
            raise Rejected(f"the expert bank {w.name} is computed in the graph, but {subgraph}")
        values, unknown = _source_values(ctx, subgraph)
        if not unknown:  # else the graph assembles it on each call, as it did
            w = b.computed_once(Fold.of(subgraph, w), w, subgraph, values)

    def per_expert(factor: Factor) -> Node:
        value = factor.value
        if not isinstance(value, Node):
            return b.full([e, n], float(value))
        if factor.granularity == "tensor":
            return b.call(aten.expand.default, b.call(aten.reshape.default, value, []), [e, n])
        tags, padded = factor.layout, factor.padded  # (E, N, K) with 1s where it does not vary
        keep = [static(padded[tags.index(t)]) for t in ("E", "N")]
        return b.call(aten.expand.default, b.call(aten.reshape.default, b.unpacked_once(value), keep), [e, n])

    if m.post_scale is not None:
        scale = m.post_scale
    elif m.scale is not None:
        scale = per_expert(m.scale)
    else:
        scale = b.full([e, n], 1.0)
    zero = None
    if m.zero is not None and m.zero.value is not None:
        zero = per_expert(m.zero)
        if m.zero_kind == "int":
            zero = b.call(aten.mul.Tensor, zero, scale)
    rows, row_ids = x, ids
    if m.expert_rows:  # a row of x per (token, slot): the op's rows, one expert each
        rows = b.call(aten.reshape.default, x, [-1, k])
        row_ids = b.call(aten.reshape.default, ids, [-1])
    root_val, x_dtype, out_dtype = ctx.val(root), ctx.dtype(x), ctx.dtype(root)
    call = b.call(GROUPED, rows, row_ids, w, scale, zero, PER_CHANNEL, False, None, packed=False)
    result = call
    if m.expert_rows or len(ctx.shape(ids)) + 1 != len(out_shape):  # ids [T, k] for rows [T * k, N]
        result = b.call(aten.reshape.default, call, [static(d) if static(d) is not None else -1 for d in out_shape])
    if out_dtype is not None and out_dtype != x_dtype:
        result = b.call(aten._to_copy.default, result, dtype=out_dtype, val=root_val)
    wdt = ctx.dtype(w)
    desc = {"bits": 8, "block_n": 1, "weight_dtype": str(wdt).replace("torch.", ""), "layout": Layout(),
            "block_size": PER_CHANNEL, "zero_point": zero is not None, "packed": False, "experts": e,
            "quantize_activation": False, "by_rows": False, "N": n, "K": k}
    return result, desc


def build_call(ctx: Context, root: Node, m: Match) -> tuple[Node, dict]:
    """Emit the op call equivalent to ``root``; returns the node and a description of the format."""
    if m.expert_ids is not None:
        return build_grouped_call(ctx, root, m)
    x, w, packed = m.activation, m.weight, m.packed
    out_shape, x_shape = ctx.shape(root), ctx.shape(x)
    if out_shape is None or x_shape is None:
        raise Rejected("no shape metadata")
    n, k = static(out_shape[-1]), static(x_shape[-1])
    if n is None or k is None:
        raise Rejected("symbolic K or N (weights must have static shapes)")
    if not same_shape(out_shape[:-1], x_shape[:-1]):
        raise Rejected(f"output {list(out_shape)} does not keep the activation's leading dims {list(x_shape)}")
    reason = ctx.from_activation(w, x, f"the weight {getattr(w, 'name', w)}")
    if reason:
        raise Rejected(reason)

    grouped = [f for f in (m.scale, m.zero) if f is not None and f.granularity == "group"]
    groups, k_index = None, None
    if grouped:
        counts = {static(f.padded[f.layout.index("G")]) if "G" in f.layout else
                  static(f.padded[f.layout.index("NG")]) // n for f in grouped}
        groups = counts.pop()
        if counts or len({f.k_index for f in grouped}) > 1:
            raise Rejected("the scale and the zero point split K into different groups")
        if groups is None or k % groups:
            raise Rejected("groups do not divide K")
        k_index = grouped[0].k_index
    blocks = [f for f in (m.scale, m.zero) if f is not None and f.granularity == "block"]
    block_n = 1
    if blocks:  # 2-D blocks: [N/b, b, K/g, g] views of a float8 weight
        (f,) = blocks
        rows, groups = static(f.padded[f.layout.index("B")]), static(f.padded[f.layout.index("G")])
        if grouped or rows is None or groups is None or n % rows or k % groups:
            raise Rejected("2-D blocks that do not tile the weight")
        block_n = n // rows
    storage = _Storage.of(ctx, m, k_index)
    packed = storage.packed
    if storage.dtype in FLOAT8 and m.zero is not None:
        raise Rejected(f"a zero point with a {storage.dtype} weight (float8 weights are symmetric in the op)")
    if blocks and storage.dtype not in FLOAT8:
        raise Rejected(f"2-D blocks of scales are for float8 weights, not {storage.dtype}")
    if storage.subgraph is not None and packed and (k % 2 or groups is not None and (k // groups) % 2):
        packed = storage.packed = False  # an odd K or group: one value a byte
    by_rows = groups is not None and storage.tags[0] in ("N", "NG", "B")  # storage with N first keeps its order
    try:
        layout = Layout(PER_CHANNEL if groups is None else k // groups, by_rows, packed, block_n)
    except ValueError as e:  # packed int4 with an odd group
        raise Rejected(str(e)) from None
    if k % layout.k_unit:
        raise Rejected(f"K={k} is not a multiple of {layout.k_unit} (packed int4 holds two values a byte)")
    if m.quantize_activation:
        bound = max_int32_reduction(storage.dtype, packed)
        if layout.group_size(k) > bound:
            raise Rejected(f"an int32 dot of length {layout.group_size(k)} could overflow (bound {bound})")

    x_val = ctx.val(x)
    b = Builder(ctx, root, x_val.device if isinstance(x_val, torch.Tensor) else None)
    if storage.subgraph is not None:  # the last step that can refuse is behind: compute the weight once
        try:
            w = storage.compute(b, w, n, groups)
        except ValueError as e:  # a group index with groups of unequal size
            raise Rejected(str(e).removeprefix("xqpass: ")) from None
    if k_index is not None:  # the op reads x's features sorted by group, as the weight is stored
        x = b.call(aten.index_select.default, x, -1, storage.order(b, groups))
    weight = _weight_to_op_layout(b, w, storage.tags, n, k, layout)
    want = list(layout.scale_shape(n, k))

    def vec(factor: Factor) -> Node:
        if factor.inverse:  # w / s: the op multiplies by 1 / s (one rounding of the scale, not of each weight)
            value = 1.0 / factor.value if not isinstance(factor.value, Node) else \
                b.call(aten.reciprocal.default, b.unpacked_once(factor.value))
            factor = replace(factor, value=value, inverse=False)
        if factor.granularity == "block":  # [N/b, 1, K/g, 1] (1s where it does not vary): the op's [N/b, K/g]
            value = factor.value
            return b.call(aten.expand.default, b.call(aten.reshape.default, value, [
                static(factor.padded[factor.layout.index(t)]) for t in ("B", "G")]), want)
        if factor.granularity == "tensor":  # one value: broadcast it
            if not isinstance(factor.value, Node):
                return b.full(want, float(factor.value))
            return b.call(aten.expand.default, b.call(aten.reshape.default, factor.value, []), want)
        value, padded, tags = b.unpacked_once(factor.value), factor.padded, factor.layout
        if "NG" in tags:  # flat groups: the merged axis split into N and G
            i = tags.index("NG")
            padded = padded[:i] + (n, static(padded[i]) // n) + padded[i + 1:]
            tags = tags[:i] + ("N", "G") + tags[i + 1:]
        return b.vector(value, padded, tags, n, k, layout)  # reshapes value to padded

    if m.post_scale is not None:
        scale = b.last_dim_vector(m.post_scale, n)
    elif m.scale is not None:
        scale = vec(m.scale)
    else:
        scale = b.full(want, 1.0)

    zero = None
    if m.zero is not None and m.zero.value is not None:
        zero = vec(m.zero)
        if m.zero_kind == "int":  # (q - z) * s  ==  q * s - z * s  (an integer z promotes to float)
            zero = b.call(aten.mul.Tensor, zero, scale)

    bias = None
    if m.bias is not None:
        bias = b.last_dim_vector(m.bias, n)
        if m.bias_before_scale:
            bias = b.call(aten.mul.Tensor, bias, scale)

    # the op returns the activation's dtype in the root's shape: its metadata is the root's, recast
    root_val, x_dtype, out_dtype = ctx.val(root), ctx.dtype(x), ctx.dtype(root)
    op_val = None
    if isinstance(root_val, torch.Tensor) and x_dtype is not None:
        op_val = root_val if root_val.dtype == x_dtype else root_val.to(x_dtype)
    extra = {"block_n": block_n} if block_n != 1 else {}
    call = b.call(OP, x, weight, scale, zero, layout.block_size, packed, m.quantize_activation, bias,
                  packed=packed, val=op_val, **extra)
    result = call
    if out_dtype is not None and out_dtype != x_dtype:
        result = b.call(aten._to_copy.default, call, dtype=out_dtype, val=root_val)
    wdt = storage.dtype
    desc = {
        "bits": 4 if packed else 8,
        "block_n": block_n,
        "weight_dtype": str(wdt).replace("torch.", "") if wdt else "?",
        "layout": layout,
        "block_size": layout.block_size,
        "zero_point": zero is not None,
        "packed": packed,
        "unpacked_once": storage.subgraph is not None,
        "group_index": k_index is not None,
        "unpacked_each_call": storage.each_call,
        "quantize_activation": m.quantize_activation,
        "by_rows": layout.by_rows,
        "N": n,
        "K": k,
    }
    return result, desc
