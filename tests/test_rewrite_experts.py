"""The pass on mixture-of-experts code: an expert bank's weights gathered by the router's ids and multiplied
with einsum (gpt-fast's int8 Mixtral, written from its published ConditionalFeedForwardInt8) become one
``xq.quantized_grouped_matmul`` per bank. The oracle is the module's own forward in float64."""
import copy

import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from xqpass.backend import make_backend

EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}


class GptFastInt8Experts(nn.Module):
    """gpt-fast's int8 Mixtral experts: int8 banks cast, gathered by ids [T, A], einsum, then scales[ids]; the
    down projection takes a row per (token, slot)."""

    def __init__(self, experts, dim, hidden, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for name, shape in (("w1", (experts, hidden, dim)), ("w3", (experts, hidden, dim)), ("w2", (experts, dim, hidden))):
            self.register_buffer(name, torch.randint(-127, 128, shape, generator=g, dtype=torch.int8))
        for name, rows in (("scales1", hidden), ("scales3", hidden), ("scales2", dim)):
            self.register_buffer(name, torch.rand(experts, rows, generator=g) / 500 + 1e-4)

    def forward(self, x, expert_indices):
        w1, w3, w2 = (w.to(x.dtype)[expert_indices] for w in (self.w1, self.w3, self.w2))
        x1 = F.silu(torch.einsum("ti,taoi -> tao", x, w1) * self.scales1[expert_indices].to(x.dtype))
        x3 = torch.einsum("ti, taoi -> tao", x, w3) * self.scales3[expert_indices].to(x.dtype)
        return torch.einsum("tao, taio -> tai", x1 * x3, w2) * self.scales2[expert_indices].to(x.dtype)


class DequantizedBank(nn.Module):
    """A bank dequantized whole (asymmetric uint8, per expert and channel), then gathered by ids [T]."""

    def __init__(self, experts, dim, out, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("qweight", torch.randint(0, 256, (experts, out, dim), generator=g, dtype=torch.uint8))
        self.register_buffer("scale", torch.rand(experts, out, 1, generator=g) / 500 + 1e-4)
        self.register_buffer("zero", torch.randint(100, 156, (experts, out, 1), generator=g).float())

    def forward(self, x, expert_ids):
        bank = (self.qweight.to(x.dtype) - self.zero.to(x.dtype)) * self.scale.to(x.dtype)
        return torch.einsum("tk,tnk->tn", x, bank[expert_ids])


def run(module, x, ids, compiler="eager"):
    reports = []
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(module, backend=make_backend(compiler, reports=reports), fullgraph=True)(x, ids)
    return out, [r for rep in reports for r in rep.rewrites], reports


def assert_close_to_float64(module, x, ids, out):
    with torch.no_grad():
        exact = copy.deepcopy(module).cpu().double()(x.cpu().double(), ids.cpu())
        original = (module(x, ids).cpu().double() - exact).abs().max().item()
    err, scale = (out.cpu().double() - exact).abs().max().item(), exact.abs().max().item()
    assert err <= 4 * max(original, EPS[x.dtype] * scale) + 1e-6 * scale + 1e-9, (err, original, scale)


@settings(max_examples=15)
@given(experts=st.integers(1, 6), top_k=st.integers(1, 3), tokens=st.integers(1, 7),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 99))
def test_gpt_fast_experts_are_one_grouped_op_per_bank(experts, top_k, tokens, dtype, seed):
    module = GptFastInt8Experts(experts, 32, 48, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 32, generator=gen).to(dtype)
    ids = torch.randint(0, experts, (tokens, top_k), generator=gen)  # experts without a token included
    out, rewrites, reports = run(module, x, ids)
    assert len(rewrites) == 3 and all(r.format["experts"] == experts for r in rewrites), "\n".join(map(str, reports))
    assert_close_to_float64(module, x, ids, out)


@settings(max_examples=10)
@given(experts=st.integers(1, 5), tokens=st.integers(1, 6), seed=st.integers(0, 99))
def test_a_bank_dequantized_whole_then_gathered(experts, tokens, seed):
    module = DequantizedBank(experts, 24, 16, seed)
    gen = torch.Generator().manual_seed(seed)
    x, ids = torch.randn(tokens, 24, generator=gen), torch.randint(0, experts, (tokens,), generator=gen)
    out, rewrites, reports = run(module, x, ids)
    assert [r.format["zero_point"] for r in rewrites] == [True], "\n".join(map(str, reports))
    assert_close_to_float64(module, x, ids, out)


def test_experts_on_xla_with_xq_openxla():
    import torch_xla

    device = torch_xla.device()
    module = GptFastInt8Experts(4, 64, 96, seed=1)
    x, ids = torch.randn(3, 64), torch.tensor([[0, 2], [3, 3], [1, 0]])
    out, rewrites, reports = run(copy.deepcopy(module).to(device), x.to(device), ids.to(device), "openxla")
    assert len(rewrites) == 3, "\n".join(map(str, reports))
    assert_close_to_float64(module, x, ids, out.cpu())


class KByN(GptFastInt8Experts):
    """A bank stored [E, K, N] and contracted on its middle axis: not the op's [E, N, K]."""

    def forward(self, x, expert_indices):
        w1 = self.w1.to(x.dtype)[expert_indices]  # [T, A, 48, 32], contracted on the 48
        return torch.einsum("to,taoi->tai", x, w1)


class OtherIds(GptFastInt8Experts):
    """The scale gathered by other ids than the weight: the product alone is the bank's, the scale stays."""

    def forward(self, x, expert_indices):
        w1 = self.w1.to(x.dtype)[expert_indices]
        return torch.einsum("ti,taoi->tao", x, w1) * self.scales1[expert_indices.flip(-1)]


def test_a_bank_contracted_on_its_middle_axis_is_a_near_miss():
    module, ids = KByN(3, 32, 48), torch.tensor([[0, 1], [1, 1], [2, 0]])
    x = torch.randn(3, 48)
    out, rewrites, reports = run(module, x, ids)
    assert not rewrites
    assert any("not a product with gathered expert weights" in m.reason for rep in reports for m in rep.misses), \
        "\n".join(map(str, reports))
    with torch.no_grad():
        assert torch.equal(out, module(x, ids))


def test_a_scale_gathered_by_other_ids_stays_outside_the_op():
    module, ids = OtherIds(3, 32, 48), torch.tensor([[0, 1], [1, 1], [2, 0]])
    x = torch.randn(3, 32)
    out, rewrites, reports = run(module, x, ids)
    assert [r.pattern for r in rewrites] == ["expert bank / cast only"], "\n".join(map(str, reports))
    assert_close_to_float64(module, x, ids, out)
