"""Expert parallelism on 4 XLA:CPU devices: ``shard_model``'s "expert" style puts E/4 whole experts of
each quantized bank on each device; the output is the unsharded model's, and the compiled HLO moves no
integer weight (nor anything weight-sized) between devices, whatever the route the grouped op takes."""
import copy

import pytest
import torch
import torch_xla
from transformers import MixtralConfig, MixtralForCausalLM

import xqpass
from xqpass import XlaQuantizedExperts
from xqpass.sharding import shard_model

from test_spmd import assert_weights_stay_put, compile_count, local_shapes, relative_error

E, N, K = 8, 128, 256


@pytest.mark.parametrize("rows", [1, 3, 16])  # the grouped op's one-row and dense routes
@pytest.mark.parametrize("fmt", [dict(bits=8), dict(bits=4, block_size=32, symmetric=False)])
def test_expert_split_bank_matches_unsharded(fmt, rows, mesh, compiled_hlo):
    bank = XlaQuantizedExperts.from_float(torch.randn(E, N, K) / K**0.5, **fmt)
    x, ids = torch.randn(rows, K), torch.randint(0, E, (rows, 2))
    expected = bank(x, ids)
    model = torch.nn.Sequential(copy.deepcopy(bank)).to(torch_xla.device())
    report = shard_model(model, mesh, {"0": "expert"})
    assert [(entry.name, entry.style) for entry in report.layers] == [("0", "expert")]
    assert "0 linears and 1 expert modules split" in str(report)
    q = model[0]
    assert local_shapes(q.weight) == [(E // 4, *q.weight.shape[1:])] * 4
    assert local_shapes(q.weight_scaler) == [(E // 4, *q.weight_scaler.shape[1:])] * 4
    out = q(x.to(torch_xla.device()), ids.to(torch_xla.device())).cpu()
    assert relative_error(out, expected) < 1e-5
    assert_weights_stay_put(compiled_hlo(), E * N * K)
    assert torch.equal(q.weight.cpu(), bank.weight)


def mixtral():
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=64)
    return MixtralForCausalLM(config).eval()


PLAN = {"*q_proj": "column", "*k_proj": "column", "*v_proj": "column", "*o_proj": "row", "*.mlp.experts": "expert"}


@pytest.mark.parametrize("tokens", [1, 8])
def test_mixtral_with_expert_and_tensor_parallel_plan(tokens, mesh, compiled_hlo):
    model = xqpass.quantize_model(mixtral(), bits=4, block_size=32, filter_fn=lambda m, name: name != "lm_head")
    ids = torch.randint(0, 96, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        expected = model(ids).logits
    report = shard_model(model, mesh, PLAN)
    model.to(torch_xla.device())
    assert "8 linears and 2 expert modules split over mesh axis 'model' (4 devices)" in str(report)
    experts = model.model.layers[0].mlp.experts
    assert local_shapes(experts.gate_up_proj.weight) == [(2, 512, 64)] * 4  # 2 of 8 experts, packed K/2
    assert local_shapes(experts.down_proj.weight_scaler) == [(2, 128, 8)] * 4
    compiled = torch.compile(model, backend="openxla")
    with torch.no_grad():
        out = compiled(ids.to(torch_xla.device())).logits.cpu()
    assert relative_error(out, expected) < 1e-4
    assert_weights_stay_put(compiled_hlo(), 8 * 128 * 128)
    before = compile_count()
    with torch.no_grad():
        compiled(torch.randint(0, 96, (1, tokens)).to(torch_xla.device())).logits.cpu()  # other experts
    assert compile_count() == before


def test_experts_that_do_not_divide_are_refused(mesh):
    bank = XlaQuantizedExperts.from_float(torch.randn(6, 8, 16))
    model = torch.nn.Sequential(bank)
    with pytest.raises(ValueError, match="expert-parallel over 4 devices needs the experts divisible by 4, got 6"):
        shard_model(model, mesh, {"0": "expert"})
    assert model[0].weight.device.type == "cpu"
    with pytest.raises(ValueError, match=r"matched no linear layer: \['\*experts'\] \(an 'expert' entry takes a "
                                         r"quantized expert module"):
        shard_model(mixtral(), mesh, {"*experts": "expert"})
