"""The pass on hand-written dequantize -> matmul modules: every supported form is rewritten into exactly
one op call with the same output; near misses are left alone and reported."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import nn

import xqpass
from xqpass.backend import make_backend
from xqpass.patterns.spellings import canonical
from xqpass.quant import Layout
from xqpass.testing import strategies as xst
from oracle import assert_as_accurate_as_original
from xqpass.testing.modules import DequantLinear, DequantMLP, DequantSpec

OP = torch.ops.xq.quantized_matmul.default


def compile_eager(module, x):
    """Run ``module`` through xq_eager, returning the output and the per-level reports."""
    reports = []
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(module, backend=make_backend("eager", reports=reports), fullgraph=True)(x)
    return out, reports


def _count(reports, level):
    rw = sum(len(r.rewrites) for r in reports if r.graph.endswith(f"({level})"))
    ms = sum(len(r.misses) for r in reports if r.graph.endswith(f"({level})"))
    return rw, ms


@given(case=xst.dequant_modules(max_layers=3))
def test_supported_forms_are_rewritten_with_the_same_output(case):
    out, reports = compile_eager(case.module, case.x)
    rewrites = [r for rep in reports for r in rep.rewrites]
    assert len(rewrites) == case.expected_rewrites, "\n".join(map(str, reports))
    # int4 unpacked in the op's nibble order reaches the op still packed (half a byte a weight)
    assert sorted(r.format["packed"] for r in rewrites) == sorted(s.bits == 4 for s in case.specs)
    assert _count(reports, "aten")[1] == 0, "\n".join(map(str, reports))
    assert_as_accurate_as_original(case.module, case.x, out)


@given(case=xst.dequant_modules(near_miss=True))
def test_near_misses_are_left_alone_and_reported(case):
    out, reports = compile_eager(case.module, case.x)
    assert sum(len(r.rewrites) for r in reports) == 0, "\n".join(map(str, reports))
    for level in ("torch", "aten"):
        assert _count(reports, level)[1] == 1, "\n".join(map(str, reports))
    with torch.no_grad():
        assert torch.equal(out, case.module(case.x))


@pytest.mark.parametrize(
    "near_miss, reason",
    [
        ("wrong_axis", r"varies along the input axis"),
        ("float_weight", r"float32.*not int8/uint8"),
        ("scale_from_x", r"computed from the activation"),
        ("interleaved_groups", r"varies along the input axis"),
        ("per_tensor_activation", r"not amax\(\|x\|, dim=-1\) / 127"),
    ],
)
def test_near_miss_reasons(near_miss, reason):
    spec = DequantSpec(near_miss=near_miss, group=4 if near_miss == "interleaved_groups" else None,
                       product_form="w8a8_matmul" if near_miss == "per_tensor_activation" else "linear")
    report = xqpass.explain(DequantLinear(spec, 16, 8), torch.randn(3, 16))
    assert len(report.misses) == 1 and not report.rewrites
    assert re.search(reason, report.misses[0].reason), report.misses[0].reason


def test_one_op_node_per_rewrite_on_every_graph_level():
    """torch-level (Dynamo), aten-level (AOT), torch.export and symbolic_trace graphs."""
    specs = [DequantSpec(), DequantSpec(weight_form="zero_then_scale", bits=4, group=8, signed=False),
             DequantSpec(product_form="scale_after", bias="after")]
    model = DequantMLP([DequantLinear(s, 32, 32, seed=i) for i, s in enumerate(specs)]).eval()
    x = torch.randn(2, 5, 32)
    ref = model(x)

    graphs = []

    def grab(gm, example_inputs):
        report = xqpass.rewrite(gm)
        graphs.append((gm, report))
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(model, backend=grab)(x)
    gm, report = graphs[0]
    assert len(report.rewrites) == 3 and not report.misses
    assert sum(n.target is OP for n in gm.graph.nodes) == 3
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4)

    ep = torch.export.export(model, (x,))
    report = xqpass.rewrite(ep)
    assert len(report.rewrites) == 3, report
    assert sum(n.target is OP for n in ep.graph.nodes) == 3
    assert torch.allclose(ep.module()(x), ref, rtol=1e-4, atol=1e-4)



class HandWritten(nn.Module):
    """Straight-line user code (symbolic_trace cannot follow DequantLinear's Python branches)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w8", torch.randint(-128, 128, (24, 32), generator=g, dtype=torch.int16).to(torch.int8))
        self.register_buffer("s8", torch.rand(24, generator=g) / 100)
        self.register_buffer("w4", torch.randint(0, 256, (32, 12), generator=g, dtype=torch.int16).to(torch.uint8))
        self.register_buffer("s4", torch.rand(32, 3, generator=g) / 10)
        self.bias = nn.Parameter(torch.randn(32, generator=g))

    def forward(self, x):
        h = F.linear(x, self.w8.to(x.dtype) * self.s8.unsqueeze(1))
        w4 = torch.stack([self.w4 & 0xF, self.w4 >> 4], dim=-1).view(32, 24)
        deq = ((w4.to(x.dtype) - 8).view(32, 3, 8) * self.s4.view(32, 3, 1)).view(32, 24)
        return torch.relu(h) @ deq.t() + self.bias


def test_symbolic_trace_with_example_inputs():
    model = HandWritten()
    x = torch.randn(4, 32)
    traced = torch.fx.symbolic_trace(model)
    assert not xqpass.rewrite(torch.fx.symbolic_trace(model)).rewrites  # no metadata, no proof
    report = xqpass.rewrite(traced, example_inputs=(x,))
    assert len(report.rewrites) == 2, report
    # symbolic_trace evaluates buffer-only code while tracing: the unpacked int4 weight is a constant
    # there (one value a byte), which the pass still rewrites, as an unpacked weight
    assert [r.format["weight_dtype"] for r in report.rewrites] == ["uint8", "int8"]
    assert sum(n.target is OP for n in traced.graph.nodes) == 2
    assert torch.allclose(traced(x), model(x), rtol=1e-4, atol=1e-4)


def rewritten_by_dynamo(module, x):
    """(outputs, graph, report): ``module(x)`` captured by Dynamo, its torch-level graph rewritten and run."""
    graphs = []

    def grab(gm, example_inputs):
        graphs.append((gm, xqpass.rewrite(gm)))
        return gm.forward

    torch._dynamo.reset()
    outputs = torch.compile(module, backend=grab)(x)
    return outputs, *graphs[0]


def test_dequantized_weight_with_other_users_keeps_them():
    class SavesWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randint(-128, 128, (8, 16), dtype=torch.int16).to(torch.int8))
            self.register_buffer("s", torch.rand(8) / 100)

        def forward(self, x):
            deq = self.w.float() * self.s[:, None]
            return F.linear(x, deq), deq.sum()

    m = SavesWeight()
    x = torch.randn(3, 16)
    (y, total), gm, report = rewritten_by_dynamo(m, x)
    assert len(report.rewrites) == 1
    kinds = [str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert "<built-in function mul>" in kinds  # the dequantized weight is still computed for .sum()
    ref_y, ref_total = m(x)
    assert torch.allclose(y, ref_y, rtol=1e-5, atol=1e-5) and torch.equal(total, ref_total)


def test_plain_linears_are_not_candidates():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    report = xqpass.explain(model, torch.randn(2, 16))
    assert not report.rewrites and not report.misses


def test_explain_names_layers_and_patterns(caplog):
    model = DequantMLP([DequantLinear(DequantSpec(), 16, 16), DequantLinear(DequantSpec(near_miss="wrong_axis"), 16, 16)])
    with caplog.at_level("INFO", logger="xqpass"):
        report = xqpass.explain(model, torch.randn(2, 16))
    assert len(report.rewrites) >= 1 and len(report.misses) == 1
    text = str(report)
    assert "layers.0" in text and "dequantized weight / scale" in text and "layers.1" in text
    assert "not rewritten" in caplog.text


def test_rewrite_rejects_other_objects():
    with pytest.raises(TypeError, match="GraphModule or torch.export.ExportedProgram"):
        xqpass.rewrite(nn.Linear(2, 2))


class _BiasThenPostScale(nn.Module):
    """``F.linear(x, w.to(dt), b) * s``: the product's own bias is scaled with it."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randint(-127, 128, (8, 16), dtype=torch.int8, generator=g))
        self.register_buffer("s", torch.rand(8, generator=g) + 0.5)
        self.b = nn.Parameter(torch.randn(8, generator=g))

    def forward(self, x):
        return F.linear(x, self.w.to(x.dtype), self.b) * self.s


def test_a_bias_inside_the_product_is_scaled_by_a_scale_after_it():
    module, x = _BiasThenPostScale(), torch.randn(3, 16)
    out, reports = compile_eager(module, x)
    assert _count(reports, "torch") == (1, 0), "\n".join(map(str, reports))
    with torch.no_grad():
        expected = module(x)  # float32 either way; an unscaled bias is off by |b| (1 - s), ~0.5
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        ep = torch.export.export(module, (x,))
        assert len(xqpass.rewrite(ep).rewrites) == 1
        torch.testing.assert_close(ep.module()(x), expected, rtol=1e-5, atol=1e-5)


def test_make_backend_takes_a_compiler_name_or_callable():
    with pytest.raises(ValueError, match="unknown compiler 'inductr'"):
        make_backend("inductr")
    seen = []

    def compiler(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    m = DequantLinear(DequantSpec(), 16, 8)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(m, backend=make_backend(compiler), fullgraph=True)(torch.randn(2, 16))
    assert any(n.target is OP for gm in seen for n in gm.graph.nodes)
    assert out.shape == (2, 8)


def test_imports_run_one_way_and_name_no_private_names():
    """Patterns <- rewrite <- backend <- explain: no module imports one to its right, nor a private name."""
    import pathlib

    root = pathlib.Path(xqpass.__file__).parent
    later = {"patterns": ("rewrite", "backend", "explain"), "rewrite": ("backend", "explain"), "backend": ("explain",)}
    files = {"patterns": sorted((root / "patterns").glob("*.py")), "rewrite": [root / "rewrite.py"],
             "backend": [root / "backend.py"], "explain": [root / "explain.py"]}
    for room, paths in files.items():
        for path in paths:
            for module, names in re.findall(r"^\s*from (\.+[\w.]*) import \(?([^)\n]*)", path.read_text(), re.M):
                assert not any(module.lstrip(".").startswith(r) for r in later.get(room, ())), (path, module)
                assert not any(n.strip().startswith("_") for n in names.split(",")), (path, module, names)


def test_backend_registered_for_a_fresh_process():
    """`torch.compile(..., backend="xq_eager")` without importing xqpass: the entry point loads it."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from torch._dynamo.backends.registry import lookup_backend\n"
        "print(lookup_backend('xq_openxla').__module__, lookup_backend('xq_eager').__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["xqpass.backend", "xqpass.backend"]


def test_pattern_catalogue_is_documented():
    """docs/patterns.md lists every weight form and product form the catalogue declares."""
    import pathlib

    from xqpass.patterns.catalogue import PRODUCT_FORMS, WEIGHT_FORMS

    text = (pathlib.Path(__file__).parent.parent / "docs" / "patterns.md").read_text()
    for form in (*WEIGHT_FORMS, *PRODUCT_FORMS):
        assert f"| {form.name} |" in text, form.name


def test_dynamic_batch_dims_still_rewrite():
    """Symbolic batch dims (Dynamo dynamic=True, export Dims) are reasoned with sympy, not guarded."""
    from xqpass.testing.models import INT4_GROUPED, INT8, DecoderConfig, TinyDecoder, with_dequant_linears

    model = with_dequant_linears(TinyDecoder(DecoderConfig(layers=1)),
                                 lambda name: INT4_GROUPED if name.endswith("up_proj") else INT8).eval()
    reports = []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=make_backend("eager", reports=reports), dynamic=True)
    with torch.no_grad():
        for batch, seq in ((2, 8), (3, 5), (4, 11)):  # (1 would specialize: Dynamo treats 0 and 1 apart)
            x = torch.randn(batch, seq, 64)
            assert torch.allclose(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert sum(len(r.rewrites) for r in reports) == 7 and len([r for r in reports if "torch" in r.graph]) == 1

    dequant = DequantLinear(DequantSpec(weight_form="zero_then_scale", bits=4, group=8, signed=False), 32, 16)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(dequant, (torch.randn(4, 3, 32),), dynamic_shapes={"x": {0: batch}})
    assert len(xqpass.rewrite(ep).rewrites) == 1
    x = torch.randn(7, 3, 32)
    assert torch.allclose(ep.module()(x), dequant(x), rtol=1e-4, atol=1e-4)


def test_cat_unpacking_is_computed_once_and_packed():
    """An unpacking that is not the op's nibble order is computed once: its values (``& 0xF``, ``uint8 >> 4``)
    provably fit four bits, so the op reads them packed, and no unpacking is left in the graph."""

    class CatUnpack(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("p", torch.randint(0, 256, (8, 8), dtype=torch.int16).to(torch.uint8))
            self.register_buffer("s", torch.rand(8) / 10)

        def forward(self, x):
            w = torch.cat([self.p & 0xF, self.p >> 4], dim=-1)  # halves, not interleaved
            return F.linear(x, (w.to(x.dtype) - 8) * self.s[:, None])

    m = CatUnpack()
    x = torch.randn(3, 16)
    out, reports = compile_eager(m, x)
    rewrites = [r for rep in reports for r in rep.rewrites]
    assert len(rewrites) == 1 and rewrites[0].format["packed"] and rewrites[0].format["unpacked_once"]
    assert torch.allclose(out, m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec, k, layout", [
    (DequantSpec(bits=4, group=4), 16, Layout(4, by_rows=True, packed=True)),
    (DequantSpec(group=4), 16, Layout(4, by_rows=True)),
    (DequantSpec(), 16, Layout()),
    # packed int4 cannot have an odd group: the packed match is refused, the unpacking stays in the graph
    (DequantSpec(bits=4, group=3), 12, Layout(3, by_rows=True)),
])
def test_the_report_names_the_ops_layout(spec, k, layout):
    report = xqpass.explain(DequantLinear(spec, k, 8), torch.randn(3, k))
    (rewrite,) = report.rewrites
    assert rewrite.format["layout"] == layout, report
    assert rewrite.format["block_size"] == layout.block_size and rewrite.format["by_rows"] == layout.by_rows


class SharedDequant(nn.Module):
    """A dequantized weight used by more than one linear (the weights are DequantLinear layers', so the
    float64 oracle sees them): ``wiring`` picks how the linears meet."""

    LINEARS = {"chain_same": 2, "chain_two": 2, "parallel": 2, "layer_twice": 2,
               "scale_from_activation": 1, "scale_from_input": 1}

    def __init__(self, wiring: str, k: int = 16):
        super().__init__()
        self.wiring = wiring
        self.a = DequantLinear(DequantSpec(), k, k, seed=0)
        self.b = DequantLinear(DequantSpec(), k, k, seed=1)

    def forward(self, x):
        if self.wiring == "layer_twice":  # a tied layer: the weight dequantized twice from the same buffers
            return self.a(self.a(x))
        deq = self.a.dequantize(x.dtype)
        if self.wiring == "chain_same":  # the first product is the second's activation, one weight
            return F.linear(F.linear(x, deq), deq)
        if self.wiring == "chain_two":
            return F.linear(F.linear(x, deq), self.b.dequantize(x.dtype))
        if self.wiring == "parallel":
            return F.linear(x, deq) + F.linear(torch.relu(x), deq)
        h = F.linear(x, deq)
        w_b = self.b.int_weight().to(x.dtype)
        if self.wiring == "scale_from_activation":  # near misses: the second scale really is the data's
            return F.linear(h, w_b * (self.b.scale.to(x.dtype) * h.abs().mean())[:, None])
        return F.linear(h, w_b * (self.b.scale.to(x.dtype) * x.abs().mean())[:, None])


def _rewritten_nodes(gm):
    return sum(n.target is OP for n in gm.graph.nodes)


@pytest.mark.parametrize("wiring", ["chain_same", "chain_two", "parallel", "layer_twice"])
def test_a_dequantized_weight_used_twice_is_rewritten_at_every_use(wiring):
    """A parameter the activation was computed with is not the activation: the second linear of
    ``F.linear(F.linear(x, deq), deq)`` shares the first's scale, not its data."""
    module = SharedDequant(wiring)
    x = torch.randn(3, 5, 16)
    out, reports = compile_eager(module, x)
    assert _count(reports, "torch") == (2, 0) and _count(reports, "aten") == (0, 0), "\n".join(map(str, reports))
    assert_as_accurate_as_original(module, x, out)

    report = xqpass.explain(module, x)
    assert len(report.rewrites) == 2 and not report.misses, report
    assert "2 rewritten, 0 missed" in str(report)

    ep = torch.export.export(module, (x,))
    report = xqpass.rewrite(ep)
    assert len(report.rewrites) == 2 and not report.misses, report
    assert _rewritten_nodes(ep.graph_module) == 2
    assert not [n for n in ep.graph.nodes if n.target is torch.ops.aten.mul.Tensor]  # no dequantized weight left
    assert_as_accurate_as_original(module, x, ep.module()(x))


def test_a_dequantized_weight_used_twice_is_rewritten_at_the_aten_level_alone():
    """The backend names AOT's static inputs (parameters and buffers, which AOT's descriptors record
    only as positions); without them a graph input shared with the activation is taken as data."""
    from torch._dynamo.backends.common import aot_autograd

    from xqpass.backend import aot_static_inputs

    module = SharedDequant("chain_same")
    x = torch.randn(3, 16)
    reports = {}

    def after_aot(gm, example_inputs):
        reports["named"] = xqpass.rewrite(copy.deepcopy(gm), model_state=aot_static_inputs(gm))
        reports["unnamed"] = xqpass.rewrite(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(module, backend=aot_autograd(fw_compiler=after_aot))(x)
    assert len(reports["named"].rewrites) == 2 and not reports["named"].misses, reports["named"]
    (miss,) = reports["unnamed"].misses
    assert re.search(r"computed from the activation's input arg\d+_1 \(a graph input not recorded as a parameter",
                     miss.reason), miss.reason


@pytest.mark.parametrize("wiring, source", [("scale_from_activation", r"the activation h$"),
                                            ("scale_from_input", r"the activation's input l_x_")])
def test_a_scale_really_computed_from_the_data_is_still_a_near_miss(wiring, source):
    module = SharedDequant(wiring)
    x = torch.randn(3, 16)
    out, reports = compile_eager(module, x)
    torch_level = next(r for r in reports if r.graph.endswith("(torch)"))
    assert len(torch_level.rewrites) == 1 and len(torch_level.misses) == 1, torch_level
    assert re.search(rf"scale \w+ is computed from {source}", torch_level.misses[0].reason), torch_level
    with torch.no_grad():
        assert torch.allclose(out, module(x), rtol=1e-5, atol=1e-5)

    report = xqpass.explain(module, x)
    assert len(report.misses) == 1 and "computed from the activation" in str(report), report


def test_a_dequantized_weight_returned_as_an_output_stays():
    """The dequantized weight is erased only when every user was rewritten: a linear rewritten, the
    weight also returned, so its computation stays for the output."""

    class ReturnsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = DequantLinear(DequantSpec(), 16, 8)

        def forward(self, x):
            deq = self.layer.dequantize(x.dtype)
            return F.linear(x, deq), deq

    module = ReturnsWeight()
    x = torch.randn(3, 16)
    with torch.no_grad():
        (y, deq), gm, report = rewritten_by_dynamo(module, x)
    assert len(report.rewrites) == 1 and _rewritten_nodes(gm) == 1
    output = next(n for n in gm.graph.nodes if n.op == "output")
    returned = output.args[0][1]
    assert canonical(returned).kind == "mul"  # the weight is still computed, for the output alone
    ref_y, ref_deq = module(x)
    assert torch.equal(deq, ref_deq)
    assert_as_accurate_as_original(module.layer, x, y)


def test_symbolic_trace_misses_say_why():
    """A graph without shapes asks for example_inputs; a dequantization folded into a float constant by
    torch.fx's tracer is named as such; with buffers kept as attributes and shapes given, it rewrites."""
    class Int8Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("qweight", torch.randint(-128, 128, (16, 32), dtype=torch.int8))
            self.register_buffer("scale", torch.rand(16) / 127)

        def forward(self, x):
            return F.linear(x, self.qweight.to(torch.float32) * self.scale[:, None])

    module = Int8Linear().eval()
    x = torch.randn(3, 32)

    class BufferTracer(torch.fx.Tracer):
        proxy_buffer_attributes = True

    kept = torch.fx.GraphModule(module, BufferTracer().trace(module))
    report = xqpass.rewrite(kept)
    assert [m.reason for m in report.misses] == [
        "the graph records no shapes (torch.fx.symbolic_trace does not): pass example_inputs"]
    report = xqpass.rewrite(kept, example_inputs=(x,))
    assert len(report.rewrites) == 1 and not report.misses
    exact = x.double() @ (module.qweight.double() * module.scale.double()[:, None]).t()
    with torch.no_grad():
        assert (kept(x).double() - exact).abs().max() <= 1e-5 * exact.abs().max()

    folded = torch.fx.symbolic_trace(module)
    report = xqpass.rewrite(folded, example_inputs=(x,))
    assert not report.rewrites and len(report.misses) == 1
    assert report.misses[0].reason.startswith("its weight is a float constant computed while tracing")
