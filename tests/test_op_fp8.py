"""Float8 weights (``torch.float8_e4m3fn``, ``torch.float8_e5m2``): per-tensor, per-channel, blockwise by
rows and 2-D block scales (partial last blocks), weight-only and W8A8-FP8, on CPU and XLA, against a
float64 oracle written here from the formats' published bit layouts (OCP 8-bit floating point: e4m3fn
has bias 7, no infinity, NaN at S.1111.111; e5m2 has bias 15 and IEEE infinities and NaNs)."""
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oracle import EPS, SUBNORMAL, assert_within

op = torch.ops.xq.quantized_matmul
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8 = [E4M3, E5M2]
E4M3_NAN = 0x7F


def decode(w: torch.Tensor) -> np.ndarray:
    """The float64 value of each float8 byte, from the bit layout (not from torch's conversion)."""
    exp_bits, bias = (4, 7) if w.dtype == E4M3 else (5, 15)
    man_bits = 7 - exp_bits
    byte = w.cpu().view(torch.uint8).numpy().astype(np.int64)
    sign = np.where(byte & 0x80, -1.0, 1.0)
    exp, man = (byte >> man_bits) & ((1 << exp_bits) - 1), byte & ((1 << man_bits) - 1)
    normal = 2.0 ** (exp - bias) * (1 + man / 2**man_bits)
    value = sign * np.where(exp == 0, 2.0 ** (1 - bias) * man / 2**man_bits, normal)  # subnormals
    if w.dtype == E4M3:
        return np.where((exp == 15) & (man == 7), np.nan, value)
    top = exp == 31
    return np.where(top & (man == 0), sign * np.inf, np.where(top, np.nan, value))


def expanded(scale: torch.Tensor, n: int, k: int, block_size: int, block_n: int) -> np.ndarray:
    """The scale of each weight element, [N, K]: per-tensor, per-channel [N], or [ceil(N/Bn), ceil(K/B)]."""
    s = scale.cpu().double().numpy()
    if block_n == -1:
        return np.full((n, k), float(s))
    if block_size == -1:
        return np.repeat(s[:, None], k, axis=1)
    return np.repeat(np.repeat(s, block_n, axis=0)[:n], block_size, axis=1)[:, :k]


def fp8_oracle(x, w, scale, block_size=-1, block_n=1, quantize_activation=False, roundings=1):
    """(expected float64 output, allowance): ``x @ (decode(w) * scale).T``; W8A8-FP8 against the
    unquantized product, plus e4m3's rounding of ``x / x_scale`` (half a unit: 2^-4 relative, 2^-10
    absolute among the subnormals, in units of ``x_scale = amax / 448``)."""
    xd = x.cpu().double().numpy()
    n, k = w.shape
    w_deq = decode(w) * expanded(scale, n, k, block_size, block_n)
    expected = xd @ w_deq.T
    unit = roundings * EPS[x.dtype] + 8 * k * 2.0**-24
    allowance = unit * (np.abs(xd) @ np.abs(w_deq).T)
    if quantize_activation:
        x_scale = np.abs(xd).max(axis=-1, keepdims=True) / 448
        quant = 2.0**-4 * (np.abs(xd) @ np.abs(w_deq).T) + x_scale * 2.0**-10 * np.abs(w_deq).sum(axis=1)
        allowance = (1 + 2 * unit) * (allowance + quant * (1 + 1e-5))
    return expected, allowance + roundings * SUBNORMAL[x.dtype] / 2 + 1e-30


def random_fp8(shape, dtype, gen):
    """Every finite byte of the format (subnormals and zeros of both signs included), no NaN / Inf."""
    byte = torch.randint(0, 256, shape, generator=gen, dtype=torch.int16).to(torch.uint8)
    top = (byte & 0x7F) == (0x7F if dtype == E4M3 else 0x7C)  # e5m2: exponent 31 (Inf, NaN) is 0x7C..0x7F
    byte = torch.where(top if dtype == E4M3 else (byte & 0x7C) == 0x7C, byte & 0x80, byte)
    return byte.view(dtype)


def scale_shape(n, k, block_size, block_n):
    if block_n == -1:
        return ()
    if block_size == -1:
        return (n,)
    return (-(-n // block_n), -(-k // block_size))


#: (name, block_size, block_n): the layouts a float8 weight [N, K] takes; B / Bn None: drawn
LAYOUTS = ["per-tensor", "per-channel", "by rows", "2-D blocks"]


@st.composite
def fp8_cases(draw, rows=(0, 1, 2, 5), dtypes=(torch.float32, torch.bfloat16)):
    layout = draw(st.sampled_from(LAYOUTS))
    n, k = draw(st.integers(1, 40)), draw(st.integers(1, 70))
    block_size, block_n = {"per-tensor": (-1, -1), "per-channel": (-1, 1)}.get(layout, (None, None))
    if layout == "by rows":
        block_size, block_n = draw(st.sampled_from([b for b in (1, 2, 4, 8, 16) if k % b == 0])), 1
    elif layout == "2-D blocks":  # N and K need not be multiples: the last blocks are partial
        block_size, block_n = draw(st.sampled_from([2, 3, 8, 16, 32])), draw(st.sampled_from([2, 4, 5, 16, 32]))
    dtype = draw(st.sampled_from(FP8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    w = random_fp8((n, k), dtype, gen)
    scale = torch.rand(scale_shape(n, k, block_size, block_n), generator=gen) * 2.0 ** draw(st.integers(-12, 4))
    lead = draw(st.sampled_from([(), (draw(st.sampled_from(rows)),), (2, draw(st.sampled_from(rows)))]))
    x = (torch.randn(*lead, k, generator=gen) * 4).to(draw(st.sampled_from(dtypes)))
    return dict(x=x, w=w, scale=scale, block_size=block_size, block_n=block_n,
                quantize_activation=draw(st.booleans()))


def _call(case, device=None):
    kw = {k: v.to(device) if device is not None and isinstance(v, torch.Tensor) else v for k, v in case.items()}
    return op(kw["x"], kw["w"], kw["scale"], None, kw["block_size"], False, kw["quantize_activation"],
              block_n=kw["block_n"])


def _what(case):
    return (f"{case['w'].dtype} {tuple(case['w'].shape)} B={case['block_size']} Bn={case['block_n']} "
            f"x {tuple(case['x'].shape)} {case['x'].dtype} qa={case['quantize_activation']}")


# ----------------------------------------------------------------------------------------------
# the oracle's own decoding, then the CPU reference

@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_decoding_by_hand_matches_every_byte(dtype):
    """The oracle's bit decoding agrees with torch's conversion on all 256 bytes (NaN where NaN)."""
    every = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(dtype)
    by_hand, torch_value = decode(every), every.double().numpy()
    assert np.array_equal(np.isnan(by_hand), np.isnan(torch_value))
    assert np.array_equal(by_hand[~np.isnan(by_hand)], torch_value[~np.isnan(torch_value)])
    if dtype == E4M3:
        assert np.isnan(by_hand).sum() == 2 and np.nanmax(by_hand) == 448 and not np.isinf(by_hand).any()
        assert by_hand[1] == 2.0**-9  # the smallest subnormal


@given(case=fp8_cases())
def test_cpu_matches_the_float64_oracle(case):
    out = _call(case)
    assert out.dtype == case["x"].dtype and out.shape == (*case["x"].shape[:-1], case["w"].shape[0])
    expected, allowance = fp8_oracle(**{k: case[k] for k in ("x", "w", "scale", "block_size", "block_n",
                                                              "quantize_activation")})
    assert_within(out, expected, allowance, "cpu " + _what(case))


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_float64_activations_are_float64_accurate(dtype):
    gen = torch.Generator().manual_seed(1)
    w, x = random_fp8((20, 50), dtype, gen), torch.randn(3, 50, dtype=torch.float64, generator=gen)
    scale = torch.rand(5, 4, generator=gen)
    out = op(x, w, scale, None, 16, block_n=4)
    expected, _ = fp8_oracle(x, w, scale, 16, 4)
    assert np.allclose(out.numpy(), expected, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_the_seed_blockwise_layout_takes_float8_too(dtype):
    gen = torch.Generator().manual_seed(2)
    w, x, scale = random_fp8((12, 32), dtype, gen), torch.randn(4, 32, generator=gen), torch.rand(12, 4, generator=gen)
    out = op(x, w.t().reshape(4, 8, 12).contiguous(), scale.t().contiguous(), None, 8)
    assert_within(out, *fp8_oracle(x, w, scale, 8, 1), "seed blockwise")


def test_nan_weight_makes_its_output_feature_nan_in_every_row():
    gen = torch.Generator().manual_seed(3)
    w = random_fp8((6, 20), E4M3, gen)
    w.view(torch.uint8)[2, 7] = E4M3_NAN
    x, scale = torch.randn(4, 20, generator=gen), torch.rand(3, 3, generator=gen)
    for qa in (False, True):
        out = op(x, w, scale, None, 8, False, qa, block_n=2)
        assert torch.isnan(out[:, 2]).all() and torch.isfinite(out[:, [0, 1, 3, 4, 5]]).all()


def test_subnormal_weights_are_exact():
    """Every e4m3 subnormal (2^-9 .. 7 * 2^-9, both signs) and zero, per-tensor scale 1: exact products."""
    byte = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87]], dtype=torch.uint8)
    w = byte.view(E4M3)
    x = torch.eye(8)
    out = op(x, w, torch.tensor(1.0), block_n=-1)
    assert torch.equal(out.t(), torch.tensor([[i * 2.0**-9 for i in range(8)], [-i * 2.0**-9 for i in range(8)]]))


def test_per_token_float8_activation_matches_its_definition():
    """x_q = round-to-nearest-even e4m3 of x / (amax / 448), clamped; an all-zero row gives zeros."""
    from xqpass.quant import quantize_per_token_float8

    x = torch.randn(5, 64) * 3
    x[3] = 0
    x_q, x_scale = quantize_per_token_float8(x)
    assert x_q.dtype == E4M3 and torch.equal(x_scale[:, 0], x.abs().amax(dim=1) / 448)
    assert x_q.float().abs().amax(dim=1)[[0, 1, 2, 4]].eq(448).all() and (x_q[3].float() == 0).all()
    value = decode(x_q)
    scaled = (x / torch.where(x_scale == 0, 1, x_scale)).double().numpy()
    spacing = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(value), 2.0**-6))) - 3)  # e4m3 ulp at |value|
    assert (np.abs(value - scaled) <= spacing / 2).all()


def test_gradient_through_2d_blocks():
    gen = torch.Generator().manual_seed(4)
    w, scale = random_fp8((9, 21), E4M3, gen), torch.rand(3, 3, generator=gen)
    x = torch.randn(2, 21, generator=gen, requires_grad=True)
    op(x, w, scale, None, 8, block_n=4).sum().backward()
    w_deq = torch.from_numpy(decode(w) * expanded(scale, 9, 21, 8, 4)).float()
    assert torch.allclose(x.grad, w_deq.sum(0).expand(2, 21), rtol=1e-5, atol=1e-6)


def test_export_keeps_one_node_with_block_n():
    gen = torch.Generator().manual_seed(5)
    w, scale = random_fp8((10, 20), E4M3, gen), torch.rand(2, 3, generator=gen)

    class M(torch.nn.Module):
        def forward(self, x):
            return op(x, w, scale, None, 8, False, True, block_n=8)

    ep = torch.export.export(M(), (torch.randn(4, 20),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    assert sum(n.op == "call_function" for n in ep.graph.nodes) == 1
    x = torch.randn(7, 20)
    assert_within(ep.module()(x), *fp8_oracle(x, w, scale, 8, 8, True), "exported")


# ----------------------------------------------------------------------------------------------
# bad input: what was expected and what came

def _base():
    return dict(x=torch.randn(3, 20), w=torch.zeros(10, 20, dtype=E4M3), scale=torch.rand(2, 3), zero_point=None,
                block_size=8, int4_weight=False, quantize_activation=False, packed=False, block_n=8)


BAD = {
    "2-D scale shape": (dict(scale=torch.rand(2, 2)), ValueError,
                        r"2-D blocks scale must have shape \(2, 3\) \[ceil\(N=10/block_n=8\), ceil\(K=20/block_size=8\)\], got \(2, 2\)"),
    "by-rows scale for 2-D blocks": (dict(scale=torch.rand(10, 3)), ValueError, r"must have shape \(2, 3\).*got \(10, 3\)"),
    "2-D scale without block_n": (dict(block_n=1, x=torch.randn(3, 24), w=torch.zeros(10, 24, dtype=E4M3)), ValueError,
                                  r"blockwise by rows scale must have shape \(10, 3\) \(one scale a block of rows: pass block_n.*got \(2, 3\)"),
    "partial K without block_n": (dict(block_n=1, scale=torch.rand(10, 3)), ValueError, r"block_size=8 does not divide K=20"),
    "per-tensor scale of shape [1]": (dict(block_size=-1, block_n=-1, scale=torch.rand(1)), ValueError,
                                      r"per-tensor scale must have shape \(\) \(one scale, 0-d: pass scale.reshape\(\(\)\)\), got \(1,\)"),
    "0-d scale per-channel": (dict(block_size=-1, block_n=1, scale=torch.tensor(1.0)), ValueError,
                              r"per-channel scale must have shape \(10,\) \(one scale for the whole weight: pass block_n=-1"),
    "per-tensor with a block": (dict(block_n=-1, scale=torch.tensor(1.0)), ValueError, r"per-tensor \(block_n=-1\) covers all of K: block_size must be -1, got 8"),
    "2-D blocks without block_size": (dict(block_size=-1), ValueError, r"2-D blocks \(block_n=8\) need a block_size"),
    "block_n zero": (dict(block_n=0), ValueError, r"block_n must be 1 .*-1 \(per-tensor\).*got 0"),
    "3-D w with block_n": (dict(w=torch.zeros(3, 8, 10, dtype=E4M3)), ValueError, r"2-D block w must be 2-D \[N, K\], got shape \(3, 8, 10\)"),
    "float8 scale": (dict(scale=torch.rand(2, 3).to(E4M3)), TypeError, r"scale must be float32, bfloat16, float16 or float64, got torch.float8_e4m3fn"),
    "integer scale": (dict(scale=torch.ones(2, 3, dtype=torch.int32)), TypeError, r"scale must be a floating tensor, got torch.int32"),
    "zero point": (dict(zero_point=torch.rand(2, 3)), ValueError, r"float8 weights \(torch.float8_e4m3fn\) are one symmetric value a byte.*zero_point given"),
    "int4 flag": (dict(int4_weight=True), ValueError, r"int4_weight and packed must be False.*int4_weight=True"),
    "int8 weight with block_n": (dict(w=torch.zeros(10, 20, dtype=torch.int8)), ValueError,
                                 r"block_n=8 \(per-tensor or 2-D block scales\) is for float8 weights; torch.int8 weights take block_n=1"),
    "float16 w": (dict(w=torch.zeros(10, 20, dtype=torch.float16)), TypeError,
                  r"w must be torch.int8 or torch.uint8 \(quantized\) or float8 \(torch.float8_e4m3fn, torch.float8_e5m2\), got torch.float16"),
    "K mismatch": (dict(x=torch.randn(3, 24)), ValueError, r"K mismatch: x has K=24 in its last dim, 2-D blocks w \(10, 20\) holds K=20"),
}


def _call_bad(kw):
    return op(kw["x"], kw["w"], kw["scale"], kw["zero_point"], kw["block_size"], kw["int4_weight"],
              kw["quantize_activation"], packed=kw["packed"], block_n=kw["block_n"])


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_named(name, device):
    change, exc, pattern = BAD[name]
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(_base(), **change).items()}
    with pytest.raises(exc, match=pattern):
        _call_bad(kw)


# ----------------------------------------------------------------------------------------------
# XLA: both forms against the same oracle, the graph's weight stays float8

FORMS = ["cpu", "cpu dot", "canonical"]


def forced(form):
    from xqpass.ops import xla_lowering
    from xqpass.ops.xla import XlaCpuTuning

    if form == "cpu dot":  # the dot forms XLA:CPU takes past split-K's rows
        return xla_lowering("cpu", XlaCpuTuning(split_k_max_m=0, split_k_max_m_packed=0))
    return xla_lowering(form)


@pytest.mark.parametrize("form", FORMS)
@settings(max_examples=20)
@given(case=fp8_cases(rows=(0, 1, 3, 40)))
def test_xla_matches_the_oracle_and_the_cpu(form, case, xla_device):
    with forced(form):
        out = _call(case, xla_device).cpu()
    cpu = _call(case)
    expected, allowance = fp8_oracle(**{k: case[k] for k in ("x", "w", "scale", "block_size", "block_n",
                                                              "quantize_activation")}, roundings=2)
    assert_within(out, expected, allowance, "xla " + _what(case))
    if case["quantize_activation"]:  # the same e4m3 activations: within float32 accumulation of the CPU
        assert_within(out, cpu.double().numpy(), allowance, "xla vs cpu " + _what(case))


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_activation_quantization_is_bit_identical_on_xla(dtype, xla_device):
    from xqpass.quant import quantize_per_token_float8

    x = torch.randn(7, 300) * torch.logspace(-8, 8, 7)[:, None]
    x_q, x_scale = quantize_per_token_float8(x)
    x_q_xla, x_scale_xla = quantize_per_token_float8(x.to(xla_device))
    assert torch.equal(x_q_xla.cpu().view(torch.uint8), x_q.view(torch.uint8))
    assert torch.equal(x_scale_xla.cpu(), x_scale)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("layout", ["per-tensor", "per-channel", "2-D blocks"])
def test_nan_weight_on_xla(layout, form, xla_device):
    block_size, block_n, s_shape = {"per-tensor": (-1, -1, ()), "per-channel": (-1, 1, (6,)),
                                    "2-D blocks": (8, 4, (2, 5))}[layout]
    gen = torch.Generator().manual_seed(6)
    w = random_fp8((6, 36), E4M3, gen)
    w.view(torch.uint8)[4, 35] = E4M3_NAN  # in the partial last K block
    scale = torch.rand(s_shape, generator=gen)
    for rows in (1, 40):
        x = torch.randn(rows, 36, generator=gen)
        with forced(form):
            out = op(x.to(xla_device), w.to(xla_device), scale.to(xla_device), None, block_size,
                     block_n=block_n).cpu()
        assert torch.isnan(out[:, 4]).all() and torch.isfinite(out[:, [0, 1, 2, 3, 5]]).all(), (layout, rows)


def _hlo(out):
    import torch_xla

    return torch_xla._XLAC._get_xla_tensors_hlo([out])


@pytest.mark.parametrize("k", [64, 72])
@pytest.mark.parametrize("quantize_activation", [False, True])
@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_canonical_form_keeps_the_weight_float8_up_to_the_dot(dtype, quantize_activation, k, xla_device):
    """parameter (f8) -> [slice] -> convert -> dot, scales after the dot; e4m3 W8A8 dots f8 with f8."""
    from xqpass.ops import xla_lowering

    gen = torch.Generator().manual_seed(7)
    w, scale = random_fp8((48, k), dtype, gen), torch.rand(3, -(-k // 32), generator=gen)
    with xla_lowering("canonical"):
        out = op(torch.randn(3, k, dtype=torch.bfloat16).to(xla_device), w.to(xla_device), scale.to(xla_device),
                 None, 32, False, quantize_activation, block_n=16)
    hlo = _hlo(out)
    f8 = "f8e4m3fn" if dtype == E4M3 else "f8e5m2"
    param = re.search(r"%(\S+) = " + f8 + rf"\[48,{k}\]\{{[\d,]*\}} parameter\(", hlo).group(1)
    assert not re.search(r"(f32|bf16)\[48,[\d,]+\]\{[\d,]*\} multiply", hlo)  # no scaled copy of the weight
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert len(dots) == (1 if k % 32 == 0 else 2), dots
    if quantize_activation and dtype == E4M3:
        assert all(re.search(r"dot\(f8e4m3fn\[[\d,]+\]\{[\d,]*\} %\S+, f8e4m3fn", d) for d in dots), dots
        return
    converts = dict(re.findall(r"%(\S+) = \w+\[[\d,]+\]\{[\d,]*\} convert\(" + f8 + r"\[[\d,]+\]\{[\d,]*\} %(\S+)\)", hlo))
    assert converts, hlo
    for name, operand in converts.items():  # the stored bytes (or a slice of them) convert, nothing between
        assert operand == param or re.search(rf"%{re.escape(operand)} = {f8}\[[\d,]+\]\{{[\d,]*\}} slice\(\S+ %{param}\)",
                                             hlo), (name, operand)
    assert not re.search(r"multiply\(" + f8, hlo)


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_xla_cpu_form_takes_the_stored_bytes(dtype, xla_device):
    """XLA:CPU: the graph's parameter is the float8 weight, converted inside the graph; no gathers."""
    gen = torch.Generator().manual_seed(8)
    w, scale = random_fp8((48, 200), dtype, gen), torch.rand(1, 2, generator=gen)
    for rows in (1, 40):
        out = op(torch.randn(rows, 200).to(xla_device), w.to(xla_device), scale.to(xla_device), None, 128,
                 block_n=128)
        hlo = _hlo(out)
        f8 = "f8e4m3fn" if dtype == E4M3 else "f8e5m2"
        assert re.search(f8 + r"\[48,200\]\{[\d,]*\} parameter\(", hlo), hlo
        assert " gather(" not in hlo and not re.search(r"s64\[[\d,]+\]\{[\d,]*\} parameter", hlo)


def test_compiled_openxla_one_graph_no_recompile(xla_device):
    import torch_xla
    import torch_xla.debug.metrics as met

    gen = torch.Generator().manual_seed(9)
    w, scale = random_fp8((24, 40), E4M3, gen).to(xla_device), torch.rand(2, 2, generator=gen).to(xla_device)

    def f(x):
        return op(x, w, scale, None, 32, False, True, block_n=16)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="openxla", fullgraph=True)
    compiled(torch.randn(3, 40).to(xla_device)).cpu()
    compiles = (met.metric_data("CompileTime") or [0])[0]
    x = torch.randn(3, 40)
    out = compiled(x.to(xla_device))
    torch_xla.sync()
    assert (met.metric_data("CompileTime") or [0])[0] == compiles
    assert_within(out.cpu(), *fp8_oracle(x, w.cpu(), scale.cpu(), 32, 16, True), "compiled")
