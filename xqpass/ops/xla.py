"""XLA lowering of ``xq::quantized_matmul`` (the only place in the op that touches torch_xla).

Registered with ``register_kernel("xla")``: the body runs torch ops on XLA tensors, so under eager XLA,
``torch.compile(backend="openxla")`` or lazy tracing it is traced into the caller's HLO graph. The
weight enters the graph as the bytes it is stored in (int8 / uint8, packed int4 as uint8/int8 bytes);
unpacking and the int -> float convert happen inside the compiled graph: no host round trip, no data
dependent Python, so no graph break and one compilation per shape.

Two formulations, numerically equivalent (tested on XLA:CPU), chosen by device type:

* ``"canonical"`` (TPU, GPU): ``dot(x, convert(w))`` with the scale applied after the dot; the weight
  stays int8 up to the dot, where XLA fuses the convert into the matmul.
* ``"cpu"`` (XLA:CPU, measured in docs/benchmarks.md): the weight is the dot's left operand
  (``(convert(w) @ x.T).T``, ~5x faster at small M than ``x @ w.T``), blockwise scales are applied
  after a dot batched over the blocks (no full-size multiply of the weight), and packed int4 is never
  interleaved: the low nibbles (even k) and high nibbles (odd k) meet ``x[..., 0::2]`` and
  ``x[..., 1::2]`` in two half-size dots.

``xla_lowering("cpu" | "canonical" | "auto")`` (or ``XQPASS_XLA_LOWERING``) forces one, e.g. to test the
TPU form on XLA:CPU. Float work accumulates in float32 (float64 for float64 x); 16-bit activations meet
the weight in their own dtype in the dot (an int8 value is exact in bfloat16), with a float32 result.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ..quant.layouts import PER_CHANNEL, unpacked_weight
from ..quant.quantize import quantize_per_token
from .checks import check_inputs, compute_dtype
from .quantized_matmul import quantized_matmul

LOWERINGS = ("auto", "canonical", "cpu")
_lowering = os.environ.get("XQPASS_XLA_LOWERING", "auto")


@contextlib.contextmanager
def xla_lowering(name: str):
    """Force a formulation of the XLA lowering inside the block ("auto": by device type)."""
    global _lowering
    if name not in LOWERINGS:
        raise ValueError(f"xla_lowering: expected one of {LOWERINGS}, got {name!r}")
    previous, _lowering = _lowering, name
    try:
        yield
    finally:
        _lowering = previous


def _resolve_lowering(x: torch.Tensor) -> str:
    if _lowering != "auto":
        return _lowering
    import torch_xla.core.xla_model as xm

    return "cpu" if xm.xla_device_hw(x.device) == "CPU" else "canonical"


def _dot(lhs: torch.Tensor, rhs: torch.Tensor, contracting, batch=([], []), out=torch.float32) -> torch.Tensor:
    """``dot_general`` with a chosen result type (int32 for integer operands); mixed integer operands
    (a uint8 weight with int8 activations) are widened to int32 first, still exact."""
    import torch_xla  # only imported when an XLA tensor reaches the op

    if lhs.dtype != rhs.dtype:
        lhs, rhs = lhs.to(torch.int32), rhs.to(torch.int32)
    return torch_xla._XLAC._xla_dot_general(lhs, rhs, (contracting, batch), preferred_element_type=out)


def _nibbles(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) nibble values of packed bytes, same shape as ``w``: even and odd k.

    Masks and an exact division only: torch_xla 2.9 lowers ``>>`` on int8 as a truncating division
    (``-1 >> 4 == 0``), which is right here only because the operand is a multiple of 16.
    """
    low = w & 15
    if w.dtype == torch.int8:  # two's complement nibbles
        return low - (low & 8) * 2, torch.div(w & -16, 16, rounding_mode="trunc")
    return low, torch.div(w, 16, rounding_mode="floor")


@quantized_matmul.register_kernel("xla")
def quantized_matmul_xla(
    x, w, scale, zero_point=None, block_size=-1, int4_weight=False, quantize_activation=False, bias=None, *,
    packed=False
):
    spec = check_inputs(x, w, scale, zero_point, block_size, int4_weight, quantize_activation, packed, bias)
    cdt = compute_dtype(x.dtype)
    k, n = spec.in_features, spec.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # [M, K]
    scale = scale.to(cdt)
    zp = None if zero_point is None else zero_point.to(cdt)
    lowering = _resolve_lowering(x)

    if quantize_activation:
        x_q, x_scale = quantize_per_token(x2.to(cdt))  # [M, K] int8, [M, 1]
        operand, dot_dtype, acc_dtype = x_q, torch.int8, torch.int32
        row_sums = x_q.to(cdt)
    else:
        # bf16 / f16 activations meet the weight in their own dtype (exact for int8 values), f32 result
        dot_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else cdt
        operand, acc_dtype = x2.to(dot_dtype), cdt
        row_sums = x2.to(cdt)

    def weight_as(t):  # int8 stays int8 for the integer dot; otherwise the convert sits right at the dot
        return t if quantize_activation else t.to(dot_dtype)

    if block_size == PER_CHANNEL:
        if lowering == "cpu" and packed:
            low, high = _nibbles(w)  # [N, K/2] each: even and odd k
            acc = (_dot(weight_as(low), operand[:, 0::2], ([1], [1]), out=acc_dtype)
                   + _dot(weight_as(high), operand[:, 1::2], ([1], [1]), out=acc_dtype)).t()
        elif lowering == "cpu":
            acc = _dot(weight_as(w), operand, ([1], [1]), out=acc_dtype).t()  # weight as LHS: [N, M] -> [M, N]
        else:
            acc = _dot(operand, weight_as(unpacked_weight(w, packed)), ([1], [1]), out=acc_dtype)  # [M, N]
        out = acc.to(cdt) * scale
        if zp is not None:
            out = out - row_sums.sum(dim=-1, keepdim=True) * zp
    else:
        s = spec.num_blocks
        blocks = operand.reshape(-1, s, block_size)  # [M, S, B]
        if lowering == "cpu" and packed:
            low, high = _nibbles(w)  # [S, B/2, N]
            acc = (_dot(weight_as(low), blocks[..., 0::2], ([1], [2]), ([0], [1]), out=acc_dtype)
                   + _dot(weight_as(high), blocks[..., 1::2], ([1], [2]), ([0], [1]), out=acc_dtype))  # [S, N, M]
            acc = acc.permute(0, 2, 1)
        elif lowering == "cpu":
            acc = _dot(weight_as(w), blocks, ([1], [2]), ([0], [1]), out=acc_dtype).permute(0, 2, 1)  # [S, M, N]
        else:
            acc = _dot(blocks, weight_as(unpacked_weight(w, packed)), ([2], [1]), ([1], [0]), out=acc_dtype)
        out = (acc.to(cdt) * scale[:, None, :]).sum(dim=0)  # per-block scales after the dot: [M, N]
        if zp is not None:
            out = out - row_sums.reshape(-1, s, block_size).sum(dim=-1) @ zp
    if quantize_activation:
        out = out * x_scale
    if bias is not None:
        out = out + bias.to(cdt)
    return out.to(x.dtype).reshape(*lead, n)
