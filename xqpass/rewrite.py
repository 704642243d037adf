"""The matcher driver: ``xqpass.rewrite(gm)`` turns every dequantize -> matmul subgraph of an FX graph
into one ``torch.ops.xq.quantized_matmul`` node, and reports what it rewrote and what it left alone.

Works on torch-level graphs (Dynamo, ``torch.fx.symbolic_trace``) and aten-level graphs (AOT,
``torch.export``); the patterns are in :mod:`xqpass.patterns.catalogue`. Nodes of a match are erased
only when nothing else uses them (a dequantized weight saved for backward keeps its users).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch.fx import GraphModule, Node

from .patterns.catalogue import PRODUCT_FORMS, ROOT_KINDS
from .patterns.dsl import Context, Match
from .patterns.fold import mutates, written
from .patterns.replacement import Rejected, build_call
from .patterns.spellings import canonical
from .patterns.stacks import hoist_stacked_banks
from .quant.layouts import PER_CHANNEL

log = logging.getLogger("xqpass")

_MATMUL_KINDS = ("linear", "matmul", "addmm")
_DEQUANT_HINT_KINDS = ("convert", "mul", "sub", "dequantize_per_channel", "dequantize_per_tensor", "bitand", "rshift")


@dataclass
class Rewritten:
    """One dequantize -> matmul replaced by the op."""

    node: str  # the node that now holds the op's result
    layer: str  # the module path, where the graph records it
    pattern: str  # product form / weight form
    format: dict  # bits, weight dtype, layout (block_size, by_rows), zero point, packed, N, K

    def __str__(self) -> str:
        f = self.format
        layout = f["layout"]
        gran = layout.name if layout.block_size == PER_CHANNEL else f"{layout.name}(B={layout.block_size})"
        if layout.block_n > 1:
            gran = f"{layout.name}({layout.block_n}x{layout.block_size})"
        act = "A8" if f.get("quantize_activation") else "A16"
        fmt = (f"W{f['bits']}{act}{' packed' if f['packed'] else ''} ({f['weight_dtype']}) {gran} "
               f"{'asym' if f['zero_point'] else 'sym'} [{f['N']}x{f['K']}]"
               f"{', unpacked once' if f.get('unpacked_once') else ''}"
               f"{', unpacked on every call (no values here to unpack it once)' if f.get('unpacked_each_call') else ''}"
               f"{', input features sorted by group index' if f.get('group_index') else ''}")
        if f.get("experts"):
            return (f"{self.layer or self.node}: {self.pattern} -> xq.quantized_grouped_matmul {fmt}, a bank of "
                    f"{f['experts']} experts")
        return f"{self.layer or self.node}: {self.pattern} -> xq.quantized_matmul {fmt}"


@dataclass
class Missed:
    """A matmul whose weight looks dequantized but that the pass left alone, and why."""

    node: str
    layer: str
    reason: str

    def __str__(self) -> str:
        return f"{self.layer or self.node}: not rewritten: {self.reason}"


@dataclass
class RewriteReport:
    """What one run of the pass did to one graph."""

    rewrites: list[Rewritten] = field(default_factory=list)
    misses: list[Missed] = field(default_factory=list)
    graph: str = ""

    def __str__(self) -> str:
        lines = [f"xqpass: {self.graph or 'graph'}: {len(self.rewrites)} rewritten, {len(self.misses)} missed"]
        lines += [f"  + {r}" for r in self.rewrites]
        lines += [f"  - {m}" for m in self.misses]
        return "\n".join(lines)


def _dotted(path: str) -> str:
    """A Dynamo source or module path as the model names it: "L['self'].layers[0].mlp" -> "layers.0.mlp"."""
    path = re.sub(r"^L\['[^']*'\]\.?|^L__self___", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    return re.sub(r"(^|\.)_(modules|parameters|buffers)\.", r"\1", path).strip(".")


def _layer_name(node: Node) -> str:
    stack = node.meta.get("nn_module_stack")
    return _dotted(str(list(stack.values())[-1][0])) if stack else ""


def _state_name(node: Any) -> str:
    """The model's name of the tensor ``node`` reads: an expert bank is named by its weight, since one experts
    module holds several banks."""
    if isinstance(node, Node) and node.op == "get_attr":
        return str(node.target)
    if isinstance(node, Node) and node.target is torch.ops.aten.stack.default:  # experts stacked: "experts.*.w1.q"
        names = [_state_name(item).split(".") for item in node.args[0]]
        if all(names) and len({len(n) for n in names}) == 1:
            return ".".join(parts[0] if len(set(parts)) == 1 else "*" for parts in zip(*names))
    source = getattr(node.meta.get("grapharg"), "source", None) if isinstance(node, Node) else None
    return _dotted(source.name()) if source is not None else ""


def _propagate_metadata(gm: GraphModule, example_inputs: Iterable[Any]) -> None:
    """FakeTensor metadata for a graph captured without it (``symbolic_trace``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
                                         for t in example_inputs])


def _looks_dequantized(node: Node) -> bool:
    """A matmul whose weight operand is computed (cast, scaled, unpacked...): a rewrite candidate."""
    canon = canonical(node)
    if canon is not None and canon.kind == "scaled_linear":  # a library's quantized matmul op
        return True
    if canon is not None and canon.kind == "einsum":  # with weights gathered by routing ids: an expert bank
        return any((canonical(a) or canon).kind == "take" for a in canon.inputs[0])
    if canon is None or canon.kind not in (*_MATMUL_KINDS, "grouped_mm"):  # grouped_mm: (x, bank, offsets)
        return False
    weight = canon.inputs[2] if canon.kind == "addmm" else canon.inputs[1]
    value = weight.meta.get("val", weight.meta.get("example_value")) if isinstance(weight, Node) else None
    if isinstance(value, torch.Tensor) and value.dtype in (torch.int8, torch.uint8):  # an integer matmul (W8A8)
        return True
    frontier, seen = [weight], set()
    for _ in range(8):
        nxt = []
        for n in frontier:
            if not isinstance(n, Node) or n in seen:
                continue
            seen.add(n)
            c = canonical(n)
            if c is None:
                continue
            if c.kind in _DEQUANT_HINT_KINDS:
                return True
            nxt.extend(a for a in n.all_input_nodes)
        frontier = nxt
    return False


def _folded_weight(node: Node) -> bool:
    """A matmul whose weight is a float constant ``torch.fx``'s tracer made by running buffer-only code
    while tracing (``_tensor_constant*``): the dequantization happened at trace time, no integer weight
    is left in the graph to keep."""
    canon = canonical(node)
    if canon is None or canon.kind not in (*_MATMUL_KINDS, "grouped_mm"):  # grouped_mm: (x, bank, offsets)
        return False
    weight = canon.inputs[2] if canon.kind == "addmm" else canon.inputs[1]
    if not isinstance(weight, Node) or weight.op != "get_attr" or not str(weight.target).startswith("_tensor_constant"):
        return False
    value = getattr(node.graph.owning_module, str(weight.target), None)
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _has_shapes(gm: GraphModule) -> bool:
    """Whether the graph's inputs carry the shape metadata the patterns read (Dynamo, AOT and export
    record it; ``symbolic_trace`` does not)."""
    return all("val" in n.meta or "example_value" in n.meta for n in gm.graph.find_nodes(op="placeholder"))


def _model_state(gm: GraphModule, exported, names: Iterable[str]) -> frozenset:
    """The placeholders that hold parameters and buffers, as each graph level records them: Dynamo's
    source of a lifted input (an ``nn.Module`` attribute), AOT's input descriptor, the export signature,
    and ``names`` from the caller (the backend passes AOT's static inputs: the Dynamo graph's parameters
    and buffers, flattened). A placeholder nothing vouches for is taken as data; ``symbolic_trace``
    keeps parameters as ``get_attr`` nodes, never graph inputs."""
    names = set(names)
    if exported is not None:
        from torch.export.graph_signature import InputKind

        names |= {spec.arg.name for spec in exported.graph_signature.input_specs
                  if spec.kind != InputKind.USER_INPUT and hasattr(spec.arg, "name")}
    return frozenset(n for n in gm.graph.find_nodes(op="placeholder") if n.name in names or _recorded_as_state(n))


def _recorded_as_state(placeholder: Node) -> bool:
    """Whether Dynamo (an input lifted from an ``nn.Module``) or AOT (a parameter / buffer descriptor, as
    ``aot_export_module`` writes) records the placeholder as a parameter or buffer."""
    source = getattr(placeholder.meta.get("grapharg"), "source", None)
    if source is not None:
        guard = source.guard_source()
        return guard.is_specialized_nn_module() or guard.is_unspecialized_nn_module() or guard.is_fsdp_module()
    desc = placeholder.meta.get("desc")
    return desc is not None and (desc.is_param() or desc.is_buffer())


def _erase_unused(gm: GraphModule, nodes: Iterable[Node]) -> None:
    """Erase the nodes nothing uses any more, users before their inputs (nodes compare in graph order). An
    in-place write goes only with the tensor it writes, once nothing else reads that tensor."""
    for n in sorted(nodes, reverse=True):
        if n.users or n.op in ("placeholder", "get_attr", "output"):
            continue
        if mutates(n) and not all(mutates(u) for u in written(n).users):
            continue
        gm.graph.erase_node(n)


def rewrite(graph_module, example_inputs: Iterable[Any] | None = None, *, name: str = "",
            model_state: Iterable[str] = (), may_compute_once=None) -> RewriteReport:
    """Rewrite every dequantize -> matmul in ``graph_module`` (in place) into ``xq.quantized_matmul``.

    ``graph_module``: a ``torch.fx.GraphModule`` (torch-level or aten-level) or a
    ``torch.export.ExportedProgram``. Shapes come from node metadata; for a graph without it (e.g. from
    ``symbolic_trace``) pass ``example_inputs`` to propagate fake tensors first. Returns a
    :class:`RewriteReport`: ``.rewrites`` (layer, pattern, format) and ``.misses`` (near misses with the
    reason, e.g. a scale along the input axis, a float weight, a scale computed from the activation).

    A scale, zero point or weight computed from the activation is refused; parameters and buffers are
    never the activation's data. Each graph level records which placeholders hold them (Dynamo's sources,
    AOT's descriptors, the export signature); ``model_state`` names more (placeholder names), for graphs
    that do not record it.

    A weight the graph unpacks from parameters and buffers is computed once from ``example_inputs``' real
    values (docs/patterns.md); ``may_compute_once(values)`` may refuse it for some sources (the backends
    refuse tensors split over devices), leaving the unpacking in the graph.
    """
    exported = None
    if isinstance(graph_module, torch.export.ExportedProgram):
        exported, graph_module = graph_module, graph_module.graph_module
    if not isinstance(graph_module, GraphModule):
        raise TypeError(f"rewrite expects a torch.fx.GraphModule or torch.export.ExportedProgram, "
                        f"got {type(graph_module).__name__}")
    gm = graph_module
    if example_inputs is not None:
        example_inputs = list(example_inputs)
        if not _has_shapes(gm):
            _propagate_metadata(gm, example_inputs)
    report = RewriteReport(graph=name)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    values = dict(zip(placeholders, example_inputs)) if example_inputs and len(example_inputs) == len(placeholders) else {}
    ctx = Context(gm, model_state=_model_state(gm, exported, model_state), values=values,
                  may_compute_once=may_compute_once)
    hoist_stacked_banks(ctx)
    consumed: set[Node] = set()
    failures: dict[Node, list] = {}

    for node in reversed(list(gm.graph.nodes)):
        if node in consumed or node.op != "call_function" and node.op != "call_method":
            continue
        canon = canonical(node)
        if canon is None or canon.kind not in ROOT_KINDS:
            continue
        done = False
        ctx.failures = []
        for product in PRODUCT_FORMS:
            for match in product.pattern.match(ctx, node, None, Match()):
                try:
                    result, desc = build_call(ctx, node, match)
                except Rejected as e:
                    ctx.fail(str(e))
                    ctx.computed_once = set()
                    continue
                result.meta.update({k: node.meta[k] for k in ("nn_module_stack", "stack_trace", "source_fn_stack")
                                    if k in node.meta})
                layer = (match.expert_ids is not None and _state_name(match.weight)) or _layer_name(node)
                record = Rewritten(result.name, layer, f"{product.name} / {match.form}", desc)
                node.replace_all_uses_with(result)
                consumed.update(match.nodes | {node})
                _erase_unused(gm, match.nodes | {node} | ctx.computed_once)
                ctx.computed_once = set()
                report.rewrites.append(record)
                log.info("xqpass: rewrote %s", record)
                done = True
                break
            if done:
                break
        if not done and ctx.failures:
            failures[node] = list(ctx.failures)

    no_shapes = "the graph records no shapes (torch.fx.symbolic_trace does not): pass example_inputs"
    default_reason = "no pattern matches its weight's computation" if _has_shapes(gm) else no_shapes
    for node in gm.graph.nodes:
        if node in consumed:
            continue
        if _folded_weight(node):
            miss = Missed(node.name, _layer_name(node), (
                "its weight is a float constant computed while tracing (torch.fx's tracer runs code that reads "
                "only buffers): a dequantization there leaves no quantized weight in the graph; trace with a "
                "Tracer whose proxy_buffer_attributes is True, or capture with torch.export / torch.compile"))
            report.misses.append(miss)
            log.info("xqpass: %s", miss)
            continue
        if not _looks_dequantized(node):
            continue
        related, frontier = [node], [node]
        for _ in range(4):  # the roots a product can end in: casts, scales, biases, views above it
            frontier = [u for n in frontier for u in n.users]
            related += frontier
        found = [f for n in related for f in failures.get(n, [])]
        reason = max(found, key=lambda f: f[0])[1] if found else default_reason
        miss = Missed(node.name, _layer_name(node), reason)
        report.misses.append(miss)
        log.info("xqpass: %s", miss)

    gm.graph.lint()
    gm.recompile()
    if exported is not None:
        _sync_exported_outputs(exported)
    return report


def _sync_exported_outputs(ep) -> None:
    """Point the ExportedProgram's output specs at the nodes that now produce its outputs."""
    output = next(n for n in ep.graph.nodes if n.op == "output")
    for spec, value in zip(ep.graph_signature.output_specs, output.args[0]):
        if isinstance(value, Node) and hasattr(spec.arg, "name"):
            spec.arg.name = value.name
