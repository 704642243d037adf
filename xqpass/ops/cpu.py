"""CPU kernel of ``xq::quantized_matmul``: torch's own int8 kernel where the layout allows, else the
readable reference (:mod:`xqpass.ops.reference`).

``aten._weight_int8pack_mm(x [M, K], w int8 [N, K], scale [N])`` computes ``x @ (w * scale).T`` near the
memory-read floor of the int8 weight (docs/benchmarks.md); it is used for symmetric per-channel int8
weights with 16/32-bit float activations and no activation quantization. Its scale is rounded to
``x.dtype`` (for bfloat16, one more rounding of 2**-9 relative), which keeps the result at the
activation dtype's precision. In torch 2.9 that kernel is only right for K a multiple of 8 (other K
give wrong sums or a segmentation fault: checked here), so other K take the reference. Asymmetric
weights are left to the reference: subtracting the zero-point
term from a bfloat16 product would cancel digits the float32 reference keeps.
"""
from __future__ import annotations

import torch

from .checks import check_inputs
from .quantized_matmul import quantized_matmul
from .reference import quantized_matmul_reference

_INT8PACK_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _int8pack_applies(x, w, zero_point, block_size, int4_weight, quantize_activation, packed) -> bool:
    # torch 2.9's CPU kernel is only right for K a multiple of 8: other K give wrong sums or crash
    return (block_size == -1 and zero_point is None and not packed and not quantize_activation
            and w.dtype == torch.int8 and x.dtype in _INT8PACK_DTYPES and x.dim() >= 1 and x.numel() > 0
            and w.dim() == 2 and w.shape[1] % 8 == 0)


@quantized_matmul.register_kernel("cpu")
def quantized_matmul_cpu(
    x, w, scale, zero_point=None, block_size=-1, int4_weight=False, quantize_activation=False, bias=None, *,
    packed=False
):
    if not _int8pack_applies(x, w, zero_point, block_size, int4_weight, quantize_activation, packed):
        return quantized_matmul_reference(x, w, scale, zero_point, block_size, int4_weight, quantize_activation,
                                          packed, bias)
    spec = check_inputs(x, w, scale, zero_point, block_size, int4_weight, quantize_activation, packed, bias)
    x2 = x.reshape(-1, spec.in_features).contiguous()
    out = torch.ops.aten._weight_int8pack_mm(x2, w.contiguous(), scale.to(x.dtype).contiguous())
    if bias is not None:
        out = (out.float() + bias.float()).to(x.dtype)
    return out.reshape(*x.shape[:-1], spec.out_features)
