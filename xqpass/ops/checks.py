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

from ..quant.layouts import FLOAT8_DTYPES, PER_CHANNEL, PER_TENSOR, WEIGHT_DTYPES, Layout, value_range

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


def _scale_shape_hint(layout: Layout, n: int, k: int, got: tuple) -> str:
    """What the expected scale shape is made of, and the likely fix for the shape that came."""
    if layout.block_n == PER_TENSOR:
        return " (one scale, 0-d" + (": pass scale.reshape(())" if got == (1,) else "") + ")"
    if layout.block_n > 1:
        return f" [ceil(N={n}/block_n={layout.block_n}), ceil(K={k}/block_size={layout.block_size})]"
    if got == () or (got == (1,) and n != 1):
        return " (one scale for the whole weight: pass block_n=-1 with float8 weights)"
    if layout.by_rows and len(got) == 2 and got[0] < n and got[1] == layout.num_groups(k):
        return " (one scale a block of rows: pass block_n, the rows a block holds, with float8 weights)"
    return ""


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
    block_n: int = 1,
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
    float8 = w.dtype in FLOAT8_DTYPES
    if w.dtype not in WEIGHT_DTYPES and not float8:
        raise TypeError(f"quantized_matmul: w must be torch.int8 or torch.uint8 (quantized) or float8 "
                        f"(torch.float8_e4m3fn, torch.float8_e5m2), got {w.dtype}")
    if not scale.is_floating_point():
        raise TypeError(f"quantized_matmul: scale must be a floating tensor, got {scale.dtype}")
    if scale.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"quantized_matmul: scale must be float32, bfloat16, float16 or float64, got {scale.dtype}")
    if float8 and (int4_weight or packed or zero_point is not None):
        raise ValueError(
            f"quantized_matmul: float8 weights ({w.dtype}) are one symmetric value a byte: int4_weight and packed "
            f"must be False and zero_point None, got int4_weight={int4_weight}, packed={packed}, "
            f"zero_point {'None' if zero_point is None else 'given'}")
    if not isinstance(block_n, int) and not isinstance(block_n, torch.SymInt):
        raise TypeError(f"quantized_matmul: block_n must be an int, got {type(block_n).__name__}")
    if block_n != 1 and not float8:
        raise ValueError(f"quantized_matmul: block_n={block_n} (per-tensor or 2-D block scales) is for float8 weights; "
                         f"{w.dtype} weights take block_n=1 (per-channel or blockwise)")
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
        layout = Layout.recognise(w.shape, block_size, packed, block_n)
    except ValueError as e:
        raise ValueError(f"quantized_matmul: {e}") from None
    k = x.shape[-1]
    if block_size != PER_CHANNEL and k % block_size and block_n == 1:  # 2-D blocks may end partial
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
        raise ValueError(f"quantized_matmul: {layout.name} scale must have shape {expected}"
                         f"{_scale_shape_hint(layout, n, k, _shape(scale))}, got {_shape(scale)}")
    if zero_point is not None and _shape(zero_point) != expected:
        raise ValueError(f"quantized_matmul: zero_point must have shape {expected} like scale, got {_shape(zero_point)}")

    if bias is not None and _shape(bias) != (n,):
        raise ValueError(f"quantized_matmul: bias must have shape ({n},), got {_shape(bias)}")
    if quantize_activation and not float8:  # float8 products accumulate in float32: no integer bound
        bound, length = max_int32_reduction(w.dtype, int4_weight), layout.group_size(k)
        if length > bound:
            raise ValueError(
                f"quantized_matmul: quantize_activation accumulates in int32, which can overflow for "
                f"{'K' if block_size == PER_CHANNEL else 'block_size'}={length} with "
                f"{'4-bit ' if int4_weight else ''}{w.dtype} weights; the bound is {bound}"
            )
    return MatmulSpec(k, n, block_size, layout.num_groups(k), layout.by_rows, layout)
