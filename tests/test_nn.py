"""XlaQuantizedLinear and quantize_model: seed compatibility, from_float, buffers, devices, swaps."""
import copy
import logging

import numpy as np
import pytest
import torch
from torch import nn

from oracle import assert_within, dequantized, oracle
from xqpass import XlaQuantizedLinear, quantize_model, quantize_weight

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


def _snapshot(model):
    """Every (name, module object) and a copy of every tensor, for 'the model is untouched'."""
    modules = [(name, module) for name, module in model.named_modules(remove_duplicate=False)]
    tensors = {name: t.detach().clone() for name, t in model.state_dict(keep_vars=True).items()
               if not isinstance(t, nn.parameter.UninitializedParameter)}
    return modules, tensors


def _assert_untouched(model, snapshot):
    modules, tensors = snapshot
    now = list(model.named_modules(remove_duplicate=False))
    assert [n for n, _ in now] == [n for n, _ in modules]
    assert all(a is b for (_, a), (_, b) in zip(now, modules))
    state = {name: t for name, t in model.state_dict(keep_vars=True).items()
             if not isinstance(t, nn.parameter.UninitializedParameter)}
    assert state.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(state[name].detach(), t), name


def _float64_oracle(original, quantized, names, x, **kwargs):
    """The model's float64 value with the named linears' weights replaced by their dequantized ones
    (numpy, from the stored integers, tests/oracle.py), everything else as in the float model. Also
    checks each dequantized weight is within the round-to-nearest bound (scale / 2) of the float one."""
    exact = copy.deepcopy(original).double()
    for name in names:
        q = quantized.get_submodule(name)
        assert isinstance(q, XlaQuantizedLinear), name
        w_deq, _ = dequantized(q.weight, q.weight_scaler, q.zero_point, q.block_size, q.packed)
        w_float = original.get_submodule(name).weight.detach().double().numpy()
        assert np.abs(w_deq - w_float).max() <= q.weight_scaler.max().item() / 2 + 1e-6, name
        exact.get_submodule(name).weight.data = torch.from_numpy(w_deq)
    x = x.double() if x.is_floating_point() else x
    return exact(x, **kwargs).detach()  # grad mode: torch's fused inference paths are not taken


class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))

    def forward(self, x):
        return self.mlp(self.attn(x, x, x, need_weights=False)[0])


def _encoder_layer():
    return nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)


ATTENTION_MODELS = {
    "encoder_layer": (_encoder_layer, ["linear1", "linear2"], ["self_attn.out_proj"]),
    "mha_in_model": (WithAttention, ["mlp.0", "mlp.2"], ["attn.out_proj"]),
    "encoder_padded": (lambda: nn.TransformerEncoder(_encoder_layer(), 2),
                       ["layers.0.linear1", "layers.0.linear2", "layers.1.linear1", "layers.1.linear2"],
                       ["layers.0.self_attn.out_proj", "layers.1.self_attn.out_proj"]),
}


@pytest.mark.parametrize("fmt", [dict(bits=8), dict(bits=4, block_size=16, symmetric=False, block_layout="rows")],
                         ids=str)
@pytest.mark.parametrize("which", ATTENTION_MODELS)
def test_quantize_model_leaves_attention_out_proj_alone_and_matches_oracle(which, fmt, caplog):
    build, quantized_names, skipped_names = ATTENTION_MODELS[which]
    torch.manual_seed(0)
    model = build().eval()
    original = copy.deepcopy(model)
    out_projs = [model.get_submodule(name) for name in skipped_names]
    x = torch.randn(2, 6, 32)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2]) if which == "encoder_padded" else None
    with caplog.at_level(logging.INFO, logger="xqpass"):
        model, report = quantize_model(model, **fmt, return_report=True)

    # out_proj: the same module, the same float tensors, and the report says why
    for name, before in zip(skipped_names, out_projs):
        assert model.get_submodule(name) is before and type(before) is nn.modules.linear.NonDynamicallyQuantizableLinear
        assert torch.equal(before.weight, original.get_submodule(name).weight)
    assert sorted(n for layer in report.skipped for n in layer.names) == sorted(skipped_names)
    assert all("MultiheadAttention" in layer.reason and not layer.by_filter for layer in report.skipped)
    assert sorted(n for layer in report.quantized for n in layer.names) == sorted(quantized_names)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(skipped_names[0] in w and "MultiheadAttention" in w for w in warnings), warnings

    kwargs = {} if padding is None else dict(src_key_padding_mask=padding)
    expected = _float64_oracle(original, model, quantized_names, x, **kwargs)
    float_out = original(x, **kwargs).detach().double()
    # inference mode (no_grad, eval) is where torch takes its fused paths that read weights directly
    with torch.no_grad():
        out = model(x, **kwargs).double()
    keep = torch.ones_like(out, dtype=torch.bool) if padding is None else ~padding[..., None].expand_as(out)
    err = (out - expected)[keep].abs().max().item()
    assert err <= 1e-4, err
    # the oracle tells the quantized model from the float one
    assert err < (float_out - expected)[keep].abs().max().item() / 10


def test_quantize_model_checks_everything_before_swapping():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.LazyLinear(4))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"'2' \(LazyLinear\) has uninitialized parameters.*forward pass"):
        quantize_model(model)
    _assert_untouched(model, before)

    model = Tiny()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"'up': block_size must be -1 or a positive divisor of in_features=32, got 64"):
        quantize_model(model, bits=4, block_size=64)
    _assert_untouched(model, before)

    # a failure while building (the weights are read only then): every earlier layer was built, none swapped
    model = Tiny()
    with torch.no_grad():
        model.head.weight[3, 5] = float("inf")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"'head': weight has 1 non-finite values \(first at \[3, 5\]: inf\)"):
        quantize_model(model)
    _assert_untouched(model, before)

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8, device="meta"))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"'1': weight is on the meta device"):
        quantize_model(model)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear] and torch.equal(model[0].weight, before[1]["0.weight"])


def test_quantize_model_any_failure_leaves_the_model_untouched(monkeypatch):
    model = Tiny()
    before = _snapshot(model)
    calls = []
    real = XlaQuantizedLinear.from_float.__func__

    def fails_on_third(cls, linear, *args, **kwargs):
        calls.append(linear)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(cls, linear, *args, **kwargs)

    monkeypatch.setattr(XlaQuantizedLinear, "from_float", classmethod(fails_on_third))
    with pytest.raises(RuntimeError, match="out of memory") as info:
        quantize_model(model)
    assert any("'head'" in note and "untouched" in note for note in info.value.__notes__)
    _assert_untouched(model, before)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = self.a  # one module, two names
        self.c = nn.Linear(16, 16)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_quantize_model_swaps_a_shared_module_once_under_every_name():
    torch.manual_seed(0)
    model = Shared()
    original = copy.deepcopy(model)
    x = torch.randn(3, 16)
    _, report = quantize_model(model, return_report=True)
    assert isinstance(model.a, XlaQuantizedLinear) and model.b is model.a
    assert [layer.names for layer in report.quantized] == [("a", "b"), ("c",)]
    expected = _float64_oracle(original, model, ["a", "c"], x)  # original's a is b too: both names read it
    assert_within(model(x), expected.numpy(), np.full(expected.shape, 1e-5), "shared")

    # filter_fn picks the shared module under one name only: swapping it would change the other name too
    model = Shared()
    _, report = quantize_model(model, filter_fn=lambda m, name: name != "b", return_report=True)
    assert type(model.a) is nn.Linear and model.b is model.a and isinstance(model.c, XlaQuantizedLinear)
    assert report.skipped[0].names == ("a", "b") and "picks it as 'a' but not as 'b'" in report.skipped[0].reason


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.proj = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 20, bias=False)
        self.lm_head.weight = self.embed.weight  # tied embeddings

    def forward(self, ids):
        return self.lm_head(torch.relu(self.proj(self.embed(ids))))


def test_quantize_model_leaves_a_tied_linear_alone_and_says_so(caplog):
    torch.manual_seed(0)
    model = TiedLM()
    original = copy.deepcopy(model)
    ids = torch.tensor([[1, 5, 7], [19, 0, 3]])
    with caplog.at_level(logging.WARNING, logger="xqpass"):
        _, report = quantize_model(model, bits=4, block_size=8, return_report=True)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.embed.weight  # tie kept
    assert isinstance(model.proj, XlaQuantizedLinear)
    [skipped] = report.skipped
    assert skipped.names == ("lm_head",) and "embed.weight (tied)" in skipped.reason and not skipped.by_filter
    assert any("lm_head" in r.getMessage() and "tied" in r.getMessage() for r in caplog.records)
    expected = _float64_oracle(original, model, ["proj"], ids)
    with torch.no_grad():
        assert_within(model(ids), expected.numpy(), np.full(expected.shape, 1e-5), "tied")


class Doubling(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_quantize_model_leaves_alone_layers_whose_behaviour_a_swap_would_drop():
    model = nn.Sequential(Doubling(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    model[1].register_forward_hook(lambda module, args, out: out * 3)
    _, report = quantize_model(model, return_report=True)
    assert type(model[0]) is Doubling and type(model[1]) is nn.Linear and isinstance(model[2], XlaQuantizedLinear)
    reasons = {layer.names: layer.reason for layer in report.skipped}
    assert "Doubling overrides nn.Linear.forward" in reasons[("0",)] and "hooks" in reasons[("1",)]
    assert "W8A16 per-channel sym: 1 linears quantized, 2 left as they are" in str(report)


BAD_FORMATS = [
    (dict(bits=3), ValueError, r"bits must be 8 or 4, got 3"),
    (dict(bits=8.0), TypeError, r"bits must be the int 8 or 4, got float 8.0"),
    (dict(block_size=0), ValueError, r"block_size must be -1 \(per-channel\) or a positive group size, got 0"),
    (dict(block_size=-2), ValueError, r"got -2"),
    (dict(block_size="16"), TypeError, r"block_size must be an int .* got str '16'"),
    (dict(block_layout="cols"), ValueError, r"block_layout must be 'seed' or 'rows', got 'cols'"),
    (dict(symmetric="no"), TypeError, r"symmetric must be True or False, got str 'no'"),
    (dict(packed=True), ValueError, r"packed=True needs bits=4"),
    (dict(scale_dtype=torch.int32), TypeError, r"scale_dtype must be a floating torch.dtype .* got torch.int32"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_FORMATS, ids=str)
def test_bad_formats_raise_clearly_everywhere(kwargs, error, message):
    model = Tiny()
    before = _snapshot(model)
    with pytest.raises(error, match=message):
        quantize_model(model, **kwargs)
    _assert_untouched(model, before)
    with pytest.raises(error, match=message):
        XlaQuantizedLinear.from_float(_linear(), **kwargs)
    with pytest.raises(error, match=message):
        quantize_weight(_linear().weight, **kwargs)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_bad_models_and_layers_raise_clearly():
    with pytest.raises(TypeError, match=r"quantize_model expects an nn.Module, got list"):
        quantize_model([nn.Linear(4, 4)])
    with pytest.raises(TypeError, match=r"filter_fn must be a callable .* got str"):
        quantize_model(Tiny(), filter_fn="head")
    with pytest.raises(TypeError, match=r"quantize_activation must be True or False, got str"):
        quantize_model(Tiny(), quantize_activation="yes")
    with pytest.raises(TypeError, match=r"scale_dtype must be a floating"):
        XlaQuantizedLinear(8, 8, scale_dtype=torch.int32)

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(0, 8))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"'1': weight \[8, 0\] has in_features=0"):
        quantize_model(model)
    _assert_untouched(model, before)
    with pytest.raises(ValueError, match=r"in_features=0"):
        XlaQuantizedLinear.from_float(nn.Linear(0, 8))
    with pytest.raises(ValueError, match=r"uninitialized \(a lazy module's parameter\)"):
        XlaQuantizedLinear.from_float(nn.LazyLinear(8))
    with pytest.raises(ValueError, match=r"meta device"):
        quantize_weight(torch.empty(8, 8, device="meta"))
    with pytest.raises(ValueError, match=r"1 non-finite values \(first at \[0, 2\]: nan\)"):
        quantize_weight(torch.tensor([[1.0, 2.0, float("nan"), 4.0]]))
