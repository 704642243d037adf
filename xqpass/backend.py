"""``torch.compile`` backends: the pass, then a compiler.

* ``xq_openxla``: the pass, then torch_xla's ``openxla`` compiler (XLA devices).
* ``xq_eager``: the pass, then plain eager execution of the rewritten graph (CPU; for debugging, and
  for tensor subclasses that cannot move to an XLA device).

Both run the pass twice: on Dynamo's torch-level graph (where layers keep their module names), then,
inside AOT autograd, on the aten-level graph (where tensor subclasses such as torchao's have been
flattened into plain ops). ``xq_eager`` skips AOT where the aten level has nothing to find (no miss at
the torch level, no tensor subclass, no higher-order op): the rewritten graph then runs as Dynamo's own
``eager`` backend runs a graph, without AOT's per-call wrappers. Registered on ``import xqpass`` and through the ``torch_dynamo_backends``
entry point, so ``torch.compile(model, backend="xq_openxla")`` works in a fresh process.

The compiler after the pass is a parameter of the public factory :func:`make_backend`: a name from
:data:`COMPILERS` ("eager", "openxla") or any ``compiler(gm, example_inputs)``; another lowering
(Inductor, a TorchTPU backend) plugs in here without touching the patterns.
"""
from __future__ import annotations

import logging
import operator
from typing import Callable

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.registry import register_backend

from .patterns.fold import FOLDS
from .rewrite import RewriteReport, rewrite

log = logging.getLogger("xqpass")

Compiler = Callable[[torch.fx.GraphModule, list], Callable]


def eager_compiler(gm: torch.fx.GraphModule, example_inputs) -> Callable:
    """No compiler: the rewritten graph runs as Python, op by op (CPU, debugging, ``explain``)."""
    return gm.forward


def openxla_compiler(gm: torch.fx.GraphModule, example_inputs) -> Callable:
    """torch_xla's ``openxla`` compiler (boxed: AOT's calling convention)."""
    from torch._dynamo.backends.torchxla import openxla_eval_boxed

    return openxla_eval_boxed(gm, example_inputs)


#: the compilers :func:`make_backend` knows by name: (compiler, whether it returns a boxed function)
COMPILERS = {"eager": (eager_compiler, False), "openxla": (openxla_compiler, True)}


def make_backend(compiler: str | Compiler = "openxla", *, boxed: bool = False, reports: list | None = None,
                 name: str = "xq"):
    """A Dynamo backend: the pass on the torch-level graph, AOT autograd, the pass on the aten-level
    forward graph, then the compiler. ``compiler``: "eager" or "openxla" (:data:`COMPILERS`), or any
    ``compiler(gm, example_inputs)``, with ``boxed`` saying whether it returns a boxed function (AOT's
    calling convention). Each graph's :class:`~xqpass.rewrite.RewriteReport` is appended to ``reports``
    when given; ``name`` prefixes the reports' graph names."""
    runs_as_python = compiler == "eager"
    if isinstance(compiler, str):
        if compiler not in COMPILERS:
            raise ValueError(f"make_backend: unknown compiler {compiler!r}; expected one of {sorted(COMPILERS)} "
                             f"or a callable compiler(gm, example_inputs)")
        compiler, boxed = COMPILERS[compiler]
    state = {"graphs": 0, "dynamo_graph": None, "inputs": None}

    def after_aot(gm: torch.fx.GraphModule, example_inputs):
        real = _real_aot_inputs(gm, state["dynamo_graph"], state["inputs"])
        report = rewrite(gm, real, name=f"{name} graph {state['graphs']} (aten)", model_state=aot_static_inputs(gm),
                         may_compute_once=_on_one_device)
        _record(report, reports)
        correct_shifts(gm)
        compiled = compiler(gm, example_inputs)
        if not boxed:
            from functorch.compile import make_boxed_func

            compiled = make_boxed_func(compiled)
        folds = gm.meta.get(FOLDS)
        return folds.guard(gm, compiled) if folds else compiled

    aot = aot_autograd(fw_compiler=after_aot)

    def backend(gm: torch.fx.GraphModule, example_inputs):
        # Dynamo's example inputs are the real parameters and buffers: weights the graph unpacks from them
        # are computed once here, and again before a call whose sources changed (xqpass.patterns.fold)
        report = rewrite(gm, example_inputs, name=f"{name} graph {state['graphs']} (torch)",
                         may_compute_once=_on_one_device)
        _record(report, reports)
        correct_shifts(gm)
        state.update(dynamo_graph=gm, inputs=example_inputs)
        try:
            if runs_as_python and not _needs_aten_level(gm, example_inputs, report):
                compiled = gm.forward  # as Dynamo's own "eager": AOT's wrappers cost ~150 us a call
            else:
                compiled = aot(gm, example_inputs)
        finally:
            state.update(graphs=state["graphs"] + 1, dynamo_graph=None, inputs=None)
        folds = gm.meta.get(FOLDS)
        return folds.guard(gm, compiled) if folds else compiled

    return backend


def _needs_aten_level(gm: torch.fx.GraphModule, example_inputs, report: RewriteReport) -> bool:
    """Whether the aten level may find what the torch level cannot: a product the torch-level pass missed,
    a tensor subclass (its dequantization is only seen once AOT flattens it), a higher-order op (an
    ``autograd.Function`` or other body Dynamo keeps as a subgraph). Otherwise the rewritten torch-level
    graph runs as it is: the eager compiler would run the same ops."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if report.misses or any(is_traceable_wrapper_subclass(v)
                            for v in (*example_inputs, *gm.parameters(), *gm.buffers())):
        return True
    return any(isinstance(n.target, torch._ops.HigherOrderOperator) for n in gm.graph.nodes)


def _on_one_device(values) -> bool:
    """Whether no tensor is split over devices (torch_xla SPMD): a weight computed once from split sources
    would be whole on every device, and its computation in the graph keeps the user's shardings."""
    if not any(isinstance(v, torch.Tensor) and v.device.type == "xla" for v in values):
        return True
    import torch_xla

    return not any(isinstance(v, torch.Tensor) and v.device.type == "xla" and
                   torch_xla._XLAC._get_xla_sharding_spec(v) for v in values)


def _real_aot_inputs(aot_graph: torch.fx.GraphModule, dynamo_graph, inputs) -> list | None:
    """The real values of an AOT forward graph's inputs: the Dynamo graph's own parameters and buffers, then
    its inputs, tensor subclasses (torchao's, quanto's) flattened into their inner tensors as AOT flattens
    them; None unless every one matches its placeholder's shape and dtype. An unpacking only the aten level
    sees (inside a subclass) is computed once from them."""
    if dynamo_graph is None or inputs is None:
        return None
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    flat = []

    def add(value):
        if is_traceable_wrapper_subclass(value):
            for attr in value.__tensor_flatten__()[0]:
                add(getattr(value, attr))
        else:
            flat.append(value)

    for value in (*dict(dynamo_graph.named_parameters(remove_duplicate=False)).values(),
                  *dict(dynamo_graph.named_buffers(remove_duplicate=False)).values(), *inputs):
        add(value)
    placeholders = list(aot_graph.graph.find_nodes(op="placeholder"))
    if len(flat) != len(placeholders):
        return None
    for node, value in zip(placeholders, flat):
        meta = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        if not (isinstance(meta, torch.Tensor) and meta.dtype == value.dtype and meta.dim() == value.dim()):
            return None
        if any(isinstance(m, int) and m != v for m, v in zip(meta.shape, value.shape)):  # (symbolic dims pass)
            return None
    return flat


#: the right shifts torch_xla 2.9 computes wrong, and whether each is in place. It lowers ``>>`` (every
#: ``__rshift__`` / ``__irshift__``) as a division by 2**s, which rounds negative values toward zero
#: (``-1 >> 1`` is 0), fails to lower a Python-int shift by bits-1 (2**7 overflows int8), and with a shift
#: tensor that is not 0-dim returns 0 for any nonzero shift, unsigned too; ``bitwise_right_shift`` by
#: a Python int returns int64. ``aten.bitwise_right_shift.Tensor`` with a shift tensor of the operand's dtype
#: is right for every dtype in ``_SHIFTED_DTYPES`` (measured against CPU on XLA:CPU).
_WRONG_SHIFTS = {
    **dict.fromkeys([operator.rshift, "__rshift__", torch.bitwise_right_shift, "bitwise_right_shift",
                     torch.ops.aten.__rshift__.Scalar, torch.ops.aten.__rshift__.Tensor,
                     torch.ops.aten.bitwise_right_shift.Tensor_Scalar], False),
    **dict.fromkeys([operator.irshift, "__irshift__", "bitwise_right_shift_", torch.ops.aten.__irshift__.Scalar,
                     torch.ops.aten.__irshift__.Tensor, torch.ops.aten.bitwise_right_shift_.Tensor_Scalar], True),
}
#: the dtypes CPU shifts (uint16/32/64 have no CPU kernel, and XLA's bitwise_right_shift makes them signed)
_SHIFTED_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def correct_shifts(gm: torch.fx.GraphModule) -> int:
    """Rewrite the right shifts of integer tensors that torch_xla 2.9 computes wrong (:data:`_WRONG_SHIFTS`)
    into ``aten.bitwise_right_shift(_).Tensor``, a Python-int (or SymInt) shift amount becoming a 0-dim tensor
    and both operands taking the result's dtype (XLA promotes a 0-dim shift of another dtype wrong). Works on
    Dynamo's torch-level graph and on AOT's aten-level one; CPU computes both spellings alike. Returns how
    many nodes it changed."""
    aten, changed = torch.ops.aten, 0

    def val(n):
        return n.meta.get("val", n.meta.get("example_value")) if isinstance(n, torch.fx.Node) else None

    for node in list(gm.graph.nodes):
        inplace = _WRONG_SHIFTS.get(node.target) if node.op in ("call_function", "call_method") else None
        args = [*node.args, *(node.kwargs[k] for k in ("input", "self", "other") if k in node.kwargs)]
        if inplace is None or len(args) != 2:
            continue
        (x, s), out = args, val(node)
        dtype = out.dtype if isinstance(out, torch.Tensor) else None
        if not isinstance(val(x), torch.Tensor) or dtype not in _SHIFTED_DTYPES or (
                "bitwise" in str(node.target) and isinstance(val(s), torch.Tensor)):  # a shift tensor: right
            continue
        with gm.graph.inserting_before(node):
            def cast(n):
                return n if val(n).dtype == dtype else gm.graph.call_function(aten._to_copy.default, (n,),
                                                                              {"dtype": dtype})
            s = cast(s) if isinstance(val(s), torch.Tensor) else gm.graph.call_function(
                aten.scalar_tensor.default, (s,), {"dtype": dtype, "device": val(x).device})
            op = aten.bitwise_right_shift_.Tensor if inplace else aten.bitwise_right_shift.Tensor
            new = gm.graph.call_function(op, (cast(x), s))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed += 1
    if changed:
        gm.recompile()
    return changed


def aot_static_inputs(gm: torch.fx.GraphModule) -> list[str]:
    """The placeholders AOT autograd treats as static: the parameters and buffers Dynamo lifted (flattened,
    for a tensor subclass), which AOT's own input descriptors record only as positions."""
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    metadata = getattr(context, "fw_metadata", None)
    indices = getattr(metadata, "static_input_indices", None) or ()
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    return [placeholders[i].name for i in indices if i < len(placeholders)]


def _record(report: RewriteReport, reports: list | None) -> None:
    if report.rewrites or report.misses:
        log.info("%s", report)
    if reports is not None:
        reports.append(report)


xq_eager = make_backend("eager", name="xq_eager")
xq_openxla = make_backend("openxla", name="xq_openxla")


def _register(name: str, fn) -> None:
    """Register once. When Dynamo found our ``torch_dynamo_backends`` entry point first, it is loading
    this module right now and registers the function itself after the import (registering here too
    would trip its duplicate check)."""
    from torch._dynamo.backends import registry

    if name in registry._COMPILER_FNS or registry._BACKENDS.get(name) is not None:
        return
    register_backend(name=name, compiler_fn=fn)


_register("xq_eager", xq_eager)
_register("xq_openxla", xq_openxla)
