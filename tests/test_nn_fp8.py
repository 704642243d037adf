"""Float8 weights from quantize_weight / XlaQuantizedLinear / quantize_model (weight_dtype, block_n), against
a float64 oracle written here: the e4m3 / e5m2 grids decoded from the formats' bit layouts, scale = amax /
fmax a channel, tensor, group or 2-D block, round to nearest (ties to even); W8A8-FP8 activations e4m3
per token. And the sharding check that keeps whole 2-D blocks on a device."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from xqpass import XlaQuantizedLinear, quantize_model
from xqpass.quant import quantize_weight
from xqpass.sharding import linear_partition_specs

# (exponent bits, mantissa bits, bias, largest finite) of each format
FORMATS = {torch.float8_e4m3fn: (4, 3, 7, 448.0), torch.float8_e5m2: (5, 2, 15, 57344.0)}


def grid(dtype) -> np.ndarray:
    """Every finite non-negative value of the format, ascending, decoded from its bits."""
    e_bits, m_bits, bias, fmax = FORMATS[dtype]
    values = []
    for e in range(2**e_bits):
        for m in range(2**m_bits):
            v = m / 2**m_bits * 2.0 ** (1 - bias) if e == 0 else (1 + m / 2**m_bits) * 2.0 ** (e - bias)
            if v <= fmax:
                values.append(v)
    return np.array(sorted(set(values)))


def round_to_grid(x: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Nearest grid value (ties: the even mantissa, i.e. the even index) of float64 ``x`` clamped to the
    format's range, and whether ``x`` lies within 2^-20 (relative) of a midpoint (a double rounding there
    may take either neighbour)."""
    g = grid(dtype)
    a = np.minimum(np.abs(x), g[-1])
    hi = np.clip(np.searchsorted(g, a), 1, len(g) - 1)
    lo = hi - 1
    d_lo, d_hi = a - g[lo], g[hi] - a
    pick = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    near_tie = np.abs(d_lo - d_hi) <= 2.0**-20 * np.maximum(a, g[1])
    return np.sign(x) * g[pick], near_tie


def oracle_quantize(w: np.ndarray, dtype, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64: the scale of each ``rows x cols`` block (partial at the ends) as float32 stores it, the
    dequantized weight, and the near-tie mask."""
    n, k = w.shape
    fmax = FORMATS[dtype][3]
    br, bc = -(-n // rows), -(-k // cols)
    scale = np.zeros((br, bc))
    for i in range(br):
        for j in range(bc):
            scale[i, j] = np.abs(w[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols]).max() / fmax
    scale = scale.astype(np.float32).astype(np.float64)
    full = np.repeat(np.repeat(scale, rows, 0), cols, 1)[:n, :k]
    safe = np.where(full == 0, 1.0, full)
    q, near_tie = round_to_grid(w / safe, dtype)
    return scale, q * full, near_tie


LAYOUTS = {  # name -> (block_size, block_n, rows, cols of one scale's block)
    "per-channel": lambda n, k: (-1, 1, 1, k),
    "per-tensor": lambda n, k: (-1, -1, n, k),
    "2-D 128x128": lambda n, k: (128, 128, 128, 128),
    "2-D 16x32": lambda n, k: (32, 16, 16, 32),
    "groups of 16": lambda n, k: (16, 1, 1, 16),
}


@settings(max_examples=25, deadline=None)
@given(layout=st.sampled_from(sorted(LAYOUTS)), dtype=st.sampled_from(list(FORMATS)),
       n=st.sampled_from([1, 16, 40, 130]), k=st.sampled_from([32, 96, 160, 272]), seed=st.integers(0, 2**16),
       zero_block=st.booleans())
def test_quantize_weight_float8_is_round_to_nearest_of_amax_over_fmax(layout, dtype, n, k, seed, zero_block):
    block_size, block_n, rows, cols = LAYOUTS[layout](n, k)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 3
    if zero_block:
        w[: min(rows, n), : min(cols, k)] = 0  # an all-zero block: scale 0, dequantizes to 0
    qw = quantize_weight(w, weight_dtype=dtype, block_size=block_size, block_n=block_n, block_layout="rows")
    assert qw.weight.dtype == dtype and tuple(qw.weight.shape) == (n, k) and qw.zero_point is None
    scale, expected, near_tie = oracle_quantize(w.double().numpy(), dtype, rows, cols)
    assert np.array_equal(qw.scale.double().numpy().reshape(scale.shape), scale)
    got = qw.dequantize(torch.float64).numpy()
    assert np.all((got == expected) | near_tie), np.abs(got - expected).max()
    if zero_block:
        assert not got[: min(rows, n), : min(cols, k)].any()


@pytest.mark.parametrize("quantize_activation", [False, True], ids=["W8A16-FP8", "W8A8-FP8"])
@pytest.mark.parametrize("layout", ["per-channel", "2-D 128x128", "per-tensor"])
def test_from_float_computes_the_float64_oracle(layout, quantize_activation):
    torch.manual_seed(0)
    linear = nn.Linear(200, 136)
    block_size, block_n, rows, cols = LAYOUTS[layout](136, 200)
    q = XlaQuantizedLinear.from_float(linear, quantize_activation=quantize_activation, weight_dtype=torch.float8_e4m3fn,
                                      block_size=block_size, block_n=block_n)
    assert q.weight.dtype == torch.float8_e4m3fn and q.block_n == block_n and q.zero_point is None
    _, w_deq, near_tie = oracle_quantize(linear.weight.detach().double().numpy(), torch.float8_e4m3fn, rows, cols)
    assert not near_tie.any()
    x = torch.randn(5, 200)
    xd = x.double().numpy()
    if quantize_activation:  # e4m3 per token, x_scale = amax / 448 (float32, as x)
        x_scale = (np.abs(xd).max(-1, keepdims=True) / 448).astype(np.float32).astype(np.float64)
        x_q, tie = round_to_grid(xd / x_scale, torch.float8_e4m3fn)
        assert not tie.any()
        xd = x_q * x_scale
    expected = xd @ w_deq.T + linear.bias.detach().double().numpy()
    with torch.no_grad():
        out = q(x).double().numpy()
    assert np.allclose(out, expected, rtol=1e-5, atol=1e-4), np.abs(out - expected).max()


def test_quantize_model_float8_blocks_report_and_all_or_nothing():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 64))
    model, report = quantize_model(model, weight_dtype=torch.float8_e4m3fn, block_size=128, block_n=128,
                                   return_report=True)
    assert report.format == "W8A16-FP8 float8_e4m3fn 2-D blocks(128x128)" and len(report.quantized) == 2
    assert tuple(model[0].weight_scaler.shape) == (2, 3) and tuple(model[2].weight_scaler.shape) == (1, 2)
    bad = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 8))
    with torch.no_grad():
        bad[1].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"quantize_model: '1': weight has 1 non-finite"):
        quantize_model(bad, weight_dtype=torch.float8_e4m3fn)
    assert all(type(m) is nn.Linear for m in bad)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(weight_dtype=torch.float8_e4m3fn, bits=4), ValueError, r"float8 weights are 8 bits"),
    (dict(weight_dtype=torch.float8_e4m3fn, symmetric=False), ValueError, r"symmetric must be True"),
    (dict(weight_dtype=torch.float8_e4m3fn, packed=True), ValueError, r"packed must be None or False"),
    (dict(weight_dtype=torch.int8), TypeError, r"weight_dtype must be None .* or torch.float8_e4m3fn"),
    (dict(weight_dtype=torch.float8_e4m3fn, block_n=128), ValueError, r"2-D blocks \(block_n=128\) need a block_size"),
    (dict(weight_dtype=torch.float8_e4m3fn, block_n=-1, block_size=32), ValueError, r"per-tensor .* block_size must be -1"),
    (dict(weight_dtype=torch.float8_e4m3fn, block_n=0), ValueError, r"block_n must be 1"),
    (dict(block_n=128, block_size=32), ValueError, r"block_n=128 .* is for float8 weights"),
])
def test_float8_format_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        quantize_weight(torch.randn(16, 64), **kwargs)
    model = nn.Sequential(nn.Linear(64, 16))
    with pytest.raises(error, match=message):
        quantize_model(model, **kwargs)
    assert type(model[0]) is nn.Linear


def test_a_column_split_keeps_whole_2d_blocks_on_a_device():
    q = XlaQuantizedLinear.from_float(nn.Linear(256, 512), weight_dtype=torch.float8_e4m3fn, block_size=128,
                                      block_n=128)
    specs = linear_partition_specs("proj", q, "column", "model", 4)  # 128 rows a device: one block each
    assert specs["weight"] == ("model", None) and specs["weight_scaler"] == ("model", None)
    with pytest.raises(ValueError, match=r"proj: column-parallel over 8 devices would split a 2-D block of 128 "
                                         r"output features .* 64 output features a device"):
        linear_partition_specs("proj", q, "column", "model", 8)
    with pytest.raises(ValueError, match=r"row-parallel over 4 devices would split a block of 128"):
        linear_partition_specs("proj", q, "row", "model", 4)
    assert linear_partition_specs("proj", q, "row", "model", 2)["weight_scaler"] == (None, "model")
    per_tensor = XlaQuantizedLinear.from_float(nn.Linear(256, 512), weight_dtype=torch.float8_e4m3fn, block_n=-1)
    assert "weight_scaler" not in linear_partition_specs("proj", per_tensor, "column", "model", 8)  # 0-d: whole
