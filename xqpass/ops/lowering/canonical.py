"""The TPU / GPU lowering: the activation as the dot's left operand, the weight integer up to the dot.

The stored weight converts straight into the dot's operand type (parameter -> [unpack] -> convert ->
dot), where TPU / GPU XLA fuses the convert into the matmul; scales come after the dot. 16-bit
activations take a 16-bit dot (an int8 value is exact in bfloat16 and float16) with a float32 result;
quantized activations an int8 dot with an int32 result.
"""
from __future__ import annotations

import torch

from ...quant.layouts import unpacked_weight
from .common import Call, dot, epilogue, sum_blocks


def _operands(call: Call) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """(activation ``[M, K]``, weight values as stored, the dot's result type), in the dot's types."""
    w = unpacked_weight(call.w, call.packed)
    if call.x_q is not None:
        return call.x_q, w, torch.int32
    dtype = call.x.dtype if call.x.dtype in (torch.bfloat16, torch.float16) else call.compute_dtype
    return call.x.to(dtype), w.to(dtype), call.compute_dtype


def per_channel(call: Call) -> torch.Tensor:
    """``[M, K] . [N, K] -> [M, N]``, packed int4 unpacked first."""
    x, w, result = _operands(call)
    return epilogue(call, dot(x, w, ([1], [1]), out=result), False, call.scale, call.zero_point)


def blockwise(call: Call) -> torch.Tensor:
    """Seed layout ``w [S, B, N]``: dots batched over the blocks, ``[M, S, B] . [S, B, N] -> [S, M, N]``."""
    x, w, result = _operands(call)
    blocks = x.reshape(-1, call.spec.num_blocks, call.spec.block_size)
    acc = dot(blocks, w, ([2], [1]), ([1], [0]), out=result)
    return epilogue(call, sum_blocks(call, acc, call.scale, call.zero_point), False)


def blockwise_by_rows(call: Call) -> torch.Tensor:
    """``w [N, K]`` viewed ``[N, S, B]``: dots batched over the blocks, ``[M, S, B] . [N, S, B] -> [S, M, N]``."""
    x, w, result = _operands(call)
    s, block = call.spec.num_blocks, call.spec.block_size
    acc = dot(x.reshape(-1, s, block), w.reshape(-1, s, block), ([2], [2]), ([1], [1]), out=result)
    zero_point = None if call.zero_point is None else call.zero_point.t()
    return epilogue(call, sum_blocks(call, acc, call.scale.t(), zero_point), False)


#: layout -> lowering (packed int4 is unpacked into the same forms)
LAYOUTS = {"per-channel": per_channel, "blockwise": blockwise, "blockwise by rows": blockwise_by_rows}
