"""load_quantized_checkpoint with a mesh and a plan: each device's slice of a layer is read and
converted on its own, and the split model computes the format's own dequantized model."""
import pytest
import torch
import torch_xla
from torch import nn

import xqpass.checkpoints as checkpoints
from xqpass import XlaQuantizedLinear, load_quantized_checkpoint
from test_checkpoints import Toy, expected_output, write_awq_checkpoint, write_checkpoint, write_ct_checkpoint

WRITERS = {
    "gptq4": lambda path, model: write_checkpoint(path, model, bits=4, group=16),
    "gptq8-v2": lambda path, model: write_checkpoint(path, model, bits=8, group=16, v1=False, shards=2),
    "gptq4-act-order": lambda path, model: write_checkpoint(path, model, bits=4, group=16, act_order=True),
    "awq": lambda path, model: write_awq_checkpoint(path, model, group=16),
    "ct-int4-group-asym": lambda path, model: write_ct_checkpoint(path, model, 4, "group", 16, False),
    "ct-int8-channel": lambda path, model: write_ct_checkpoint(path, model, 8, "channel", 16, True),
    "ct-w8a8-group-asym": lambda path, model: write_ct_checkpoint(path, model, 8, "group", 16, False,
                                                                  fmt="int-quantized"),
}
# Toy: proj 64 -> 48 (bias), mlp 48 -> 32, head 32 -> 8 (float)
PLANS = {
    "columns": {"proj": "column", "mlp": "column", "head": "row"},
    "rows": {"proj": "row", "mlp": "column", "head": "column"},
}


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("fmt", WRITERS)
def test_split_loading_matches_the_formats_dequantization(fmt, plan, mesh, tmp_path, monkeypatch):
    torch.manual_seed(3)
    model, reference = Toy().eval(), Toy().eval()
    reference.load_state_dict(model.state_dict())
    oracle = WRITERS[fmt](str(tmp_path), reference)
    reads = []
    original = checkpoints._Tensors.get
    monkeypatch.setattr(checkpoints._Tensors, "get",
                        lambda self, key, index=None: reads.append((key, index)) or original(self, key, index))

    report = load_quantized_checkpoint(model, str(tmp_path), mesh=mesh, plan=PLANS[plan])
    assert [(layer.name, layer.split) for layer in report.layers] == [("proj", PLANS[plan]["proj"]), ("mlp", "column")]
    assert isinstance(model.proj, XlaQuantizedLinear) and type(model.head) is nn.Linear
    assert all(t.device.type == "xla" for t in [*model.parameters(), *model.buffers()])
    weight = model.proj.weight  # [48, 64 / pack]
    split = 0 if PLANS[plan]["proj"] == "column" else 1
    local = [tuple(s.shape) for s, _ in torch_xla._XLAC._get_local_shards([weight])[0]]
    want = list(weight.shape)
    want[split] //= 4
    assert local == [tuple(want)] * 4
    # a layer whose slices stand alone is read a slice a device, never whole; the others (a split that
    # would cut a word packed along N, act-order split by rows) are read whole once
    key = {"ct-w8a8-group-asym": "weight"}.get(fmt, "weight_packed" if fmt.startswith("ct") else "qweight")
    for layer in ("proj", "mlp"):
        exact = (layer == "mlp" or (plan == "rows" and fmt != "gptq4-act-order")
                 or fmt in ("ct-int8-channel", "gptq8-v2", "ct-w8a8-group-asym"))  # 12 output features a device: whole 8-bit words
        layer_reads = [index for name, index in reads if name == f"{layer}.{key}"]
        assert layer_reads == ([index for index in layer_reads if index is not None] if exact else [None]), (layer, reads)
        assert len(layer_reads) == (4 if exact else 1)
    assert all(index is not None for name, index in reads if name.startswith("head.weight"))

    assert_computes_the_formats_model(model, fmt, str(tmp_path), reference, oracle)


def assert_computes_the_formats_model(model, fmt, path, reference, oracle):
    """``model`` (loaded onto the XLA devices) against the float64 dequantization of the checkpoint
    ``WRITERS[fmt]`` wrote at ``path`` from ``reference`` (``oracle``: its dequantized weights)."""
    x = torch.randn(5, 64)
    with torch.no_grad():
        out = model(x.to(torch_xla.device())).cpu()
    if fmt == "ct-w8a8-group-asym":  # the unsplit layers on the host (tested against float64 on their own)
        host = Toy().eval()
        host.load_state_dict(reference.state_dict())
        load_quantized_checkpoint(host, path)
        with torch.no_grad():
            exact = host(x).double()
    else:
        exact = expected_output(reference, oracle, x)
    assert torch.allclose(out.double(), exact, rtol=1e-4, atol=1e-4), (out.double() - exact).abs().max()


def test_a_plan_that_cuts_a_group_is_refused_before_the_model_changes(mesh, tmp_path):
    model, reference = Toy().eval(), Toy().eval()
    reference.load_state_dict(model.state_dict())
    write_checkpoint(str(tmp_path), reference, bits=4, group=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="mlp: row-parallel over 4 devices would split a block of 16"):
        load_quantized_checkpoint(model, str(tmp_path), mesh=mesh, plan={"proj": "column", "mlp": "row"})
    assert type(model.mlp) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("shape", [(4, 1), (2, 2)])
@pytest.mark.parametrize("fmt", ["gptq4", "ct-int8-channel"])
def test_a_model_axis_smaller_than_the_mesh_replicates_the_rest(fmt, shape, tmp_path):
    """A "model" axis of 1 (every tensor whole on all 4 devices) or 2 (halves, each on 2 devices)."""
    import numpy as np
    import torch_xla.distributed.spmd as xs

    torch.manual_seed(3)
    model, reference = Toy().eval(), Toy().eval()
    reference.load_state_dict(model.state_dict())
    oracle = WRITERS[fmt](str(tmp_path), reference)
    mesh = xs.Mesh(np.arange(4), shape, ("data", "model"))
    load_quantized_checkpoint(model, str(tmp_path), mesh=mesh, plan=PLANS["rows"])
    weight = model.proj.weight  # row-parallel: [48, 64 / pack] split along K over the model axis
    local = [tuple(s.shape) for s, _ in torch_xla._XLAC._get_local_shards([weight])[0]]
    assert local == [(weight.shape[0], weight.shape[1] // shape[1])] * 4
    assert_computes_the_formats_model(model, fmt, str(tmp_path), reference, oracle)
