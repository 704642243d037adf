"""Float8 checkpoints: Hugging Face native fp8 (weight + weight_scale_inv, which multiplies) and
compressed-tensors float-quantized (FP8_DYNAMIC per channel with per-token e4m3 activations, FP8_BLOCK,
per tensor, groups), written from the published layouts (xqpass.testing.checkpoints), loaded, against a
float64 dequantization written here; compressed-tensors' own compressor and dequantize as the oracle;
damaged checkpoints and configs refused before the model is touched."""
import json
import os
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from xqpass import XlaQuantizedLinear, load_quantized_checkpoint
from xqpass.testing import checkpoints as writers

LAYERS = ("proj", "mlp")


class Toy(nn.Module):
    """300 and 200 are not multiples of 128: the last 2-D blocks are partial along N and K."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(300, 200, bias=True)
        self.norm = nn.LayerNorm(200)
        self.mlp = nn.Linear(200, 64, bias=False)
        self.head = nn.Linear(64, 8)  # stays float

    def forward(self, x):
        return self.head(self.mlp(self.norm(self.proj(x))))


def e4m3_values() -> np.ndarray:
    """Every finite non-negative e4m3fn value, ascending, from the bit layout (bias 7, 3 mantissa bits)."""
    values = [m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7) for e in range(16) for m in range(8)]
    return np.array(sorted(v for v in set(values) if v <= 448))


def quantize_tokens_e4m3(x: np.ndarray) -> np.ndarray:
    """float64 per-token e4m3 (compressed-tensors' dynamic token activations): scale = amax / 448 (float32),
    nearest grid value, ties to the even mantissa; returns the dequantized activations."""
    grid = e4m3_values()
    scale = (np.abs(x).max(-1, keepdims=True) / 448).astype(np.float32).astype(np.float64)
    a = np.minimum(np.abs(x / scale), 448)
    hi = np.clip(np.searchsorted(grid, a), 1, len(grid) - 1)
    lo = hi - 1
    pick = np.where(a - grid[lo] < grid[hi] - a, lo, np.where(a - grid[lo] > grid[hi] - a, hi, np.where(lo % 2, hi, lo)))
    return np.sign(x) * grid[pick] * scale


def expected_output(reference: Toy, oracle: dict, x: torch.Tensor, tokens_e4m3: bool = False) -> np.ndarray:
    """The float64 model with the format's dequantized weights (and, FP8_DYNAMIC, e4m3 activations)."""
    r = {k: v.detach().double().numpy() for k, v in reference.state_dict().items()}
    act = quantize_tokens_e4m3 if tokens_e4m3 else (lambda h: h)
    h = act(x.double().numpy()) @ oracle["proj"].T + r["proj.bias"]
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5) * r["norm.weight"] + r["norm.bias"]
    h = act(h) @ oracle["mlp"].T
    return h @ r["head.weight"].T + r["head.bias"]


WRITERS = {  # name -> (writer, W8A8-FP8)
    "hf-fp8-128x128": (lambda p, m: writers.write_hf_fp8_checkpoint(p, m, layers=LAYERS), False),
    "hf-fp8-16x32-shards": (lambda p, m: writers.write_hf_fp8_checkpoint(p, m, (16, 32), shards=2, layers=LAYERS), False),
    "hf-fp8-per-tensor": (lambda p, m: writers.write_hf_fp8_checkpoint(p, m, None, layers=LAYERS), False),
    "hf-fp8-bf16-scales": (lambda p, m: writers.write_hf_fp8_checkpoint(p, m, layers=LAYERS, scale_dtype=np.float16), False),
    "ct-fp8-dynamic": (lambda p, m: writers.write_ct_fp8_checkpoint(p, m, "channel", layers=LAYERS), True),
    "ct-fp8-block": (lambda p, m: writers.write_ct_fp8_checkpoint(p, m, "block", activations="group", layers=LAYERS), False),
    "ct-fp8-tensor": (lambda p, m: writers.write_ct_fp8_checkpoint(p, m, "tensor", activations=None, layers=LAYERS), False),
    "ct-fp8-group": (lambda p, m: writers.write_ct_fp8_checkpoint(p, m, "group", group=100, activations=None,
                                                                   layers=LAYERS), False),
}


@pytest.mark.parametrize("fmt", WRITERS)
def test_a_float8_checkpoint_loads_and_computes_its_dequantization(tmp_path, fmt):
    torch.manual_seed(0)
    model, reference = Toy().eval(), Toy().eval()
    reference.load_state_dict(model.state_dict())
    write, w8a8 = WRITERS[fmt]
    oracle = write(str(tmp_path), reference)
    report = load_quantized_checkpoint(model, str(tmp_path))
    assert [layer.name for layer in report.layers] == list(LAYERS) and report.other_tensors == 4
    assert all(layer.weight_dtype == torch.float8_e4m3fn and layer.quantize_activation == w8a8 for layer in report.layers)
    assert isinstance(model.proj, XlaQuantizedLinear) and type(model.head) is nn.Linear
    assert model.proj.weight.dtype == torch.float8_e4m3fn and model.proj.weight.shape == (200, 300)  # a byte a weight
    for name in LAYERS:  # the stored values and scales, moved: the dequantization is exact
        layer = model.get_submodule(name)
        got = layer.layout.dequantize(layer.weight, layer.weight_scaler, None, torch.float64).numpy()
        assert np.array_equal(got, oracle[name]), name
    x = torch.randn(4, 300)
    with torch.no_grad():
        out = model(x).double().numpy()
    expected = expected_output(reference, oracle, x, tokens_e4m3=w8a8)
    assert np.allclose(out, expected, rtol=1e-4, atol=1e-4), np.abs(out - expected).max()


def test_the_report_names_dtype_blocks_activations_and_the_note(tmp_path):
    writers.write_hf_fp8_checkpoint(str(tmp_path / "hf"), Toy(), layers=LAYERS)
    text = str(load_quantized_checkpoint(Toy().eval(), str(tmp_path / "hf")))
    assert "proj: float8_e4m3fn blocks 128x128" in text
    assert "note: activations stay 16-bit (weight-only)" in text
    writers.write_ct_fp8_checkpoint(str(tmp_path / "ct"), Toy(), "channel", layers=LAYERS)
    text = str(load_quantized_checkpoint(Toy().eval(), str(tmp_path / "ct")))
    assert "proj: float8_e4m3fn per-channel W8A8-FP8 (per-token e4m3 activations)" in text and "note" not in text


def test_loaded_blocks_run_under_xq_openxla(tmp_path, xla_device):
    model, reference = Toy().eval(), Toy().eval()
    reference.load_state_dict(model.state_dict())
    oracle = writers.write_hf_fp8_checkpoint(str(tmp_path), reference, layers=LAYERS)
    load_quantized_checkpoint(model, str(tmp_path))
    x = torch.randn(3, 300)
    torch._dynamo.reset()
    compiled = torch.compile(model.to(xla_device), backend="xq_openxla")
    with torch.no_grad():
        out = compiled(x.to(xla_device)).cpu().double().numpy()
    assert np.allclose(out, expected_output(reference, oracle, x), rtol=1e-3, atol=1e-3)


# ---- compressed-tensors' own compressor and dequantization as the oracle

@settings(max_examples=10, deadline=None)
@given(preset=st.sampled_from(["FP8_DYNAMIC", "FP8_BLOCK", "tensor"]), n=st.sampled_from([8, 130, 200]),
       k=st.sampled_from([64, 200, 300]), seed=st.integers(0, 2**16))
def test_the_librarys_compressed_checkpoint_equals_its_dequantization(tmp_path_factory, preset, n, k, seed):
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    if preset == "tensor":  # FP8 weights per tensor, weight-only
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=8, type="float",
                                                                                   strategy="tensor", symmetric=True))
    else:
        scheme = preset_name_to_scheme(preset, ["Linear"])
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    rows, cols = {"FP8_DYNAMIC": (1, k), "FP8_BLOCK": (128, 128), "tensor": (n, k)}[preset]
    blocks = (-(-n // rows), -(-k // cols))
    amax = torch.nn.functional.pad(w.abs(), (0, blocks[1] * cols - k, 0, blocks[0] * rows - n))
    amax = amax.reshape(blocks[0], rows, blocks[1], cols).amax(dim=(1, 3))
    scale = (amax / 448).reshape({"FP8_DYNAMIC": (n, 1), "tensor": (1,)}.get(preset, blocks))
    compressed = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
    oracle = dequantize(compressed["weight"].double(), scale.double(), None, args=scheme.weights, dtype=torch.float64)

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(k, n, bias=False)

    acts = scheme.input_activations
    config = {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": scheme.weights.model_dump(),
                                      "input_activations": acts.model_dump() if acts else None}}}}
    path = str(tmp_path_factory.mktemp("ct"))
    save_file({f"proj.{key}": t.contiguous() for key, t in compressed.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    model = One()
    load_quantized_checkpoint(model, path)
    layer = model.proj
    assert layer.quantize_activation == (preset == "FP8_DYNAMIC")
    got = layer.layout.dequantize(layer.weight, layer.weight_scaler, None, torch.float64)
    assert torch.equal(got, oracle)


# ---- refused: the model untouched

def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: type(m) for n, m in model.named_modules()}


def assert_refused(path, error, message):
    model = Toy().eval()
    before = snapshot(model)
    with pytest.raises(error) as caught:
        load_quantized_checkpoint(model, path)
    assert re.search(message, str(caught.value)), (message, str(caught.value))
    tensors, modules = snapshot(model)
    assert modules == before[1] and all(torch.equal(tensors[k], before[0][k]) for k in tensors)


DAMAGE_FORMATS = {"hf-fp8": ("hf-fp8-128x128", "weight_scale_inv"), "ct-fp8-dynamic": ("ct-fp8-dynamic", "weight_scale"),
                  "ct-fp8-block": ("ct-fp8-block", "weight_scale")}


def _rewrite(tmp_path, fmt, edit):
    path = str(tmp_path / "ckpt")
    WRITERS[DAMAGE_FORMATS[fmt][0]][0](path, Toy())
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)
    return path


@pytest.mark.parametrize("fmt", DAMAGE_FORMATS)
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("damage, error, message", [
    ("weight-float16", TypeError, r"{layer}\.weight: expected float8_e4m3fn .* got torch\.float16"),
    ("weight-e5m2", TypeError, r"{layer}\.weight: expected float8_e4m3fn .* got torch\.float8_e5m2"),
    ("weight-int8", TypeError, r"{layer}\.weight: expected float8_e4m3fn .* got torch\.int8"),
    ("scale-int32", TypeError, r"{layer}\.{scale}: expected float16 or bfloat16 or float32 .* got torch\.int32"),
    ("scale-float8", TypeError, r"{layer}\.{scale}: expected float16 or bfloat16 or float32 .* got torch\.float8"),
    ("weight-shape", ValueError, r"{layer}\.weight: expected shape"),
    ("scale-shape", ValueError, r"{layer}\.{scale}: expected shape"),
    ("weight-missing", ValueError, r"missing tensor {layer}\.weight\b"),
    ("scale-missing", TypeError, r"{layer}\.weight: the checkpoint stores torch\.float8_e4m3fn .*\(missing {layer}\.weight_scale"),
])
def test_a_damaged_tensor_is_an_error_naming_it(tmp_path, fmt, layer, damage, error, message):
    scale = DAMAGE_FORMATS[fmt][1]
    weight_key, scale_key = f"{layer}.weight", f"{layer}.{scale}"

    def edit(t):
        what, _, how = damage.partition("-")
        key = weight_key if what == "weight" else scale_key
        if how == "missing":
            del t[key]
        elif how == "shape":
            t[key] = torch.cat([t[key], t[key][:1]])
        else:
            dtype = {"float16": torch.float16, "e5m2": torch.float8_e5m2, "int8": torch.int8, "int32": torch.int32,
                     "float8": torch.float8_e4m3fn}[how]
            t[key] = t[key].float().to(dtype)

    assert_refused(_rewrite(tmp_path, fmt, edit), error, message.format(layer=layer, scale=scale))


def _edit_config(path, edit):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    edit(config["quantization_config"])
    with open(file, "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("writer, edit, message", [
    ("hf-fp8-128x128", lambda c: c.update(activation_scheme="static"), r"fp8 activation_scheme='static' is not supported"),
    ("hf-fp8-128x128", lambda c: c.update(scale_fmt="ue8m0"), r"fp8 scale_fmt='ue8m0' is not supported.*float8_e8m0fnu"),
    ("hf-fp8-128x128", lambda c: c.update(weight_block_size=[128]), r"weight_block_size=\[128\] is not supported"),
    ("hf-fp8-128x128", lambda c: c.update(weight_block_size=[64, 64]), r"proj\.weight_scale_inv: expected shape \(4, 5\)"),
    ("hf-fp8-128x128", lambda c: c.update(modules_to_not_convert="lm_head"), r"modules_to_not_convert='lm_head'"),
    ("hf-fp8-128x128", lambda c: c.update(modules_to_not_convert=["mlp"]), r"mlp: the checkpoint stores it quantized "
                                                                           r"\(mlp\.weight_scale_inv\).*modules_to_not_convert"),
    ("ct-fp8-dynamic", lambda c: c["config_groups"]["group_0"]["input_activations"].update(dynamic=False),
     r"float-quantized: expected input_activations .*static activation scales are not supported"),
    ("ct-fp8-dynamic", lambda c: c["config_groups"]["group_0"]["weights"].update(num_bits=4), r"num_bits=4 is not supported"),
    ("ct-fp8-block", lambda c: c["config_groups"]["group_0"]["weights"].update(block_structure=None),
     r"block_structure=None is not supported"),
    ("ct-fp8-block", lambda c: c["config_groups"]["group_0"]["weights"].update(strategy="attn_head"),
     r"strategy='attn_head' is not supported"),
])
def test_a_config_the_formats_do_not_have_is_refused(tmp_path, writer, edit, message):
    path = str(tmp_path)
    WRITERS[writer][0](path, Toy())
    _edit_config(path, edit)
    assert_refused(path, ValueError, message)


def test_modules_to_not_convert_is_matched_as_transformers_matches_it(tmp_path):
    from xqpass.checkpoints.float8 import FineGrainedFP8

    fmt = FineGrainedFP8({"quant_method": "fp8", "modules_to_not_convert": ["lm_head", "layers.1", "mlp.gate"]})
    assert fmt.skips("lm_head") and fmt.skips("model.lm_head") and fmt.skips("layers.1.attn")
    assert not fmt.skips("layers.11.attn") and not fmt.skips("mlp.gate_proj") and fmt.skips("mlp.gate")
    # a listed linear stored in float loads as float, beside the quantized ones
    model, reference = Toy().eval(), Toy().eval()
    reference.load_state_dict(model.state_dict())
    writers.write_hf_fp8_checkpoint(str(tmp_path), reference, layers=("proj",), modules_to_not_convert=["mlp", "head"])
    report = load_quantized_checkpoint(model, str(tmp_path))
    assert [layer.name for layer in report.layers] == ["proj"] and type(model.mlp) is nn.Linear
    assert torch.equal(model.mlp.weight, reference.mlp.weight)


@pytest.mark.parametrize("fmt", ["hf-fp8-128x128", "ct-fp8-dynamic", "ct-fp8-block", "ct-fp8-tensor", "ct-fp8-group"])
def test_each_format_declares_the_tensors_its_writer_stores(tmp_path, fmt):
    from xqpass.checkpoints import FORMATS

    WRITERS[fmt][0](str(tmp_path), Toy())
    with open(os.path.join(tmp_path, "config.json")) as f:
        config = json.load(f)["quantization_config"]
    layout = FORMATS[config["quant_method"]].for_config(config)
    specs = layout.specs(layout.group("proj", 300))
    stored = {key.partition(".")[2]: t for key, t in load_file(os.path.join(tmp_path, "model.safetensors")).items()
              if key.startswith("proj.")}
    assert set(stored) == set(specs) and set(specs) - {"bias"} <= set(type(layout).TENSORS)
    assert all(tuple(t.shape) == specs[s].shape(300, 200) and t.dtype in specs[s].dtypes for s, t in stored.items())
