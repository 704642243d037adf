"""XLA lowering of ``xq::quantized_matmul`` (the only place in the op that touches torch_xla).

Registered with ``register_kernel("xla")``: the body runs torch ops on XLA tensors, so under eager XLA,
``torch.compile(backend="openxla")`` or lazy tracing it is traced into the caller's HLO graph. The
weight enters the graph as the bytes it is stored in (int8 / uint8, packed int4 as uint8/int8 bytes);
unpacking and the int -> float convert happen inside the compiled graph: no host round trip, no data
dependent Python, so no graph break and one compilation per shape.

Formulation: per-channel weights are the dot's left operand and the scale is applied after the dot
(``(w @ x.T).T * scale``), which XLA:CPU runs ~5x faster than ``x @ w.T`` at small M (see
docs/ops.md); W8A8 / W4A8 use an integer ``dot_general`` with an int32 result. Numerics match
:mod:`xqpass.ops.reference` (float32 compute, float64 for float64 x).
"""
from __future__ import annotations

import torch

from ..quant.layouts import PER_CHANNEL, unpacked_weight
from ..quant.quantize import quantize_per_token
from .checks import check_inputs, compute_dtype
from .quantized_matmul import quantized_matmul


def _int_dot(lhs: torch.Tensor, rhs: torch.Tensor, contracting, batch=([], [])) -> torch.Tensor:
    """Integer ``dot_general`` with an int32 result (int8 operands stay int8 up to the dot)."""
    import torch_xla  # only imported when an XLA tensor reaches the op

    if lhs.dtype != rhs.dtype:  # uint8 weight with int8 activations: widen both, still exact
        lhs, rhs = lhs.to(torch.int32), rhs.to(torch.int32)
    return torch_xla._XLAC._xla_dot_general(lhs, rhs, (contracting, batch), preferred_element_type=torch.int32)


@quantized_matmul.register_kernel("xla")
def quantized_matmul_xla(
    x, w, scale, zero_point=None, block_size=-1, int4_weight=False, quantize_activation=False, bias=None, *, packed=False
):
    spec = check_inputs(x, w, scale, zero_point, block_size, int4_weight, quantize_activation, packed, bias)
    cdt = compute_dtype(x.dtype)
    k, n = spec.in_features, spec.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).to(cdt)  # [M, K]
    w = unpacked_weight(w, packed)  # traced: unpacking happens inside the graph
    scale = scale.to(cdt)
    zp = None if zero_point is None else zero_point.to(cdt)
    if quantize_activation:
        x_q, x_scale = quantize_per_token(x2)  # [M, K] int8, [M, 1]

    if block_size == PER_CHANNEL:
        if quantize_activation:
            acc = _int_dot(w, x_q, ([1], [1])).to(cdt).t()  # [N, K] . [M, K] -> [N, M] -> [M, N]
        else:
            acc = (w.to(cdt) @ x2.t()).t()  # weight as LHS, scale after the dot
        out = acc * scale
        if zp is not None:
            dotted = x_q.to(cdt) if quantize_activation else x2
            out = out - dotted.sum(dim=-1, keepdim=True) * zp
    elif quantize_activation:
        blocks = x_q.reshape(-1, spec.num_blocks, block_size)  # [M, S, B]
        acc = _int_dot(blocks, w, ([2], [1]), ([1], [0])).to(cdt)  # batched over S: [S, M, N]
        out = (acc * scale[:, None, :]).sum(dim=0)
        if zp is not None:
            out = out - blocks.to(cdt).sum(dim=-1) @ zp
    else:
        w_deq = w.to(cdt) * scale[:, None, :]  # [S, B, N], dequantized inside the graph
        if zp is not None:
            w_deq = w_deq - zp[:, None, :]
        out = (w_deq.reshape(k, n).t() @ x2.t()).t()
    if quantize_activation:
        out = out * x_scale
    if bias is not None:
        out = out + bias.to(cdt)
    return out.to(x.dtype).reshape(*lead, n)
