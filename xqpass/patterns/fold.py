"""Integer weights unpacked inside the graph, computed once instead of on every call.

Libraries keep 4-bit weights in words and unpack them in ``forward``: shifts and masks over int32 words
packed along K or N, AWQ's interleaved nibble order, nibbles written into an ``empty`` tensor, ``stack`` /
``cat`` of halves, their own unpack op. Whatever the spelling, such a computation reads only parameters,
buffers and constants, so its result is a function of the model's state. The pass runs it once
(:class:`Fold`), on CPU with torch's semantics (torch_xla 2.9 gets ``>>`` of negative integers wrong),
and keeps the result in the op's layout as a buffer of the graph module: ``[N, K]`` int8 / uint8, packed
two a byte when its values provably fit four bits. The bounds are proved from the graph
(:func:`.bounds.value_bounds`), never read from the data, so every recomputation fits the storage chosen at rewrite
time. :class:`Folds` recomputes a weight when a source tensor is replaced or modified in place; the
backends call it before each call of the compiled graph, and a rewritten ``GraphModule`` before each
``forward``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.fx import Graph, GraphModule, Node

from ..quant.layouts import pack_int4
from .bounds import SELECTIONS
from .dsl import KN, NK, Axes, Context
from .spellings import canonical

#: the key of a graph module's :class:`Folds` in ``gm.meta``
FOLDS = "xqpass_folds"
#: names of the ops that draw random numbers: their value differs between calls, nothing to compute once
_RANDOM = ("rand", "bernoulli", "dropout", "normal", "uniform", "multinomial", "poisson", "exponential",
           "geometric", "cauchy", "log_normal")

# ----------------------------------------------------------------------------------------------
# the subgraph that computes a weight from the model's state


@dataclass
class Subgraph:
    """The nodes (graph order) computing a value from ``sources``: parameters, buffers (placeholders the
    graph records as model state, or ``get_attr``) and constants."""

    nodes: list
    sources: list

    def __or__(self, other: "Subgraph") -> "Subgraph":
        return Subgraph(sorted(set(self.nodes) | set(other.nodes)), sorted(set(self.sources) | set(other.sources)))


def mutates(node: Node) -> bool:
    target = node.target
    if node.op == "call_method":
        return target.endswith("_") and not target.endswith("__") or target == "__setitem__"
    if target is operator.setitem:
        return True
    schema = getattr(target, "_schema", None)
    return schema is not None and schema.is_mutable


def _random(node: Node) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded in target.tags
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return any(word in name for word in _RANDOM)


def written(node: Node) -> Node:
    """The tensor an in-place op writes (its first operand), through the views it was written through."""
    base = node.args[0]
    while isinstance(base, Node):
        canon = canonical(base)
        if canon is None or canon.kind not in ("reshape", "transpose", "permute", "noop") and \
                base.target not in SELECTIONS:
            break
        base = base.args[0]
    return base


def state_subgraph(ctx: Context, node: Node) -> Subgraph | str:
    """The subgraph computing ``node`` from graph inputs and attributes (parameters, buffers, or tensors a
    graph break passed in: :class:`Folds` recomputes when one is another tensor or was modified), or why
    there is none: random numbers, a module call, or an in-place write into a source. The caller refuses
    a weight computed from the activation (:meth:`Context.from_activation`)."""
    nodes, sources, todo = set(), set(), [node]
    while todo:
        n = todo.pop()
        if n in nodes or n in sources:
            continue
        if n.op in ("get_attr", "placeholder"):  # a graph input that is not state: checked on every call
            sources.add(n)
            continue
        if n.op not in ("call_function", "call_method"):
            return f"it is computed by {n.op} {n.target}"
        if _random(n):
            return f"it is computed with random numbers ({n.name})"
        nodes.add(n)
        todo.extend(n.all_input_nodes)
        # a tensor made in the graph and filled in place (``w = empty(...); w[:, 0::2] = lo``): its writes
        # before it is first read are part of the computation
        writes = [u for u in n.users if mutates(u) and written(u) is n]
        first_read = min((u for u in n.users if u not in writes), default=None)
        todo.extend(u for u in writes if first_read is None or u < first_read)
    for n in nodes:
        if mutates(n) and written(n) in sources:
            return f"{n.name} writes into the parameter or buffer {written(n).name}"
    return Subgraph(sorted(nodes), sorted(sources))


def unpacks(subgraph: Subgraph) -> bool:
    """Whether a subgraph computes values (shifts, masks, reorders, writes), not just views or casts of
    what is stored: only then is computing it once worth a copy of the result."""
    return any(canonical(n) is None or canonical(n).kind not in _VIEWS_AND_CASTS for n in subgraph.nodes)


_VIEWS_AND_CASTS = ("noop", "reshape", "transpose", "permute", "expand", "convert")


# ----------------------------------------------------------------------------------------------
# computing a weight once, and again when its sources change


def _to_rows(value: torch.Tensor, tags: Axes, n: int) -> torch.Tensor:
    """A weight seen with axis tags ``tags`` as ``[N, K]``."""
    if tags == NK:
        return value
    if tags == ("NG", "g"):
        return value.reshape(n, -1)
    if tags == KN:
        return value.t()
    if tags == ("N", "G", "g"):
        return value.reshape(value.shape[0], -1)
    if tags == ("G", "g", "N"):
        return value.reshape(-1, value.shape[-1]).t()
    raise ValueError(f"no [N, K] view of a weight with axes {tags}")


def sorted_order(index: torch.Tensor, groups: int) -> torch.Tensor:
    """The input features sorted by group (stable), from the group index of each (``g_idx``); a ValueError
    unless every group holds K / groups features, as the op's contiguous groups need."""
    k = index.numel()
    counts = torch.bincount(index.reshape(-1).long().clamp(0, groups), minlength=groups + 1) \
        if k else torch.zeros(groups + 1, dtype=torch.long)
    if index.dim() != 1 or k % groups or bool((counts[:groups] != k // groups).any()) or int(counts[groups]):
        raise ValueError(f"xqpass: the group index (g_idx) must give each of the {groups} groups exactly "
                         f"{k // max(groups, 1)} of the {k} input features; got group sizes {counts.tolist()} "
                         f"(the compiled graph reads the weight in groups of equal size)")
    return torch.argsort(index.reshape(-1), stable=True)


@dataclass
class Fold:
    """A tensor computed from the model's state by ``module`` (its inputs: the sources' values), then:

    * ``kind="value"``: kept as computed (a zero point unpacked from words);
    * ``kind="weight"``: stored ``[N, K]`` (from the axis tags ``tags``) in ``storage``, two values a
      byte when ``packed``; when the module also returns a group index (``g_idx``), its input features
      sorted by group, so that each group of ``K / groups`` is contiguous;
    * ``kind="order"``: the module returns a group index; the permutation sorting the input features by
      group (the activation is read in that order).
    """

    module: GraphModule
    kind: str = "value"
    tags: Axes | None = None
    storage: torch.dtype | None = None
    packed: bool = False
    groups: int | None = None
    n: int | None = None  # output features (a flat [N * G, g] weight does not say)

    @classmethod
    def of(cls, subgraph: Subgraph, outputs: Node | tuple, **fields: Any) -> "Fold":
        graph, env = Graph(), {}
        for source in subgraph.sources:
            env[source] = graph.placeholder(source.name)
        cpu = torch.device("cpu")
        for n in subgraph.nodes:
            copy = env[n] = graph.node_copy(n, lambda a: env[a])
            # computed on CPU: tensors the graph makes on the model's device (an arange of shift amounts) too
            copy.args = tuple(cpu if isinstance(a, torch.device) else a for a in copy.args)
            if isinstance(copy.kwargs.get("device"), (torch.device, str)):
                copy.kwargs = {**copy.kwargs, "device": cpu}
        graph.output(tuple(env[o] for o in outputs) if isinstance(outputs, tuple) else env[outputs])
        return cls(GraphModule(torch.nn.Module(), graph), **fields)

    def compute(self, values: list, device: torch.device) -> torch.Tensor:
        """The tensor from the sources' ``values``, on ``device``; computed on CPU, where torch's integer
        semantics hold."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        # real tensors, also when the pass runs inside AOT autograd's fake mode
        with torch.no_grad(), unset_fake_temporarily():
            value = self.module(*[v.detach().to("cpu") for v in values])
            if self.kind == "order":
                value = sorted_order(value, self.groups)
            elif self.kind == "weight":
                value, index = value if isinstance(value, tuple) else (value, None)
                value = _to_rows(value, self.tags, self.n)
                if index is not None:
                    value = value[:, sorted_order(index, self.groups)]
                value = value.to(self.storage)  # within the storage's range: proved
                if self.packed:
                    value = pack_int4(value, axis=1)
            return value.contiguous().to(device)


@dataclass
class _Entry:
    fold: Fold
    buffer: str  # the graph module's attribute holding the stored weight
    sources: list  # ("input", placeholder index) or ("attr", dotted path)
    seen: list  # the sources' tensors and versions when it was last computed


@dataclass
class Folds:
    """The weights computed once for one graph module, and how to recompute them."""

    entries: list = field(default_factory=list)

    @staticmethod
    def of(gm: GraphModule) -> "Folds":
        folds = gm.meta.get(FOLDS)
        if folds is None:
            folds = gm.meta[FOLDS] = Folds()
            gm.register_forward_pre_hook(lambda module, args: folds.refresh(module, args))
        return folds

    def add(self, gm: GraphModule, fold: Fold, sources: list[Node], values: list, device) -> str:
        """Compute ``fold`` from ``values`` and keep it as a new buffer of ``gm``; returns its name."""
        name = f"_xqpass_unpacked_{len(self.entries)}"
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, fold.compute(values, device))
        sources_of = getattr(gm, "_param_name_to_source", None)
        if sources_of is not None:  # a Dynamo graph: AOT autograd asks where each buffer came from
            from torch._dynamo.source import ConstantSource

            sources_of[name] = ConstantSource(name)
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        refs = [("input", placeholders.index(s)) if s.op == "placeholder" else ("attr", str(s.target))
                for s in sources]
        self.entries.append(_Entry(fold, name, refs, [(v, v._version) for v in values]))
        return name

    def refresh(self, gm: GraphModule, args) -> None:
        """Recompute every weight whose sources (among ``args``, the graph's inputs, and ``gm``'s
        attributes) are other tensors than last time, or were modified in place since."""
        for entry in self.entries:
            values = [args[i] if kind == "input" else attribute(gm, i) for kind, i in entry.sources]
            if all(v is old and v._version == version for v, (old, version) in zip(values, entry.seen)):
                continue
            if any(isinstance(v, torch._subclasses.FakeTensor) for v in values) or torch.compiler.is_compiling():
                continue  # tracing the graph, not running it
            stored = getattr(gm, entry.buffer)
            with torch.no_grad():
                stored.copy_(entry.fold.compute(values, stored.device))
            entry.seen = [(v, v._version) for v in values]

    def guard(self, gm: GraphModule, compiled: Callable) -> Callable:
        """``compiled`` (a compiled ``gm``) refreshing the weights before each call."""
        if getattr(compiled, "_boxed_call", False):
            def run_boxed(args):
                self.refresh(gm, args)
                return compiled(args)

            run_boxed._boxed_call = True
            return run_boxed

        def run(*args):
            self.refresh(gm, args)
            return compiled(*args)

        return run


def attribute(gm: GraphModule, path: str) -> Any:
    obj = gm
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
