"""XlaQuantizedLinear and quantize_model: seed compatibility, from_float, buffers, devices, swaps."""
import numpy as np
import pytest
import torch
from torch import nn

from oracle import assert_within, dequantized, oracle
from xqpass import XlaQuantizedLinear, quantize_model

FORMATS = [
    dict(bits=8, block_size=-1, symmetric=True),
    dict(bits=8, block_size=16, symmetric=False),
    dict(bits=4, block_size=-1, symmetric=False),
    dict(bits=4, block_size=16, symmetric=True),
    dict(bits=8, block_size=-1, symmetric=True, quantize_activation=True),
    dict(bits=4, block_size=32, symmetric=False, quantize_activation=True),
    dict(bits=4, block_size=16, symmetric=False, block_layout="rows"),
    dict(bits=8, block_size=16, symmetric=True, block_layout="rows", quantize_activation=True),
]


def _linear(k=64, n=24, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_from_float_matches_oracle_and_float_layer(fmt):
    lin = _linear()
    q = XlaQuantizedLinear.from_float(lin, **fmt)
    x = torch.randn(2, 3, 64)
    out = q(x)
    # exact semantics: the op on the stored integers, plus the bias (float64 oracle)
    kw = dict(w=q.weight, scale=q.weight_scaler, zero_point=q.zero_point, block_size=q.block_size,
              int4_weight=q.int4_weight, quantize_activation=q.quantize_activation, packed=q.packed)
    expected, allowance = oracle(x, **kw)
    assert_within(out, expected + lin.bias.detach().double().numpy(), allowance + 1e-6, str(fmt))
    # and close to the float layer: RTN error of each weight is at most scale / 2
    w_deq, _ = dequantized(q.weight, q.weight_scaler, q.zero_point, q.block_size, q.packed)
    assert np.abs(w_deq - lin.weight.detach().double().numpy()).max() <= q.weight_scaler.max().item() / 2 + 1e-6
    if fmt.get("block_layout") == "rows":
        assert q.weight.shape[0] == 24 and q.weight_scaler.shape == (24, 64 // fmt["block_size"])
    rel = (out - lin(x)).norm() / lin(x).norm()
    assert rel < (0.02 if fmt["bits"] == 8 else 0.2), rel


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_buffers_hold_quantized_bytes_only(fmt):
    lin = _linear(bias=False)
    q = XlaQuantizedLinear.from_float(lin, **fmt)
    tensors = dict(q.state_dict())
    big = [k for k, t in tensors.items() if t.numel() >= 64 * 24 // 2]
    assert big == ["weight"]
    assert q.weight.dtype in (torch.int8, torch.uint8)
    weight_bytes = q.weight.numel() * q.weight.element_size()
    assert weight_bytes == 64 * 24 // (2 if fmt["bits"] == 4 else 1)
    assert q.bias is None and (q.zero_point is None) == fmt["symmetric"]


def test_to_xla_device_matches_cpu(xla_device):
    lin = _linear()
    q = XlaQuantizedLinear.from_float(lin, bits=4, block_size=32, symmetric=False)
    x = torch.randn(3, 64)
    cpu = q(x)
    qx = q.to(xla_device)
    assert qx.weight.device.type == "xla" and qx.weight.dtype == torch.uint8
    expected, allowance = oracle(x, qx.weight.cpu(), qx.weight_scaler.cpu(), qx.zero_point.cpu(), 32, True, False, True)
    assert_within(qx(x.to(xla_device)).cpu(), expected + lin.bias.detach().double().numpy(), allowance + 1e-6, "xla")
    assert torch.allclose(qx(x.to(xla_device)).cpu(), cpu, atol=1e-5, rtol=1e-5)


def test_bf16_activations_and_module_dtype():
    q = XlaQuantizedLinear.from_float(_linear(), bits=8)
    out = q(torch.randn(3, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_extra_repr_is_readable():
    q = XlaQuantizedLinear.from_float(_linear(), bits=4, block_size=32, symmetric=False)
    r = repr(q)
    for part in ("in_features=64", "out_features=24", "int4 packed", "torch.uint8", "block_size=32",
                 "symmetric=False", "quantize_activation=False", "bias=True"):
        assert part in r, r


def test_seed_constructor_and_load_quantized_weight():
    """The seed's way: construct by dims, load int8 [out, in] + scaler (+ float zero point)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-128, 128, (24, 64), generator=g, dtype=torch.int16).to(torch.int8)
    s = torch.rand(24, generator=g)
    zp = torch.randn(24, generator=g)
    q = XlaQuantizedLinear(64, 24)  # seed default: asymmetric, per-channel
    assert q.zero_point is not None
    q.load_quantized_weight(w, s, zp)
    x = torch.randn(5, 64)
    expected, allowance = oracle(x, w, s, zp)
    assert_within(q(x), expected, allowance, "seed-style")
    blockwise = XlaQuantizedLinear(64, 24, is_symmetric=True, block_size=16)
    assert blockwise.weight.shape == (4, 16, 24)
    with pytest.raises(ValueError, match=r"K mismatch"):
        q.load_quantized_weight(torch.zeros(24, 32, dtype=torch.int8), s)
    with pytest.raises(ValueError, match=r"expected 24 output features, got 12"):
        q.load_quantized_weight(torch.zeros(12, 64, dtype=torch.int8), s[:12])
    with pytest.raises(TypeError, match=r"w must be torch.int8"):
        q.load_quantized_weight(w.float(), s)


def test_state_dict_round_trip():
    q = XlaQuantizedLinear.from_float(_linear(), bits=4, block_size=16, symmetric=False)
    fresh = XlaQuantizedLinear(64, 24, is_symmetric=False, block_size=16, int4_weight=True, packed=True, bias=True)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(2, 64)
    assert torch.equal(fresh(x), q(x))


def test_gradients_flow_to_input_and_bias():
    q = XlaQuantizedLinear.from_float(_linear(), bits=8)
    x = torch.randn(3, 64, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None and q.bias.grad is not None


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.act = nn.GELU()
        self.down = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.down(self.act(self.up(x))))


def test_quantize_model_swaps_linears_with_filter():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(4, 32)
    ref = model(x)
    quantize_model(model, bits=8, filter_fn=lambda m, name: name != "head")
    assert isinstance(model.up, XlaQuantizedLinear) and isinstance(model.down, XlaQuantizedLinear)
    assert type(model.head) is nn.Linear
    assert (model(x) - ref).norm() / ref.norm() < 0.02


def test_quantize_model_checks_every_layer_before_swapping():
    model = Tiny()
    with pytest.raises(ValueError, match=r"block_size=64 does not divide in_features=32 of 'up'"):
        quantize_model(model, bits=4, block_size=64)
    assert all(type(m) is nn.Linear for m in (model.up, model.down, model.head))  # untouched
