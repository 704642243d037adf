"""Expert parallelism on 4 XLA:CPU devices: ``shard_model``'s "expert" style puts E/4 whole experts of
each quantized bank on each device; its "intermediate" style puts I/4 of every expert's intermediate
features on each device (gate_up's matching gate and up rows, down's inputs). The output is the
unsharded model's (the float64 decoding of its bytes, for "intermediate"), and the compiled HLO moves no
integer weight (nor anything weight-sized) between devices, whatever the route the grouped op takes."""
import copy

import numpy as np
import pytest
import torch
import torch_xla
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM

import xqpass
from xqpass import XlaQuantizedExperts, XlaQuantizedGatedExperts
from xqpass.sharding import IntermediateParallelExperts, shard_model

from test_experts import decoded_bank, float64_twin, float_experts, moe_oracle, qwen3_moe, routing
from conftest import collectives
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


@pytest.mark.parametrize("rows", [1, 16])
def test_expert_split_act_order_bank_matches_unsharded(rows, mesh, compiled_hlo):
    """Experts reading x in orders of their own (GPTQ desc_act): the orders stay whole on every device."""
    bank = XlaQuantizedExperts.from_float(torch.randn(E, N, K) / K**0.5, bits=4, block_size=32)
    bank.set_input_permutation(torch.stack([torch.randperm(K, generator=torch.Generator().manual_seed(e))
                                            for e in range(E)]))
    x, ids = torch.randn(rows, K), torch.randint(0, E, (rows, 2))
    w = torch.from_numpy(decoded_bank(bank))  # float64 [E, N, K] in each expert's sorted order
    order = bank.input_perm
    expected = torch.stack([torch.stack([w[e] @ x[t, order[e]].double() for e in ids[t].tolist()])
                            for t in range(rows)])
    model = torch.nn.Sequential(copy.deepcopy(bank)).to(torch_xla.device())
    shard_model(model, mesh, {"0": "expert"})
    out = model[0](x.to(torch_xla.device()), ids.to(torch_xla.device())).cpu()
    assert relative_error(out, expected) < 1e-5
    assert_weights_stay_put(compiled_hlo(), E * N * K)


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


# -- "intermediate": tensor parallelism inside each expert ------------------------------------------------

# 3 experts (no split by experts over 4 devices), I = 256: 64 intermediate features a device, two groups
# of 32, 32 packed bytes
EXPERTS, HIDDEN, INNER = 3, 128, 256
INTERMEDIATE_FORMATS = {"int8": dict(bits=8), "int4 packed": dict(bits=4),
                        "uint4 packed g32 asym": dict(bits=4, block_size=32, symmetric=False)}


def local_shards(t, dim=1):
    """``{first index along dim: the host copy of that device's shard}`` (dim: the split one)."""
    shards = torch_xla._XLAC._get_local_shards([t])[0]
    indices = torch_xla._XLAC._get_local_shard_replica_and_indices([t])[0]
    return {index[dim].start: shard.cpu() for (shard, _), (_, index) in zip(shards, indices)}


def assert_within_oracle(out, expected, tolerance=2e-5):
    """Max error against the float64 oracle, relative to its largest value: float32 roundings through
    two products (as tests/test_experts.py allows)."""
    err, scale = np.abs(out.double().numpy() - expected).max(), np.abs(expected).max()
    assert err <= tolerance * scale, (err, scale)


@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("fmt", sorted(INTERMEDIATE_FORMATS))
def test_intermediate_split_matches_the_float64_oracle(fmt, rows, mesh, compiled_hlo):
    module = XlaQuantizedGatedExperts.from_float(float_experts(EXPERTS, HIDDEN, INNER, seed=rows),
                                                 **INTERMEDIATE_FORMATS[fmt])
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn((rows, HIDDEN), generator=gen)
    ids, weights = routing(rows, 2, list(range(EXPERTS)), seed=rows)
    gate_up, down = decoded_bank(module.gate_up_proj), decoded_bank(module.down_proj)
    expected = moe_oracle(gate_up, down, x, ids, weights)  # transformers' forward in float64
    original = copy.deepcopy(module)

    model = nn.Sequential(module).to(torch_xla.device())
    report = shard_model(model, mesh, {"0": "intermediate"})
    assert [(entry.name, entry.style) for entry in report.layers] == [("0", "intermediate")]
    assert "0 linears and 1 expert modules split" in str(report)
    q = model[0]
    assert isinstance(q, IntermediateParallelExperts) and q.shards == 4

    # each device: every expert's gate rows and up rows of the same 64 intermediate features
    bank, width = original.gate_up_proj, INNER // 4
    for attr in ("weight", "weight_scaler", "zero_point"):
        whole = getattr(bank, attr)
        if whole is None:
            continue
        shards = local_shards(getattr(q.gate_up_proj, attr))
        assert sorted(shards) == [0, 2 * width, 4 * width, 6 * width], attr
        for device in range(4):
            rows_of = slice(device * width, (device + 1) * width)
            want = torch.cat([whole[:, :INNER][:, rows_of], whole[:, INNER:][:, rows_of]], dim=1)
            assert torch.equal(shards[2 * width * device], want), (attr, device)
    # down_proj: each device 1/4 of the input features (packed: of the bytes; g32: of the groups)
    down_weight = original.down_proj.weight
    assert local_shapes(q.down_proj.weight) == [(EXPERTS, HIDDEN, down_weight.shape[2] // 4)] * 4
    shards = local_shards(q.down_proj.weight, dim=2)
    assert sorted(shards) == [i * down_weight.shape[2] // 4 for i in range(4)]
    assert all(torch.equal(shard, down_weight[:, :, start:start + shard.shape[2]]) for start, shard in shards.items())
    if original.down_proj.block_size == -1:  # a per-channel scale belongs to an output feature: whole
        assert torch_xla._XLAC._get_xla_sharding_spec(q.down_proj.weight_scaler) in ("", "{replicated}")
    else:
        assert local_shapes(q.down_proj.weight_scaler) == [(EXPERTS, HIDDEN, INNER // 32 // 4)] * 4

    device = torch_xla.device()
    with torch.no_grad():
        out = q(x.to(device), ids.to(device), weights.to(device)).cpu()
    assert_within_oracle(out, expected)
    # the placement (gate_up permuted on the devices, then split) and the forward move one thing: down_proj's
    # partial sums, [T, H] in float32
    assert [c for hlo in compiled_hlo() for c in collectives(hlo)] == [("all-reduce", (("f32", rows * HIDDEN),))]


def test_intermediate_split_on_a_data_and_model_mesh_from_the_host(compiled_hlo):
    """A (2, 2) mesh: halves of I over "model", each half on the two devices of its "data" row; placed
    from host slices."""
    import torch_xla.distributed.spmd as xs

    mesh = xs.Mesh(np.arange(4), (2, 2), ("data", "model"))
    module = XlaQuantizedGatedExperts.from_float(float_experts(EXPERTS, HIDDEN, INNER, seed=7), bits=4, block_size=32)
    x, (ids, weights) = torch.randn((6, HIDDEN), generator=torch.Generator().manual_seed(7)), routing(6, 2, [0, 2], 7)
    expected = moe_oracle(decoded_bank(module.gate_up_proj), decoded_bank(module.down_proj), x, ids, weights)
    model = nn.Sequential(module)
    shard_model(model, mesh, {"0": "intermediate"})
    model.to(torch_xla.device())
    assert local_shapes(model[0].gate_up_proj.weight) == [(EXPERTS, INNER, HIDDEN // 2)] * 4
    assert local_shapes(model[0].down_proj.weight_scaler) == [(EXPERTS, HIDDEN, INNER // 32 // 2)] * 4
    device = torch_xla.device()
    with torch.no_grad():
        out = model[0](x.to(device), ids.to(device), weights.to(device)).cpu()
    assert_within_oracle(out, expected)
    assert_weights_stay_put(compiled_hlo(), EXPERTS * 2 * INNER * HIDDEN, all_reduces=1)


INTERMEDIATE_PLAN = {"*q_proj": "column", "*k_proj": "column", "*v_proj": "column", "*o_proj": "row",
                     "*.mlp.experts": "intermediate"}


# Mixtral with its attention Megatron-split too; Qwen3-MoE's experts alone (its 2 KV heads of 16 with a
# norm over each do not split 4 ways without moving attention activations)
@pytest.mark.parametrize("make, fmt, tokens", [
    ("mixtral", dict(bits=4, block_size=32), 1), ("mixtral", dict(bits=4, block_size=32), 8),
    ("qwen3_moe", dict(bits=8), 8),
])
def test_moe_model_with_intermediate_and_tensor_parallel_plan(make, fmt, tokens, mesh, compiled_hlo):
    float_model = mixtral() if make == "mixtral" else qwen3_moe()
    plan = INTERMEDIATE_PLAN if make == "mixtral" else {"*.mlp.experts": "intermediate"}
    linears = 8 if make == "mixtral" else 0
    model = xqpass.quantize_model(copy.deepcopy(float_model), **fmt, filter_fn=lambda m, name: name != "lm_head")
    ids = torch.randint(0, 96, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        exact = float64_twin(float_model, model)(ids).logits  # the float model, weights decoded in float64
    report = shard_model(model, mesh, plan)  # from the host, then the rest replicated
    model.to(torch_xla.device())
    assert f"{linears} linears and 2 expert modules split over mesh axis 'model' (4 devices)" in str(report)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, IntermediateParallelExperts)
    e, h, i = experts.num_experts, experts.hidden_dim, experts.intermediate_dim
    byte = 2 if fmt["bits"] == 4 else 1  # packed: two values a byte
    assert local_shapes(experts.gate_up_proj.weight) == [(e, 2 * i // 4, h // byte)] * 4
    assert local_shapes(experts.down_proj.weight) == [(e, h, i // 4 // byte)] * 4
    if "block_size" in fmt:
        assert local_shapes(experts.down_proj.weight_scaler) == [(e, h, i // 32 // 4)] * 4
    compiled = torch.compile(model, backend="openxla")
    with torch.no_grad():
        out = compiled(ids.to(torch_xla.device())).logits.cpu()
    assert relative_error(out, exact) < 1e-5
    # one all-reduce of [tokens, H] a layer for the experts (and one for o_proj): nothing else moves
    assert_weights_stay_put(compiled_hlo(), e * 2 * i * h, all_reduces=2 * (1 + (linears > 0)))
    before = compile_count()
    with torch.no_grad():
        compiled(torch.randint(0, 96, (1, tokens)).to(torch_xla.device())).logits.cpu()  # other experts
    assert compile_count() == before


def test_moe_checkpoint_loads_its_linears_split_then_the_experts_split_by_intermediate(tmp_path, mesh, compiled_hlo):
    """Banks load whole (a plan entry for them is refused while the experts are float); shard_model then
    splits them on the devices."""
    import test_checkpoints_moe
    from xqpass import load_quantized_checkpoint
    from xqpass.testing import checkpoints as writers

    float_model = mixtral()
    linears = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
    banks, dense = writers.write_moe_checkpoint(str(tmp_path), float_model, "gptq", "mixtral", linears=linears,
                                                bits=4, group=32)
    attention = {glob: style for glob, style in INTERMEDIATE_PLAN.items() if style != "intermediate"}
    model = copy.deepcopy(float_model)
    with pytest.raises(ValueError, match=r"matched no linear layer: \['\*\.mlp\.experts'\] .*an 'intermediate' "
                                         r"entry an XlaQuantizedGatedExperts: quantize_model or "
                                         r"load_quantized_checkpoint first, then shard_model"):
        load_quantized_checkpoint(model, str(tmp_path), mesh=mesh, plan=INTERMEDIATE_PLAN)
    assert type(model.model.layers[0].mlp.experts) is type(float_model.model.layers[0].mlp.experts)  # untouched
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    load_quantized_checkpoint(model, str(tmp_path), mesh=mesh, plan=attention)
    report = shard_model(model, mesh, {"*.mlp.experts": "intermediate"})
    model.to(torch_xla.device())
    assert "0 linears and 2 expert modules split" in str(report)
    assert local_shapes(model.model.layers[1].mlp.experts.down_proj.weight) == [(8, 128, 32)] * 4
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        exact = test_checkpoints_moe.float64_twin(float_model, banks, dense)(ids).logits  # GPTQ's dequantization
        out = torch.compile(model, backend="openxla")(ids.to(torch_xla.device())).logits.cpu()
    assert relative_error(out, exact) < 1e-5
    assert_weights_stay_put(compiled_hlo(), 8 * 128 * 128, all_reduces=4)


def gated(experts, inner, **fmt):
    return XlaQuantizedGatedExperts.from_float(float_experts(experts, 32, inner, seed=0), **fmt)


def act_order(module):
    """``module`` with each expert of its up projection reading x in an order of its own (GPTQ desc_act)."""
    bank = module.gate_up_proj
    bank.set_input_permutation(torch.stack([torch.randperm(bank.input_dim, generator=torch.Generator().manual_seed(e))
                                            for e in range(bank.num_experts)]))
    return module


@pytest.mark.parametrize("module, message", [
    (act_order(gated(2, 64)), r"0.gate_up_proj: intermediate-parallel does not take act-order banks"),
    (gated(2, 64, weight_dtype=torch.float8_e4m3fn, block_size=16, block_n=8),
     r"0.gate_up_proj: intermediate-parallel does not take float8 2-D blocks \(block_n=8"),
    (gated(2, 18), r"0: intermediate-parallel over 4 devices needs the intermediate size I \(down_proj's input "
                   r"features, half of gate_up_proj's outputs\) divisible by 4, got 18"),
    (gated(2, 20, bits=4), r"0.down_proj: intermediate-parallel over 4 devices would split a packed int4 byte: 5 "
                           r"input features a device \(I = 20\) is not a multiple of 2"),
    (gated(2, 64, bits=4, block_size=32), r"0.down_proj: intermediate-parallel over 4 devices would split a block "
                                          r"of 32: 16 input features a device \(I = 64\) is not a multiple of 32"),
])
def test_an_intermediate_split_that_does_not_fit_leaves_the_model_untouched(module, message, mesh):
    fits = gated(3, 64)
    model = nn.Sequential(fits, module)  # the first fits: nothing moves until every module is checked
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message.replace("0", "1", 1)):
        shard_model(model, mesh, {"*": "intermediate"})
    assert [type(m) for m in model] == [XlaQuantizedGatedExperts] * 2
    assert all(t.device.type == "cpu" and torch.equal(t, before[k]) for k, t in model.state_dict().items())


def test_intermediate_takes_a_gated_experts_module_once(mesh):
    with pytest.raises(ValueError, match=r"matched no linear layer: \['0'\] \(.*an 'intermediate' entry an "
                                         r"XlaQuantizedGatedExperts"):
        shard_model(nn.Sequential(XlaQuantizedExperts.from_float(torch.randn(2, 8, 16))), mesh, {"0": "intermediate"})
    model = nn.Sequential(gated(2, 64))
    shard_model(model, mesh, {"0": "intermediate"})
    for style in ("intermediate", "expert"):  # its forward reads the interleaved rows: one split only
        with pytest.raises(ValueError, match=r"0: already split intermediate-parallel \(gate_up interleaved for "
                                             r"4 devices\)"):
            shard_model(model, mesh, {"0": style})
    model = nn.Sequential(gated(4, 64))
    shard_model(model, mesh, {"0": "expert"})
    with pytest.raises(ValueError, match=r"0: already split expert-parallel"):
        shard_model(model, mesh, {"0": "intermediate"})
