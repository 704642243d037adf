"""compressed-tensors checkpoints written with the compressed-tensors library's own packer and read back
with its own dequantization as the oracle (the library is in the test extra at a version that installs
beside torch 2.9). GPTQ's and AWQ's libraries need CUDA builds that do not install here; their layouts
are tested from the published layout in test_checkpoints.py."""
import json
import os
import tempfile

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize

from xqpass import XlaQuantizedLinear, load_quantized_checkpoint


class OneLinear(nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=False)

    def forward(self, x):
        return self.proj(x)


@settings(max_examples=12)
@given(bits=st.sampled_from([4, 8]), strategy=st.sampled_from(["channel", "group"]), symmetric=st.booleans(),
       group=st.sampled_from([16, 32]), n=st.sampled_from([8, 24, 40]), k=st.sampled_from([32, 64, 96]),
       seed=st.integers(0, 2**16), packed=st.booleans())
def test_library_packed_checkpoint_equals_the_librarys_dequantization(bits, strategy, symmetric, group, n, k, seed,
                                                                      packed):
    g = torch.Generator().manual_seed(seed)
    fmt = "pack-quantized" if packed or bits == 4 else "int-quantized"
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    groups = 1 if strategy == "channel" else k // group
    q = torch.randint(lo, hi + 1, (n, k), generator=g).to(torch.int8)
    scale = torch.rand(n, groups, generator=g) * 0.05 + 0.01
    zero = None if symmetric else torch.randint(lo, hi + 1, (n, groups), generator=g).to(torch.int8)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=group if strategy == "group" else None)
    if fmt == "pack-quantized":
        tensors = {"proj.weight_packed": pack_to_int32(q, bits, packed_dim=1),
                   "proj.weight_shape": torch.tensor([n, k])}
        if zero is not None:
            tensors["proj.weight_zero_point"] = pack_to_int32(zero, bits, packed_dim=0)
        activations = None
    else:  # W8A8: int8 weights as they are, dynamic per-token activations
        tensors = {"proj.weight": q}
        if zero is not None:
            tensors["proj.weight_zero_point"] = zero
        activations = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    tensors["proj.weight_scale"] = scale
    config = {"quantization_config": {
        "quant_method": "compressed-tensors", "format": fmt,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args.model_dump(),
                                      "input_activations": activations}}}}
    model = OneLinear(k, n)
    with tempfile.TemporaryDirectory() as path:
        save_file({key: t.contiguous() for key, t in tensors.items()}, os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
        load_quantized_checkpoint(model, path)
    assert isinstance(model.proj, XlaQuantizedLinear) and model.proj.quantize_activation == (fmt == "int-quantized")

    oracle_weight = dequantize(q.double(), scale.double(), None if zero is None else zero.double(), args=args,
                               dtype=torch.float64)  # the library's own dequantization, float64
    x = torch.randn(3, k, generator=g)
    if fmt == "int-quantized":  # per-token int8 activations, the scheme the config names
        x_scale = x.double().abs().amax(-1, keepdim=True) / 127
        x_used = torch.round(x.double() / x_scale).clamp(-127, 127) * x_scale
    else:
        x_used = x.double()
    with torch.no_grad():
        out = model(x)
    expected = x_used @ oracle_weight.t()
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5), (out.double() - expected).abs().max()
