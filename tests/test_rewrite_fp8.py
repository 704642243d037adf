"""The pass on float8 dequantization forms: per-tensor, per-channel, a scale stored inverted, and 2-D blocks
(DeepSeek style) spelled as ``[N/b, b, K/b, b]`` views or as ``repeat_interleave`` along both axes. The oracle
is each module's own forward in float64 (its float8 bytes converted exactly, scales in float64)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from xqpass.backend import make_backend

FORMS = ("tensor", "channel", "inverse", "blocks as views", "blocks repeated")
EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}


class Float8Linear(nn.Module):
    def __init__(self, form, n, k, block, dtype=torch.float8_e4m3fn, seed=0, zero=False):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.form, self.block, self.zero = form, block, zero
        limit = 400.0 if dtype == torch.float8_e4m3fn else 5e4
        self.register_buffer("weight", (torch.randn(n, k, generator=gen) * limit / 4).clamp(-limit, limit).to(dtype))
        shape = {"tensor": (), "channel": (n, 1), "inverse": (n, 1)}.get(form, (n // block, k // block))
        self.register_buffer("scale", torch.rand(shape, generator=gen) / 100 + 1e-3)

    def forward(self, x):
        n, k, b = *self.weight.shape, self.block
        w, s = self.weight.to(x.dtype), self.scale.to(x.dtype)
        if self.zero:
            w = w - 1.0
        if self.form == "inverse":
            return F.linear(x, w / s)
        if self.form == "blocks as views":
            return F.linear(x, (w.view(n // b, b, k // b, b) * s[:, None, :, None]).view(n, k))
        if self.form == "blocks repeated":
            return F.linear(x, w * s.repeat_interleave(b, 0).repeat_interleave(b, 1))
        return F.linear(x, w * s)


def in_float64(module, x):
    return copy.deepcopy(module).cpu().double()(x.cpu().double())


def compile_eager(module, x):
    reports = []
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(module, backend=make_backend("eager", reports=reports), fullgraph=True)(x)
    return out, [r for rep in reports for r in rep.rewrites], reports


@settings(max_examples=20)
@given(form=st.sampled_from(FORMS), blocks_n=st.integers(1, 3), blocks_k=st.integers(1, 3),
       block=st.sampled_from([8, 16]), fp8=st.sampled_from([torch.float8_e4m3fn, torch.float8_e5m2]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), rows=st.integers(1, 4), seed=st.integers(0, 99))
def test_float8_forms_are_rewritten_with_the_same_output(form, blocks_n, blocks_k, block, fp8, dtype, rows, seed):
    n, k = blocks_n * block, blocks_k * block
    module = Float8Linear(form, n, k, block, fp8, seed)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    out, rewrites, reports = compile_eager(module, x)
    assert len(rewrites) == 1, "\n".join(map(str, reports))
    fmt = rewrites[0].format
    assert fmt["weight_dtype"] == str(fp8).removeprefix("torch.") and not fmt["zero_point"]
    if form == "blocks as views" and blocks_n > 1:  # the op's own 2-D blocks (one block row: groups along K)
        assert (fmt["block_n"], fmt["block_size"]) == (block, block if blocks_k > 1 else k)
    with torch.no_grad():
        exact = in_float64(module, x)
        original = (module(x).double() - exact).abs().max().item()
    err, scale = (out.double() - exact).abs().max().item(), exact.abs().max().item()
    assert err <= 4 * max(original, EPS[dtype] * scale) + 1e-6 * scale, (err, original, scale)


def test_float8_blocks_on_xla_with_xq_openxla():
    import torch_xla

    device = torch_xla.device()
    module = Float8Linear("blocks as views", 256, 384, 128, seed=3)
    x = torch.randn(2, 384, dtype=torch.bfloat16)
    with torch.no_grad():
        exact = in_float64(module, x)
        reports = []
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(module).to(device), backend=make_backend("openxla", reports=reports))
        out = compiled(x.to(device)).cpu()
    assert [r.format["block_n"] for rep in reports for r in rep.rewrites] == [128]
    err = ((out.double() - exact).abs().max() / exact.abs().max()).item()
    assert err < 2 * EPS[torch.bfloat16], err


def test_a_zero_point_with_a_float8_weight_is_a_near_miss():
    module = Float8Linear("channel", 16, 32, 16, zero=True)
    x = torch.randn(2, 32)
    out, rewrites, reports = compile_eager(module, x)
    assert not rewrites
    assert any("zero point with a torch.float8_e4m3fn weight" in m.reason for rep in reports for m in rep.misses), \
        "\n".join(map(str, reports))
    with torch.no_grad():
        assert torch.equal(out, module(x))


def test_torchao_float8_weight_only_is_rewritten():
    """torchao's Float8WeightOnlyConfig (a weight subclass: e4m3 per-channel, flattened at the aten level)
    becomes the op with its float8 weight, matching torchao's own forward within bfloat16 rounding."""
    quantization = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).to(torch.bfloat16).eval()
    quantization.quantize_(model, quantization.Float8WeightOnlyConfig())
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x).float()
    reports = []
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=make_backend("eager", reports=reports))(x).float()
    rewrites = [r for rep in reports for r in rep.rewrites]
    assert [r.format["weight_dtype"] for r in rewrites] == ["float8_e4m3fn"] * 2, "\n".join(map(str, reports))
    eps = EPS[torch.bfloat16]
    torch.testing.assert_close(out, ref, rtol=4 * eps, atol=4 * eps * ref.abs().max().item())
