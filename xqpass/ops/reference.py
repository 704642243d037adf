"""The CPU reference of ``xq::quantized_matmul``: the readable definition of the op's numerics.

With ``w_deq`` the dequantized weight (``w * scale - zero_point``, see :mod:`xqpass.quant.layouts`)::

    quantize_activation=False (W8A16, W4A16):   out = x @ w_deq.T
    quantize_activation=True  (W8A8,  W4A8):    out = (x_q * x_scale) @ w_deq.T

where ``x_q, x_scale = quantize_per_token(x)`` (int8 per row, the seed's scheme). The scale is
applied after the dot, as the seed does, so the integer part of a W8A8 / W4A8 dot accumulates exactly
in int32 (over K per-channel, over B blockwise; inputs that could overflow are rejected):

    out[.., n] = sum_s [ (sum_b x[.., s, b] w[n, s, b]) * scale[n, s] - (sum_b x[.., s, b]) * zero_point[n, s] ]

with every layout seen as groups (:meth:`~xqpass.quant.layouts.Layout.grouped_weight`): ``w[n, s, b]``
the weight ``[N, K/B, B]``, ``scale[n, s]`` ``[N, K/B]``; per-channel one group of K.

(times ``x_scale`` with ``x`` replaced by ``x_q`` when activations are quantized), plus ``bias`` when
given (added before the single rounding to ``x.dtype``). Float work runs in
float32 (float64 for float64 ``x``); the output has ``x``'s dtype and shape ``[..., N]``.

Float8 weights (:func:`float8_matmul_reference`) are dequantized first, each value converted exactly
and multiplied by its block's scale (one rounding in float32), then multiplied::

    quantize_activation=False (W8A16-FP8):   out = x @ w_deq.T
    quantize_activation=True  (W8A8-FP8):    out = (x_q @ w_deq.T) * x_scale

with ``x_q, x_scale = quantize_per_token_float8(x)`` (e4m3fn per row, ``x_scale = amax / 448``). A NaN
weight value (e4m3fn's only non-finite value) makes its output feature NaN in every row.
"""
from __future__ import annotations

import torch

from ..quant.layouts import FLOAT8_DTYPES, PER_CHANNEL, Layout, unpacked_weight
from ..quant.quantize import quantize_per_token, quantize_per_token_float8
from .checks import check_inputs, compute_dtype


def quantized_matmul_reference(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    block_size: int = PER_CHANNEL,
    int4_weight: bool = False,
    quantize_activation: bool = False,
    packed: bool = False,
    bias: torch.Tensor | None = None,
    block_n: int = 1,
) -> torch.Tensor:
    spec = check_inputs(x, w, scale, zero_point, block_size, int4_weight, quantize_activation, packed, bias, block_n)
    layout, cdt = spec.layout, compute_dtype(x.dtype)
    if w.dtype in FLOAT8_DTYPES:
        return float8_matmul_reference(x, w, scale, layout, quantize_activation, bias)
    w = layout.grouped_weight(unpacked_weight(w, packed))  # [N, S, B]
    if quantize_activation:
        x_q, x_scale = quantize_per_token(x.to(cdt))
        lhs, w = x_q.to(torch.int32), w.to(torch.int32)  # exact integer dot, int32 accumulation
    else:
        lhs, w = x.to(cdt), w.to(cdt)
    blocks = lhs.reshape(*lhs.shape[:-1], spec.num_blocks, w.shape[-1])  # [..., S, B]
    acc = torch.einsum("...sb,nsb->...ns", blocks, w).to(cdt)  # [..., N, S]
    out = (acc * layout.grouped_scale(scale).to(cdt)).sum(dim=-1)
    if zero_point is not None:
        out = out - torch.matmul(blocks.sum(dim=-1).to(cdt), layout.grouped_scale(zero_point).to(cdt).t())
    if quantize_activation:
        out = out * x_scale
    if bias is not None:
        out = out + bias.to(cdt)
    return out.to(x.dtype)


def float8_matmul_reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, layout: Layout,
                            quantize_activation: bool, bias: torch.Tensor | None) -> torch.Tensor:
    """A checked call with float8 weights in ``layout``: ``w_deq = float(w) * scale`` ``[N, K]`` in the
    compute dtype, then ``x @ w_deq.T`` (W8A8-FP8: the e4m3fn activation, ``x_scale`` after the dot)."""
    cdt = compute_dtype(x.dtype)
    w_deq = layout.dequantize(w, scale, None, cdt)  # [N, K]
    if quantize_activation:
        x_q, x_scale = quantize_per_token_float8(x.to(cdt))
        out = torch.matmul(x_q.to(cdt), w_deq.t()) * x_scale
    else:
        out = torch.matmul(x.to(cdt), w_deq.t())
    if bias is not None:
        out = out + bias.to(cdt)
    return out.to(x.dtype)
