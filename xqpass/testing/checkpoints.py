"""Quantized checkpoints written from each format's published layout (numpy packers, independent of
xqpass's loaders): random integers and scales for chosen linears of a float model, the model's other
tensors beside them, ``config.json``, one file or index + shards. Each writer returns the float64
weights the format's own dequantization gives, the oracle for a loaded model. For tests, the demo and
the load benchmark."""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn


def linear_names(model: nn.Module, layers=None) -> tuple[str, ...]:
    """``layers``, or the names of every ``nn.Linear`` of ``model``."""
    if layers is not None:
        return tuple(layers)
    return tuple(name for name, m in model.named_modules() if isinstance(m, nn.Linear))


def pack_words(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """32/bits unsigned values a uint32 word along ``axis``, first value in the low bits (GPTQ's packing;
    AWQ and compressed-tensors pack the same way after reordering, offsetting and padding)."""
    per = 32 // bits
    v = np.moveaxis(values.astype(np.uint64), axis, 0)
    v = v.reshape(v.shape[0] // per, per, *v.shape[1:])
    words = np.zeros(v.shape[:1] + v.shape[2:], dtype=np.uint64)
    for j in range(per):
        words |= v[:, j] << np.uint64(bits * j)
    return np.ascontiguousarray(np.moveaxis(words.astype(np.uint32).view(np.int32), 0, axis))


def gptq_layer(n, k, bits, group, rng, act_order=False, v1=True, bias=None, symmetric=False):
    """Random GPTQ tensors for one linear and the float64 weight they stand for; ``symmetric``: every
    zero at the midpoint ``2**(bits-1)`` (GPTQ's ``sym: true``)."""
    levels = 2**bits
    q = rng.integers(0, levels, size=(k, n))
    if symmetric:
        zeros = np.full((k // group, n), levels // 2)
    else:
        zeros = rng.integers(1, levels - 1, size=(k // group, n))
    scales = (rng.random((k // group, n)) * 0.05 + 0.01).astype(np.float16)
    g_idx = np.arange(k) // group
    if act_order:
        g_idx = rng.permutation(g_idx)
    deq = (q - zeros[g_idx]) * scales.astype(np.float64)[g_idx]  # [K, N]
    tensors = {
        "qweight": torch.from_numpy(pack_words(q, bits, 0)),
        "qzeros": torch.from_numpy(pack_words(zeros - (1 if v1 else 0), bits, 1)),
        "scales": torch.from_numpy(scales),
        "g_idx": torch.from_numpy(g_idx.astype(np.int32)),
    }
    if bias is not None:
        tensors["bias"] = bias
    return tensors, deq.T  # W [N, K]


def save_checkpoint(path, tensors, float_model, quantization_config, shards=1, layers=(), rename=None):
    """The float model's other tensors beside the quantized ones, config.json, one file or shards;
    ``rename``: the file's name of a model tensor (a MoE checkpoint's spelling)."""
    for key, value in float_model.state_dict().items():
        if not key.startswith(tuple(f"{name}." for name in layers)):
            tensors[key if rename is None else rename(key)] = value.clone()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"quantization_config": quantization_config}, f)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"))
        return
    names, weight_map = sorted(tensors), {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in names[i::shards]}
        save_file(part, os.path.join(path, file))
        weight_map.update({k: file for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def write_gptq_checkpoint(path, float_model, bits=4, group=16, act_order=False, v1=True, shards=1, seed=0, *, layers=None,
                          symmetric=False):
    """A GPTQ checkpoint of random integers for ``layers`` (default: every ``nn.Linear``) of ``float_model``;
    returns ``{layer: float64 weight [N, K]}``, the format's own dequantization."""
    rng = np.random.default_rng(seed)
    tensors, oracle = {}, {}
    layers = linear_names(float_model, layers)
    for name in layers:
        lin = float_model.get_submodule(name)
        layer, w = gptq_layer(lin.out_features, lin.in_features, bits, group, rng, act_order, v1,
                              None if lin.bias is None else lin.bias.detach().clone(), symmetric)
        tensors.update({f"{name}.{k}": v for k, v in layer.items()})
        oracle[name] = w
    save_checkpoint(path, tensors, float_model, gptq_config(bits, group, act_order, v1, symmetric), shards, layers)
    return oracle


def gptq_config(bits=4, group=16, act_order=False, v1=True, symmetric=False):
    return {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": symmetric, "desc_act": act_order,
            "checkpoint_format": "gptq" if v1 else "gptq_v2"}


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def pack_awq_columns(values: np.ndarray) -> np.ndarray:
    """AWQ gemm packing along N: nibble j of word i holds column 8i + AWQ_ORDER[j]."""
    rows, n = values.shape
    return pack_words(values.reshape(rows, n // 8, 8)[:, :, AWQ_ORDER].reshape(rows, n), 4, 1)


def write_awq_checkpoint(path, float_model, group=16, seed=0, *, layers=None):
    """An AWQ gemm checkpoint, as :func:`write_gptq_checkpoint`."""
    rng = np.random.default_rng(seed)
    tensors, oracle = {}, {}
    layers = linear_names(float_model, layers)
    for name in layers:
        lin = float_model.get_submodule(name)
        layer, oracle[name] = awq_layer(lin.out_features, lin.in_features, group, rng)
        tensors.update({f"{name}.{k}": v for k, v in layer.items()})
        if lin.bias is not None:
            tensors[f"{name}.bias"] = lin.bias.detach().clone()
    save_checkpoint(path, tensors, float_model, awq_config(group), layers=layers)
    return oracle


def awq_config(group=16):
    return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}


def awq_layer(n, k, group, rng):
    """Random AWQ gemm tensors for one linear and the float64 weight ``[N, K]`` they stand for."""
    q = rng.integers(0, 16, size=(k, n))
    zeros = rng.integers(0, 16, size=(k // group, n))
    scales = (rng.random((k // group, n)) * 0.05 + 0.01).astype(np.float16)
    g = np.arange(k) // group
    tensors = {"qweight": torch.from_numpy(pack_awq_columns(q)), "qzeros": torch.from_numpy(pack_awq_columns(zeros)),
               "scales": torch.from_numpy(scales)}
    return tensors, ((q - zeros[g]) * scales.astype(np.float64)[g]).T


def pack_ct_int32(values: np.ndarray, bits: int, dim: int) -> np.ndarray:
    """compressed-tensors pack_to_int32 as documented: +2**(bits-1), 32/bits a word along ``dim``,
    first value in the low bits, zero padding to whole words."""
    v = np.moveaxis(values + (1 << (bits - 1)), dim, -1)
    v = np.concatenate([v, np.zeros(v.shape[:-1] + ((-v.shape[-1]) % (32 // bits),), v.dtype)], axis=-1)
    return np.ascontiguousarray(np.moveaxis(pack_words(v, bits, -1), -1, dim))


def write_ct_checkpoint(path, float_model, bits, strategy, group, symmetric, seed=0, fmt="pack-quantized", *, layers=None):
    """A compressed-tensors checkpoint (``fmt``: pack-quantized or int-quantized), as
    :func:`write_gptq_checkpoint`."""
    rng = np.random.default_rng(seed)
    tensors, oracle = {}, {}
    layers = linear_names(float_model, layers)
    for name in layers:
        lin = float_model.get_submodule(name)
        layer, oracle[name] = ct_layer(lin.out_features, lin.in_features, bits, strategy, group, symmetric, rng, fmt)
        tensors.update({f"{name}.{k}": v for k, v in layer.items()})
        if lin.bias is not None:
            tensors[f"{name}.bias"] = lin.bias.detach().clone()
    config = ct_config(bits, strategy, group, symmetric, fmt)
    config["ignore"] = sorted(set(linear_names(float_model, None)) - set(layers))
    save_checkpoint(path, tensors, float_model, config, layers=layers)
    return oracle


def ct_config(bits=4, strategy="group", group=16, symmetric=True, fmt="pack-quantized"):
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
               "group_size": group if strategy == "group" else None}
    activations = None if fmt == "pack-quantized" else {
        "num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    return {"quant_method": "compressed-tensors", "format": fmt,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations}}}


def ct_layer(n, k, bits, strategy, group, symmetric, rng, fmt="pack-quantized"):
    """Random compressed-tensors tensors for one linear (``fmt``: pack-quantized or int-quantized) and the
    float64 weight ``[N, K]`` they stand for."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    g = k if strategy == "channel" else group
    q = rng.integers(lo, hi + 1, size=(n, k))
    scale = (rng.random((n, k // g)) * 0.05 + 0.01).astype(np.float32)
    zeros = np.zeros((n, k // g), np.int64) if symmetric else rng.integers(lo, hi + 1, size=(n, k // g))
    cols = np.arange(k) // g
    tensors = {"weight_scale": torch.from_numpy(scale)}
    if fmt == "int-quantized":  # int8 as it is, one a byte
        tensors["weight"] = torch.from_numpy(q.astype(np.int8))
        if not symmetric:
            tensors["weight_zero_point"] = torch.from_numpy(zeros.astype(np.int8))
    else:
        tensors["weight_packed"] = torch.from_numpy(pack_ct_int32(q, bits, 1))
        tensors["weight_shape"] = torch.tensor([n, k])
        if not symmetric:
            tensors["weight_zero_point"] = torch.from_numpy(pack_ct_int32(zeros, bits, 0))
    return tensors, (q - zeros[:, cols]) * scale.astype(np.float64)[:, cols]


def decode_e4m3(codes: np.ndarray) -> np.ndarray:
    """float64 values of ``float8_e4m3fn`` bytes, from the format's bit layout (1 sign, 4 exponent bits
    with bias 7, 3 mantissa bits; exponent 0 subnormal; ``S.1111.111`` NaN, no infinity)."""
    codes = codes.astype(np.int64)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exponent, mantissa = (codes >> 3) & 0xF, codes & 0x7
    magnitude = np.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return np.where((exponent == 15) & (mantissa == 7), np.nan, sign * magnitude)


def random_e4m3(rng, shape) -> tuple[torch.Tensor, np.ndarray]:
    """Random finite ``float8_e4m3fn`` values (every byte but the two NaNs, subnormals included) and
    their float64 values."""
    codes = rng.integers(0, 256, size=shape).astype(np.uint8)
    codes = np.where((codes & 0x7F) == 0x7F, codes - 1, codes).astype(np.uint8)  # NaN -> 448
    return torch.from_numpy(codes).view(torch.float8_e4m3fn), decode_e4m3(codes)


def expand_blocks(scale: np.ndarray, rows: int, cols: int, n: int, k: int) -> np.ndarray:
    """A ``[ceil(N/rows), ceil(K/cols)]`` block scale as ``[N, K]`` (the last blocks cut)."""
    return np.repeat(np.repeat(scale, rows, axis=0), cols, axis=1)[:n, :k]


def write_hf_fp8_checkpoint(path, float_model, block=(128, 128), seed=0, shards=1, *, layers=None,
                            modules_to_not_convert=None, scale_dtype=np.float32):
    """A Hugging Face native fp8 checkpoint (transformers' ``FineGrainedFP8Config``): ``weight``
    float8_e4m3fn ``[N, K]`` and ``weight_scale_inv`` ``[ceil(N/Bn), ceil(K/B)]`` (``block`` None: a 0-d
    per-tensor scale) for ``layers``; returns ``{layer: float64 weight}``, ``weight * weight_scale_inv``
    per block (the format multiplies by the "inverse")."""
    rng = np.random.default_rng(seed)
    tensors, oracle = {}, {}
    layers = linear_names(float_model, layers)
    for name in layers:
        lin = float_model.get_submodule(name)
        n, k = lin.out_features, lin.in_features
        weight, values = random_e4m3(rng, (n, k))
        if block is None:
            scale = np.asarray(rng.random() * 0.01 + 0.001, dtype=scale_dtype)
            oracle[name] = values * float(scale)
        else:
            rows, cols = block
            scale = (rng.random((-(-n // rows), -(-k // cols))) * 0.01 + 0.001).astype(scale_dtype)
            oracle[name] = values * expand_blocks(scale.astype(np.float64), rows, cols, n, k)
        tensors[f"{name}.weight"] = weight
        tensors[f"{name}.weight_scale_inv"] = torch.from_numpy(np.array(scale))  # 0-d stays 0-d
        if lin.bias is not None:
            tensors[f"{name}.bias"] = lin.bias.detach().clone()
    config = {"quant_method": "fp8", "activation_scheme": "dynamic",
              "weight_block_size": None if block is None else list(block)}
    if modules_to_not_convert is not None:
        config["modules_to_not_convert"] = list(modules_to_not_convert)
    save_checkpoint(path, tensors, float_model, config, shards, layers)
    return oracle


def write_ct_fp8_checkpoint(path, float_model, strategy="channel", block=(128, 128), group=128,
                            activations="token", seed=0, *, layers=None):
    """A compressed-tensors ``float-quantized`` checkpoint: ``weight`` float8_e4m3fn ``[N, K]`` and
    ``weight_scale`` (``tensor`` ``[1]``, ``channel`` ``[N, 1]`` (FP8_DYNAMIC), ``group`` ``[N, K/g]``,
    ``block`` ``[ceil(N/Bn), ceil(K/B)]`` (FP8_BLOCK)); ``activations``: "token" (dynamic per token,
    FP8_DYNAMIC), "group" (dynamic per token and 128 features, FP8_BLOCK) or None. Returns the float64
    weights ``weight * scale``."""
    rng = np.random.default_rng(seed)
    tensors, oracle = {}, {}
    layers = linear_names(float_model, layers)
    for name in layers:
        lin = float_model.get_submodule(name)
        n, k = lin.out_features, lin.in_features
        weight, values = random_e4m3(rng, (n, k))
        rows, cols = {"tensor": (n, k), "channel": (1, k), "group": (1, group), "block": block}[strategy]
        shape = {"tensor": (1,), "channel": (n, 1)}.get(strategy, (-(-n // rows), -(-k // cols)))
        scale = (rng.random(shape) * 0.01 + 0.001).astype(np.float32)
        oracle[name] = values * expand_blocks(scale.reshape(-(-n // rows), -(-k // cols)).astype(np.float64),
                                              rows, cols, n, k)
        tensors[f"{name}.weight"] = weight
        tensors[f"{name}.weight_scale"] = torch.from_numpy(scale)
        if lin.bias is not None:
            tensors[f"{name}.bias"] = lin.bias.detach().clone()
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy,
               "group_size": group if strategy == "group" else None,
               "block_structure": list(block) if strategy == "block" else None}
    input_activations = None if activations is None else {
        "num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": activations,
        "group_size": 128 if activations == "group" else None}
    save_checkpoint(path, tensors, float_model,
                    {"quant_method": "compressed-tensors", "format": "float-quantized",
                     "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                                   "input_activations": input_activations}},
                     "ignore": sorted(set(linear_names(float_model, None)) - set(layers))}, layers=layers)
    return oracle


# -- mixture-of-experts checkpoints ----------------------------------------------------------------------

#: how quantizers name a transformers experts module's per-expert linears: (model-side -> file renames,
#: gate, up, down), as the original checkpoints of each family (transformers 5.24's conversion_mapping.py)
MOE_STYLES = {
    "mixtral": (((".mlp.", ".block_sparse_moe."),), ("w1", "w3", "w2")),
    "qwen3_moe": ((), ("gate_proj", "up_proj", "down_proj")),
}

#: format name -> (per-layer writer ``(n, k, rng, **args) -> (tensors, float64 [N, K])``, config builder)
LAYER_WRITERS = {
    "gptq": (lambda n, k, rng, bits=4, group=16, act_order=False, v1=True, symmetric=False:
             gptq_layer(n, k, bits, k if group == -1 else group, rng, act_order, v1, symmetric=symmetric), gptq_config),
    "awq": (lambda n, k, rng, group=16: awq_layer(n, k, group, rng), awq_config),
    "compressed-tensors": (lambda n, k, rng, bits=4, strategy="group", group=16, symmetric=True:
                           ct_layer(n, k, bits, strategy, group, symmetric, rng), ct_config),
}


def expert_modules(float_model: nn.Module) -> tuple[str, ...]:
    """The names of every transformers fused experts module (3-D ``gate_up_proj`` / ``down_proj``)."""
    return tuple(name for name, m in float_model.named_modules()
                 if all(getattr(m, p, None) is not None and getattr(m, p).dim() == 3 for p in ("gate_up_proj", "down_proj")))


def write_moe_checkpoint(path, float_model, fmt="gptq", style="mixtral", seed=0, shards=1, *, linears=(),
                         **format_args):
    """A mixture-of-experts checkpoint as quantizers write one: every expert of every fused experts module
    of ``float_model`` stored as three quantized linears named per ``style`` (:data:`MOE_STYLES`; Mixtral:
    ``...block_sparse_moe.experts.3.w1``, the router moved to ``block_sparse_moe.gate`` as well), plus the
    dense ``linears`` quantized alike, in ``fmt`` (:data:`LAYER_WRITERS`; ``format_args`` as its per-layer
    writer takes). Returns ``{experts module: (gate_up [E, 2I, H], down [E, H, I])}`` and ``{linear: [N, K]}``
    in float64, the format's own dequantization, fused as transformers fuses float experts (gate rows
    first)."""
    rng = np.random.default_rng(seed)
    layer_writer, config = LAYER_WRITERS[fmt]
    renames, (gate, up, down) = MOE_STYLES[style]

    def rename(key):
        for old, new in renames:
            key = key.replace(old, new)
        return key

    tensors, banks, dense = {}, {}, {}
    for name in expert_modules(float_model):
        module = float_model.get_submodule(name)
        experts, two_inner, hidden = module.gate_up_proj.shape
        inner = two_inner // 2
        gate_up, down_bank = [], []
        for e in range(experts):
            weights = {}
            for proj, (n, k) in ((gate, (inner, hidden)), (up, (inner, hidden)), (down, (hidden, inner))):
                layer, weights[proj] = layer_writer(n, k, rng, **format_args)
                tensors.update({f"{rename(name)}.{e}.{proj}.{s}": v for s, v in layer.items()})
            gate_up.append(np.concatenate([weights[gate], weights[up]], axis=0))
            down_bank.append(weights[down])
        banks[name] = (np.stack(gate_up), np.stack(down_bank))
    for name in linears:
        lin = float_model.get_submodule(name)
        layer, dense[name] = layer_writer(lin.out_features, lin.in_features, rng, **format_args)
        tensors.update({f"{rename(name)}.{s}": v for s, v in layer.items()})
        if lin.bias is not None:
            tensors[f"{rename(name)}.bias"] = lin.bias.detach().clone()
    config_args = {k: v for k, v in format_args.items() if k in config.__code__.co_varnames}
    save_checkpoint(path, tensors, float_model, config(**config_args), shards, (*banks, *linears), rename)
    return banks, dense
