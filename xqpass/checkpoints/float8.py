"""Float8 checkpoints into the op's float8 layouts: Hugging Face's native fp8 (``quant_method: fp8``,
transformers' ``FineGrainedFP8Config``: DeepSeek-V3, Qwen3-FP8, GLM FP8) and compressed-tensors'
``float-quantized`` (llm-compressor's FP8_DYNAMIC, FP8_BLOCK). The float8 values and scales are moved,
never re-quantized: the loaded layer computes the format's own dequantization.

**HF fp8** (``quantization_config: {quant_method: fp8, weight_block_size: [Bn, B], activation_scheme:
dynamic, modules_to_not_convert: [...]}``), per quantized linear ``<name>`` (N out, K in features):

* ``<name>.weight`` ``float8_e4m3fn [N, K]``;
* ``<name>.weight_scale_inv`` float ``[ceil(N/Bn), ceil(K/B)]`` (``weight_block_size: null``: a 0-d
  per-tensor scale). Despite its name it **multiplies**: ``w[n, k] = float(weight[n, k]) *
  weight_scale_inv[n // Bn, k // B]`` (transformers' ``Fp8Dequantize``; its quantizer stores
  ``1 / (448 / amax)``); N and K need not be multiples of the block, the last ones are partial;
* ``<name>.bias`` optional. ``modules_to_not_convert`` (alias ``ignored_layers``) names linears kept in
  float, matched as transformers matches them (a prefix up to a module boundary, a regex, a suffix).
* fused expert banks, as transformers 5's ``FP8Experts`` holds them (and saves a model loaded from them):
  ``<experts>.gate_up_proj`` e4m3 ``[E, 2I, H]`` with ``<experts>.gate_up_proj_scale_inv`` ``[E, ceil(2I/Bn),
  ceil(H/B)]`` and ``<experts>.down_proj`` ``[E, H, I]`` with ``down_proj_scale_inv`` ``[E, ceil(H/Bn),
  ceil(I/B)]`` (:meth:`FineGrainedFP8.convert_fused`); ``weight_block_size: null``: one scale a half,
  ``[E, 2, 1]`` (gate's, up's) and ``[E, 1, 1]``. ``expert_dtype: fp4`` (packed e2m1 experts) is refused.
* ``activation_scheme: dynamic`` quantizes activations to e4m3 per token and per 128-feature group at
  run time (transformers' Triton kernel); the op's W8A8-FP8 is per token over all of K, so the layers
  load weight-only (16-bit activations, the report says so). ``static`` (an ``activation_scale``),
  ``scale_fmt: ue8m0`` (``float8_e8m0fnu`` scales) are refused.

**compressed-tensors float-quantized**, one config group whose ``weights`` are ``{type: float, num_bits:
8, symmetric: true, dynamic: false}`` with strategy ``tensor`` (``weight_scale [1]``), ``channel``
(``[N, 1]``, FP8_DYNAMIC), ``group`` (``[N, K/g]``) or ``block`` (``block_structure [Bn, B]``,
``[ceil(N/Bn), ceil(K/B)]``, FP8_BLOCK); ``weight`` ``float8_e4m3fn [N, K]``; ``w = float(weight) * scale``
(the library's ``dequantize``). ``input_activations``: none (weight-only); ``{type: float, num_bits: 8,
strategy: token, dynamic: true, symmetric: true}`` (FP8_DYNAMIC), the op's ``quantize_activation=True``
(e4m3 per token, ``amax / 448``); ``strategy: group, dynamic: true`` (FP8_BLOCK's per-token-group
activations) loads weight-only, as HF fp8's; static activations (an ``input_scale``) are refused.
"""
from __future__ import annotations

import re

from ..quant.layouts import PER_CHANNEL, PER_TENSOR, Layout
from .format import CheckpointFormat, ConvertedLayer
from .tensors import BIAS, E4M3, SCALE, Spec, check_config, check_tensors

WEIGHT = Spec(E4M3, (("N", 1), ("K", 1)))

GROUP_ACTIVATIONS_NOTE = ("activations stay 16-bit (weight-only): the checkpoint's dynamic activations are e4m3 per "
                          "token and {group}-feature group, and the op's W8A8-FP8 quantizes per token over all of K")


def check_block(fmt: str, key: str, value) -> tuple[int, int]:
    """``[Bn, B]``: two positive ints (a list or tuple), else a ``ValueError`` naming the key."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(type(v) is int and v > 0 for v in value)):
        raise ValueError(f"{fmt} {key}={value!r} is not supported: expected two positive integers [rows, columns]")
    return value[0], value[1]


def block_layout(block_n: int, block_size: int) -> Layout:
    """The op's layout for scales over ``block_n`` output x ``block_size`` input features (-1: all)."""
    if block_n == PER_TENSOR:
        return Layout(PER_CHANNEL, block_n=PER_TENSOR)
    return Layout.of(block_size, False, "rows", block_n)


def float8_layer(tensors: dict, scale, group: int, block_n: int, quantize_activation: bool = False) -> ConvertedLayer:
    """The converted layer: the float8 weight and its scale as stored."""
    return ConvertedLayer(tensors["weight"].contiguous(), scale.contiguous(), None, 8, group, True,
                          bias=tensors.get("bias"), quantize_activation=quantize_activation, block_n=block_n)


class FineGrainedFP8(CheckpointFormat):
    """Hugging Face native fp8 (``quant_method: fp8``; the module docstring)."""
    quant_method = "fp8"
    TENSORS = ("weight", "weight_scale_inv")

    def __init__(self, config: dict):
        fmt = "fp8"
        scheme = config.get("activation_scheme", "dynamic")
        check_config(fmt, "activation_scheme", scheme.lower() if isinstance(scheme, str) else scheme, ("dynamic",),
                     "a static activation_scale is a per-tensor activation scale the op does not take")
        check_config(fmt, "scale_fmt", config.get("scale_fmt", "float"), ("float",),
                     "ue8m0 stores float8_e8m0fnu scales, which are not read")
        check_config(fmt, "expert_dtype", config.get("expert_dtype", "fp8"), ("fp8",),
                     "fp4 experts are packed e2m1 values, which the op does not take")
        block = config.get("weight_block_size", [128, 128])
        if block is None:  # one scale for the whole weight
            self.block_n, self.group_size = PER_TENSOR, PER_CHANNEL
        else:
            self.block_n, self.group_size = check_block(fmt, "weight_block_size", block)
        skipped = config.get("modules_to_not_convert")
        if skipped is None:
            skipped = config.get("ignored_layers")
        if skipped is not None and not (isinstance(skipped, list) and all(isinstance(p, str) for p in skipped)):
            raise ValueError(f"fp8 modules_to_not_convert={skipped!r} is not supported: expected a list of module "
                             f"names or patterns")
        self.modules_to_not_convert = tuple(skipped or ())
        if block is not None:
            self.notes = (GROUP_ACTIVATIONS_NOTE.format(group=self.group_size),)

    def group(self, name: str, in_features: int) -> int:
        """B for blocks of more than one row (the last block along K may be partial), all of K per tensor."""
        if self.block_n > 1:
            return self.group_size
        return super().group(name, in_features)

    def layout(self, group: int) -> Layout:
        return block_layout(self.block_n, group)

    def skips(self, name: str) -> bool:
        """transformers' ``should_convert_module``: a pattern matching ``name`` from the start up to a
        module boundary, as a regex with that boundary, or as a suffix."""
        boundary = r"(?:(?<=\.)|(?=\.|$))"
        return any(re.match(rf"(?:{key}){boundary}", name) or name.endswith(key) for key in self.modules_to_not_convert)

    def specs(self, group: int) -> dict[str, Spec]:
        if self.block_n == PER_TENSOR:
            scale = Spec(SCALE, ())
        else:
            scale = Spec(SCALE, (("N", self.block_n), ("K", group)))
        return {"weight": WEIGHT, "weight_scale_inv": scale, "bias": BIAS}

    def convert(self, name: str, tensors: dict, in_features: int, out_features: int,
                k_offset: int = 0) -> ConvertedLayer:
        k, n = in_features, out_features
        group = self.group(name, k)
        blocks = "per tensor" if self.block_n == PER_TENSOR else f"weight_block_size=[{self.block_n}, {group}]"
        check_tensors(name, tensors, self.specs(group), k, n, "HF fp8", f"in={k}, out={n}, {blocks}",
                      optional=("bias",))
        block_size = PER_CHANNEL if self.block_n == PER_TENSOR else group
        return float8_layer(tensors, tensors["weight_scale_inv"], block_size, self.block_n)


    #: a fused bank's scale is named ``<bank><FUSED_SCALE>`` (transformers' FP8Experts: gate_up_proj_scale_inv)
    FUSED_SCALE = "_scale_inv"

    def convert_fused(self, name: str, weight, scale, in_features: int, out_features: int, halves: int,
                      experts: int) -> list[ConvertedLayer]:
        """A fused bank ``name`` ``[E, N, K]`` and its ``name_scale_inv``, each expert as one layer (the bank's
        layout: :meth:`convert`'s). ``halves``: 2 for ``gate_up_proj`` (gate's rows, then up's), 1 for
        ``down_proj``. Per tensor, transformers keeps one scale a half (``[E, halves, 1]``), each half's one
        2-D block; in 2-D blocks the halves must hold whole blocks of rows."""
        n, k, part = out_features, in_features, out_features // halves
        scale_name = f"{name}{self.FUSED_SCALE}"
        if weight.dtype not in E4M3:
            raise TypeError(f"{name}: expected float8_e4m3fn (HF fp8), got {weight.dtype}")
        if tuple(weight.shape) != (experts, n, k):
            raise ValueError(f"{name}: expected shape {(experts, n, k)} [experts, out, in] for the model's bank, got "
                             f"{tuple(weight.shape)}")
        if self.block_n == PER_TENSOR:
            block_n, group, shape = part, k, (experts, halves, 1)
        else:
            block_n, group = self.block_n, self.group(name, k)
            if block_n > 1 and part % block_n:
                raise ValueError(f"{scale_name}: 2-D blocks of {block_n} rows do not tile the bank's halves of {part} "
                                 f"rows (gate's and up's rows would share a block)")
            shape = (experts, -(-n // block_n), -(-k // group))
        if scale.dtype not in SCALE:
            raise TypeError(f"{scale_name}: expected {' or '.join(str(d) for d in SCALE)} (HF fp8), got {scale.dtype}")
        if tuple(scale.shape) != shape:
            blocks = "one scale a half" if self.block_n == PER_TENSOR else f"weight_block_size=[{block_n}, {group}]"
            raise ValueError(f"{scale_name}: expected shape {shape} for {experts} experts, out={n}, in={k}, {blocks}, "
                             f"got {tuple(scale.shape)}")
        return [float8_layer({"weight": weight[e]}, scale[e], group, block_n) for e in range(experts)]


class CompressedTensorsFloat(CheckpointFormat):
    """compressed-tensors ``format: float-quantized`` (the module docstring); the loader gets it from
    :meth:`.compressed_tensors.CompressedTensors.for_config`."""
    quant_method = "compressed-tensors"
    TENSORS = ("weight", "weight_scale")
    STRATEGIES = ("tensor", "channel", "group", "block")

    def __init__(self, config: dict):
        fmt = "compressed-tensors float-quantized"
        groups = config.get("config_groups") or {}
        weights = [g.get("weights") for g in groups.values() if isinstance(g, dict) and g.get("weights")]
        if len(weights) != 1:
            raise ValueError(f"{fmt}: expected one config group with weights, got {len(weights)}")
        args, what = weights[0], f"{fmt} weights"
        check_config(what, "type", args.get("type"), ("float",))
        check_config(what, "num_bits", args.get("num_bits", 8), (8,))
        check_config(what, "symmetric", args.get("symmetric", True), (True,))
        check_config(what, "dynamic", args.get("dynamic", False), (False,), "dynamic weight scales are not stored")
        self.strategy = check_config(what, "strategy", args.get("strategy"), self.STRATEGIES)
        self.block_n, self.group_size = 1, PER_CHANNEL
        if self.strategy == "tensor":
            self.block_n = PER_TENSOR
        elif self.strategy == "block":
            self.block_n, self.group_size = check_block(what, "block_structure", args.get("block_structure"))
        elif self.strategy == "group":
            self.group_size = args.get("group_size")
            if type(self.group_size) is not int or self.group_size <= 0:
                raise ValueError(f"{what}: strategy group needs a positive group_size, got {self.group_size!r}")
        activations = [g.get("input_activations") for g in groups.values()
                       if isinstance(g, dict) and g.get("input_activations")]
        self.quantize_activation = False
        if activations:
            act = activations[0]
            scheme = (act.get("type"), act.get("num_bits"), act.get("dynamic"), act.get("symmetric", True))
            if len(activations) != 1 or scheme != ("float", 8, True, True) or act.get("strategy") not in ("token", "group"):
                raise ValueError(f"{fmt}: expected input_activations {{type: float, num_bits: 8, dynamic: true, "
                                 f"symmetric: true, strategy: token or group}} (dynamic e4m3) or none, got "
                                 f"{activations if len(activations) != 1 else act} (static activation scales are "
                                 f"not supported)")
            if act.get("strategy") == "token":  # FP8_DYNAMIC: the op's W8A8-FP8
                self.quantize_activation = True
            else:
                self.notes = (GROUP_ACTIVATIONS_NOTE.format(group=act.get("group_size")),)

    def group(self, name: str, in_features: int) -> int:
        """B for blocks (the last block along K may be partial), ``group_size`` for groups, else all of K."""
        if self.block_n > 1:
            return self.group_size
        return super().group(name, in_features)

    def layout(self, group: int) -> Layout:
        return block_layout(self.block_n, PER_CHANNEL if self.strategy in ("tensor", "channel") else group)

    def specs(self, group: int) -> dict[str, Spec]:
        scale = {"tensor": ((None, 1),), "channel": (("N", 1), (None, 1)), "group": (("N", 1), ("K", group)),
                 "block": (("N", self.block_n), ("K", group))}[self.strategy]
        return {"weight": WEIGHT, "weight_scale": Spec(SCALE, scale), "bias": BIAS}

    def convert(self, name: str, tensors: dict, in_features: int, out_features: int,
                k_offset: int = 0) -> ConvertedLayer:
        k, n = in_features, out_features
        group = self.group(name, k)
        check_tensors(name, tensors, self.specs(group), k, n, "compressed-tensors float-quantized",
                      f"in={k}, out={n}, strategy={self.strategy}"
                      + (f", block_structure=[{self.block_n}, {group}]" if self.strategy == "block" else "")
                      + (f", group_size={group}" if self.strategy == "group" else ""), optional=("bias",))
        scale = tensors["weight_scale"]
        if self.strategy == "tensor":
            scale = scale.reshape(())
        elif self.strategy == "channel":
            scale = scale[:, 0]
        block_size = group if self.strategy in ("group", "block") else PER_CHANNEL
        return float8_layer(tensors, scale, block_size, self.block_n, self.quantize_activation)
