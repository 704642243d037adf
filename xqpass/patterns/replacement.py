"""From a :class:`~.dsl.Match` to one ``torch.ops.xq.quantized_matmul`` node.

The match says where the integer weight, its scale and zero point live and in which layout they were
seen (:mod:`.dsl`); this module brings each to the op's layout (:mod:`xqpass.quant.layouts`) with
metadata-only views where it can (``reshape``, ``permute``, ``expand``) and elementwise work only where
the conventions differ (an integer zero point ``z`` becomes the op's ``z * scale``; a bias added before
a post-matmul scale becomes ``b * scale``). New nodes are aten ops, valid in torch-level and aten-level
graphs alike, and carry FakeTensor metadata.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.fx import Graph, Node

from ..ops import max_int32_reduction  # importing ..ops registers torch.ops.xq.quantized_matmul
from .dsl import Context, Factor, Match, same_shape, static

aten = torch.ops.aten
OP = torch.ops.xq.quantized_matmul.default


class Rejected(Exception):
    """A match that the op cannot express exactly; the message is reported as a miss."""


def _fake_mode_for(values):
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    return detect_fake_mode(values) or FakeTensorMode(allow_non_fake_inputs=True)


# ----------------------------------------------------------------------------------------------
# the op's layouts: every shape the replacement asks for is decided here


def op_scale_shape(n: int, groups: int | None, by_rows: bool) -> list[int]:
    """The op's scale / zero point: ``[N]`` per channel, ``[G, N]`` blockwise, ``[N, G]`` blockwise by rows."""
    return [n] if groups is None else ([n, groups] if by_rows else [groups, n])


def _weight_to_op_layout(b: "Builder", w: Node, layout: tuple, n: int, k: int, group: int | None,
                         packed: bool) -> tuple[Node, bool]:
    """The storage ``w`` (with axis tags ``layout``) in an op layout reachable by reshapes alone:
    per-channel ``[N, K]``, blockwise by rows ``[N, K]`` (storage with N first) or the seed's blockwise
    ``[K/B, B, N]`` (storage with K first). Returns ``(weight, by_rows)``; never a per-call transpose
    of the weight, except for a per-channel weight stored ``[K, N]``."""
    pack = 2 if packed else 1
    if layout in (("N", "K"), ("N", "G", "g")):
        nk = w if layout == ("N", "K") else b.call(aten.reshape.default, w, [n, k // pack])
        return nk, group is not None
    if layout in (("K", "N"), ("G", "g", "N")) and not packed:
        if group is None:
            kn = w if layout == ("K", "N") else b.call(aten.reshape.default, w, [k, n])
            return b.call(aten.t.default, kn), False
        if layout == ("G", "g", "N") and same_shape(b.ctx.shape(w)[1:2], (group,)):
            return w, False
        return b.call(aten.reshape.default, w, [k // group, group, n]), False
    raise Rejected(f"weight storage layout {'x'.join(layout)} has no exact mapping to the op's layout")


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

    def full(self, shape: list, value: float) -> Node:
        """A constant made on the activation's device (a CPU constant would not mix with XLA tensors)."""
        return self.call(aten.full.default, shape, value, dtype=torch.float32, device=self.device)

    def vector(self, node: Node, padded: tuple, layout: tuple, n: int, groups: int | None,
               by_rows: bool = False) -> Node:
        """A scale / zero point tensor seen with ``padded`` shape against a weight of axis tags ``layout``,
        as the op's ``[N]`` (``groups is None``), ``[G, N]`` or, blockwise by rows, ``[N, G]``."""
        want = op_scale_shape(n, groups, by_rows)
        if tuple(self.ctx.shape(node)) != tuple(padded):
            node = self.call(aten.reshape.default, node, [static(s) for s in padded])
        g_axis = [layout.index("G")] if groups is not None and "G" in layout else []
        axes = [layout.index("N")] + g_axis if by_rows else g_axis + [layout.index("N")]
        perm = axes + [i for i in range(len(layout)) if i not in axes]
        if perm != list(range(len(layout))):
            node = self.call(aten.permute.default, node, perm)
        keep = [static(padded[i]) for i in axes]
        if len(keep) != len(padded):
            node = self.call(aten.reshape.default, node, keep)
        if keep != want:  # broadcast along what does not vary
            if by_rows and groups is not None and not g_axis:  # [N] -> [N, 1] -> [N, G]
                node = self.call(aten.reshape.default, node, [n, 1])
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


def build_call(ctx: Context, root: Node, m: Match) -> tuple[Node, dict]:
    """Emit the op call equivalent to ``root``; returns the node and a description of the format."""
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
    groups = None
    if grouped:
        groups = static(grouped[0].padded[grouped[0].layout.index("G")])
        if groups is None or k % groups:
            raise Rejected("groups do not divide K")
    group = None if groups is None else k // groups
    if packed and (k % 2 or (group is not None and group % 2)):
        raise Rejected("packed int4 with an odd K or group")

    x_val = ctx.val(x)
    b = Builder(ctx, root, x_val.device if isinstance(x_val, torch.Tensor) else None)
    weight, by_rows = _weight_to_op_layout(b, w, m.weight_layout, n, k, group, packed)
    want = op_scale_shape(n, groups, by_rows)

    def vec(factor: Factor) -> Node:
        if factor.granularity == "tensor":  # one value: broadcast it
            if not isinstance(factor.value, Node):
                return b.full(want, float(factor.value))
            return b.call(aten.expand.default, b.call(aten.reshape.default, factor.value, []), want)
        return b.vector(factor.value, factor.padded, factor.layout, n, groups, by_rows)

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

    if m.quantize_activation:
        bound = max_int32_reduction(ctx.dtype(w), packed)
        if (k if group is None else group) > bound:
            raise Rejected(f"an int32 dot of length {k if group is None else group} could overflow (bound {bound})")
    # the op returns the activation's dtype in the root's shape: its metadata is the root's, recast
    root_val, x_dtype, out_dtype = ctx.val(root), ctx.dtype(x), ctx.dtype(root)
    op_val = None
    if isinstance(root_val, torch.Tensor) and x_dtype is not None:
        op_val = root_val if root_val.dtype == x_dtype else root_val.to(x_dtype)
    call = b.call(OP, x, weight, scale, zero, -1 if group is None else group, packed, m.quantize_activation, bias,
                  packed=packed, val=op_val)
    result = call
    if out_dtype is not None and out_dtype != x_dtype:
        result = b.call(aten._to_copy.default, call, dtype=out_dtype, val=root_val)
    wdt = ctx.dtype(w)
    desc = {
        "bits": 4 if packed else 8,
        "weight_dtype": str(wdt).replace("torch.", "") if wdt else "?",
        "block_size": -1 if group is None else group,
        "zero_point": zero is not None,
        "packed": packed,
        "quantize_activation": m.quantize_activation,
        "by_rows": by_rows,
        "N": n,
        "K": k,
    }
    return result, desc
