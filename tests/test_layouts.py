"""Layouts, int4 packing and round-to-nearest quantization against numpy / float64 oracles."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from oracle import np_pack_int4, np_unpack_int4
from xqpass.quant import (
    blockwise_to_per_channel,
    pack_int4,
    per_channel_to_blockwise,
    quantize_per_token,
    quantize_weight,
    unpack_int4,
)

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3)


@given(shapes, st.sampled_from([torch.int8, torch.uint8]), st.data())
def test_pack_unpack_round_trip_and_nibble_order(shape, dtype, data):
    axis = data.draw(st.integers(0, len(shape) - 1))
    shape[axis] *= 2
    lo, hi = (-8, 7) if dtype == torch.int8 else (0, 15)
    values = torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))))
    values = values.to(dtype)
    packed = pack_int4(values, axis)
    assert packed.dtype == dtype
    assert packed.shape[axis] * 2 == shape[axis]
    assert torch.equal(packed, np_pack_int4(values, axis))  # numpy oracle: low nibble = even index
    assert torch.equal(unpack_int4(packed, axis), values)
    assert np.array_equal(np_unpack_int4(packed, axis), values.numpy().astype(np.int64))


def test_nibble_order_by_hand():
    values = torch.tensor([[1, 2, -1, -8]], dtype=torch.int8)  # bytes 0x21 and 0x8f
    assert pack_int4(values).tolist() == [[0x21, 0x8F - 256]]
    assert pack_int4(torch.tensor([[15, 0, 3, 12]], dtype=torch.uint8)).tolist() == [[0x0F, 0xC3]]


def test_unpack_on_xla_matches_cpu(xla_device):
    every_byte = torch.arange(256, dtype=torch.int16).reshape(16, 16)
    for dtype in (torch.int8, torch.uint8):
        packed = (every_byte - (128 if dtype == torch.int8 else 0)).to(dtype)
        cpu = unpack_int4(packed, 1)
        assert torch.equal(unpack_int4(packed.to(xla_device), 1).cpu(), cpu)
        assert np.array_equal(cpu.numpy().astype(np.int64), np_unpack_int4(packed, 1))


@pytest.mark.parametrize("bad", [torch.tensor([[8, 0]], dtype=torch.int8), torch.tensor([[16, 0]], dtype=torch.uint8)])
def test_pack_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match="must lie in"):
        pack_int4(bad)


def test_pack_rejects_odd_and_float():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(TypeError, match="int8 or uint8"):
        pack_int4(torch.zeros(2, 4))


@given(st.integers(1, 5), st.integers(1, 4), st.integers(1, 5))
def test_blockwise_layout_round_trip(n, blocks, b):
    w = torch.arange(n * blocks * b).reshape(n, blocks * b)
    bw = per_channel_to_blockwise(w, b)
    assert bw.shape == (blocks, b, n)
    assert bw[1 % blocks, 0, n - 1] == w[n - 1, (1 % blocks) * b]  # block s holds features s*B ...
    assert torch.equal(blockwise_to_per_channel(bw), w)


@given(
    st.integers(1, 12),
    st.sampled_from([(-1, 1), (2, 1), (4, 3), (8, 2)]),
    st.sampled_from([8, 4]),
    st.booleans(),
    st.sampled_from([torch.float32, torch.bfloat16]),
    st.integers(0, 2**16),
    st.sampled_from(["seed", "rows"]),
)
def test_quantize_dequantize_error_bound(n, block_and_groups, bits, symmetric, dtype, seed, block_layout):
    block, groups = block_and_groups
    k = 2 * groups * (abs(block) if block > 0 else 3)
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    w[0, : k // 2] = 0  # a half-zero row; an all-zero group when blockwise
    qw = quantize_weight(w, bits, block, symmetric, block_layout=block_layout)
    assert qw.weight.dtype == (torch.int8 if symmetric else torch.uint8)
    assert qw.packed == (bits == 4)
    assert (qw.in_features, qw.out_features) == (k, n)
    # independent float64 oracle of the dequantized weight
    from oracle import dequantized

    deq, _ = dequantized(qw.weight, qw.scale, qw.zero_point, block, qw.packed)
    wd = w.double().numpy()
    s = qw.scale.double().numpy()
    by_rows = block != -1 and qw.weight.dim() == 2
    s_nk = np.repeat(s[:, None] if block == -1 else (s if by_rows else s.T), k if block == -1 else block, axis=1)
    assert (np.abs(deq - wd) <= s_nk * (0.5 + 1e-5) + 1e-12).all()
    assert np.allclose(deq, qw.dequantize(torch.float64).numpy(), rtol=1e-6, atol=1e-9)
    # the stored integers span the format's range
    vals = unpack_int4(qw.weight, 1) if qw.packed else qw.weight
    lo, hi = ((-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1))
    assert int(vals.min()) >= lo and int(vals.max()) <= hi
    if block != -1:
        assert (deq[0, : block] == 0).all()


def test_quantize_weight_rejects_bad_input():
    with pytest.raises(TypeError, match="floating"):
        quantize_weight(torch.zeros(4, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(torch.zeros(4, 4), bits=2)
    with pytest.raises(ValueError, match="divisor"):
        quantize_weight(torch.zeros(4, 6), block_size=4)
    with pytest.raises(ValueError, match="even"):
        quantize_weight(torch.zeros(4, 5), bits=4)


@given(st.integers(1, 4), st.integers(1, 40), st.integers(0, 999))
def test_quantize_per_token_bound(rows, k, seed):
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)) * 5
    x[0] = 0
    x_q, x_scale = quantize_per_token(x)
    assert x_q.dtype == torch.int8 and int(x_q.abs().max()) <= 127
    xd = x.double().numpy()
    amax = np.abs(xd).max(-1, keepdims=True)
    assert np.allclose(x_scale.double().numpy(), amax / 127, rtol=1e-6)
    assert (np.abs(x_q.double().numpy() * x_scale.double().numpy() - xd) <= amax / 254 * (1 + 1e-5) + 1e-12).all()
    assert (x_q[0] == 0).all() and x_scale[0].item() == 0


def test_quantize_per_token_nan_stays_in_scale():
    x = torch.tensor([[1.0, float("nan"), 2.0], [1.0, -2.0, 4.0]])
    x_q, x_scale = quantize_per_token(x)
    assert torch.isnan(x_scale[0]).all() and x_q[0].tolist() == [0, 0, 0]
    assert x_q[1].tolist() == [32, -64, 127]


# ----------------------------------------------------------------------------------------------
# Layout: the shapes of docs/ops.md's table, recognition, errors

from xqpass.quant import Layout  # noqa: E402
from xqpass.sharding import tensor_parallel_dims  # noqa: E402

N, K, B = 6, 32, 8
#: docs/ops.md, Layouts: (block_size, by_rows, packed) -> (w, scale / zero_point), written out by hand
DOCS_TABLE = {
    (-1, False, False): ((N, K), (N,)),
    (B, False, False): ((K // B, B, N), (K // B, N)),
    (-1, False, True): ((N, K // 2), (N,)),
    (B, False, True): ((K // B, B // 2, N), (K // B, N)),
    (B, True, False): ((N, K), (N, K // B)),
    (B, True, True): ((N, K // 2), (N, K // B)),
}


@pytest.mark.parametrize("args", sorted(DOCS_TABLE))
def test_layout_shapes_match_the_docs_and_are_recognised(args):
    layout = Layout(*args)
    w_shape, s_shape = DOCS_TABLE[args]
    assert layout.weight_shape(N, K) == w_shape and layout.scale_shape(N, K) == s_shape
    assert layout.features(w_shape) == (N, K)
    assert Layout.recognise(w_shape, layout.block_size, layout.packed) == layout
    assert Layout.of(layout.block_size, layout.packed, "rows" if layout.by_rows else "seed") == layout
    assert len(layout.weight_axes) == len(w_shape) and w_shape[layout.weight_axes.index("N")] == N
    assert len(layout.scale_axes) == len(s_shape) and s_shape[layout.scale_axes.index("N")] == N


@pytest.mark.parametrize("args", sorted(DOCS_TABLE))
def test_layout_arrange_and_dequantize_are_inverse(args):
    layout = Layout(*args)
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (N, K), generator=gen, dtype=torch.int8)
    groups = layout.num_groups(K)
    scale, zero = torch.rand(N, groups, generator=gen), torch.rand(N, groups, generator=gen)
    w, s, z = layout.arrange(q, scale, zero)
    assert tuple(w.shape) == DOCS_TABLE[args][0] and tuple(s.shape) == tuple(z.shape) == DOCS_TABLE[args][1]
    expected = (q.double().reshape(N, groups, -1) * scale.double()[..., None] - zero.double()[..., None]).reshape(N, K)
    assert torch.allclose(layout.dequantize(w, s, z, torch.float64), expected)
    assert torch.equal(layout.grouped_scale(s), scale) and torch.equal(layout.grouped_scale(z), zero)


def test_layout_k_unit_and_names():
    assert [Layout().k_unit, Layout(packed=True).k_unit, Layout(B).k_unit, Layout(B, True, True).k_unit] == [1, 2, B, B]
    assert [Layout().name, Layout(B).name, Layout(B, True).name] == ["per-channel", "blockwise", "blockwise by rows"]
    assert Layout.of(-1, False, "rows") == Layout()  # per-channel is stored by rows already


@pytest.mark.parametrize("args, message", [
    ((0,), r"block_size must be -1 \(per-channel\) or positive, got 0"),
    ((-2,), r"got -2"),
    ((-1, True), r"by rows needs a block_size"),
    ((3, False, True), r"packed int4 needs an even block_size, got 3"),
])
def test_layout_rejects_what_no_layout_is(args, message):
    with pytest.raises(ValueError, match=message):
        Layout(*args)


def test_recognise_rejects_ranks_no_layout_has():
    with pytest.raises(ValueError, match=r"per-channel w must be 2-D \[N, K\], got shape \(2, 4, 4\).*pass block_size"):
        Layout.recognise((2, 4, 4), -1, False)
    with pytest.raises(ValueError, match=r"blockwise w must be 3-D \[K/B, B/2, N\] or, by rows, 2-D \[N, K/2\]"):
        Layout.recognise((2, 2, 2, 4), 4, True)
    with pytest.raises(ValueError, match=r"got 0"):
        Layout.recognise((4, 8), 0, False)


#: docs/sharding.md, "What is split, per layout": style -> dims of weight, scale, zero_point, bias
SPLITS = {
    Layout(): {"column": (0, 0, 0, 0), "row": (1, None, None, None)},
    Layout(B): {"column": (2, 1, 1, 0), "row": (0, 0, 0, None)},
    Layout(B, True): {"column": (0, 0, 0, 0), "row": (1, 1, 1, None)},
}


@pytest.mark.parametrize("layout", list(SPLITS), ids=lambda layout: layout.name)
@pytest.mark.parametrize("style", ["column", "row"])
def test_tensor_parallel_dims_follow_the_layout(layout, style):
    dims = tensor_parallel_dims(style, layout)
    assert tuple(dims[key] for key in ("weight", "scale", "zero_point", "bias")) == SPLITS[layout][style]
