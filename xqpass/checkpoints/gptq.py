"""GPTQ checkpoints (``quant_method: gptq``, as AutoGPTQ, GPTQModel and transformers write them) into
the op's blockwise-by-rows layout. Integers and scales are moved, never re-quantized.

Per quantized linear ``<name>`` (N = out features, K = in features, g = group size, b = bits):

* ``<name>.qweight``  int32 ``[K * b / 32, N]``: ``32 / b`` values of ``b`` bits a word, packed along K,
  value ``k = i * (32/b) + j`` in bits ``[b*j, b*j + b)`` of word ``i`` (unsigned, ``[0, 2**b)``).
* ``<name>.qzeros``   int32 ``[K / g, N * b / 32]``: the zero points, packed the same way along N.
  ``checkpoint_format: gptq`` (v1, the default) stores ``zero - 1``; ``gptq_v2`` stores ``zero``.
* ``<name>.scales``   float16 ``[K / g, N]`` (bfloat16 and float32 are read too); ``<name>.g_idx``
  int32 ``[K]`` (or int64), optional unless ``desc_act: true``: the group of each k (``k // g``
  unless ``desc_act``, act-order, permutes it); ``<name>.bias`` float ``[N]``, optional.
* dequantization: ``w[k, n] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n]``.
* ``sym: true`` stores every zero at the midpoint ``2**(b-1)``; the report's symmetry is read from
  the zeros, and ``sym: true`` over other zeros is an error (a v1 / v2 mix-up shifts them all by one).

Into the op: ``w [N, K]`` uint8 (4-bit: packed two a byte in the op's nibble order), ``scale [N, K/g]``,
``zero_point = zero * scale`` (the op's float convention, in float32: exact for these small integers
times float16 scales, so the format's dequantization is reproduced exactly). With
act-order, K is sorted by group once at load and the layer permutes its activation's last dim per call.
"""
from __future__ import annotations

import torch

from ..quant.layouts import pack_int4
from . import tensors as shared
from .format import CheckpointFormat, ConvertedLayer
from .tensors import BIAS, INDEX, PACKED, SCALE, Spec, check_config, check_tensors, unpack_words


class GPTQ(CheckpointFormat):
    quant_method = "gptq"
    TENSORS = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, config: dict):
        self.bits = check_config("GPTQ", "bits", config.get("bits", 4), (4, 8))
        self.v1 = check_config("GPTQ", "checkpoint_format", config.get("checkpoint_format", "gptq"),
                               ("gptq", "gptq_v2")) == "gptq"  # v1 stores zero - 1; marlin packs otherwise
        self.sym = check_config("GPTQ", "sym", config.get("sym", True), (True, False))
        self.act_order = check_config("GPTQ", "desc_act", config.get("desc_act", False), (True, False))
        self.group_size = config.get("group_size", -1)

    def specs(self, group: int) -> dict[str, Spec]:
        word = 32 // self.bits
        return {"qweight": Spec(PACKED, (("K", word), ("N", 1))), "qzeros": Spec(PACKED, (("K", group), ("N", word))),
                "scales": Spec(SCALE, (("K", group), ("N", 1))), "g_idx": Spec(INDEX, (("K", 1),)), "bias": BIAS}

    def row_slices_exact(self, read, in_features: int, group: int) -> bool:
        """Not with act-order, whose groups span all of K."""
        g_idx = read("g_idx")
        return g_idx is None or torch.equal(g_idx.to(torch.int64), torch.arange(in_features) // group)

    def convert(self, name: str, tensors: dict, in_features: int, out_features: int,
                k_offset: int = 0) -> ConvertedLayer:
        bits, k, n = self.bits, in_features, out_features
        group = self.group(name, k)
        optional = ("bias",) if self.act_order else ("g_idx", "bias")  # act-order: k // g is wrong
        check_tensors(name, tensors, self.specs(group), k, n, "GPTQ", f"in={k}, out={n}, bits={bits}, group_size={group}",
                      optional=optional)
        zeros = unpack_words(tensors["qzeros"], bits, 1) + (1 if self.v1 else 0)  # [K/g, N]
        symmetric = bool((zeros == 1 << (bits - 1)).all())
        if self.sym and not symmetric:
            stored = sorted(set(zeros.unique().tolist()))[:8]
            raise ValueError(f"{name}.qzeros: sym: true stores every zero at {1 << (bits - 1)}, got zeros {stored} "
                             f"(read as checkpoint_format {'gptq' if self.v1 else 'gptq_v2'}: v1 stores zero - 1)")
        g_idx = tensors.get("g_idx")
        perm = None
        if g_idx is not None and not torch.equal(g_idx.to(torch.int64), (torch.arange(k) + k_offset) // group):
            g = g_idx.to(torch.int64)
            counts = torch.bincount(g, minlength=k // group)
            if g.min() < 0 or g.max() >= k // group or not bool((counts == group).all()):
                raise ValueError(f"{name}.g_idx: every group must hold exactly group_size={group} input features")
            perm = torch.argsort(g, stable=True)  # K sorted by group: groups become contiguous
        if perm is None and shared.BYTE_VIEWS:
            # the words already are the op's bytes: k = 8i + 2b and 8i + 2b + 1 sit in the low and high
            # nibble of byte b of word i (8-bit: k = 4i + b in byte b); only the transpose is left
            w = shared.word_bytes(tensors["qweight"].t())  # [N, K * bits / 8]
        else:
            q = unpack_words(tensors["qweight"], bits, 0)  # [K, N]
            w = (q if perm is None else q[perm]).t().contiguous().to(torch.uint8)  # [N, K] in [0, 2**bits)
            w = pack_int4(w, axis=1) if bits == 4 else w
        scale = tensors["scales"].t().contiguous()  # [N, K/g]
        zero_point = (zeros.t().float() * scale.float()).contiguous()  # op's convention; exact in float32
        return ConvertedLayer(w, scale, zero_point, bits, group, symmetric, perm, tensors.get("bias"))
