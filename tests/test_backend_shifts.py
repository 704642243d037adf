"""torch_xla 2.9 computes ``>>`` wrong (a division by 2**s, rounding negative values toward zero; zero for a
shift tensor that is not 0-dim; a failed lowering for a Python-int shift by bits-1) and
``bitwise_right_shift`` by a Python int with an int64 result. The backends hand openxla only
``aten.bitwise_right_shift.Tensor`` (xqpass.backend.correct_shifts): every spelling, on every integer dtype
CPU shifts, equals CPU eager exactly, and plain openxla does not."""
import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

from xqpass.backend import _WRONG_SHIFTS, correct_shifts, make_backend

DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]


def values(dtype):
    """Negative (for signed dtypes), zero, positive and the extremes, as a column to broadcast against shifts."""
    info = torch.iinfo(dtype)
    vs = [info.min, info.min + 1, -100, -7, -2, -1, 0, 1, 2, 7, 100, info.max - 1, info.max]
    return torch.tensor(sorted({v for v in vs if info.min <= v <= info.max}), dtype=torch.int64).to(dtype)[:, None]


def shifts(x, s):
    """Every right-shift spelling: s is a shift tensor covering 0..bits-1, the Python ints take both ends."""
    bits = torch.iinfo(x.dtype).bits
    inplace_int, inplace_tensor, method_inplace = x.clone(), x.expand(-1, len(s)).clone(), x.clone()
    inplace_int >>= bits - 1
    inplace_tensor >>= s
    method_inplace.bitwise_right_shift_(1)
    return (x >> 1, x >> (bits - 1), x >> s, x >> s[3], x.__rshift__(2), x.__rshift__(s),
            torch.bitwise_right_shift(x, 3), torch.bitwise_right_shift(x, s), x.bitwise_right_shift(bits - 1),
            inplace_int, inplace_tensor, method_inplace)


#: the spellings above that need the rewrite (all but ``torch.bitwise_right_shift(x, tensor)``)
WRONG_IN_SHIFTS = 11


def unpack_int4(w, shifts):
    """compressed-tensors-style unpacking of int32 words: with a shift tensor, and as its
    ``unpack_from_int32`` does it, a Python-int shift per nibble."""
    by_tensor = ((w.unsqueeze(-1) >> shifts) & 0xF).flatten(-2)
    by_int = torch.stack([(w >> (4 * i)) & 0xF for i in range(8)], dim=-1).flatten(-2)
    return by_tensor, (by_int - 8).to(torch.int8)


def _compile(fn, backend, **kw):
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, **kw)


def _assert_equal_to_cpu(got, want):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == w.dtype, f"output {i}: {g.dtype} != {w.dtype}"
        assert torch.equal(g.cpu(), w), f"output {i}:\n{g.cpu()}\n!=\n{w}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_spelling_on_xla_equals_cpu(dtype, xla_device):
    x, s = values(dtype), torch.arange(torch.iinfo(dtype).bits, dtype=dtype)
    want = shifts(x, s)
    _assert_equal_to_cpu(_compile(shifts, "xq_openxla")(x.to(xla_device), s.to(xla_device)), want)


@pytest.mark.parametrize("shift_dtype", [torch.int32, torch.int64], ids=str)
def test_compressed_tensors_unpacking_on_xla_equals_cpu(shift_dtype, xla_device):
    w = torch.randint(-2**31, 2**31, (16, 8), dtype=torch.int64).to(torch.int32)
    w[0, :2] = torch.tensor([-1, -2**31], dtype=torch.int32)  # every nibble set; only the top bit set
    s = torch.arange(0, 32, 4, dtype=shift_dtype)
    want = unpack_int4(w, s)
    assert (w < 0).any()
    _assert_equal_to_cpu(_compile(unpack_int4, "xq_openxla")(w.to(xla_device), s.to(xla_device)), want)


def test_symbolic_shift_amount_on_xla_equals_cpu(xla_device):
    x = values(torch.int32)

    def f(x, n):
        return x >> n, torch.bitwise_right_shift(x, n + 1)

    compiled = _compile(f, "xq_openxla", dynamic=True)
    for n in (1, 5, 30):
        _assert_equal_to_cpu(compiled(x.to(xla_device), n), f(x, n))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64], ids=str)
def test_plain_openxla_is_wrong_for_signed_shifts(dtype, xla_device):
    """Why the rewrite exists: if this fails, torch_xla computes ``>>`` right and correct_shifts can go."""
    x = torch.tensor([-1, -7, -100], dtype=dtype)
    got = _compile(lambda x: x >> 1, "openxla")(x.to(xla_device)).cpu()
    assert not torch.equal(got, x >> 1), f"openxla now computes {x.tolist()} >> 1 right: {got.tolist()}"


def test_the_pass_counts_each_wrong_spelling_at_both_levels():
    counts = {}

    def aten_level(name):
        def fw(gm, example_inputs):
            counts[name] = correct_shifts(gm)
            assert correct_shifts(gm) == 0  # nothing left to rewrite
            return gm.forward
        return aot_autograd(fw_compiler=fw)

    def torch_level(gm, example_inputs):
        aten_level("aten, untouched")(gm, example_inputs)  # AOT traces gm into a new graph
        counts["torch"] = correct_shifts(gm)
        return aten_level("aten, after torch")(gm, example_inputs)

    x, s = values(torch.int16), torch.arange(16, dtype=torch.int16)
    _assert_equal_to_cpu(_compile(shifts, torch_level)(x, s), shifts(x, s))
    assert counts == {"aten, untouched": WRONG_IN_SHIFTS, "torch": WRONG_IN_SHIFTS, "aten, after torch": 0}


def test_make_backend_hands_any_compiler_no_wrong_shift_and_cpu_stays_right():
    seen = []

    def record(gm, example_inputs):
        seen.append([n.target for n in gm.graph.nodes if n.target in _WRONG_SHIFTS])
        return gm.forward

    x, s = values(torch.int32), torch.arange(32, dtype=torch.int32)
    _assert_equal_to_cpu(_compile(shifts, make_backend(record))(x, s), shifts(x, s))
    assert seen == [[]]
