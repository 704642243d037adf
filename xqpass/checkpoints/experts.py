"""Mixture-of-experts checkpoints: the per-expert quantized linears GPTQ, AWQ and compressed-tensors
quantizers write for Mixtral / Qwen3-MoE-style models, loaded into the fused banks of
:class:`~xqpass.experts.XlaQuantizedGatedExperts` in place of ``transformers``' experts module.

Quantizers keep one linear per expert and projection, named as the model's original checkpoints name
them (transformers 5 fuses them into 3-D banks only as it loads float weights, ``conversion_mapping.py``):

=============================  ==============================================  ===================
``model_type`` (pattern)       stored per expert                               model after renames
=============================  ==============================================  ===================
``mixtral`` (``minimax``, ..)  ``layers.L.block_sparse_moe.experts.E.w1`` gate ``layers.L.mlp.experts``
                               ``w3`` up, ``w2`` down
``qwen2_moe`` (``qwen3_moe``,  ``layers.L.mlp.experts.E.gate_proj`` /          ``layers.L.mlp.experts``
``olmoe``, ``deepseek_v3``..)  ``up_proj`` / ``down_proj``
=============================  ==============================================  ===================

each with its format's tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``; ``weight_packed``,
``weight_scale``, ...). transformers' own mapping says how they fuse: ``MergeModulelist(dim=0)`` stacks
the experts, ``Concatenate(dim=1)`` puts gate before up along N, so ``gate_up_proj[e] = [gate_e; up_e]``
``[2I, H]`` and ``down_proj[e] = down_e`` ``[H, I]``. :func:`naming_for` reads that mapping
(``transformers.conversion_mapping.get_checkpoint_conversion_mapping``) for the model's ``model_type``,
its renames too (Mixtral's ``.block_sparse_moe.`` -> ``.mlp.``, which moves the router's float weight as
well); a model without a known ``model_type`` is matched against :data:`NAMINGS`.

Every expert linear is converted by its format's own ``convert`` (the checks, the unpacking), then the
banks are assembled: gate and up concatenated along N, experts stacked. A bank holds one layout, so
its experts must agree on bits, group size, block rows, zero points and dtypes; quantized activations
have no bank form. Act-order experts (GPTQ ``desc_act``: a permuted ``g_idx``) load with each expert's K
sorted by its groups and the bank's ``input_perm [E, K]`` (each expert reads the row in its own order;
an expert whose ``g_idx`` is ``k // g`` reads it as it comes). Gate and up of one expert become one
expert of ``gate_up_proj``, which reads one order, so their ``g_idx`` must agree (GPTQ gives them the
same act-order: both see the same inputs, hence the same Hessian); when they differ the load is refused.
Float8 experts (HF fp8's ``weight`` + ``weight_scale_inv``, compressed-tensors float-quantized) load per
channel, in groups, in 2-D blocks (DeepSeek-V3, Qwen3-FP8: 128 x 128 a scale) and per tensor (one scale
an expert linear: its one 2-D block, ``block_n = N``, ``block_size = K``). Gate and up are concatenated along N with their scales, so
in 2-D blocks the inner size I must hold whole blocks of rows (a block of ``gate_up_proj`` may not hold
rows of both). Each of these is an error naming the tensor, raised before the model is touched.

Fused 3-D banks (:func:`plan_fused_banks`): a checkpoint whose tensors carry the model's own names,
``<experts>.gate_up_proj [E, 2I, H]`` and ``<experts>.down_proj [E, H, I]`` with the format's scale
suffix (HF fp8: ``gate_up_proj_scale_inv [E, ceil(2I/Bn), ceil(H/B)]``), as transformers 5 saves a
``FP8Experts`` model it loaded from such a checkpoint (one loaded from per-expert names is saved back
per expert: its conversion is reversed).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..experts import XlaQuantizedExperts, XlaQuantizedGatedExperts, gated_experts_reason, is_expert_bank_module
from ..quant.layouts import PER_TENSOR
from .format import CheckpointFormat, ConvertedLayer


@dataclass(frozen=True)
class ExpertNaming:
    """How a checkpoint names a fused experts module's per-expert linears."""
    gate: str  # the projection whose rows come first in gate_up_proj
    up: str
    down: str
    renames: tuple[tuple[str, str], ...] = ()  # (regex, replacement) from stored names to the model's

    def rename(self, key: str) -> str:
        for pattern, replacement in self.renames:
            key = re.sub(pattern, replacement, key)
        return key

    def linears(self, experts_name: str, expert: int) -> tuple[str, str, str]:
        """The model-side names of expert ``expert``'s gate, up and down linears."""
        return tuple(f"{experts_name}.{expert}.{p}" for p in (self.gate, self.up, self.down))


#: transformers 5.24's conversion patterns for the fused experts modules xqpass swaps
NAMINGS = {
    "mixtral": ExpertNaming("w1", "w3", "w2", ((".block_sparse_moe.", ".mlp."),)),
    "qwen2_moe": ExpertNaming("gate_proj", "up_proj", "down_proj"),
}

_PER_EXPERT = re.compile(r"\.experts\.\*\.(\w+)\.weight$")


def naming_from_transformers(model_type: str) -> ExpertNaming | None:
    """The naming transformers' conversion mapping gives ``model_type``: its renames, and the two
    ``WeightConverter`` s that stack per-expert ``.weight`` s into ``gate_up_proj`` (two sources, gate
    first, ``MergeModulelist(dim=0)`` then ``Concatenate(dim=1)``) and ``down_proj``. None when the
    mapping has no such converters (or transformers has no mapping function)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming
    except ImportError:
        return None
    renames, projections = [], {}
    for entry in get_checkpoint_conversion_mapping(model_type) or ():
        sources, targets = list(entry.source_patterns), list(entry.target_patterns)
        if isinstance(entry, WeightRenaming) and len(sources) == len(targets) == 1:
            renames.append((sources[0], targets[0]))
        elif isinstance(entry, WeightConverter) and len(targets) == 1 and targets[0].endswith(("gate_up_proj", "down_proj")):
            names = [_PER_EXPERT.search(s) for s in sources]
            ops = [(type(op), getattr(op, "dim", None)) for op in entry.operations]
            fused = targets[0].endswith("gate_up_proj")
            if not all(names) or ops != ([(MergeModulelist, 0), (Concatenate, 1)] if fused else [(MergeModulelist, 0)]) \
                    or len(names) != (2 if fused else 1):
                return None  # another fusion than the bank's
            projections["gate_up" if fused else "down"] = [m.group(1) for m in names]
    if set(projections) != {"gate_up", "down"}:
        return None
    (gate, up), (down,) = projections["gate_up"], projections["down"]
    return ExpertNaming(gate, up, down, tuple(renames))


def naming_for(model: nn.Module, keys) -> ExpertNaming | None:
    """The naming of ``model``'s experts in a checkpoint holding ``keys``: transformers' for the model's
    ``config.model_type``; otherwise the first of :data:`NAMINGS` whose per-expert names the checkpoint
    holds. None: the model holds no fused experts module."""
    banks = [name for name, module in model.named_modules() if is_expert_bank_module(module)]
    if not banks:
        return None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = naming_from_transformers(model_type) if isinstance(model_type, str) else None
    if known is not None:
        return known
    for naming in NAMINGS.values():
        renamed = {naming.rename(k) for k in keys}
        if any(k.startswith(f"{bank}.0.{naming.gate}.") for bank in banks for k in renamed):
            return naming
    return NAMINGS["qwen2_moe"]


@dataclass(frozen=True)
class LoadedBanks:
    """One experts module planned: the swap, the tensors read, and what the report says."""
    name: str
    module: XlaQuantizedGatedExperts
    used: frozenset
    first: ConvertedLayer  # the gate of expert 0: bits, group, dtypes
    symmetric: bool


def _bank_key(converted: ConvertedLayer) -> tuple:
    return (converted.bits, converted.group, converted.block_n, converted.zero_point is None, converted.weight.dtype,
            converted.scale.dtype, None if converted.zero_point is None else converted.zero_point.dtype)


def as_bank_layout(converted: ConvertedLayer, in_features: int, out_features: int) -> ConvertedLayer:
    """A float8 layer scaled per tensor as its one 2-D block (``block_n = N``, group K, scale ``[1, 1]``):
    the same values in a layout a bank holds (the grouped op has no per-tensor form). Others unchanged."""
    if converted.block_n != PER_TENSOR:
        return converted
    return replace(converted, scale=converted.scale.reshape(1, 1), group=in_features, block_n=out_features)


def _check_bank_form(stored: str, converted: ConvertedLayer) -> None:
    """What a bank cannot hold at all: quantized activations (an expert's bias is not read: it stays among
    the unexpected tensors)."""
    if converted.quantize_activation:
        raise ValueError(f"{stored}: experts with quantized activations (W8A8) are not supported: the grouped op "
                         f"takes 16- or 32-bit activations")


def check_whole_row_blocks(stored: str, converted: ConvertedLayer, inner: int) -> None:
    """Gate's and up's rows are concatenated into ``gate_up_proj``: in 2-D blocks of Bn rows, I must be a
    multiple of Bn, else gate's partial last block and up's first would share one block of the bank."""
    if converted.block_n > 1 and inner % converted.block_n:
        raise ValueError(f"{stored}: 2-D blocks of {converted.block_n} rows do not tile the expert's {inner} "
                         f"intermediate features: gate_up_proj concatenates gate's and up's rows, and needs the "
                         f"intermediate size to be a multiple of the block's rows (weight_block_size[0])")


def _check_one_layout(name: str, bank: str, stored: list[str], converted: list[ConvertedLayer]) -> None:
    """A bank holds one layout: every expert's linears as the first's, else an error naming the first
    that differs (``TypeError`` for a dtype, ``ValueError`` otherwise)."""
    first = converted[0]
    for where, layer in zip(stored, converted):
        if _bank_key(layer) != _bank_key(first):
            fields = ("bits", "group size", "block rows", "zero points (asymmetric)", "weight dtype", "scale dtype",
                      "zero point dtype")
            differ = [f"{f} {a} vs {b}" for f, a, b in zip(fields, _bank_key(layer), _bank_key(first)) if a != b]
            error = TypeError if any("dtype" in d for d in differ) else ValueError
            raise error(f"{where}: {name}.{bank} holds one layout for all experts, but this expert differs from "
                        f"{stored[0]}: {', '.join(differ)}")


def check_one_input_order(gate_where: str, gate: ConvertedLayer, up_where: str, up: ConvertedLayer) -> None:
    """Gate and up of one expert are one expert of ``gate_up_proj``, which reads x in one order: their
    act-orders (``perm``, from ``g_idx``) must be the same, else a ``ValueError`` naming both tensors."""
    if gate.perm is None and up.perm is None:
        return
    if gate.perm is None or up.perm is None or not torch.equal(gate.perm, up.perm):
        if gate.perm is not None and up.perm is not None:
            how = "two different act-orders"
        else:
            how = f"{'k // group_size' if gate.perm is None else 'an act-order'} vs " \
                  f"{'k // group_size' if up.perm is None else 'an act-order'}"
        raise ValueError(f"{gate_where}.g_idx and {up_where}.g_idx differ ({how}): gate and "
                         f"up of one expert are fused into one gate_up_proj expert that reads its input in one order, "
                         f"so act-order (desc_act) experts need the same g_idx for both (GPTQ gives them the same one, "
                         f"as they see the same inputs); this checkpoint's cannot be fused")


def _stack(converted: list[ConvertedLayer], in_features: int) -> XlaQuantizedExperts:
    """One bank from its experts' converted layers, one layout (:func:`_check_one_layout`); act-order
    experts' orders stacked into the bank's ``input_perm`` (the others in their own order, ``arange(K)``)."""
    first = converted[0]
    q = XlaQuantizedExperts(len(converted), in_features, first.weight.shape[0], is_symmetric=first.zero_point is None,
                            block_size=first.group, int4_weight=first.bits == 4, packed=first.bits == 4,
                            weight_dtype=first.weight.dtype, scale_dtype=first.scale.dtype, device="meta",
                            block_n=first.block_n)
    zero_point = None if first.zero_point is None else torch.stack([c.zero_point for c in converted])
    q.load_quantized_weight(torch.stack([c.weight for c in converted]), torch.stack([c.scale for c in converted]),
                            zero_point)
    if any(c.perm is not None for c in converted):
        ordered = torch.arange(in_features, device=first.weight.device)
        q.set_input_permutation(torch.stack([ordered if c.perm is None else c.perm.to(torch.int64) for c in converted]))
    return q


def _fuse(gate: ConvertedLayer, up: ConvertedLayer) -> ConvertedLayer:
    """gate_up_proj's rows of one expert: gate's then up's (transformers' ``Concatenate(dim=1)``)."""
    def cat(a, b):
        return None if a is None else torch.cat([a, b], dim=0)

    return replace(gate, weight=cat(gate.weight, up.weight), scale=cat(gate.scale, up.scale),
                   zero_point=cat(gate.zero_point, up.zero_point))


def plan_expert_banks(model: nn.Module, fmt: CheckpointFormat, naming: ExpertNaming, read, keys: set,
                      stored_name) -> list[LoadedBanks]:
    """Every fused experts module of ``model`` whose experts the checkpoint stores quantized, converted and
    assembled without touching the model. ``read(key)`` reads a tensor by its model-side name,
    ``stored_name(key)`` names it as the file does (for messages)."""
    markers = [s for s in fmt.TENSORS if s != "weight"]
    planned = []
    for name, module in model.named_modules():
        if not is_expert_bank_module(module):
            continue
        prefix = f"{name}."
        stored = sorted(k for k in keys if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit())
        fused_scales = [f"{name}.{bank}{fmt.FUSED_SCALE}" for bank in ("gate_up_proj", "down_proj")
                        if getattr(fmt, "FUSED_SCALE", None) and f"{name}.{bank}{fmt.FUSED_SCALE}" in keys]
        if fused_scales and stored:
            raise ValueError(f"{name}: the checkpoint stores its experts both fused ({stored_name(fused_scales[0])}) "
                             f"and per expert ({stored_name(stored[0])}, ...)")
        if fused_scales:
            planned.append(_plan_fused(name, module, fmt, read, keys, stored_name))
            continue
        if not stored:
            continue  # float banks: loaded as the model's own tensors
        reason = gated_experts_reason(module)
        if reason is not None:
            raise ValueError(f"{name}: the checkpoint stores its experts quantized ({stored_name(stored[0])}, ...), "
                             f"but {reason}")
        experts, two_inner, hidden = module.gate_up_proj.shape
        inner = two_inner // 2
        # the file's spelling of this module (renames touch the names above the experts only)
        stored_prefix = stored_name(stored[0])[: len(stored_name(stored[0])) - len(stored[0]) + len(name)]
        used, layers = set(), []  # (file's name, converted) of gate, up, down, expert by expert
        for e in range(experts):
            shapes = ((hidden, inner), (hidden, inner), (inner, hidden))  # (K, N) of gate, up, down
            for role, linear, (k, n) in zip(("gate", "up", "down"), naming.linears(name, e), shapes):
                suffixes = [s for s in fmt.TENSORS if f"{linear}.{s}" in keys]
                if not any(s in markers for s in suffixes):
                    suffixes = []  # an expert not stored quantized: convert names its first missing tensor
                used.update(f"{linear}.{s}" for s in suffixes)
                where = stored_prefix + linear[len(name):]
                converted = as_bank_layout(fmt.convert(where, {s: read(f"{linear}.{s}") for s in suffixes}, k, n), k, n)
                _check_bank_form(where, converted)
                if role != "down":
                    check_whole_row_blocks(f"{where}.{suffixes[-1]}", converted, inner)
                layers.append((where, converted))
        gate_up = [layer for i, layer in enumerate(layers) if i % 3 != 2]
        down = layers[2::3]
        for bank, members in (("gate_up_proj", gate_up), ("down_proj", down)):
            _check_one_layout(name, bank, [where for where, _ in members], [c for _, c in members])
        for (gate_where, gate), (up_where, up) in zip(gate_up[0::2], gate_up[1::2]):
            check_one_input_order(gate_where, gate, up_where, up)
        fused = [_fuse(gate, up) for (_, gate), (_, up) in zip(gate_up[0::2], gate_up[1::2])]
        banks = XlaQuantizedGatedExperts(_stack(fused, hidden), _stack([c for _, c in down], inner), module.act_fn)
        every = [c for _, c in layers]
        planned.append(LoadedBanks(name, banks, frozenset(used), every[0], all(c.symmetric for c in every)))
    return planned


def _plan_fused(name: str, module: nn.Module, fmt: CheckpointFormat, read, keys: set, stored_name) -> LoadedBanks:
    """One experts module whose checkpoint holds its fused banks (``gate_up_proj``, ``down_proj`` and the
    format's scale beside each, ``fmt.FUSED_SCALE``), each converted by the format's ``convert_fused``."""
    reason = gated_experts_reason(module)
    if reason is not None:
        raise ValueError(f"{name}: the checkpoint stores its experts as quantized fused banks, but {reason}")
    experts, two_inner, hidden = module.gate_up_proj.shape
    inner = two_inner // 2
    used, stacked = set(), []
    for bank, (k, n, halves) in (("gate_up_proj", (hidden, two_inner, 2)), ("down_proj", (inner, hidden, 1))):
        weight, scale = f"{name}.{bank}", f"{name}.{bank}{fmt.FUSED_SCALE}"
        for key in (weight, scale):
            if key not in keys:
                raise ValueError(f"missing tensor {stored_name(key)} (the checkpoint stores {name}'s banks fused: "
                                 f"{bank} and {bank}{fmt.FUSED_SCALE} both)")
        used.update((weight, scale))
        layers = fmt.convert_fused(stored_name(weight), read(weight), read(scale), k, n, halves, experts)
        _check_one_layout(name, bank, [f"{stored_name(weight)}[{e}]" for e in range(experts)], layers)
        stacked.append(layers)
    gate_up, down = stacked
    banks = XlaQuantizedGatedExperts(_stack(gate_up, hidden), _stack(down, inner), module.act_fn)
    return LoadedBanks(name, banks, frozenset(used), gate_up[0], True)


__all__ = ["ExpertNaming", "LoadedBanks", "NAMINGS", "naming_for", "naming_from_transformers", "plan_expert_banks"]
