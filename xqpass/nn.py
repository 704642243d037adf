"""``XlaQuantizedLinear`` (the seed's module, grown) and ``quantize_model`` (the seed's module swap)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .ops import check_inputs  # importing .ops registers torch.ops.xq.quantized_matmul
from .quant.layouts import PER_CHANNEL
from .quant.quantize import quantize_weight


class XlaQuantizedLinear(nn.Module):
    """A linear layer whose weight stays quantized and runs through ``torch.ops.xq.quantized_matmul``.

    Buffers (the quantized bytes only; no float copy of the weight), in the op's layouts
    (:mod:`xqpass.quant.layouts`; N = output_dim, K = input_dim, B = block_size):

    * ``weight``: int8 / uint8, per-channel ``[N, K]``, blockwise ``[K/B, B, N]`` (the seed's) or
      blockwise by rows ``[N, K]`` (``block_layout="rows"``); with ``packed`` two 4-bit values a byte
      along K (``[N, K/2]``, ``[K/B, B/2, N]``).
    * ``weight_scaler``: ``[N]``, ``[K/B, N]`` or by rows ``[N, K/B]``; ``zero_point`` (asymmetric only): same shape, float,
      the seed's convention ``w_deq = weight * weight_scaler - zero_point``.
    * ``bias`` (optional ``[N]`` float parameter).

    The constructor's first six parameters are the seed's (``torch_xla``'s ``XlaQuantizedLinear``),
    including its default ``is_symmetric=False``; ``device`` places the (zero) buffers, as ``nn.Linear``'s
    does (``"meta"``: none allocated, for filling with :meth:`load_quantized_weight`). Build one from a float layer with :meth:`from_float`,
    or fill it with :meth:`load_quantized_weight` as with the seed.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        is_symmetric: bool = False,
        block_size: int = PER_CHANNEL,
        int4_weight: bool = False,
        quantize_activation: bool = False,
        *,
        packed: bool = False,
        bias: bool = False,
        weight_dtype: torch.dtype | None = None,
        scale_dtype: torch.dtype = torch.float32,
        block_layout: str = "seed",
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if block_layout not in ("seed", "rows"):
            raise ValueError(f"block_layout must be 'seed' or 'rows', got {block_layout!r}")
        if block_size != PER_CHANNEL and (block_size <= 0 or input_dim % block_size):
            raise ValueError(f"block_size must be -1 or a positive divisor of input_dim={input_dim}, got {block_size}")
        if packed and not int4_weight:
            raise ValueError("packed=True holds two 4-bit values a byte; it needs int4_weight=True")
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.is_symmetric = is_symmetric
        self.block_size = block_size
        self.int4_weight = int4_weight
        self.quantize_activation = quantize_activation
        self.packed = packed
        self.block_layout = block_layout
        pack = 2 if packed else 1
        if block_size == PER_CHANNEL:
            w_shape, s_shape = (output_dim, input_dim // pack), (output_dim,)
        elif block_layout == "rows":
            w_shape, s_shape = (output_dim, input_dim // pack), (output_dim, input_dim // block_size)
        else:
            w_shape = (input_dim // block_size, block_size // pack, output_dim)
            s_shape = (input_dim // block_size, output_dim)
        if weight_dtype is None:
            weight_dtype = torch.int8 if is_symmetric else torch.uint8
        self.register_buffer("weight", torch.zeros(w_shape, dtype=weight_dtype, device=device))
        self.register_buffer("weight_scaler", torch.zeros(s_shape, dtype=scale_dtype, device=device))
        if is_symmetric:
            self.zero_point = None
        else:
            self.register_buffer("zero_point", torch.zeros(s_shape, dtype=scale_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(output_dim, dtype=scale_dtype, device=device)) if bias else None
        # act-order checkpoints (GPTQ desc_act): K was permuted at load so groups are contiguous; the
        # activation's last dim is permuted the same way on every call
        self.register_buffer("input_perm", None)

    @property
    def in_features(self) -> int:
        return self.input_dim

    @property
    def out_features(self) -> int:
        return self.output_dim

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        bits: int = 8,
        block_size: int = PER_CHANNEL,
        symmetric: bool = True,
        quantize_activation: bool = False,
        *,
        packed: bool | None = None,
        scale_dtype: torch.dtype = torch.float32,
        block_layout: str = "seed",
    ) -> "XlaQuantizedLinear":
        """Round-to-nearest quantize an ``nn.Linear`` (see :func:`xqpass.quant.quantize_weight`).

        ``bits=4`` stores packed int4 (half a byte a weight) unless ``packed=False``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float expects an nn.Linear, got {type(linear).__name__}")
        qw = quantize_weight(linear.weight, bits, block_size, symmetric, packed, scale_dtype, block_layout)
        q = cls(
            linear.in_features,
            linear.out_features,
            is_symmetric=symmetric,
            block_size=block_size,
            int4_weight=bits == 4,
            quantize_activation=quantize_activation,
            packed=qw.packed,
            bias=linear.bias is not None,
            weight_dtype=qw.weight.dtype,
            scale_dtype=scale_dtype,
            block_layout=block_layout,
        )
        q.load_quantized_weight(qw.weight, qw.scale, qw.zero_point)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return q.to(linear.weight.device)

    def load_quantized_weight(self, weight, weight_scaler, zero_point=None):
        """Load quantized tensors in this module's layout (the seed's method).

        weight: per-channel ``[out, in]`` / blockwise ``[in / block_size, block_size, out]``
        (K or B halved when packed); weight_scaler: ``[out]`` / ``[in / block_size, out]``;
        zero_point: like weight_scaler, or None.
        """
        probe = torch.empty((1, self.input_dim), dtype=torch.float32, device=weight.device)
        spec = check_inputs(
            probe, weight, weight_scaler, zero_point, self.block_size, self.int4_weight,
            self.quantize_activation, self.packed,
        )
        if spec.out_features != self.output_dim:
            raise ValueError(f"load_quantized_weight: expected {self.output_dim} output features, got {spec.out_features}")
        self.weight = weight
        self.weight_scaler = weight_scaler
        self.zero_point = zero_point

    def set_input_permutation(self, perm: torch.Tensor) -> None:
        """Read input feature ``perm[i]`` as feature ``i`` (``x[..., perm]``): for weights whose K was
        reordered at load time (act-order checkpoints)."""
        if perm.dtype != torch.int64 or tuple(perm.shape) != (self.input_dim,):
            raise ValueError(f"input permutation must be int64 [{self.input_dim}], got {perm.dtype} {tuple(perm.shape)}")
        self.input_perm = perm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        return torch.ops.xq.quantized_matmul(
            x,
            self.weight,
            self.weight_scaler,
            self.zero_point,
            self.block_size,
            self.int4_weight,
            self.quantize_activation,
            self.bias,
            packed=self.packed,
        )

    def extra_repr(self) -> str:
        bits = "int4" if self.int4_weight else "int8"
        if self.int4_weight:
            bits += " packed" if self.packed else " (one a byte)"
        return (
            f"in_features={self.input_dim}, out_features={self.output_dim}, weight={bits} {self.weight.dtype}, "
            f"block_size={self.block_size}{' by rows' if self.block_layout == 'rows' and self.block_size != -1 else ''}, "
            f"symmetric={self.zero_point is None}, "
            f"quantize_activation={self.quantize_activation}, bias={self.bias is not None}"
        )


def quantize_model(
    model: nn.Module,
    bits: int = 8,
    block_size: int = PER_CHANNEL,
    symmetric: bool = True,
    quantize_activation: bool = False,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    *,
    packed: bool | None = None,
    scale_dtype: torch.dtype = torch.float32,
    block_layout: str = "seed",
) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` (in place) for an :class:`XlaQuantizedLinear`.

    ``filter_fn(module, fully_qualified_name) -> bool`` picks the layers (default: every
    ``nn.Linear``). Every picked layer is checked before any is swapped, so a layer that cannot take
    the format (a ``block_size`` that does not divide its ``in_features``, an odd K for packed int4)
    raises ``ValueError`` naming it and leaves the model untouched. Returns ``model``.
    """
    picked = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (filter_fn is None or filter_fn(module, name))
    ]
    group = lambda m: m.in_features if block_size == PER_CHANNEL else block_size  # noqa: E731
    for name, module in picked:
        if name == "":
            raise ValueError("quantize_model: the model itself is an nn.Linear; use XlaQuantizedLinear.from_float")
        if block_size != PER_CHANNEL and module.in_features % block_size:
            raise ValueError(f"quantize_model: block_size={block_size} does not divide in_features={module.in_features} of {name!r}")
        if bits == 4 and packed is not False and group(module) % 2:
            raise ValueError(f"quantize_model: packed int4 needs an even group, {name!r} has {group(module)}")
    for name, module in picked:
        swapped = XlaQuantizedLinear.from_float(
            module, bits, block_size, symmetric, quantize_activation, packed=packed, scale_dtype=scale_dtype,
            block_layout=block_layout,
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, swapped)
    return model
