"""The XLA lowering on XLA:CPU: agreement with the CPU reference and the float64 oracle, one compiled
graph with no graph break, no recompilation and no host round trip, weights quantized on the device."""
import contextlib
import re
import threading

import pytest
import torch
import torch_xla
import torch_xla.debug.metrics as met
from hypothesis import given, settings

from oracle import assert_within, oracle
from xqpass.ops.xla import XlaCpuTuning, lowering_for, xla_lowering
from xqpass.testing import strategies as xst

op = torch.ops.xq.quantized_matmul


def _to(kw, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def without_split_k():
    """XLA:CPU takes split-K up to a few dozen rows; the dot forms below them (which GSPMD-split weights
    take) are tested by turning it off."""
    return xla_lowering("cpu", XlaCpuTuning(split_k_max_m=0, split_k_max_m_packed=0))


@pytest.mark.parametrize("lowering", ["cpu", "cpu dot", "canonical"])
@settings(max_examples=25)
@given(case=xst.op_cases())
def test_xla_eager_matches_cpu_reference_and_oracle(lowering, case, xla_device):
    with without_split_k() if lowering == "cpu dot" else xla_lowering(lowering):
        _check_xla_case(case, xla_device)


def _check_xla_case(case, xla_device):
    kw = case.op_kwargs()
    cpu = op(case.x, **kw)
    xla = op(case.x.to(xla_device), **_to(kw, xla_device)).cpu()
    bias = torch.randn(case.weight.out_features)
    with_bias = op(case.x.to(xla_device), **_to(kw, xla_device), bias=bias.to(xla_device)).cpu()
    assert torch.allclose(with_bias.double(), xla.double() + bias.double(), rtol=2e-2, atol=2e-2)
    assert xla.dtype == case.x.dtype and xla.shape == cpu.shape
    expected, allowance = oracle(case.x, **kw, roundings=2)  # slack a device form may take (docs/ops.md)
    assert_within(xla, expected, allowance, "xla vs oracle " + case.fmt.name)
    if case.fmt.quantize_activation:  # the same int8 activations: both differ from the oracle alike
        assert_within(xla, cpu.double().numpy(), allowance, "xla vs cpu " + case.fmt.name)


def _counter(name):
    return met.counter_value(name) or 0


def _metric_count(name):
    data = met.metric_data(name)
    return data[0] if data else 0


@pytest.mark.parametrize(
    "fmt",
    [
        xst.WeightFormat(8, -1, True, False, False),
        xst.WeightFormat(4, -1, True, True, False),  # the seed's int4 per-channel fails on XLA:CPU
        xst.WeightFormat(4, 32, False, True, False),
        xst.WeightFormat(8, 32, True, False, True),
        xst.WeightFormat(4, -1, False, True, True),
    ],
    ids=lambda f: f.name,
)
def test_compiled_openxla_one_graph_no_recompile_no_host_transfer(fmt, xla_device):
    qw = xst.random_quantized_weight(fmt, 48, 64, seed=7)
    kw = _to(qw.op_kwargs(), xla_device)

    def f(x, w, scale, zero_point):
        return op(x, w, scale, zero_point, fmt.block_size, fmt.bits == 4, fmt.quantize_activation, packed=fmt.packed)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="openxla", fullgraph=True)  # fullgraph: a graph break would raise
    args = lambda x: (x.to(xla_device), kw["w"], kw["scale"], kw["zero_point"])  # noqa: E731
    x1, x2 = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    out1 = compiled(*args(x1)).cpu()
    compiles = _metric_count("CompileTime")
    to_host = _metric_count("TransferFromDeviceTime")
    out2 = compiled(*args(x2))
    torch_xla.sync()
    assert _metric_count("CompileTime") == compiles, "second call recompiled"
    assert _metric_count("TransferFromDeviceTime") == to_host, "the op copied something to the host"
    for x, out in ((x1, out1), (x2, out2.cpu())):
        expected, allowance = oracle(x, **qw.op_kwargs(), quantize_activation=fmt.quantize_activation)
        assert_within(out, expected, allowance, fmt.name)


def test_hlo_keeps_weight_quantized_until_inside_the_graph(xla_device):
    """The graph's parameters are the stored bytes (packed int4 as [N, K/2] u8), never a float weight."""
    for fmt, w_type in ((xst.WeightFormat(8, -1, True, False, False), "s8[48,64]"),
                        (xst.WeightFormat(4, -1, False, True, False), "u8[48,32]"),
                        (xst.WeightFormat(8, -1, True, False, True), "s8[48,64]")):
        qw = xst.random_quantized_weight(fmt, 48, 64, seed=8)
        out = op(torch.randn(3, 64).to(xla_device), quantize_activation=fmt.quantize_activation,
                 **_to(qw.op_kwargs(), xla_device))
        hlo = torch_xla._XLAC._get_xla_tensors_hlo([out])
        params = re.findall(r"(\w+\[[\d,]*\])\{?[\d,]*\}? parameter\(", hlo)
        assert w_type in params, (fmt.name, params)
        assert not any(p.startswith(("f32[48,64]", "bf16[48,64]", "f32[64,48]")) for p in params), params
        if fmt.quantize_activation:  # the canonical form: an integer dot with an int32 result
            with xla_lowering("canonical"):
                out = op(torch.randn(3, 64).to(xla_device), quantize_activation=True, **_to(qw.op_kwargs(), xla_device))
            assert re.search(r"s32\[\d+,\d+\]\{[\d,]*\} dot\(", torch_xla._XLAC._get_xla_tensors_hlo([out]))


def test_export_is_one_node_with_dynamic_batch():
    qw = xst.random_quantized_weight(xst.WeightFormat(4, 16, True, True, False), 12, 32, seed=9)

    class M(torch.nn.Module):
        def forward(self, x):
            return op(x, **qw.op_kwargs())

    batch = torch.export.Dim("batch")
    ep = torch.export.export(M(), (torch.randn(4, 32),), dynamic_shapes={"x": {0: batch}})
    calls = [n for n in ep.graph.nodes if n.op == "call_function" and n.target == op.default]
    assert len(calls) == 1
    assert sum(n.op == "call_function" for n in ep.graph.nodes) == 1  # nothing else: no decomposition
    x = torch.randn(7, 32)
    expected, allowance = oracle(x, **qw.op_kwargs())
    assert_within(ep.module()(x), expected, allowance, "exported")


def test_dynamo_and_aot_graphs_hold_one_node():
    qw = xst.random_quantized_weight(xst.WeightFormat(8, -1, False, False, True), 12, 32, seed=10)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x):
        return op(x, **qw.op_kwargs(), quantize_activation=True) * 2

    torch._dynamo.reset()
    x5 = torch.randn(5, 32)
    assert torch.equal(torch.compile(f, backend=record, fullgraph=True, dynamic=True)(x5), f(x5))
    assert [n.target for n in graphs[0].graph.nodes if n.op == "call_function"].count(op) == 1
    aot = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for rows in (3, 6):
        x = torch.randn(rows, 32)
        assert torch.equal(aot(x), f(x))


def test_auto_lowering_is_the_cpu_form_on_xla_cpu(xla_device):
    assert lowering_for(torch.zeros(1, device=xla_device)) == "cpu"
    with xla_lowering("canonical"):
        assert lowering_for(torch.zeros(1, device=xla_device)) == "canonical"
    with pytest.raises(ValueError, match="expected one of"):
        with xla_lowering("gpu"):
            pass


def test_a_forced_lowering_stays_in_its_thread(xla_device):
    """xla_lowering sets a context variable: another thread tracing meanwhile keeps its own form."""
    seen = []
    with xla_lowering("canonical"):
        worker = threading.Thread(target=lambda: seen.append(lowering_for(torch.zeros(1, device=xla_device))))
        worker.start()
        worker.join()
        assert lowering_for(torch.zeros(1, device=xla_device)) == "canonical"
    assert seen == ["cpu"]


@pytest.mark.parametrize("large_m", [1, 4, 1000])
def test_xla_cpu_tuning_is_passed_in(large_m, xla_device):
    """The seed layout's switch to dequantize-then-dot follows the XlaCpuTuning given, same numerics."""
    fmt = xst.WeightFormat(4, 16, False, True, False)
    qw = xst.random_quantized_weight(fmt, 24, 64, seed=11)
    x = torch.randn(4, 64)
    with xla_lowering("cpu", XlaCpuTuning(large_m=large_m)):
        out = op(x.to(xla_device), **_to(qw.op_kwargs(), xla_device))
    hlo = torch_xla._XLAC._get_xla_tensors_hlo([out])
    dots = re.findall(r"\S+\[([\d,]+)\]\{[\d,]*\} dot\(", hlo)
    assert dots == (["24,4"] if large_m <= 4 else ["4,24,4", "4,24,4"]), dots  # [N, M], or [S, N, M] per nibble
    expected, allowance = oracle(x, **qw.op_kwargs(), roundings=2)
    assert_within(out.cpu(), expected, allowance, fmt.name)


@pytest.mark.parametrize("packed, w_type", [(False, "s8[48,64]"), (True, "u8[48,32]")])
def test_canonical_form_keeps_the_weight_integer_up_to_the_dot(packed, w_type, xla_device):
    """The TPU / GPU form: parameter (int) -> [unpack] -> convert -> dot, the scale after the dot."""
    fmt = xst.WeightFormat(4 if packed else 8, -1, not packed, packed, False)  # int8 sym, or uint4 asym packed
    qw = xst.random_quantized_weight(fmt, 48, 64, seed=12)
    with xla_lowering("canonical"):
        out = op(torch.randn(3, 64, dtype=torch.bfloat16).to(xla_device), **_to(qw.op_kwargs(), xla_device))
    hlo = torch_xla._XLAC._get_xla_tensors_hlo([out])
    param = re.search(r"%(\S+) = " + re.escape(w_type) + r"\{[\d,]*\} parameter\(", hlo).group(1)
    converts = re.findall(r"%(\S+) = bf16\[48,64\]\{[\d,]*\} convert\(([^)]*)\)", hlo)
    assert converts, hlo
    conv_name, conv_operand = converts[-1]
    if not packed:
        assert f"%{param}" in conv_operand  # the stored bytes convert straight into the dot's dtype
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert len(dots) == 1 and f"%{conv_name}" in dots[0], dots
    assert not re.search(r"(f32|bf16)\[48,64\]\{[\d,]*\} multiply", hlo)  # no scaled copy of the weight


LARGE_M_FORMATS = [
    xst.WeightFormat(8, -1, True, False, False),
    xst.WeightFormat(8, -1, False, False, False),
    xst.WeightFormat(4, -1, True, True, False),
    xst.WeightFormat(8, 32, False, False, False),
    xst.WeightFormat(4, 32, False, True, False),
    xst.WeightFormat(4, 16, True, False, False),
    xst.WeightFormat(8, -1, True, False, True),
    xst.WeightFormat(4, 32, False, True, True),
    xst.WeightFormat(8, 32, False, False, False, by_rows=True),
    xst.WeightFormat(4, 32, False, True, False, by_rows=True),
    xst.WeightFormat(8, 32, True, False, True, by_rows=True),
]


@pytest.mark.parametrize("rows", ["large", "past split-K"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("fmt", LARGE_M_FORMATS, ids=lambda f: f.name)
def test_large_m_forms_match_the_oracle(fmt, dtype, rows, xla_device):
    """XLA:CPU switches formulation at XlaCpuTuning.large_m rows (dequantize-then-dot for blockwise
    weights) and past split-K (float32 dots giving [N, M], the epilogue with the bias before the
    transpose): same numerics, bias included."""
    tuning = XlaCpuTuning()
    qw = xst.random_quantized_weight(fmt, 40, 96, seed=13)
    m = tuning.large_m if rows == "large" else tuning.split_k_max_m + 1
    x = torch.randn(2, m, 96).to(dtype)
    bias = torch.randn(40)
    kw = qw.op_kwargs()
    out = op(x.to(xla_device), quantize_activation=fmt.quantize_activation, bias=bias.to(xla_device),
             **_to(kw, xla_device)).cpu()
    expected, allowance = oracle(x, **kw, quantize_activation=fmt.quantize_activation, roundings=2)
    with_bias = expected + bias.double().numpy()  # adding the bias moves the output's rounding with it
    assert_within(out, with_bias, allowance + torch.finfo(dtype).eps * abs(with_bias), fmt.name)


@pytest.mark.parametrize("qa", [False, True])
def test_nan_propagates_on_xla_as_on_cpu(qa, xla_device):
    fmt = xst.WeightFormat(4, 8, False, True, qa)
    qw = xst.random_quantized_weight(fmt, 6, 16, seed=14)
    x = torch.randn(3, 16)
    x[1, 5] = float("nan")
    cpu = op(x, quantize_activation=qa, **qw.op_kwargs())
    xla = op(x.to(xla_device), quantize_activation=qa, **_to(qw.op_kwargs(), xla_device)).cpu()
    assert torch.equal(torch.isnan(xla), torch.isnan(cpu))
    assert torch.isnan(xla[1]).all() and torch.isfinite(xla[[0, 2]]).all()


@pytest.mark.parametrize("fmt", [xst.WeightFormat(8, -1, True, False, False), xst.WeightFormat(4, 32, True, True, False,
                                                                                        by_rows=True)],
                         ids=lambda f: f.name)
@pytest.mark.parametrize("lowering", ["cpu", "cpu dot", "canonical"])
def test_infinite_activation_stays_in_its_row(fmt, lowering, xla_device):
    """An infinite activation makes its row non-finite (XLA:CPU's split-K: NaN, docs/ops.md), the dot
    forms the float64 product's pattern, and leaves the other rows exact."""
    qw = xst.random_quantized_weight(fmt, 6, 64, seed=15)
    x = torch.randn(3, 64)
    x[1, 5] = float("inf")
    with without_split_k() if lowering == "cpu dot" else xla_lowering(lowering):
        xla = op(x.to(xla_device), **_to(qw.op_kwargs(), xla_device)).cpu()
    assert not torch.isfinite(xla[1]).any()
    if lowering != "cpu":
        expected, _ = oracle(x, **qw.op_kwargs())
        for pattern in (torch.isposinf, torch.isneginf, torch.isnan):
            assert torch.equal(pattern(torch.from_numpy(expected)), pattern(xla)), pattern.__name__
    expected, allowance = oracle(x[[0, 2]], **qw.op_kwargs(), roundings=2)
    assert_within(xla[[0, 2]], expected, allowance, fmt.name)


@pytest.mark.parametrize("split_k", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 32])
@pytest.mark.parametrize("fmt", LARGE_M_FORMATS, ids=lambda f: f.name)
def test_no_gathers_with_host_made_indices(fmt, rows, split_k, xla_device):
    """Inside the op torch_xla sees tensors without functionalization: a strided view there would be
    lowered as a gather whose indices are made on the host and sent every call."""
    qw = xst.random_quantized_weight(fmt, 48, 64, seed=15)
    with contextlib.nullcontext() if split_k else without_split_k():
        out = op(torch.randn(rows, 64).to(xla_device), quantize_activation=fmt.quantize_activation,
                 **_to(qw.op_kwargs(), xla_device))
    hlo = torch_xla._XLAC._get_xla_tensors_hlo([out])
    assert " gather(" not in hlo
    assert not re.search(r"s64\[[\d,]+\]\{[\d,]*\} parameter", hlo)


SPLIT_K_FORMATS = [
    xst.WeightFormat(8, -1, True, False, False),
    xst.WeightFormat(8, -1, False, False, False),
    xst.WeightFormat(4, -1, True, True, False),
    xst.WeightFormat(4, -1, False, True, False),
    xst.WeightFormat(8, -1, True, False, True),
    xst.WeightFormat(8, 128, False, False, False, by_rows=True),
    xst.WeightFormat(4, 64, True, True, False, by_rows=True),
    # packed groups of 16, 64 and 96 bytes: one piece, two of 32, three of 32; groups of 16 and 32 bytes
    # are scaled inside virtual groups of 64 bytes (a zero point: after, by a dot)
    xst.WeightFormat(4, 32, True, True, False, by_rows=True),
    xst.WeightFormat(4, 32, False, True, False, by_rows=True),
    xst.WeightFormat(4, 32, True, True, True, by_rows=True),
    xst.WeightFormat(4, 128, False, True, False, by_rows=True),
    xst.WeightFormat(4, 192, True, True, False, by_rows=True),
]


@pytest.mark.parametrize("rows", [1, 4, 7, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("fmt", SPLIT_K_FORMATS, ids=lambda f: f.name)
def test_split_k_with_rows_long_enough_for_virtual_groups(fmt, dtype, rows, xla_device):
    """Per-channel rows of 384 values (3 virtual groups of 128; packed: 3 of 64 bytes) and the
    groupwise pieces, at the row counts split-K covers (packed int4 up to 16, int8 up to 32) and past."""
    qw = xst.random_quantized_weight(fmt, 24, 384, seed=16)
    x = torch.randn(rows, 384).to(dtype)
    out = op(x.to(xla_device), quantize_activation=fmt.quantize_activation, **_to(qw.op_kwargs(), xla_device)).cpu()
    expected, allowance = oracle(x, **qw.op_kwargs(), quantize_activation=fmt.quantize_activation, roundings=2)
    assert_within(out, expected, allowance, fmt.name)


@pytest.mark.parametrize("layout", ["per-channel", "seed blockwise", "blockwise by rows"])
@pytest.mark.parametrize("quantize_activation", [False, True])
@pytest.mark.parametrize("x_shape", [(0, 16), (3, 0, 16)])
def test_empty_activation_gives_the_empty_result(layout, quantize_activation, x_shape, xla_device):
    """An activation with no rows, with a zero point (whose lowering views an empty x), on every layout."""
    g = torch.Generator().manual_seed(0)
    w_shape, s_shape, block = {"per-channel": ((8, 16), (8,), -1), "seed blockwise": ((2, 8, 8), (2, 8), 8),
                               "blockwise by rows": ((8, 16), (8, 2), 8)}[layout]
    w = torch.randint(0, 256, w_shape, generator=g, dtype=torch.int16).to(torch.uint8)
    scale, zero = torch.rand(s_shape, generator=g), torch.rand(s_shape, generator=g)
    x = torch.randn(x_shape, generator=g)
    for lowering in ("cpu", "canonical"):
        with xla_lowering(lowering):
            out = op(x.to(xla_device), w.to(xla_device), scale.to(xla_device), zero.to(xla_device), block, False,
                     quantize_activation, torch.randn(8).to(xla_device)).cpu()
        assert out.shape == (*x_shape[:-1], 8) and out.dtype == x.dtype
