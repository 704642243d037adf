"""Tensor-parallel plans and partition specs (no devices needed), and the GSPMD tests on 4 XLA:CPU
devices, run in their own process because torch_xla's SPMD mode is process-wide."""
import os
import subprocess
import sys

import pytest
from torch import nn

from xqpass import XlaQuantizedLinear, quantize_model
from xqpass.quant.layouts import tensor_parallel_dims
from xqpass.sharding import linear_partition_specs, resolve_plan
from xqpass.testing.models import DecoderConfig, TinyDecoder

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA_PLAN = {"*q_proj": "column", "*k_proj": "column", "*v_proj": "column", "*o_proj": "row",
              "*gate_proj": "column", "*up_proj": "column", "*down_proj": "row"}


def test_spmd_suite_on_four_xla_cpu_devices(tmp_path):
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="4", XQPASS_SPMD_WORKER="1",
               XQPASS_HLO_DUMP=str(tmp_path),
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={tmp_path} --xla_dump_hlo_as_text".strip())
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(HERE, "spmd")],
                            env=env, capture_output=True, text=True, timeout=900)
    print(result.stdout[-20000:], result.stderr[-5000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


def quantized(in_features=256, out_features=128, **kwargs):
    return XlaQuantizedLinear.from_float(nn.Linear(in_features, out_features, bias=True), **kwargs)


@pytest.mark.parametrize("kwargs, style, expected", [
    (dict(bits=8), "column", {"weight": ("m", None), "weight_scaler": ("m",), "bias": ("m",)}),
    (dict(bits=8, symmetric=False), "row", {"weight": (None, "m")}),  # per-channel scale, zp, bias whole
    (dict(bits=4), "row", {"weight": (None, "m")}),  # packed [N, K/2]: bytes split, never a nibble pair
    (dict(bits=8, block_size=64), "column",
     {"weight": (None, None, "m"), "weight_scaler": (None, "m"), "bias": ("m",)}),
    (dict(bits=4, block_size=64, symmetric=False), "row",
     {"weight": ("m", None, None), "weight_scaler": ("m", None), "zero_point": ("m", None)}),
    (dict(bits=4, block_size=64, symmetric=False, block_layout="rows"), "row",
     {"weight": (None, "m"), "weight_scaler": (None, "m"), "zero_point": (None, "m")}),
    (dict(bits=4, block_size=64, symmetric=False, block_layout="rows"), "column",
     {"weight": ("m", None), "weight_scaler": ("m", None), "zero_point": ("m", None), "bias": ("m",)}),
])
def test_partition_specs_follow_each_layout(kwargs, style, expected):
    assert linear_partition_specs("layer", quantized(**kwargs), style, "m", 4) == expected


def test_plain_linears_split_too():
    linear = nn.Linear(64, 32)
    assert linear_partition_specs("l", linear, "column", "m", 4) == {"weight": ("m", None), "bias": ("m",)}
    assert linear_partition_specs("l", linear, "row", "m", 4) == {"weight": (None, "m")}


@pytest.mark.parametrize("layer, style, size, message", [
    (quantized(256, 100), "column", 8, "output features divisible by 8, got 100"),
    (quantized(96, 64), "row", 64, "input features divisible by 64, got 96"),
    (quantized(20, 64, bits=4), "row", 4, "would split a packed int4 byte"),
    (quantized(256, 64, bits=8, block_size=64), "row", 8, "would split a block of 64"),
    (quantized(256, 64, bits=4, block_size=64, block_layout="rows"), "row", 8, "would split a block of 64"),
])
def test_a_split_that_does_not_fit_the_layout_is_refused(layer, style, size, message):
    with pytest.raises(ValueError, match=message):
        linear_partition_specs("layers.0.mlp", layer, style, "model", size)


def test_plan_globs_first_match_wins_and_typos_are_errors():
    model = TinyDecoder(DecoderConfig(layers=2))
    quantize_model(model, bits=8, filter_fn=lambda m, name: name.endswith("q_proj"))
    styles = resolve_plan(dict(model.named_modules()), {"layers.0.*proj": "row", **LLAMA_PLAN})
    assert styles["layers.0.q_proj"] == "row" and styles["layers.1.q_proj"] == "column"
    assert styles["layers.1.down_proj"] == "row" and len(styles) == 14
    with pytest.raises(ValueError, match=r"matched no linear layer: \['\*qproj'\]"):
        resolve_plan(dict(model.named_modules()), {"*qproj": "column"})
    with pytest.raises(ValueError, match="expected one of .*'column', 'row'.*got 'col'"):
        resolve_plan(dict(model.named_modules()), {"*q_proj": "col"})
    with pytest.raises(TypeError, match="plan must be a mapping"):
        resolve_plan(dict(model.named_modules()), [("*q_proj", "column")])


def test_a_mesh_must_have_the_axis():
    from xqpass.sharding import mesh_axis_size

    with pytest.raises(TypeError, match="torch_xla.distributed.spmd.Mesh"):
        mesh_axis_size(object(), "model")

    class Mesh:  # the two attributes xqpass reads from torch_xla's Mesh
        axis_names, mesh_shape = ("data", "model"), (1, 4)

    assert mesh_axis_size(Mesh(), "model") == 4
    with pytest.raises(ValueError, match=r"mesh has axes \('data', 'model'\), not 'tp'"):
        mesh_axis_size(Mesh(), "tp")


def test_tensor_parallel_dims_rejects_unknown_styles():
    with pytest.raises(ValueError, match="got 'diagonal'"):
        tensor_parallel_dims("diagonal", -1, False)
