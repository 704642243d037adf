"""Tensor-parallel sharding of quantized (and plain) linears with GSPMD (torch_xla SPMD).

``shard_model(model, mesh, plan, axis="model")`` splits every linear that ``plan`` names, Megatron
style: ``"column"`` splits the output features N, ``"row"`` the input features K. An
:class:`~xqpass.nn.XlaQuantizedLinear` has its quantized weight, scale and zero point split consistently
for its layout (:func:`tensor_parallel_dims`), so each device holds 1/n of the
bytes and the op runs on its shard: the compiled HLO moves activations (one all-reduce per
row-parallel layer), never an integer weight.

``plan`` maps module-name globs (``fnmatch``: ``*`` also crosses dots) to a style, first match wins,
e.g. the Llama plan::

    {"*.attn.q_proj": "column", "*.attn.k_proj": "column", "*.attn.v_proj": "column",
     "*.attn.o_proj": "row", "*.mlp.gate_proj": "column", "*.mlp.up_proj": "column",
     "*.mlp.down_proj": "row"}

**Expert parallelism**: ``"expert"`` splits a quantized expert bank's experts (``E``, the leading dim of
its weight, scales, zero points and bias) over the axis, each device holding ``E / n`` whole experts, for
an :class:`~xqpass.experts.XlaQuantizedExperts` or both banks of an
:class:`~xqpass.experts.XlaQuantizedGatedExperts` (``{"*.mlp.experts": "expert"}``): every device
multiplies the rows by its own experts and GSPMD combines the activations; no weight moves.

**Tensor parallelism inside each expert**: ``"intermediate"`` splits an
:class:`~xqpass.experts.XlaQuantizedGatedExperts`' intermediate features I over the axis, each device
holding ``I / n`` of every expert's: ``gate_up_proj`` column-parallel (its rows), ``down_proj``
row-parallel (its input features), the Megatron MLP pair inside each expert, one all-reduce a layer
(``{"*.mlp.experts": "intermediate"}``). It fits where E is small or does not divide the devices. The
gate and up rows are interleaved once, as the bank is placed (:func:`interleave_gate_up`), so that each
device holds the gate and up rows of the same intermediate features, and the module becomes an
:class:`IntermediateParallelExperts`, whose forward reads that order.

The mesh is a ``torch_xla.distributed.spmd.Mesh`` with ``axis`` among its axis names; other mesh axes
(data parallelism) see the weights replicated. torch_xla's SPMD mode (``xr.use_spmd()``) must be on.
A spec that leaves a tensor whole on every device (a mesh of one device, or ``axis`` of size 1) places
one host copy, replicated: the same script runs on one device and on a pod.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from .experts import XlaQuantizedExperts, XlaQuantizedGatedExperts
from .nn import XlaQuantizedLinear
from .quant.layouts import PER_CHANNEL, Layout

#: an XlaQuantizedLinear's tensors: module attribute -> the op's name for it (the keys of
#: :func:`tensor_parallel_dims` and of the checkpoint converters' output)
QUANTIZED_LINEAR_TENSORS = {"weight": "weight", "weight_scaler": "scale", "zero_point": "zero_point", "bias": "bias"}

#: Megatron tensor parallelism: "column" splits the output features N, "row" the input features K
SPLIT_STYLES = ("column", "row")
#: every style a plan takes: the Megatron splits of linears, "expert" (a bank's experts over the axis) and
#: "intermediate" (a gated experts module's intermediate features I: gate_up's rows and down's inputs).
#: Each names the dimension it cuts: "column" and "row" a linear's, "expert" and "intermediate" an MoE's.
PLAN_STYLES = (*SPLIT_STYLES, "expert", "intermediate")
#: the styles that take an expert module, not a linear
EXPERT_STYLES = ("expert", "intermediate")
#: a quantized expert bank's tensors and the dim "expert" cuts (the leading E of each)
EXPERT_BANK_TENSORS = ("weight", "weight_scaler", "zero_point", "bias")


def tensor_parallel_dims(style: str, layout: Layout) -> dict[str, int | None]:
    """Which dim of each of the op's tensors (``weight``, ``scale``, ``zero_point``, ``bias``) a
    tensor-parallel split cuts (None: replicated): ``"column"`` cuts N wherever the layout puts it,
    ``"row"`` K (the weight's K or groups dim, the scales' groups dim; a per-channel scale and the bias
    stay whole; a per-tensor scale stays whole either way). A row cut may not split a group or a packed
    byte (``layout.k_unit``), a column cut a 2-D block of rows (``layout.n_unit``)."""
    if style not in SPLIT_STYLES:
        raise ValueError(f"tensor-parallel style must be one of {SPLIT_STYLES}, got {style!r}")
    cut = ("N",) if style == "column" else ("K", "G")
    weight, scale = (next((i for i, axis in enumerate(axes) if axis in cut), None)
                     for axes in (layout.weight_axes, layout.scale_axes))
    return {"weight": weight, "scale": scale, "zero_point": scale, "bias": 0 if style == "column" else None}


@dataclass
class ShardedLayer:
    name: str
    style: str
    #: attribute -> partition spec (a mesh axis name or None per dim); attributes absent are replicated
    specs: dict[str, tuple]


@dataclass
class ShardingReport:
    axis: str
    axis_size: int
    layers: list[ShardedLayer] = field(default_factory=list)

    def __str__(self) -> str:
        devices = f"{self.axis_size} device{'s' if self.axis_size != 1 else ''}"
        banks = sum(layer.style in EXPERT_STYLES for layer in self.layers)
        what = f"{len(self.layers) - banks} linears" + (f" and {banks} expert modules" if banks else "")
        lines = [f"xqpass: {what} split over mesh axis {self.axis!r} ({devices})"]
        lines += [f"  {layer.name}: {layer.style}" for layer in self.layers]
        return "\n".join(lines)


def _takes_style(module: nn.Module, style: str) -> bool:
    """Whether a plan entry of ``style`` applies to ``module``: a linear for "column" / "row", a quantized
    expert bank (or a gated pair of banks) for "expert", a gated pair for "intermediate" (its gate and up
    rows and down's inputs are cut together)."""
    if style == "expert":
        return isinstance(module, (XlaQuantizedExperts, XlaQuantizedGatedExperts))
    if style == "intermediate":
        return isinstance(module, XlaQuantizedGatedExperts)
    return isinstance(module, (nn.Linear, XlaQuantizedLinear))


def resolve_plan(modules: Mapping[str, nn.Module], plan: Mapping[str, str]) -> dict[str, str]:
    """``{module name: style}`` for the linears (``nn.Linear`` / ``XlaQuantizedLinear``; "column" / "row")
    and quantized expert modules ("expert", "intermediate") of ``modules`` that ``plan``'s globs match (first matching glob
    wins; the banks of a gated experts module planned whole are not planned again). A glob that matches
    nothing it can split, or a style not in :data:`PLAN_STYLES`, is a ``ValueError`` (a typo
    would otherwise leave layers replicated)."""
    if not isinstance(plan, Mapping):
        raise TypeError(f"plan must be a mapping of module-name globs to 'column' / 'row', got {type(plan).__name__}")
    for glob, style in plan.items():
        if style not in PLAN_STYLES:
            raise ValueError(f"plan[{glob!r}]: expected one of {PLAN_STYLES}, got {style!r}")
    styles, used, whole = {}, set(), []
    for name, module in modules.items():
        if not isinstance(module, (nn.Linear, XlaQuantizedLinear, XlaQuantizedExperts, XlaQuantizedGatedExperts)):
            continue
        if any(name.startswith(parent + ".") for parent in whole):
            continue  # a bank of a gated experts module already planned
        for glob, style in plan.items():
            if _takes_style(module, style) and fnmatch.fnmatchcase(name, glob):
                if isinstance(module, XlaQuantizedGatedExperts):
                    whole.append(name)
                styles[name] = style
                used.add(glob)
                break
    unused = [glob for glob in plan if glob not in used]
    if unused:
        experts = (" (an 'expert' entry takes a quantized expert module, an 'intermediate' entry an "
                   "XlaQuantizedGatedExperts: quantize_model or load_quantized_checkpoint first, then shard_model)"
                   ) if any(
            plan[glob] in EXPERT_STYLES for glob in unused) else ""
        raise ValueError(f"plan entries matched no linear layer: {unused}{experts}")
    return styles


def expert_partition_specs(name: str, module: nn.Module, axis: str, axis_size: int) -> dict[str, tuple]:
    """Partition specs of an expert bank's tensors split by experts (the leading E) over ``axis_size``
    devices, keyed by attribute (a gated module's by ``"gate_up_proj.weight"`` etc.); E must divide evenly."""
    banks = ({"gate_up_proj.": module.gate_up_proj, "down_proj.": module.down_proj}
             if isinstance(module, XlaQuantizedGatedExperts) else {"": module})
    experts = next(iter(banks.values())).num_experts
    if experts % axis_size:
        raise ValueError(f"{name}: expert-parallel over {axis_size} devices needs the experts divisible by "
                         f"{axis_size}, got {experts}")
    specs = {}
    for prefix, bank in banks.items():
        for attr in EXPERT_BANK_TENSORS:
            tensor = getattr(bank, attr, None)
            if tensor is not None:
                specs[prefix + attr] = (axis,) + (None,) * (tensor.dim() - 1)
    return specs


def interleave_gate_up(t: torch.Tensor, shards: int) -> torch.Tensor:
    """``t [E, 2I, ...]`` (a gate_up bank's weight, scales, zero points or bias: gate rows, then up rows)
    with its rows reordered so that each of ``shards`` equal slices of dim 1 holds the gate rows, then the
    up rows, of the same ``I / shards`` intermediate features: ``[gate_0; up_0; gate_1; up_1; ...]``.
    A plain split of dim 1 would give some devices only gate rows and others only up rows, and
    ``act(gate) * up`` would move them between devices. A permutation: nothing is lost."""
    experts, rows, *rest = t.shape
    return t.reshape(experts, 2, shards, rows // (2 * shards), *rest).transpose(1, 2).reshape(experts, rows, *rest)


class IntermediateParallelExperts(XlaQuantizedGatedExperts):
    """An :class:`~xqpass.experts.XlaQuantizedGatedExperts` whose ``gate_up_proj`` rows are interleaved
    for ``shards`` devices (:func:`interleave_gate_up`); :func:`shard_model`'s "intermediate" style makes
    one in place (its class swapped, as ``torch.nn.utils.parametrize`` does), after placing
    ``gate_up_proj`` split by rows and ``down_proj`` by input features. The same value as the module it
    was (up to one rounding, below), on any device and on one.

    Both banks run through ``xq::quantized_matmul``, each as one weight whose split axis comes first
    (a transpose, then a merge of the split axis with the unsplit ones after it, which GSPMD keeps split;
    the grouped op merges ``[experts, N]`` into one axis, which GSPMD cannot keep split along N). The
    views are annotated split (:meth:`split_view`): a view carries no annotation of its own, and the op's
    XLA:CPU split-K form on an unannotated split ``down_proj`` moves int8 pieces between devices. Every
    row meets every expert's slice, as in the expert-parallel form:

    * gate/up: ``[shards * E * 2I/shards, H]`` (the split rows already lead each expert: no copy); each
      row's experts picked by a one-hot contraction over E (exact: one term is not zero), which keeps the
      device axis whole, so gate and up meet on the device holding them;
    * down: ``act(gate) * up``, weighted by the router and spread over the experts ``[T, shards, E,
      I/shards]``, against the bank as ``[H, shards * E * I/shards]`` (a transpose of E and H on each
      device; per-channel scales become groups of ``I/shards``): one product a row, not one an expert,
      and GSPMD adds the partial sums in one all-reduce of ``[T, H]``.

    The router's weights multiply before ``down_proj`` (transformers: after it, each expert's output
    rounded to the activations' dtype first): the same value up to that rounding."""

    #: the devices gate_up's rows are interleaved for
    shards: int = 1
    #: ``str`` of the torch_xla Mesh and the axis split over, for annotating the banks' views (None: no mesh)
    mesh_text: str | None = None
    axis: str | None = None

    def split_view(self, t: torch.Tensor | None, dim: int) -> torch.Tensor | None:
        """``t`` (a view of a split bank) annotated split over the axis along ``dim``: the op reads the
        annotation to keep the forms it uses for split weights (``xla::aot_mark_sharding``, which torch.compile
        traces)."""
        if t is None or self.mesh_text is None or t.device.type != "xla":
            return t
        spec = [None] * t.dim()
        spec[dim] = self.axis
        return torch.ops.xla.aot_mark_sharding(t, self.mesh_text, str(tuple(spec)))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        rows, top_k = top_k_index.shape
        shards, experts, hidden = self.shards, self.num_experts, self.hidden_dim
        width = self.intermediate_dim // shards  # intermediate features a device holds, of each expert
        gate_up, down = self.gate_up_proj, self.down_proj

        def by_rows(t):  # [E, 2I, ...] -> [shards * E * 2 width, ...], device-major
            if t is None:
                return None
            return self.split_view(
                t.reshape(experts, shards, 2 * width, *t.shape[2:]).transpose(0, 1).reshape(-1, *t.shape[2:]), 0)

        y = torch.ops.xq.quantized_matmul.default(
            hidden_states, by_rows(gate_up.weight), by_rows(gate_up.weight_scaler), by_rows(gate_up.zero_point),
            gate_up.block_size, gate_up.int4_weight, False, by_rows(gate_up.bias), packed=gate_up.packed)
        y = y.reshape(rows, shards, experts, 2 * width)
        chosen = top_k_index[..., None] == torch.arange(experts, device=top_k_index.device)  # [T, k, E]
        picked = torch.einsum("tke,tsew->tskw", chosen.to(y.dtype), y).reshape(rows, shards, top_k, 2, width)
        inner = self.act_fn(picked[..., 0, :]) * picked[..., 1, :]  # [T, shards, k, width]

        weights = top_k_weights.to(torch.promote_types(top_k_weights.dtype, torch.float32))
        routed = chosen.to(weights.dtype) * weights[..., None]  # [T, k, E]: each row's share of each expert
        spread = torch.einsum("tke,tskw->tsew", routed, inner.to(weights.dtype)).reshape(rows, -1)

        def by_inputs(t):  # [E, H, K'] -> [H, shards * E * K'/shards], device-major along K
            return self.split_view(t.reshape(experts, hidden, shards, -1).permute(1, 2, 0, 3).reshape(hidden, -1), 1)

        if down.block_size == PER_CHANNEL:  # a scale an (expert, output): groups of `width` along K
            def grouped(t):
                return None if t is None else t.t()[:, None, :].expand(hidden, shards, experts).reshape(hidden, -1)
            scale, zero_point, block_size = grouped(down.weight_scaler), grouped(down.zero_point), width
        else:
            scale, zero_point, block_size = by_inputs(down.weight_scaler), None, down.block_size
            zero_point = None if down.zero_point is None else by_inputs(down.zero_point)
        out = torch.ops.xq.quantized_matmul.default(spread, by_inputs(down.weight), scale, zero_point, block_size,
                                                    down.int4_weight, False, None, packed=down.packed)
        if down.bias is not None:
            out = out + routed.sum(dim=1) @ down.bias.to(out.dtype)
        return out.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gate_up interleaved for {self.shards} devices"


def intermediate_partition_specs(name: str, module: nn.Module, axis: str, axis_size: int) -> dict[str, tuple]:
    """Partition specs of a gated experts module split by intermediate features over ``axis_size`` devices,
    keyed as :func:`expert_partition_specs`' (``"gate_up_proj.weight"``, ...): ``gate_up_proj`` by rows
    (column: dim 1 of its weight, scales, zero points, bias), ``down_proj`` by input features (row: the
    weight's K and the groups of its scales; per-channel scales and the bias whole). Checked: I must
    divide evenly, and a device's I / n may cut no group and no packed byte of ``down_proj``."""
    if not isinstance(module, XlaQuantizedGatedExperts):
        raise TypeError(f"{name}: intermediate-parallel takes an XlaQuantizedGatedExperts, got {type(module).__name__}")
    inner, down = module.intermediate_dim, module.down_proj
    for bank_name in ("gate_up_proj", "down_proj"):  # what the split forward (xq::quantized_matmul) cannot read
        bank = getattr(module, bank_name)
        if bank.input_perm is not None:
            raise ValueError(f"{name}.{bank_name}: intermediate-parallel does not take act-order banks (input_perm: "
                             f"each expert reads x in its own order); use 'expert', or load without desc_act")
        if bank.block_n != 1:
            raise ValueError(f"{name}.{bank_name}: intermediate-parallel does not take float8 2-D blocks "
                             f"(block_n={bank.block_n}: a device's rows may cut a block); use 'expert'")
    if inner % axis_size:
        raise ValueError(f"{name}: intermediate-parallel over {axis_size} devices needs the intermediate size I "
                         f"(down_proj's input features, half of gate_up_proj's outputs) divisible by {axis_size}, "
                         f"got {inner}")
    unit = down.layout.k_unit
    if (inner // axis_size) % unit:
        piece = "a packed int4 byte" if down.block_size == PER_CHANNEL else f"a block of {unit}"
        raise ValueError(f"{name}.down_proj: intermediate-parallel over {axis_size} devices would split {piece}: "
                         f"{inner // axis_size} input features a device (I = {inner}) is not a multiple of {unit}")
    specs = {}
    for bank_name, style in (("gate_up_proj", "column"), ("down_proj", "row")):
        bank = getattr(module, bank_name)
        dims = tensor_parallel_dims(style, bank.layout)
        for attr, key in QUANTIZED_LINEAR_TENSORS.items():  # a bank's tensors carry a linear's names
            tensor = getattr(bank, attr, None)
            if tensor is None or dims[key] is None:
                continue
            spec = [None] * tensor.dim()
            spec[dims[key] + 1] = axis  # the experts lead: a linear's dim d is the bank's d + 1
            specs[f"{bank_name}.{attr}"] = tuple(spec)
    return specs


def planned_specs(name: str, module: nn.Module, style: str, axis: str, axis_size: int) -> dict[str, tuple]:
    """The checked partition specs of one planned module, for its style. An expert module split before
    is refused: its forward already reads its first split (the interleaved rows, the experts apart)."""
    if isinstance(module, IntermediateParallelExperts):
        raise ValueError(f"{name}: already split intermediate-parallel (gate_up interleaved for {module.shards} "
                         f"devices); shard the unsplit model instead")
    if style in EXPERT_STYLES and any(getattr(bank, "expert_parallel", False) for bank in module.modules()):
        raise ValueError(f"{name}: already split expert-parallel; shard the unsplit model instead")
    if style == "expert":
        return expert_partition_specs(name, module, axis, axis_size)
    if style == "intermediate":
        return intermediate_partition_specs(name, module, axis, axis_size)
    return linear_partition_specs(name, module, style, axis, axis_size)


def linear_partition_specs(name: str, module: nn.Module, style: str, axis: str, axis_size: int, *,
                           layout: Layout | None = None) -> dict[str, tuple]:
    """Partition specs of one linear's tensors for a split over ``axis_size`` devices, checked: the split
    dimension must divide evenly, a row split may not cut a group or a packed byte, and a column split
    may not cut a 2-D block of rows (float8, ``Layout.n_unit``). ``layout``: the layout the split is
    checked against, where it is not the module's own (a float linear a checkpoint loads quantized)."""
    if not isinstance(module, (nn.Linear, XlaQuantizedLinear)):
        raise TypeError(f"{name}: expected an nn.Linear or XlaQuantizedLinear, got {type(module).__name__}")
    quantized = isinstance(module, XlaQuantizedLinear)
    if layout is None:
        layout = module.layout if quantized else Layout()  # an nn.Linear's weight [N, K] sits as per-channel's
    dims, unit = tensor_parallel_dims(style, layout), layout.k_unit if style == "row" else layout.n_unit
    attrs = QUANTIZED_LINEAR_TENSORS if quantized else {"weight": "weight", "bias": "bias"}
    features = module.out_features if style == "column" else module.in_features
    what = "output features" if style == "column" else "input features"
    if features % axis_size:
        raise ValueError(f"{name}: {style}-parallel over {axis_size} devices needs {what} divisible by "
                         f"{axis_size}, got {features}")
    if (features // axis_size) % unit and style == "column":
        raise ValueError(f"{name}: column-parallel over {axis_size} devices would split a 2-D block of {unit} output "
                         f"features ({layout.block_n}x{layout.block_size} float8 blocks, one scale each): "
                         f"{features // axis_size} output features a device is not a multiple of {unit}")
    if (features // axis_size) % unit:
        piece = "a packed int4 byte" if layout.block_size == PER_CHANNEL else f"a block of {unit}"
        raise ValueError(f"{name}: row-parallel over {axis_size} devices would split {piece}: "
                         f"{features // axis_size} input features a device is not a multiple of {unit}")
    specs = {}
    for attr, key in attrs.items():
        tensor = getattr(module, attr, None)
        if tensor is None or dims[key] is None:
            continue
        spec = [None] * tensor.dim()
        spec[dims[key]] = axis
        specs[attr] = tuple(spec)
    return specs


def mesh_axis_size(mesh, axis: str) -> int:
    """Size of ``axis`` of a torch_xla ``Mesh`` (``TypeError``/``ValueError`` for anything else)."""
    names, shape = getattr(mesh, "axis_names", None), getattr(mesh, "mesh_shape", None)
    if names is None or shape is None:
        raise TypeError(f"mesh must be a torch_xla.distributed.spmd.Mesh with axis names, got {type(mesh).__name__}")
    if axis not in names:
        raise ValueError(f"mesh has axes {tuple(names)}, not {axis!r}")
    return int(shape[list(names).index(axis)])


def require_spmd() -> None:
    """``ValueError`` unless torch_xla's SPMD mode is on: without it ``mark_sharding`` and the shard
    loaders fail inside torch_xla with a failed C++ check."""
    import torch_xla.runtime as xr

    if not xr.is_spmd():
        raise ValueError("sharding over a mesh needs torch_xla's SPMD mode, which is off: call "
                         "torch_xla.runtime.use_spmd() first, before any tensor is on the XLA device")


def xla_device() -> torch.device:
    """The XLA device SPMD places tensors on (torch_xla is imported here, not by the callers)."""
    import torch_xla

    return torch_xla.device()


def local_shard_indices(shape, dtype: torch.dtype, mesh, spec: tuple) -> tuple[torch.Tensor, list[tuple]]:
    """An uninitialized tensor on the XLA devices split by ``spec``, and the index (a tuple of slices into
    the full tensor) each local device holds, in the order :func:`load_local_shards` takes them."""
    import torch_xla
    import torch_xla.distributed.spmd as xs

    require_spmd()
    placed = torch.empty(tuple(shape), dtype=dtype, device=torch_xla.device())
    xs.mark_sharding(placed, mesh, spec)
    whole = tuple(slice(None) for _ in placed.shape)  # torch_xla gives [Ellipsis] for a replicated tensor
    return placed, [whole if index is Ellipsis or Ellipsis in index else tuple(index)
                    for _, index in torch_xla._XLAC._get_local_shard_replica_and_indices([placed])[0]]


def load_local_shards(placed: torch.Tensor, indices: list[tuple], shards: list[torch.Tensor]) -> torch.Tensor:
    """Fill ``placed`` (from :func:`local_shard_indices`) with one host tensor per local device and
    return it; a replicated ``placed`` (every device holds it whole) is returned as a new tensor
    with the same sharding, made from the first shard."""
    import torch_xla
    import torch_xla.distributed.spmd as xs

    for index, shard in zip(indices, shards):
        expected = tuple(len(range(*s.indices(n))) for s, n in zip(index, placed.shape))
        if tuple(shard.shape) != expected:
            raise ValueError(f"shard {index}: expected shape {expected}, got {tuple(shard.shape)}")
    if torch_xla._XLAC._get_xla_sharding_type(placed) == xs.ShardingType.REPLICATED:
        return _load_replicated(placed, shards[0])
    shards = [shard.to(placed.dtype).contiguous() for shard in shards]
    torch_xla._XLAC._load_local_shards(placed, shards, torch_xla._XLAC._xla_get_runtime_devices()[: len(shards)])
    return placed


def _load_replicated(placed: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``whole`` on the XLA devices with ``placed``'s (replicated) sharding. torch_xla's
    ``_load_local_shards`` refuses a replicated tensor; a plain transfer replicates in SPMD mode."""
    import torch_xla

    loaded = whole.to(placed.dtype).to(placed.device)
    torch_xla._XLAC._xla_mark_sharding(loaded, torch_xla._XLAC._get_xla_op_sharding(placed))
    return loaded


def place_sharded(shape, dtype: torch.dtype, mesh, spec: tuple, read: Callable[[tuple], torch.Tensor]) -> torch.Tensor:
    """A tensor on the XLA devices, split by ``spec``, built from its local shards only:
    ``read(index)`` returns the host tensor for ``index`` (a tuple of slices into the full tensor), so
    the full tensor never exists on a single device, and a host reads only its own devices' slices,
    each once (local devices that hold the same slice, along a mesh axis the spec leaves out, share it)."""
    placed, indices = local_shard_indices(shape, dtype, mesh, spec)
    reads, shards = {}, []
    for index in indices:
        key = tuple((s.start, s.stop, s.step) for s in index)  # slices are not hashable before Python 3.12
        if key not in reads:
            reads[key] = read(index)
        shards.append(reads[key])
    return load_local_shards(placed, indices, shards)


def local_ranges(length: int, mesh, axis: str) -> list[tuple[int, int]]:
    """``[start, stop)`` of a dimension of ``length`` split over ``axis``, for each local device (in the
    order :func:`load_local_shards` takes them)."""
    _, indices = local_shard_indices((length,), torch.int8, mesh, (axis,))
    return [index[0].indices(length)[:2] for index in indices]


def _shard_tensor(tensor: torch.Tensor, mesh, spec: tuple) -> torch.Tensor:
    """``tensor`` split by ``spec``: annotated in place if already on an XLA device, else placed from
    host slices."""
    import torch_xla.distributed.spmd as xs

    if tensor.device.type == "xla":
        xs.mark_sharding(tensor, mesh, spec)
        return tensor
    return place_sharded(tensor.shape, tensor.dtype, mesh, spec, lambda index: tensor[index])


def shard_model(model: nn.Module, mesh, plan: Mapping[str, str], axis: str = "model") -> ShardingReport:
    """Split the linears ``plan`` names over ``mesh``'s ``axis`` (see the module docstring).

    Every planned layer is checked before any is touched. Tensors already on the XLA device are
    annotated in place; host tensors are placed shard by shard. Everything else in ``model`` is
    left where it is (call ``model.to(torch_xla.device())`` for the rest: unannotated tensors are
    replicated). Returns a :class:`ShardingReport`.
    """
    size = mesh_axis_size(mesh, axis)
    require_spmd()
    modules = dict(model.named_modules())
    styles = resolve_plan(modules, plan)
    planned = [(name, style, planned_specs(name, modules[name], style, axis, size)) for name, style in styles.items()]
    report = ShardingReport(axis, size)
    for name, style, specs in planned:
        for path, spec in specs.items():
            owner, _, attr = path.rpartition(".")
            module = modules[f"{name}.{owner}" if owner else name]
            tensor = getattr(module, attr)
            value = tensor.data if isinstance(tensor, nn.Parameter) else tensor
            if style == "intermediate" and owner == "gate_up_proj":
                value = interleave_gate_up(value, size)  # a new tensor: placed, then set below
                if value.device.type == "xla":  # permuted whole on each device, then split without moving
                    import torch_xla

                    torch_xla._XLAC._xla_sync_multi([value], devices=[], wait=True)
            placed = _shard_tensor(value, mesh, spec)
            if isinstance(tensor, nn.Parameter):
                if placed is not tensor.data:
                    setattr(module, attr, nn.Parameter(placed, requires_grad=tensor.requires_grad))
            else:
                setattr(module, attr, placed)
        if style == "expert":
            for bank in modules[name].modules():
                if isinstance(bank, XlaQuantizedExperts):
                    bank.expert_parallel = True  # its forward multiplies every expert: no bytes gathered
        if style == "intermediate":
            gated = modules[name]
            gated.__class__ = IntermediateParallelExperts  # its forward reads the interleaved gate_up rows
            gated.shards, gated.mesh_text, gated.axis = size, str(mesh), axis
        report.layers.append(ShardedLayer(name, style, specs))
    return report


__all__ = ["EXPERT_STYLES", "IntermediateParallelExperts", "PLAN_STYLES", "SPLIT_STYLES", "expert_partition_specs",
           "interleave_gate_up", "intermediate_partition_specs", "planned_specs", "ShardedLayer", "ShardingReport", "linear_partition_specs", "load_local_shards", "local_ranges",
           "local_shard_indices", "place_sharded", "require_spmd", "resolve_plan", "shard_model",
           "tensor_parallel_dims", "xla_device"]
