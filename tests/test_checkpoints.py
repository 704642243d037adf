"""GPTQ checkpoints built here from the format's published layout (numpy packing written in the test),
loaded with load_quantized_checkpoint, against the format's own dequantization in float64."""
import functools
import json
import os
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from xqpass import XlaQuantizedLinear, load_quantized_checkpoint
from xqpass.testing import checkpoints as writers

LAYERS = ("proj", "mlp")  # Toy's quantized linears; head stays float
write_checkpoint = functools.partial(writers.write_gptq_checkpoint, layers=LAYERS)
write_awq_checkpoint = functools.partial(writers.write_awq_checkpoint, layers=LAYERS)
write_ct_checkpoint = functools.partial(writers.write_ct_checkpoint, layers=LAYERS)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 48, bias=True)
        self.norm = nn.LayerNorm(48)
        self.mlp = nn.Linear(48, 32, bias=False)
        self.head = nn.Linear(32, 8)  # left in float (no qweight in the checkpoint)

    def forward(self, x):
        return self.head(self.mlp(self.norm(self.proj(x))))


def expected_output(model_before, oracle, x):
    with torch.no_grad():
        h = x.double() @ torch.from_numpy(oracle["proj"]).t() + model_before.proj.bias.double()
        h = torch.nn.functional.layer_norm(h, (48,), model_before.norm.weight.double(), model_before.norm.bias.double())
        h = h @ torch.from_numpy(oracle["mlp"]).t()
        return h @ model_before.head.weight.double().t() + model_before.head.bias.double()


def assert_matches_dequantization(model, model_before, oracle, rows=4):
    """The loaded model's output against the float64 model with the format's dequantized weights."""
    x = torch.randn(rows, 64)
    with torch.no_grad():
        out = model(x)
    exact = expected_output(model_before, oracle, x)
    assert torch.allclose(out.double(), exact, rtol=1e-4, atol=1e-4), (out.double() - exact).abs().max()


@pytest.mark.parametrize("bits, group, act_order, v1, shards", [
    (4, 16, False, True, 1), (4, 16, True, True, 2), (8, 16, False, False, 1), (4, 8, True, False, 3),
])
def test_gptq_checkpoint_loads_and_matches_its_dequantization(tmp_path, bits, group, act_order, v1, shards):
    torch.manual_seed(0)
    model = Toy().eval()
    reference = Toy().eval()
    reference.load_state_dict(model.state_dict())
    oracle = write_checkpoint(str(tmp_path), reference, bits, group, act_order, v1, shards)
    report = load_quantized_checkpoint(model, str(tmp_path))
    assert [l.name for l in report.layers] == ["proj", "mlp"] and report.other_tensors == 4
    assert all(l.bits == bits and l.group_size == group and l.act_order == act_order for l in report.layers)
    assert isinstance(model.proj, XlaQuantizedLinear) and type(model.head) is nn.Linear
    assert model.proj.weight.dtype == torch.uint8
    assert model.proj.weight.numel() == 48 * 64 // (2 if bits == 4 else 1)  # half a byte a 4-bit weight
    assert_matches_dequantization(model, reference, oracle, rows=5)


def test_loaded_model_runs_with_xq_openxla(tmp_path, xla_device):
    model, reference = Toy().eval(), Toy().eval()
    reference.load_state_dict(model.state_dict())
    oracle = write_checkpoint(str(tmp_path), reference, 4, 16, act_order=True)
    load_quantized_checkpoint(model, str(tmp_path))
    x = torch.randn(3, 64)
    torch._dynamo.reset()
    compiled = torch.compile(model.to(xla_device), backend="xq_openxla")
    with torch.no_grad():
        out = compiled(x.to(xla_device)).cpu()
    assert torch.allclose(out.double(), expected_output(reference, oracle, x), rtol=1e-3, atol=1e-3)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: type(m) for n, m in model.named_modules()}


@pytest.mark.parametrize("damage, message", [
    ("method", r"quant_method 'awq_foo' is not supported"),
    ("missing", r"missing tensor mlp.qzeros"),
    ("shape", r"mlp.scales: expected shape \(3, 32\).*got \(4, 32\)"),
    ("group", r"group_size=48 does not divide in_features=64"),
    ("truncated", r"not a readable safetensors file"),
    ("unexpected", r"unexpected tensors \['extra.weight'\]"),
])
def test_bad_checkpoints_leave_the_model_as_it_was(tmp_path, damage, message):
    path = str(tmp_path)
    model = Toy().eval()
    write_checkpoint(path, model, 4, 16)
    file = os.path.join(path, "model.safetensors")
    config_file = os.path.join(path, "config.json")
    if damage == "method":
        config = json.load(open(config_file))
        config["quantization_config"]["quant_method"] = "awq_foo"
        json.dump(config, open(config_file, "w"))
    elif damage == "group":
        config = json.load(open(config_file))
        config["quantization_config"]["group_size"] = 48
        json.dump(config, open(config_file, "w"))
    elif damage == "truncated":
        data = open(file, "rb").read()
        open(file, "wb").write(data[: len(data) // 2])
    else:
        from safetensors.torch import load_file

        tensors = load_file(file)
        if damage == "missing":
            del tensors["mlp.qzeros"]
        elif damage == "shape":
            tensors["mlp.scales"] = torch.zeros(4, 32, dtype=torch.float16)
        elif damage == "unexpected":
            tensors["extra.weight"] = torch.zeros(2)
        save_file(tensors, file)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_quantized_checkpoint(model, path)
    after = _snapshot(model)
    assert after[1] == before[1] and all(torch.equal(after[0][k], before[0][k]) for k in before[0])


@pytest.mark.parametrize("group", [8, 16])
def test_awq_checkpoint_loads_and_matches_its_dequantization(tmp_path, group):
    torch.manual_seed(1)
    model, reference = Toy().eval(), Toy().eval()
    reference.load_state_dict(model.state_dict())
    oracle = write_awq_checkpoint(str(tmp_path), reference, group)
    report = load_quantized_checkpoint(model, str(tmp_path))
    assert [(l.name, l.format, l.bits, l.group_size, l.symmetric) for l in report.layers] == [
        ("proj", "awq", 4, group, False), ("mlp", "awq", 4, group, False)]
    assert_matches_dequantization(model, reference, oracle)


@pytest.mark.parametrize("bits, strategy, symmetric", [
    (4, "group", True), (4, "group", False), (8, "channel", True), (4, "channel", False), (8, "group", False),
])
def test_compressed_tensors_pack_quantized(tmp_path, bits, strategy, symmetric):
    torch.manual_seed(2)
    model, reference = Toy().eval(), Toy().eval()
    reference.load_state_dict(model.state_dict())
    oracle = write_ct_checkpoint(str(tmp_path), reference, bits, strategy, 16, symmetric)
    report = load_quantized_checkpoint(model, str(tmp_path))
    assert [(l.name, l.bits, l.symmetric) for l in report.layers] == [("proj", bits, symmetric), ("mlp", bits, symmetric)]
    assert model.proj.weight.dtype == torch.int8
    assert model.proj.weight.numel() == 48 * 64 // (2 if bits == 4 else 1)
    assert_matches_dequantization(model, reference, oracle)


def per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """The dynamic per-token int8 activations of compressed-tensors W8A8 (vLLM's scheme), in float64:
    amax|x| / 127 a row, round half to even, as quantized values times their scale."""
    x = x.double().numpy()
    scale = np.abs(x).max(axis=-1, keepdims=True) / 127
    return torch.from_numpy(np.clip(np.round(x / scale), -127, 127) * scale)


@pytest.mark.parametrize("strategy, symmetric", [("channel", True), ("group", False)])
def test_compressed_tensors_int_quantized_is_w8a8(tmp_path, strategy, symmetric):
    torch.manual_seed(4)
    model, reference = Toy().eval(), Toy().eval()
    reference.load_state_dict(model.state_dict())
    oracle = write_ct_checkpoint(str(tmp_path), reference, 8, strategy, 16, symmetric, fmt="int-quantized")
    report = load_quantized_checkpoint(model, str(tmp_path))
    assert all(l.quantize_activation and l.bits == 8 for l in report.layers) and "W8A8" in str(report)
    assert model.proj.quantize_activation and model.proj.weight.dtype == torch.int8
    assert model.proj.weight.numel() == 48 * 64
    x = torch.randn(4, 64)
    with torch.no_grad():
        out = model(x)
        h = per_token_int8(x) @ torch.from_numpy(oracle["proj"]).t() + reference.proj.bias.double()
        h = torch.nn.functional.layer_norm(h, (48,), reference.norm.weight.double(), reference.norm.bias.double())
        h = per_token_int8(h) @ torch.from_numpy(oracle["mlp"]).t()
        exact = h @ reference.head.weight.double().t() + reference.head.bias.double()
    assert torch.allclose(out.double(), exact, rtol=1e-4, atol=1e-4), (out.double() - exact).abs().max()


def test_compressed_tensors_int_quantized_needs_dynamic_per_token_activations(tmp_path):
    model = Toy().eval()
    write_ct_checkpoint(str(tmp_path), Toy().eval(), 8, "channel", 16, True, fmt="int-quantized")
    with open(os.path.join(tmp_path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"].update(strategy="tensor", dynamic=False)
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="expected input_activations .*strategy: token, dynamic: true"):
        load_quantized_checkpoint(model, str(tmp_path))
    assert type(model.proj) is nn.Linear


@pytest.mark.parametrize("fmt", ["gptq", "awq", "ct"])
def test_byte_view_conversions_equal_the_unpacking_they_replace(tmp_path, fmt, monkeypatch):
    """GPTQ, AWQ and compressed-tensors read their words as bytes on little-endian hosts; the value by
    value unpacking (big-endian hosts) must load the same bytes."""
    import xqpass.checkpoints.tensors as checkpoint_tensors

    write = {"gptq": lambda: write_checkpoint(str(tmp_path), Toy(), 4, 16),
             "awq": lambda: write_awq_checkpoint(str(tmp_path), Toy(), 16),
             "ct": lambda: write_ct_checkpoint(str(tmp_path), Toy(), 4, "group", 16, False)}[fmt]
    write()
    fast = Toy()
    load_quantized_checkpoint(fast, str(tmp_path))
    monkeypatch.setattr(checkpoint_tensors, "BYTE_VIEWS", False)
    slow = Toy()
    load_quantized_checkpoint(slow, str(tmp_path))
    for name in LAYERS:
        assert torch.equal(getattr(fast, name).weight, getattr(slow, name).weight)


class OneLinear(nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.proj = nn.Linear(k, n)

    def forward(self, x):
        return self.proj(x)


@settings(max_examples=25)
@given(fmt=st.sampled_from(["gptq4", "gptq8", "gptq4-v2", "awq", "ct4", "ct8", "ct8-w8a16-channel"]),
       n=st.sampled_from([8, 16, 40]), groups=st.integers(1, 4), group=st.sampled_from([8, 16, 32]),
       act_order=st.booleans(), symmetric=st.booleans(), seed=st.integers(0, 2**16))
def test_any_shape_group_symmetry_and_act_order_loads_exactly(fmt, n, groups, group, act_order, symmetric, seed):
    """Hypothesis over shapes, group sizes, symmetry and act-order permutations: the loaded layer
    computes the format's float64 dequantization."""
    k = groups * group
    float_model = OneLinear(k, n)
    with tempfile.TemporaryDirectory() as path:
        if fmt.startswith("gptq"):
            oracle = writers.write_gptq_checkpoint(path, float_model, int(fmt[4]), group, act_order=act_order,
                                                   v1=not fmt.endswith("v2"), seed=seed)
        elif fmt == "awq":
            oracle = writers.write_awq_checkpoint(path, float_model, group, seed=seed)
        else:
            strategy = "channel" if fmt.endswith("channel") else "group"
            oracle = writers.write_ct_checkpoint(path, float_model, int(fmt[2]), strategy, group, symmetric, seed=seed)
        model = OneLinear(k, n)
        report = load_quantized_checkpoint(model, path)
    assert report.layers[0].act_order == (act_order and fmt.startswith("gptq"))
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(x)
    expected = x.double() @ torch.from_numpy(oracle["proj"]).t() + float_model.proj.bias.double()
    assert torch.allclose(out.double(), expected, rtol=1e-4, atol=1e-4), (out.double() - expected).abs().max()


def _edit_config(path, **changes):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    config["quantization_config"].update(changes)
    with open(file, "w") as f:
        json.dump(config, f)


def _retype(path, key, dtype):
    """The checkpoint's tensor ``key`` stored as ``dtype`` (values cast, shape kept)."""
    from safetensors.torch import load_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, file)


def _load_refused(model, path, error, message):
    before = _snapshot(model)
    with pytest.raises(error, match=message):
        load_quantized_checkpoint(model, path)
    after = _snapshot(model)
    assert after[1] == before[1] and all(torch.equal(after[0][k], before[0][k]) for k in before[0])


WRITE = {"gptq": lambda path, model: write_checkpoint(path, model, 4, 16),
         "awq": lambda path, model: write_awq_checkpoint(path, model, 16),
         "ct": lambda path, model: write_ct_checkpoint(path, model, 4, "group", 16, False),
         "ct-w8a8": lambda path, model: write_ct_checkpoint(path, model, 8, "group", 16, False, fmt="int-quantized")}


@pytest.mark.parametrize("fmt, key, dtype", [
    ("gptq", "proj.qweight", torch.float32), ("gptq", "proj.qweight", torch.int64), ("gptq", "mlp.qzeros", torch.float32),
    ("gptq", "proj.scales", torch.int32), ("gptq", "proj.g_idx", torch.float32), ("gptq", "proj.bias", torch.int32),
    ("awq", "proj.qweight", torch.float32), ("awq", "mlp.qweight", torch.int64), ("awq", "proj.scales", torch.int32),
    ("ct", "proj.weight_packed", torch.float32), ("ct", "proj.weight_packed", torch.int64),
    ("ct", "proj.weight_zero_point", torch.float32), ("ct", "mlp.weight_scale", torch.int32),
    ("ct", "proj.weight_shape", torch.float32),
    ("ct-w8a8", "proj.weight", torch.int32), ("ct-w8a8", "proj.weight", torch.float32),
    ("ct-w8a8", "mlp.weight_zero_point", torch.float32),
    ("gptq", "norm.weight", torch.int64), ("ct", "head.bias", torch.int32),  # float tensors outside the layers
])
def test_a_tensor_of_the_wrong_dtype_is_a_type_error_naming_it(tmp_path, fmt, key, dtype):
    path = str(tmp_path)
    model = Toy().eval()
    WRITE[fmt](path, model)
    _retype(path, key, dtype)
    _load_refused(model, path, TypeError, rf"{key}: .*{str(dtype).removeprefix('torch.')}")


@pytest.mark.parametrize("fmt, key, dtype", [
    ("gptq", "scales", torch.float32), ("gptq", "g_idx", torch.int64), ("awq", "scales", torch.float32),
    ("ct", "weight_shape", torch.int32),
])
def test_every_dtype_a_format_allows_loads_exactly(tmp_path, fmt, key, dtype):
    """Other dtypes the layouts allow load (casts that keep every value: the oracle stays exact)."""
    path = str(tmp_path)
    torch.manual_seed(5)
    model, reference = Toy().eval(), Toy().eval()
    reference.load_state_dict(model.state_dict())
    oracle = WRITE[fmt](path, reference)
    _retype(path, f"proj.{key}", dtype)
    load_quantized_checkpoint(model, path)
    assert_matches_dequantization(model, reference, oracle)


@pytest.mark.parametrize("index, message", [
    ("{not json", r"model.safetensors.index.json: not a readable JSON index"),
    ('{"metadata": {}}', r"model.safetensors.index.json: expected an object with a 'weight_map'"),
    ('{"weight_map": ["a"]}', r"model.safetensors.index.json: 'weight_map' must map tensor names"),
    ('{"weight_map": {"proj.qweight": "model-00009-of-00009.safetensors"}}', r"model-00009-of-00009.safetensors: .*no such file"),
])
def test_a_bad_index_file_is_a_value_error_naming_it(tmp_path, index, message):
    path = str(tmp_path)
    model = Toy().eval()
    write_checkpoint(path, model, 4, 16, shards=2)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        f.write(index)
    _load_refused(model, path, ValueError, message)


@pytest.mark.parametrize("fmt, changes, message", [
    ("gptq", {"checkpoint_format": "marlin"}, r"GPTQ checkpoint_format='marlin' is not supported \(known: 'gptq', 'gptq_v2'\)"),
    ("gptq", {"bits": 3}, r"GPTQ bits=3 is not supported \(known: 4, 8\)"),
    ("gptq", {"sym": "false"}, r"GPTQ sym='false' is not supported \(known: True, False\)"),
    ("gptq", {"group_size": "16"}, r"group_size must be an integer, got '16'"),
    ("awq", {"version": "gemv"}, r"AWQ version='gemv' is not supported \(known: 'gemm'\)"),
    ("awq", {"backend": "llm-awq"}, r"AWQ backend='llm-awq' is not supported \(known: 'autoawq'\)"),
    ("awq", {"zero_point": False}, r"AWQ zero_point=False is not supported \(known: True\): symmetric AWQ stores no zeros"),
    ("awq", {"bits": 8}, r"AWQ bits=8 is not supported \(known: 4\)"),
    ("ct", {"format": "marlin-24"}, r"compressed-tensors format='marlin-24' is not supported"),
    ("ct", {"weights": {"actorder": "group"}}, r"actorder='group' is not supported \(known: None, 'weight', 'static'\)"),
    ("ct", {"weights": {"strategy": "tensor"}}, r"strategy='tensor' is not supported \(known: 'group', 'channel'\)"),
    ("ct", {"weights": {"type": "float"}}, r"type='float' is not supported"),
    ("ct-w8a8", {"weights": {"num_bits": 4}}, r"num_bits=4 is not supported \(known: 8\)"),
])
def test_a_config_value_the_format_does_not_know_is_refused(tmp_path, fmt, changes, message):
    """Each value a format reads with a default is one it knows; others are errors, never the default."""
    path = str(tmp_path)
    model = Toy().eval()
    WRITE[fmt](path, model)
    if "weights" in changes:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        config["quantization_config"]["config_groups"]["group_0"]["weights"].update(changes["weights"])
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
    else:
        _edit_config(path, **changes)
    _load_refused(model, path, ValueError, message)


@pytest.mark.parametrize("bits, v1", [(4, True), (8, False), (4, False)])
def test_gptq_symmetric_checkpoint_loads_exactly_and_reports_sym(tmp_path, bits, v1):
    torch.manual_seed(6)
    model, reference = Toy().eval(), Toy().eval()
    reference.load_state_dict(model.state_dict())
    oracle = write_checkpoint(str(tmp_path), reference, bits, 16, v1=v1, symmetric=True)
    report = load_quantized_checkpoint(model, str(tmp_path))
    assert [l.symmetric for l in report.layers] == [True, True] and " sym" in str(report) and "asym" not in str(report)
    assert_matches_dequantization(model, reference, oracle)


def test_gptq_sym_true_over_other_zeros_is_refused(tmp_path):
    """sym: true promises zeros at the midpoint; asymmetric zeros under it (or a v1 / v2 mix-up, which
    moves every zero by one) are an error naming the zeros, never a report that says sym."""
    path = str(tmp_path)
    model = Toy().eval()
    write_checkpoint(path, model, 4, 16)  # random (asymmetric) zeros
    _edit_config(path, sym=True)
    _load_refused(model, path, ValueError, r"proj.qzeros: sym: true stores every zero at 8, got zeros \[")
    write_checkpoint(path, model, 4, 16, v1=True, symmetric=True)
    _edit_config(path, checkpoint_format="gptq_v2")  # v1 zeros (7 stored) read as v2
    _load_refused(model, path, ValueError, r"proj.qzeros: sym: true stores every zero at 8, got zeros \[7\]")


def test_gptq_report_reads_symmetry_from_the_zeros(tmp_path):
    """sym: false over midpoint zeros: the layer is symmetric, and the report says so."""
    path = str(tmp_path)
    model = Toy().eval()
    write_checkpoint(path, model, 4, 16, symmetric=True)
    _edit_config(path, sym=False)
    assert [l.symmetric for l in load_quantized_checkpoint(model, path).layers] == [True, True]
    model = Toy().eval()
    write_checkpoint(path, model, 4, 16)
    assert [l.symmetric for l in load_quantized_checkpoint(model, path).layers] == [False, False]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape, axis", [((16, 24), 0), ((16, 24), 1), ((8, 3, 16), -1), ((24, 5), 0)])
def test_unpack_words_reads_what_the_published_packing_wrote(bits, shape, axis):
    """The one word-unpacking helper every format uses, against the numpy packer the test writers use
    (first value in the low bits), on rows, columns, the last axis and a transposed (strided) input."""
    from xqpass.checkpoints.tensors import unpack_words

    values = np.random.default_rng(bits).integers(0, 2**bits, size=shape)
    words = torch.from_numpy(writers.pack_words(values, bits, axis))
    assert torch.equal(unpack_words(words, bits, axis), torch.from_numpy(values))
    if len(shape) == 2:  # the same words read through a transpose
        assert torch.equal(unpack_words(words.t().contiguous().t(), bits, axis), torch.from_numpy(values))


@pytest.mark.parametrize("fmt", ["gptq", "awq", "ct", "ct-w8a8"])
def test_each_format_declares_the_tensors_its_writer_stores(tmp_path, fmt):
    """A format class (xqpass/checkpoints/format.py), built from its checkpoint's config, declares each
    tensor a layer stores with the shape the independent writer gave it."""
    from safetensors.torch import load_file

    from xqpass.checkpoints import FORMATS

    WRITE[fmt](str(tmp_path), Toy())
    with open(os.path.join(tmp_path, "config.json")) as f:
        config = json.load(f)["quantization_config"]
    cls = FORMATS[config["quant_method"]]
    assert cls.quant_method == config["quant_method"]
    layout = cls(config)
    specs = layout.specs(layout.group("proj", 64))
    assert set(specs) - {"bias"} <= set(cls.TENSORS)
    stored = {key.partition(".")[2]: t for key, t in load_file(os.path.join(tmp_path, "model.safetensors")).items()
              if key.startswith("proj.")}
    assert set(stored) <= set(specs) and "bias" in stored
    assert all(tuple(t.shape) == specs[s].shape(64, 48) and t.dtype in specs[s].dtypes for s, t in stored.items())


def test_the_config_is_checked_once_before_any_tensor_is_read(tmp_path, monkeypatch):
    """The format is built from the config once, first: a value it does not know is refused before a
    shard is opened or a layer read."""
    import xqpass.checkpoints as checkpoints

    path = str(tmp_path)
    write_checkpoint(path, Toy(), 4, 16)
    _edit_config(path, bits=3)
    opened = []
    monkeypatch.setattr(checkpoints._Tensors, "__init__", lambda self, path: opened.append(path))
    _load_refused(Toy().eval(), path, ValueError, r"GPTQ bits=3 is not supported \(known: 4, 8\)")
    assert opened == []
