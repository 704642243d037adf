"""The pattern catalogue: every dequantize -> matmul form the pass rewrites, each declared once.

A pattern = a weight **form** (how the dequantized weight is computed from the integer storage) inside a
**product** (how it meets the activation). Spellings (``.to`` vs ``_to_copy``, ``F.linear`` vs
``addmm(t(w))``, views around rank > 2 activations) and layouts (transposes before or after the cast,
``[N, K]`` or ``[K, N]``, grouped ``[N, G, g]`` views) are absorbed by :mod:`.spellings` and
:mod:`.dsl`, so they are not listed here. docs/patterns.md shows one example of each entry.
"""
from __future__ import annotations

from dataclasses import dataclass

from .dsl import (
    AnyOf,
    Cast,
    DequantizePT2E,
    Div,
    ExpertPostScale,
    ExpertProduct,
    GroupedMm,
    IntWeight,
    Matmul,
    Mul,
    Named,
    Operand,
    PackedNibbles,
    Pattern,
    PerTokenQuantized,
    PostBias,
    PostScale,
    ScaledLinear,
    Sub,
)

#: the integer storage, preferring packed int4 in the op's nibble order
QUANTIZED = AnyOf((PackedNibbles(), IntWeight()))
#: the storage cast to float, not yet scaled
CAST = Cast(QUANTIZED)
#: the storage as an integer matmul operand (``torch._int_mm`` takes int8; ``@`` on int32 casts)
INT_OPERAND = Named("int8 weight, int32 matmul", AnyOf((Cast(QUANTIZED, to_int=True), QUANTIZED)))
W8A8 = PerTokenQuantized(Matmul(INT_OPERAND, int_activation=True))


@dataclass(frozen=True)
class WeightForm:
    name: str
    example: str  # one line of user code, for docs/patterns.md
    pattern: Pattern


WEIGHT_FORMS = (
    WeightForm(
        "integer zero point, then cast and scale",
        "(w - zp[:, None]).to(dt) * s[:, None]",
        Named("integer zero point, then cast and scale",
              Mul(Cast(Sub(QUANTIZED, Operand("zero"))), Operand("scale")), zero_kind="int"),
    ),
    WeightForm(
        "integer zero point, then scale by type promotion",
        "(w - zp[:, None]) * s[:, None]",
        Named("integer zero point, then scale by type promotion",
              Mul(Sub(QUANTIZED, Operand("zero")), Operand("scale")), zero_kind="int"),
    ),
    WeightForm(
        "scale",
        "w.to(dt) * s[:, None]",
        Named("scale", Mul(CAST, Operand("scale"))),
    ),
    WeightForm(
        "scale by type promotion, then float zero point",
        "s[:, None] * w - zp[:, None]",
        Named("scale by type promotion, then float zero point",
              Sub(Mul(QUANTIZED, Operand("scale")), Operand("zero")), zero_kind="float"),
    ),
    WeightForm(
        "scale by type promotion",
        "w * s[:, None]",
        Named("scale by type promotion", Mul(QUANTIZED, Operand("scale"))),
    ),
    WeightForm(
        "divided by an inverse scale",
        "w.to(dt) / s_inv[:, None]",
        Named("divided by an inverse scale", Div(CAST, Operand("scale", inverse=True))),
    ),
    WeightForm(
        "zero point, then scale",
        "(w.to(dt) - zp[:, None]) * s[:, None]",
        Named("zero point, then scale", Mul(Sub(CAST, Operand("zero")), Operand("scale")), zero_kind="int"),
    ),
    WeightForm(
        "scale, then float zero point",
        "w.to(dt) * s[:, None] - zp[:, None]",
        Named("scale, then float zero point", Sub(Mul(CAST, Operand("scale")), Operand("zero")),
              zero_kind="float"),
    ),
    WeightForm(
        "PT2E dequantize_per_channel",
        "quantized_decomposed.dequantize_per_channel(w, s, zp, 0, qmin, qmax, torch.int8)",
        Named("PT2E dequantize_per_channel", DequantizePT2E("dequantize_per_channel")),
    ),
    WeightForm(
        "PT2E dequantize_per_tensor",
        "quantized_decomposed.dequantize_per_tensor(w, s, zp, qmin, qmax, torch.int8)",
        Named("PT2E dequantize_per_tensor", DequantizePT2E("dequantize_per_tensor")),
    ),
    WeightForm(
        "cast only (unit scale)",
        "w.to(dt)",
        Named("cast only", CAST),
    ),
)

#: any dequantized weight, optionally cast again (e.g. computed in float32, used in bfloat16)
DEQUANTIZED = AnyOf(tuple(f.pattern for f in WEIGHT_FORMS) + tuple(
    Cast(f.pattern, from_float=True) for f in WEIGHT_FORMS))


@dataclass(frozen=True)
class ProductForm:
    name: str
    example: str
    pattern: Pattern


PRODUCT_FORMS = (
    ProductForm(
        "expert bank, scale after",
        "torch.einsum('ti,taoi->tao', x, w.to(dt)[ids]) * s[ids]",
        ExpertPostScale(ExpertProduct(Named("cast, scaled after the matmul", CAST))),
    ),
    ProductForm(
        "expert bank",
        "torch.einsum('ti,taoi->tao', x, deq[ids])",
        ExpertProduct(DEQUANTIZED),
    ),
    ProductForm(
        "expert bank, grouped_mm",
        "grouped_mm(x_g, deq[E, N, K].transpose(-2, -1), offs=cumsum(histc(sorted ids)))",
        GroupedMm(DEQUANTIZED),
    ),
    ProductForm(
        "library op: scaled linear",
        "quanto.qbytes_mm(x, w, s)  (x @ (s * w).t())",
        ScaledLinear(Named("int8 weight, scaled in the op", IntWeight())),
    ),
    ProductForm(
        "W8A8: per-token int8 activations, bias after",
        "torch._int_mm(x_q, w.t()).to(dt) * x_scale * s + b",
        PostBias(W8A8),
    ),
    ProductForm(
        "W8A8: per-token int8 activations",
        "(x_q.to(torch.int32) @ w.to(torch.int32).t()).to(dt) * x_scale * s",
        W8A8,
    ),
    ProductForm(
        "scale after the matmul, bias after",
        "(x @ w.t().to(dt)) * s + b",
        PostBias(PostScale(Matmul(Named("cast, scaled after the matmul", CAST)))),
    ),
    ProductForm(
        "scale after the matmul, bias before",
        "(x @ w.t().to(dt) + b) * s",
        PostScale(PostBias(Matmul(Named("cast, scaled after the matmul", CAST)))),
    ),
    ProductForm(
        "scale after the matmul",
        "(x @ w.t().to(dt)) * s",
        PostScale(Matmul(Named("cast, scaled after the matmul", CAST))),
    ),
    ProductForm(
        "dequantized weight, bias added after",
        "F.linear(x, deq) + b",
        PostBias(Matmul(DEQUANTIZED)),
    ),
    ProductForm(
        "dequantized weight",
        "F.linear(x, deq, b) / x @ deq.t() / addmm(b, x, deq.t())",
        Matmul(DEQUANTIZED),
    ),
)

#: the node kinds a product can end in (where the driver starts a match)
ROOT_KINDS = ("linear", "matmul", "addmm", "reshape", "mul", "add", "scaled_linear", "einsum", "grouped_mm")
