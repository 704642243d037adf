"""Definition of ``torch.ops.xq.quantized_matmul``: schema, default kernel, fake kernel, autograd.

Schema (the seed's seven positional arguments, then ``bias`` and the keyword-only ``packed`` and
``block_n``)::

    xq::quantized_matmul(Tensor x, Tensor w, Tensor scale, Tensor? zero_point=None,
                         SymInt block_size=-1, bool int4_weight=False,
                         bool quantize_activation=False, Tensor? bias=None, *,
                         bool packed=False, SymInt block_n=1) -> Tensor

``block_n`` (float8 weights): output features one scale covers, 1, -1 (per-tensor) or Bn (2-D blocks of
Bn x ``block_size``, scale ``[ceil(N/Bn), ceil(K/B)]``).

``x [..., K]`` float; ``w`` / ``scale`` / ``zero_point`` in a layout of :mod:`xqpass.quant.layouts`;
``bias [N]`` float or None; returns ``[..., N]`` in ``x.dtype``. Numerics: :mod:`xqpass.ops.reference`. The default kernel (CPU and
any non-XLA device) is the reference; XLA tensors take :mod:`xqpass.ops.xla`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..quant.layouts import dequantize
from .checks import check_inputs, compute_dtype
from .reference import quantized_matmul_reference


@torch.library.custom_op("xq::quantized_matmul", mutates_args=())
def quantized_matmul(
    x: Tensor,
    w: Tensor,
    scale: Tensor,
    zero_point: Optional[Tensor] = None,
    block_size: int = -1,
    int4_weight: bool = False,
    quantize_activation: bool = False,
    bias: Optional[Tensor] = None,
    *,
    packed: bool = False,
    block_n: int = 1,
) -> Tensor:
    """``x @ w_deq.T (+ bias)`` with ``w_deq = w * scale - zero_point`` kept quantized until the kernel."""
    return quantized_matmul_reference(
        x, w, scale, zero_point, block_size, int4_weight, quantize_activation, packed, bias, block_n
    )


@quantized_matmul.register_fake
def _quantized_matmul_fake(
    x, w, scale, zero_point=None, block_size=-1, int4_weight=False, quantize_activation=False, bias=None, *, packed=False,
    block_n=1
):
    spec = check_inputs(x, w, scale, zero_point, block_size, int4_weight, quantize_activation, packed, bias, block_n)
    return x.new_empty((*x.shape[:-1], spec.out_features))


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    _x, w, scale, zero_point, block_size = inputs[:5]
    ctx.save_for_backward(w, scale, zero_point)
    ctx.block_size = block_size
    ctx.packed = keyword_only_inputs.get("packed", False)
    ctx.block_n = keyword_only_inputs.get("block_n", 1)


def _backward(ctx, grad_out):
    """Gradients for ``x`` (``grad @ w_deq``, straight-through for quantized activations) and ``bias``.

    The integer weight has no gradient; ``scale`` and ``zero_point`` are treated as constants.
    """
    w, scale, zero_point = ctx.saved_tensors
    cdt = compute_dtype(grad_out.dtype)
    w_deq = dequantize(w, scale, zero_point, ctx.block_size, ctx.packed, cdt, ctx.block_n)  # [N, K]
    grad_x = torch.matmul(grad_out.to(cdt), w_deq).to(grad_out.dtype)
    grads = [grad_x] + [None] * (len(ctx.needs_input_grad) - 1)  # one per positional input given
    if len(grads) > 7 and ctx.needs_input_grad[7]:  # bias
        grads[7] = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return tuple(grads)


quantized_matmul.register_autograd(_backward, setup_context=_setup_context)
