"""``xqpass.explain(model, *args, **kwargs)``: capture a model with Dynamo, run the pass on every graph
it hands the ``eager`` backend (torch level, then aten level) and report what was rewritten and why the
rest was not. Built on the public backend factory; nothing here is imported by the pass or the backends.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backend import make_backend
from .rewrite import Missed, RewriteReport, Rewritten


@dataclass
class ExplainReport:
    """The pass's reports for every graph Dynamo captured (torch level, then aten level)."""

    graphs: list[RewriteReport]

    @property
    def rewrites(self) -> list[Rewritten]:
        return [r for g in self.graphs for r in g.rewrites]

    @property
    def misses(self) -> list[Missed]:
        """Near misses left after both levels (a torch-level miss that the aten level rewrote is not one)."""
        final = [g for g in self.graphs if g.graph.endswith("(aten)")] or self.graphs
        return [m for g in final for m in g.misses]

    def __str__(self) -> str:
        return "\n".join(str(g) for g in self.graphs if g.rewrites or g.misses) or "xqpass: no dequantize -> matmul found"


def explain(model, *args, **kwargs) -> ExplainReport:
    """Capture ``model(*args, **kwargs)`` with Dynamo, run the pass on every graph and report, per graph,
    which layer was rewritten with which pattern, and why the others were not.

    The rewritten graphs run once, eagerly, on the arguments' device (nothing is compiled for XLA).
    The report is also logged on ``logging.getLogger("xqpass")``; ``print(report)`` shows it.
    Raises ValueError, before capturing anything, when the model's parameters and buffers and the
    tensor arguments share no device (``model.to(torch_xla.device())`` with a CPU ``x``).
    """
    _check_one_device(model, args, kwargs)
    reports: list[RewriteReport] = []
    backend = make_backend("eager", reports=reports, name="explain")
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(*args, **kwargs)
    return ExplainReport(reports)


def _check_one_device(model, args: tuple, kwargs: dict) -> None:
    """A model whose state and inputs share no device fails deep inside Dynamo's fake tensors; say so
    first, naming one tensor of each side."""
    if not isinstance(model, torch.nn.Module):
        return
    state = [*model.named_parameters(), *model.named_buffers()]
    leaves, _ = torch.utils._pytree.tree_flatten_with_path((args, kwargs))
    inputs = [(("args", "kwargs")[path[0].idx] + torch.utils._pytree.keystr(path[1:]), t)
              for path, t in leaves if isinstance(t, torch.Tensor)]
    if not state or not inputs:
        return
    state_devices = {t.device for _, t in state}
    input_devices = {t.device for _, t in inputs}
    if state_devices & input_devices:
        return
    name, tensor = state[0]
    where, value = inputs[0]
    raise ValueError(
        f"explain: the model's parameters and buffers are on {_devices(state_devices)} (e.g. {name!r} on "
        f"{tensor.device}), the inputs on {_devices(input_devices)} (e.g. {where} on {value.device}); "
        f"expected one device for both: move the inputs with .to({str(tensor.device)!r}) or the model with "
        f"model.to({str(value.device)!r})")


def _devices(devices: set) -> str:
    return ", ".join(sorted(str(d) for d in devices))
