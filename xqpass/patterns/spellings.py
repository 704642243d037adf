"""One vocabulary for the many spellings of an op in captured graphs.

A torch-level graph (Dynamo, ``symbolic_trace``) spells a cast ``x.to(dt)``, ``x.float()``,
``torch.Tensor.to``; an aten-level graph (AOT, ``torch.export``) spells it ``aten._to_copy``,
``aten.to.dtype``, ``prims.convert_element_type``. :func:`canonical` maps a node to one
:class:`Canon` (a kind, its tensor/constant operands in a fixed order, and its parameters), so the
patterns in :mod:`xqpass.patterns.catalogue` are written once against kinds, never against
spellings. A node whose spelling is not known (or whose extra parameters change its meaning, such as
``alpha != 1``) maps to ``None`` and matches nothing.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.fx import Node

aten = torch.ops.aten
prims = torch.ops.prims


@dataclass(frozen=True)
class Canon:
    kind: str  # see KINDS
    inputs: tuple  # operands: Nodes or Python constants, in the kind's canonical order
    params: dict = field(default_factory=dict)


KINDS = (
    "convert",  # (src,) {dtype}
    "transpose",  # (src,) {dims: (a, b)}  swap two dims
    "permute",  # (src,) {dims}
    "reshape",  # (src,)  any view / reshape / unsqueeze / squeeze / flatten; result shape from metadata
    "expand",  # (src,)  broadcast to the node's shape
    "noop",  # (src,)  clone / contiguous / detach / alias: value unchanged
    "mul", "add", "sub", "div",  # (a, b)  tensors or scalars
    "linear",  # (x, w, bias-or-None)
    "matmul",  # (a, b)  matmul / mm / bmm / @
    "addmm",  # (bias, a, b)
    "bitand", "rshift", "lshift",  # (a, b)
    "stack", "cat",  # (tensors-tuple,) {dim}
    "round", "abs",  # (src,)
    "clamp",  # (src,) {min, max}
    "amax", "amin",  # (src,) {dim, keepdim}
    "maximum", "minimum",  # (a, b) elementwise
    "neg", "reciprocal",  # (src,)
    "zeros_like",  # (src,)  zeros of src's shape (zeros_like, full_like(src, 0))
    "dequantize_per_channel",  # (w, scales, zero_points, axis) {dtype: storage dtype, out_dtype}
    "dequantize_per_tensor",  # (w, scale, zero_point) {dtype, out_dtype}
    "scaled_linear",  # (x, w, s): x @ (s * w).t() in one library op, x cast to s's dtype
    "take",  # (src, index)  src[index] along dim 0, index an integer tensor (expert weights by id)
    "grouped_mm",  # (x, w, offs)  rows of x [S, K] in groups by offs, group e times w[e] [K, N]
    "einsum",  # (operands-tuple,) {equation}
)


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """A call's argument by position, else by name (the patterns read ops' parameters the same way)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _method_dtype(name: str) -> Callable[[Node], Any]:
    dtype = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16,
             "int": torch.int32, "long": torch.int64, "short": torch.int16, "char": torch.int8, "byte": torch.uint8}[name]
    return lambda node: dtype


def _to_dtype(node: Node) -> Any:
    """dtype of ``x.to(...)`` / ``torch.Tensor.to``; None if it is not a pure dtype cast."""
    for a in (*node.args[1:], node.kwargs.get("dtype")):
        if isinstance(a, torch.dtype):
            return a
        if isinstance(a, Node):  # x.to(other.dtype) traced by symbolic_trace: getattr(other, "dtype")
            if a.op == "call_function" and a.target is getattr and a.args[1:] == ("dtype",):
                return _DtypeOf(a.args[0])
    return None


@dataclass(frozen=True)
class _DtypeOf:
    """The dtype of another node's value (``x.to(y.dtype)``), resolved from metadata."""

    node: Node


def _binary(kind: str, alpha_ok: bool = False):
    def make(node: Node):
        if alpha_ok and arg(node, 2, "alpha", 1) != 1:
            return None
        return Canon(kind, (node.args[0], node.args[1]))

    return make


def _rsub(node: Node):
    if arg(node, 2, "alpha", 1) != 1:
        return None
    return Canon("sub", (node.args[1], node.args[0]))


def _convert(dtype_of: Callable[[Node], Any]):
    def make(node: Node):
        dtype = dtype_of(node)
        if dtype is None:
            return None
        return Canon("convert", (node.args[0],), {"dtype": dtype})

    return make


def _to_copy(node: Node):
    dtype = node.kwargs.get("dtype")
    extra = set(node.kwargs) - {"dtype", "layout", "device", "pin_memory", "non_blocking", "memory_format"}
    if dtype is None or extra:
        return None
    return Canon("convert", (node.args[0],), {"dtype": dtype})


def _transpose(node: Node):
    a, b = arg(node, 1, "dim0", 0), arg(node, 2, "dim1", 1)
    return Canon("transpose", (node.args[0],), {"dims": (a, b)})


def _t(node: Node):
    return Canon("transpose", (node.args[0],), {"dims": (-2, -1)})


def _permute(node: Node):
    dims = node.args[1:] if node.op == "call_method" and len(node.args) > 2 else arg(node, 1, "dims")
    if isinstance(dims, int):
        dims = (dims,)
    return Canon("permute", (node.args[0],), {"dims": tuple(dims)})


def _unary(kind: str):
    return lambda node: Canon(kind, (node.args[0],))


def _getattr(node: Node):
    if node.args[1] in ("T", "mT"):
        return Canon("transpose", (node.args[0],), {"dims": (-2, -1)})
    return None


def _getitem(node: Node):
    """``s[:, None]`` and friends (only full slices, None and Ellipsis: a pure reshape), and
    ``x.max(dim)[0]``."""
    src, index = node.args
    if index == 0:
        return _max_values(node)
    if not isinstance(src, Node):
        return None
    if isinstance(index, Node):  # bank[expert_ids]: rows of dim 0 by an index tensor
        return Canon("take", (src, index))
    index = index if isinstance(index, tuple) else (index,)
    for i in index:
        if not (i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None, None, None))):
            return None
    return Canon("reshape", (src,))


def _grouped_mm(node: Node):
    offs = arg(node, 2, "offs")
    if arg(node, 3, "bias") is not None or arg(node, 4, "out_dtype") is not None or not isinstance(offs, Node):
        return None
    return Canon("grouped_mm", (node.args[0], node.args[1], offs))


def _einsum(node: Node):
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    if not isinstance(equation, str):
        return None
    return Canon("einsum", (tuple(operands),), {"equation": equation.replace(" ", "")})


def _linear(node: Node):
    return Canon("linear", (node.args[0], node.args[1], arg(node, 2, "bias")))


def _addmm(node: Node):
    if arg(node, 3, "beta", 1) != 1 or arg(node, 4, "alpha", 1) != 1:
        return None
    return Canon("addmm", (node.args[0], node.args[1], node.args[2]))


def _list_op(kind: str):
    def make(node: Node):
        tensors = arg(node, 0, "tensors")
        return Canon(kind, (tuple(tensors),), {"dim": arg(node, 1, "dim", 0)})

    return make


def _clamp(node: Node):
    return Canon("clamp", (node.args[0],), {"min": arg(node, 1, "min"), "max": arg(node, 2, "max")})


def _reduce(kind: str):
    def make(node: Node):
        dim = arg(node, 1, "dim", ())
        dim = tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)
        return Canon(kind, (node.args[0],), {"dim": dim, "keepdim": bool(arg(node, 2, "keepdim", False))})

    return make


_amax = _reduce("amax")


def _full_like(node: Node):
    return Canon("zeros_like", (node.args[0],)) if arg(node, 1, "fill_value") == 0 else None


def _max_values(node: Node):
    """``x.max(dim, keepdim=True)[0]`` / ``.values``: getitem 0 of a max over a dim."""
    src, index = node.args
    if index != 0 or not isinstance(src, Node):
        return None
    if not (src.op == "call_method" and src.target == "max" or src.op == "call_function" and src.target in
            (torch.max, *_ops("aten.max.dim"))):
        return None
    dim = arg(src, 1, "dim")
    if dim is None:
        return None
    return Canon("amax", (src.args[0],), {"dim": (dim,), "keepdim": bool(arg(src, 2, "keepdim", False))})


def _dq_per_channel(node: Node):
    w, scales, zps, axis = node.args[:4]
    return Canon("dequantize_per_channel", (w, scales, zps, axis),
                 {"dtype": node.args[6] if len(node.args) > 6 else node.kwargs.get("dtype"),
                  "out_dtype": node.kwargs.get("out_dtype") or torch.float32})


def _dq_per_tensor(node: Node):
    w, scale, zp = node.args[:3]
    return Canon("dequantize_per_tensor", (w, scale, zp),
                 {"dtype": node.args[5] if len(node.args) > 5 else node.kwargs.get("dtype"),
                  "out_dtype": node.kwargs.get("out_dtype") or torch.float32})


_FUNCTIONS: dict[Any, Callable[[Node], Canon | None]] = {}
_METHODS: dict[str, Callable[[Node], Canon | None]] = {}


def _register(table, keys, make):
    for k in keys:
        table[k] = make


def _ops(*names):
    """Overloads (and their packets) of aten / prims / quantized_decomposed ops in this torch."""
    found = []
    for name in names:
        ns, _, rest = name.partition(".")
        packet_name, _, overload = rest.partition(".")
        try:
            packet = getattr(getattr(torch.ops, ns), packet_name)
            found.append(getattr(packet, overload or "default"))
            found.append(packet)  # torch-level graphs may call the packet itself
        except (AttributeError, RuntimeError):
            pass
    return found


_register(_FUNCTIONS, [torch.Tensor.to], _convert(_to_dtype))
_register(_FUNCTIONS, _ops("aten._to_copy"), _to_copy)
_register(_FUNCTIONS, _ops("aten.to.dtype", "prims.convert_element_type"), _convert(lambda n: arg(n, 1, "dtype")))
_register(_FUNCTIONS, [torch.t, *_ops("aten.t", "aten.numpy_T")], _t)
_register(_FUNCTIONS, [torch.transpose, *_ops("aten.transpose.int")], _transpose)
_register(_FUNCTIONS, [torch.permute, *_ops("aten.permute")], _permute)
_register(_FUNCTIONS, [getattr], _getattr)
_register(_FUNCTIONS, [operator.getitem], _getitem)
_register(_FUNCTIONS, [torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten,
                       *_ops("aten.view", "aten._unsafe_view", "aten.reshape", "aten.unsqueeze",
                             "aten.squeeze.dim", "aten.squeeze", "aten.flatten.using_ints",
                             "aten.unflatten.int")], _unary("reshape"))
_register(_FUNCTIONS, _ops("aten.expand"), _unary("expand"))
_register(_FUNCTIONS, [torch.clone, *_ops("aten.clone", "aten.alias", "aten.detach", "aten.contiguous",
                                          "aten.lift_fresh_copy")], _unary("noop"))
_register(_FUNCTIONS, [operator.mul, torch.mul, *_ops("aten.mul.Tensor", "aten.mul.Scalar")], _binary("mul"))
_register(_FUNCTIONS, [operator.truediv, torch.div, *_ops("aten.div.Tensor", "aten.div.Scalar")],
          lambda n: None if arg(n, 2, "rounding_mode") is not None else Canon("div", (n.args[0], n.args[1])))
_register(_FUNCTIONS, [operator.add, torch.add, *_ops("aten.add.Tensor", "aten.add.Scalar")], _binary("add", True))
_register(_FUNCTIONS, [operator.sub, torch.sub, *_ops("aten.sub.Tensor", "aten.sub.Scalar")], _binary("sub", True))
_register(_FUNCTIONS, [torch.rsub, *_ops("aten.rsub.Tensor", "aten.rsub.Scalar")], _rsub)
_register(_FUNCTIONS, [torch.nn.functional.linear, torch._C._nn.linear, *_ops("aten.linear")], _linear)
_register(_FUNCTIONS, [operator.matmul, torch.matmul, torch.mm, torch.bmm, torch._int_mm,
                       *_ops("aten.matmul", "aten.mm", "aten.bmm", "aten._int_mm")], _binary("matmul"))
_register(_FUNCTIONS, [torch.round, *_ops("aten.round")], _unary("round"))
_register(_FUNCTIONS, [torch.abs, *_ops("aten.abs")], _unary("abs"))
_register(_FUNCTIONS, [torch.clamp, torch.clip, *_ops("aten.clamp")], _clamp)
_register(_FUNCTIONS, [torch.amax, *_ops("aten.amax")], _amax)
_register(_FUNCTIONS, [torch.amin, *_ops("aten.amin")], _reduce("amin"))
_register(_FUNCTIONS, [torch.maximum, *_ops("aten.maximum")], _binary("maximum"))
_register(_FUNCTIONS, [torch.minimum, *_ops("aten.minimum")], _binary("minimum"))
_register(_FUNCTIONS, [torch.neg, operator.neg, *_ops("aten.neg")], _unary("neg"))
_register(_FUNCTIONS, [torch.reciprocal, *_ops("aten.reciprocal")], _unary("reciprocal"))
_register(_FUNCTIONS, [torch.zeros_like, *_ops("aten.zeros_like")], _unary("zeros_like"))
_register(_FUNCTIONS, [torch.full_like, *_ops("aten.full_like")], _full_like)
_register(_FUNCTIONS, [torch.addmm, *_ops("aten.addmm")], _addmm)
_register(_FUNCTIONS, [operator.and_, torch.bitwise_and,
                       *_ops("aten.bitwise_and.Scalar", "aten.bitwise_and.Tensor", "aten.__and__.Scalar",
                             "aten.__and__.Tensor")], _binary("bitand"))
_register(_FUNCTIONS, [operator.rshift, torch.bitwise_right_shift,
                       *_ops("aten.__rshift__.Scalar", "aten.__rshift__.Tensor",
                             "aten.bitwise_right_shift.Tensor_Scalar", "aten.bitwise_right_shift.Tensor")],
          _binary("rshift"))
_register(_FUNCTIONS, [operator.lshift, torch.bitwise_left_shift,
                       *_ops("aten.__lshift__.Scalar", "aten.__lshift__.Tensor",
                             "aten.bitwise_left_shift.Tensor_Scalar", "aten.bitwise_left_shift.Tensor")],
          _binary("lshift"))
_register(_FUNCTIONS, [torch.stack, *_ops("aten.stack")], _list_op("stack"))
_register(_FUNCTIONS, [torch.einsum, *_ops("aten.einsum")], _einsum)
_register(_FUNCTIONS, [torch.index_select, *_ops("aten.index_select")],
          lambda n: Canon("take", (n.args[0], n.args[2])) if arg(n, 1, "dim") == 0 else None)
_register(_FUNCTIONS, [torch.cat, torch.concat, *_ops("aten.cat")], _list_op("cat"))
_register(_FUNCTIONS, [torch._grouped_mm, *_ops("aten._grouped_mm")], _grouped_mm)
_register(_FUNCTIONS, _ops("aten.index.Tensor"),  # bank[ids] at the aten level: one index tensor, on dim 0
          lambda n: Canon("take", (n.args[0], n.args[1][0])) if len(n.args[1]) == 1 and isinstance(n.args[1][0], Node)
          else None)

_register(_METHODS, ["to"], _convert(_to_dtype))
for _name in ("float", "double", "half", "bfloat16", "int", "long", "short", "char", "byte"):
    _register(_METHODS, [_name], _convert(_method_dtype(_name)))
_register(_METHODS, ["t"], _t)
_register(_METHODS, ["transpose", "swapaxes"], _transpose)
_register(_METHODS, ["permute"], _permute)
_register(_METHODS, ["view", "reshape", "unsqueeze", "squeeze", "flatten", "unflatten", "view_as", "reshape_as"],
          _unary("reshape"))
_register(_METHODS, ["expand", "expand_as"], _unary("expand"))
_register(_METHODS, ["contiguous", "clone", "detach"], _unary("noop"))
_register(_METHODS, ["mul"], _binary("mul"))
_register(_METHODS, ["add"], _binary("add", True))
_register(_METHODS, ["sub"], _binary("sub", True))
_register(_METHODS, ["div"], lambda n: None if arg(n, 2, "rounding_mode") is not None else Canon("div", n.args[:2]))
_register(_METHODS, ["matmul", "mm", "bmm"], _binary("matmul"))
_register(_METHODS, ["round"], _unary("round"))
_register(_METHODS, ["abs"], _unary("abs"))
_register(_METHODS, ["clamp", "clip"], _clamp)
_register(_METHODS, ["amax"], _amax)
_register(_METHODS, ["amin"], _reduce("amin"))
_register(_METHODS, ["maximum"], _binary("maximum"))
_register(_METHODS, ["minimum"], _binary("minimum"))
_register(_METHODS, ["neg", "__neg__"], _unary("neg"))
_register(_METHODS, ["reciprocal"], _unary("reciprocal"))
_register(_METHODS, ["bitwise_and", "__and__"], _binary("bitand"))
_register(_METHODS, ["bitwise_right_shift", "__rshift__"], _binary("rshift"))
_register(_METHODS, ["bitwise_left_shift", "__lshift__"], _binary("lshift"))


def _register_pt2e() -> None:
    # quantized_decomposed ops exist once torch.ao.quantization.fx._decomposed is imported
    try:
        import torch.ao.quantization.fx._decomposed  # noqa: F401
    except ImportError:  # pragma: no cover
        return
    _register(_FUNCTIONS, _ops("quantized_decomposed.dequantize_per_channel"), _dq_per_channel)
    _register(_FUNCTIONS, _ops("quantized_decomposed.dequantize_per_tensor",
                               "quantized_decomposed.dequantize_per_tensor.tensor"), _dq_per_tensor)


_register_pt2e()


#: library ops with a pure-torch meaning, by their qualified name (the library may be imported after xqpass)
_LIBRARY_OPS: dict[str, Callable[[Node], Canon | None]] = {
    # optimum-quanto's W8A16 op: its CPU kernel computes matmul(x.to(s.dtype), (s * w).t())
    "quanto::qbytes_mm": lambda n: Canon("scaled_linear", (n.args[0], n.args[1], n.args[2])),
    # transformers' grouped_mm experts off CUDA: torch._grouped_mm's meaning, a loop over the groups
    "transformers::grouped_mm_fallback": lambda n: _grouped_mm(n),
}


def canonical(node: Any) -> Canon | None:
    """The :class:`Canon` of an FX node, or None (not a call, or a spelling outside the vocabulary)."""
    if not isinstance(node, Node):
        return None
    try:
        if node.op == "call_function":
            make = _FUNCTIONS.get(node.target)
            if make is None and isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
                make = _LIBRARY_OPS.get(node.target._schema.name if isinstance(node.target, torch._ops.OpOverload)
                                        else node.target._qualified_op_name)
        elif node.op == "call_method":
            make = _METHODS.get(node.target)
        else:
            return None
        return make(node) if make is not None else None
    except (IndexError, KeyError, TypeError, ValueError):
        return None
