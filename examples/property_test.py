"""Property-test your own dequantize -> matmul module with xqpass's hypothesis strategies.

    python examples/property_test.py          # or: pytest examples/property_test.py

``MyInt8Linear`` stands for a layer your quantization code writes. For every weight the strategy draws
(raw integers over int8's whole range, scales over two decades, odd and even sizes, 1-3-D activations,
float32 and bfloat16), two properties must hold: the pass rewrites the layer into exactly one
``xq.quantized_matmul``, and the rewritten layer is as accurate as your own code against the float64
value of the same weights. Hypothesis shrinks any failure to a smallest example.
"""
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import xqpass
from xqpass.testing import strategies as xst


class MyInt8Linear(nn.Module):
    """Your layer: int8 weight [N, K], one scale per output channel, dequantized in forward."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    def forward(self, x):
        return F.linear(x, self.qweight.to(x.dtype) * self.scale.to(x.dtype)[:, None])


#: the format of the layer above: int8 symmetric, per channel, 16/32-bit activations
MY_FORMAT = xst.WeightFormat(bits=8, block_size=-1, symmetric=True, packed=False, quantize_activation=False)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(case=xst.op_cases(formats=st.just(MY_FORMAT)))
def test_my_layer_is_rewritten_and_stays_accurate(case):
    layer = MyInt8Linear(case.weight.weight, case.weight.scale).eval()
    x = case.x
    exported = torch.export.export(layer, (x,))
    report = xqpass.rewrite(exported)
    assert len(report.rewrites) == 1, str(report)

    with torch.no_grad():
        got = exported.module()(x).double()
        mine = layer(x).double()
    # the float64 value of the same weights: your layer's own rounding bounds what the rewrite may differ by
    exact = F.linear(x.double(), case.weight.weight.double() * case.weight.scale.double()[:, None])
    scale = exact.abs().max().item() + 1e-30
    err_mine = (mine - exact).abs().max().item()
    err_rewritten = (got - exact).abs().max().item()
    eps = torch.finfo(x.dtype).eps
    assert err_rewritten <= 4 * max(err_mine, eps * scale) + 1e-6 * scale, (err_rewritten, err_mine)


if __name__ == "__main__":
    test_my_layer_is_rewritten_and_stays_accurate()
    print("MyInt8Linear: rewritten into xq.quantized_matmul and as accurate as the original on every drawn case")
