"""A differential net over the public API: the op and ``XlaQuantizedLinear`` on CPU and on XLA, against
the float64 oracle, over shapes that include the edges where kernels go wrong (K % 16 == 8 and other K
around multiples of 8/16/32, N = 1, empty and 1-D activations), every activation dtype and every format.
"""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oracle import assert_within, oracle
from xqpass import XlaQuantizedLinear
from xqpass.testing import strategies as xst

op = torch.ops.xq.quantized_matmul
X_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: K of per-channel formats: the edges around multiples of 8, 16 and 32, and any small K
EDGE_K = st.one_of(st.sampled_from([1, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 40, 56, 64, 72]), st.integers(1, 80))
#: half the cases in the format CPU kernels take fast paths for (symmetric per-channel int8, 16-bit or
#: 32-bit activations), half in any format
FORMATS = st.one_of(st.just(xst.WeightFormat(bits=8, block_size=-1, symmetric=True, packed=False,
                                             quantize_activation=False)), xst.weight_formats())
edge_cases = xst.op_cases(formats=FORMATS, x_dtypes=X_DTYPES, in_features=EDGE_K, min_rows=0)


def _on(device, tensors: dict) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}


def _check(out, case, kw, what, bias=None):
    assert out.dtype == case.x.dtype, what
    assert tuple(out.shape) == (*case.x.shape[:-1], case.weight.out_features), what
    expected, allowance = oracle(case.x, **kw, roundings=2)  # a fast or device form may round twice
    if bias is not None:
        expected = expected + bias.double().numpy()
        allowance = allowance + abs(expected) * 2 * 2.0**-8  # the rounding of the larger sum
    assert_within(out, expected, allowance, f"{what} {case.fmt.name} x {case.x.dtype} {tuple(case.x.shape)}")


@settings(max_examples=200)
@given(case=edge_cases, n1=st.booleans())
def test_op_on_cpu_and_xla_matches_the_oracle(case, n1, xla_device):
    kw = case.op_kwargs()
    if n1:  # N = 1: keep one output feature of the drawn weight in its layout
        case = _one_output(case)
        kw = case.op_kwargs()
    _check(op(case.x, **kw), case, kw, "cpu")
    _check(op(case.x.to(xla_device), **_on(xla_device, kw)).cpu(), case, kw, "xla")


@settings(max_examples=30)
@given(case=edge_cases, with_bias=st.booleans())
def test_module_on_cpu_and_xla_matches_the_oracle(case, with_bias, xla_device):
    w = case.weight
    layer = XlaQuantizedLinear(case.x.shape[-1], w.out_features, is_symmetric=w.zero_point is None,
                               block_size=w.block_size, int4_weight=w.int4_weight,
                               quantize_activation=case.fmt.quantize_activation, packed=w.packed, bias=with_bias,
                               weight_dtype=w.weight.dtype, block_layout="rows" if case.fmt.by_rows else "seed")
    layer.load_quantized_weight(w.weight, w.scale, w.zero_point)
    bias = None
    if with_bias:
        bias = torch.randn(w.out_features)
        layer.bias = torch.nn.Parameter(bias)
    kw = case.op_kwargs()
    with torch.no_grad():
        _check(layer(case.x), case, kw, "module cpu", bias)
        _check(layer.to(xla_device)(case.x.to(xla_device)).cpu(), case, kw, "module xla", bias)


def _one_output(case):
    """``case`` with only its weight's first output feature (N = 1), in the same layout: N is the last
    dim of the seed's blockwise tensors ([K/B, B, N], [K/B, N]) and the first of the others."""
    w = case.weight
    last = w.weight.dim() == 3

    def keep(t):
        return None if t is None else t.narrow(t.dim() - 1 if last else 0, 0, 1).contiguous()

    weight = type(w)(keep(w.weight), keep(w.scale), keep(w.zero_point), w.block_size, w.int4_weight, w.packed)
    return xst.OpCase(case.x, weight, case.fmt)
