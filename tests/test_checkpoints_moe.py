"""Mixture-of-experts checkpoints: per-expert quantized linears as GPTQ, AWQ and compressed-tensors
quantizers write them for Mixtral (``block_sparse_moe.experts.E.w1/w3/w2``) and Qwen3-MoE
(``mlp.experts.E.gate_proj/up_proj/down_proj``), written by ``xqpass.testing.checkpoints`` from each
format's published layout, loaded into ``XlaQuantizedGatedExperts``; the model's output against the
float64 model holding the format's own dequantization (fused as transformers fuses float experts), on
CPU and XLA; damaged checkpoints leave the model as it was."""
import copy
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from xqpass import XlaQuantizedGatedExperts, XlaQuantizedLinear, load_quantized_checkpoint
from xqpass.checkpoints.experts import NAMINGS, naming_from_transformers
from xqpass.testing import checkpoints as writers


def mixtral():
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)
    return MixtralForCausalLM(config).eval()


def qwen3_moe():
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                            max_position_embeddings=64)
    return Qwen3MoeForCausalLM(config).eval()


MODELS = {"mixtral": mixtral, "qwen3_moe": qwen3_moe}

#: name: (writer format, its arguments)
FORMATS = {
    "gptq int4 g16": ("gptq", dict(bits=4, group=16)),
    "gptq int8 per-channel sym v2": ("gptq", dict(bits=8, group=-1, symmetric=True, v1=False)),
    "awq g16": ("awq", dict(group=16)),
    "ct int4 g16 sym": ("compressed-tensors", dict(bits=4, group=16, symmetric=True)),
    "ct int8 channel asym": ("compressed-tensors", dict(bits=8, strategy="channel", symmetric=False)),
}


def float64_twin(float_model, banks, dense):
    """The float model in float64 with the checkpoint's dequantized weights: the exact value of the loaded
    model (routing included)."""
    twin = copy.deepcopy(float_model).double()
    twin.config._experts_implementation = "eager"  # the loop over experts: grouped_mm takes no float64
    with torch.no_grad():
        for name, (gate_up, down) in banks.items():
            twin.get_submodule(name).gate_up_proj.copy_(torch.from_numpy(gate_up))
            twin.get_submodule(name).down_proj.copy_(torch.from_numpy(down))
        for name, weight in dense.items():
            twin.get_submodule(name).weight.copy_(torch.from_numpy(weight))
    return twin


def test_names_are_transformers_conversion_mapping():
    assert naming_from_transformers("mixtral") == NAMINGS["mixtral"]
    assert naming_from_transformers("qwen3_moe") == NAMINGS["qwen2_moe"] == naming_from_transformers("olmoe")
    assert naming_from_transformers("llama") is None


def test_gate_rows_come_first_as_transformers_fuses_float_experts(tmp_path):
    """transformers' own loading of a float per-expert Mixtral checkpoint puts w1 (gate) before w3 (up)."""
    model = mixtral()
    state = {k.replace(".mlp.", ".block_sparse_moe."): v for k, v in model.state_dict().items() if "experts" not in k}
    gen = torch.Generator().manual_seed(0)
    per_expert = {p: torch.randn(4, 48 if p != "w2" else 64, 64 if p != "w2" else 48, generator=gen)
                  for p in ("w1", "w3", "w2")}
    for layer in range(2):
        for e in range(4):
            for p, bank in per_expert.items():
                state[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{p}.weight"] = bank[e].clone()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    model.config.save_pretrained(str(tmp_path))
    loaded = MixtralForCausalLM.from_pretrained(str(tmp_path)).eval()
    experts = loaded.model.layers[1].mlp.experts
    assert torch.equal(experts.gate_up_proj, torch.cat([per_expert["w1"], per_expert["w3"]], dim=1))
    assert torch.equal(experts.down_proj, per_expert["w2"])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("make", MODELS)
def test_moe_checkpoint_loads_and_matches_its_dequantization(tmp_path, make, fmt, xla_device):
    model = MODELS[make]()
    reference = copy.deepcopy(model)
    writer, args = FORMATS[fmt]
    # Qwen3-MoE: the attention projections quantized too (dense linears beside the banks)
    linears = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"] if make == "qwen3_moe" else []
    banks, dense = writers.write_moe_checkpoint(str(tmp_path), reference, writer, make, shards=2, linears=linears,
                                                **args)
    keys = set(json.load(open(tmp_path / "model.safetensors.index.json"))["weight_map"])
    stored = "block_sparse_moe.experts.3.w3" if make == "mixtral" else "mlp.experts.3.up_proj"
    assert any(k.startswith(f"model.layers.1.{stored}.") for k in keys)
    report = load_quantized_checkpoint(model, str(tmp_path))
    for i, layer in enumerate(model.model.layers):
        assert isinstance(layer.mlp.experts, XlaQuantizedGatedExperts)
        gate_up = banks[f"model.layers.{i}.mlp.experts"][0]
        assert layer.mlp.experts.gate_up_proj.weight.shape[:2] == gate_up.shape[:2]  # [E, 2I]
    assert all(isinstance(model.get_submodule(name), XlaQuantizedLinear) for name in linears)
    assert sum(layer.experts > 0 for layer in report.layers) == 4 and f"{4} expert banks" in str(report)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = float64_twin(reference, banks, dense)(ids).logits
        on_cpu = model(ids).logits
        on_xla = model.to(xla_device)(ids.to(xla_device)).logits.cpu()
    for out in (on_cpu, on_xla):
        assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-5


# -- damaged checkpoints ----------------------------------------------------------------------------------

EXPERT = "model.layers.1.block_sparse_moe.experts.2"


def _damage(tensors, damage):
    if damage == "missing expert":
        for key in [k for k in tensors if k.startswith(f"{EXPERT}.w3.")]:
            del tensors[key]
    elif damage == "missing tensor":
        del tensors[f"{EXPERT}.w2.scales"]
    elif damage == "other group size":  # expert 2's gate quantized with groups of 8
        import numpy as np

        layer, _ = writers.gptq_layer(48, 64, 4, 8, np.random.default_rng(1))
        tensors.update({f"{EXPERT}.w1.{s}": v for s, v in layer.items()})
    elif damage == "scale dtype":
        tensors[f"{EXPERT}.w1.scales"] = tensors[f"{EXPERT}.w1.scales"].float()
    elif damage == "qweight dtype":
        tensors[f"{EXPERT}.w2.qweight"] = tensors[f"{EXPERT}.w2.qweight"].to(torch.int64)
    elif damage == "extra expert":
        for key in [k for k in tensors if k.startswith(f"{EXPERT}.")]:
            tensors[key.replace("experts.2.", "experts.4.")] = tensors[key].clone()
    elif damage == "act-order":
        g_idx = tensors[f"{EXPERT}.w1.g_idx"]
        tensors[f"{EXPERT}.w1.g_idx"] = g_idx.flip(0).contiguous()
    elif damage == "router twice":
        tensors["model.layers.0.mlp.gate.weight"] = tensors["model.layers.0.block_sparse_moe.gate.weight"].clone()
    elif damage == "float expert":
        for key in [k for k in tensors if k.startswith(f"{EXPERT}.w3.")]:
            del tensors[key]
        tensors[f"{EXPERT}.w3.weight"] = torch.zeros(48, 64)


@pytest.mark.parametrize("damage, error, message", [
    ("missing expert", ValueError, rf"missing tensor {EXPERT}.w3.qweight \(GPTQ"),
    ("missing tensor", ValueError, rf"missing tensor {EXPERT}.w2.scales"),
    ("other group size", ValueError, rf"{EXPERT}.w1.qzeros: expected shape \(4, 6\)"),
    ("scale dtype", TypeError, rf"{EXPERT}.w1: model.layers.1.mlp.experts.gate_up_proj holds one layout for all "
                               rf"experts, but this expert differs from model.layers.1.block_sparse_moe.experts.0.w1: scale dtype torch.float32 vs torch.float16"),
    ("qweight dtype", TypeError, rf"{EXPERT}.w2.qweight: expected int32 \(GPTQ\), got torch.int64"),
    ("extra expert", ValueError, r"unexpected tensors \['model.layers.1.block_sparse_moe.experts.4.w1.g_idx'"),
    ("act-order", ValueError, rf"{EXPERT}.w1.g_idx and {EXPERT}.w3.g_idx differ \(an act-order vs k // group_size\)"),
    ("router twice", ValueError, r"both are the model's model.layers.0.mlp.gate.weight"),
    ("float expert", ValueError, rf"missing tensor {EXPERT}.w3.qweight"),
])
def test_damaged_moe_checkpoints_leave_the_model_as_it_was(tmp_path, damage, error, message):
    model = mixtral()
    writers.write_moe_checkpoint(str(tmp_path), model, "gptq", "mixtral", bits=4, group=16)
    file = str(tmp_path / "model.safetensors")
    tensors = load_file(file)
    _damage(tensors, damage)
    save_file(tensors, file)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(error, match=message):
        load_quantized_checkpoint(model, str(tmp_path))
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_w8a8_experts_are_refused(tmp_path):
    model = mixtral()
    writers.write_moe_checkpoint(str(tmp_path), model, "compressed-tensors", "mixtral", bits=8, strategy="channel")
    config = json.load(open(tmp_path / "config.json"))
    config["quantization_config"] = writers.ct_config(8, "channel", None, True, "int-quantized")
    json.dump(config, open(tmp_path / "config.json", "w"))
    tensors = load_file(str(tmp_path / "model.safetensors"))  # int-quantized stores int8 weights as they are
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        tensors[key.replace("weight_packed", "weight")] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] * 4,
                                                                      dtype=torch.int8)
        del tensors[key], tensors[key.replace("weight_packed", "weight_shape")]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"experts.0.w1: experts with quantized activations \(W8A8\) are not supported"):
        load_quantized_checkpoint(model, str(tmp_path))
    assert not any(isinstance(m, XlaQuantizedGatedExperts) for m in model.modules())


def test_an_experts_module_of_another_forward_is_refused(tmp_path):
    class HandWritten(nn.Module):  # 3-D banks, but no transformers experts class
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(2, 32, 16))
            self.down_proj = nn.Parameter(torch.randn(2, 16, 16))

    model = nn.Sequential()
    model.add_module("experts", HandWritten())
    writers.write_moe_checkpoint(str(tmp_path), model, "gptq", "qwen3_moe", bits=4, group=16)
    with pytest.raises(ValueError, match=r"experts: the checkpoint stores its experts quantized \(experts.0."
                                         r".*is not a transformers experts class"):
        load_quantized_checkpoint(model, str(tmp_path))
    assert isinstance(model.experts, HandWritten)


# -- act-order (desc_act) GPTQ experts -------------------------------------------------------------------

def unpack_gptq_words(words: torch.Tensor, bits: int, axis: int) -> np.ndarray:
    """int32 words, ``32 / bits`` values of ``bits`` bits a word along ``axis``, value ``i * (32/bits) + j``
    in bits ``[bits*j, bits*j + bits)`` of word ``i`` (docs/checkpoints.md), unpacked by hand in numpy."""
    w = np.moveaxis(words.numpy().view(np.uint32).astype(np.uint64), axis, 0)
    per = 32 // bits
    v = np.stack([(w >> np.uint64(bits * j)) & np.uint64(2**bits - 1) for j in range(per)], axis=1)
    return np.moveaxis(v.reshape(w.shape[0] * per, *w.shape[1:]).astype(np.int64), 0, axis)


def gptq_decoded(tensors: dict, prefix: str, bits: int) -> np.ndarray:
    """``W [N, K]`` float64 from a GPTQ (v1) linear's tensors: ``(q[k, n] - zero[g_idx[k], n]) *
    scale[g_idx[k], n]``, K in the file's order."""
    q = unpack_gptq_words(tensors[f"{prefix}.qweight"], bits, 0)  # [K, N]
    zeros = unpack_gptq_words(tensors[f"{prefix}.qzeros"], bits, 1) + 1  # v1 stores zero - 1
    scales = tensors[f"{prefix}.scales"].double().numpy()
    g_idx = tensors[f"{prefix}.g_idx"].numpy().astype(np.int64)
    return ((q - zeros[g_idx]) * scales[g_idx]).T


def write_act_order_checkpoint(path, model, make, bits):
    """A GPTQ ``desc_act: true`` MoE checkpoint as GPTQ writes one: every expert linear its own shuffled
    ``g_idx``, but gate and up of one expert the same (they see the same inputs, so the same act-order).
    Returns the experts' float64 banks decoded by hand from the file and the dense linears' weights."""
    linears = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"] if make == "qwen3_moe" else []
    _, dense = writers.write_moe_checkpoint(str(path), model, "gptq", make, bits=bits, group=16, act_order=True,
                                            linears=linears)
    file = str(path / "model.safetensors")
    tensors = load_file(file)
    renames, (gate, up, down) = writers.MOE_STYLES[make]
    banks = {}
    for name in writers.expert_modules(model):
        stored = name
        for old, new in renames:
            stored = stored.replace(old, new)
        experts = model.get_submodule(name).gate_up_proj.shape[0]
        for e in range(experts):  # up takes gate's act-order: its qweight rows are read in that order
            tensors[f"{stored}.{e}.{up}.g_idx"] = tensors[f"{stored}.{e}.{gate}.g_idx"].clone()
        gate_up = [np.concatenate([gptq_decoded(tensors, f"{stored}.{e}.{p}", bits) for p in (gate, up)])
                   for e in range(experts)]
        banks[name] = (np.stack(gate_up), np.stack([gptq_decoded(tensors, f"{stored}.{e}.{down}", bits)
                                                    for e in range(experts)]))
    save_file(tensors, file)
    return banks, dense, tensors


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("make", MODELS)
def test_act_order_gptq_experts_load_and_match_their_dequantization(tmp_path, make, bits, xla_device):
    model = MODELS[make]()
    reference = copy.deepcopy(model)
    banks, dense, tensors = write_act_order_checkpoint(tmp_path, reference, make, bits)
    assert json.load(open(tmp_path / "config.json"))["quantization_config"]["desc_act"] is True
    g_idx = [v for k, v in tensors.items() if k.endswith("g_idx")]
    assert all(not torch.equal(g.long(), torch.arange(len(g)) // 16) for g in g_idx)  # every linear act-ordered
    load_quantized_checkpoint(model, str(tmp_path))
    for layer in model.model.layers:
        experts = layer.mlp.experts
        assert isinstance(experts, XlaQuantizedGatedExperts)
        for bank in (experts.gate_up_proj, experts.down_proj):
            assert bank.input_perm.shape == (bank.num_experts, bank.in_features)
            assert len({tuple(p) for p in bank.input_perm.tolist()}) == bank.num_experts  # each expert its own
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = float64_twin(reference, banks, dense)(ids).logits
        on_cpu = model(ids).logits
        on_xla = model.to(xla_device)(ids.to(xla_device)).logits.cpu()
        decode = model(ids[:1, :1].to(xla_device)).logits.cpu()  # one row: the per-slot route
    for out in (on_cpu, on_xla):
        assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-5
    exact_one = float64_twin(reference, banks, dense)(ids[:1, :1]).logits
    assert ((decode.double() - exact_one).norm() / exact_one.norm()).item() < 1e-5


def test_act_order_experts_whose_gate_and_up_differ_are_refused(tmp_path):
    model = mixtral()
    writers.write_moe_checkpoint(str(tmp_path), model, "gptq", "mixtral", bits=4, group=16, act_order=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    first = "model.layers.0.block_sparse_moe.experts.0"
    with pytest.raises(ValueError, match=rf"{first}.w1.g_idx and {first}.w3.g_idx differ \(two different act-orders\)"
                                         r": gate and up of one expert are fused"):
        load_quantized_checkpoint(model, str(tmp_path))
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- float8 experts: per expert (HF fp8, compressed-tensors float-quantized) -------------------------------

def fp8_layer(n, k, rng, fmt, block):
    """One float8 linear as ``fmt`` stores it: ``weight`` e4m3 ``[N, K]`` and its scale over blocks of
    ``block`` = (rows, columns) (None: one scale), with its float64 value ``weight * scale``."""
    weight, values = writers.random_e4m3(rng, (n, k))
    rows, cols = (n, k) if block is None else block
    blocks = (-(-n // rows), -(-k // cols))
    scale = (rng.random(blocks) * 0.01 + 0.001).astype(np.float32)
    value = values * writers.expand_blocks(scale.astype(np.float64), rows, cols, n, k)
    if fmt == "fp8":
        stored = {"weight_scale_inv": torch.from_numpy(scale.reshape(()) if block is None else scale)}
    else:
        stored = {"weight_scale": torch.from_numpy(scale.reshape(1) if block is None else scale)}
    return {"weight": weight, **stored}, value


def fp8_config(fmt, block):
    if fmt == "fp8":
        return {"quant_method": "fp8", "activation_scheme": "dynamic",
                "weight_block_size": None if block is None else list(block)}
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
               "strategy": "tensor" if block is None else "block", "block_structure": None if block is None else list(block)}
    return {"quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}


def write_fp8_moe_checkpoint(path, float_model, style, fmt="fp8", block=(16, 16), seed=0, shards=1, linears=()):
    """Every expert of every fused experts module stored as three float8 linears named per ``style``
    (``writers.MOE_STYLES``), the dense ``linears`` alike; config.json holds the model's own config too (so
    that transformers can load it). Returns the float64 banks (gate rows first) and linears."""
    rng = np.random.default_rng(seed)
    renames, (gate, up, down) = writers.MOE_STYLES[style]

    def rename(key):
        for old, new in renames:
            key = key.replace(old, new)
        return key

    tensors, banks, dense = {}, {}, {}
    for name in writers.expert_modules(float_model):
        experts, two_inner, hidden = float_model.get_submodule(name).gate_up_proj.shape
        inner = two_inner // 2
        gate_up, down_bank = [], []
        for e in range(experts):
            values = {}
            for proj, (n, k) in ((gate, (inner, hidden)), (up, (inner, hidden)), (down, (hidden, inner))):
                layer, values[proj] = fp8_layer(n, k, rng, fmt, block)
                tensors.update({f"{rename(name)}.{e}.{proj}.{s}": v for s, v in layer.items()})
            gate_up.append(np.concatenate([values[gate], values[up]], axis=0))
            down_bank.append(values[down])
        banks[name] = (np.stack(gate_up), np.stack(down_bank))
    for name in linears:
        lin = float_model.get_submodule(name)
        layer, dense[name] = fp8_layer(lin.out_features, lin.in_features, rng, fmt, block)
        tensors.update({f"{rename(name)}.{s}": v for s, v in layer.items()})
    config = fp8_config(fmt, block)
    if fmt == "fp8":  # the float linears: named as transformers matches them
        config["modules_to_not_convert"] = ["lm_head"] + [
            n for n, m in float_model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"
            and n not in linears and ".experts." not in n]
    writers.save_checkpoint(path, tensors, float_model, config, shards, (*banks, *linears), rename)
    full = float_model.config.to_dict() | {"quantization_config": config}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(full, f)
    return banks, dense


#: name: (format, block); blocks of 16 rows tile both models' intermediate sizes (48, 32)
FP8_FORMATS = {
    "fp8 blocks 16x16": ("fp8", (16, 16)),
    "fp8 blocks 16x32 (down's K partial)": ("fp8", (16, 32)),
    "fp8 per tensor": ("fp8", None),
    "ct float block 16x16": ("ct", (16, 16)),
}


@pytest.mark.parametrize("fmt", FP8_FORMATS)
@pytest.mark.parametrize("make", MODELS)
def test_fp8_moe_checkpoint_loads_and_matches_its_dequantization(tmp_path, make, fmt, xla_device):
    model = MODELS[make]()
    reference = copy.deepcopy(model)
    kind, block = FP8_FORMATS[fmt]
    linears = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"] if make == "qwen3_moe" else []
    banks, dense = write_fp8_moe_checkpoint(str(tmp_path), reference, make, kind, block, shards=2, linears=linears)
    report = load_quantized_checkpoint(model, str(tmp_path))
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        assert isinstance(experts, XlaQuantizedGatedExperts)
        assert experts.gate_up_proj.weight.dtype == torch.float8_e4m3fn
        if block is not None:
            assert (experts.gate_up_proj.block_n, experts.gate_up_proj.block_size) == block
    assert all(isinstance(model.get_submodule(name), XlaQuantizedLinear) for name in linears)
    text = str(report)
    assert "4 expert banks" in text
    if block is not None:
        assert f"float8_e4m3fn blocks {block[0]}x{block[1]}" in text
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = float64_twin(reference, banks, dense)(ids).logits
        on_cpu = model(ids).logits
        on_xla = model.to(xla_device)(ids.to(xla_device)).logits.cpu()
    for out in (on_cpu, on_xla):
        assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-5


@pytest.mark.parametrize("make", MODELS)
def test_fp8_expert_values_are_transformers_own_dequantization(tmp_path, make):
    """transformers loads the per-expert fp8 checkpoint with dequantize=True (its Fp8Dequantize per expert,
    then its merge and gate-before-up concatenation): the banks it builds are the float64 oracle's, so the
    oracle above is the format's own reading."""
    from transformers import AutoModelForCausalLM

    reference = MODELS[make]()
    banks, _ = write_fp8_moe_checkpoint(str(tmp_path), reference, make, "fp8", (16, 16))
    config = json.load(open(tmp_path / "config.json"))
    config["quantization_config"]["dequantize"] = True
    json.dump(config, open(tmp_path / "config.json", "w"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    for name, (gate_up, down) in banks.items():
        experts = loaded.get_submodule(name)
        for got, want in ((experts.gate_up_proj, gate_up), (experts.down_proj, down)):
            np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=2**-22, atol=0)


def test_fp8_blocks_that_cut_gate_from_up_are_refused(tmp_path):
    model = mixtral()  # intermediate size 48: blocks of 32 rows would hold gate's last 16 rows and up's first 16
    write_fp8_moe_checkpoint(str(tmp_path), model, "mixtral", "fp8", (32, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model.layers.0.block_sparse_moe.experts.0.w1.weight_scale_inv: 2-D blocks "
                                         r"of 32 rows do not tile the expert's 48 intermediate features"):
        load_quantized_checkpoint(model, str(tmp_path))
    assert not any(isinstance(m, XlaQuantizedGatedExperts) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_fp8_experts_of_other_blocks_are_named(tmp_path):
    model = qwen3_moe()
    write_fp8_moe_checkpoint(str(tmp_path), model, "qwen3_moe", "fp8", (16, 16))
    file = str(tmp_path / "model.safetensors")
    tensors = load_file(file)
    key = "model.layers.1.mlp.experts.2.down_proj.weight_scale_inv"
    tensors[key] = torch.ones(2, 2)  # blocks of 32 x 16 where the config says 16 x 16
    save_file(tensors, file)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.experts.2.down_proj.weight_scale_inv: expected shape "
                                         r"\(4, 2\)"):
        load_quantized_checkpoint(model, str(tmp_path))
    assert not any(isinstance(m, XlaQuantizedGatedExperts) for m in model.modules())


# -- fused 3-D float8 banks (transformers' FP8Experts) -------------------------------------------------

def fp8_experts_model(path, monkeypatch):
    """transformers' own loading of an fp8 checkpoint into FP8Experts banks. Without a GPU its quantizer
    turns the checkpoint's dequantize on; loading and saving run on CPU, so the check is skipped here."""
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    monkeypatch.setattr(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *args, **kwargs: None)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def transformers_dequantized(bank, scale):
    """transformers' Fp8Dequantize (the block grid read from the scale's shape), float32, on the fused bank."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(None)._dequantize_one(bank.detach(), scale.detach(), torch.float32).double().numpy()


@pytest.mark.parametrize("make", MODELS)
def test_fused_fp8_banks_as_transformers_writes_them(tmp_path, monkeypatch, make, xla_device):
    """(transformers 5.24 fuses per-expert fp8 scales in blocks only: per tensor, its Concatenate(dim=1)
    of 0-d scales fails; per-tensor fused banks are written by hand below.)"""
    from transformers.integrations.finegrained_fp8 import FP8Experts

    block = (16, 16)
    model = MODELS[make]()
    reference = copy.deepcopy(model)
    banks, _ = write_fp8_moe_checkpoint(str(tmp_path / "per_expert"), reference, make, "fp8", block)
    # transformers fuses the per-expert checkpoint into FP8Experts; its state dict holds the fused banks
    loaded = fp8_experts_model(str(tmp_path / "per_expert"), monkeypatch)
    assert isinstance(loaded.model.layers[0].mlp.experts, FP8Experts)
    os.makedirs(tmp_path / "fused")
    save_file({k: v.contiguous() for k, v in loaded.state_dict().items()}, str(tmp_path / "fused" / "model.safetensors"))
    json.dump(json.load(open(tmp_path / "per_expert" / "config.json")), open(tmp_path / "fused" / "config.json", "w"))
    # ... loads them back as they are, and saves them fused
    fused = fp8_experts_model(str(tmp_path / "fused"), monkeypatch)
    fused.save_pretrained(str(tmp_path / "saved"))
    keys = set(load_file(str(tmp_path / "saved" / "model.safetensors")))
    bank = "model.layers.1.mlp.experts"
    assert {f"{bank}.gate_up_proj", f"{bank}.gate_up_proj_scale_inv", f"{bank}.down_proj",
            f"{bank}.down_proj_scale_inv"} <= keys and not any(".experts.0." in k for k in keys)

    report = load_quantized_checkpoint(model, str(tmp_path / "saved"))
    assert "4 expert banks" in str(report)
    for name, (gate_up, down) in banks.items():
        ours, theirs = model.get_submodule(name), fused.get_submodule(name)
        assert isinstance(ours, XlaQuantizedGatedExperts)
        for mine, weight, scale, want in ((ours.gate_up_proj, theirs.gate_up_proj, theirs.gate_up_proj_scale_inv, gate_up),
                                         (ours.down_proj, theirs.down_proj, theirs.down_proj_scale_inv, down)):
            assert torch.equal(mine.weight.view(torch.uint8), weight.view(torch.uint8))
            # transformers' own dequantization of its fused bank is the float64 oracle's value
            np.testing.assert_allclose(transformers_dequantized(weight, scale), want, rtol=2**-22, atol=0)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = float64_twin(reference, banks, {})(ids).logits
        on_cpu = model(ids).logits
        on_xla = model.to(xla_device)(ids.to(xla_device)).logits.cpu()
    for out in (on_cpu, on_xla):
        assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-5


def test_fp8_experts_loaded_per_expert_are_saved_per_expert(tmp_path, monkeypatch):
    """transformers reverses its conversion when it saves a model it fused from per-expert names: the
    round trip writes per-expert names again, which load as per-expert checkpoints."""
    model = qwen3_moe()
    reference = copy.deepcopy(model)
    banks, _ = write_fp8_moe_checkpoint(str(tmp_path / "per_expert"), reference, "qwen3_moe", "fp8", (16, 16))
    fp8_experts_model(str(tmp_path / "per_expert"), monkeypatch).save_pretrained(str(tmp_path / "saved"))
    keys = set(load_file(str(tmp_path / "saved" / "model.safetensors")))
    assert "model.layers.1.mlp.experts.5.up_proj.weight_scale_inv" in keys
    assert "model.layers.1.mlp.experts.gate_up_proj" not in keys
    load_quantized_checkpoint(model, str(tmp_path / "saved"))
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = float64_twin(reference, banks, {})(ids).logits
        out = model(ids).logits
    assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-5


def _fused_checkpoint(path, model, block=(16, 16), seed=0):
    """Fused fp8 banks written by hand, the names and shapes transformers' FP8Experts holds (``block`` None:
    one scale a half, ``[E, 2, 1]`` and ``[E, 1, 1]``); returns ``{experts module: (gate_up, down)}`` in
    float64, each block's scale repeated over it by hand."""
    rng = np.random.default_rng(seed)
    tensors, banks = {}, {}
    for name in writers.expert_modules(model):
        module = model.get_submodule(name)
        values = []
        for bank, halves in (("gate_up_proj", 2), ("down_proj", 1)):
            experts, n, k = getattr(module, bank).shape
            weight, value = writers.random_e4m3(rng, (experts, n, k))
            rows, cols = (n // halves, k) if block is None else block
            scale = torch.rand(experts, -(-n // rows), -(-k // cols)) * 0.01 + 0.001
            tensors[f"{name}.{bank}"] = weight
            tensors[f"{name}.{bank}_scale_inv"] = scale
            values.append(np.stack([value[e] * writers.expand_blocks(scale[e].double().numpy(), rows, cols, n, k)
                                    for e in range(experts)]))
        banks[name] = tuple(values)
    writers.save_checkpoint(path, dict(tensors), model, fp8_config("fp8", block) | {"modules_to_not_convert": ["lm_head"]},
                            layers=writers.expert_modules(model))
    return tensors, banks


@pytest.mark.parametrize("make", MODELS)
def test_fused_fp8_banks_per_tensor(tmp_path, make, xla_device):
    model = MODELS[make]()
    reference = copy.deepcopy(model)
    tensors, banks = _fused_checkpoint(str(tmp_path), reference, None)
    load_quantized_checkpoint(model, str(tmp_path))
    for name, (gate_up, down) in banks.items():
        experts = model.get_submodule(name)
        assert experts.gate_up_proj.block_n == gate_up.shape[1] // 2  # one block a half: gate's, up's
        for bank, want in (("gate_up_proj", gate_up), ("down_proj", down)):  # transformers reads the same values
            got = transformers_dequantized(tensors[f"{name}.{bank}"], tensors[f"{name}.{bank}_scale_inv"])
            np.testing.assert_allclose(got, want, rtol=2**-22, atol=0)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = float64_twin(reference, banks, {})(ids).logits
        on_cpu = model(ids).logits
        on_xla = model.to(xla_device)(ids.to(xla_device)).logits.cpu()
    for out in (on_cpu, on_xla):
        assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-5


@pytest.mark.parametrize("damage, error, message", [
    ("scale shape", ValueError, r"model.layers.1.mlp.experts.down_proj_scale_inv: expected shape \(6, 4, 2\) for 6 "
                                r"experts, out=64, in=32, weight_block_size=\[16, 16\], got \(6, 2, 2\)"),
    ("weight dtype", TypeError, r"model.layers.0.mlp.experts.gate_up_proj: expected float8_e4m3fn \(HF fp8\), got "
                                r"torch.bfloat16"),
    ("missing scale", ValueError, r"missing tensor model.layers.0.mlp.experts.down_proj_scale_inv"),
    ("both", ValueError, r"model.layers.0.mlp.experts: the checkpoint stores its experts both fused"),
    ("halves", ValueError, r"gate_up_proj_scale_inv: 2-D blocks of 64 rows do not tile the bank's halves of 32"),
])
def test_damaged_fused_banks_are_named(tmp_path, damage, error, message):
    model = qwen3_moe()
    _fused_checkpoint(str(tmp_path), model, (64, 16) if damage == "halves" else (16, 16))
    file = str(tmp_path / "model.safetensors")
    tensors = load_file(file)
    if damage == "scale shape":
        tensors["model.layers.1.mlp.experts.down_proj_scale_inv"] = torch.ones(6, 2, 2)
    elif damage == "weight dtype":
        tensors["model.layers.0.mlp.experts.gate_up_proj"] = torch.zeros(6, 64, 64, dtype=torch.bfloat16)
    elif damage == "missing scale":
        del tensors["model.layers.0.mlp.experts.down_proj_scale_inv"]
    elif damage == "both":
        tensors["model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv"] = torch.ones(2, 4)
    save_file(tensors, file)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        load_quantized_checkpoint(model, str(tmp_path))
    assert not any(isinstance(m, XlaQuantizedGatedExperts) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_fp4_experts_are_refused():
    from xqpass.checkpoints.float8 import FineGrainedFP8

    with pytest.raises(ValueError, match=r"fp8 expert_dtype='fp4' is not supported \(known: 'fp8'\): fp4 experts are "
                                         r"packed e2m1 values"):
        FineGrainedFP8({"quant_method": "fp8", "weight_block_size": [128, 128], "expert_dtype": "fp4"})
