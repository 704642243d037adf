"""Damaged checkpoints: for each format the project writes, every tensor of each quantized layer and the
float tensors beside them, stored with another dtype, another shape, dropped, or cut off by a truncated
file; the header corrupted. Each is an error naming the tensor (or the file), raised before the model
is touched: its modules and every tensor of its state_dict are exactly as they were."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from xqpass import load_quantized_checkpoint
from xqpass.testing import checkpoints as writers


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 16, bias=True)
        self.norm = nn.LayerNorm(16)
        self.mlp = nn.Linear(16, 8, bias=False)
        self.head = nn.Linear(8, 4)  # stays float

    def forward(self, x):
        return self.head(self.mlp(self.norm(self.proj(x))))


LAYERS = ("proj", "mlp")
WRITERS = {
    "gptq-act-order": lambda path, model: writers.write_gptq_checkpoint(path, model, 4, 8, act_order=True, layers=LAYERS),
    "gptq8-v2": lambda path, model: writers.write_gptq_checkpoint(path, model, 8, 8, v1=False, layers=LAYERS),
    "awq": lambda path, model: writers.write_awq_checkpoint(path, model, 8, layers=LAYERS),
    "ct-pack-asym": lambda path, model: writers.write_ct_checkpoint(path, model, 4, "group", 8, False, layers=LAYERS),
    "ct-w8a8-asym": lambda path, model: writers.write_ct_checkpoint(path, model, 8, "group", 8, False,
                                                                    fmt="int-quantized", layers=LAYERS),
}
INTEGER, FLOATING = (torch.int8, torch.int32, torch.int64), (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# the dtypes each format's published layout allows (docs/checkpoints.md, "Errors"), per tensor of a layer
SCALES = (torch.float16, torch.bfloat16, torch.float32)
GPTQ = {"qweight": (torch.int32,), "qzeros": (torch.int32,), "scales": SCALES, "g_idx": (torch.int32, torch.int64)}
ALLOWED = {
    "gptq-act-order": GPTQ, "gptq8-v2": GPTQ,
    "awq": {"qweight": (torch.int32,), "qzeros": (torch.int32,), "scales": SCALES},
    "ct-pack-asym": {"weight_packed": (torch.int32,), "weight_scale": SCALES, "weight_shape": (torch.int32, torch.int64),
                     "weight_zero_point": (torch.int32,)},
    "ct-w8a8-asym": {"weight": (torch.int8,), "weight_scale": SCALES, "weight_zero_point": (torch.int8,)},
}
FLOAT_TENSORS = ("norm.weight", "head.weight", "head.bias")  # loaded as load_state_dict would: any float
OPTIONAL = {("gptq8-v2", "g_idx")}  # without act-order (desc_act: false) g_idx is k // g, the default


def allowed(fmt: str, key: str) -> tuple:
    layer, _, suffix = key.partition(".")
    if layer in LAYERS and suffix != "bias":
        return ALLOWED[fmt][suffix]
    return FLOATING  # a bias, a float tensor: cast to the model's dtype


def tensor_keys(fmt: str) -> list[str]:
    keys = [f"{layer}.{suffix}" for layer in LAYERS for suffix in ALLOWED[fmt]]
    return keys + ["proj.bias", *FLOAT_TENSORS]


CASES = [(fmt, key, damage) for fmt in WRITERS for key in tensor_keys(fmt)
         for damage in ("dtype", "shape", "drop", "truncate")]


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """Per format: the valid checkpoint's directory and its tensors, written once."""
    out = {}
    for fmt, write in WRITERS.items():
        path = str(tmp_path_factory.mktemp(fmt))
        write(path, Tiny())
        out[fmt] = (path, load_file(os.path.join(path, "model.safetensors")))
    return out


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: type(m) for n, m in model.named_modules()}


def assert_refused(model, path, error, message):
    before = snapshot(model)
    with pytest.raises(error) as caught:
        load_quantized_checkpoint(model, path)
    assert re.search(message, str(caught.value)), (message, str(caught.value))
    tensors, modules = snapshot(model)
    assert modules == before[1] and tensors.keys() == before[0].keys()
    assert all(tensors[k].dtype == before[0][k].dtype and torch.equal(tensors[k], before[0][k]) for k in tensors)


def damaged_copy(valid, fmt, tmp_path, tensors):
    path = str(tmp_path / "damaged")
    os.makedirs(path)
    shutil.copy(os.path.join(valid[fmt][0], "config.json"), path)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return path


def data_ranges(file):
    """safetensors layout: 8-byte little-endian header length, the JSON header, then the data; each
    tensor's ``data_offsets`` are relative to the data's start. -> {key: (start, end)} in the file."""
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    return {key: (8 + length + entry["data_offsets"][0], 8 + length + entry["data_offsets"][1])
            for key, entry in header.items() if key != "__metadata__"}


def test_the_cases_cover_every_tensor_of_each_checkpoint(valid):
    for fmt, (_, tensors) in valid.items():
        assert set(tensors) == set(tensor_keys(fmt)) | {"norm.bias"}, fmt
        for key, t in tensors.items():  # the writers store what the layouts allow
            assert t.dtype in allowed(fmt, key), (fmt, key, t.dtype)


@pytest.mark.parametrize("fmt, key, damage", CASES)
def test_a_damaged_tensor_is_an_error_naming_it_and_the_model_is_untouched(valid, tmp_path, fmt, key, damage):
    tensors = dict(valid[fmt][1])
    original = tensors[key]
    name = re.escape(key)
    model = Tiny().eval()
    if damage == "dtype":  # every dtype of the other kind, and of its own kind those the layout does not allow
        for i, dtype in enumerate(d for d in (*INTEGER, *FLOATING) if d not in allowed(fmt, key)):
            tensors[key] = original.to(dtype)
            path = damaged_copy(valid, fmt, tmp_path / str(i), tensors)
            assert_refused(model, path, TypeError, rf"{name}\b.*{str(dtype).removeprefix('torch.')}")
        return
    if damage == "truncate":  # the file cut inside this tensor's bytes
        path = damaged_copy(valid, fmt, tmp_path, tensors)
        file = os.path.join(path, "model.safetensors")
        start, end = data_ranges(file)[key]
        with open(file, "rb") as f:
            data = f.read()
        with open(file, "wb") as f:
            f.write(data[: (start + end) // 2 if end > start + 1 else start])
        assert_refused(model, path, ValueError, rf"model.safetensors.*{name} is cut")
        return
    if damage == "shape":
        tensors[key] = torch.cat([original, original[:1]])  # one more row (or element)
    else:
        del tensors[key]
        if (fmt, key.partition(".")[2]) in OPTIONAL:
            load_quantized_checkpoint(model, damaged_copy(valid, fmt, tmp_path, tensors))
            return
    assert_refused(model, damaged_copy(valid, fmt, tmp_path, tensors), ValueError, rf"{name}\b")


@pytest.mark.parametrize("fmt", WRITERS)
@pytest.mark.parametrize("damage", ["header-garbage", "header-length", "empty", "short-length"])
def test_a_corrupt_header_is_an_error_naming_the_file(valid, tmp_path, fmt, damage):
    path = damaged_copy(valid, fmt, tmp_path, dict(valid[fmt][1]))
    file = os.path.join(path, "model.safetensors")
    with open(file, "rb") as f:
        data = bytearray(f.read())
    if damage == "header-garbage":
        data[8:24] = b"\xff" * 16
    elif damage == "header-length":
        data[:8] = (len(data) * 2).to_bytes(8, "little")
    elif damage == "empty":
        data = b""
    else:
        data = data[:5]
    with open(file, "wb") as f:
        f.write(data)
    assert_refused(Tiny().eval(), path, ValueError, rf"{re.escape(file)}: not a readable safetensors file")
