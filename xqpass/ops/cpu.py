"""CPU kernel of ``xq::quantized_matmul``: torch's own int8 kernel where it is right on every CPU,
else the readable reference (:mod:`xqpass.ops.reference`).

``aten._weight_int8pack_mm(x [M, K], w int8 [N, K], scale [N])`` computes ``x @ (w * scale).T`` near the
memory-read floor of the int8 weight (docs/benchmarks.md); it is used for symmetric per-channel int8
weights with 16/32-bit float activations and no activation quantization. Its scale is rounded to
``x.dtype`` (for bfloat16, one more rounding of 2**-9 relative), which keeps the result at the
activation dtype's precision. Asymmetric weights are left to the reference: subtracting the zero-point
term from a bfloat16 product would cancel digits the float32 reference keeps.

torch dispatches that kernel by CPU capability (AVX-512, AVX2, default; ``ATEN_CPU_CAPABILITY``
selects one), and in torch 2.9 not every variant handles every K: other K give wrong sums or a
segmentation fault. :data:`INT8PACK_RULES` holds, per activation dtype, the K multiple for which
every variant is right (and the rows up to which it is faster than the reference);
tests/test_cpu_capabilities.py sweeps K, M, N and dtype under each capability, each process isolated,
and fails if a shape the rule admits is wrong or crashes on any of them.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .checks import check_inputs
from .quantized_matmul import quantized_matmul
from .reference import quantized_matmul_reference


@dataclass(frozen=True)
class Int8PackRule:
    """Where torch 2.9's ``_weight_int8pack_mm`` takes an activation dtype: right, and faster than the
    reference."""

    #: K must be a multiple of this for the kernel to be right under every CPU capability: K % 8 != 0 is
    #: wrong or crashes under AVX2 and AVX-512, and with bfloat16 activations the AVX-512 variant is also
    #: wrong (1e12..inf, NaN) or crashes for K % 16 == 8
    k_multiple: int
    #: most rows the kernel is faster than the reference for (None: any): its float32 / float16 variants
    #: cost a whole weight read a row, under AVX-512 and AVX2 alike (docs/benchmarks.md)
    max_rows: int | None = None


INT8PACK_RULES = {torch.bfloat16: Int8PackRule(16), torch.float16: Int8PackRule(8, 2),
                  torch.float32: Int8PackRule(8, 2)}


def int8pack_applies(x, w, zero_point, block_size, int4_weight, quantize_activation, packed) -> bool:
    """Whether a call takes torch's int8 kernel (see the module docstring). Reads no shape but K, so
    that the fast path pays for one :func:`check_inputs` and nothing else."""
    rule = INT8PACK_RULES.get(x.dtype)
    if rule is None or block_size != -1 or zero_point is not None or packed or quantize_activation:
        return False
    if w.dtype != torch.int8 or w.dim() != 2 or w.shape[1] % rule.k_multiple or x.dim() < 1:
        return False
    return x.numel() > 0 and (rule.max_rows is None or x.numel() // x.shape[-1] <= rule.max_rows)


#: id(scale), dtype -> (the scale, its version and address when converted, the converted scale)
_converted: dict[tuple, tuple] = {}


def scale_as(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` in ``dtype``, contiguous, converted once while its data stays the same (version and
    address): after the kernel streams the weight through the caches, converting on every call costs
    as much as the checks (docs/benchmarks.md)."""
    if scale.dtype == dtype or scale.is_inference():  # an inference tensor has no version to check
        return scale.to(dtype).contiguous()
    key, now = (id(scale), dtype), (scale._version, scale.data_ptr())
    hit = _converted.get(key)
    if hit is None or hit[0]() is not scale or hit[1] != now:
        if len(_converted) >= 4096:  # layers come and go; entries of freed scales are dropped in bulk
            _converted.clear()
        hit = _converted[key] = (weakref.ref(scale), now, scale.to(dtype).contiguous())
    return hit[2]


@quantized_matmul.register_kernel("cpu")
def quantized_matmul_cpu(
    x, w, scale, zero_point=None, block_size=-1, int4_weight=False, quantize_activation=False, bias=None, *,
    packed=False, block_n=1
):
    if block_n != 1 or not int8pack_applies(x, w, zero_point, block_size, int4_weight, quantize_activation, packed):
        return quantized_matmul_reference(x, w, scale, zero_point, block_size, int4_weight, quantize_activation,
                                          packed, bias, block_n)
    spec = check_inputs(x, w, scale, zero_point, block_size, int4_weight, quantize_activation, packed, bias)
    # torch._weight_int8pack_mm, not torch.ops.aten's: the same kernel, without the Python op packet
    x2 = x if x.dim() == 2 else x.reshape(-1, spec.in_features)
    out = torch._weight_int8pack_mm(x2.contiguous(), w.contiguous(), scale_as(scale, x.dtype))
    if bias is not None:
        out = (out.float() + bias.float()).to(x.dtype)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], spec.out_features)
