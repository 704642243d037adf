"""xq_openxla on XLA:CPU: rewritten graphs compile and run on the device, match the original, and do not
recompile; PT2E dequantization that plain openxla cannot run on XLA:CPU runs after the pass."""
import copy

import pytest
import torch
import torch_xla.debug.metrics as met
from hypothesis import given, settings

import xqpass
from oracle import assert_as_accurate_as_original
from xqpass.backend import make_backend
from xqpass.testing import strategies as xst
from xqpass.testing.models import INT4_GROUPED, INT8, DecoderConfig, TinyDecoder, with_dequant_linears
from xqpass.testing.modules import DequantLinear, DequantSpec


def _compile_xla(module, xla_device, reports):
    torch._dynamo.reset()
    return torch.compile(module.to(xla_device), backend=make_backend("openxla", reports=reports))


def _compiles():
    data = met.metric_data("CompileTime")
    return data[0] if data else 0


@settings(max_examples=12)
@given(case=xst.dequant_modules(max_layers=2))
def test_rewritten_modules_run_on_xla_and_match(case, xla_device):
    reports = []
    compiled = _compile_xla(copy.deepcopy(case.module), xla_device, reports)
    with torch.no_grad():
        out = compiled(case.x.to(xla_device)).cpu()
    assert sum(len(r.rewrites) for r in reports) == case.expected_rewrites, "\n".join(map(str, reports))
    assert_as_accurate_as_original(case.module, case.x, out)


def test_decoder_end_to_end_all_linears_rewritten_no_recompile(xla_device):
    cfg = DecoderConfig(layers=2, dim=64, heads=4, hidden=128)
    float_model = TinyDecoder(cfg).eval()
    model = with_dequant_linears(
        float_model, lambda name: INT4_GROUPED if name.endswith(("gate_proj", "up_proj", "down_proj")) else INT8)
    x1, x2 = torch.randn(2, 8, 64), torch.randn(2, 8, 64)
    with torch.no_grad():
        eager1, eager2, float1 = model(x1), model(x2), float_model(x1)
    reports = []
    compiled = _compile_xla(model, xla_device, reports)
    with torch.no_grad():
        out1 = compiled(x1.to(xla_device)).cpu()
        compiles = _compiles()
        out2 = compiled(x2.to(xla_device)).cpu()
    assert _compiles() == compiles, "the second call recompiled"
    rewrites = [r for rep in reports for r in rep.rewrites]
    assert len(rewrites) == 7 * cfg.layers
    assert sum(r.format["packed"] for r in rewrites) == 3 * cfg.layers
    assert not [m for rep in reports for m in rep.misses]
    for out, eager in ((out1, eager1), (out2, eager2)):
        assert torch.allclose(out, eager, rtol=1e-4, atol=1e-4)
    assert (out1 - float1).norm() / float1.norm() < 0.05  # int8 / int4 weights against the float model


def test_pt2e_dequantize_runs_on_xla_cpu_only_after_the_pass(xla_device):
    module = DequantLinear(DequantSpec(weight_form="pt2e_per_channel", signed=False), 32, 16)
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = module(x)
    torch._dynamo.reset()
    plain = torch.compile(DequantLinear(DequantSpec(weight_form="pt2e_per_channel", signed=False), 32, 16)
                          .to(xla_device), backend="openxla")
    with pytest.raises(Exception):  # torch_xla lowers it to mhlo.uniform_dequantize: no XLA:CPU handler
        with torch.no_grad():
            plain(x.to(xla_device)).cpu()
    torch._dynamo.reset()
    compiled = torch.compile(module.to(xla_device), backend="xq_openxla")
    with torch.no_grad():
        out = compiled(x.to(xla_device)).cpu()
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_torchao_int8_weight_only_is_rewritten_with_xq_eager():
    """torchao's subclass only unfolds at the aten level (and cannot move to an XLA device)."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).eval()
    quantize_(model, Int8WeightOnlyConfig())
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = model(x)
    report = xqpass.explain(model, x)
    assert len(report.rewrites) == 2 and not report.misses, report
    assert all(r.pattern.startswith("scale after the matmul") for r in report.rewrites)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="xq_eager")(x)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_on_xla", [True, False])
def test_explain_refuses_a_model_and_inputs_on_different_devices(model_on_xla, xla_device):
    """Checked before Dynamo runs: the error names one parameter and one input, and their devices."""
    module = DequantLinear(DequantSpec(), 16, 8)
    x = torch.randn(3, 16)
    if model_on_xla:
        module.to(xla_device)
    else:
        x = x.to(xla_device)
    xla = str(torch.empty(0, device=xla_device).device)
    state, inputs = (xla, "cpu") if model_on_xla else ("cpu", xla)
    with pytest.raises(ValueError, match=rf"parameters and buffers are on {state} \(e\.g\. 'qweight' on {state}\), "
                                         rf"the inputs on {inputs} \(e\.g\. args\[0\] on {inputs}\)"):
        xqpass.explain(module, x)


def test_explain_on_xla_with_the_model_and_inputs_moved_together(xla_device):
    """The README's usage: the model moved to the device for torch.compile, the input moved with it."""
    module = DequantLinear(DequantSpec(), 16, 8)
    x = torch.randn(3, 16)
    model = module.to(xla_device)
    report = xqpass.explain(model, x.to(xla_device))
    assert len(report.rewrites) == 1 and not report.misses, report
