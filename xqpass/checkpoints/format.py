"""What a checkpoint format is to the loader: a class built once per checkpoint from its
``quantization_config`` (the constructor checks every value the format reads) that declares the
tensors a quantized linear stores and converts one layer into a :class:`ConvertedLayer`, the op's
layout :class:`~xqpass.nn.XlaQuantizedLinear` is built from (docs/checkpoints.md, "Adding a format").
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..quant.layouts import Layout
from .tensors import Spec


@dataclass(frozen=True)
class ConvertedLayer:
    """One quantized linear in the op's blockwise-by-rows layout (per channel where ``group == -1``; float8:
    also per-tensor, ``block_n == -1``, and 2-D blocks, ``block_n > 1``). Integers, float8 values and
    scales are the checkpoint's own, moved, never re-quantized."""
    weight: torch.Tensor  # [N, K] int8/uint8 or float8; 4-bit: [N, K/2], two a byte, low nibble = even k
    scale: torch.Tensor  # [N, K/g], or [N] per channel; float8: [] per tensor, [ceil(N/Bn), ceil(K/g)] 2-D blocks
    zero_point: torch.Tensor | None  # float32 zero * scale, as scale; None: symmetric storage
    bits: int  # 4 (packed, int4) or 8
    group: int  # features of K one scale spans (the op's block_size); -1: per channel
    symmetric: bool  # the report's symmetry (GPTQ: read from the zeros)
    perm: torch.Tensor | None = None  # act-order: K sorted by group; the layer reads x[..., perm]
    bias: torch.Tensor | None = None
    quantize_activation: bool = False  # W8A8: int8 activations (float8 weights: e4m3), dynamic per token
    block_n: int = 1  # output features one scale covers: 1; float8 -1 (per tensor) or Bn (2-D blocks)


class CheckpointFormat(ABC):
    """The protocol every format follows; one instance per checkpoint."""
    quant_method: ClassVar[str]  # the config's name for the format
    TENSORS: ClassVar[tuple[str, ...]]  # what a quantized linear may store, bias aside; all but "weight" mark one
    group_size: int | None  # as configured (-1: all of K); set by the constructor from the config
    #: lines for the report: what the loaded layers compute otherwise than the checkpoint's own runtime
    notes: tuple[str, ...] = ()

    @classmethod
    def for_config(cls, config: dict) -> "CheckpointFormat":
        """The format object for a ``quantization_config`` (a ``quant_method`` whose ``format`` key picks
        one of several classes returns that class's)."""
        return cls(config)

    @abstractmethod
    def specs(self, group: int) -> dict[str, Spec]:
        """name -> :class:`~.tensors.Spec` of each tensor a layer stores, bias included: its dtypes and,
        per dim, the layer axis and the features one element spans (its shape, and how it is sliced)."""

    @abstractmethod
    def convert(self, name: str, tensors: dict, in_features: int, out_features: int,
                k_offset: int = 0) -> ConvertedLayer:
        """One layer, or its slice of K from input feature ``k_offset``, checked against :meth:`specs`."""

    def group(self, name: str, in_features: int) -> int:
        """The group size along K of a layer (or slice) of ``in_features`` (``group_size`` -1: all of
        it), checked to be an int that divides it."""
        if type(self.group_size) is not int:
            raise ValueError(f"{name}: group_size must be an integer, got {self.group_size!r}")
        group = in_features if self.group_size == -1 else self.group_size
        if group <= 0 or in_features % group:
            raise ValueError(f"{name}: group_size={group} does not divide in_features={in_features}")
        return group

    def row_slices_exact(self, read: Callable[[str], torch.Tensor | None], in_features: int, group: int) -> bool:
        """Whether a slice of K holds its own groups (``read(tensor name)``: a stored tensor or None)."""
        return True

    def layout(self, group: int) -> Layout | None:
        """The op's layout of every layer, where the config alone says it (float8 2-D blocks: a split is
        checked against its blocks before anything is read); None: known after conversion."""
        return None

    def skips(self, name: str) -> bool:
        """Whether the config keeps linear ``name`` in float (HF fp8's ``modules_to_not_convert``): a
        quantized layer stored for it contradicts the config."""
        return False
