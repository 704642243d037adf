"""Quantized expert banks: :class:`XlaQuantizedExperts` (one bank ``[E, N, K]`` on
``torch.ops.xq.quantized_grouped_matmul``), :class:`XlaQuantizedGatedExperts` (a drop-in for
``transformers``' fused experts modules) and the part of :func:`xqpass.quantize_model` that swaps them.

One bank is E experts of one linear's shape, stacked on a leading axis, each stored as the grouped op
takes it (docs/ops.md): per-channel or blockwise **by rows**, int8 / uint8, 4-bit (packed two a byte by
default), float8 e4m3fn / e5m2 symmetric:

===========================  =======================  ==============================  ==========
layout                       ``weight``               ``weight_scaler``, zp           ``bias``
===========================  =======================  ==============================  ==========
per-channel (B = -1)         ``[E, N, K]`` (``K/2``)  ``[E, N]``                      ``[E, N]``
blockwise by rows (B)        ``[E, N, K]`` (``K/2``)  ``[E, N, K/B]``                 ``[E, N]``
2-D blocks (float8, Bn x B)  ``[E, N, K]``            ``[E, ceil(N/Bn), ceil(K/B)]``  ``[E, N]``
===========================  =======================  ==============================  ==========

2-D blocks (``block_n=Bn``, HF fp8 / DeepSeek 128 x 128) are each expert's own: a block never holds rows
of two experts, and N and K need not be multiples of the block.

Act-order banks (GPTQ ``desc_act``): each expert's K stored sorted by its own groups, and an
``input_perm`` buffer ``[E, K]`` int64 (:meth:`XlaQuantizedExperts.set_input_permutation`) that the
grouped op reads as ``perm``: expert ``e`` reads ``x[t, input_perm[e]]``.

``transformers`` 5 keeps a MoE layer's experts as one module with two fused banks (``MixtralExperts``,
``Qwen3MoeExperts``, ``Qwen2MoeExperts``, ``OlmoeExperts``, ...: every class decorated with
``use_experts_implementation``): ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` parameters, and
``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``::

    gate, up = (x @ gate_up_proj[e].T).chunk(2)          for each of the k experts e of a row
    out      = sum_j top_k_weights[t, j] * (act_fn(gate) * up) @ down_proj[e_j].T

(``_default_apply_gate``). :class:`XlaQuantizedGatedExperts` computes the same with both banks quantized
and every expert of every row in two grouped calls: no loop over experts, no data-dependent shapes, so
one XLA graph whatever the routing. A class whose flags say otherwise (``is_transposed``, a bias, no
gate, ``is_concatenated=False``, a post-expert norm, its own ``_apply_gate`` as gpt-oss has) is left
alone and reported.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .ops import check_grouped_inputs  # importing .ops registers torch.ops.xq.quantized_grouped_matmul
from .ops.grouped import check_perm_values, flat_bank, flat_bank_matmul, in_own_order
from .quant.layouts import FLOAT8_DTYPES, PER_CHANNEL, PER_TENSOR, Layout
from .quant.quantize import QuantizedWeight, check_weight, quantize_weight


def quantize_expert_bank(bank: torch.Tensor, bits: int = 8, block_size: int = PER_CHANNEL, symmetric: bool = True,
                         packed: bool | None = None, scale_dtype: torch.dtype = torch.float32, *,
                         weight_dtype: torch.dtype | None = None, block_n: int = 1) -> QuantizedWeight:
    """Round-to-nearest quantize a float bank ``[E, N, K]`` into the grouped op's layout, each expert as
    :func:`~xqpass.quant.quantize_weight` quantizes an ``[N, K]`` weight by rows. Per-channel and
    by-rows scales belong to one row each, so the bank is quantized as one ``[E * N, K]`` weight and
    reshaped: the same bytes and scales as expert by expert. 2-D blocks (float8, ``block_n=Bn``) belong
    to one expert each, so those experts are quantized one by one. Returns a :class:`QuantizedWeight`
    whose tensors have the expert axis first. Errors as ``quantize_weight``'s (a ``TypeError`` for a bank
    that is not 3-D); per-tensor (``block_n=-1``) has no bank layout (a ``ValueError``)."""
    if not isinstance(bank, torch.Tensor) or bank.dim() != 3 or not bank.is_floating_point():
        got = f"{bank.dtype} {bank.dim()}-D tensor" if isinstance(bank, torch.Tensor) else type(bank).__name__
        raise TypeError(f"quantize_expert_bank expects a floating [experts, out_features, in_features] tensor, got "
                        f"{got}")
    experts, n, k = bank.shape
    if experts == 0 or n == 0:
        raise ValueError(f"the bank {tuple(bank.shape)} holds no experts or no output features")
    if block_n == PER_TENSOR:
        raise ValueError("block_n=-1 (per-tensor) has no expert bank layout: pass block_n=out_features and "
                         "block_size=in_features for one scale an expert, or 2-D blocks")
    if block_n != 1:
        each = [quantize_weight(expert, bits, block_size, symmetric, packed, scale_dtype, "rows",
                                weight_dtype=weight_dtype, block_n=block_n) for expert in bank]
        return QuantizedWeight(torch.stack([q.weight for q in each]), torch.stack([q.scale for q in each]), None,
                               block_size, False, False, block_n)
    flat = quantize_weight(bank.reshape(experts * n, k), bits, block_size, symmetric, packed, scale_dtype, "rows",
                           weight_dtype=weight_dtype)

    def per_expert(t):
        return None if t is None else t.reshape(experts, n, *t.shape[1:])

    return QuantizedWeight(per_expert(flat.weight), per_expert(flat.scale), per_expert(flat.zero_point),
                           flat.block_size, flat.int4_weight, flat.packed)


class XlaQuantizedExperts(nn.Module):
    """A bank of ``num_experts`` quantized linears of one shape, run through
    ``torch.ops.xq.quantized_grouped_matmul``: ``forward(x [T, K], expert_ids [T] or [T, top_k])`` returns
    ``[*expert_ids.shape, N]``, row ``t`` (slot ``j``) times expert ``expert_ids[t, j]`` (plus its bias).

    Buffers as in the module docstring's table (``weight``, ``weight_scaler``, ``zero_point`` when
    asymmetric: ``w_deq = weight * weight_scaler - zero_point``, the op's convention); ``bias`` an
    optional ``[E, N]`` parameter. Build one from a float bank with :meth:`from_float`, or allocate it
    (``device="meta"``: nothing allocated) and fill it with :meth:`load_quantized_weight`.
    """

    def __init__(self, num_experts: int, input_dim: int, output_dim: int, is_symmetric: bool = True,
                 block_size: int = PER_CHANNEL, int4_weight: bool = False, *, packed: bool = False,
                 bias: bool = False, weight_dtype: torch.dtype | None = None,
                 scale_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 block_n: int = 1):
        super().__init__()
        if weight_dtype in FLOAT8_DTYPES and (not is_symmetric or int4_weight or packed):
            raise ValueError(f"float8 weights ({weight_dtype}) are symmetric, one value a byte: pass is_symmetric=True, "
                             f"int4_weight=False, packed=False")
        if block_n != 1 and (weight_dtype not in FLOAT8_DTYPES or block_n <= 0 or block_size == PER_CHANNEL):
            raise ValueError(f"block_n={block_n}: expert banks take 2-D blocks (block_n > 1 with a block_size) of "
                             f"float8 weights only, got weight_dtype={weight_dtype}, block_size={block_size}")
        if block_n == 1 and block_size != PER_CHANNEL and (block_size <= 0 or input_dim % block_size):
            raise ValueError(f"block_size must be -1 or a positive divisor of input_dim={input_dim}, got {block_size}")
        if packed and not int4_weight:
            raise ValueError("packed=True holds two 4-bit values a byte; it needs int4_weight=True")
        self.num_experts = num_experts
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.block_size = block_size
        self.int4_weight = int4_weight
        self.packed = packed
        self.block_n = block_n
        layout = self._layout = Layout.of(block_size, packed, "rows", block_n)  # read in forward: Dynamo keeps
        # a plain attribute in its graph, where Layout.recognise's interning is a graph break
        w_shape = (num_experts, *layout.weight_shape(output_dim, input_dim))
        s_shape = (num_experts, *layout.scale_shape(output_dim, input_dim))
        if weight_dtype is None:
            weight_dtype = torch.int8 if is_symmetric else torch.uint8
        self.register_buffer("weight", torch.zeros(w_shape, dtype=weight_dtype, device=device))
        self.register_buffer("weight_scaler", torch.zeros(s_shape, dtype=scale_dtype, device=device))
        if is_symmetric:
            self.zero_point = None
        else:
            self.register_buffer("zero_point", torch.zeros(s_shape, dtype=scale_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(num_experts, output_dim, dtype=scale_dtype, device=device)) if bias else None
        # act-order checkpoints (GPTQ desc_act): each expert's K was sorted by its groups at load; the op
        # reads each row in the order of the expert it meets
        self.register_buffer("input_perm", None)
        #: set by :func:`xqpass.shard_model`'s "expert" style: the experts are split over devices, and
        #: forward multiplies every row by every expert (see :meth:`every_expert`)
        self.expert_parallel = False

    @property
    def layout(self) -> Layout:
        """One expert's layout (:mod:`xqpass.quant.layouts`): per-channel, blockwise by rows or 2-D blocks."""
        return self._layout

    @property
    def in_features(self) -> int:
        return self.input_dim

    @property
    def out_features(self) -> int:
        return self.output_dim

    @classmethod
    def from_float(cls, bank: torch.Tensor, bits: int = 8, block_size: int = PER_CHANNEL, symmetric: bool = True,
                   *, packed: bool | None = None, scale_dtype: torch.dtype = torch.float32,
                   weight_dtype: torch.dtype | None = None, bias: torch.Tensor | None = None,
                   block_n: int = 1) -> "XlaQuantizedExperts":
        """Round-to-nearest quantize a float bank ``[E, N, K]`` (:func:`quantize_expert_bank`; float8 in 2-D
        blocks: ``weight_dtype=torch.float8_e4m3fn, block_size=128, block_n=128``); ``bias``: an optional
        float ``[E, N]``. Neither is modified; the new module sits on ``bank``'s device."""
        qw = quantize_expert_bank(bank, bits, block_size, symmetric, packed, scale_dtype, weight_dtype=weight_dtype,
                                  block_n=block_n)
        experts, n, k = bank.shape
        if bias is not None and tuple(bias.shape) != (experts, n):
            raise ValueError(f"bias must have shape {(experts, n)} [E, N], got {tuple(bias.shape)}")
        q = cls(experts, k, n, is_symmetric=qw.zero_point is None, block_size=block_size, int4_weight=qw.int4_weight,
                packed=qw.packed, bias=bias is not None, weight_dtype=qw.weight.dtype, scale_dtype=scale_dtype,
                device="meta", block_n=qw.block_n)
        q.load_quantized_weight(qw.weight, qw.scale, qw.zero_point)
        if bias is not None:
            q.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return q

    def load_quantized_weight(self, weight, weight_scaler, zero_point=None) -> None:
        """Load quantized tensors in this module's layout (checked as the grouped op checks a call: shapes
        and dtypes, each error naming what was expected)."""
        spec = self._check_bank(weight, weight_scaler, zero_point)
        if (spec.experts, spec.out_features) != (self.num_experts, self.output_dim):
            raise ValueError(f"load_quantized_weight: expected {self.num_experts} experts of {self.output_dim} output "
                             f"features, got {spec.experts} of {spec.out_features}")
        self.weight = weight
        self.weight_scaler = weight_scaler
        self.zero_point = zero_point

    def _check_bank(self, weight, weight_scaler, zero_point, perm=None):
        """The grouped op's checks of a call on this module's layout, made on an empty activation."""
        probe = torch.empty((0, self.input_dim), dtype=torch.float32, device=weight.device)
        ids = torch.empty((0,), dtype=torch.int64, device=weight.device)
        return check_grouped_inputs(probe, ids, weight, weight_scaler, zero_point, self.block_size, self.int4_weight,
                                    None, self.packed, self.block_n, perm)

    def set_input_permutation(self, perm: torch.Tensor) -> None:
        """Expert ``e`` reads input feature ``perm[e, i]`` as its feature ``i`` (``x[..., perm[e]]``): for
        banks whose experts' K was reordered at load, each its own way (act-order checkpoints). ``perm``:
        integer ``[E, K]``, each row a permutation of ``range(K)``; kept as int64 on the weight's device."""
        if isinstance(perm, torch.Tensor) and perm.device != self.weight.device:
            raise ValueError(f"set_input_permutation: perm is on {perm.device}, the bank on {self.weight.device}")
        self._check_bank(self.weight, self.weight_scaler, self.zero_point, perm)
        if perm.device.type != "meta":
            check_perm_values(perm)
        self.input_perm = perm.to(torch.int64)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        if self.expert_parallel:
            return self.every_expert(x, expert_ids)
        return torch.ops.xq.quantized_grouped_matmul.default(
            x, expert_ids, self.weight, self.weight_scaler, self.zero_point, self.block_size, self.int4_weight,
            self.bias, self.input_perm, packed=self.packed, block_n=self.block_n)

    def every_expert(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """The expert-parallel form: the bank as one ``[E * N, K]`` weight through
        ``xq::quantized_matmul`` (every row against every expert, each device its own E/n experts' N
        columns; the bias per column), then each row's experts picked from ``[T, E, N]``. The grouped
        op's few-row routes gather the chosen experts' bytes, which GSPMD would fetch from the devices
        holding them (an integer all-reduce as large as the experts); this form moves activations only.
        The same value as the grouped op (one rounding to ``x.dtype``, before the pick). With an input
        permutation each (row, slot) is a row of its own in its expert's order (as the op's XLA routes
        do), and only that expert's product is picked."""
        experts, n = self.num_experts, self.output_dim
        ids = expert_ids if expert_ids.dim() == 2 else expert_ids[:, None]
        if self.input_perm is not None:
            x, ids = in_own_order(x, ids, self.input_perm)  # [T * top_k, K], [T * top_k, 1]
        bank = flat_bank(self.layout, x, self.weight, self.weight_scaler, self.zero_point, self.bias)
        y = flat_bank_matmul(bank, self.int4_weight, self.packed)
        rows, top_k = ids.shape
        picked = y.reshape(rows, experts, n).gather(1, ids[..., None].expand(rows, top_k, n))
        return picked.reshape(*expert_ids.shape, n)

    def _blocks(self) -> str:
        if self.block_n > 1:
            return f"({self.block_n}x{self.block_size})"
        return "" if self.block_size == PER_CHANNEL else f"(B={self.block_size})"

    def extra_repr(self) -> str:
        bits = "float8" if self.weight.dtype in FLOAT8_DTYPES else "int4" if self.int4_weight else "int8"
        if self.int4_weight:
            bits += " packed" if self.packed else " (one a byte)"
        return (f"num_experts={self.num_experts}, in_features={self.input_dim}, out_features={self.output_dim}, "
                f"weight={bits} {self.weight.dtype}, {self.layout.name}{self._blocks()}, "
                f"symmetric={self.zero_point is None}, bias={self.bias is not None}"
                f"{', act-order' if self.input_perm is not None else ''}")


class XlaQuantizedGatedExperts(nn.Module):
    """Drop-in for ``transformers``' fused experts module (``MixtralExperts``, ``Qwen3MoeExperts``, ...):
    ``gate_up_proj`` (``[E, 2I, H]``) and ``down_proj`` (``[E, H, I]``) as :class:`XlaQuantizedExperts`,
    the same ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.

    Two grouped calls a layer: the router's ``top_k_index`` as it comes for the gate/up bank (one ``x``
    row, k experts), then each (row, slot) its own row of the down bank. The k results are weighted and
    summed in float32 (``top_k_weights``' dtype or wider) and rounded once to ``hidden_states.dtype``
    (transformers rounds each expert's share, then adds them in that dtype)."""

    def __init__(self, gate_up_proj: XlaQuantizedExperts, down_proj: XlaQuantizedExperts, act_fn: nn.Module):
        super().__init__()
        if gate_up_proj.out_features != 2 * down_proj.in_features or gate_up_proj.in_features != down_proj.out_features \
                or gate_up_proj.num_experts != down_proj.num_experts:
            raise ValueError(f"gate_up_proj [{gate_up_proj.num_experts}, {gate_up_proj.out_features}, "
                             f"{gate_up_proj.in_features}] and down_proj [{down_proj.num_experts}, {down_proj.out_features}, "
                             f"{down_proj.in_features}] are not [E, 2I, H] and [E, H, I]")
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn
        self.num_experts = gate_up_proj.num_experts
        self.hidden_dim = gate_up_proj.in_features
        self.intermediate_dim = down_proj.in_features

    @classmethod
    def from_float(cls, experts: nn.Module, bits: int = 8, block_size: int = PER_CHANNEL, symmetric: bool = True, *,
                   packed: bool | None = None, scale_dtype: torch.dtype = torch.float32,
                   weight_dtype: torch.dtype | None = None, block_n: int = 1) -> "XlaQuantizedGatedExperts":
        """Quantize a ``transformers`` experts module (both banks in one format; ``act_fn`` shared, the
        float module never modified). :func:`gated_experts_reason` says whether it can be swapped."""
        reason = gated_experts_reason(experts)
        if reason is not None:
            raise ValueError(f"{type(experts).__name__}: {reason}")
        kwargs = dict(packed=packed, scale_dtype=scale_dtype, weight_dtype=weight_dtype, block_n=block_n)
        return cls(XlaQuantizedExperts.from_float(experts.gate_up_proj.detach(), bits, block_size, symmetric, **kwargs),
                   XlaQuantizedExperts.from_float(experts.down_proj.detach(), bits, block_size, symmetric, **kwargs),
                   experts.act_fn)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        rows, top_k = top_k_index.shape
        gate, up = self.gate_up_proj(hidden_states, top_k_index).chunk(2, dim=-1)  # [T, k, I] each
        inner = (self.act_fn(gate) * up).reshape(rows * top_k, self.intermediate_dim)
        out = self.down_proj(inner, top_k_index.reshape(rows * top_k)).reshape(rows, top_k, self.hidden_dim)
        weights = top_k_weights.to(torch.promote_types(top_k_weights.dtype, torch.float32))
        return (out.to(weights.dtype) * weights[..., None]).sum(dim=1).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}"


#: the flags of ``transformers``' ``use_experts_implementation`` and the values the gated forward assumes
_GATED_FLAGS = {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True,
                "has_post_expert_norm": False}


def is_expert_bank_module(module: nn.Module) -> bool:
    """A module holding fused 3-D banks the way ``transformers`` 5's experts modules do (whether or not
    :class:`XlaQuantizedGatedExperts` can take it: :func:`gated_experts_reason`)."""
    return all(isinstance(module._parameters.get(name), torch.Tensor) and module._parameters[name].dim() == 3
               for name in ("gate_up_proj", "down_proj"))


def gated_experts_reason(module: nn.Module) -> str | None:
    """Why :class:`XlaQuantizedGatedExperts` would not compute what ``module`` computes; None when it would."""
    if not is_expert_bank_module(module):
        return "it holds no 3-D gate_up_proj and down_proj parameters"
    if not hasattr(module, "is_transposed") or not hasattr(module, "_apply_gate"):
        return (f"its class {type(module).__qualname__} is not a transformers experts class "
                f"(use_experts_implementation), so its forward is not known")
    flags = {name: getattr(module, name, None) for name in _GATED_FLAGS}
    other = {name: value for name, value in flags.items() if value != _GATED_FLAGS[name]}
    if other:
        return (f"its flags {other} describe another forward (the swap computes x @ gate_up_proj[e].T, "
                f"act(gate) * up, @ down_proj[e].T without biases)")
    from transformers.integrations.moe import _default_apply_gate

    if getattr(type(module)._apply_gate, "__func__", type(module)._apply_gate) is not _default_apply_gate:
        return f"its class {type(module).__qualname__} has its own _apply_gate, which the swap would drop"
    if any(module._parameters.get(name) is not None for name in ("gate_up_proj_bias", "down_proj_bias")):
        return "it has expert biases"
    if not isinstance(getattr(module, "act_fn", None), nn.Module) and not callable(getattr(module, "act_fn", None)):
        return "it has no act_fn"
    experts, two_inner, hidden = module.gate_up_proj.shape
    if two_inner % 2 or tuple(module.down_proj.shape) != (experts, hidden, two_inner // 2):
        return (f"gate_up_proj {tuple(module.gate_up_proj.shape)} and down_proj {tuple(module.down_proj.shape)} are "
                f"not [E, 2I, H] and [E, H, I]")
    if module._forward_hooks or module._forward_pre_hooks:
        return "it has forward hooks or pre-hooks, which the swap would drop"
    return None


def check_expert_banks(module: nn.Module, block_size: int, packed: bool, block_n: int = 1) -> None:
    """Metadata checks of both banks before anything is built (a ``ValueError`` / ``TypeError`` from
    :func:`~xqpass.quant.quantize.check_weight`, naming the bank; 2-D blocks may end partial along K, so
    only the bank itself is checked there)."""
    checked_block_size = PER_CHANNEL if block_n > 1 else block_size
    for name in ("gate_up_proj", "down_proj"):
        bank = module._parameters[name]
        if nn.parameter.is_lazy(bank):
            raise ValueError(f"{name} is uninitialized: run one forward pass first")
        try:
            check_weight(bank.flatten(0, 1), checked_block_size, packed)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{name} {tuple(bank.shape)}: {e}") from e


@dataclass
class QuantizedExpertBanks:
    """A transformers experts module swapped for an :class:`XlaQuantizedGatedExperts`."""

    names: tuple[str, ...]
    experts: int
    hidden: int
    intermediate: int

    def __str__(self) -> str:
        return (f"  + {' = '.join(self.names)}: {self.experts} experts, gate_up [{2 * self.intermediate}x{self.hidden}], "
                f"down [{self.hidden}x{self.intermediate}]")


__all__ = ["QuantizedExpertBanks", "XlaQuantizedExperts", "XlaQuantizedGatedExperts", "check_expert_banks",
           "gated_experts_reason", "is_expert_bank_module", "quantize_expert_bank"]
