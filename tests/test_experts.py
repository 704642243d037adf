"""Quantized expert banks: ``XlaQuantizedExperts``, ``XlaQuantizedGatedExperts`` in place of transformers'
fused experts (Mixtral, Qwen3-MoE), and ``quantize_model``'s swap, against a float64 oracle written
here (the banks' bytes decoded by hand, transformers' MoE formula in numpy), on CPU and XLA."""
import copy
from re import escape as re_escape

import numpy as np
import pytest
import torch
import torch_xla
import torch_xla.debug.metrics as met
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

import xqpass
from oracle import dequantized
from xqpass import XlaQuantizedExperts, XlaQuantizedGatedExperts, XlaQuantizedLinear

#: name: quantize_model / from_float format arguments
FORMATS = {
    "int8": dict(bits=8),
    "int8 asym": dict(bits=8, symmetric=False),
    "int4 packed g8": dict(bits=4, block_size=8),
    "uint4 packed g8 asym": dict(bits=4, block_size=8, symmetric=False),
    "int4 one a byte": dict(bits=4, packed=False),
    "e4m3": dict(weight_dtype=torch.float8_e4m3fn),
    "e4m3 blocks 8x16": dict(weight_dtype=torch.float8_e4m3fn, block_size=16, block_n=8),
    "e5m2 blocks 12x12 partial": dict(weight_dtype=torch.float8_e5m2, block_size=12, block_n=12),
}


def decoded_bank(bank: XlaQuantizedExperts) -> np.ndarray:
    """``[E, N, K]`` float64: each expert decoded by the oracle (nibbles by hand; float8 exactly)."""
    experts = []
    for e in range(bank.num_experts):
        w, s = bank.weight[e].cpu(), bank.weight_scaler[e].cpu()
        z = None if bank.zero_point is None else bank.zero_point[e].cpu()
        if w.dtype.is_floating_point:  # float8: every value is exact in float64
            s64 = s.double().numpy()
            v = w.double().numpy()
            if bank.block_n > 1:  # 2-D blocks: each scale over its Bn rows and B columns, the partial ends cut
                n, k = v.shape
                s64 = np.repeat(np.repeat(s64, bank.block_n, axis=0), bank.block_size, axis=1)[:n, :k]
                experts.append(v * s64)
                continue
            experts.append(v * (s64[:, None] if bank.block_size == -1 else np.repeat(s64, bank.block_size, axis=1)))
        else:
            experts.append(dequantized(w, s, z, bank.block_size, bank.packed)[0])
    return np.stack(experts)


def silu(v):
    return v / (1 + np.exp(-v))


def moe_oracle(gate_up: np.ndarray, down: np.ndarray, x, ids, weights) -> np.ndarray:
    """transformers' experts forward in float64: for each row t and slot j, expert e = ids[t, j]:
    gate, up = x[t] @ gate_up[e].T halves; out[t] += weights[t, j] * (silu(gate) * up) @ down[e].T."""
    x, ids, weights = x.double().numpy(), ids.numpy(), weights.double().numpy()
    out = np.zeros((x.shape[0], down.shape[1]))
    inner = down.shape[2]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            h = gate_up[ids[t, j]] @ x[t]
            out[t] += weights[t, j] * (down[ids[t, j]] @ (silu(h[:inner]) * h[inner:]))
    return out


def float_experts(experts: int, hidden: int, inner: int, seed: int) -> MixtralExperts:
    config = MixtralConfig(hidden_size=hidden, intermediate_size=inner, num_local_experts=experts)
    module = MixtralExperts(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.gate_up_proj.copy_(torch.randn(module.gate_up_proj.shape, generator=gen) / hidden**0.5)
        module.down_proj.copy_(torch.randn(module.down_proj.shape, generator=gen) / inner**0.5)
    return module


def routing(rows, top_k, used, seed):
    """Top-k ids drawn from ``used`` only (the other experts receive no row), distinct within a row as
    topk's are, and weights summing to one."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor(used)
    ids = torch.stack([pool[torch.randperm(len(used), generator=gen)[:top_k]] for _ in range(rows)]) if rows else \
        torch.empty((0, top_k), dtype=torch.int64)
    weights = torch.rand((rows, top_k), generator=gen) + 0.1
    return ids, weights / weights.sum(-1, keepdim=True)


@st.composite
def cases(draw):
    experts = draw(st.integers(1, 6))
    top_k = draw(st.integers(1, min(experts, 3)))
    used = draw(st.lists(st.integers(0, experts - 1), min_size=top_k, max_size=experts, unique=True))
    return dict(fmt=draw(st.sampled_from(sorted(FORMATS))), experts=experts, top_k=top_k, used=sorted(used),
                rows=draw(st.sampled_from([0, 1, 2, 3, 7, 20])), seed=draw(st.integers(0, 2**16)))


def check_case(case, device=None, dtype=torch.float32):
    float_module = float_experts(case["experts"], 32, 16, case["seed"])
    module = XlaQuantizedGatedExperts.from_float(float_module, **FORMATS[case["fmt"]])
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    x = torch.randn((case["rows"], 32), generator=gen).to(dtype)
    ids, weights = routing(case["rows"], case["top_k"], case["used"], case["seed"])
    expected = moe_oracle(decoded_bank(module.gate_up_proj), decoded_bank(module.down_proj), x, ids, weights)
    if device is not None:
        module, x, ids, weights = module.to(device), x.to(device), ids.to(device), weights.to(device)
    with torch.no_grad():
        out = module(x, ids, weights).cpu()
    assert out.shape == (case["rows"], 32) and out.dtype == dtype
    scale = max(np.abs(expected).max(initial=0.0), 1e-3)
    # float32: a few roundings of ~1e-7 through two products; bfloat16: x, the inner product, the output
    tolerance = 2e-5 if dtype == torch.float32 else 3e-2
    err = np.abs(out.double().numpy() - expected).max(initial=0.0)
    assert err <= tolerance * scale, (case, err, scale)


@given(cases())
def test_gated_experts_match_the_float64_oracle_on_cpu(case):
    check_case(case)


@settings(max_examples=12)
@given(cases())
def test_gated_experts_match_the_float64_oracle_on_xla(xla_device, case):
    check_case(case, xla_device)


@pytest.mark.parametrize("fmt", ["int8", "int4 packed g8"])
def test_bfloat16_activations(fmt, xla_device):
    case = dict(fmt=fmt, experts=4, top_k=2, used=[0, 2, 3], rows=5, seed=3)
    check_case(case, dtype=torch.bfloat16)
    check_case(case, xla_device, dtype=torch.bfloat16)


def test_bank_is_each_expert_quantized_alone():
    bank = torch.randn(3, 24, 32)
    for kwargs in FORMATS.values():
        q = XlaQuantizedExperts.from_float(bank, **kwargs)
        for e in range(3):
            one = xqpass.quantize_weight(bank[e], **{"block_layout": "rows", **kwargs})
            assert torch.equal(q.weight[e], one.weight) and torch.equal(q.weight_scaler[e], one.scale)
            assert (q.zero_point is None) == (one.zero_point is None)
            if q.zero_point is not None:
                assert torch.equal(q.zero_point[e], one.zero_point)
    x, ids = torch.randn(5, 32), torch.tensor([[0, 2], [1, 1], [2, 0], [0, 1], [2, 2]])
    q = XlaQuantizedExperts.from_float(bank, bits=8, bias=torch.randn(3, 24))
    want = torch.stack([torch.stack([x[t] @ q.weight[e].float().T * q.weight_scaler[e] + q.bias[e] for e in row])
                        for t, row in enumerate(ids.tolist())])
    torch.testing.assert_close(q(x, ids), want, rtol=1e-5, atol=1e-5)
    assert q(x, ids[:, 0]).shape == (5, 24)


def test_2d_blocks_belong_to_one_expert_and_expert_parallel_agrees():
    bank = torch.randn(3, 20, 28)  # 20 rows in blocks of 8: a block of the flattened bank would straddle experts
    q = XlaQuantizedExperts.from_float(bank, weight_dtype=torch.float8_e4m3fn, block_size=16, block_n=8)
    assert q.weight_scaler.shape == (3, 3, 2) and q.block_n == 8 and "2-D blocks(8x16)" in repr(q)
    gen = torch.Generator().manual_seed(4)
    x, ids = torch.randn(6, 28, generator=gen), torch.randint(0, 3, (6, 2), generator=gen)
    expected = np.einsum("tk,tjnk->tjn", x.double().numpy(), decoded_bank(q)[ids.numpy()])
    grouped = q(x, ids)
    q.expert_parallel = True  # every row against every expert through the matmul op, blocks by rows
    every = q(x, ids)
    for out in (grouped, every):
        assert np.abs(out.double().numpy() - expected).max() <= 1e-5 * np.abs(expected).max()


def test_2d_block_bank_errors():
    with pytest.raises(ValueError, match=r"block_n=-1 \(per-tensor\) has no expert bank layout"):
        XlaQuantizedExperts.from_float(torch.randn(2, 8, 16), weight_dtype=torch.float8_e4m3fn, block_n=-1)
    with pytest.raises(ValueError, match="expert banks take 2-D blocks .* of float8 weights only, got weight_dtype=None"):
        XlaQuantizedExperts(2, 16, 8, block_size=8, block_n=8)
    with pytest.raises(ValueError, match="is for float8 weights: pass weight_dtype"):
        XlaQuantizedExperts.from_float(torch.randn(2, 8, 16), bits=8, block_size=8, block_n=8)
    q = XlaQuantizedExperts(2, 16, 8, block_size=8, block_n=4, weight_dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=re_escape("scale must have shape (2, 2, 2) [E, ceil(N=8/block_n=4)")):
        q.load_quantized_weight(torch.zeros(2, 8, 16, dtype=torch.float8_e4m3fn), torch.ones(2, 8, 2))


def test_bank_errors():
    with pytest.raises(TypeError, match=r"\[experts, out_features, in_features\] tensor, got torch.float32 2-D"):
        XlaQuantizedExperts.from_float(torch.randn(4, 8))
    with pytest.raises(ValueError, match="block_size must be -1 or a positive divisor of in_features=30"):
        XlaQuantizedExperts.from_float(torch.randn(2, 4, 30), bits=4, block_size=8)
    q = XlaQuantizedExperts(2, 16, 8)
    with pytest.raises(ValueError, match=r"expected 2 experts of 8 output features, got 3 of 8"):
        q.load_quantized_weight(torch.zeros(3, 8, 16, dtype=torch.int8), torch.ones(3, 8))
    with pytest.raises(ValueError, match=r"scale must have shape \(2, 8\)"):
        q.load_quantized_weight(torch.zeros(2, 8, 16, dtype=torch.int8), torch.ones(2, 4))


# -- whole models --------------------------------------------------------------------------------------

def mixtral(seed=0):
    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
                           max_position_embeddings=64)
    return MixtralForCausalLM(config).eval()


def qwen3_moe(seed=0):
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                            max_position_embeddings=64)
    return Qwen3MoeForCausalLM(config).eval()


def float64_twin(float_model: nn.Module, quantized: nn.Module) -> nn.Module:
    """The float model in float64 with every quantized weight replaced by its float64 decoding: the
    exact value of the quantized model (routing included)."""
    twin = copy.deepcopy(float_model).double()
    twin.config._experts_implementation = "eager"  # the loop over experts: torch's grouped_mm takes no float64
    modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in twin.named_modules():
            new = modules.get(name)
            if isinstance(new, XlaQuantizedLinear):
                module.weight.copy_(torch.from_numpy(dequantized(new.weight, new.weight_scaler, new.zero_point,
                                                                 new.block_size, new.packed)[0]))
            elif isinstance(new, XlaQuantizedGatedExperts):
                module.gate_up_proj.copy_(torch.from_numpy(decoded_bank(new.gate_up_proj)))
                module.down_proj.copy_(torch.from_numpy(decoded_bank(new.down_proj)))
    return twin


def assert_matches_float64_on_cpu_and_xla(float_model, quantized, ids, xla_device):
    """The quantized model's logits, on the CPU and on XLA, against its float64 decoding."""
    with torch.no_grad():
        exact = float64_twin(float_model, quantized)(ids).logits
        on_cpu = quantized(ids).logits
        on_xla = quantized.to(xla_device)(ids.to(xla_device)).logits.cpu()
    for out in (on_cpu, on_xla):
        assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-5


@pytest.mark.parametrize("make", [mixtral, qwen3_moe])
@pytest.mark.parametrize("fmt", ["e4m3 blocks 8x16", "e5m2 blocks 12x12 partial"])
def test_model_with_2d_block_banks_matches_its_float64_decoding(make, fmt, xla_device):
    model = make()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    float_model = copy.deepcopy(model)
    for layer in model.model.layers:
        layer.mlp.experts = XlaQuantizedGatedExperts.from_float(layer.mlp.experts, **FORMATS[fmt])
    assert_matches_float64_on_cpu_and_xla(float_model, model, ids, xla_device)


@pytest.mark.parametrize("make", [mixtral, qwen3_moe])
@pytest.mark.parametrize("fmt", ["int8", "uint4 packed g8 asym"])
def test_model_matches_its_float64_decoding_on_cpu_and_xla(make, fmt, xla_device):
    model = make()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    float_model = copy.deepcopy(model)
    quantized, report = xqpass.quantize_model(model, **FORMATS[fmt], filter_fn=lambda m, name: name != "lm_head",
                                              return_report=True)
    assert len(report.experts) == 2 and all(isinstance(layer.mlp.experts, XlaQuantizedGatedExperts)
                                            for layer in quantized.model.layers)
    assert not any(isinstance(m, (nn.Linear, MixtralExperts)) and name.startswith("model.layers")
                   for name, m in quantized.named_modules())
    assert_matches_float64_on_cpu_and_xla(float_model, quantized, ids, xla_device)


@pytest.mark.parametrize("make", [mixtral, qwen3_moe])
def test_quantize_model_swaps_experts_into_2d_float8_blocks(make, xla_device):
    model = make()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    float_model = copy.deepcopy(model)
    quantized, report = xqpass.quantize_model(model, **FORMATS["e4m3 blocks 8x16"], return_report=True,
                                              filter_fn=lambda m, name: ".experts" in name)
    assert len(report.experts) == 2 and all(layer.mlp.experts.gate_up_proj.block_n == 8
                                            for layer in quantized.model.layers)
    assert_matches_float64_on_cpu_and_xla(float_model, quantized, ids, xla_device)


def test_compiled_model_keeps_one_graph_whatever_the_routing(xla_device):
    model = xqpass.quantize_model(mixtral(), bits=4, block_size=16, filter_fn=lambda m, name: name != "lm_head")
    compiled = torch.compile(model.to(xla_device), backend="openxla")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        compiled(torch.randint(0, 96, (1, 6), generator=gen).to(xla_device)).logits.cpu()
        before = met.metric_data("CompileTime")[0]
        for _ in range(2):  # other tokens, other experts
            compiled(torch.randint(0, 96, (1, 6), generator=gen).to(xla_device)).logits.cpu()
    assert met.metric_data("CompileTime")[0] == before


def test_report_and_the_experts_left_float():
    model = mixtral()
    _, report = xqpass.quantize_model(model, bits=8, quantize_activation=True, return_report=True)
    assert [layer.names for layer in report.skipped] == [("model.layers.0.mlp.experts",), ("model.layers.1.mlp.experts",)]
    assert "grouped op takes no quantized activations" in str(report) and not report.experts
    assert isinstance(model.model.layers[0].mlp.experts, MixtralExperts)

    model = mixtral()
    _, report = xqpass.quantize_model(model, bits=8, experts=False, return_report=True)
    assert not report.experts and isinstance(model.model.layers[1].mlp.experts, MixtralExperts)

    model = mixtral()
    _, report = xqpass.quantize_model(model, bits=4, block_size=16, filter_fn=lambda m, name: "experts" in name,
                                      return_report=True)
    assert "0 linears quantized, 2 expert modules quantized" in str(report)
    assert "model.layers.0.mlp.experts: 6 experts, gate_up [96x64], down [64x48]" in str(report)
    assert any("stored blockwise by rows" in note for note in report.notes)


def test_experts_of_another_forward_are_left_alone():
    class HandWritten(nn.Module):  # 3-D banks, but a forward no flag describes
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(2, 8, 4))
            self.down_proj = nn.Parameter(torch.randn(2, 4, 4))

    model = nn.Sequential(HandWritten())
    _, report = xqpass.quantize_model(model, bits=8, return_report=True)
    assert "is not a transformers experts class" in str(report) and isinstance(model[0], HandWritten)

    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    model = nn.Sequential(GptOssExperts(GptOssConfig(hidden_size=16, intermediate_size=8, num_local_experts=2)))
    _, report = xqpass.quantize_model(model, bits=8, return_report=True)
    assert "describe another forward" in str(report) and isinstance(model[0], GptOssExperts)


def test_a_bank_that_does_not_fit_leaves_the_model_untouched():
    model = mixtral()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.experts': down_proj \(6, 64, 48\): block_size must be "
                                         r"-1 or a positive divisor of in_features=48.*untouched"):
        xqpass.quantize_model(model, bits=4, block_size=32, filter_fn=lambda m, name: "experts" in name)
    assert isinstance(model.model.layers[0].mlp.experts, MixtralExperts)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- act-order banks: each expert's own input order ---------------------------------------------------------

def act_order_bank(fmt: str, experts: int, n: int, k: int, seed: int):
    """(a bank whose experts' K is stored permuted, its perms ``[E, K]``, the float64 weights in the
    original order ``[E, N, K]``): expert e's stored column i is original input feature ``perm[e, i]``."""
    gen = torch.Generator().manual_seed(seed)
    q = XlaQuantizedExperts.from_float(torch.randn(experts, n, k, generator=gen), **FORMATS[fmt])
    perm = torch.stack([torch.randperm(k, generator=gen) for _ in range(experts)])
    stored = decoded_bank(q)
    original = np.zeros_like(stored)
    for e in range(experts):
        original[e][:, perm[e].numpy()] = stored[e]
    q.set_input_permutation(perm)
    return q, perm, original


@pytest.mark.parametrize("fmt", ["int8", "uint4 packed g8 asym", "e4m3 blocks 8x16"])
def test_act_order_bank_reads_each_experts_order(fmt, xla_device):
    q, _, original = act_order_bank(fmt, 4, 24, 32, seed=5)
    assert q.input_perm.dtype == torch.int64 and "act-order" in repr(q)
    gen = torch.Generator().manual_seed(6)
    for rows, top_k in ((1, 2), (2, 1), (7, 2)):  # one row, each row, dense on XLA's default tuning
        x = torch.randn(rows, 32, generator=gen)
        ids = torch.randint(0, 3, (rows, top_k), generator=gen)  # expert 3 receives no row
        expected = np.einsum("tk,tjnk->tjn", x.double().numpy(), original[ids.numpy()])
        tolerance = 1e-5 * np.abs(expected).max()
        outs = [q(x, ids), q.to(xla_device)(x.to(xla_device), ids.to(xla_device)).cpu()]
        q.expert_parallel = True  # every row against every expert, each row in its slot's expert's order
        outs += [q(x.to(xla_device), ids.to(xla_device)).cpu()]
        q.expert_parallel = False
        q = q.cpu()
        for out in outs:
            assert np.abs(out.double().numpy() - expected).max() <= tolerance, (fmt, rows, top_k)


def test_act_order_gated_experts_compile_into_one_graph(xla_device):
    gate_up, _, gate_up_original = act_order_bank("int4 packed g8", 3, 32, 16, seed=7)
    down, _, down_original = act_order_bank("int8", 3, 16, 16, seed=8)
    module = XlaQuantizedGatedExperts(gate_up, down, nn.SiLU())
    ids, weights = routing(5, 2, [0, 1, 2], seed=9)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(10))
    expected = moe_oracle(gate_up_original, down_original, x, ids, weights)
    compiled = torch.compile(module.to(xla_device), backend="openxla", fullgraph=True)  # no graph break
    with torch.no_grad():
        out = compiled(x.to(xla_device), ids.to(xla_device), weights.to(xla_device)).cpu()
    assert np.abs(out.double().numpy() - expected).max() <= 2e-5 * np.abs(expected).max()


def test_act_order_permutation_errors():
    q = XlaQuantizedExperts.from_float(torch.randn(2, 8, 16), bits=8)
    with pytest.raises(ValueError, match=re_escape("perm must have shape (2, 16) [E, K], one input order an expert, "
                                                   "got (16,)")):
        q.set_input_permutation(torch.arange(16))
    with pytest.raises(TypeError, match="perm must be torch.int32 or torch.int64"):
        q.set_input_permutation(torch.zeros(2, 16))
    with pytest.raises(ValueError, match=re_escape("perm[1] is not a permutation of range(K=16)")):
        q.set_input_permutation(torch.stack([torch.arange(16), torch.zeros(16, dtype=torch.long)]))
    assert q.input_perm is None
