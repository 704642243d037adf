"""A small declarative pattern language over FX graphs, written against :mod:`.spellings` kinds.

Patterns are trees of combinators (:class:`Cast`, :class:`Mul`, :class:`Matmul`, ...) declared once, as
data, in :mod:`xqpass.patterns.catalogue`. Matching is a backtracking search that yields every way a
node can match; each combinator checks what it is responsible for on the node metadata (dtypes and
shapes of the FakeTensor in ``meta["val"]`` / ``meta["example_value"]``), so a match is an equivalence,
not a resemblance.

Weight-side combinators carry a **weight layout**: a tuple of axis tags for the node's dims, over
N (output features), K (input features), G, g (K split into G groups of g), and NG (N and G merged,
N-major: the flat ``[N * K/g, g]`` storage of HQQ and quanto). A matmul asks for its
weight operand in ``("N", "K")`` (``linear``) or ``("K", "N")`` (``matmul``); transposes, permutes and
reshapes met on the way down change the layout asked of their input (so ``w.t().float()`` and
``w.float().t()`` are one pattern), and every operand broadcast against the weight (a scale, a zero
point) is checked against the tags: a scale must vary only along N (per channel) or along N and G (per
group). Anything the rules cannot prove equivalent fails with a reason, which the driver reports.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator

import sympy
import torch
from torch.fx import Node

from .bounds import exact_bounds, value_bounds
from .spellings import Canon, arg, canonical

Axes = tuple  # axis tags, each "N", "K", "G" or "g" (not xqpass.quant.Layout, the op's layout)
NK: Axes = ("N", "K")
KN: Axes = ("K", "N")
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
#: stored weights the op reads: integers, and float8 (a float dtype, but storage like an integer here)
WEIGHT_DTYPES = (torch.int8, torch.uint8, *FLOAT8)


# ----------------------------------------------------------------------------------------------
# metadata and symbolic sizes


def meta_value(node: Any, gm: torch.fx.GraphModule | None = None) -> Any:
    """The FakeTensor / example value of a node (or the real tensor of a ``get_attr``)."""
    if not isinstance(node, Node):
        return node
    for key in ("val", "example_value"):
        v = node.meta.get(key)
        if v is not None:
            return v
    if node.op == "get_attr" and gm is not None:
        obj = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
        return obj
    return None


def _expr(size: Any) -> Any:
    if isinstance(size, torch.SymInt):
        return size.node.expr
    return sympy.Integer(int(size))


def same_size(a: Any, b: Any) -> bool:
    """``a == b`` for ints or SymInts, decided with sympy (never installs a guard)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return sympy.simplify(_expr(a) - _expr(b)) == 0
    except (TypeError, AttributeError):
        return False


def same_shape(a, b) -> bool:
    if a is None or b is None:  # no metadata: nothing can be proved
        return False
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def static(size: Any) -> int | None:
    """An int size, or None for a symbolic one."""
    if isinstance(size, int):
        return size
    expr = _expr(size)
    return int(expr) if expr.is_Integer else None


# ----------------------------------------------------------------------------------------------
# the match and its context


@dataclass(frozen=True)
class Factor:
    """A scale or zero point as the match saw it, broadcast against the weight.

    ``value``: the node (or a Python number); ``granularity``: "tensor" (one value), "channel" (varies
    along N only) or "group" (along G, and maybe N); ``padded``: its shape padded with leading 1s to the
    weight's rank; ``layout``: the weight's axis tags where it was met, or, for a factor the graph
    expanded along K (``s.repeat_interleave(g, 0)``, ``s[g_idx]``), its own tags with G for K;
    ``k_index``: the group index of each input feature, where the graph gathered by one (``g_idx``).
    """

    value: Any
    granularity: str
    padded: tuple
    layout: Axes
    k_index: Any = None
    inverse: bool = False  # the weight is divided by it (``w.to(dt) / scale_inv``): the op's scale is 1 / value


@dataclass(frozen=True)
class Match:
    """What a pattern found: built by the combinators, one field at a time, and read by
    :func:`xqpass.patterns.replacement.build_call`. Immutable: a backtracking search shares prefixes."""

    activation: Node | None = None  # x [..., K] (the quantized x_q until PerTokenQuantized walks back)
    weight: Node | None = None  # the integer storage
    weight_layout: Axes = ()  # its axis tags
    packed: bool = False  # two 4-bit values a byte, low nibble first
    unpacked: bool = False  # the weight is an integer computed in the graph from the model's state (see .fold)
    scale: Factor | None = None  # broadcast against the weight
    zero: Factor | None = None
    zero_kind: str | None = None  # "int": (q - z) * s; "float": q * s - z
    post_scale: Any = None  # a scale along the output's last dim, applied after the product
    bias: Any = None  # along the output's last dim: the product's own or added after it
    bias_before_scale: bool = False  # the bias is added before ``post_scale`` (the op gets b * s)
    quantize_activation: bool = False  # per-token int8 activations (W8A8)
    expert_ids: Any = None  # an expert bank's weights gathered by these routing ids (one row of x each)
    expert_rows: bool = False  # x holds a row per (token, slot) of expert_ids, not one per token
    form: str = "?"  # the weight form's name, for reports
    broadcast_shape: tuple | None = None  # the weight-side shape the next scale / zero point must fit
    nodes: frozenset = frozenset()  # the nodes the rewrite replaces

    def with_(self, *nodes: Any, **fields: Any) -> "Match":
        """This match covering ``nodes`` too, with ``fields`` set. A plain copy of the fields (every step
        of the search makes one; ``dataclasses.replace`` re-runs ``__init__`` and costs 4x more)."""
        unknown = fields.keys() - _MATCH_FIELDS
        if unknown:
            raise TypeError(f"Match has no field {', '.join(sorted(unknown))}")
        new = object.__new__(Match)
        vars(new).update(vars(self), **fields)
        if nodes:
            vars(new)["nodes"] = self.nodes.union(n for n in nodes if isinstance(n, Node))
        return new


_MATCH_FIELDS = frozenset(f.name for f in fields(Match))


@dataclass
class Context:
    """What every combinator may consult: the graph module and a record of why matches failed."""

    gm: torch.fx.GraphModule
    failures: list = field(default_factory=list)  # (depth, reason)
    depth: int = 0
    #: placeholders that hold the model's parameters and buffers: never the activation's data, even when
    #: the activation was computed with them (a weight shared by two layers feeds both)
    model_state: frozenset = frozenset()
    #: real tensors of graph inputs (the backend's example inputs), from which a weight the graph unpacks
    #: from the model's state is computed once
    values: dict = field(default_factory=dict)
    #: whether a tensor computed from these sources' values may be computed once (the backends refuse
    #: sources split over devices: computed once, the result would be whole on each device)
    may_compute_once: Any = None
    #: value bounds proved so far (:mod:`.bounds`), by node
    bounds_memo: dict = field(default_factory=dict)
    #: nodes of subgraphs computed once by the rewrite in progress (erased with the match where unused)
    computed_once: set = field(default_factory=set)

    def val(self, node: Any) -> Any:
        return meta_value(node, self.gm)

    def shape(self, node: Any) -> tuple | None:
        v = self.val(node)
        if isinstance(v, torch.Tensor):
            return tuple(v.shape)
        if isinstance(v, (int, float, bool)):
            return ()
        return None

    def dtype(self, node: Any) -> torch.dtype | None:
        v = self.val(node)
        if isinstance(v, torch.Tensor):
            return v.dtype
        return None

    def fail(self, reason: str) -> None:
        self.failures.append((self.depth, reason))

    def inputs_of(self, node: Node) -> frozenset:
        """The data inputs (placeholders that are not model state) a node's value is computed from. Memoized;
        a node whose inputs share one set shares it, so the memo grows with the graph, not its square."""
        memo = self.__dict__.setdefault("_inputs_memo", {})
        todo = [node]
        while todo:
            n = todo[-1]
            if n in memo:
                todo.pop()
                continue
            pending = [a for a in _data_inputs(n) if a not in memo]
            if pending:
                todo.extend(pending)
                continue
            todo.pop()
            if n.op == "placeholder":
                memo[n] = frozenset() if n in self.model_state else frozenset((n,))
                continue
            distinct = {id(s): s for s in (memo[a] for a in _data_inputs(n)) if s}
            memo[n] = frozenset().union(*distinct.values()) if len(distinct) > 1 else \
                next(iter(distinct.values()), frozenset())
        return memo[node]

    def activation_source(self, node: Any, activation: Node) -> Node | None:
        """What makes ``node``'s value computed from the activation, or None: ``activation`` itself when it
        is an ancestor of ``node``, else a graph input both are computed from (a view of ``x`` is still
        ``x``) that is data, not model state. A parameter or buffer the activation was computed with (the
        same dequantized weight feeding an earlier layer) does not make a scale the activation's."""
        if not isinstance(node, Node):
            return None
        if _descends_from(node, activation):
            return activation
        shared = self.inputs_of(node) & self.inputs_of(activation)
        return min(shared, key=lambda n: n.name) if shared else None

    def from_activation(self, node: Any, activation: Node, what: str) -> str | None:
        """The reason ``what`` (e.g. "scale s") is refused as computed from the activation, or None."""
        source = self.activation_source(node, activation)
        if source is None:
            return None
        if source is activation:
            return f"{what} is computed from the activation {activation.name}"
        return f"{what} is computed from the activation's input {source.name} (a graph input not recorded as a " \
               f"parameter or buffer)"


def _data_inputs(node: Node) -> list:
    """A node's inputs whose values it reads: ``x.to(y.dtype)`` traced by ``symbolic_trace`` reads y's
    dtype (a ``getattr`` node), not y's values."""
    return [a for a in node.all_input_nodes
            if not (a.op == "call_function" and a.target is getattr and a.args[1:] in (("dtype",), ("device",)))]


def _descends_from(node: Node, ancestor: Node) -> bool:
    """Whether ``ancestor`` is ``node`` or one of its inputs' ancestors. Graph order is topological, so
    the walk never goes above ``ancestor``."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is ancestor:
            return True
        if n not in seen and n > ancestor:
            seen.add(n)
            stack.extend(_data_inputs(n))
    return False


# ----------------------------------------------------------------------------------------------
# layouts


def _axis(layout: Axes, dim: int) -> int:
    return dim % len(layout)


def child_layout(ctx: Context, node: Node, canon: Canon, layout: Axes) -> Axes | None:
    """The layout a layout op's input must have for its output to have ``layout`` (None: not provable)."""
    kind = canon.kind
    if kind == "noop":
        return layout
    if kind == "transpose":
        a, b = (_axis(layout, d) for d in canon.params["dims"])
        tags = list(layout)
        tags[a], tags[b] = tags[b], tags[a]
        return tuple(tags)
    if kind == "permute":
        dims = [_axis(layout, d) for d in canon.params["dims"]]
        if sorted(dims) != list(range(len(layout))):
            return None
        tags = [None] * len(layout)
        for out_dim, in_dim in enumerate(dims):
            tags[in_dim] = layout[out_dim]
        return tuple(tags)
    if kind == "reshape":
        out_shape, in_shape = ctx.shape(node), ctx.shape(canon.inputs[0])
        if out_shape is None or in_shape is None:
            return None
        if same_shape(out_shape, in_shape):
            return layout
        # split / merge of K into (G, g), K being the last or first axis (the only reshapes that keep
        # every weight element's (n, k) coordinates)
        if layout == NK and len(in_shape) == 3 and same_size(in_shape[1] * in_shape[2], out_shape[1]) \
                and same_size(in_shape[0], out_shape[0]):
            return ("N", "G", "g")
        if layout == KN and len(in_shape) == 3 and same_size(in_shape[0] * in_shape[1], out_shape[0]) \
                and same_size(in_shape[2], out_shape[1]):
            return ("G", "g", "N")
        if layout == ("N", "G", "g") and len(in_shape) == 2 and same_size(in_shape[0], out_shape[0]):
            return NK
        if layout == ("G", "g", "N") and len(in_shape) == 2 and same_size(in_shape[1], out_shape[2]):
            return KN
        # 2-D blocks: [N/b, b, K/g, g] -> [N, K] (DeepSeek-style float8 blocks as views)
        if layout == NK and len(in_shape) == 4 and same_size(in_shape[0] * in_shape[1], out_shape[0]) and \
                same_size(in_shape[2] * in_shape[3], out_shape[1]):
            return ("B", "b", "G", "g")
        if layout == ("B", "b", "G", "g") and len(in_shape) == 2 and same_size(in_shape[0], out_shape[0] * out_shape[1]):
            return NK
        # flat groups: [N * K/g, g] -> [N, K] (row r holds group r % (K/g) of output feature r // (K/g))
        if layout == NK and len(in_shape) == 2 and len(out_shape) == 2 and static(in_shape[1]) and \
                static(out_shape[1]) and static(out_shape[1]) % static(in_shape[1]) == 0 and \
                same_size(in_shape[0] * in_shape[1], out_shape[0] * out_shape[1]):
            return ("NG", "g")
        return None
    return None


LAYOUT_KINDS = ("noop", "transpose", "permute", "reshape")


# ----------------------------------------------------------------------------------------------
# combinators


class Pattern:
    """Base: ``match`` yields one :class:`Match` per way ``node`` matches with value layout ``layout``."""

    #: whether layout ops (views, transposes) above this pattern are looked through
    through_layout = True
    name = "pattern"

    #: try the input of a layout op before the layout op itself (find the storage, not a view of it)
    prefer_below = False

    def match(self, ctx: Context, node: Any, layout: Axes, st: Match) -> Iterator[Match]:
        ctx.depth += 1
        try:
            if not self.prefer_below:
                yield from self.here(ctx, node, layout, st)
            if self.through_layout and isinstance(node, Node):
                canon = canonical(node)
                if canon is not None and canon.kind in LAYOUT_KINDS:
                    below = child_layout(ctx, node, canon, layout)
                    if below is None:
                        ctx.fail(f"{node.name}: a reshape that mixes the weight's axes {layout} "
                                 f"({ctx.shape(canon.inputs[0])} -> {ctx.shape(node)})")
                    else:
                        yield from self.match(ctx, canon.inputs[0], below, st.with_(node))
            if self.prefer_below:
                yield from self.here(ctx, node, layout, st)
        finally:
            ctx.depth -= 1

    def here(self, ctx: Context, node: Any, layout: Axes, st: Match) -> Iterator[Match]:
        raise NotImplementedError


@dataclass
class AnyOf(Pattern):
    """The first-listed alternatives are tried first (so a more specific form wins); each option looks
    through layout ops itself, so an earlier option is tried at every depth before a later one."""

    options: tuple
    through_layout = False

    def here(self, ctx, node, layout, st):
        for option in self.options:
            yield from option.match(ctx, node, layout, st)


@dataclass
class IntWeight(Pattern):
    """The quantized storage: an int8 / uint8 parameter, buffer or graph input; or any integer tensor the
    graph computes from the model's state (unpacked from words, reordered...), which the rewrite computes
    once (:mod:`.fold`)."""

    prefer_below = True

    def here(self, ctx, node, layout, st):
        dtype = ctx.dtype(node)
        stored = not isinstance(node, Node) or node.op in ("placeholder", "get_attr")
        if dtype in WEIGHT_DTYPES and stored:
            yield st.with_(weight=node, weight_layout=layout, packed=False, unpacked=False)
        elif dtype is not None and not stored and (not dtype.is_floating_point and not dtype.is_complex or
                                                   value_bounds(ctx, node) is not None):  # integers in floats
            yield st.with_(weight=node, weight_layout=layout, packed=False, unpacked=True)
        elif dtype is not None:
            ctx.fail(f"weight {getattr(node, 'name', node)} is {dtype}, not int8/uint8")


@dataclass
class PackedNibbles(Pattern):
    """Two 4-bit values a byte unpacked in the graph, in the op's packed order (low nibble first).

    ``stack([lo(p), hi(p)], dim=-1).reshape(N, K)`` of ``p [N, K/2]`` where, for uint8 ``p``,
    ``lo = p & 15`` and ``hi = p >> 4`` (or ``(p >> 4) & 15``): unsigned nibbles; for int8 ``p``,
    ``lo = (p << 4) >> 4`` and ``hi = p >> 4``: sign-extended nibbles. Other unpackings still match
    :class:`IntWeight` on their result (the rewrite then computes it once, :mod:`.fold`).
    """

    def here(self, ctx, node, layout, st):
        if layout != NK:
            return
        canon = canonical(node)
        if canon is None or canon.kind != "reshape":
            return
        stack = canonical(canon.inputs[0])
        out_shape, st_shape = ctx.shape(node), ctx.shape(canon.inputs[0])
        if stack is None or stack.kind != "stack" or len(stack.inputs[0]) != 2 or st_shape is None:
            return
        if len(st_shape) != 3 or stack.params["dim"] not in (-1, 2) or not same_size(st_shape[1] * 2, out_shape[1]):
            return
        lo, hi = stack.inputs[0]
        packed = self._source(ctx, lo, hi)
        if packed is None:
            ctx.fail(f"{node.name}: nibble unpacking not in the op's order/signedness; kept as an unpacked weight")
            return
        yield st.with_(node, canon.inputs[0], lo, hi, weight=packed, weight_layout=NK, packed=True)

    @staticmethod
    def _is(node, kind, const=None):
        c = canonical(node)
        if c is None or c.kind != kind:
            return None
        if const is not None and c.inputs[1] != const:
            return None
        return c.inputs[0]

    def _source(self, ctx, lo, hi):
        # unsigned: p & 15, p >> 4 (or (p >> 4) & 15) on uint8 p
        p = self._is(lo, "bitand", 15)
        if p is not None and ctx.dtype(p) == torch.uint8:
            h = self._is(hi, "rshift", 4)
            if h is None:
                inner = self._is(hi, "bitand", 15)
                h = self._is(inner, "rshift", 4) if inner is not None else None
            return p if h is p else None
        # signed: (p << 4) >> 4, p >> 4 on int8 p
        shifted = self._is(lo, "rshift", 4)
        p = self._is(shifted, "lshift", 4) if shifted is not None else None
        if p is not None and ctx.dtype(p) == torch.int8 and self._is(hi, "rshift", 4) is p:
            return p
        return None


@dataclass
class Cast(Pattern):
    """A dtype conversion to a floating dtype (``to_int``: to int32 / int64, exact widening of an
    integer) of what ``inner`` matches."""

    inner: Pattern
    from_float: bool = False  # True: a float -> float cast above a dequantized weight
    to_int: bool = False

    def here(self, ctx, node, layout, st):
        canon = canonical(node)
        if canon is None or canon.kind != "convert":
            if isinstance(node, Node) and node.op in ("placeholder", "get_attr") and not self.from_float:
                ctx.fail(f"weight {node.name} is {ctx.dtype(node)}, not int8/uint8")
            return
        out, src = ctx.dtype(node), ctx.dtype(canon.inputs[0])
        if self.to_int:
            if out in (torch.int32, torch.int64) and src in (torch.int8, torch.uint8):
                yield from self.inner.match(ctx, canon.inputs[0], layout, st.with_(node))
            return
        if out is None or not out.is_floating_point:
            return
        if self.from_float != (src is not None and src.is_floating_point and src not in FLOAT8):
            if not self.from_float and src is not None:
                ctx.fail(f"{node.name} casts a {src} tensor: the weight is not int8/uint8")
            return
        yield from self.inner.match(ctx, canon.inputs[0], layout, st.with_(node))


def classify_operand(ctx: Context, operand: Any, layout: Axes, weight_shape: tuple) -> tuple | str:
    """How a tensor broadcast against the weight varies: ``(granularity, sizes)`` or a failure reason.

    Granularity: "tensor" (one value), "channel" (along N only), "group" (along G, and maybe N), "block"
    (along blocks B of output features, and maybe G: 2-D blocks).
    ``sizes`` maps the tags N / G to the operand's (padded) dims that carry them.
    """
    shape = ctx.shape(operand)
    if shape is None:
        return f"no shape metadata for {getattr(operand, 'name', operand)}"
    if len(shape) > len(layout):
        return f"{getattr(operand, 'name', operand)} {list(shape)} has more dims than the weight {list(weight_shape)}"
    padded = (1,) * (len(layout) - len(shape)) + tuple(shape)
    varies = {}
    for tag, size, wsize in zip(layout, padded, weight_shape):
        if same_size(size, 1) and not same_size(wsize, 1):
            continue
        if not same_size(size, wsize):
            return f"{getattr(operand, 'name', operand)} {list(shape)} does not broadcast to the weight {list(weight_shape)}"
        if tag in ("K", "g", "b") and not same_size(size, 1):
            return (f"{getattr(operand, 'name', operand)} {list(shape)} varies along the input axis of the "
                    f"weight (layout {'x'.join(layout)}): not a per-channel or per-group scale")
        if not same_size(size, 1):
            varies[tag] = len(varies)
    if "B" in varies:  # along blocks of output features (and groups of input features): 2-D blocks
        return ("block", padded)
    if "G" in varies or "NG" in varies:
        return ("group", padded)
    if "N" in varies or "E" in varies:  # (E: the experts of a bank, each its own channels)
        return ("channel", padded)
    return ("tensor", padded)


@dataclass
class Operand(Pattern):
    """A scale or zero point broadcast against the weight (a tensor or a Python number).

    ``role``: "scale" (floating) or "zero" (any dtype: integer zero points are converted); the match's
    field of that name gets the :class:`Factor`.
    """

    role: str = "scale"
    inverse: bool = False  # divides the weight
    through_layout = False

    def here(self, ctx, node, layout, st):
        x = st.activation
        reason = ctx.from_activation(node, x, f"{self.role} {getattr(node, 'name', node)}") if x is not None else None
        if reason:
            ctx.fail(reason)
            return
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            yield self._bind(st, Factor(node, "tensor", (), layout))
            return
        if not isinstance(node, Node):
            return
        dtype = ctx.dtype(node)
        if self.role == "scale" and (dtype is None or not dtype.is_floating_point):
            ctx.fail(f"scale {node.name} is {dtype}, not floating")
            return
        expanded = expanded_along_k(ctx, node, layout, st.broadcast_shape)
        if expanded is not None:
            source, source_layout, source_weight_shape, k_index = expanded
            gran = classify_operand(ctx, source, source_layout, source_weight_shape)
            if isinstance(gran, str):
                ctx.fail(gran)
                return
            yield self._bind(st.with_(node), Factor(source, *gran, source_layout, k_index))
            return
        gran = classify_operand(ctx, node, layout, st.broadcast_shape)
        if isinstance(gran, str):
            ctx.fail(gran)
            return
        yield self._bind(st, Factor(node, *gran, layout))

    def _bind(self, st: Match, factor: Factor) -> Match:
        if self.inverse:
            factor = replace(factor, inverse=True)
        return st.with_(scale=factor) if self.role == "scale" else st.with_(zero=factor)


_REPEAT_INTERLEAVE = {torch.repeat_interleave, torch.ops.aten.repeat_interleave.self_int}


def _repeat_interleave(node: Node):
    """``(source, repeats, dim)`` of ``source.repeat_interleave(repeats, dim)`` in any spelling; else None."""
    if node.target in _REPEAT_INTERLEAVE or node.op == "call_method" and node.target == "repeat_interleave":
        return node.args[0], arg(node, 1, "repeats"), arg(node, 2, "dim")
    return None


def expanded_along_k(ctx: Context, node: Node, layout: Axes, weight_shape: tuple) -> tuple | None:
    """A scale or zero point given per input feature by repeating each group's value along the weight's K
    axis: ``s.repeat_interleave(g, dim)`` (groups of g in order) or ``s[g_idx]`` (the group of each input
    feature read from an index tensor, GPTQ's act-order included). Returns ``(s, s's axis tags with G for
    K, the weight's shape with G for K, the index or None)``, or None for any other operand."""
    shape = ctx.shape(node)
    if shape is None or weight_shape is None or len(shape) > len(layout):
        return None
    pad = len(layout) - len(shape)
    repeated = _repeat_interleave(node)
    if repeated is not None:
        source, repeats, dim = repeated
        if not isinstance(repeats, int) or not isinstance(dim, int) or not isinstance(source, Node):
            return None
        axis, index = pad + dim % len(shape), None
    elif node.target is operator.getitem or node.target is torch.ops.aten.index.Tensor:
        source, index = node.args
        index = index[0] if isinstance(index, (tuple, list)) and len(index) == 1 else index
        index_shape, index_dtype = ctx.shape(index), ctx.dtype(index)
        if not isinstance(index, Node) or index_dtype is None or index_dtype.is_floating_point or \
                index_shape is None or len(index_shape) != 1:
            return None
        axis = pad
    else:
        return None
    source_shape = ctx.shape(source)
    if layout[axis] != "K" or source_shape is None or len(source_shape) != len(shape):
        return None
    groups = source_shape[axis - pad]
    if index is None and not same_size(groups * repeats, weight_shape[axis]):
        return None
    if index is not None and not same_size(ctx.shape(index)[0], weight_shape[axis]):
        return None
    tags = layout[:axis] + ("G",) + layout[axis + 1:]
    return source, tags, weight_shape[:axis] + (groups,) + weight_shape[axis + 1:], index


def _binary_operands(ctx, node, kind):
    canon = canonical(node)
    if canon is None or canon.kind != kind:
        return None
    return canon.inputs


@dataclass
class _WeightOp(Pattern):
    """``value (op) operand`` on the weight side: ``value`` keeps the weight's shape, ``operand`` is
    broadcast against it."""

    value: Pattern
    operand: Operand
    kind = ""
    commutative = False

    def here(self, ctx, node, layout, st):
        ops = _binary_operands(ctx, node, self.kind)
        if ops is None:
            return
        dtype = ctx.dtype(node)
        if dtype is not None and not dtype.is_floating_point and exact_bounds(ctx, node) is None:
            ctx.fail(f"{node.name}: integer arithmetic on the weight that may wrap around ({dtype})")
            return
        shape = ctx.shape(node)
        for a, b in ((ops, ops[::-1]) if self.commutative else (ops,)):
            if isinstance(a, Node) and ctx.shape(a) is not None and same_shape(ctx.shape(a), shape):
                for s in self.value.match(ctx, a, layout, st.with_(node, broadcast_shape=shape)):
                    yield from self.operand.match(ctx, b, layout, s.with_(broadcast_shape=shape))


class Mul(_WeightOp):
    """``value * operand`` in either order (an integer ``value`` times a float scale: by type promotion)."""

    kind, commutative = "mul", True


class Div(_WeightOp):
    """``value / operand`` (a scale stored inverted, as ``weight_scale_inv``)."""

    kind = "div"


class Sub(_WeightOp):
    """``value - operand`` (in integers: where the bounds prove it exact, :mod:`.bounds`)."""

    kind = "sub"


@dataclass
class DequantizePT2E(Pattern):
    """PT2E ``quantized_decomposed.dequantize_per_channel(w, scales, zero_points, axis, ...)`` along N, or
    ``dequantize_per_tensor(w, scale, zero_point, ...)``, of a 2-D int8 / uint8 ``w``."""

    kind: str  # "dequantize_per_channel" or "dequantize_per_tensor"

    def here(self, ctx, node, layout, st):
        canon = canonical(node)
        if canon is None or canon.kind != self.kind:
            return
        w, scale, zero = canon.inputs[:3]
        if ctx.dtype(w) not in (torch.int8, torch.uint8) or len(layout) != 2:
            ctx.fail(f"{node.name}: PT2E weight is {ctx.dtype(w)} (int8/uint8 2-D expected)")
            return
        factor = Factor(scale, "tensor", (), layout)
        if self.kind == "dequantize_per_channel":
            axis = canon.inputs[3] % 2
            if layout[axis] != "N":
                ctx.fail(f"{node.name}: PT2E channel axis {canon.inputs[3]} is not the output axis of the weight")
                return
            n = ctx.shape(w)[axis]
            factor = Factor(scale, "channel", tuple(n if i == axis else 1 for i in range(2)), layout)
        yield st.with_(node, weight=w, weight_layout=layout, packed=False, scale=factor,
                       zero=replace(factor, value=zero), zero_kind="int")


@dataclass
class Named(Pattern):
    """Tags a match with the name of the dequantization form (for reports)."""

    form: str
    inner: Pattern
    zero_kind: str | None = None  # "int": (q - z) * s; "float": q * s - z
    through_layout = False

    def here(self, ctx, node, layout, st):
        named = st.with_(form=self.form) if self.zero_kind is None else st.with_(form=self.form, zero_kind=self.zero_kind)
        yield from self.inner.match(ctx, node, layout, named)


# ----------------------------------------------------------------------------------------------
# matmul roots


@dataclass
class Matmul(Pattern):
    """A product of an activation ``x [..., K]`` with a weight, in every spelling, binding the activation
    ``x``, the weight through ``weight``, and ``bias`` where the op carries one.

    ``linear(x, W, b)`` asks ``W`` in layout N x K; ``matmul / mm / @ (x, W)`` and ``addmm(b, x, W)``
    ask ``W`` in K x N; ``bmm(x, W.expand(B, K, N))`` too; an aten-level ``view(mm(view(x)), ...)``
    around a rank > 2 activation binds the original ``x``.
    """

    weight: Pattern
    int_activation: bool = False  # an integer product (W8A8): x is the quantized activation
    through_layout = False

    def here(self, ctx, node, layout, st):
        canon = canonical(node)
        if canon is None:
            return
        if canon.kind == "reshape":  # aten: view(mm(view(x, [-1, K]), W), [..., N])
            inner = canonical(canon.inputs[0])
            if inner is not None and inner.kind in ("matmul", "addmm"):
                a = inner.inputs[0] if inner.kind == "matmul" else inner.inputs[1]
                a_canon = canonical(a)
                if a_canon is not None and a_canon.kind == "reshape":
                    x = a_canon.inputs[0]
                    xs, out = ctx.shape(x), ctx.shape(node)
                    if xs is not None and out is not None and len(xs) == len(out) and \
                            same_shape(xs[:-1], out[:-1]):
                        yield from self._product(ctx, canon.inputs[0], inner, x, st.with_(node, a))
            return
        if canon.kind in ("linear", "matmul", "addmm"):
            x = canon.inputs[1] if canon.kind == "addmm" else canon.inputs[0]
            yield from self._product(ctx, node, canon, x, st)

    def _product(self, ctx, node, canon, x, st):
        xs, xdt = ctx.shape(x), ctx.dtype(x)
        if xs is None or len(xs) < 1 or xdt is None or xdt.is_floating_point == self.int_activation:
            return
        st = st.with_(node, activation=x)
        if canon.kind == "linear":
            w, bias = canon.inputs[1], canon.inputs[2]
            ws = ctx.shape(w)
            if ws is None or len(ws) != 2 or not same_size(ws[1], xs[-1]):
                return
            for s in self.weight.match(ctx, w, NK, st.with_(broadcast_shape=ws)):
                yield s.with_(bias=bias)
            return
        if canon.kind == "addmm":
            bias, w = canon.inputs[0], canon.inputs[2]
        else:
            bias, w = None, canon.inputs[1]
        ws = ctx.shape(w)
        if ws is None:
            return
        if len(ws) == 3:  # bmm(x, W.expand(B, K, N))
            w_canon = canonical(w)
            if w_canon is None or w_canon.kind != "expand" or len(xs) != 3:
                return
            st = st.with_(w)
            w = w_canon.inputs[0]
            ws = ctx.shape(w)
            if ws is None or len(ws) != 2:
                return
        if len(ws) != 2 or not same_size(ws[0], xs[-1]):
            return
        for s in self.weight.match(ctx, w, KN, st.with_(broadcast_shape=ws)):
            yield s.with_(bias=bias)


@dataclass
class ScaledLinear(Pattern):
    """A library op computing ``x @ (s * w).t()`` in one node (optimum-quanto's ``qbytes_mm(x, w, s)``):
    ``w [N, K]`` through ``weight``, ``s`` a per-channel or per-tensor scale; ``x`` must already have
    ``s``'s dtype (the op casts x to it, the xq op computes in x's)."""

    weight: Pattern
    through_layout = False

    def here(self, ctx, node, layout, st):
        canon = canonical(node)
        if canon is None or canon.kind != "scaled_linear":
            return
        x, w, s = canon.inputs
        xs, ws = ctx.shape(x), ctx.shape(w)
        if xs is None or ws is None or len(ws) != 2 or not same_size(ws[1], xs[-1]):
            return
        if ctx.dtype(x) != ctx.dtype(s):
            ctx.fail(f"{node.name}: the activation is {ctx.dtype(x)}, the op computes in the scale's {ctx.dtype(s)}")
            return
        for m in self.weight.match(ctx, w, NK, st.with_(node, activation=x, broadcast_shape=ws)):
            gran = classify_operand(ctx, s, NK, ws)
            if isinstance(gran, str):
                ctx.fail(gran)
                continue
            yield m.with_(scale=Factor(s, *gran, NK))


@dataclass
class ExpertProduct(Pattern):
    """An expert bank's weights gathered by routing ids and multiplied per token, one match per bank::

        torch.einsum("ti,taoi->tao", x, bank.to(dt)[ids])     # ids [T, A] (top-k), x [T, K]
        torch.einsum("tao,taio->tai", h, bank.to(dt)[ids])     # h [T, A, K]: a row per (token, slot)
        torch.einsum("ti,toi->to", x, deq_bank[ids])          # ids [T]

    (gpt-fast's Mixtral; any letters, either operand order): ``bank [E, N, K]`` through ``weight`` in layout
    E x N x K, dequantized before the gather."""

    weight: Pattern
    through_layout = False

    def here(self, ctx, node, layout, st):
        canon = canonical(node)
        if canon is not None and canon.kind == "reshape":
            yield from self._bmm(ctx, node, canon.inputs[0], st)
            return
        if canon is None or canon.kind != "einsum" or len(canon.inputs[0]) != 2:
            return
        equation = canon.params["equation"]
        if equation.count("->") != 1 or "." in equation:
            return
        operands, out = equation.split("->")
        subscripts = operands.split(",")
        if len(subscripts) != 2:
            return
        for (xs, ws), (x, gathered) in ((subscripts, canon.inputs[0]), (subscripts[::-1], canon.inputs[0][::-1])):
            yield from self._product(ctx, node, x, gathered, xs, ws, out, st)

    def _product(self, ctx, node, x, gathered, xs, ws, out, st):
        take = canonical(gathered)
        if take is None or take.kind != "take" or not isinstance(x, Node):
            return
        bank, ids = take.inputs
        id_shape, bank_shape = ctx.shape(ids), ctx.shape(bank)
        if id_shape is None or bank_shape is None or len(bank_shape) != 3 or ctx.dtype(ids) not in (torch.int32, torch.int64):
            return
        routed, (n, k) = ws[:-2], ws[-2:]
        if len(ws) != len(id_shape) + 2 or out != routed + n or xs not in (routed[:1] + k, routed + k) or \
                len(set(ws)) != len(ws):
            ctx.fail(f"{node.name}: einsum {xs},{ws}->{out} is not a product with gathered expert weights "
                     f"(rows, out features, in features)")
            return
        st = st.with_(node, gathered, activation=x, broadcast_shape=bank_shape)
        for m in self.weight.match(ctx, bank, ("E", "N", "K"), st):
            yield m.with_(expert_ids=ids, expert_rows=len(routed) > 1 and xs == routed + k)

    def _bmm(self, ctx, node, product, st):
        """``bmm(deq_bank[ids], x.unsqueeze(-1)).squeeze(-1)``: transformers' ``batched_mm`` experts
        (``_batched_linear``, not transposed), ids ``[S]`` and a row of ``x [S, K]`` each; where ``x`` is
        ``h.repeat_interleave(k, 0)`` and ids ``top_k.reshape(-1)`` (``top_k [T, k]``), the op reads ``h`` and
        ``top_k`` as they come, so that one token's experts take the op's one-row route."""
        inner = canonical(product) if isinstance(product, Node) else None
        if inner is None or inner.kind != "matmul":
            return
        gathered, column = inner.inputs
        take, col = canonical(gathered) if isinstance(gathered, Node) else None, \
            canonical(column) if isinstance(column, Node) else None
        shapes = [ctx.shape(v) for v in (gathered, column, product, node)]
        if take is None or take.kind != "take" or col is None or col.kind != "reshape" or \
                any(s is None for s in shapes):
            if col is not None and col.kind == "take" and (take is None or take.kind != "take"):
                ctx.fail(f"{product.name}: bmm(x, bank[ids]) reads a transposed bank [E, K, N]; the grouped op "
                         f"reads [E, N, K] banks (transformers' is_transposed=False)")
            return
        (gs, cs, ps, out), (bank, ids), x = shapes, take.inputs, col.inputs[0]
        xs, bank_shape, id_shape = ctx.shape(x), ctx.shape(bank), ctx.shape(ids)
        if xs is None or bank_shape is None or id_shape is None or len(gs) != 3 or len(bank_shape) != 3 or \
                len(id_shape) != 1 or len(xs) != 2 or ctx.dtype(ids) not in (torch.int32, torch.int64) or \
                not same_shape(cs, (*xs, 1)) or not same_shape(ps, (*gs[:2], 1)) or not same_shape(out, gs[:2]) or \
                not same_size(xs[0], id_shape[0]):
            return
        st = st.with_(node, product, gathered, column, broadcast_shape=bank_shape)
        rows = _repeated_rows(ctx, x, ids)
        if rows is not None:  # h [T, K] once and top_k [T, k]: the graph's copies of h are left unused
            x, ids = rows
        for m in self.weight.match(ctx, bank, ("E", "N", "K"), st.with_(activation=x)):
            yield m.with_(expert_ids=ids)


@dataclass
class GroupedMm(Pattern):
    """transformers' ``grouped_mm`` experts (its default): rows sorted by expert, a grouped matmul over
    offsets counted from the sorted ids::

        ids_g, perm = torch.sort(top_k.reshape(-1))
        offs = torch.cumsum(torch.histc(ids_g.float(), bins=E, min=0, max=E - 1), dim=0, dtype=torch.int32)
        out = grouped_mm(x_g, deq_bank.transpose(-2, -1), offs=offs)     # bank [E, N, K]

    Rows ``offs[e-1] <= r < offs[e]`` are expert ``e``'s; since the ids are sorted and ``histc`` with E
    bins over ``[0, E - 1]`` counts each integer id in its own bin, row ``r`` is expert ``ids_g[r]``'s: the
    grouped op with ``ids_g`` as routing ids, proved from the graph. Rows past ``offs[-1]`` (ids outside
    ``[0, E)``, expert-parallel sentinels) are unspecified in both."""

    weight: Pattern
    through_layout = False

    def here(self, ctx, node, layout, st):
        canon = canonical(node)
        if canon is None or canon.kind != "grouped_mm":
            return
        x, w_t, offs = canon.inputs
        t = canonical(w_t) if isinstance(w_t, Node) else None
        bank = t.inputs[0] if t is not None and t.kind == "transpose" and \
            sorted(d % 3 for d in t.params["dims"]) == [1, 2] else None
        xs, bank_shape = ctx.shape(x), ctx.shape(bank) if bank is not None else None
        if bank_shape is None or len(bank_shape) != 3 or xs is None or len(xs) != 2:
            if bank is None and isinstance(w_t, Node):
                ctx.fail(f"{node.name}: grouped_mm reads a bank stored [E, K, N] (is_transposed); the grouped op "
                         f"reads [E, N, K] banks")
            return
        ids = _sorted_ids_of_offsets(ctx, offs, static(bank_shape[0]))
        if ids is None:
            ctx.fail(f"{node.name}: the offsets of grouped_mm are not cumsum(histc(sorted ids, bins=E, min=0, "
                     f"max=E-1)) of the rows' expert ids")
            return
        if not same_size(ctx.shape(ids)[0], xs[0]):
            return
        st = st.with_(node, w_t, activation=x, broadcast_shape=bank_shape)
        for m in self.weight.match(ctx, bank, ("E", "N", "K"), st):
            yield m.with_(expert_ids=ids)


_SORT = {torch.sort, torch.ops.aten.sort.default, torch.ops.aten.sort.stable}
_HISTC = {torch.histc, torch.ops.aten.histc.default}
_CUMSUM = {torch.cumsum, torch.ops.aten.cumsum.default}


def _sorted_ids_of_offsets(ctx, offs, experts):
    """The sorted expert ids ``ids_g`` where ``offs`` is ``cumsum(histc(ids_g.float(), bins=E, min=0,
    max=E - 1), dim=0)`` and ``ids_g`` is ``torch.sort(ids)[0]`` (ascending) of 1-D integer ids; else None."""
    if experts is None or not isinstance(offs, Node) or offs.target not in _CUMSUM and not (
            offs.op == "call_method" and offs.target == "cumsum") or arg(offs, 1, "dim") not in (0, -1):
        return None
    counts = offs.args[0]
    if not isinstance(counts, Node) or counts.target not in _HISTC or \
            (arg(counts, 1, "bins", 100), arg(counts, 2, "min", 0), arg(counts, 3, "max", 0)) != (experts, 0, experts - 1):
        return None
    ids = counts.args[0]
    while isinstance(ids, Node) and canonical(ids) is not None and canonical(ids).kind in ("convert", "noop"):
        ids = canonical(ids).inputs[0]
    if not isinstance(ids, Node) or ids.target is not operator.getitem or ids.args[1] != 0:
        return None
    sort = ids.args[0]
    if not isinstance(sort, Node) or sort.target not in _SORT and not (sort.op == "call_method" and sort.target == "sort"):
        return None
    descending = sort.kwargs.get("descending", False) if sort.target is not torch.ops.aten.sort.default else \
        arg(sort, 2, "descending", False)
    shape = ctx.shape(ids)
    if descending or shape is None or len(shape) != 1 or ctx.dtype(ids) not in (torch.int32, torch.int64) or \
            arg(sort, 1, "dim", -1) not in (0, -1) or any(isinstance(a, bool) and a for a in sort.args[1:]):
        return None
    return ids


def _repeated_rows(ctx, x: Node, ids: Node):
    """``(h, top_k)`` where ``x`` is ``h.repeat_interleave(k, dim=0)`` and ``ids`` is ``top_k.reshape(-1)``
    with ``top_k [T, k]``: row ``t * k + j`` of ``x`` is token ``t`` routed to ``top_k[t, j]``; else None."""
    flat = canonical(ids) if isinstance(ids, Node) else None
    repeated = _repeat_interleave(x)
    if flat is None or flat.kind != "reshape" or not isinstance(flat.inputs[0], Node) or repeated is None:
        return None
    (h, repeats, dim), top_k = repeated, flat.inputs[0]
    ks, hs = ctx.shape(top_k), ctx.shape(h) if isinstance(h, Node) else None
    if ks is None or hs is None or len(ks) != 2 or len(hs) != 2 or dim not in (0, -2) or \
            not isinstance(repeats, int) or not same_size(ks[1], repeats) or not same_size(ks[0], hs[0]):
        return None
    return h, top_k


@dataclass
class ExpertPostScale(Pattern):
    """``product * s[ids]`` after an :class:`ExpertProduct`: a per-expert, per-channel scale ``s [E, N]``
    gathered by the same routing ids (gpt-fast's int8 Mixtral)."""

    product: Pattern
    through_layout = False

    def here(self, ctx, node, layout, st):
        ops = _binary_operands(ctx, node, "mul")
        if ops is None:
            return
        for a, v in (ops, ops[::-1]):
            if not isinstance(a, Node) or not same_shape(ctx.shape(a), ctx.shape(node)):
                continue
            for m in self.product.match(ctx, a, layout, st.with_(node)):
                if m.expert_ids is None:
                    continue
                nodes, scale = [], v
                while isinstance(scale, Node) and canonical(scale) is not None and \
                        canonical(scale).kind in ("convert", "noop"):
                    nodes.append(scale)
                    scale = canonical(scale).inputs[0]
                take = canonical(scale)
                if take is None or take.kind != "take" or take.inputs[1] is not m.expert_ids or \
                        not same_shape(ctx.shape(take.inputs[0]), ctx.shape(m.weight)[:2]):
                    ctx.fail(f"{node.name}: the scale after the experts' product is not s[ids] of one s [E, N]")
                    continue
                yield m.with_(*nodes, scale, post_scale=take.inputs[0])


def _post_op(ctx, node, layout, st, kind: str, product: Pattern, role: str):
    """Matches of ``product <kind> v`` (either order) with ``v`` varying along the output's last dim
    only: yields ``(match, v)``."""
    ops = _binary_operands(ctx, node, kind)
    if ops is None:
        return
    out = ctx.shape(node)
    for a, v in (ops, ops[::-1]):
        if not isinstance(a, Node) or ctx.shape(a) is None or not same_shape(ctx.shape(a), out):
            continue
        for m in product.match(ctx, a, layout, st.with_(node)):
            reason = _vector_along_last(ctx, v, out, m.activation, role)
            if reason:
                ctx.fail(reason)
                continue
            yield m, v


@dataclass
class PostScale(Pattern):
    """``product * s`` with ``s`` varying only along the output's last dim (a per-channel scale applied
    after the matmul: torchao's weight-only int8 form)."""

    product: Pattern

    through_layout = False

    def here(self, ctx, node, layout, st):
        for m, s in _post_op(ctx, node, layout, st, "mul", self.product, "scale"):
            # a bias added before this scale (the product's own or added to it) is scaled with the
            # product: the op gets b * s
            yield m.with_(post_scale=s, bias_before_scale=m.bias is not None)


@dataclass
class PostBias(Pattern):
    """``product + b`` with ``b`` varying only along the output's last dim."""

    product: Pattern

    through_layout = False

    def here(self, ctx, node, layout, st):
        for m, b in _post_op(ctx, node, layout, st, "add", self.product, "bias"):
            if m.bias is not None:
                ctx.fail(f"{node.name}: a second bias")
                continue
            yield m.with_(bias=b)


def _vector_along_last(ctx: Context, v: Any, out_shape: tuple, x: Node | None, role: str) -> str | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return None
    shape = ctx.shape(v)
    if shape is None:
        return f"no shape metadata for {role} {getattr(v, 'name', v)}"
    dtype = ctx.dtype(v)
    if dtype is not None and not dtype.is_floating_point:
        return f"{role} {v.name} is {dtype}, not floating"
    if len(shape) > len(out_shape) or any(not same_size(s, 1) for s in shape[:-1]) or \
            (len(shape) and not (same_size(shape[-1], out_shape[-1]) or same_size(shape[-1], 1))):
        return f"{role} {v.name} {list(shape)} does not vary along the output features only (output {list(out_shape)})"
    return ctx.from_activation(v, x, f"{role} {v.name}") if x is not None else None


@dataclass
class PerTokenQuantized(Pattern):
    """W8A8 with dynamic per-token activations, as written by hand::

        x_scale = x.abs().amax(dim=-1, keepdim=True) / 127        # or .max(-1, keepdim=True)[0] / 127
        x_q = (x / x_scale).round().clamp(-128 or -127, 127).to(torch.int8)
        out = int_product(x_q, w).to(dt) * x_scale * w_scale       # any order of the two scales

    where ``int_product`` is ``torch._int_mm(x_q, w.t())`` or ``x_q.to(int32) @ w.to(int32).t()``, and as
    torchao writes it (``Int8DynamicActivationInt8WeightConfig``, at the aten level)::

        x_scale = clamp(maximum(-minimum(amin(x, -1), 0), maximum(amax(x, -1), 0)) / 127, min=eps)
        x_q = (round(x * (reciprocal(x_scale) * 1.0)) + 0).clamp(-127, 127).to(torch.int8)

    This is the op's ``quantize_activation=True`` scheme (symmetric, amax / 127, round half to even, int32
    accumulation); the weight scale must be per output channel. Two spellings round differently where the
    op cannot follow: ``x * (1 / x_scale)`` may differ from ``x / x_scale`` in the last bit (a value at a
    rounding tie may land one int8 step away), and a ``clamp(min=eps)`` of the scale (eps at most 1e-5)
    changes tokens whose largest magnitude is below 127 * eps, which the op quantizes finer; both stay
    within the per-token quantization error bound, and docs/patterns.md says so.
    """

    product: Pattern  # a Matmul(int_activation=True)
    through_layout = False

    def here(self, ctx, node, layout, st):
        canon = canonical(node)
        if canon is not None and canon.kind == "reshape" and same_shape(ctx.shape(canon.inputs[0]), ctx.shape(node)):
            st, node = st.with_(node), canon.inputs[0]  # a view that keeps the shape (torchao's)
        out = ctx.shape(node)
        for (factors, inner), (i, cast) in ((f, c) for f in _three_factors(node) for c in enumerate(f[0])):
            canon = canonical(cast)
            if canon is None or canon.kind != "convert" or not (ctx.dtype(cast) or torch.int8).is_floating_point:
                continue
            for m in self.product.match(ctx, canon.inputs[0], layout, st.with_(cast)):
                if m.bias is not None:  # scaled per token: not the op's bias
                    ctx.fail(f"{node.name}: a bias inside the integer product")
                    continue
                found = self._activation(ctx, m.activation)
                if isinstance(found, str):
                    ctx.fail(found)
                    continue
                x, x_scale, chain = found
                rest = [f for j, f in enumerate(factors) if j != i]
                scaled = [f for f in rest if _base(f) is _base(x_scale)]
                if not scaled:
                    ctx.fail(f"{node.name}: the output is not rescaled by the activation scale {x_scale.name}")
                    continue
                (w_scale,) = [f for f in rest if f is not scaled[0]]
                reason = _vector_along_last(ctx, w_scale, out, x, "scale")
                if reason:
                    ctx.fail(reason)
                    continue
                yield m.with_(*inner, *chain, scaled[0], activation=x, post_scale=w_scale, quantize_activation=True)

    @staticmethod
    def _activation(ctx, x_q):
        """``x_q`` back to ``(x, x_scale, nodes)`` through the per-token quantization, or a reason."""
        chain = []
        node = _through_views(x_q, chain)
        c = canonical(node)
        if c is not None and c.kind == "convert" and ctx.dtype(node) in (torch.int32, torch.int64):
            chain.append(node)
            node = _through_views(c.inputs[0], chain)
        c = canonical(node)
        if c is None or c.kind != "convert" or ctx.dtype(node) != torch.int8:
            return "the integer matmul's activation is not cast to int8 from a per-token quantization"
        chain.append(node)
        node = _through_views(c.inputs[0], chain)
        c = canonical(node)
        if c is None or c.kind != "clamp" or c.params["max"] != 127 or c.params["min"] not in (-127, -128):
            return "activation quantization is not clamp(-128 or -127, 127)"
        chain.append(node)
        node = c.inputs[0]
        c = canonical(node)
        if c is not None and c.kind == "add" and _is_zero(c.inputs[1]):  # torchao adds its zero point, 0
            chain.append(node)
            node = c.inputs[0]
            c = canonical(node)
        if c is None or c.kind != "round":
            return "activation quantization does not round to nearest"
        chain.append(node)
        node = c.inputs[0]
        c = canonical(node)
        divided = _divided(c)
        if divided is None:
            return "activation quantization is not x / x_scale"
        chain.append(node)
        x, x_scale, steps = divided
        chain += steps
        scale = used = _through_views(x_scale, chain)  # ``used``: what rescales the output
        sc = canonical(scale)
        if sc is not None and sc.kind == "clamp" and sc.params["max"] is None and \
                isinstance(sc.params["min"], float) and 0 < sc.params["min"] <= 1e-5:
            chain.append(scale)
            scale = sc.inputs[0]
            sc = canonical(scale)
        amax = None
        if sc is not None and sc.kind == "div" and sc.inputs[1] == 127:
            amax = sc.inputs[0]
        elif sc is not None and sc.kind == "mul" and 1 / 127 in sc.inputs:
            amax = sc.inputs[0] if sc.inputs[1] == 1 / 127 else sc.inputs[1]
        found = _largest_magnitude(ctx, amax, x) if amax is not None else None
        if found is None:
            return "the activation scale is not amax(|x|, dim=-1) / 127 of the quantized x (per token, symmetric)"
        return x, used, chain + [scale] + found


def _base(node: Any) -> Any:
    """``node`` through views, expands and copies (the value they all share)."""
    while isinstance(node, Node):
        canon = canonical(node)
        if canon is None or canon.kind not in ("reshape", "expand", "noop"):
            break
        node = canon.inputs[0]
    return node


def _through_views(node: Any, chain: list) -> Any:
    """``node`` through views that keep its values' order (reshape kinds), adding them to ``chain``."""
    while isinstance(node, Node):
        canon = canonical(node)
        if canon is None or canon.kind not in ("reshape", "noop"):
            break
        chain.append(node)
        node = canon.inputs[0]
    return node


def _is_zero(value: Any) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0
    canon = canonical(_base(value))
    return canon is not None and canon.kind == "zeros_like"


def _divided(canon: Canon | None):
    """``x / s``, or ``x * (1 / s)`` (``reciprocal(s)``, maybe ``* 1.0``): ``(x, s, the nodes of 1 / s)``."""
    if canon is None:
        return None
    if canon.kind == "div":
        return canon.inputs[0], canon.inputs[1], []
    if canon.kind != "mul":
        return None
    for x, r in (canon.inputs, canon.inputs[::-1]):
        steps, rc = [], canonical(r)
        if rc is not None and rc.kind == "mul" and 1.0 in rc.inputs:  # reciprocal(s) * 1.0
            steps.append(r)
            r = rc.inputs[0] if rc.inputs[1] == 1.0 else rc.inputs[1]
            rc = canonical(r)
        if rc is not None and rc.kind == "reciprocal" and isinstance(x, Node):
            return x, rc.inputs[0], steps + [r]
    return None


def _largest_magnitude(ctx: Context, node: Any, x: Node) -> list | None:
    """The nodes computing max |x| along x's last dim, for ``node`` = ``amax(abs(x), -1)`` or torchao's
    ``maximum(-minimum(amin(x, -1), 0), maximum(amax(x, -1), 0))`` (x through views, keepdim or not), or
    None."""
    chain = []
    node = _through_views(node, chain)
    xs = ctx.shape(x)
    last = (-1, len(xs) - 1) if xs is not None else (-1,)

    def reduced(n, kind, of_abs):
        c = canonical(_through_views(n, chain))
        if c is None or c.kind != kind or len(c.params["dim"]) != 1 or c.params["dim"][0] not in last:
            return False
        src = c.inputs[0]
        if of_abs:
            ac = canonical(src)
            if ac is None or ac.kind != "abs":
                return False
            chain.append(src)
            src = ac.inputs[0]
        chain.append(_through_views(n, []))
        return _base(src) is _base(x) and same_shape(ctx.shape(src), xs)

    if reduced(node, "amax", True):
        return chain
    c = canonical(node)
    if c is None or c.kind != "maximum":
        return None
    for neg, pos in (c.inputs, c.inputs[::-1]):
        nc, pc = canonical(neg), canonical(pos)
        if nc is None or nc.kind != "neg" or pc is None or pc.kind != "maximum":
            continue
        mc = canonical(nc.inputs[0])
        if mc is None or mc.kind != "minimum":
            continue
        lows = [a for a in mc.inputs if not _is_zero(a)]
        highs = [a for a in pc.inputs if not _is_zero(a)]
        if len(lows) == 1 and len(highs) == 1 and reduced(lows[0], "amin", False) and reduced(highs[0], "amax", False):
            zeros = [a for a in (*mc.inputs, *pc.inputs) if isinstance(a, Node) and _is_zero(a)]
            return chain + [node, neg, pos, nc.inputs[0], *zeros]
    return None


def _three_factors(node):
    """``(a * b) * c`` and ``a * (b * c)`` as ``([a, b, c], [mul nodes])`` candidates."""
    c = canonical(node)
    if c is None or c.kind != "mul":
        return []
    found = []
    for i, operand in enumerate(c.inputs):
        sub = canonical(operand)
        if sub is not None and sub.kind == "mul":
            found.append(([*sub.inputs, c.inputs[1 - i]], [node, operand]))
    return found
