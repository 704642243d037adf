"""Hypothesis strategies for quantized weights in every format of ``torch.ops.xq.quantized_matmul``.

For users' own property tests (and ours)::

    from hypothesis import given
    from xqpass.testing import strategies as xst

    @given(xst.op_cases())
    def test_my_kernel(case):
        out = my_kernel(case.x, **case.op_kwargs())
        ...

Weights are drawn as raw integers over the whole range of their storage (not produced by
quantizing a float weight), scales as positive floats, zero points as signed floats, so every value a
real checkpoint could hold is reachable. Requires ``hypothesis`` (the ``test`` extra).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from ..quant.layouts import PER_CHANNEL, Layout, value_range
from ..quant.quantize import QuantizedWeight


@dataclass(frozen=True)
class WeightFormat:
    """One row of the op's format table (docs/ops.md)."""

    bits: int  # 8 or 4
    block_size: int  # -1 per-channel, else the block (group) size along K
    symmetric: bool  # False: uint8 storage and a float zero point
    packed: bool  # 4-bit only: two values a byte
    quantize_activation: bool  # W8A8 / W4A8
    by_rows: bool = False  # blockwise with the per-channel storage [N, K] and scales [N, K/B]

    @property
    def layout(self) -> Layout:
        return Layout.of(self.block_size, self.packed, "rows" if self.by_rows else "seed")

    @property
    def name(self) -> str:
        act = "A8" if self.quantize_activation else "A16"
        gran = self.layout.name + ("" if self.block_size == PER_CHANNEL else f"(B={self.block_size})")
        packing = " packed" if self.packed else (" unpacked" if self.bits == 4 else "")
        return f"W{self.bits}{act} {gran} {'sym' if self.symmetric else 'asym'}{packing}"

    @property
    def weight_dtype(self) -> torch.dtype:
        return torch.int8 if self.symmetric else torch.uint8


@st.composite
def weight_formats(draw, bits=(8, 4), block_sizes=(PER_CHANNEL, 2, 4, 8, 16, 32), quantize_activation=(False, True)):
    """A :class:`WeightFormat`. ``block_sizes`` lists the candidates (-1 = per-channel)."""
    b = draw(st.sampled_from(bits))
    block = draw(st.sampled_from(block_sizes))
    return WeightFormat(
        bits=b,
        block_size=block,
        symmetric=draw(st.booleans()),
        packed=draw(st.booleans()) if b == 4 else False,
        quantize_activation=draw(st.sampled_from(quantize_activation)),
        by_rows=block != PER_CHANNEL and draw(st.booleans()),
    )


def _random_ints(gen: torch.Generator, shape, lo: int, hi: int, dtype) -> torch.Tensor:
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int16).to(dtype)


def random_quantized_weight(
    fmt: WeightFormat, out_features: int, in_features: int, seed: int, scale_dtype=torch.float32
) -> QuantizedWeight:
    """Random integers over the storage's full range, in ``fmt``'s layout (K or B halved if packed)."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = value_range(fmt.weight_dtype, fmt.bits == 4)
    groups = fmt.layout.num_groups(in_features)
    w = _random_ints(gen, (out_features, in_features), lo, hi, fmt.weight_dtype)
    # scales spread over two decades, as real checkpoints' are; kept small so outputs stay O(1)
    scale = (torch.rand((out_features, groups), generator=gen) * 0.099 + 0.001).to(scale_dtype) / max(hi, 1)
    zero_point = None
    if not fmt.symmetric:  # a real-valued zero z in the storage range, in the float convention z * scale
        z = torch.rand((out_features, groups), generator=gen) * (hi - lo) + lo
        zero_point = (z * scale.float()).to(scale_dtype)
    w, scale, zero_point = fmt.layout.arrange(w, scale, zero_point)
    return QuantizedWeight(w, scale, zero_point, fmt.block_size, fmt.bits == 4, fmt.packed)


@dataclass(frozen=True)
class OpCase:
    """One call of the op: ``torch.ops.xq.quantized_matmul(case.x, **case.op_kwargs())``."""

    x: torch.Tensor
    weight: QuantizedWeight
    fmt: WeightFormat

    def op_kwargs(self) -> dict:
        return dict(self.weight.op_kwargs(), quantize_activation=self.fmt.quantize_activation)


@st.composite
def op_cases(
    draw,
    formats=None,
    x_dtypes=(torch.float32, torch.bfloat16),
    max_out_features: int = 24,
    max_blocks: int = 4,
    x_ranks=(1, 2, 3),
    in_features=None,
    min_rows: int = 1,
):
    """An :class:`OpCase`: a format, odd and even sizes, a 1-3-D activation, a weight in that format.

    ``in_features``: a strategy for K of per-channel formats (default 1-48; blockwise K is a multiple of
    the block); ``min_rows=0`` lets the activation's leading dims be empty."""
    fmt = draw(formats if formats is not None else weight_formats())
    n = draw(st.integers(1, max_out_features))
    if fmt.block_size == PER_CHANNEL:
        k = draw(in_features if in_features is not None else st.integers(1, 48))
        if fmt.packed:
            k = 2 * ((k + 1) // 2)
    else:
        if fmt.packed and fmt.block_size % 2:
            fmt = dataclasses.replace(fmt, block_size=fmt.block_size * 2)
        k = fmt.block_size * draw(st.integers(1, max_blocks))
    rank = draw(st.sampled_from(x_ranks))
    lead = draw(st.lists(st.integers(min_rows, 5), min_size=rank - 1, max_size=rank - 1))
    dtype = draw(st.sampled_from(x_dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn((*lead, k), generator=gen) * draw(st.sampled_from([0.1, 1.0, 10.0]))).to(dtype)
    weight = random_quantized_weight(fmt, n, k, seed + 1)
    return OpCase(x, weight, fmt)


# ----------------------------------------------------------------------------------------------
# dequantize -> matmul modules, for testing rewrites

from .modules import NEAR_MISSES, PRODUCT_FORMS, SCALE_SPELLINGS, DequantLinear, DequantMLP, DequantSpec  # noqa: E402


@st.composite
def dequant_specs(draw, near_miss: bool | None = False):
    """A :class:`~xqpass.testing.modules.DequantSpec`: a supported form (``near_miss=False``), a near miss
    (``True``) or either (``None``)."""
    miss = draw(st.booleans()) if near_miss is None else near_miss
    if miss:
        kind = draw(st.sampled_from(NEAR_MISSES))
        return DequantSpec(
            weight_form="scale",
            product_form="w8a8_matmul" if kind == "per_tensor_activation" else draw(
                st.sampled_from(["linear", "matmul_t"])),
            bits=8,
            group=draw(st.sampled_from([4, 8])) if kind == "interleaved_groups" else None,
            signed=True,
            near_miss=kind,
        )
    product = draw(st.sampled_from(PRODUCT_FORMS))
    if product.startswith("w8a8"):
        return DequantSpec(product_form=product, bias=draw(st.sampled_from([None, "after"])))
    if product == "scale_after":
        weight_form, bits, group = "scale", draw(st.sampled_from([8, 4])), None
    elif product == "seed_layout":
        weight_form, bits, group = "scale", 8, draw(st.sampled_from([4, 8, 16]))
    else:
        weight_form = draw(st.sampled_from(
            ["scale", "zero_then_scale", "scale_then_float_zero", "pt2e_per_channel", "pt2e_per_tensor"]))
        if weight_form.startswith("pt2e"):
            bits, group = 8, None
        else:
            bits = draw(st.sampled_from([8, 4]))
            group = draw(st.sampled_from([None, 4, 8, 16]))
    signed = draw(st.booleans())
    return DequantSpec(
        weight_form=weight_form,
        product_form=product,
        bits=bits,
        group=group,
        signed=signed,
        scale_spelling=draw(st.sampled_from(SCALE_SPELLINGS)),
        bias=draw(st.sampled_from([None, "inside", "after"])),
    )


@dataclass(frozen=True)
class DequantCase:
    """A module with one or more dequant -> matmul layers, an input, and how many the pass must rewrite."""

    module: torch.nn.Module
    x: torch.Tensor
    specs: tuple

    @property
    def expected_rewrites(self) -> int:
        return sum(s.rewritable for s in self.specs)

    @property
    def expected_misses(self) -> int:
        return sum(not s.rewritable for s in self.specs)


@st.composite
def dequant_modules(draw, near_miss: bool | None = False, max_layers: int = 1,
                    x_dtypes=(torch.float32, torch.bfloat16)):
    """A :class:`DequantCase`: ``max_layers`` > 1 chains layers (d -> d) with GELUs in between."""
    layers = draw(st.integers(1, max_layers))
    specs = [draw(dequant_specs(near_miss)) for _ in range(layers)]
    multiple = 16
    d = multiple * draw(st.integers(1, 3))
    sizes = [d] * (layers + 1)
    if layers == 1:
        sizes[1] = draw(st.integers(1, 24))
    dtype = draw(st.sampled_from(x_dtypes))
    if any(s.product_form.startswith("w8a8") for s in specs):
        # hand-written W8A8 quantizes x in x.dtype, the op in float32: equal int8 activations need float32
        dtype = torch.float32
    seed = draw(st.integers(0, 2**20))
    modules = [DequantLinear(spec, sizes[i], sizes[i + 1], seed + i, dtype) for i, spec in enumerate(specs)]
    rank = 2 if any(s.product_form == "addmm" for s in specs) else draw(st.sampled_from([2, 3]))
    lead = (draw(st.integers(1, 4)),) if rank == 2 else (draw(st.integers(1, 3)), draw(st.integers(1, 4)))
    x = torch.randn(*lead, d, generator=torch.Generator().manual_seed(seed)).to(dtype)
    module = modules[0] if layers == 1 else DequantMLP(modules)
    return DequantCase(module.eval(), x, tuple(specs))
