"""From a match's bindings to one ``torch.ops.xq.quantized_matmul`` node.

The bindings say where the integer weight, its scale and zero point live and in which layout they were
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
from .dsl import Context, State, same_shape, static

aten = torch.ops.aten
OP = torch.ops.xq.quantized_matmul.default


class Rejected(Exception):
    """A match that the op cannot express exactly; the message is reported as a miss."""


def _fake_mode_for(values):
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    return detect_fake_mode(values) or FakeTensorMode(allow_non_fake_inputs=True)


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

    def call(self, target, *args, **kwargs) -> Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        self.created.append(node)
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
        want = [n] if groups is None else ([n, groups] if by_rows else [groups, n])
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


def _weight_to_op_layout(b: Builder, w: Node, layout: tuple, n: int, k: int, group: int | None,
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


def build_call(ctx: Context, root: Node, st: State) -> tuple[Node, dict]:
    """Emit the op call equivalent to ``root``; returns the node and a description of the format."""
    m = st.as_dict()
    x, w, packed = m["x"], m["w"], m.get("packed", False)
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

    scale_gran = m.get("scale_gran", ("tensor", ()))
    zero_gran = m.get("zero_gran", ("tensor", ()))
    kinds = {scale_gran[0], zero_gran[0] if "zero" in m else "tensor"}
    group_layout = None
    groups = None
    if "group" in kinds:
        group_layout = m["scale_layout"] if scale_gran[0] == "group" else m["zero_layout"]
        padded = scale_gran[1] if scale_gran[0] == "group" else zero_gran[1]
        groups = static(padded[group_layout.index("G")])
        if groups is None or k % groups:
            raise Rejected("groups do not divide K")
    group = None if groups is None else k // groups
    if packed and (k % 2 or (group is not None and group % 2)):
        raise Rejected("packed int4 with an odd K or group")

    x_val = ctx.val(x)
    b = Builder(ctx, root, x_val.device if isinstance(x_val, torch.Tensor) else None)
    weight, by_rows = _weight_to_op_layout(b, w, m["w_layout"], n, k, group, packed)

    def vec(name):
        operand, (gran, padded), layout = m[name], m[f"{name}_gran"], m[f"{name}_layout"]
        if gran == "tensor":  # one value: broadcast it
            want = [n] if groups is None else ([n, groups] if by_rows else [groups, n])
            if not isinstance(operand, Node):
                return b.full(want, float(operand))
            return b.call(aten.expand.default, b.call(aten.reshape.default, operand, []), want)
        return b.vector(operand, padded, layout, n, groups, by_rows)

    if "post_scale" in m:
        scale = b.last_dim_vector(m["post_scale"], n)
    elif "scale" in m:
        scale = vec("scale")
    else:
        scale = b.full([n] if groups is None else ([n, groups] if by_rows else [groups, n]), 1.0)

    zero = None
    if "zero" in m and m["zero"] is not None:
        zero = vec("zero")
        if m.get("zero_kind") == "int":  # (q - z) * s  ==  q * s - z * s  (an integer z promotes to float)
            zero = b.call(aten.mul.Tensor, zero, scale)

    bias = m.get("bias")
    if bias is None:
        bias = m.get("post_bias")
    if bias is not None:
        bias = b.last_dim_vector(bias, n)
        if m.get("bias_before_scale"):
            bias = b.call(aten.mul.Tensor, bias, scale)

    quantize_activation = bool(m.get("quantize_activation", False))
    if quantize_activation:
        bound = max_int32_reduction(ctx.dtype(w), packed)
        if (k if group is None else group) > bound:
            raise Rejected(f"an int32 dot of length {k if group is None else group} could overflow (bound {bound})")
    call = b.call(OP, x, weight, scale, zero, -1 if group is None else group, packed, quantize_activation, bias,
                  packed=packed)
    out_dtype, x_dtype = ctx.dtype(root), ctx.dtype(x)
    result = call
    if out_dtype is not None and out_dtype != x_dtype:
        result = b.call(aten._to_copy.default, call, dtype=out_dtype)
    wdt = ctx.dtype(w)
    desc = {
        "bits": 4 if packed else 8,
        "weight_dtype": str(wdt).replace("torch.", "") if wdt else "?",
        "block_size": -1 if group is None else group,
        "zero_point": zero is not None,
        "packed": packed,
        "quantize_activation": quantize_activation,
        "by_rows": by_rows,
        "N": n,
        "K": k,
    }
    return result, desc
