"""A mesh of one XLA:CPU device (CPU_NUM_DEVICES=1, its own process started by tests/test_sharding.py):
the script that splits a model over a pod runs unchanged on a laptop, every tensor whole on the one
device, and computes what the unsharded model computes on the CPU."""
import copy

import numpy as np
import pytest
import torch
import torch_xla
import torch_xla.distributed.spmd as xs
import torch_xla.runtime as xr
from torch import nn

from xqpass import XlaQuantizedLinear, load_quantized_checkpoint, shard_model
from test_spmd import DECODER, FORMATS, LLAMA_PLAN, K, N, local_shapes, quantized_decoder, relative_error
from test_spmd_checkpoints import PLANS, WRITERS, assert_computes_the_formats_model
from test_checkpoints import Toy


@pytest.fixture(scope="module")
def one_device_mesh():
    n = xr.global_runtime_device_count()
    assert n == 1, f"these tests expect one XLA:CPU device (CPU_NUM_DEVICES=1), got {n}"
    return xs.Mesh(np.arange(n), (1, n), ("data", "model"))  # the docs' mesh, as on a pod


@pytest.mark.parametrize("style", ["column", "row"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_one_device_layer_matches_unsharded(fmt, style, one_device_mesh):
    layer = XlaQuantizedLinear.from_float(nn.Linear(K, N, bias=True), **FORMATS[fmt])
    x = torch.randn(4, K)
    expected = layer(x)  # the unsharded layer on CPU (the op's CPU reference)
    model = nn.Sequential(copy.deepcopy(layer))
    report = shard_model(model, one_device_mesh, {"0": style})  # placed from the host
    model.to(torch_xla.device())
    assert "1 linears split over mesh axis 'model' (1 device)" in str(report)
    assert local_shapes(model[0].weight) == [tuple(layer.weight.shape)]
    assert relative_error(model(x.to(torch_xla.device())).cpu(), expected) < 1e-5
    assert torch.equal(model[0].weight.cpu(), layer.weight)


@pytest.mark.parametrize("placement", ["on device", "from host"])
def test_one_device_megatron_plan_on_a_quantized_decoder(placement, one_device_mesh):
    model = quantized_decoder()
    x = torch.randn(2, 8, DECODER.dim)
    expected = model(x)
    if placement == "on device":
        model.to(torch_xla.device())
        report = shard_model(model, one_device_mesh, LLAMA_PLAN)
    else:
        report = shard_model(model, one_device_mesh, LLAMA_PLAN)
        model.to(torch_xla.device())
    assert str(report).startswith("xqpass: 14 linears split over mesh axis 'model' (1 device)")
    layer = model.layers[0]
    assert local_shapes(layer.q_proj.weight) == [(DECODER.dim, DECODER.dim)]
    assert local_shapes(layer.down_proj.weight) == [(DECODER.dim, DECODER.hidden // 2)]  # packed int4
    out = torch.compile(model, backend="openxla")(x.to(torch_xla.device())).cpu()
    assert relative_error(out, expected) < 1e-4


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("fmt", WRITERS)
def test_one_device_checkpoint_load_matches_the_formats_dequantization(fmt, plan, one_device_mesh, tmp_path):
    torch.manual_seed(3)
    model, reference = Toy().eval(), Toy().eval()
    reference.load_state_dict(model.state_dict())
    oracle = WRITERS[fmt](str(tmp_path), reference)
    report = load_quantized_checkpoint(model, str(tmp_path), mesh=one_device_mesh, plan=PLANS[plan])
    assert [(layer.name, layer.split) for layer in report.layers] == [("proj", PLANS[plan]["proj"]), ("mlp", "column")]
    assert all(t.device.type == "xla" for t in [*model.parameters(), *model.buffers()])
    assert local_shapes(model.proj.weight) == [tuple(model.proj.weight.shape)]
    assert local_shapes(model.head.weight) == [(8, 32)]  # the float head, placed by the plan too
    assert_computes_the_formats_model(model, fmt, str(tmp_path), reference, oracle)
