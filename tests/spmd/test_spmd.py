"""GSPMD on 4 XLA:CPU devices: split quantized linears hold 1/4 of their bytes on each device, compute
what the unsharded layer computes, and the compiled HLO never moves an integer weight."""
import copy

import pytest
import torch
import torch_xla
import torch_xla.debug.metrics as met
from torch import nn

import xqpass
from xqpass import XlaQuantizedLinear
from xqpass.sharding import shard_model
from xqpass.testing.models import DecoderConfig, TinyDecoder

from conftest import collectives

K, N = 512, 256
FORMATS = {  # name: from_float kwargs
    "int8": dict(bits=8),
    "int8-asym": dict(bits=8, symmetric=False),
    "int4-packed": dict(bits=4),
    "int8-blocks": dict(bits=8, block_size=64),
    "int4-packed-blocks-asym": dict(bits=4, block_size=64, symmetric=False),
    "int4-packed-rows-asym": dict(bits=4, block_size=64, symmetric=False, block_layout="rows"),
    "w8a8": dict(bits=8, quantize_activation=True),
}
LLAMA_PLAN = {"*q_proj": "column", "*k_proj": "column", "*v_proj": "column", "*o_proj": "row",
              "*gate_proj": "column", "*up_proj": "column", "*down_proj": "row"}


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def local_shapes(t):
    return [tuple(shard.shape) for shard, _ in torch_xla._XLAC._get_local_shards([t])[0]]


def assert_weights_stay_put(hlo_modules, weight_elements, all_reduces=None):
    """Nothing weight-sized moves between devices, no integers are gathered or permuted (all-reduces
    of integer partial sums are activations); optionally count the all-reduces."""
    found = [c for hlo in hlo_modules for c in collectives(hlo)]
    moved = [c for c in found if c[0] != "all-reduce" and any(not t.startswith(("f", "bf")) for t, _ in c[1])]
    assert not moved, f"integer data moves between devices: {moved}"
    big = [c for c in found if any(size >= weight_elements // 4 for _, size in c[1])]
    assert not big, f"weight-sized data moves between devices: {big}"
    if all_reduces is not None:
        assert sum(op == "all-reduce" for op, _ in found) == all_reduces, found


def sharded_copy(layer, mesh, style):
    model = nn.Sequential(layer).to(torch_xla.device())
    report = shard_model(model, mesh, {"0": style})
    assert [(entry.name, entry.style) for entry in report.layers] == [("0", style)]
    return model


@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("style", ["column", "row"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_split_layer_matches_unsharded(fmt, style, rows, mesh, compiled_hlo):
    layer = XlaQuantizedLinear.from_float(nn.Linear(K, N, bias=True), **FORMATS[fmt])
    x = torch.randn(rows, K)
    expected = layer(x)  # the unsharded layer on CPU (the op's CPU reference)
    model = sharded_copy(copy.deepcopy(layer), mesh, style)
    q = model[0]
    full = tuple(q.weight.shape)
    split_dim = {"column": q.weight.dim() - 1 if q.weight.dim() == 3 else 0,
                 "row": 0 if q.weight.dim() == 3 else 1}[style]
    want = list(full)
    want[split_dim] //= 4
    assert local_shapes(q.weight) == [tuple(want)] * 4

    out = model(x.to(torch_xla.device())).cpu()
    assert relative_error(out, expected) < 1e-5
    # row-parallel: GSPMD sums the partial products once
    assert_weights_stay_put(compiled_hlo(), K * N, all_reduces={"column": 0, "row": 1}[style])
    assert torch.equal(q.weight.cpu(), layer.weight)  # the shards put back together are the weight


@pytest.mark.parametrize("fmt", ["int8", "int4-packed"])
def test_split_k_lowering_is_not_used_on_a_split_weight(fmt, mesh, compiled_hlo):
    k = 2 * K  # a shape of its own: a graph compiled (and cached) by another test would dump nothing
    layer = XlaQuantizedLinear.from_float(nn.Linear(k, N), **FORMATS[fmt])
    x = torch.randn(1, k)
    expected = layer(x)
    model = sharded_copy(copy.deepcopy(layer), mesh, "row")
    out = model(x.to(torch_xla.device())).cpu()
    assert relative_error(out, expected) < 1e-5
    assert_weights_stay_put(compiled_hlo(), k * N, all_reduces=1)


DECODER = DecoderConfig(layers=2, dim=128, heads=4, hidden=256)


def quantized_decoder():
    """Attention int8 per channel, MLP packed int4 in groups of 32 by rows, asymmetric."""
    model = TinyDecoder(DECODER)
    xqpass.quantize_model(model, bits=8, filter_fn=lambda m, name: "_proj" in name and "mlp" not in name
                          and not name.endswith(("gate_proj", "up_proj", "down_proj")))
    xqpass.quantize_model(model, bits=4, block_size=32, symmetric=False, block_layout="rows",
                          filter_fn=lambda m, name: name.endswith(("gate_proj", "up_proj", "down_proj")))
    return model


def compile_count():
    data = met.metric_data("CompileTime")
    return 0 if data is None else data[0]


@pytest.mark.parametrize("placement", ["on device", "from host"])
def test_megatron_plan_on_a_quantized_decoder(placement, mesh, compiled_hlo):
    model = quantized_decoder()
    batch = 2 if placement == "on device" else 3  # graphs of their own: a cached graph dumps no HLO
    x = torch.randn(batch, 8, DECODER.dim)
    expected = model(x)
    device = torch_xla.device()
    if placement == "on device":
        model.to(device)
        report = shard_model(model, mesh, LLAMA_PLAN)
    else:  # host tensors are placed shard by shard, then the rest (norms) replicated
        report = shard_model(model, mesh, LLAMA_PLAN)
        model.to(device)
    assert len(report.layers) == 14 and "14 linears split" in str(report)
    layer = model.layers[0]
    assert local_shapes(layer.q_proj.weight) == [(DECODER.dim // 4, DECODER.dim)] * 4
    assert local_shapes(layer.down_proj.weight) == [(DECODER.dim, DECODER.hidden // 2 // 4)] * 4  # packed
    assert local_shapes(layer.down_proj.weight_scaler) == [(DECODER.dim, DECODER.hidden // 32 // 4)] * 4
    # row-parallel per-channel scale: whole on each device
    assert torch_xla._XLAC._get_xla_sharding_spec(layer.o_proj.weight_scaler) in ("", "{replicated}")

    compiled = torch.compile(model, backend="openxla")
    out = compiled(x.to(device)).cpu()
    assert relative_error(out, expected) < 1e-4
    # one all-reduce per row-parallel layer (o_proj, down_proj), nothing else
    assert_weights_stay_put(compiled_hlo(), DECODER.dim * DECODER.dim, all_reduces=2 * DECODER.layers)
    before = compile_count()
    again = compiled(torch.randn(batch, 8, DECODER.dim).to(device)).cpu()
    assert again.shape == out.shape and compile_count() == before  # no recompilation


def test_user_sharded_dequant_model_keeps_its_shardings_through_the_rewrite(mesh, compiled_hlo):
    import torch_xla.distributed.spmd as xs
    from xqpass.backend import make_backend
    from xqpass.testing.models import INT4_GROUPED, INT8, with_dequant_linears

    mlp = ("gate_proj", "up_proj", "down_proj")
    model = with_dequant_linears(TinyDecoder(DECODER), lambda name: INT4_GROUPED if name.endswith(mlp) else INT8)
    x = torch.randn(2, 8, DECODER.dim)
    expected = model(x)
    model.to(torch_xla.device())
    for name, module in model.named_modules():  # the user's own shardings, by hand
        if not hasattr(module, "qweight"):
            continue
        row = name.endswith(("o_proj", "down_proj"))
        xs.mark_sharding(module.qweight, mesh, (None, "model") if row else ("model", None))
        for buffer in ("scale", "zero"):
            t = getattr(module, buffer, None)
            if t is not None and t.dim() == 2:  # groupwise: [N, K/g]
                xs.mark_sharding(t, mesh, (None, "model") if row else ("model", None))
            elif t is not None and not row:
                xs.mark_sharding(t, mesh, ("model",))
    reports = []
    compiled = torch.compile(model, backend=make_backend("openxla", reports=reports))
    out = compiled(x.to(torch_xla.device())).cpu()
    assert sum(len(r.rewrites) for r in reports) == 14  # every dequant -> matmul became the op
    assert relative_error(out, expected) < 1e-4
    hlo = compiled_hlo()
    assert_weights_stay_put(hlo, DECODER.dim * DECODER.dim)
    # the op's integer weights enter the partitioned program as 1/4 shards
    assert any(f"s8[{DECODER.dim // 4},{DECODER.dim}]" in text for text in hlo)


def test_plain_linears_in_the_plan_are_split_too(mesh, compiled_hlo):
    model = TinyDecoder(DECODER)  # float nn.Linear layers only
    x = torch.randn(1, 8, DECODER.dim)  # activations smaller than a weight shard: anything that big is a weight
    with torch.no_grad():
        expected = model(x)
    model.to(torch_xla.device())
    report = shard_model(model, mesh, LLAMA_PLAN)
    assert len(report.layers) == 14
    assert local_shapes(model.layers[0].up_proj.weight) == [(DECODER.hidden // 4, DECODER.dim)] * 4
    assert local_shapes(model.layers[0].down_proj.weight) == [(DECODER.dim, DECODER.hidden // 4)] * 4
    with torch.no_grad():
        out = torch.compile(model, backend="openxla")(x.to(torch_xla.device())).cpu()
    assert relative_error(out, expected) < 1e-4
    assert_weights_stay_put(compiled_hlo(), DECODER.dim * DECODER.dim, all_reduces=2 * DECODER.layers)


@pytest.mark.parametrize("shape", [(4, 1), (2, 2)])
def test_a_model_axis_smaller_than_the_mesh_replicates_the_rest(shape):
    """A "model" axis of 1 (every tensor whole on all 4 devices) or 2 (halves, each on 2 devices):
    placed from the host, as a pod's script would on a mesh of other proportions."""
    import numpy as np
    import torch_xla.distributed.spmd as xs

    model = quantized_decoder()
    x = torch.randn(2, 8, DECODER.dim)
    expected = model(x)
    mesh = xs.Mesh(np.arange(4), shape, ("data", "model"))
    report = shard_model(model, mesh, LLAMA_PLAN)
    model.to(torch_xla.device())
    size = shape[1]
    assert f"14 linears split over mesh axis 'model' ({size} device{'s' if size > 1 else ''})" in str(report)
    layer = model.layers[0]
    assert local_shapes(layer.q_proj.weight) == [(DECODER.dim // size, DECODER.dim)] * 4
    assert local_shapes(layer.down_proj.weight) == [(DECODER.dim, DECODER.hidden // 2 // size)] * 4
    out = model(x.to(torch_xla.device())).cpu()
    assert relative_error(out, expected) < 1e-4
