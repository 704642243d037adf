"""Bad input: TypeError / ValueError naming what was expected and what came, on CPU, on XLA, and at
trace time (fake / meta tensors, torch.compile, torch.export), never an assert or a deep XLA error."""
import pytest
import torch

op = torch.ops.xq.quantized_matmul


def _good():
    return dict(
        x=torch.randn(3, 8),
        w=torch.randint(-8, 8, (4, 8), dtype=torch.int8),
        scale=torch.rand(4),
        zero_point=None,
        block_size=-1,
        int4_weight=False,
        quantize_activation=False,
        packed=False,
        bias=None,
    )


def _blockwise():
    return dict(_good(), w=torch.zeros(2, 4, 4, dtype=torch.int8), scale=torch.rand(2, 4), block_size=4)


BAD = {
    "integer x": (dict(x=torch.ones(3, 8, dtype=torch.int8)), TypeError, r"x must be float32.*got torch.int8.*quantize_activation=True"),
    "bool x": (dict(x=torch.ones(3, 8, dtype=torch.bool)), TypeError, r"x must be .*got torch.bool"),
    "0-d x": (dict(x=torch.tensor(1.0)), ValueError, r"at least 1 dim"),
    "float w": (dict(w=torch.zeros(4, 8)), TypeError, r"w must be torch.int8 or torch.uint8.*got torch.float32"),
    "int32 w": (dict(w=torch.zeros(4, 8, dtype=torch.int32)), TypeError, r"got torch.int32"),
    "integer scale": (dict(scale=torch.ones(4, dtype=torch.int32)), TypeError, r"scale must be a floating tensor, got torch.int32"),
    "integer zero point": (dict(zero_point=torch.ones(4, dtype=torch.int32)), TypeError, r"zero_point must be floating.*got torch.int32"),
    "K mismatch": (dict(x=torch.randn(3, 7)), ValueError, r"K mismatch: x has K=7.*K=8"),
    "3-D w per-channel": (dict(w=torch.zeros(2, 4, 4, dtype=torch.int8)), ValueError, r"per-channel w must be 2-D.*got shape \(2, 4, 4\).*pass block_size"),
    "scale shape": (dict(scale=torch.rand(4, 1)), ValueError, r"scale must have shape \(4,\), got \(4, 1\)"),
    "zero point shape": (dict(zero_point=torch.rand(3)), ValueError, r"zero_point must have shape \(4,\).*got \(3,\)"),
    "block_size zero": (dict(block_size=0), ValueError, r"block_size must be -1 \(per-channel\) or positive, got 0"),
    "block_size -2": (dict(block_size=-2), ValueError, r"got -2"),
    "packed without int4": (dict(packed=True), ValueError, r"needs int4_weight=True"),
    "packed K mismatch hint": (dict(packed=True, int4_weight=True), ValueError, r"packs K=16.*pass packed=False"),
    "bias shape": (dict(bias=torch.rand(8)), ValueError, r"bias must have shape \(4,\), got \(8,\)"),
    "integer bias": (dict(bias=torch.ones(4, dtype=torch.int64)), TypeError, r"bias must be a floating tensor or None, got torch.int64"),
    "unpacked int4 hint": (dict(int4_weight=True, x=torch.randn(3, 16)), ValueError, r"holds K=8.*pass packed=True"),
}
BAD_BLOCKWISE = {
    "block not dividing K": (dict(block_size=3), ValueError, r"block_size=3 does not divide K=8"),
    "2-D w blockwise, seed-layout scale": (dict(w=torch.zeros(4, 8, dtype=torch.int8)), ValueError,
                                          r"scale must have shape \(4, 2\), got \(2, 4\)"),
    "4-D w blockwise": (dict(w=torch.zeros(2, 2, 2, 4, dtype=torch.int8)), ValueError,
                        r"blockwise w must be 3-D \[K/B, B, N\] or, by rows, 2-D \[N, K\]"),
    "by rows K mismatch": (dict(w=torch.zeros(4, 12, dtype=torch.int8), scale=torch.rand(4, 2)), ValueError,
                           r"K mismatch: x has K=8.*holds K=12"),
    "blockwise w shape": (dict(w=torch.zeros(3, 4, 4, dtype=torch.int8)), ValueError, r"must be \(2, 4, 4\).*got \(3, 4, 4\)"),
    "blockwise scale shape": (dict(scale=torch.rand(4)), ValueError, r"scale must have shape \(2, 4\), got \(4,\)"),
    "packed odd block": (dict(block_size=1, int4_weight=True, packed=True, w=torch.zeros(8, 1, 4, dtype=torch.int8), scale=torch.rand(8, 4)), ValueError, r"even block_size"),
}
CASES = {**{k: (_good, *v) for k, v in BAD.items()}, **{k: (_blockwise, *v) for k, v in BAD_BLOCKWISE.items()}}


def _call(kwargs):
    kw = dict(kwargs)
    return op(kw.pop("x"), kw.pop("w"), kw.pop("scale"), kw.pop("zero_point"), kw.pop("block_size"),
              kw.pop("int4_weight"), kw.pop("quantize_activation"), kw.pop("bias"), packed=kw.pop("packed"))


def _make(name):
    base, change, exc, pattern = CASES[name]
    return dict(base(), **change), exc, pattern


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_cpu(name):
    kwargs, exc, pattern = _make(name)
    with pytest.raises(exc, match=pattern):
        _call(kwargs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_meta_tensors_fail_at_trace_time(name):
    """Meta tensors run the fake kernel only: the check happens without any data."""
    kwargs, exc, pattern = _make(name)
    kwargs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with pytest.raises(exc, match=pattern):
        _call(kwargs)


@pytest.mark.parametrize("name", ["integer x", "K mismatch", "block not dividing K", "packed without int4", "scale shape"])
def test_bad_input_xla(name, xla_device):
    kwargs, exc, pattern = _make(name)
    kwargs = {k: v.to(xla_device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with pytest.raises(exc, match=pattern):
        _call(kwargs)


@pytest.mark.parametrize("name", ["float w", "K mismatch", "integer zero point"])
def test_bad_input_under_torch_compile_fails_while_tracing(name):
    """Dynamo wraps the error raised by the fake kernel; the message is ours, nothing ran."""
    kwargs, exc, pattern = _make(name)
    compiled = torch.compile(_call, backend="eager", fullgraph=True)
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError, match=exc.__name__ + r".*" + pattern.split(".*")[0]):
        compiled(kwargs)


def test_int32_overflow_bound_rejected():
    k = 140_000  # > 2**31 / (127 * 128)
    with pytest.raises(ValueError, match=r"int32.*K=140000.*bound is 132104"):
        op(torch.zeros(1, k, device="meta"), torch.zeros(1, k, dtype=torch.int8, device="meta"),
           torch.ones(1, device="meta"), quantize_activation=True)
    with pytest.raises(ValueError, match=r"bound is 66311"):  # uint8 weights up to 255
        op(torch.zeros(1, 70_000, device="meta"), torch.zeros(1, 70_000, dtype=torch.uint8, device="meta"),
           torch.ones(1, device="meta"), torch.zeros(1, device="meta"), quantize_activation=True)
    # without activation quantization there is no integer accumulation and no bound
    assert op(torch.zeros(1, k, device="meta"), torch.zeros(1, k, dtype=torch.int8, device="meta"),
              torch.ones(1, device="meta")).shape == (1, 1)


def test_device_mismatch(xla_device):
    kwargs = _good()
    kwargs["x"] = kwargs["x"].to(xla_device)
    with pytest.raises(ValueError, match=r"w is on cpu, expected x's device xla"):
        _call(kwargs)


def test_an_unknown_xla_lowering_in_the_environment_is_refused_at_import():
    import os
    import subprocess
    import sys

    env = dict(os.environ, XQPASS_XLA_LOWERING="bogus")
    proc = subprocess.run([sys.executable, "-c", "import xqpass"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "ValueError: XQPASS_XLA_LOWERING: expected one of ('auto', 'canonical', 'cpu'), got 'bogus'" in proc.stderr
