"""Load quantized Hugging Face checkpoints straight into the op's layouts.

``load_quantized_checkpoint(model, path)`` reads ``config.json``'s ``quantization_config`` and the
``model.safetensors`` file (or the shards listed in ``model.safetensors.index.json``) one tensor at a
time (safetensors' lazy ``safe_open``), replaces every quantized ``nn.Linear`` with an
``XlaQuantizedLinear`` holding only the quantized bytes, and loads every other parameter and buffer as a
strict ``load_state_dict`` would. Everything is checked before the model is touched (config values,
every tensor's presence, dtype and shape, the files; docs/checkpoints.md, "Errors"): on any error the
model is left as it was. Supported so far: GPTQ (:mod:`.gptq`), AWQ gemm (:mod:`.awq`),
compressed-tensors pack-quantized and int-quantized (W8A8) (:mod:`.compressed_tensors`), and float8:
Hugging Face's native fp8 and compressed-tensors float-quantized (:mod:`.float8`). Mixture-of-experts
checkpoints' per-expert linears load into ``XlaQuantizedGatedExperts`` banks (:mod:`.experts`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..sharding import linear_partition_specs, mesh_axis_size, place_sharded, require_spmd, resolve_plan, xla_device
from . import awq, compressed_tensors, float8, gptq
from .experts import naming_for, plan_expert_banks
from .split import load_layer, load_split_layer
from .tensors import check_kind

#: quant_method -> its format class (a CheckpointFormat, xqpass/checkpoints/format.py)
#: (compressed-tensors' float-quantized: CompressedTensors.for_config picks float8.CompressedTensorsFloat)
FORMATS = {f.quant_method: f for f in (gptq.GPTQ, awq.AWQ, compressed_tensors.CompressedTensors,
                                       float8.FineGrainedFP8)}

#: safetensors' dtype names (the header's ``dtype``) -> torch
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2}


@dataclass
class LoadedLayer:
    name: str
    format: str
    bits: int
    group_size: int
    symmetric: bool
    act_order: bool
    split: str | None = None  # "column" / "row" when loaded split over a mesh
    quantize_activation: bool = False  # W8A8: int8 activations (float8 weights: e4m3), dynamic per token
    weight_dtype: torch.dtype | None = None  # float8 weights: their dtype; None: integers
    block_n: int = 1  # float8: output features a scale covers (-1 per tensor, Bn 2-D blocks)
    experts: int = 0  # an expert bank (``<experts module>.gate_up_proj`` / ``.down_proj``): its experts

    def __str__(self) -> str:
        if self.weight_dtype is not None:
            blocks = {-1: "per-tensor", 1: "per-channel" if self.group_size == -1 else f"group {self.group_size}"}
            weights = (f"{str(self.weight_dtype).removeprefix('torch.')} "
                       f"{blocks.get(self.block_n, f'blocks {self.block_n}x{self.group_size}')}")
            activations = " W8A8-FP8 (per-token e4m3 activations)" if self.quantize_activation else ""
        else:
            weights = f"int{self.bits} group {self.group_size} {'sym' if self.symmetric else 'asym'}"
            activations = " W8A8 (per-token int8 activations)" if self.quantize_activation else ""
        return (f"  {self.name}: {f'{self.experts} experts, ' if self.experts else ''}{weights}"
                f"{' act-order' if self.act_order else ''}{activations}"
                f"{f' {self.split}-parallel' if self.split else ''}")


@dataclass
class CheckpointReport:
    quant_method: str
    layers: list[LoadedLayer] = field(default_factory=list)
    other_tensors: int = 0
    #: what the loaded layers compute otherwise than the checkpoint's own runtime (the format's notes)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        banks = sum(1 for layer in self.layers if layer.experts)
        lines = [f"xqpass: {self.quant_method} checkpoint: {len(self.layers) - banks} quantized linears, "
                 f"{f'{banks} expert banks, ' if banks else ''}{self.other_tensors} other tensors"]
        lines += [str(layer) for layer in self.layers]
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


def _read_index(index: str) -> dict:
    """``weight_map`` (tensor name -> shard file) of an index file, checked to be one."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{index}: not a readable JSON index ({e})") from e
    except (KeyError, TypeError) as e:
        raise ValueError(f"{index}: expected an object with a 'weight_map' of tensor name -> shard file") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names, got {weight_map!r:.200}")
    return weight_map


def _diagnose(file: str) -> str:
    """Why a safetensors file does not open, from its header (8-byte little-endian length, then JSON):
    the header cut or not JSON, or the first tensor whose bytes lie past the end of the file."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        start = f.read(8)
        if len(start) < 8:
            return f"{size} bytes, no header"
        length = int.from_bytes(start, "little")
        if 8 + length > size:
            return f"the header declares {length} bytes, the file has {size - 8} after the length"
        try:
            header = json.loads(f.read(length))
            entries = sorted((entry["data_offsets"][1], key) for key, entry in header.items() if key != "__metadata__")
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return "the header is not safetensors JSON"
    for end, key in entries:
        if 8 + length + end > size:
            return f"tensor {key} is cut: its bytes end at {8 + length + end}, the file has {size}"
    return "the header does not match the data"


class _Tensors:
    """Lazy access to the checkpoint's tensors by name, across shards."""

    def __init__(self, path: str):
        from safetensors import safe_open

        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            weight_map = _read_index(index)
        elif os.path.exists(single):
            weight_map = None
        else:
            raise ValueError(f"{path}: expected model.safetensors or model.safetensors.index.json")
        self.files = {}
        self.where = {}
        self.stored = {}  # a model-side name -> the file's, where a rename differs (:meth:`rename`)
        for file in sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]:
            full = os.path.join(path, file)
            try:
                handle = safe_open(full, framework="pt")
            except Exception as e:  # truncated / not a safetensors file
                detail = _diagnose(full) if os.path.isfile(full) else "no such file"
                raise ValueError(f"{full}: not a readable safetensors file ({detail}; {e})") from e
            self.files[file] = handle
            for key in handle.keys():
                self.where[key] = file
        if weight_map:
            missing = sorted(set(weight_map) - set(self.where))
            if missing:
                raise ValueError(f"{index}: lists tensors no shard holds: {missing[:5]}")

    def keys(self):
        return self.where.keys()

    def rename(self, rename) -> None:
        """Address every tensor by ``rename(name in the file)``, the model's name for it (transformers'
        checkpoint renames, e.g. Mixtral's ``.block_sparse_moe.`` -> ``.mlp.``); two tensors renamed to one
        name are an error naming both."""
        renamed = {}
        for key in self.where:
            new = rename(key)
            if new in renamed:
                raise ValueError(f"tensors {renamed[new]} and {key}: both are the model's {new} "
                                 f"(the checkpoint holds it under both names)")
            renamed[new] = key
        self.stored = {new: key for new, key in renamed.items() if new != key}
        self.where = {new: self.where[key] for new, key in renamed.items()}

    def stored_name(self, key: str) -> str:
        """The file's name of the tensor the model calls ``key``."""
        return self.stored.get(key, key)

    def get_shape(self, key: str) -> list[int]:
        return self.files[self.where[key]].get_slice(self.stored_name(key)).get_shape()

    def get_dtype(self, key: str) -> torch.dtype:
        stored = self.files[self.where[key]].get_slice(self.stored_name(key)).get_dtype()
        if stored not in SAFETENSORS_DTYPES:
            raise TypeError(f"{self.stored_name(key)}: stored as {stored}, expected one of {', '.join(SAFETENSORS_DTYPES)}")
        return SAFETENSORS_DTYPES[stored]

    def get(self, key: str, index: tuple | None = None) -> torch.Tensor:
        """The tensor ``key``, or only its slice ``index`` (a tuple of slices; read without the rest)."""
        stored = self.stored_name(key)
        try:
            handle = self.files[self.where[key]]
            if index is None or index == ():  # () : a 0-d tensor, which a slice does not read
                return handle.get_tensor(stored)
            return handle.get_slice(stored)[index]
        except Exception as e:
            raise ValueError(f"tensor {stored}: could not be read ({e})") from e


def load_quantized_checkpoint(model: nn.Module, path: str, *, mesh=None, plan=None, axis: str = "model") -> CheckpointReport:
    """Load a quantized checkpoint directory into ``model`` (see the module docstring).

    With ``mesh`` and ``plan`` (torch_xla SPMD; see :func:`xqpass.shard_model` for the plan), the linears
    the plan names are split over ``mesh``'s ``axis`` as they load: each local device's slice is read
    and converted on its own (:mod:`.split`), so a host reads only the slices its own devices hold,
    never a whole stored tensor (except where a slice would cut a packed word, and GPTQ act-order split
    by rows, whose groups span all of K). Everything else is placed on the XLA device, replicated."""
    if (mesh is None) != (plan is None):
        raise ValueError("load_quantized_checkpoint: mesh and plan go together (both or neither)")
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path}: expected a JSON config with quantization_config ({e})") from e
    qconfig = config.get("quantization_config")
    if not isinstance(qconfig, dict) or "quant_method" not in qconfig:
        raise ValueError(f"{config_path}: no quantization_config.quant_method")
    method = qconfig["quant_method"]
    if method not in FORMATS:
        raise ValueError(f"{config_path}: quant_method {method!r} is not supported (supported: {sorted(FORMATS)})")
    fmt = FORMATS[method].for_config(qconfig)  # checks the config values the format reads
    tensors = _Tensors(path)
    naming = naming_for(model, tensors.keys())  # None: no fused experts module in the model
    if naming is not None:
        tensors.rename(naming.rename)
    keys = set(tensors.keys())
    styles, axis_size = {}, 0
    if mesh is not None:
        require_spmd()  # before any layer is read or converted
        axis_size = mesh_axis_size(mesh, axis)
        styles = resolve_plan(dict(model.named_modules()), plan)

    # 1. plan everything without touching the model
    replacements, report = {}, CheckpointReport(method, notes=list(fmt.notes))
    used = set()
    for banks in plan_expert_banks(model, fmt, naming, tensors.get, keys, tensors.stored_name) if naming else ():
        if banks.name in styles:
            raise ValueError(f"{banks.name}: expert banks load whole; split them after loading "
                             f"(xqpass.shard_model's \"expert\" style)")
        replacements[banks.name] = banks.module.to(xla_device()) if mesh is not None else banks.module
        used |= banks.used
        for bank in (banks.module.gate_up_proj, banks.module.down_proj):
            float8 = bank.weight.is_floating_point()  # float8: -1 per channel, said as such
            report.layers.append(LoadedLayer(
                f"{banks.name}.{'gate_up_proj' if bank is banks.module.gate_up_proj else 'down_proj'}", method,
                banks.first.bits, bank.in_features if bank.block_size == -1 and not float8 else bank.block_size,
                banks.symmetric, False, weight_dtype=bank.weight.dtype if float8 else None, block_n=bank.block_n,
                experts=bank.num_experts))
    # a linear is quantized when any tensor only its format has is there ("weight" and "bias" a float
    # linear has too), so a quantized layer missing one of its tensors is named as such
    markers = [s for s in fmt.TENSORS if s != "weight"]
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not any(f"{name}.{s}" in keys for s in markers):
            continue
        if fmt.skips(name):
            raise ValueError(f"{name}: the checkpoint stores it quantized ({', '.join(f'{name}.{s}' for s in markers if f'{name}.{s}' in keys)}), "
                             f"but its quantization_config keeps it in float (modules_to_not_convert)")
        suffixes = [s for s in (*fmt.TENSORS, "bias") if f"{name}.{s}" in keys]
        used.update(f"{name}.{s}" for s in suffixes)
        if ("bias" in suffixes) != (module.bias is not None):
            raise ValueError(f"{'missing' if module.bias is not None else 'unexpected'} tensor {name}.bias: the "
                             f"model's linear {name} {'has' if module.bias is not None else 'has no'} bias")
        if name in styles:
            q, converted = load_split_layer(name, module, fmt, tensors.get, suffixes, styles[name], mesh, axis,
                                            axis_size)
        else:
            converted = fmt.convert(name, {s: tensors.get(f"{name}.{s}") for s in suffixes},
                                    module.in_features, module.out_features)
            q = load_layer(converted, module)
            if mesh is not None:  # replicated on every device
                q = q.to(xla_device())
        replacements[name] = q
        float8 = converted.weight.is_floating_point()  # float8: -1 per channel or per tensor, said as such
        report.layers.append(LoadedLayer(name, method, converted.bits,
                                         module.in_features if converted.group == -1 and not float8 else converted.group,
                                         converted.symmetric, converted.perm is not None, styles.get(name),
                                         converted.quantize_activation,
                                         converted.weight.dtype if float8 else None,
                                         converted.block_n))
    expected = {k: v for k, v in model.state_dict().items()
                if not any(k.startswith(f"{name}.") for name in replacements)}
    rest = keys - used
    missing, unexpected = sorted(set(expected) - rest), sorted(rest - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: missing tensors {missing[:5]}, unexpected tensors "
                         f"{[tensors.stored_name(k) for k in unexpected[:5]]}")
    split_plain = {f"{name}.{attr}": (name, attr, spec) for name, style in styles.items() if name not in replacements
                   for attr, spec in linear_partition_specs(name, model.get_submodule(name), style, axis, axis_size).items()}
    state, placed = {}, {}
    for key in expected:
        shape = tuple(expected[key].shape)
        if key in split_plain:  # a float linear the plan splits: read shard by shard
            check_kind(key, expected[key].dtype, tensors.get_dtype(key))
            if tuple(tensors.get_shape(key)) != shape:
                raise ValueError(f"{key}: expected shape {shape}, got {tuple(tensors.get_shape(key))}")
            placed[key] = place_sharded(shape, expected[key].dtype, mesh, split_plain[key][2],
                                        lambda index, key=key: tensors.get(key, index))
            continue
        t = tensors.get(key)
        check_kind(key, expected[key].dtype, t.dtype)
        if tuple(t.shape) != shape:
            raise ValueError(f"{key}: expected shape {shape}, got {tuple(t.shape)}")
        state[key] = t

    # 2. apply
    for name, q in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    for key, tensor in placed.items():
        name, attr, _ = split_plain[key]
        module = model.get_submodule(name)
        setattr(module, attr, nn.Parameter(tensor, requires_grad=getattr(module, attr).requires_grad))
    model.load_state_dict(state, strict=False)
    if mesh is not None:
        model.to(xla_device())  # what is still on the host: replicated
    report.other_tensors = len(state) + len(placed)
    return report


__all__ = ["CheckpointReport", "LoadedLayer", "load_quantized_checkpoint"]
