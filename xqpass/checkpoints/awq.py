"""AWQ checkpoints (``quant_method: awq``, ``version: gemm``, as AutoAWQ and transformers write them)
into the op's blockwise-by-rows layout. Integers and scales are moved, never re-quantized.

Per quantized linear ``<name>`` (N = out features, K = in features, g = group size, 4 bits):

* ``<name>.qweight`` int32 ``[K, N / 8]``: 8 values a word packed along **N** in the interleaved order
  ``0 2 4 6 1 3 5 7``: nibble ``j`` (bits ``4j .. 4j+3``) of word ``i`` holds column ``8i + ORDER[j]``.
* ``<name>.qzeros``  int32 ``[K / g, N / 8]``: zero points packed the same way (no offset).
* ``<name>.scales``  float16 ``[K / g, N]`` (bfloat16 and float32 are read too); ``<name>.bias`` float
  ``[N]``, optional.
* dequantization: ``w[k, n] = (q[k, n] - zero[k // g, n]) * scale[k // g, n]``.

``zero_point: false`` is refused: AutoAWQ's symmetric quantization rounds to signed ``[-8, 7]`` with no
zeros, and its gemm packing (``WQLinear_GEMM.from_linear``) needs zeros, so no gemm layout stores it.
``version`` other than gemm (gemv, marlin, ...) and transformers' ``backend: llm-awq`` pack otherwise.
"""
from __future__ import annotations

import torch

from ..quant.layouts import pack_int4
from . import tensors as shared
from .format import CheckpointFormat, ConvertedLayer
from .tensors import BIAS, PACKED, SCALE, Spec, check_config, check_tensors, unpack_words

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of a word holds column ORDER[j] of its 8
INVERSE_ORDER = [ORDER.index(c) for c in range(8)]


def unpack_columns(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, N/8]`` -> uint8 ``[R, N]`` values in [0, 15], undoing the interleaved order."""
    nibbles = unpack_words(words, 4, 1).unflatten(1, (-1, 8))  # [R, N/8, 8], nibble j
    return nibbles[..., INVERSE_ORDER].flatten(1).to(torch.uint8)  # column c comes from nibble ORDER.index(c)


#: byte t of the word ``(a & 0x0F0F0F0F) | (b & 0x0F0F0F0F) << 4`` holds nibble 2t of two words a, b:
#: columns 0 4 1 5; the same of ``a >> 4`` and ``b >> 4``, nibble 2t + 1: columns 2 6 3 7
_PAIRED_COLUMNS = (0, 4, 1, 5, 2, 6, 3, 7)


def qweight_to_op_bytes(words: torch.Tensor) -> torch.Tensor:
    """``qweight`` int32 ``[K, N/8]`` -> the op's packed bytes ``[N, K/2]`` (low nibble = even k):
    rows k and k + 1 meet nibble by nibble with 32-bit masks and shifts, then each byte goes to its
    column in one strided copy a column of 8 (little-endian bytes of a word: low bits first)."""
    k, n_words = words.shape
    a, b = words[0::2], words[1::2]  # [K/2, N/8]: the low and the high nibble of each output byte
    mask = 0x0F0F0F0F
    even = (a & mask) | ((b & mask) << 4)
    odd = ((a >> 4) & mask) | (((b >> 4) & mask) << 4)  # >> is arithmetic on int32: the mask cleans it
    paired = shared.word_bytes(torch.stack([even, odd], dim=-1)).reshape(k // 2, n_words, 8)
    out = torch.empty(n_words, 8, k // 2, dtype=torch.uint8)
    for position, column in enumerate(_PAIRED_COLUMNS):
        out[:, column, :] = paired[:, :, position].t()
    return out.reshape(n_words * 8, k // 2)


class AWQ(CheckpointFormat):
    quant_method = "awq"
    TENSORS = ("qweight", "qzeros", "scales")

    def __init__(self, config: dict):
        check_config("AWQ", "bits", config.get("bits", config.get("w_bit", 4)), (4,))
        version = config.get("version", "gemm")
        check_config("AWQ", "version", version.lower() if isinstance(version, str) else version,
                     ("gemm",))  # AutoAWQ writes "GEMM", transformers "gemm"
        check_config("AWQ", "zero_point", config.get("zero_point", True), (True,),
                     "symmetric AWQ stores no zeros, and AutoAWQ's gemm packing needs them (module docstring)")
        check_config("AWQ", "backend", config.get("backend", "autoawq"), ("autoawq",))
        self.group_size = config.get("group_size", config.get("q_group_size", 128))

    def specs(self, group: int) -> dict[str, Spec]:
        return {"qweight": Spec(PACKED, (("K", 1), ("N", 8))), "qzeros": Spec(PACKED, (("K", group), ("N", 8))),
                "scales": Spec(SCALE, (("K", group), ("N", 1))), "bias": BIAS}

    def convert(self, name: str, tensors: dict, in_features: int, out_features: int,
                k_offset: int = 0) -> ConvertedLayer:
        k, n = in_features, out_features
        group = self.group(name, k)
        if n % 8:
            raise ValueError(f"{name}: out_features={n} is not a multiple of 8 (AWQ packs 8 columns a word)")
        check_tensors(name, tensors, self.specs(group), k, n, "AWQ", f"in={k}, out={n}, group_size={group}",
                      optional=("bias",))
        zeros = unpack_columns(tensors["qzeros"])  # [K/g, N]
        scale = tensors["scales"].t().contiguous()  # [N, K/g]
        if shared.BYTE_VIEWS and k % 2 == 0:
            w = qweight_to_op_bytes(tensors["qweight"])  # [N, K/2], the op's nibble order
        else:
            w = pack_int4(unpack_columns(tensors["qweight"]).t().contiguous(), axis=1)
        zero_point = (zeros.t().float() * scale.float()).contiguous()
        return ConvertedLayer(w, scale, zero_point, 4, group, False, bias=tensors.get("bias"))
