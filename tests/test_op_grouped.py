"""``torch.ops.xq.quantized_grouped_matmul`` (expert banks): CPU and the XLA lowerings (both forms, both
routes) against a float64 oracle written here from docs/ops.md's layouts (bytes decoded by hand: nibbles,
float8 bits), errors, export, one compilation."""
import re

import numpy as np
import pytest
import torch
import torch_xla
import torch_xla.debug.metrics as met
from hypothesis import given, settings
from hypothesis import strategies as st

from oracle import EPS, SUBNORMAL, assert_within, np_unpack_int4
from test_op_fp8 import decode, random_fp8
from xqpass.ops import GroupedTuning, grouped_tuning, xla_lowering

op = torch.ops.xq.quantized_grouped_matmul
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
#: (name, storage dtype, int4_weight, packed) of every weight format
FORMATS = [("int8", torch.int8, False, False), ("uint8", torch.uint8, False, False),
           ("int4", torch.int8, True, False), ("uint4", torch.uint8, True, False),
           ("int4 packed", torch.int8, True, True), ("uint4 packed", torch.uint8, True, True),
           ("e4m3", E4M3, False, False), ("e5m2", E5M2, False, False)]
ROUTES = {"gather": GroupedTuning(gather_max_rows=10**9), "dense": GroupedTuning(gather_max_rows=-1, each_row_max_rows=-1),
          "each row": GroupedTuning(gather_max_rows=-1, each_row_max_rows=10**9)}


class Case:
    def __init__(self, fmt, experts, n, k, block_size, rows, top_k, asym, with_bias, dtype, used, seed,
                 with_perm=False):
        self.name = (f"{fmt[0]} E={experts} N={n} K={k} B={block_size} T={rows} top_k={top_k} {dtype}"
                     f"{' perm' if with_perm else ''}")
        _, wdtype, int4, packed = fmt
        gen = torch.Generator().manual_seed(seed)
        groups = 1 if block_size == -1 else k // block_size
        if wdtype.is_floating_point:
            w = random_fp8((experts, n, k), wdtype, gen)
        else:
            lo, hi = (-8, 7) if int4 else (-128, 127)
            if wdtype == torch.uint8:  # unsigned: the same span from 0
                lo, hi = 0, hi - lo
            q = torch.randint(lo, hi + 1, (experts, n, k), generator=gen).to(wdtype)
            w = np_pack(q) if packed else q
        scale = torch.rand((experts, n, groups), generator=gen) * 0.1 + 0.01
        zero = torch.randn((experts, n, groups), generator=gen) * 0.1 if asym else None
        if block_size == -1:
            scale, zero = scale[..., 0], None if zero is None else zero[..., 0]
        ids_shape = (rows,) if top_k is None else (rows, top_k)
        pool = torch.tensor(used)  # the experts rows may go to: the others receive none
        ids = pool[torch.randint(0, len(used), ids_shape, generator=gen)]
        self.x = torch.randn((rows, k), generator=gen).to(dtype)
        self.kwargs = dict(expert_ids=ids, w=w, scale=scale, zero_point=zero, block_size=block_size,
                           int4_weight=int4, bias=torch.randn((experts, n), generator=gen) if with_bias else None,
                           packed=packed)
        if with_perm:
            self.kwargs["perm"] = act_order_perms(experts, k, block_size, gen)

    def call(self, device=None):
        move = (lambda t: t.to(device) if isinstance(t, torch.Tensor) and device is not None else t)
        return op(move(self.x), **{key: move(v) for key, v in self.kwargs.items()})


def act_order_perms(experts, k, block_size, gen):
    """``[E, K]`` int64: each expert's own GPTQ act-order, a shuffled ``g_idx`` with every group
    ``block_size`` features (per channel, one group: any permutation), sorted by group (a stable argsort)."""
    perms = []
    for _ in range(experts):
        shuffle = torch.randperm(k, generator=gen)
        if block_size == -1:
            perms.append(shuffle)
        else:
            g_idx = (torch.arange(k) // block_size)[shuffle]
            perms.append(torch.argsort(g_idx, stable=True))
    return torch.stack(perms)


def np_pack(q):
    """Two 4-bit values a byte along K, even k in the low nibble (docs/ops.md), written here in numpy."""
    v = q.numpy().astype(np.int64) & 15
    byte = (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)
    return torch.from_numpy(byte.view(np.int8).copy() if q.dtype == torch.int8 else byte.copy())


def oracle(case, roundings=1):
    """(expected float64 ``[*ids.shape, N]``, allowance): ``x[t] @ w_deq[ids[t, j]].T + bias[ids[t, j]]``
    with ``w_deq = value * scale - zero_point``, each scale covering ``block_size`` values of K."""
    kw = case.kwargs
    w, block = kw["w"], kw["block_size"]
    if w.dtype in (E4M3, E5M2):
        v = decode(w)
    elif kw["packed"]:
        v = np_unpack_int4(w, 2).astype(np.float64)
    else:
        v = w.numpy().astype(np.float64)
    k = v.shape[-1]
    s = kw["scale"].double().numpy()
    s = s[..., None] if block == -1 else s
    reps = k if block == -1 else block
    ws = v * np.repeat(s, reps, axis=-1)
    z = 0 * ws if kw["zero_point"] is None else np.repeat(
        (kw["zero_point"].double().numpy()[..., None] if block == -1 else kw["zero_point"].double().numpy()),
        reps, axis=-1)
    w_deq, w_mag = ws - z, np.abs(ws) + np.abs(z)
    ids = kw["expert_ids"].numpy()
    ids2 = ids if ids.ndim == 2 else ids[:, None]
    x = case.x.double().numpy()
    perm = kw.get("perm")
    n = w_deq.shape[1]
    expected, mag = np.zeros((*ids2.shape, n)), np.zeros((*ids2.shape, n))
    for t, j in np.ndindex(*ids2.shape):
        e = ids2[t, j]
        row = x[t] if perm is None else x[t][perm[e].numpy()]  # expert e reads x[t, perm[e, k]] as its k
        expected[t, j] = w_deq[e] @ row + (0 if kw["bias"] is None else kw["bias"][e].double().numpy())
        mag[t, j] = w_mag[e] @ np.abs(row) + (0 if kw["bias"] is None else np.abs(kw["bias"][e].double().numpy()))
    allowance = (roundings * EPS[case.x.dtype] + 8 * k * 2.0**-24) * mag + roundings * SUBNORMAL[case.x.dtype] / 2
    return expected.reshape(*ids.shape, n), allowance.reshape(*ids.shape, n) + 1e-30


@st.composite
def cases(draw, dtypes=(torch.float32, torch.bfloat16), formats=FORMATS, rows=(0, 1, 2, 3, 7, 20), with_perm=False):
    fmt = draw(st.sampled_from(formats))
    block = draw(st.sampled_from([-1, 2, 4, 8, 16]))
    k = draw(st.integers(1, 4)) * (16 if block == -1 else block)  # even: packed per-channel takes it
    experts = draw(st.integers(1, 6))
    used = sorted(draw(st.sets(st.integers(0, experts - 1), min_size=1)))  # the others receive no row
    return Case(fmt, experts, draw(st.integers(1, 9)), k, block, draw(st.sampled_from(rows)),
                draw(st.sampled_from([None, 1, 2, 3])), not fmt[1].is_floating_point and fmt[1] == torch.uint8,
                draw(st.booleans()), draw(st.sampled_from(dtypes)), used, draw(st.integers(0, 2**16)), with_perm)


# -- CPU --------------------------------------------------------------------------------------------------------

@given(case=cases())
def test_cpu_matches_the_float64_oracle(case):
    out = case.call()
    assert out.dtype == case.x.dtype
    expected, allowance = oracle(case)
    assert_within(out, expected, allowance, case.name)


@settings(max_examples=15)
@given(case=cases(dtypes=(torch.float64,)))
def test_float64_activations_are_float64_accurate(case):
    expected, _ = oracle(case)
    got = case.call().numpy()
    assert np.allclose(got, expected, rtol=1e-12, atol=1e-12), case.name


def test_experts_without_rows_and_no_rows_at_all():
    fmt = FORMATS[0]
    for rows, top_k in ((0, None), (0, 2), (4, 0)):
        case = Case(fmt, 3, 5, 16, -1, rows, top_k, False, True, torch.float32, [1], seed=1)
        out = case.call()
        assert out.shape == (*case.kwargs["expert_ids"].shape, 5)
    case = Case(fmt, 4, 5, 16, -1, 6, 2, False, True, torch.float32, [2], seed=2)  # only expert 2 is used
    expected, allowance = oracle(case)
    assert_within(case.call(), expected, allowance, "one expert used")


def test_fake_kernel_gives_the_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = Case(FORMATS[4], 3, 5, 16, 8, 7, 2, False, True, torch.bfloat16, [0, 2], seed=3)
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in case.kwargs.items()}
        out = op(mode.from_tensor(case.x), **fake)
    assert out.shape == (7, 2, 5) and out.dtype == torch.bfloat16


# -- float8 in 2-D blocks ------------------------------------------------------------------------------------

class BlockCase:
    """A bank of float8 experts in 2-D blocks of ``block_n`` x ``block_size`` (N and K need not be multiples:
    each expert's last blocks are partial), scale ``[E, ceil(N/Bn), ceil(K/B)]``."""

    def __init__(self, wdtype, experts, n, k, block_n, block_size, rows, top_k, with_bias, dtype, used, seed):
        self.name = (f"{wdtype} E={experts} N={n} K={k} blocks {block_n}x{block_size} T={rows} top_k={top_k} "
                     f"{dtype}")
        gen = torch.Generator().manual_seed(seed)
        w = random_fp8((experts, n, k), wdtype, gen)
        scale = torch.rand((experts, -(-n // block_n), -(-k // block_size)), generator=gen) * 0.1 + 0.01
        pool = torch.tensor(used)  # the experts rows may go to: the others receive none
        ids = pool[torch.randint(0, len(used), (rows,) if top_k is None else (rows, top_k), generator=gen)]
        self.x = torch.randn((rows, k), generator=gen).to(dtype)
        self.kwargs = dict(expert_ids=ids, w=w, scale=scale, zero_point=None, block_size=block_size,
                           int4_weight=False, bias=torch.randn((experts, n), generator=gen) if with_bias else None,
                           packed=False, block_n=block_n)

    call = Case.call


def block_oracle(case, roundings=1):
    """(expected, allowance) in float64: each expert dequantized by hand, its block scale repeated over its
    Bn rows and B columns (``repeat_interleave``, the partial ends cut), float8 bytes decoded from their bits."""
    kw = case.kwargs
    w, scale = kw["w"], kw["scale"].double()
    experts, n, k = w.shape
    full = scale.repeat_interleave(kw["block_n"], dim=1)[:, :n].repeat_interleave(kw["block_size"], dim=2)[:, :, :k]
    values = torch.from_numpy(decode(w))
    w_deq, w_mag = values * full, (values * full).abs()
    ids = kw["expert_ids"] if kw["expert_ids"].dim() == 2 else kw["expert_ids"][:, None]
    x = case.x.double()
    bias = torch.zeros(experts, n, dtype=torch.float64) if kw["bias"] is None else kw["bias"].double()
    expected = torch.einsum("tk,tjnk->tjn", x, w_deq[ids]) + bias[ids]
    mag = torch.einsum("tk,tjnk->tjn", x.abs(), w_mag[ids]) + bias[ids].abs()
    allowance = (roundings * EPS[case.x.dtype] + 8 * k * 2.0**-24) * mag + roundings * SUBNORMAL[case.x.dtype] / 2
    shape = (*kw["expert_ids"].shape, n)
    return expected.reshape(shape).numpy(), allowance.reshape(shape).numpy() + 1e-30


@st.composite
def block_cases(draw, dtypes=(torch.float32, torch.bfloat16), rows=(0, 1, 2, 3, 7, 20)):
    block_n, block_size = draw(st.sampled_from([2, 4, 8])), draw(st.sampled_from([4, 8, 16]))
    experts = draw(st.integers(1, 6))
    used = sorted(draw(st.sets(st.integers(0, experts - 1), min_size=1)))  # the others receive no row
    n = draw(st.integers(1, 3 * block_n))  # a partial last block of rows, or one smaller than a block
    k = draw(st.integers(1, 3 * block_size))
    return BlockCase(draw(st.sampled_from([E4M3, E5M2])), experts, n, k, block_n, block_size,
                     draw(st.sampled_from(rows)), draw(st.sampled_from([None, 1, 2, 3])), draw(st.booleans()),
                     draw(st.sampled_from(dtypes)), used, draw(st.integers(0, 2**16)))


@settings(max_examples=25)
@given(case=block_cases())
def test_2d_blocks_cpu_match_the_float64_oracle(case):
    out = case.call()
    assert out.dtype == case.x.dtype
    expected, allowance = block_oracle(case)
    assert_within(out, expected, allowance, case.name)


@pytest.mark.parametrize("route", ["gather", "dense", "each row"])
@pytest.mark.parametrize("form", ["cpu", "canonical"])
@settings(max_examples=8)
@given(case=block_cases(rows=(1, 3, 7)))
def test_2d_blocks_on_xla_match_the_oracle(form, route, case, xla_device):
    with xla_lowering(form), grouped_tuning(ROUTES[route]):
        out = case.call(xla_device).cpu()
    expected, allowance = block_oracle(case, roundings=2)
    assert_within(out, expected, allowance, f"{form} {route} {case.name}")


@pytest.mark.parametrize("n,k", [(32, 48), (30, 40), (6, 20)])  # whole blocks; partial N and K; one partial block
@pytest.mark.parametrize("route", ["gather", "dense", "each row"])
@pytest.mark.parametrize("form", ["cpu", "canonical"])
def test_2d_blocks_on_xla_whole_and_partial(form, route, n, k, xla_device):
    case = BlockCase(E4M3, 5, n, k, 16, 16, 4, 2, True, torch.bfloat16, [0, 2, 3], seed=n + k)
    with xla_lowering(form), grouped_tuning(ROUTES[route]):
        out = case.call(xla_device).cpu()
    expected, allowance = block_oracle(case, roundings=2)
    assert_within(out, expected, allowance, f"{form} {route} {case.name}")


def test_2d_blocks_fake_kernel_and_empty_calls():
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = BlockCase(E4M3, 3, 10, 20, 4, 8, 7, 2, True, torch.bfloat16, [0, 2], seed=3)
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in case.kwargs.items()}
        out = op(mode.from_tensor(case.x), **fake)
    assert out.shape == (7, 2, 10) and out.dtype == torch.bfloat16
    empty = BlockCase(E4M3, 3, 10, 20, 4, 8, 0, 2, False, torch.float32, [1], seed=4)
    assert empty.call().shape == (0, 2, 10)


BLOCK_BAD = [
    (dict(w=torch.zeros(3, 4, 16, dtype=torch.int8), scale=torch.ones(3, 1, 2)), ValueError,
     "block_n=4 (2-D block scales) is for float8 weights; torch.int8 weights take block_n=1"),
    (dict(block_n=-1, block_size=-1, scale=torch.ones(3)), ValueError,
     "block_n=-1 (per-tensor) has no bank form: an expert's one scale is one 2-D block, pass block_n=N"),
    (dict(scale=torch.ones(3, 4, 2)), ValueError,
     "2-D blocks scale must have shape (3, 1, 2) [E, ceil(N=4/block_n=4), ceil(K=16/block_size=8)], got (3, 4, 2)"),
    (dict(block_size=-1, scale=torch.ones(3, 1, 1)), ValueError, "2-D blocks (block_n=4) need a block_size"),
]


@pytest.mark.parametrize("change,kind,message", BLOCK_BAD, ids=[b[2][:30] for b in BLOCK_BAD])
def test_2d_block_mistakes_are_named(change, kind, message):
    kw = _base() | dict(w=torch.zeros(3, 4, 16, dtype=E4M3), scale=torch.ones(3, 1, 2), block_size=8, block_n=4)
    with pytest.raises(kind, match=re.escape(message)):
        op(**kw | change)


def test_a_block_n_that_is_no_int_is_named():
    from xqpass.ops import check_grouped_inputs  # the dispatcher refuses a float before the kernel runs

    kw = _base() | dict(w=torch.zeros(3, 4, 16, dtype=E4M3), scale=torch.ones(3, 1, 2), block_size=8)
    with pytest.raises(TypeError, match="block_n must be an int, got float"):
        check_grouped_inputs(**kw, block_n=4.0)


# -- errors -------------------------------------------------------------------------------------------------------

def _base():
    return dict(x=torch.randn(3, 16), expert_ids=torch.tensor([0, 2, 1]), w=torch.zeros(3, 4, 16, dtype=torch.int8),
                scale=torch.ones(3, 4), zero_point=None, block_size=-1, int4_weight=False, bias=None, packed=False)


BAD = [
    ("x", torch.randn(3, 16).to(torch.int32), TypeError, "x must be float32"),
    ("x", torch.randn(1, 3, 16), ValueError, "flatten the leading dims"),
    ("expert_ids", torch.tensor([0.0, 2.0, 1.0]), TypeError, "expert_ids must be torch.int32 or torch.int64"),
    ("expert_ids", torch.tensor([0, 1]), ValueError, "expert_ids must be [T] or [T, top_k] with T=3"),
    ("expert_ids", torch.zeros(3, 2, 1, dtype=torch.long), ValueError, "got shape (3, 2, 1)"),
    ("expert_ids", torch.tensor([0, 3, 1]), ValueError, "expert_ids must lie in [0, 3) for E=3 experts, got ids in [0, 3]"),
    ("expert_ids", torch.tensor([0, -1, 1]), ValueError, "got ids in [-1, 1]"),
    ("w", torch.zeros(4, 16, dtype=torch.int8), ValueError, "use quantized_matmul"),
    ("w", torch.zeros(3, 2, 8, 4, dtype=torch.int8), ValueError, "store each expert by rows"),
    ("w", torch.zeros(3, 4, 16), TypeError, "w must be torch.int8 or torch.uint8"),
    ("w", torch.zeros(0, 4, 16, dtype=torch.int8), ValueError, "w holds no experts"),
    ("w", torch.zeros(3, 4, 12, dtype=torch.int8), ValueError, "K mismatch: x has K=16"),
    ("scale", torch.ones(4), ValueError, "per-channel scale must have shape (3, 4) [E, N], got (4,)"),
    ("scale", torch.ones(3, 4).to(torch.int32), TypeError, "scale must be float32"),
    ("zero_point", torch.ones(3, 4, dtype=torch.int32), TypeError, "zero_point must be a floating tensor"),
    ("zero_point", torch.ones(4), ValueError, "zero_point must have shape (3, 4) like scale"),
    ("bias", torch.ones(4), ValueError, "bias must have shape (3, 4) [E, N], got (4,)"),
    ("block_size", 5, ValueError, "block_size=5 does not divide K=16"),
    ("block_size", 8, ValueError, "blockwise by rows scale must have shape (3, 4, 2) [E, N, K/B], got (3, 4)"),
    ("packed", True, ValueError, "it needs int4_weight=True"),
]


@pytest.mark.parametrize("name,value,kind,message", BAD, ids=[f"{b[0]}: {b[3][:30]}" for b in BAD])
def test_bad_input_is_named(name, value, kind, message):
    kw = _base() | {name: value}
    with pytest.raises(kind, match=re.escape(message)):
        op(**kw)


def test_packed_and_float8_mix_ups_are_named():
    kw = _base() | dict(w=torch.zeros(3, 4, 16, dtype=torch.int8), int4_weight=True, packed=True)
    with pytest.raises(ValueError, match=re.escape("pass packed=False")):
        op(**kw)
    kw = _base() | dict(w=torch.zeros(3, 4, 8, dtype=torch.int8), int4_weight=True)
    with pytest.raises(ValueError, match=re.escape("pass packed=True")):
        op(**kw)
    kw = _base() | dict(w=torch.zeros(3, 4, 16, dtype=E4M3), zero_point=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="float8 weights .* zero_point None"):
        op(**kw)


def test_a_bad_call_fails_at_trace_time_on_xla_too(xla_device):
    kw = {k: v.to(xla_device) if isinstance(v, torch.Tensor) else v for k, v in _base().items()}
    with pytest.raises(ValueError, match=re.escape("bias must have shape (3, 4)")):
        op(**kw | dict(bias=torch.ones(4, device=xla_device)))


# -- XLA ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ["gather", "dense", "each row"])
@pytest.mark.parametrize("form", ["cpu", "canonical"])
@settings(max_examples=12)
@given(case=cases(rows=(0, 1, 3, 7)))
def test_xla_matches_the_oracle_and_the_cpu(form, route, case, xla_device):
    with xla_lowering(form), grouped_tuning(ROUTES[route]):
        out = case.call(xla_device).cpu()
    assert out.dtype == case.x.dtype and out.shape == case.call().shape
    expected, allowance = oracle(case, roundings=2)
    assert_within(out, expected, allowance, f"{form} {route} {case.name}")


def test_the_route_follows_the_rows():
    from xqpass.ops.grouped_xla import route_for

    # the default: XLA:CPU's measured best (docs/ops.md)
    assert route_for(1) == "one row" and route_for(2) == "each row" and route_for(3) == "dense"
    with grouped_tuning(GroupedTuning(gather_max_rows=4)):
        assert route_for(1) == "one row" and route_for(2) == "gather" and route_for(4) == "gather"
        assert route_for(5) == "dense"
    with grouped_tuning(GroupedTuning(gather_max_rows=1, each_row_max_rows=3)):
        assert route_for(3) == "each row" and route_for(4) == "dense"


def _hlo(out):
    return torch_xla._XLAC._get_xla_tensors_hlo([out])


@pytest.mark.parametrize("form", ["cpu", "canonical"])
def test_gather_reads_the_selected_experts_bytes_dense_the_bank(form, xla_device):
    case = Case(FORMATS[4], 8, 48, 64, 16, 1, 2, False, False, torch.bfloat16, list(range(8)), seed=5)
    with xla_lowering(form), grouped_tuning(ROUTES["gather"]):
        hlo = _hlo(case.call(xla_device))
    assert "u8[8,48,32]" not in hlo and "s8[8,48,32]" in hlo  # the packed bytes are the parameter
    assert re.search(r"s8\[2,48,32\]\{[\d,]*\} gather\(", hlo), "the two experts' bytes are gathered"
    assert not re.search(r"(f32|bf16)\[8,48,(64|32)\]", hlo), "no float copy of the bank"
    with xla_lowering(form), grouped_tuning(ROUTES["dense"]):
        hlo = _hlo(case.call(xla_device))
    assert not re.search(r"s8\[2,48,32\]\{[\d,]*\} gather\(", hlo)


@pytest.mark.parametrize("form", ["cpu", "canonical"])
def test_each_row_reads_its_own_experts_bytes(form, xla_device):
    """Decode's down projection: two rows (a token's two slots), one expert each; by default each row is a
    product with its own expert's bytes, two of the eight experts read."""
    case = Case(FORMATS[4], 8, 48, 64, 16, 2, 1, False, False, torch.bfloat16, list(range(8)), seed=7)
    with xla_lowering(form):
        hlo = _hlo(case.call(xla_device))
    assert len(re.findall(r"s8\[1,48,32\]\{[\d,]*\} gather\(", hlo)) == 2, "one expert's bytes gathered a row"
    assert not re.search(r"(f32|bf16)\[8,48,(64|32)\]", hlo), "no float copy of the bank"


def test_export_keeps_one_node_with_symbolic_rows():
    case = Case(FORMATS[4], 4, 6, 32, 8, 5, 2, True, True, torch.float32, [0, 1, 3], seed=6)
    kw = case.kwargs

    class M(torch.nn.Module):
        def forward(self, x, ids):
            return op(x, ids, kw["w"], kw["scale"], kw["zero_point"], 8, True, kw["bias"], packed=True)

    rows = torch.export.Dim("rows")
    ep = torch.export.export(M(), (case.x, kw["expert_ids"]), dynamic_shapes={"x": {0: rows}, "ids": {0: rows}})
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls] == [op.default]
    other = Case(FORMATS[4], 4, 6, 32, 8, 9, 2, True, True, torch.float32, [0, 1, 3], seed=16)
    other.kwargs.update({name: kw[name] for name in ("w", "scale", "zero_point", "bias")})  # the exported bank
    expected, allowance = oracle(other)
    assert_within(ep.module()(other.x, other.kwargs["expert_ids"]), expected, allowance, "exported")


def _metric_count(name):
    data = met.metric_data(name)
    return data[0] if data else 0


@pytest.mark.parametrize("rows", [1, 16])  # the gather route at 1 row (top-2), the dense one at 16
def test_openxla_compiles_once_for_the_same_shapes(rows, xla_device):
    case = Case(FORMATS[0], 4, 24, 64, 16, rows, 2, True, True, torch.float32, [0, 1, 2, 3], seed=7)
    kw = {k: v.to(xla_device) if isinstance(v, torch.Tensor) else v for k, v in case.kwargs.items()}

    def f(x, ids):
        return op(x, ids, kw["w"], kw["scale"], kw["zero_point"], 16, False, kw["bias"])

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="openxla", fullgraph=True)
    first = compiled(case.x.to(xla_device), kw["expert_ids"]).cpu()
    compiles = _metric_count("CompileTime")
    for seed in (8, 9):
        other = Case(FORMATS[0], 4, 24, 64, 16, rows, 2, True, True, torch.float32, [0, 1, 2, 3], seed=7)
        other.x, other.kwargs["expert_ids"] = torch.randn(rows, 64), torch.randint(0, 4, (rows, 2))
        out = compiled(other.x.to(xla_device), other.kwargs["expert_ids"].to(xla_device)).cpu()
        expected, allowance = oracle(other)
        assert_within(out, expected, allowance, f"call with seed {seed}")
    assert _metric_count("CompileTime") == compiles, "a later call with the same shapes recompiled"
    expected, allowance = oracle(case)
    assert_within(first, expected, allowance, "first call")


# -- each expert's input order (perm: GPTQ act-order) -------------------------------------------------------------

@settings(max_examples=25)
@given(case=cases(with_perm=True))
def test_perm_cpu_matches_the_float64_oracle(case):
    expected, allowance = oracle(case)
    assert_within(case.call(), expected, allowance, case.name)


#: every route, forced: with perm the route is picked by the T * top_k rows, each of one expert
PERM_ROUTES = {"one row": (GroupedTuning(), (1,), (None, 1)), **{
    route: (tuning, (2, 3, 7), (None, 1, 2, 3)) for route, tuning in ROUTES.items()}}


@pytest.mark.parametrize("route", list(PERM_ROUTES))
@pytest.mark.parametrize("form", ["cpu", "canonical"])
@settings(max_examples=8)
@given(data=st.data())
def test_perm_on_xla_matches_the_oracle_on_every_route(form, route, data, xla_device):
    from xqpass.ops.grouped_xla import route_for

    tuning, rows, top_ks = PERM_ROUTES[route]
    fmt = data.draw(st.sampled_from(FORMATS))
    block = data.draw(st.sampled_from([-1, 2, 4, 8]))
    k = data.draw(st.integers(1, 3)) * (16 if block == -1 else block)
    experts = data.draw(st.integers(1, 5))
    used = sorted(data.draw(st.sets(st.integers(0, experts - 1), min_size=1)))
    t, top_k = data.draw(st.sampled_from(rows)), data.draw(st.sampled_from(top_ks))
    case = Case(fmt, experts, data.draw(st.integers(1, 7)), k, block, t, top_k, fmt[1] == torch.uint8,
                data.draw(st.booleans()), data.draw(st.sampled_from([torch.float32, torch.bfloat16])), used,
                data.draw(st.integers(0, 2**16)), with_perm=True)
    with xla_lowering(form), grouped_tuning(tuning):
        assert route_for(t * (top_k or 1)) == route, case.name
        out = case.call(xla_device).cpu()
    expected, allowance = oracle(case, roundings=2)
    assert_within(out, expected, allowance, f"{form} {route} {case.name}")


def test_an_identity_perm_changes_nothing_and_the_orders_are_gathers(xla_device):
    case = Case(FORMATS[0], 3, 5, 16, 8, 3, 2, False, True, torch.float32, [0, 2], seed=4)
    base = case.call()
    without = _hlo(case.call(xla_device))
    case.kwargs["perm"] = torch.arange(16, dtype=torch.int32).expand(3, 16).contiguous()  # int32 is taken too
    assert torch.equal(case.call(), base)
    torch.testing.assert_close(case.call(xla_device).cpu(), base, rtol=1e-5, atol=1e-5)  # XLA sums otherwise
    case.kwargs["perm"] = case.kwargs["perm"].long()
    with_perm = _hlo(case.call(xla_device))
    # perm's rows of each slot's expert, and x's values in those orders: two gathers more than without
    assert with_perm.count(" gather(") >= without.count(" gather(") + 2, with_perm


def test_perm_fake_kernel_and_empty_calls(xla_device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = Case(FORMATS[4], 3, 5, 16, 8, 7, 2, False, True, torch.bfloat16, [0, 2], seed=3, with_perm=True)
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in case.kwargs.items()}
        out = op(mode.from_tensor(case.x), **fake)
    assert out.shape == (7, 2, 5) and out.dtype == torch.bfloat16
    for rows, top_k in ((0, 2), (0, None)):
        empty = Case(FORMATS[0], 3, 5, 16, -1, rows, top_k, False, False, torch.float32, [1], seed=1, with_perm=True)
        assert empty.call().shape == empty.call(xla_device).shape == (*empty.kwargs["expert_ids"].shape, 5)


PERM_BAD = [
    (torch.arange(16), ValueError, "perm must have shape (3, 16) [E, K], one input order an expert, got (16,) "
                                   "(one order for all experts: perm.expand(E, K))"),
    (torch.zeros(3, 12, dtype=torch.long), ValueError, "perm must have shape (3, 16) [E, K]"),
    (torch.zeros(3, 16), TypeError, "perm must be torch.int32 or torch.int64"),
    (torch.zeros(3, 16, dtype=torch.long), ValueError, "perm[0] is not a permutation of range(K=16)"),
]


@pytest.mark.parametrize("perm,kind,message", PERM_BAD, ids=[b[2][:30] for b in PERM_BAD])
def test_perm_mistakes_are_named(perm, kind, message):
    with pytest.raises(kind, match=re.escape(message)):
        op(**_base(), perm=perm)


def test_a_perm_that_is_no_tensor_is_named():
    from xqpass.ops import check_grouped_inputs  # the dispatcher refuses a list before any kernel

    with pytest.raises(TypeError, match=re.escape("perm must be a torch.Tensor or None, got list")):
        check_grouped_inputs(**_base(), perm=[0, 1])
