"""Float8 checkpoints loaded split over 4 devices: each device reads its slice of the e4m3 weight and of
the 2-D block scale, whole blocks only; a plan that would cut a block is refused before anything is read."""
import numpy as np
import pytest
import torch
import torch_xla
from torch import nn

import xqpass.checkpoints as checkpoints
from xqpass import XlaQuantizedLinear, load_quantized_checkpoint
from xqpass.testing import checkpoints as writers


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(256, 128, bias=True)
        self.mlp = nn.Linear(128, 64, bias=False)

    def forward(self, x):
        return self.mlp(torch.relu(self.proj(x)))


WRITERS = {
    "hf-fp8-16x32": lambda path, model: writers.write_hf_fp8_checkpoint(path, model, (16, 32), layers=("proj", "mlp")),
    "ct-fp8-dynamic": lambda path, model: writers.write_ct_fp8_checkpoint(path, model, "channel", activations=None,
                                                                           layers=("proj", "mlp")),
}


@pytest.mark.parametrize("style", ["column", "row"])
@pytest.mark.parametrize("fmt", WRITERS)
def test_split_float8_loading_reads_slices_and_computes_the_dequantization(mesh, tmp_path, monkeypatch, fmt, style):
    torch.manual_seed(5)
    model, reference = Toy().eval(), Toy().eval()
    reference.load_state_dict(model.state_dict())
    oracle = WRITERS[fmt](str(tmp_path), reference)
    reads = []
    original = checkpoints._Tensors.get
    monkeypatch.setattr(checkpoints._Tensors, "get",
                        lambda self, key, index=None: reads.append((key, index)) or original(self, key, index))
    load_quantized_checkpoint(model, str(tmp_path), mesh=mesh, plan={"proj": style, "mlp": "column"})
    assert isinstance(model.proj, XlaQuantizedLinear) and model.proj.weight.dtype == torch.float8_e4m3fn
    split = 0 if style == "column" else 1
    local = [tuple(s.shape) for s, _ in torch_xla._XLAC._get_local_shards([model.proj.weight])[0]]
    want = [128, 256]
    want[split] //= 4
    assert local == [tuple(want)] * 4
    assert [index is not None for key, index in reads if key == "proj.weight"] == [True] * 4  # slices, never whole
    x = torch.randn(3, 256)
    with torch.no_grad():
        out = model(x.to(torch_xla.device())).cpu().double().numpy()
    r = {k: v.detach().double().numpy() for k, v in reference.state_dict().items()}
    h = np.maximum(x.double().numpy() @ oracle["proj"].T + r["proj.bias"], 0)
    expected = h @ oracle["mlp"].T
    assert np.allclose(out, expected, rtol=1e-4, atol=1e-4), np.abs(out - expected).max()


def test_a_plan_that_cuts_a_2d_block_is_refused_before_anything_is_read(mesh, tmp_path, monkeypatch):
    model = Toy().eval()
    writers.write_hf_fp8_checkpoint(str(tmp_path), model, (128, 128), layers=("proj", "mlp"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reads = []
    original = checkpoints._Tensors.get
    monkeypatch.setattr(checkpoints._Tensors, "get",
                        lambda self, key, index=None: reads.append(key) or original(self, key, index))
    with pytest.raises(ValueError, match=r"proj: column-parallel over 4 devices would split a 2-D block of 128 output "
                                         r"features"):
        load_quantized_checkpoint(model, str(tmp_path), mesh=mesh, plan={"proj": "column"})
    assert reads == [] and type(model.proj) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
