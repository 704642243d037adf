"""Input validation shared by every kernel of ``xq::quantized_matmul`` (CPU, fake, XLA).

Runs on shapes and dtypes only, so a bad call fails at trace time (Dynamo, AOT, export, lazy XLA
tracing) with a ``TypeError`` (wrong dtype / kind) or ``ValueError`` (wrong shape / value) that names
what was expected and what came. Under ``torch.compile`` Dynamo re-raises it as ``TorchRuntimeError``
carrying the same message. (TypeError messages here avoid the word Dynamo treats as a graph-break
signal, so the error stays an error instead of a silent graph break.)
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..quant.layouts import PER_CHANNEL, WEIGHT_DTYPES, Layout, value_range

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT32_MAX = 2**31 - 1


class MatmulSpec(NamedTuple):
    """What validation learned about a call: the sizes of the contraction and the output, and the layout."""

    in_features: int  # K
    out_features: int  # N
    block_size: int  # -1 or B
    num_blocks: int  # 1 for per-channel, K/B for blockwise
    by_rows: bool  # blockwise with the per-channel storage: w [N, K], scale [N, K/B]
    layout: Layout


def max_int32_reduction(w_dtype: torch.dtype, int4_weight: bool) -> int:
    """Longest dot of int8 activations (|x_q| <= 127) with these weights that cannot overflow int32."""
    lo, hi = value_range(w_dtype, int4_weight)
    return INT32_MAX // (127 * max(abs(lo), abs(hi)))


def compute_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """Precision the op computes in: float64 for float64 activations, float32 otherwise."""
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_inputs(
    x,
    w,
    scale,
    zero_point=None,
    block_size: int = PER_CHANNEL,
    int4_weight: bool = False,
    quantize_activation: bool = False,
    packed: bool = False,
    bias=None,
) -> MatmulSpec:
    """Validate one call of the op; see :mod:`xqpass.quant.layouts` for the layouts."""
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and isinstance(scale, torch.Tensor)):
        name, t = next((name, t) for name, t in (("x", x), ("w", w), ("scale", scale)) if not isinstance(t, torch.Tensor))
        raise TypeError(f"quantized_matmul: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in ACTIVATION_DTYPES:
        hint = " (integer activations: pass float x and quantize_activation=True)" if not x.is_floating_point() else ""
        raise TypeError(
            f"quantized_matmul: x must be float32, bfloat16, float16 or float64, got {x.dtype}{hint}"
        )
    if x.dim() < 1:
        raise ValueError("quantized_matmul: x must have at least 1 dim [..., K], got a 0-d tensor")
    if w.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"quantized_matmul: w must be torch.int8 or torch.uint8 (quantized), got {w.dtype}")
    if not scale.is_floating_point():
        raise TypeError(f"quantized_matmul: scale must be a floating tensor, got {scale.dtype}")
    device = x.device
    if zero_point is not None:
        if not isinstance(zero_point, torch.Tensor):
            raise TypeError(f"quantized_matmul: zero_point must be a torch.Tensor or None, got {type(zero_point).__name__}")
        if not zero_point.is_floating_point():
            raise TypeError(
                "quantized_matmul: zero_point must be floating (the seed's convention w * scale - zero_point; "
                f"an integer zero z maps to z * scale), got {zero_point.dtype}"
            )
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            got = bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise TypeError(f"quantized_matmul: bias must be a floating tensor or None, got {got}")
    if w.device != device or scale.device != device or (zero_point is not None and zero_point.device != device) \
            or (bias is not None and bias.device != device):
        for name, t in (("w", w), ("scale", scale), ("zero_point", zero_point), ("bias", bias)):
            if t is not None and t.device != device:
                raise ValueError(f"quantized_matmul: {name} is on {t.device}, expected x's device {device}")
    if not isinstance(block_size, int) and not isinstance(block_size, torch.SymInt):
        raise TypeError(f"quantized_matmul: block_size must be an int, got {type(block_size).__name__}")
    if packed and not int4_weight:
        raise ValueError("quantized_matmul: packed=True holds two 4-bit values a byte; it needs int4_weight=True")

    try:
        layout = Layout.recognise(w.shape, block_size, packed)
    except ValueError as e:
        raise ValueError(f"quantized_matmul: {e}") from None
    k = x.shape[-1]
    if block_size != PER_CHANNEL and k % block_size:
        raise ValueError(f"quantized_matmul: block_size={block_size} does not divide K={k}")
    w_shape = _shape(w)
    n, stored_k = layout.features(w_shape)
    if stored_k != k or w_shape != layout.weight_shape(n, k):
        if layout.weight_axes == ("N", "K"):
            pack, stored = (2, "packs") if packed else (1, "holds")
            raise ValueError(
                f"quantized_matmul: K mismatch: x has K={k} in its last dim, {layout.name} w {_shape(w)} "
                f"{stored} K={w.shape[1] * pack}"
                + (" (int4 weights unpacked one a byte: pass packed=False)" if packed and w.shape[1] == k else "")
                + (" (two 4-bit values a byte: pass packed=True)" if int4_weight and not packed and 2 * w.shape[1] == k else "")
            )
        raise ValueError(
            f"quantized_matmul: blockwise w for K={k}, block_size={block_size}{', packed' if packed else ''} must be "
            f"{layout.weight_shape(n, k)} [K/B, B{'/2' if packed else ''}, N], got {_shape(w)}"
        )
    expected = layout.scale_shape(n, k)
    if _shape(scale) != expected:
        raise ValueError(f"quantized_matmul: scale must have shape {expected}, got {_shape(scale)}")
    if zero_point is not None and _shape(zero_point) != expected:
        raise ValueError(f"quantized_matmul: zero_point must have shape {expected} like scale, got {_shape(zero_point)}")

    if bias is not None and _shape(bias) != (n,):
        raise ValueError(f"quantized_matmul: bias must have shape ({n},), got {_shape(bias)}")
    if quantize_activation:
        bound, length = max_int32_reduction(w.dtype, int4_weight), layout.group_size(k)
        if length > bound:
            raise ValueError(
                f"quantized_matmul: quantize_activation accumulates in int32, which can overflow for "
                f"{'K' if block_size == PER_CHANNEL else 'block_size'}={length} with "
                f"{'4-bit ' if int4_weight else ''}{w.dtype} weights; the bound is {bound}"
            )
    return MatmulSpec(k, n, block_size, layout.num_groups(k), layout.by_rows, layout)
