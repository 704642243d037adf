"""The TPU / GPU lowering: the activation as the dot's left operand, the weight integer up to the dot.

The stored weight converts straight into the dot's operand type (parameter -> [unpack] -> convert ->
dot), where TPU / GPU XLA fuses the convert into the matmul; scales come after the dot. 16-bit
activations take a 16-bit dot (an int8 value is exact in bfloat16 and float16; a float8 value too)
with a float32 result; quantized activations an int8 dot with an int32 result, float8 weights an
e4m3fn dot with a float32 result (an e5m2 weight meets them in bfloat16, exact).
"""
from __future__ import annotations

import dataclasses

import torch

from ...quant.layouts import unpacked_weight
from .common import Call, dot, epilogue, rows_of_blocks, sum_blocks, take


def _operand_types(call: Call) -> tuple[torch.Tensor, torch.dtype | None, torch.dtype]:
    """(activation ``[M, K]`` in the dot's type, the type the weight converts to, None to keep it as
    stored, the dot's result type)."""
    if call.x_q is not None:
        if not call.w.is_floating_point():
            return call.x_q, None, torch.int32
        if call.compute_dtype == torch.float64:  # float8 meets float64 activations in float64
            return call.x_values, torch.float64, torch.float64
        if call.w.dtype == call.x_q.dtype:
            return call.x_q, None, call.compute_dtype
        return call.x_q.to(torch.bfloat16), torch.bfloat16, call.compute_dtype
    dtype = call.x.dtype if call.x.dtype in (torch.bfloat16, torch.float16) else call.compute_dtype
    return call.x.to(dtype), dtype, call.compute_dtype


def _operands(call: Call) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """(activation ``[M, K]``, weight values as stored, the dot's result type), in the dot's types."""
    x, w_type, result = _operand_types(call)
    w = unpacked_weight(call.w, call.packed)
    return x, w if w_type is None else w.to(w_type), result


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


def per_tensor(call: Call) -> torch.Tensor:
    """One scale: per-channel's form with the scale broadcast over N."""
    return per_channel(dataclasses.replace(call, scale=call.scale.expand(call.spec.out_features)))


def blocks_2d(call: Call) -> torch.Tensor:
    """``w [N, K]`` in Bn x B blocks: the whole K blocks as dots batched over them,
    ``[M, S, B] . [N, S, B] -> [S, M, N]``, a partial last block as one more dot, each block's scale
    (repeated over its Bn rows) after its dot. The weight is sliced as stored, then converted."""
    x, w_type, result = _operand_types(call)
    spec, cdt = call.spec, call.compute_dtype
    n, k, block = spec.out_features, spec.in_features, spec.block_size
    scale = rows_of_blocks(call.scale, spec.layout.block_n, n)  # [N, G]
    whole = k // block
    end = whole * block

    def operand(w):
        return w if w_type is None else w.to(w_type)

    parts = []
    if whole:
        xs, ws = (x, call.w) if end == k else (take(x, 1, 0, end), take(call.w, 1, 0, end))
        acc = dot(xs.reshape(-1, whole, block), operand(ws).reshape(n, whole, block), ([2], [2]), ([1], [1]),
                  out=result)  # [S, M, N]
        scales = scale if end == k else take(scale, 1, 0, whole)
        parts.append((acc.to(cdt) * scales.t()[:, None, :]).sum(dim=0))
    if end < k:
        acc = dot(take(x, 1, end, k), operand(take(call.w, 1, end, k)), ([1], [1]), out=result)  # [M, N]
        parts.append(acc.to(cdt) * take(scale, 1, whole, whole + 1).t())
    return epilogue(call, parts[0] if len(parts) == 1 else parts[0] + parts[1], False)


#: layout -> lowering (packed int4 is unpacked into the same forms)
LAYOUTS = {"per-channel": per_channel, "blockwise": blockwise, "blockwise by rows": blockwise_by_rows,
           "per-tensor": per_tensor, "2-D blocks": blocks_2d}
