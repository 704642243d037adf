"""The op's CPU reference against an independent float64 oracle and against the seed's CPU reference."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from oracle import assert_within, dequantized, oracle
from xqpass.ops import quantized_matmul_reference
from xqpass.testing import strategies as xst

op = torch.ops.xq.quantized_matmul


@given(xst.op_cases())
def test_reference_matches_float64_oracle(case):
    """The CPU kernel (torch's int8 kernel where it applies) and the readable reference, both."""
    kw = case.op_kwargs()
    expected, allowance = oracle(case.x, **kw)
    for out in (op(case.x, **kw), quantized_matmul_reference(case.x, **kw)):
        assert out.dtype == case.x.dtype
        assert out.shape == (*case.x.shape[:-1], case.weight.out_features)
        assert_within(out, expected, allowance, case.fmt.name)


def test_cpu_kernel_uses_torch_int8_kernel_for_symmetric_int8():
    from xqpass.ops.cpu import int8pack_applies

    w = torch.zeros(4, 16, dtype=torch.int8)
    assert int8pack_applies(torch.zeros(2, 16, dtype=torch.bfloat16), w, None, -1, False, False, False)
    assert not int8pack_applies(torch.zeros(2, 16), w, torch.zeros(4), -1, False, False, False)  # asym
    assert not int8pack_applies(torch.zeros(2, 16), w.view(torch.uint8), None, -1, False, False, False)
    assert not int8pack_applies(torch.zeros(2, 16, dtype=torch.float64), w, None, -1, False, False, False)
    assert not int8pack_applies(torch.zeros(0, 16), w, None, -1, False, False, False)  # empty
    w7 = torch.zeros(4, 7, dtype=torch.int8)  # K % 8 != 0: wrong or a crash under AVX2 / AVX-512
    assert not int8pack_applies(torch.zeros(2, 7), w7, None, -1, False, False, False)
    w24 = torch.zeros(4, 24, dtype=torch.int8)  # K % 16 == 8: AVX-512's bfloat16 variant is wrong
    assert not int8pack_applies(torch.zeros(2, 24, dtype=torch.bfloat16), w24, None, -1, False, False, False)
    assert int8pack_applies(torch.zeros(2, 24, dtype=torch.float16), w24, None, -1, False, False, False)
    assert int8pack_applies(torch.zeros(2, 24), w24, None, -1, False, False, False)
    # float32 / float16 variants read the whole weight once a row: past 2 rows the reference is faster
    assert not int8pack_applies(torch.zeros(3, 16), w, None, -1, False, False, False)
    assert int8pack_applies(torch.zeros(64, 16, dtype=torch.bfloat16), w, None, -1, False, False, False)


def test_cpu_fast_path_sees_every_change_of_the_scale():
    """The fast path keeps the scale converted to x's dtype while the scale's data stays the same: a
    change in place, a new tensor under the same module attribute and `.data` replaced all show."""
    op, gen = torch.ops.xq.quantized_matmul, torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (8, 32), generator=gen, dtype=torch.int8)
    x = torch.randn(2, 32, generator=gen).to(torch.bfloat16)
    scale = torch.rand(8, generator=gen) / 64

    def expected():  # a stale scale is off by 2x or more; 2**-6 covers the kernel's bfloat16 roundings
        return (x.double() @ (w.double() * scale.double()[:, None]).t()).to(torch.bfloat16)

    def close(out, want):
        return torch.allclose(out.float(), want.float(), rtol=2**-6, atol=1e-3)

    assert close(op(x, w, scale), expected())
    scale.mul_(2)
    assert close(op(x, w, scale), expected())
    scale.data = torch.rand(8, generator=gen) / 64
    assert close(op(x, w, scale), expected())
    scale = scale.clone() * 3
    assert close(op(x, w, scale), expected())
    with torch.inference_mode():
        assert close(op(x, w, torch.ones(8) / 64), (x.double() @ w.double().t() / 64).to(torch.bfloat16))


@given(xst.op_cases(x_dtypes=(torch.float64,), formats=xst.weight_formats(quantize_activation=(False,))))
def test_reference_float64_is_float64_accurate(case):
    kw = case.op_kwargs()
    expected, _ = oracle(case.x, **kw)
    got = op(case.x, **kw).numpy()
    assert abs(got - expected).max() <= 1e-12 * max(1.0, abs(expected).max())


def test_w8a8_integer_part_is_exact():
    """With x already on the int8 grid, W8A8 equals the integer dot times the scales, bit for bit in f64."""
    g = torch.Generator().manual_seed(1)
    x_int = torch.randint(-127, 128, (3, 64), generator=g)
    x_int[:, 0] = 127  # amax = 127 -> x_scale = 1
    w = torch.randint(-128, 128, (5, 64), generator=g, dtype=torch.int16).to(torch.int8)
    scale = torch.rand(5, generator=g, dtype=torch.float64)
    out = op(x_int.double(), w, scale, quantize_activation=True)
    exact = (x_int.long() @ w.long().t()).double() * scale
    assert torch.equal(out, exact)


def test_large_k_int32_accumulation_no_overflow():
    """K = 100_000 of 127 * -128 products: 1.6e9, near int32's 2.1e9, still exact."""
    k = 100_000
    x = torch.full((1, k), 127.0, dtype=torch.float64)
    w = torch.full((2, k), -128, dtype=torch.int8)
    out = op(x, w, torch.ones(2, dtype=torch.float64), quantize_activation=True)
    assert out.tolist() == [[-127.0 * 128 * k] * 2]


def _seed_op():
    import torch_xla.experimental.xla_quantized_matmul  # noqa: F401  (defines torch.ops.xla.quantized_matmul)

    return torch.ops.xla.quantized_matmul


# The seed's rows that its CPU reference computes (int4 only in its one-value-a-byte container).
seed_formats = st.sampled_from(
    [
        xst.WeightFormat(8, -1, True, False, False),
        xst.WeightFormat(8, -1, False, False, False),
        xst.WeightFormat(8, 8, True, False, False),
        xst.WeightFormat(8, 16, False, False, False),
        xst.WeightFormat(4, -1, True, False, False),
        xst.WeightFormat(4, 8, True, False, False),
        xst.WeightFormat(8, -1, True, False, True),
    ]
)


@given(xst.op_cases(formats=seed_formats, x_dtypes=(torch.float32,)))
def test_reference_matches_seed_cpu_reference(case):
    """torch_xla 2.9's own CPU reference is an oracle for the rows it supports (int8 container)."""
    kw = case.op_kwargs()
    w = kw["w"]
    if w.dtype == torch.uint8:  # the seed takes int8 only: shift to int8, fold 128 * scale into the zero point
        w = (w.to(torch.int16) - 128).to(torch.int8)
        kw = dict(kw, zero_point=kw["zero_point"] - 128 * kw["scale"])
    seed = _seed_op()(
        case.x, w, kw["scale"], kw["zero_point"], kw["block_size"], kw["int4_weight"], kw["quantize_activation"]
    )
    ours = op(case.x, **case.op_kwargs())
    _, allowance = oracle(case.x, **case.op_kwargs())
    ref = seed.double().numpy()
    assert_within(ours, ref, 2 * allowance if not case.fmt.quantize_activation else 1e-5 * abs(ref).max() + 1e-6, case.fmt.name)


@pytest.mark.parametrize("packed", [False, True])
def test_nan_in_x_propagates_to_its_rows_only(packed):
    for qa in (False, True):
        for block in (-1, 4):
            fmt = xst.WeightFormat(4 if packed else 8, block, False, packed, qa)
            qw = xst.random_quantized_weight(fmt, 5, 8, seed=3)
            x = torch.randn(3, 8)
            x[1, 2] = float("nan")
            out = op(x, quantize_activation=qa, **qw.op_kwargs())
            assert torch.isnan(out[1]).all(), fmt.name
            assert torch.isfinite(out[[0, 2]]).all(), fmt.name


def test_inf_in_x_matches_oracle_nonfinite_pattern():
    fmt = xst.WeightFormat(8, -1, True, False, False)
    qw = xst.random_quantized_weight(fmt, 6, 8, seed=4)
    x = torch.randn(2, 8, dtype=torch.float64)
    x[0, 3] = float("inf")
    out = op(x, **qw.op_kwargs())
    expected, _ = oracle(x, **qw.op_kwargs())
    assert torch.equal(torch.from_numpy(expected).isposinf(), out.isposinf())
    assert torch.equal(torch.from_numpy(expected).isneginf(), out.isneginf())
    assert torch.isfinite(out[1]).all()


def test_zero_rows_and_empty_batch():
    qw = xst.random_quantized_weight(xst.WeightFormat(8, -1, True, False, True), 4, 6, seed=5)
    assert op(torch.zeros(2, 6), quantize_activation=True, **qw.op_kwargs()).abs().max() == 0
    assert op(torch.zeros(0, 6), **qw.op_kwargs()).shape == (0, 4)


def test_gradient_wrt_x_matches_dequantized_linear():
    qw = xst.random_quantized_weight(xst.WeightFormat(4, 4, False, True, False), 5, 8, seed=6)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    op(x, **qw.op_kwargs()).sum().backward()
    w_deq = torch.from_numpy(dequantized(qw.weight, qw.scale, qw.zero_point, 4, True)[0])
    assert torch.allclose(x.grad, w_deq.sum(0).expand(3, 8), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("block", [-1, 4])
def test_bias_is_added_and_gets_its_gradient(block):
    fmt = xst.WeightFormat(8, block, False, False, False)
    qw = xst.random_quantized_weight(fmt, 5, 8, seed=11)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    out = op(x, qw.weight, qw.scale, qw.zero_point, block, False, False, bias)
    expected, _ = oracle(x.detach(), **qw.op_kwargs())
    assert torch.allclose(out.detach(), torch.from_numpy(expected) + bias.detach(), rtol=1e-10, atol=1e-12)
    out.sum().backward()
    assert torch.equal(bias.grad, torch.full((5,), 6.0, dtype=torch.float64))
    assert x.grad.shape == x.shape
