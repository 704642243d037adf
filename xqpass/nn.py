"""``XlaQuantizedLinear`` (the seed's module, grown) and ``quantize_model`` (the seed's module swap)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, overload

import torch
from torch import nn

from .experts import (QuantizedExpertBanks, XlaQuantizedGatedExperts, check_expert_banks, gated_experts_reason,
                      is_expert_bank_module)
from .ops import check_inputs  # importing .ops registers torch.ops.xq.quantized_matmul
from .quant.layouts import FLOAT8_DTYPES, PER_CHANNEL, PER_TENSOR, Layout
from .quant.quantize import check_float8_format, check_format, check_weight, quantize_weight

log = logging.getLogger("xqpass")


class XlaQuantizedLinear(nn.Module):
    """A linear layer whose weight stays quantized and runs through ``torch.ops.xq.quantized_matmul``.

    Buffers (the quantized bytes only; no float copy of the weight): ``weight`` (int8 / uint8, or float8
    with ``weight_dtype=torch.float8_e4m3fn`` / ``torch.float8_e5m2``: symmetric, one value a byte),
    ``weight_scaler`` and, asymmetric only, ``zero_point`` (float, the seed's convention ``w_deq = weight *
    weight_scaler - zero_point``), shaped by :attr:`layout` (:mod:`xqpass.quant.layouts`: per-channel,
    blockwise in the seed's layout, or by rows with ``block_layout="rows"``; packed or not; float8 also
    per-tensor, ``block_n=-1``, and 2-D blocks, ``block_n=Bn``); ``bias`` (optional ``[N]`` float parameter).

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
        block_n: int = 1,
    ):
        super().__init__()
        if block_layout not in ("seed", "rows"):
            raise ValueError(f"block_layout must be 'seed' or 'rows', got {block_layout!r}")
        float8 = weight_dtype in FLOAT8_DTYPES
        if block_n != 1 and not float8:
            raise ValueError(f"block_n={block_n} (per-tensor or 2-D block scales) is for float8 weights: pass "
                             f"weight_dtype=torch.float8_e4m3fn")
        if float8 and (not is_symmetric or int4_weight or packed):
            raise ValueError(f"float8 weights ({weight_dtype}) are symmetric, one value a byte: pass is_symmetric=True, "
                             f"int4_weight=False, packed=False")
        partial = block_n > 1  # 2-D blocks may end partial along K
        if block_size != PER_CHANNEL and (block_size <= 0 or (input_dim % block_size and not partial)):
            raise ValueError(f"block_size must be -1 or a positive divisor of input_dim={input_dim}, got {block_size}")
        if packed and not int4_weight:
            raise ValueError("packed=True holds two 4-bit values a byte; it needs int4_weight=True")
        if not isinstance(scale_dtype, torch.dtype) or not scale_dtype.is_floating_point:
            raise TypeError(f"scale_dtype must be a floating torch.dtype (torch.float32, torch.bfloat16, ...), "
                            f"got {scale_dtype!r}")
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.is_symmetric = is_symmetric
        self.block_size = block_size
        self.int4_weight = int4_weight
        self.quantize_activation = quantize_activation
        self.packed = packed
        self.block_layout = block_layout
        self.block_n = block_n
        layout = Layout.of(block_size, packed, block_layout, block_n)
        w_shape, s_shape = layout.weight_shape(output_dim, input_dim), layout.scale_shape(output_dim, input_dim)
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
    def layout(self) -> Layout:
        """The layout of ``weight``, ``weight_scaler`` and ``zero_point`` as loaded (:mod:`xqpass.quant.layouts`)."""
        return Layout.recognise(self.weight.shape, self.block_size, self.packed, self.block_n)

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
        weight_dtype: torch.dtype | None = None,
        block_n: int = 1,
    ) -> "XlaQuantizedLinear":
        """Round-to-nearest quantize an ``nn.Linear`` (see :func:`xqpass.quant.quantize_weight`).

        ``bits=4`` stores packed int4 (half a byte a weight) unless ``packed=False``.
        ``weight_dtype=torch.float8_e4m3fn`` (or ``float8_e5m2``) stores float8 weights, ``scale = amax / 448``
        (e5m2: 57344) a channel, a group, the tensor (``block_n=-1``) or a 2-D block (``block_size=128,
        block_n=128``); with ``quantize_activation=True`` the activations are e4m3 per token (W8A8-FP8).
        Bad arguments and weights raise as :func:`~xqpass.quant.quantize_weight` does; ``linear`` is never
        modified.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float expects an nn.Linear, got {type(linear).__name__}")
        if not isinstance(quantize_activation, bool):
            raise TypeError(f"quantize_activation must be True or False, got {type(quantize_activation).__name__} "
                            f"{quantize_activation!r}")
        qw = quantize_weight(linear.weight, bits, block_size, symmetric, packed, scale_dtype, block_layout,
                             weight_dtype=weight_dtype, block_n=block_n)
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
            block_n=block_n,
        )
        q.load_quantized_weight(qw.weight, qw.scale, qw.zero_point)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return q.to(linear.weight.device)

    def load_quantized_weight(self, weight, weight_scaler, zero_point=None):
        """Load quantized tensors in this module's layout (the seed's method).

        weight: per-channel ``[out, in]``, blockwise ``[in / block_size, block_size, out]`` or by rows
        ``[out, in]`` (K or B halved when packed); weight_scaler: ``[out]``, ``[in / block_size, out]`` or
        ``[out, in / block_size]`` (float8: ``[]`` per-tensor, ``[ceil(out / block_n), ceil(in / block_size)]``
        2-D blocks); zero_point: like weight_scaler, or None.
        """
        probe = torch.empty((1, self.input_dim), dtype=torch.float32, device=weight.device)
        spec = check_inputs(
            probe, weight, weight_scaler, zero_point, self.block_size, self.int4_weight,
            self.quantize_activation, self.packed, None, self.block_n,
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
        return torch.ops.xq.quantized_matmul.default(  # the overload itself: no Python packet call
            x,
            self.weight,
            self.weight_scaler,
            self.zero_point,
            self.block_size,
            self.int4_weight,
            self.quantize_activation,
            self.bias,
            packed=self.packed,
            block_n=self.block_n,
        )

    def extra_repr(self) -> str:
        bits = "int4" if self.int4_weight else "int8"
        if self.int4_weight:
            bits += " packed" if self.packed else " (one a byte)"
        if self.weight.dtype in FLOAT8_DTYPES:
            bits = "float8"
        blocks = f", block_n={self.block_n}" if self.block_n != 1 else ""
        return (
            f"in_features={self.input_dim}, out_features={self.output_dim}, weight={bits} {self.weight.dtype}, "
            f"block_size={self.block_size}{' by rows' if self.layout.by_rows else ''}{blocks}, "
            f"symmetric={self.zero_point is None}, "
            f"quantize_activation={self.quantize_activation}, bias={self.bias is not None}"
        )


@dataclass
class QuantizedLayer:
    """An ``nn.Linear`` swapped for an :class:`XlaQuantizedLinear`. ``names``: every name it is registered
    under; a module shared by several names is swapped once and every name gets the new module."""

    names: tuple[str, ...]
    in_features: int
    out_features: int

    def __str__(self) -> str:
        return f"  + {' = '.join(self.names)}: [{self.out_features}x{self.in_features}]"


@dataclass
class SkippedLayer:
    """An ``nn.Linear`` left as it is, and why. ``by_filter``: ``filter_fn`` did not pick it (the caller's
    choice); otherwise the swap would change what the model computes or holds, and the reason says how."""

    names: tuple[str, ...]
    reason: str
    by_filter: bool = False

    def __str__(self) -> str:
        return f"  - {' = '.join(self.names)}: not quantized: {self.reason}"


@dataclass
class QuantizeReport:
    """What :func:`quantize_model` did: ``quantized`` linears, ``experts`` (MoE expert modules swapped
    for :class:`~xqpass.experts.XlaQuantizedGatedExperts`) and ``skipped`` layers in model order, and
    ``notes`` on the other changes it made to keep the model computing the same thing (each says why)."""

    format: str
    quantized: list[QuantizedLayer] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    experts: list[QuantizedExpertBanks] = field(default_factory=list)

    def __str__(self) -> str:
        banks = f", {len(self.experts)} expert modules quantized" if self.experts else ""
        lines = [f"xqpass: quantize_model {self.format}: {len(self.quantized)} linears quantized{banks}, "
                 f"{len(self.skipped)} left as they are"]
        lines += [str(layer) for layer in self.quantized] + [str(bank) for bank in self.experts]
        lines += [str(layer) for layer in self.skipped]
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


@dataclass
class _Site:
    """One nn.Linear object and every place it is registered: (parent, attribute) pairs and full names."""

    linear: nn.Linear
    places: list[tuple[nn.Module, str]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


def _sites(model: nn.Module, wanted) -> list[_Site]:
    """Every module ``wanted(module)`` accepts below ``model`` once, in model order, with all its names.
    ``_modules`` rather than ``named_children``, which drops the second name of a module registered twice."""
    sites: dict[int, _Site] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is None or not wanted(child):
                continue
            site = sites.setdefault(id(child), _Site(child))
            name = f"{parent_name}.{attr}" if parent_name else attr
            if name not in site.names:
                site.names.append(name)
            if not any(p is parent and a == attr for p, a in site.places):
                site.places.append((parent, attr))
    return list(sites.values())


def _linear_sites(model: nn.Module) -> list[_Site]:
    """Every nn.Linear below ``model`` (:func:`_sites`)."""
    return _sites(model, lambda module: isinstance(module, nn.Linear))


def _expert_sites(model: nn.Module) -> list[_Site]:
    """Every transformers experts module (fused 3-D ``gate_up_proj`` / ``down_proj`` banks) below ``model``
    (:func:`_sites`; ``_Site.linear`` holds the module)."""
    return _sites(model, is_expert_bank_module)


def _why_experts_not_swapped(site: _Site, holders: dict, quantize_activation: bool, block_n: int) -> str | None:
    """Why swapping this experts module would change what the model computes or holds (or the format has
    no bank layout); None when it is safe."""
    if quantize_activation:
        return "the grouped op takes no quantized activations (W8A8): the expert banks stay float"
    if block_n == -1:
        return ("block_n=-1: one float8 scale per tensor is not a layout of the grouped op (per-channel, groups "
                "by rows and 2-D blocks are)")
    reason = gated_experts_reason(site.linear)
    if reason is not None:
        return reason
    for tensor_name in ("gate_up_proj", "down_proj"):
        others = sorted({name for module, name in holders.get(id(getattr(site.linear, tensor_name)), [])
                         if module is not site.linear})
        if others:
            return f"its {tensor_name} is also {', '.join(others)} (tied): a quantized copy would end the tie"
    return None


def _parameter_holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) -> every (module, full name) that registers it: how tied weights are found."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module._parameters.items():
            if param is not None:
                name = f"{module_name}.{param_name}" if module_name else param_name
                holders.setdefault(id(param), []).append((module, name))
    return holders


def _why_not_swapped(site: _Site, holders: dict) -> str | None:
    """Why swapping this linear would change what the model computes or holds; None when it is safe."""
    linear = site.linear
    if isinstance(linear, nn.modules.linear.NonDynamicallyQuantizableLinear) or any(
        isinstance(parent, nn.MultiheadAttention) for parent, _ in site.places
    ):
        return ("nn.MultiheadAttention reads out_proj.weight and out_proj.bias itself "
                "(F.multi_head_attention_forward) instead of calling the layer")
    for tensor_name in ("weight", "bias"):
        tensor = getattr(linear, tensor_name)
        if tensor is None:
            continue
        others = sorted({name for module, name in holders.get(id(tensor), []) if module is not linear})
        if others:
            return (f"its {tensor_name} is also {', '.join(others)} (tied): a quantized copy would leave the float "
                    f"tensor in place for the other users (no memory saved) and end the tie; to quantize it, "
                    f"untie it first (layer.{tensor_name} = nn.Parameter(layer.{tensor_name}.detach().clone()))")
    if type(linear).forward is not nn.Linear.forward:
        return f"its class {type(linear).__qualname__} overrides nn.Linear.forward, which the swap would drop"
    if linear._forward_hooks or linear._forward_pre_hooks:
        return "it has forward hooks or pre-hooks, which the swap would drop"
    return None


def _call_the_layer(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing. nn.TransformerEncoderLayer's fused inference path reads
    linear1.weight and linear2.weight as float matrices instead of calling the layers, and it is not
    taken while a submodule has a hook; this hook keeps the quantized layers called."""
    return None


def _format_name(bits, block_size, symmetric, quantize_activation, packed, block_layout, weight_dtype=None,
                 block_n=1) -> str:
    layout = Layout.of(block_size, packed, block_layout, block_n)
    if block_n > 1:
        grouping = f"{layout.name}({block_n}x{block_size})"
    else:
        grouping = layout.name + ("" if block_size == PER_CHANNEL else f"(B={block_size})")
    if weight_dtype is not None:  # float8: symmetric, the dtype says which
        return f"W8A{8 if quantize_activation else 16}-FP8 {str(weight_dtype).removeprefix('torch.')} {grouping}"
    return (f"W{bits}A{8 if quantize_activation else 16}{' packed' if packed else ''} {grouping} "
            f"{'sym' if symmetric else 'asym'}")


@overload
def quantize_model(model: nn.Module, bits: int = ..., block_size: int = ..., symmetric: bool = ...,
                   quantize_activation: bool = ..., filter_fn: Optional[Callable[[nn.Module, str], bool]] = ..., *,
                   packed: bool | None = ..., scale_dtype: torch.dtype = ..., block_layout: str = ...,
                   weight_dtype: torch.dtype | None = ..., block_n: int = ...,
                   return_report: Literal[False] = ..., experts: bool = ...) -> nn.Module: ...


@overload
def quantize_model(model: nn.Module, bits: int = ..., block_size: int = ..., symmetric: bool = ...,
                   quantize_activation: bool = ..., filter_fn: Optional[Callable[[nn.Module, str], bool]] = ..., *,
                   packed: bool | None = ..., scale_dtype: torch.dtype = ..., block_layout: str = ...,
                   weight_dtype: torch.dtype | None = ..., block_n: int = ...,
                   return_report: Literal[True], experts: bool = ...) -> tuple[nn.Module, QuantizeReport]: ...


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
    weight_dtype: torch.dtype | None = None,
    block_n: int = 1,
    return_report: bool = False,
    experts: bool = True,
):
    """Swap the ``nn.Linear`` layers of ``model`` (in place) for :class:`XlaQuantizedLinear` layers.

    ``filter_fn(module, fully_qualified_name) -> bool`` picks the layers (default: every ``nn.Linear``).
    The format arguments are :meth:`XlaQuantizedLinear.from_float`'s (float8: ``weight_dtype`` and
    ``block_n``, e.g. ``weight_dtype=torch.float8_e4m3fn, block_size=128, block_n=128`` for DeepSeek-style
    128 x 128 blocks).

    **Left alone, and reported**, because the swap would change what the model computes or holds:
    ``nn.MultiheadAttention``'s ``out_proj`` (the attention reads its weight, it does not call it); a
    linear whose weight or bias is tied to another module's (``lm_head.weight is embed.weight``: a
    quantized copy keeps the float tensor for the embedding and ends the tie; untie it to quantize it);
    a subclass that overrides ``forward``; a layer with forward hooks. A module registered under several
    names is swapped once, and every name gets the same new module; if ``filter_fn`` picks it under
    some names only, it is left alone. Where a quantized layer sits in an ``nn.TransformerEncoderLayer``,
    whose fused inference path reads ``linear1.weight`` instead of calling the layer, the new layer gets
    a no-op forward pre-hook (that path is not taken while a submodule has a hook), and an
    ``nn.TransformerEncoder`` above it gets ``use_nested_tensor = False`` (its nested-tensor path feeds
    that fused path); the report's notes say so.

    **All or nothing.** Every argument and every picked layer is checked first (a lazy layer not yet
    run, a meta or non-finite weight, ``in_features == 0``, a ``block_size`` that does not divide
    ``in_features``, an odd group for packed int4), then every replacement is built, then the swap is
    done: any error (``TypeError`` for a wrong type, ``ValueError`` for a wrong value, naming the layer
    and what was expected) leaves the model untouched. Peak memory is therefore the float weights plus
    the quantized ones; the float layers are freed after the swap unless something else holds them.

    **The report.** Returns ``model``, so ``model = quantize_model(model, ...)`` reads as before; with
    ``return_report=True`` it returns ``(model, report)``, a :class:`QuantizeReport` of the layers
    quantized and left alone (the way ``transformers``' ``from_pretrained(output_loading_info=True)``
    returns its loading info). The report is also logged on ``logging.getLogger("xqpass")``: all of it
    at INFO, and the layers left alone for safety (not by ``filter_fn``) at WARNING, so that a model
    that is not fully quantized says so by default. It is not stored on the model: an attribute would
    be saved and copied with the model and go stale as soon as the model changes.

    **Mixture-of-experts.** With ``experts=True`` (the default) ``transformers``' fused experts modules
    (``MixtralExperts``, ``Qwen3MoeExperts``, ...: 3-D ``gate_up_proj`` / ``down_proj`` banks) that
    ``filter_fn`` picks are swapped for :class:`~xqpass.experts.XlaQuantizedGatedExperts` in the same
    format, by the same three steps (the report's ``experts``). Expert banks are stored by rows (the
    grouped op's one blockwise layout, whatever ``block_layout`` says); W8A8 and float8 ``block_n``
    formats have no bank layout, and a module whose flags describe another forward (gpt-oss) is not
    swapped: those are left float and reported. The router (``gate``) is an ``nn.Linear`` in some models
    (quantized with the linears, ``filter_fn`` decides) and a plain parameter in others (left float).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise ValueError("quantize_model: the model itself is an nn.Linear; use XlaQuantizedLinear.from_float")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable (module, name) -> bool or None, got {type(filter_fn).__name__}")
    if not isinstance(quantize_activation, bool):
        raise TypeError(f"quantize_activation must be True or False, got {type(quantize_activation).__name__} "
                        f"{quantize_activation!r}")
    if weight_dtype is None:
        if block_n != 1:
            raise ValueError(f"block_n={block_n} (per-tensor or 2-D block scales) is for float8 weights: pass "
                             f"weight_dtype=torch.float8_e4m3fn")
        packed_resolved = check_format(bits, block_size, symmetric, packed, scale_dtype, block_layout)
    else:
        check_float8_format(weight_dtype, bits, block_size, symmetric, packed, block_n)
        check_format(8, block_size, True, False, scale_dtype, block_layout)  # the arguments' types
        packed_resolved = False
    report = QuantizeReport(_format_name(bits, block_size, symmetric, quantize_activation, packed_resolved, block_layout,
                                         weight_dtype, block_n))
    # 2-D blocks may end partial along K: only the weight itself is checked
    checked_block_size = PER_CHANNEL if block_n > 1 or block_n == PER_TENSOR else block_size

    # 1. check: decide every layer, raise before anything is built
    holders = _parameter_holders(model)
    to_swap: list[_Site] = []
    for site in _linear_sites(model):
        names = tuple(site.names)
        picked = [name for name in names if filter_fn is None or filter_fn(site.linear, name)]
        if not picked:
            report.skipped.append(SkippedLayer(names, "not picked by filter_fn", by_filter=True))
            continue
        if len(picked) < len(names):
            report.skipped.append(SkippedLayer(names, (
                f"one module under several names: filter_fn picks it as {', '.join(map(repr, picked))} but not as "
                f"{', '.join(repr(n) for n in names if n not in picked)}, and a shared module is swapped everywhere "
                f"or nowhere"), by_filter=True))
            continue
        if nn.parameter.is_lazy(site.linear.weight):
            raise ValueError(f"quantize_model: {names[0]!r} ({type(site.linear).__name__}) has uninitialized "
                             f"parameters: run one forward pass first so that its shape and values are set; "
                             f"the model is untouched")
        reason = _why_not_swapped(site, holders)
        if reason is not None:
            report.skipped.append(SkippedLayer(names, reason))
            continue
        try:
            check_weight(site.linear.weight, checked_block_size, packed_resolved)
        except (TypeError, ValueError) as e:
            raise type(e)(f"quantize_model: {names[0]!r}: {e}; the model is untouched") from e
        to_swap.append(site)
    expert_swaps: list[_Site] = []
    for site in _expert_sites(model) if experts else []:
        names = tuple(site.names)
        if not all(filter_fn is None or filter_fn(site.linear, name) for name in names):
            report.skipped.append(SkippedLayer(names, "not picked by filter_fn", by_filter=True))
            continue
        reason = _why_experts_not_swapped(site, holders, quantize_activation, block_n)
        if reason is not None:
            report.skipped.append(SkippedLayer(names, reason))
            continue
        try:
            check_expert_banks(site.linear, block_size, packed_resolved, block_n)
        except (TypeError, ValueError) as e:
            raise type(e)(f"quantize_model: {names[0]!r}: {e}; the model is untouched") from e
        expert_swaps.append(site)

    # 2. build every replacement (reads the weights: a non-finite value raises here)
    built: list[XlaQuantizedLinear] = []
    for site in to_swap:
        try:
            built.append(XlaQuantizedLinear.from_float(
                site.linear, bits, block_size, symmetric, quantize_activation, packed=packed,
                scale_dtype=scale_dtype, block_layout=block_layout, weight_dtype=weight_dtype, block_n=block_n,
            ))
        except (TypeError, ValueError) as e:
            raise type(e)(f"quantize_model: {site.names[0]!r}: {e}; the model is untouched") from e
        except Exception as e:
            e.add_note(f"quantize_model: while quantizing {site.names[0]!r}; the model is untouched")
            raise
    built_experts: list[XlaQuantizedGatedExperts] = []
    for site in expert_swaps:
        try:
            built_experts.append(XlaQuantizedGatedExperts.from_float(
                site.linear, bits, block_size, symmetric, packed=packed, scale_dtype=scale_dtype,
                weight_dtype=weight_dtype, block_n=block_n))
        except (TypeError, ValueError) as e:
            raise type(e)(f"quantize_model: {site.names[0]!r}: {e}; the model is untouched") from e
        except Exception as e:
            e.add_note(f"quantize_model: while quantizing {site.names[0]!r}; the model is untouched")
            raise

    # 3. swap (plain attribute assignments: nothing here can fail half way)
    for site, new in zip(to_swap, built):
        for parent, attr in site.places:
            setattr(parent, attr, new)
        if any(isinstance(parent, nn.TransformerEncoderLayer) for parent, _ in site.places):
            new.register_forward_pre_hook(_call_the_layer)
            report.notes.append(f"{site.names[0]}: a no-op forward pre-hook keeps nn.TransformerEncoderLayer's fused "
                                f"inference path (which reads the weight as a float matrix) from being taken")
        report.quantized.append(QuantizedLayer(tuple(site.names), site.linear.in_features, site.linear.out_features))
    for site, new in zip(expert_swaps, built_experts):
        for parent, attr in site.places:
            setattr(parent, attr, new.to(site.linear.gate_up_proj.device))
        report.experts.append(QuantizedExpertBanks(tuple(site.names), new.num_experts, new.hidden_dim,
                                                   new.intermediate_dim))
    if built_experts and block_size != PER_CHANNEL and block_layout == "seed":
        report.notes.append("expert banks are stored blockwise by rows (the grouped op's blockwise layout), the "
                            "linears in the seed's layout")
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False) and any(
            isinstance(m, XlaQuantizedLinear) for m in module.modules()
        ):
            module.use_nested_tensor = False
            report.notes.append(f"{name or '(model)'}: use_nested_tensor = False: the nested-tensor path feeds the "
                                f"layers' fused inference path, which reads float weights")

    log.info("%s", report)
    unsafe = [layer for layer in report.skipped if not layer.by_filter]
    if unsafe:
        log.warning("xqpass: quantize_model left %d linears unquantized:\n%s", len(unsafe),
                    "\n".join(str(layer) for layer in unsafe))
    return (model, report) if return_report else model
