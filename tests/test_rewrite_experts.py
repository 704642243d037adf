"""The pass on mixture-of-experts code: an expert bank's weights gathered by the router's ids and multiplied
with einsum (gpt-fast's int8 Mixtral, written from its published ConditionalFeedForwardInt8) become one
``xq.quantized_grouped_matmul`` per bank. The oracle is the module's own forward in float64."""
import copy

import pytest
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


def routed(tokens, dim, experts, top_k, dtype, seed):
    """Activations ``[tokens, dim]`` and router ids ``[tokens, top_k]``, experts without a token included."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=gen).to(dtype)
    return x, torch.randint(0, experts, (tokens, top_k), generator=gen)


def three_banks_rewritten(module, x, ids, experts):
    """Runs ``module`` through the pass: its three banks of ``experts`` each one grouped op, the output
    close to the module's own float64 result; returns the rewrites."""
    out, rewrites, reports = run(module, x, ids)
    assert len(rewrites) == 3 and all(r.format["experts"] == experts for r in rewrites), "\n".join(map(str, reports))
    assert_close_to_float64(module, x, ids, out)
    return rewrites


@settings(max_examples=15)
@given(experts=st.integers(1, 6), top_k=st.integers(1, 3), tokens=st.integers(1, 7),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 99))
def test_gpt_fast_experts_are_one_grouped_op_per_bank(experts, top_k, tokens, dtype, seed):
    module = GptFastInt8Experts(experts, 32, 48, seed)
    three_banks_rewritten(module, *routed(tokens, 32, experts, top_k, dtype, seed), experts)


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


# ---- transformers' batched_mm experts: bmm over banks gathered by flat ids --------------------------------


def quantize_bank(bank: torch.Tensor, asymmetric: bool):
    """Per expert and channel round to nearest: (q, s, z) with bank ~ (q - z) * s (z None: symmetric)."""
    bank = bank.double()
    if not asymmetric:
        s = bank.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
        return torch.round(bank / s).clamp(-127, 127).to(torch.int8), s.float(), None
    lo, hi = bank.amin(-1, keepdim=True), bank.amax(-1, keepdim=True)
    s = (hi - lo).clamp_min(1e-8) / 255
    z = torch.round(-lo / s).clamp(0, 255)
    return torch.round(bank / s + z).clamp(0, 255).to(torch.uint8), s.float(), z.float()


class DequantizingBanks:
    """Mixed into a transformers experts class: ``gate_up_proj`` / ``down_proj`` are int8 (or uint8 with a
    zero point) banks dequantized on each read, per expert and channel, the form a weight-only quantizer
    that keeps the model's own experts class leaves in the graph."""

    def _bank(self, name):
        q, s, z = (getattr(self, f"{name}_{part}") for part in ("q", "s", "z"))
        w = q.to(s.dtype)
        return (w if z is None else w - z) * s

    @property
    def gate_up_proj(self):
        return self._bank("gate_up")

    @property
    def down_proj(self):
        return self._bank("down")


def with_dequantizing_banks(model: nn.Module, asymmetric: bool) -> nn.Module:
    """``model`` (changed in place) with every experts module's banks stored quantized (DequantizingBanks)."""
    for module in model.modules():
        if hasattr(module, "gate_up_proj") and isinstance(getattr(module, "gate_up_proj"), nn.Parameter):
            for name in ("gate_up", "down"):
                q, s, z = quantize_bank(getattr(module, f"{name}_proj").data, asymmetric)
                delattr(module, f"{name}_proj")
                module.register_buffer(f"{name}_q", q)
                module.register_buffer(f"{name}_s", s)
                module.register_buffer(f"{name}_z", z)
            module.__class__ = type(f"Dequantizing{type(module).__name__}", (DequantizingBanks, type(module)), {})
    return model


def tiny_moe(arch: str, seed: int = 0) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, num_experts_per_tok=2, max_position_embeddings=64)
    if arch == "mixtral":
        return MixtralForCausalLM(MixtralConfig(intermediate_size=48, num_local_experts=6, **common)).eval()
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                              norm_topk_prob=True, **common)).eval()


def float64_twin(model: nn.Module) -> nn.Module:
    """The model in float64 with plain banks holding the exact decoding of the quantized ones, run by
    transformers' eager loop over experts (not the batched_mm code the pass rewrites)."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, DequantizingBanks):
            banks = {name: nn.Parameter(module._bank(name).double()) for name in ("gate_up", "down")}
            module.__class__ = type(module).__mro__[2]
            for name, bank in banks.items():
                for part in ("q", "s", "z"):
                    delattr(module, f"{name}_{part}")
                module.register_parameter(f"{name}_proj", bank)
    twin = twin.double()
    twin.config._experts_implementation = "eager"
    return twin


def grouped_calls(model, *inputs, fullgraph=False):
    """Compile ``model`` with the pass (eager compiler); returns (output, reports, the shapes of the expert
    ids each grouped op call reads)."""
    reports, id_shapes = [], []

    def compiler(gm, example_inputs):
        id_shapes.extend(tuple(n.args[1].meta["val"].shape) for n in gm.graph.nodes
                         if n.target is torch.ops.xq.quantized_grouped_matmul.default)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=make_backend(compiler, reports=reports), fullgraph=fullgraph)(*inputs)
    return out, reports, id_shapes


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_transformers_experts_are_one_grouped_op_per_bank(implementation, arch, asymmetric):
    """transformers' batched_mm experts and its default, grouped_mm (rows sorted by expert, offsets counted
    by histc; off CUDA its grouped_mm_fallback op)."""
    model = with_dequantizing_banks(tiny_moe(arch), asymmetric)
    model.config._experts_implementation = implementation
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    out, reports, id_shapes = grouped_calls(model, ids)
    assert len(id_shapes) == 4 and all(len(shape) == (2 if implementation == "batched_mm" and i % 2 == 0 else 1)
                                       for i, shape in enumerate(id_shapes)), id_shapes
    rewrites = [r for rep in reports for r in rep.rewrites]
    assert sorted(r.layer for r in rewrites) == sorted(f"model.layers.{i}.mlp.experts.{b}_q"
                                                       for i in range(2) for b in ("gate_up", "down")), \
        "\n".join(map(str, reports))
    assert all(r.format["zero_point"] == asymmetric for r in rewrites)
    with torch.no_grad():
        exact = float64_twin(model)(ids).logits
        original = (model(ids).logits.double() - exact).abs().max().item()
    err, scale = (out.logits.double() - exact).abs().max().item(), exact.abs().max().item()
    assert err <= 4 * max(original, EPS[torch.float32] * scale) + 1e-9, (err, original, scale)


class BatchedLinearExperts(nn.Module):
    """transformers' batched_mm experts written out (``_batched_linear``, not transposed): each token
    repeated top-k times, flat ids, ``bmm(bank[ids], x.unsqueeze(-1)).squeeze(-1)`` for both banks."""

    def __init__(self, experts, dim, inner, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for name, shape in (("gate_up", (experts, 2 * inner, dim)), ("down", (experts, dim, inner))):
            self.register_buffer(f"{name}_q", torch.randint(-127, 128, shape, generator=g, dtype=torch.int8))
            self.register_buffer(f"{name}_s", torch.rand(*shape[:2], 1, generator=g) / 300 + 1e-4)

    def forward(self, h, top_k):
        x = h.repeat_interleave(top_k.shape[-1], dim=0)
        ids = top_k.reshape(-1)
        gate_up = (self.gate_up_q.to(h.dtype) * self.gate_up_s.to(h.dtype))[ids]
        gate, up = torch.bmm(gate_up, x.unsqueeze(-1)).squeeze(-1).chunk(2, dim=-1)
        down = (self.down_q.to(h.dtype) * self.down_s.to(h.dtype))[ids]
        out = torch.bmm(down, (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
        return out.view(h.shape[0], top_k.shape[-1], -1).sum(1)


@settings(max_examples=12)
@given(experts=st.integers(1, 6), top_k=st.integers(1, 3), tokens=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 99))
def test_batched_linear_experts_read_each_token_once(experts, top_k, tokens, dtype, seed):
    module = BatchedLinearExperts(experts, 32, 24, seed)
    x, ids = routed(tokens, 32, experts, top_k, dtype, seed)
    out, reports, id_shapes = grouped_calls(module, x, ids, fullgraph=True)
    rewrites = [r for rep in reports for r in rep.rewrites]
    assert len(rewrites) == 2 and all(r.format["experts"] == experts for r in rewrites), "\n".join(map(str, reports))
    assert_close_to_float64(module, x, ids, out)
    # the up projection reads the token once with its top-k ids (the op's one-row route at one token); the
    # down projection a row per (token, slot)
    assert sorted(id_shapes) == sorted([(tokens, top_k), (tokens * top_k,)]), id_shapes


class TransposedBank(BatchedLinearExperts):
    """transformers' ``is_transposed=True`` form: ``bmm(x.unsqueeze(1), bank_t[ids]).squeeze(1)``, the bank
    stored [E, K, N]."""

    def forward(self, h, top_k):
        ids = top_k.reshape(-1)
        bank_t = (self.gate_up_q.to(h.dtype) * self.gate_up_s.to(h.dtype)).transpose(1, 2).contiguous()
        return torch.bmm(h.repeat_interleave(top_k.shape[-1], dim=0).unsqueeze(1), bank_t[ids]).squeeze(1)


def test_a_transposed_bank_in_bmm_is_a_near_miss():
    module, ids = TransposedBank(3, 32, 24), torch.tensor([[0, 1], [2, 2]])
    x = torch.randn(2, 32)
    out, rewrites, reports = run(module, x, ids)
    assert not rewrites
    assert any("transposed bank" in m.reason for rep in reports for m in rep.misses), "\n".join(map(str, reports))
    with torch.no_grad():
        assert torch.equal(out, module(x, ids))


def test_batched_mm_experts_on_xla_with_xq_openxla():
    import torch_xla

    device = torch_xla.device()
    module = BatchedLinearExperts(4, 64, 48, seed=2)
    x, ids = torch.randn(1, 64), torch.tensor([[3, 1]])  # one token: the up projection's one-row route
    out, rewrites, reports = run(copy.deepcopy(module).to(device), x.to(device), ids.to(device), "openxla")
    assert len(rewrites) == 2, "\n".join(map(str, reports))
    assert_close_to_float64(module, x, ids, out.cpu())


# ---- Mixtral-style lists of per-expert linears, stacked into a bank --------------------------------------


class Int8Linear(nn.Module):
    """A weight-only int8 linear whose ``weight`` is dequantized on each read (per channel, symmetric)."""

    def __init__(self, out_features, in_features, generator):
        super().__init__()
        self.register_buffer("q", torch.randint(-127, 128, (out_features, in_features), generator=generator,
                                                dtype=torch.int8))
        self.register_buffer("s", torch.rand(out_features, 1, generator=generator) / 300 + 1e-4)

    @property
    def weight(self):
        return self.q.to(self.s.dtype) * self.s

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class ExpertMLP(nn.Module):
    def __init__(self, dim, hidden, generator):
        super().__init__()
        self.w1, self.w3 = Int8Linear(hidden, dim, generator), Int8Linear(hidden, dim, generator)
        self.w2 = Int8Linear(dim, hidden, generator)


class StackedExpertList(nn.Module):
    """Mixtral's per-expert linears (``experts[e].w1 / w3 / w2``) batched for static shapes: each
    projection's weights stacked into a bank, gathered by the router's ids, multiplied with einsum."""

    def __init__(self, experts, dim, hidden, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.experts = nn.ModuleList(ExpertMLP(dim, hidden, g) for _ in range(experts))

    def forward(self, x, ids):
        w1, w3, w2 = (torch.stack([getattr(e, name).weight for e in self.experts]).to(x.dtype)[ids]
                      for name in ("w1", "w3", "w2"))
        h = F.silu(torch.einsum("ti,taoi->tao", x, w1)) * torch.einsum("ti,taoi->tao", x, w3)
        return torch.einsum("tao,taio->tai", h, w2).sum(1)


@settings(max_examples=10)
@given(experts=st.integers(1, 5), top_k=st.integers(1, 3), tokens=st.integers(1, 5),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 99))
def test_a_stacked_list_of_expert_linears_is_one_grouped_op_per_bank(experts, top_k, tokens, dtype, seed):
    module = StackedExpertList(experts, 32, 24, seed)
    rewrites = three_banks_rewritten(module, *routed(tokens, 32, experts, top_k, dtype, seed), experts)
    index = "*" if experts > 1 else "0"  # the report names the bank by its experts' tensors
    assert sorted(r.layer for r in rewrites) == [f"experts.{index}.{w}.q" for w in ("w1", "w2", "w3")]


def test_a_stacked_bank_is_assembled_once_and_again_when_an_expert_changes():
    module, ids = StackedExpertList(3, 32, 24, seed=5), torch.tensor([[0, 2], [1, 1]])
    x = torch.randn(2, 32)
    torch._dynamo.reset()
    stacks, reports = [], []

    def compiler(gm, example_inputs):
        stacks.extend(n for n in gm.graph.nodes if n.target is torch.ops.aten.stack.default)
        return gm.forward

    compiled = torch.compile(module, backend=make_backend(compiler, reports=reports))
    with torch.no_grad():
        compiled(x, ids)
        assert len([r for rep in reports for r in rep.rewrites]) == 3 and not stacks  # no per-call stacking
        module.experts[2].w1.q.neg_()  # an expert's storage written in place: the bank is assembled again
        assert_close_to_float64(module, x, ids, compiled(x, ids))


def test_stacked_expert_list_on_xla_with_xq_openxla():
    import torch_xla

    device = torch_xla.device()
    module = StackedExpertList(4, 64, 48, seed=3)
    x, ids = torch.randn(1, 64), torch.tensor([[2, 0]])
    out, rewrites, reports = run(copy.deepcopy(module).to(device), x.to(device), ids.to(device), "openxla")
    assert len(rewrites) == 3, "\n".join(map(str, reports))
    assert_close_to_float64(module, x, ids, out.cpu())


def test_transformers_grouped_mm_experts_on_xla_with_xq_openxla():
    """The default experts code on XLA: after the rewrite nothing in it has a data-dependent shape (sort,
    histc and cumsum are static), one graph whatever the routing."""
    import torch_xla
    import torch_xla.debug.metrics as met

    device = torch_xla.device()
    model = with_dequantizing_banks(tiny_moe("qwen3_moe", seed=4), asymmetric=True)
    twin = float64_twin(model)
    reports = []
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model).to(device), backend=make_backend("openxla", reports=reports))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for call in range(3):  # other tokens, other experts: no new compilation after the first call
            ids = torch.randint(0, 96, (1, 6), generator=gen)
            out = compiled(ids.to(device)).logits.cpu()
            if call == 0:
                compilations = met.metric_data("CompileTime")[0]
            exact = twin(ids).logits
            assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-5
    assert met.metric_data("CompileTime")[0] == compilations
    assert len([r for rep in reports for r in rep.rewrites]) == 4, "\n".join(map(str, reports))


class GroupedMmByHand(nn.Module):
    """A grouped_mm over offsets the caller passes: nothing proves which expert a row belongs to."""

    def __init__(self):
        super().__init__()
        self.register_buffer("q", torch.randint(-127, 128, (3, 24, 32), dtype=torch.int8))
        self.register_buffer("s", torch.rand(3, 24, 1) / 300)

    def forward(self, x, offs):
        return torch.ops.transformers.grouped_mm_fallback(x, (self.q.to(x.dtype) * self.s).transpose(-2, -1), offs=offs)


def test_grouped_mm_over_offsets_not_counted_from_sorted_ids_is_a_near_miss():
    import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

    module, x, offs = GroupedMmByHand(), torch.randn(5, 32), torch.tensor([2, 2, 5], dtype=torch.int32)
    out, rewrites, reports = run(module, x, offs)
    assert not rewrites
    assert any("offsets of grouped_mm" in m.reason for rep in reports for m in rep.misses), "\n".join(map(str, reports))
    with torch.no_grad():
        assert torch.equal(out, module(x, offs))
