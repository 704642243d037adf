"""XLA lowering of ``xq::quantized_matmul`` (the only place in the op that touches torch_xla).

Registered with ``register_kernel("xla")``: the body runs torch ops on XLA tensors, so under eager XLA,
``torch.compile(backend="openxla")`` or lazy tracing it is traced into the caller's HLO graph. The
weight enters the graph as the bytes it is stored in (int8 / uint8, packed int4 as uint8/int8 bytes);
unpacking and the int -> float convert happen inside the compiled graph: no host round trip, no data
dependent Python, so no graph break and one compilation per shape.

This module checks the call, prepares it (:class:`~.lowering.common.Call`) and picks a function from a
table by form and layout. Two forms, numerically equivalent (tested on XLA:CPU), chosen by device type:
``"canonical"`` (TPU, GPU; :mod:`.lowering.canonical`) and ``"cpu"`` (XLA:CPU; :mod:`.lowering.xla_cpu`,
tuned by an :class:`XlaCpuTuning`). ``xla_lowering("cpu" | "canonical" | "auto", tuning)`` (or
``XQPASS_XLA_LOWERING``) forces one, e.g. to test the TPU form on XLA:CPU. Float work accumulates in
float32 (float64 for float64 x).
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import torch

from ..quant.layouts import FLOAT8_DTYPES
from ..quant.quantize import quantize_per_token, quantize_per_token_float8
from .checks import check_inputs, compute_dtype
from .lowering import canonical, xla_cpu
from .lowering.common import Call
from .lowering.xla_cpu import XlaCpuTuning
from .quantized_matmul import quantized_matmul

__all__ = ["LOWERINGS", "XlaCpuTuning", "lowering_for", "xla_lowering"]

#: form -> layout -> lowering; the "cpu" functions also take an XlaCpuTuning
TABLE = {"canonical": canonical.LAYOUTS, "cpu": xla_cpu.LAYOUTS}
LOWERINGS = ("auto", *TABLE)


def _lowering_from_environment() -> str:
    """``XQPASS_XLA_LOWERING`` checked at import: a typo would otherwise silently pick "auto"."""
    name = os.environ.get("XQPASS_XLA_LOWERING", "auto")
    if name not in LOWERINGS:
        raise ValueError(f"XQPASS_XLA_LOWERING: expected one of {LOWERINGS}, got {name!r}")
    return name


# A context variable, not a module global: forcing a form in one thread (or asyncio task) leaves the
# calls traced by the others alone, and the previous choice comes back however the block exits.
_choice: contextvars.ContextVar[tuple[str, XlaCpuTuning]] = contextvars.ContextVar(
    "xqpass_xla_lowering", default=(_lowering_from_environment(), XlaCpuTuning()))


@contextlib.contextmanager
def xla_lowering(name: str, tuning: XlaCpuTuning | None = None):
    """Inside the block, trace the op in form ``name`` ("auto": by device type) and, given a ``tuning``,
    with those XLA:CPU thresholds (they act when a graph is traced, not when a compiled one runs)."""
    if name not in LOWERINGS:
        raise ValueError(f"xla_lowering: expected one of {LOWERINGS}, got {name!r}")
    token = _choice.set((name, tuning or _choice.get()[1]))
    try:
        yield
    finally:
        _choice.reset(token)


def lowering_for(x: torch.Tensor) -> str:
    """The form the op takes for ``x`` now: the forced one, else "cpu" on XLA:CPU, "canonical" elsewhere."""
    name = _choice.get()[0]
    if name != "auto":
        return name
    import torch_xla.core.xla_model as xm

    return "cpu" if xm.xla_device_hw(x.device) == "CPU" else "canonical"


@quantized_matmul.register_kernel("xla")
def quantized_matmul_xla(
    x, w, scale, zero_point=None, block_size=-1, int4_weight=False, quantize_activation=False, bias=None, *,
    packed=False, block_n=1
):
    spec = check_inputs(x, w, scale, zero_point, block_size, int4_weight, quantize_activation, packed, bias, block_n)
    cdt = compute_dtype(x.dtype)
    x2 = x.reshape(-1, spec.in_features)  # [M, K]
    if isinstance(x2.shape[0], int) and x2.shape[0] == 0:  # the lowerings' views of an empty x have no XLA
        return x.new_empty((*x.shape[:-1], spec.out_features))  # implementation
    x_q = x_scale = None
    if quantize_activation:
        quantize = quantize_per_token_float8 if w.dtype in FLOAT8_DTYPES else quantize_per_token
        x_q, x_scale = quantize(x2.to(cdt))  # [M, K] int8 (float8 weights: e4m3fn), [M, 1]
    call = Call(spec=spec, x=x2, x_values=(x2 if x_q is None else x_q).to(cdt), x_q=x_q, x_scale=x_scale, w=w,
                scale=scale.to(cdt), zero_point=None if zero_point is None else zero_point.to(cdt), bias=bias,
                packed=packed, compute_dtype=cdt, out_shape=(*x.shape[:-1], spec.out_features))
    form, tuning = lowering_for(x), _choice.get()[1]
    lower = TABLE[form][spec.layout.name]
    return lower(call, tuning) if form == "cpu" else lower(call)
