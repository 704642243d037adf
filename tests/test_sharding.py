"""Tensor-parallel plans and partition specs (no devices needed), sharding refused without SPMD mode,
and the GSPMD tests on 4 XLA:CPU devices and on one, each run in its own process because torch_xla's
SPMD mode and device count are process-wide."""
import os
import subprocess
import sys

import pytest
from torch import nn

from xqpass import XlaQuantizedLinear, load_quantized_checkpoint, quantize_model, shard_model
from xqpass.quant.layouts import Layout
from xqpass.sharding import linear_partition_specs, resolve_plan, tensor_parallel_dims
from xqpass.testing.models import DecoderConfig, TinyDecoder

HERE = os.path.dirname(os.path.abspath(__file__))
SPMD = os.path.join(HERE, "spmd")
ONE_DEVICE = os.path.join(SPMD, "test_spmd_one_device.py")
LLAMA_PLAN = {"*q_proj": "column", "*k_proj": "column", "*v_proj": "column", "*o_proj": "row",
              "*gate_proj": "column", "*up_proj": "column", "*down_proj": "row"}


def run_spmd_tests(tmp_path, devices: int, *args: str):
    """pytest ``args`` in a process of its own with SPMD on ``devices`` XLA:CPU devices and XLA's HLO
    dump in ``tmp_path`` (tests/spmd/conftest.py)."""
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(devices), XQPASS_SPMD_WORKER="1",
               XQPASS_HLO_DUMP=str(tmp_path),
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={tmp_path} --xla_dump_hlo_as_text".strip())
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                            env=env, capture_output=True, text=True, timeout=900)
    print(result.stdout[-20000:], result.stderr[-5000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


def test_spmd_suite_on_four_xla_cpu_devices(tmp_path):
    run_spmd_tests(tmp_path, 4, SPMD, f"--ignore={ONE_DEVICE}")


def test_spmd_on_one_xla_cpu_device(tmp_path):
    run_spmd_tests(tmp_path, 1, ONE_DEVICE)


def test_sharding_without_spmd_mode_says_to_turn_it_on(tmp_path):
    """This process never calls use_spmd(): the mesh is refused before the model changes, not deep
    inside torch_xla."""
    import numpy as np
    import torch
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    from test_checkpoints import Toy, write_checkpoint

    if xr.is_spmd():
        pytest.skip("SPMD mode is on in this process (XLA_USE_SPMD)")
    n = xr.global_runtime_device_count()
    mesh = xs.Mesh(np.arange(n), (1, n), ("data", "model"))
    model = TinyDecoder(DecoderConfig(layers=1))
    quantize_model(model, bits=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"SPMD mode, which is off: call torch_xla\.runtime\.use_spmd\(\) first"):
        shard_model(model, mesh, LLAMA_PLAN)
    assert all(t.device.type == "cpu" and torch.equal(t, before[k]) for k, t in model.state_dict().items())

    toy, reference = Toy().eval(), Toy().eval()
    reference.load_state_dict(toy.state_dict())
    write_checkpoint(str(tmp_path), reference, bits=4, group=16)
    with pytest.raises(ValueError, match=r"call torch_xla\.runtime\.use_spmd\(\) first"):
        load_quantized_checkpoint(toy, str(tmp_path), mesh=mesh, plan={"proj": "column", "mlp": "column"})
    assert type(toy.proj) is nn.Linear and all(t.device.type == "cpu" for t in toy.state_dict().values())


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
        tensor_parallel_dims("diagonal", Layout())
