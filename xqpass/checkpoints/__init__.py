"""Load quantized Hugging Face checkpoints straight into the op's layouts.

``load_quantized_checkpoint(model, path)`` reads ``config.json``'s ``quantization_config`` and the
``model.safetensors`` file (or the shards listed in ``model.safetensors.index.json``) one tensor at a
time (safetensors' lazy ``safe_open``), replaces every quantized ``nn.Linear`` with an
``XlaQuantizedLinear`` holding only the quantized bytes, and loads every other parameter and buffer as a
strict ``load_state_dict`` would. Everything is checked before the model is touched: on any error the
model is left as it was. Supported so far: GPTQ (:mod:`.gptq`), AWQ gemm (:mod:`.awq`),
compressed-tensors pack-quantized (:mod:`.compressed_tensors`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn import XlaQuantizedLinear
from . import awq, compressed_tensors, gptq

FORMATS = {"gptq": gptq, "awq": awq, "compressed-tensors": compressed_tensors}


@dataclass
class LoadedLayer:
    name: str
    format: str
    bits: int
    group_size: int
    symmetric: bool
    act_order: bool


@dataclass
class CheckpointReport:
    quant_method: str
    layers: list[LoadedLayer] = field(default_factory=list)
    other_tensors: int = 0

    def __str__(self) -> str:
        lines = [f"xqpass: {self.quant_method} checkpoint: {len(self.layers)} quantized linears, "
                 f"{self.other_tensors} other tensors"]
        lines += [f"  {l.name}: int{l.bits} group {l.group_size} {'sym' if l.symmetric else 'asym'}"
                  f"{' act-order' if l.act_order else ''}" for l in self.layers]
        return "\n".join(lines)


class _Tensors:
    """Lazy access to the checkpoint's tensors by name, across shards."""

    def __init__(self, path: str):
        from safetensors import safe_open

        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(single):
            weight_map = None
        else:
            raise ValueError(f"{path}: expected model.safetensors or model.safetensors.index.json")
        self.files = {}
        self.where = {}
        for file in sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]:
            full = os.path.join(path, file)
            try:
                handle = safe_open(full, framework="pt")
            except Exception as e:  # truncated / not a safetensors file
                raise ValueError(f"{full}: not a readable safetensors file ({e})") from e
            self.files[file] = handle
            for key in handle.keys():
                self.where[key] = file
        if weight_map:
            missing = sorted(set(weight_map) - set(self.where))
            if missing:
                raise ValueError(f"model.safetensors.index.json lists tensors no shard holds: {missing[:5]}")

    def keys(self):
        return self.where.keys()

    def get(self, key: str) -> torch.Tensor:
        try:
            return self.files[self.where[key]].get_tensor(key)
        except Exception as e:
            raise ValueError(f"tensor {key}: could not be read ({e})") from e


def load_quantized_checkpoint(model: nn.Module, path: str) -> CheckpointReport:
    """Load a quantized checkpoint directory into ``model`` (see the module docstring)."""
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
    fmt = FORMATS[method]
    tensors = _Tensors(path)
    keys = set(tensors.keys())

    # 1. plan everything without touching the model
    replacements, report = {}, CheckpointReport(method)
    used = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or f"{name}.{getattr(fmt, 'KEY', 'qweight')}" not in keys:
            continue
        layer_tensors = {s: tensors.get(f"{name}.{s}") for s in (*fmt.SUFFIXES, "bias") if f"{name}.{s}" in keys}
        used.update(f"{name}.{s}" for s in layer_tensors)
        converted = fmt.convert_layer(name, layer_tensors, qconfig, module.in_features, module.out_features)
        if (converted["bias"] is None) != (module.bias is None):
            raise ValueError(f"{name}: the model's linear {'has' if module.bias is not None else 'has no'} bias, "
                             f"the checkpoint {'has none' if converted['bias'] is None else 'has one'}")
        q = XlaQuantizedLinear(
            module.in_features, module.out_features, is_symmetric=converted["zero_point"] is None,
            block_size=converted["group"], int4_weight=converted["bits"] == 4, packed=converted["bits"] == 4,
            bias=module.bias is not None, weight_dtype=converted["weight"].dtype,
            scale_dtype=converted["scale"].dtype, block_layout="rows",
        )
        q.load_quantized_weight(converted["weight"], converted["scale"], converted["zero_point"])
        if converted["bias"] is not None:
            q.bias = nn.Parameter(converted["bias"].to(module.bias.dtype), requires_grad=False)
        if converted["perm"] is not None:
            q.set_input_permutation(converted["perm"])
        replacements[name] = q
        report.layers.append(LoadedLayer(name, method, converted["bits"], converted["group"] if converted["group"] != -1
                                         else module.in_features,
                                         converted["symmetric"], converted["perm"] is not None))
    expected = {k: v for k, v in model.state_dict().items()
                if not any(k.startswith(f"{name}.") for name in replacements)}
    rest = keys - used
    missing, unexpected = sorted(set(expected) - rest), sorted(rest - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    state = {}
    for key in expected:
        t = tensors.get(key)
        if tuple(t.shape) != tuple(expected[key].shape):
            raise ValueError(f"{key}: expected shape {tuple(expected[key].shape)}, got {tuple(t.shape)}")
        state[key] = t

    # 2. apply
    for name, q in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    model.load_state_dict(state, strict=False)
    report.other_tensors = len(state)
    return report


__all__ = ["CheckpointReport", "LoadedLayer", "load_quantized_checkpoint"]
