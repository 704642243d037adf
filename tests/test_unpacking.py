"""Weights that libraries unpack inside ``forward`` (int32 words, reorders, nibbles written into ``empty``):
the pass computes them once into the op's layout and recomputes them when their sources change. The
oracle is each module's own forward in float64 (its float buffers and x in float64, its integer code as
written)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

import xqpass
from xqpass.backend import make_backend
from xqpass.patterns.dsl import Context
from xqpass.patterns.bounds import value_bounds
from xqpass.patterns.spellings import canonical

EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's nibble order inside a word


def words(values: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """Pack unsigned ``bits``-bit values into int32 words along ``dim`` (value ``i`` of a word at bits
    ``bits * i``; ``order[i]``: which value of the run sits in slot ``i``), as GPTQ and AWQ store them."""
    per = 32 // bits
    v = values.movedim(dim, -1).to(torch.int64)
    v = v.reshape(*v.shape[:-1], -1, per)
    if order is not None:
        v = v[..., order]
    word = sum(v[..., i] << (bits * i) for i in range(per))
    word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    return word.movedim(-1, dim).contiguous()


class WordsAlongK(nn.Module):
    """GPTQ-style torch forward: qweight int32 [K / (32/bits), N] packed along K, qzeros int32
    [G, N / (32/bits)] packed along N, both unpacked with a shift-amount buffer; groups of ``g`` along K,
    or, with ``g_idx``, the group of each input feature read from a buffer (``act_order``: a permutation
    of the features' groups, as GPTQ's act-order stores it)."""

    def __init__(self, k=64, n=32, g=16, bits=4, operator_shift=False, seed=0, g_idx=False, act_order=False):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.bits, self.g, self.operator_shift = bits, g, operator_shift
        index = torch.arange(k, dtype=torch.int32) // g
        self.register_buffer("g_idx", (index[torch.randperm(k, generator=gen)] if act_order else index)
                             if g_idx else None)
        q = torch.randint(0, 2**bits, (k, n), generator=gen)
        z = torch.randint(0, 2**bits, (k // g, n), generator=gen)
        self.register_buffer("qweight", words(q, bits, 0))
        self.register_buffer("qzeros", words(z, bits, 1))
        self.register_buffer("scales", torch.rand(k // g, n, generator=gen) / 20 + 0.01)
        self.register_buffer("shifts", torch.arange(0, 32, bits, dtype=torch.int32))

    def _shift(self, a, b):
        return a >> b if self.operator_shift else torch.bitwise_right_shift(a, b)

    def forward(self, x):
        per, mask = 32 // self.bits, 2**self.bits - 1
        w = self._shift(self.qweight.unsqueeze(1).expand(-1, per, -1), self.shifts.view(1, -1, 1)) & mask
        w = w.reshape(-1, self.qweight.shape[1])  # [K, N]
        z = self._shift(self.qzeros.unsqueeze(2).expand(-1, -1, per), self.shifts.view(1, 1, -1)) & mask
        z = z.reshape(self.scales.shape)  # [G, N]
        k, n = w.shape
        if self.g_idx is not None:  # GPTQ's torch path: scale and zero of each input feature's group
            g_idx = self.g_idx.long()
            return torch.matmul(x, (self.scales[g_idx] * (w - z[g_idx])).to(x.dtype))
        w = (w.reshape(k // self.g, self.g, n).to(x.dtype) - z[:, None, :].to(x.dtype)) * self.scales[:, None, :].to(x.dtype)
        return torch.matmul(x, w.reshape(k, n))


class WordsAlongN(nn.Module):
    """AWQ-style: qweight int32 [K, N / 8] and qzeros int32 [1, N / 8] packed along N in AWQ's interleaved
    order, undone by a reorder with a constant index; the zero point subtracted in integers, per-channel
    scale."""

    def __init__(self, k=48, n=32, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        q = torch.randint(0, 16, (k, n), generator=gen)
        self.register_buffer("qweight", words(q, 4, 1, AWQ_ORDER))
        self.register_buffer("qzeros", words(torch.randint(0, 16, (1, n), generator=gen), 4, 1, AWQ_ORDER))
        self.register_buffer("scales", torch.rand(n, generator=gen) / 20 + 0.01)
        self.register_buffer("shifts", torch.arange(0, 32, 4, dtype=torch.int32))
        # slot i holds value order[i]: value j sits in slot inverse[j]
        self.register_buffer("undo", torch.tensor([AWQ_ORDER.index(j) for j in range(8)]))

    def _unpack(self, packed):
        v = torch.bitwise_right_shift(packed[:, :, None], self.shifts[None, None, :])  # [rows, N/8, 8]
        return torch.bitwise_and(v[:, :, self.undo], 15).reshape(packed.shape[0], -1)  # [rows, N]

    def forward(self, x):
        w, z = self._unpack(self.qweight), self._unpack(self.qzeros)
        return x @ ((w - z).to(x.dtype) * self.scales.to(x.dtype))


class GroupsRepeated(WordsAlongN):
    """AWQ's torch path: scales and zeros [K/g, N] repeated along K (``repeat_interleave``), the zero
    subtracted in integers and the scale applied by type promotion."""

    def __init__(self, k=64, n=32, g=16, seed=0):
        super().__init__(k, n, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        self.g = g
        self.qzeros = words(torch.randint(0, 16, (k // g, n), generator=gen), 4, 1, AWQ_ORDER)
        self.scales = torch.rand(k // g, n, generator=gen) / 20 + 0.01

    def forward(self, x):
        w, z = self._unpack(self.qweight), self._unpack(self.qzeros)
        scales, z = self.scales.repeat_interleave(self.g, dim=0), z.repeat_interleave(self.g, dim=0)
        return x @ ((w - z) * scales).to(x.dtype)


class NibblesIntoEmpty(nn.Module):
    """Nibbles written into an ``empty`` tensor with strided assignment (``slice_scatter`` at the aten
    level), uint8 storage [N, K/2], multiplied by the float scale with no explicit cast."""

    def __init__(self, k=32, n=24, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("packed", torch.randint(0, 256, (n, k // 2), generator=gen).to(torch.uint8))
        self.register_buffer("scales", torch.rand(n, 1, generator=gen) / 20 + 0.01)

    def forward(self, x):
        n, half = self.packed.shape
        w = torch.empty(n, 2 * half, dtype=torch.uint8, device=self.packed.device)
        w[:, 1::2] = self.packed & 15  # high and low swapped: not the op's order
        w[:, 0::2] = self.packed >> 4
        return F.linear(x, ((w.to(x.dtype) - 8) * self.scales.to(x.dtype)))


class FlatGroups(nn.Module):
    """HQQ's torch path (axis=1): the weight stored as flat groups ``[N * K/g, g]`` with float scale and
    zero ``[N * K/g, 1]``, dequantized in that shape and reshaped to ``[N, K]``; 4-bit: two rows a byte
    (the high nibbles the first half of the rows), unpacked into a float ``empty`` tensor."""

    def __init__(self, k=64, n=24, g=16, bits=8, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.n, self.k, self.g, self.bits = n, k, g, bits
        rows = n * k // g
        q = torch.randint(0, 2**bits, (rows, g), generator=gen).to(torch.uint8)
        self.register_buffer("W_q", q if bits == 8 else (q[: rows // 2] << 4) | q[rows // 2:])
        self.register_buffer("zero", torch.rand(rows, 1, generator=gen) * 2**bits)
        self.register_buffer("scale", torch.rand(rows, 1, generator=gen) / 20 + 0.01)

    def forward(self, x):
        if self.bits == 8:
            w = self.W_q.to(x.dtype)
        else:
            half = self.W_q.shape[0]
            w = torch.empty([2 * half, self.W_q.shape[1]], dtype=x.dtype, device=x.device)
            w[:half] = (self.W_q & 240) >> 4
            w[half:] = self.W_q & 15
        return torch.matmul(x, ((w - self.zero.to(x.dtype)) * self.scale.to(x.dtype)).reshape(self.n, self.k).t())


FORMS = {
    "hqq flat groups int8": lambda: FlatGroups(),
    "hqq flat groups int4 into a float empty": lambda: FlatGroups(bits=4, seed=1),

    "gptq int4, torch.bitwise_right_shift": lambda: WordsAlongK(),
    "gptq int4, >>": lambda: WordsAlongK(operator_shift=True, seed=1),
    "gptq int8": lambda: WordsAlongK(bits=8, g=32, seed=2),
    "awq order, words along N": lambda: WordsAlongN(),
    "awq, groups repeated along K": lambda: GroupsRepeated(),
    "gptq, scales[g_idx]": lambda: WordsAlongK(g_idx=True, seed=8),
    "gptq act-order, scales[g_idx]": lambda: WordsAlongK(g_idx=True, act_order=True, seed=9),
    "nibbles into empty": lambda: NibblesIntoEmpty(),
}


def in_float64(module, x):
    return copy.deepcopy(module).cpu().double()(x.cpu().double())


def assert_close_to_float64(module, x, out):
    with torch.no_grad():
        exact = in_float64(module, x)
        original = (module(x).cpu().double() - exact).abs().max().item()
    err, scale = (out.cpu().double() - exact).abs().max().item(), exact.abs().max().item()
    assert err <= 4 * max(original, EPS[x.dtype] * scale) + 1e-5 * scale, (err, original, scale)


class GraphRecorder:
    """A compiler after the pass that keeps the aten-level graphs it is given and runs them eagerly."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def compile_eager(module, reports, recorder=None):
    torch._dynamo.reset()
    return torch.compile(module, fullgraph=True,
                         backend=make_backend(recorder or "eager", reports=reports))


def _kinds(gm):
    return {c.kind for c in map(canonical, gm.graph.nodes) if c is not None}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpacked_weights_are_computed_once_into_the_ops_layout(form, dtype):
    module = FORMS[form]()
    x = torch.randn(5, _in_features(module), dtype=dtype)
    reports, recorder = [], GraphRecorder()
    with torch.no_grad():
        out = compile_eager(module, reports, recorder)(x)
    rewrites = [r for rep in reports for r in rep.rewrites]
    assert len(rewrites) == 1, "\n".join(map(str, reports))
    fmt = rewrites[0].format
    assert fmt["unpacked_once"] == (form != "hqq flat groups int8"), rewrites[0]  # a stored byte a weight
    assert fmt["packed"] == (form not in ("gptq int8", "hqq flat groups int8")), rewrites[0]
    assert fmt["block_size"] == getattr(module, "g", -1), rewrites[0]
    # the graph that runs has no unpacking left: no shifts, masks, reorders or writes
    (gm,) = recorder.graphs
    assert not _kinds(gm) & {"rshift", "bitand", "lshift"}, gm.code
    # (the activation's features read in the order the weight is stored, where a group index sorted them)
    reads = [n for n in gm.graph.nodes if "scatter" in str(n.target) or "index" in str(n.target)]
    assert [n.target for n in reads] == ([torch.ops.aten.index_select.default] if fmt["group_index"] else []), \
        gm.code
    assert_close_to_float64(module, x, out)


def _in_features(module):
    if isinstance(module, FlatGroups):
        return module.k
    if isinstance(module, GroupsRepeated):
        return module.qweight.shape[0]
    if isinstance(module, WordsAlongK):
        return module.qweight.shape[0] * 32 // module.bits
    if isinstance(module, WordsAlongN):
        return module.qweight.shape[0]
    return module.packed.shape[1] * 2


def test_a_group_index_is_checked_on_every_call():
    """A weight read by a group index is right for every g_idx that gives each group K/G features (another
    act-order permutation after compiling included), and a g_idx with unequal groups is a named error."""
    module = WordsAlongK(g_idx=True, act_order=True, seed=10)
    x = torch.randn(3, _in_features(module))
    reports = []
    compiled = compile_eager(module, reports)
    with torch.no_grad():
        compiled(x)
        assert [r.format["group_index"] for rep in reports for r in rep.rewrites] == [True]
        module.g_idx.copy_(module.g_idx[torch.randperm(module.g_idx.numel())])
        assert_close_to_float64(module, x, compiled(x))
        module.g_idx[0] = (module.g_idx[0] + 1) % (module.g_idx.max() + 1)  # one group one feature short
        with pytest.raises(ValueError, match="g_idx"):
            compiled(x)


@pytest.mark.parametrize("change", ["in place", "new tensor"])
def test_a_changed_source_is_unpacked_again(change):
    module = WordsAlongK(seed=3)
    x = torch.randn(3, _in_features(module))
    compiled = compile_eager(module, [])
    with torch.no_grad():
        before = compiled(x)
        new = WordsAlongK(seed=4).qweight
        if change == "in place":
            module.qweight.copy_(new)
        else:
            module.qweight = new
        after = compiled(x)
    assert not torch.allclose(before, after)
    assert_close_to_float64(module, x, after)


def test_unpacked_on_xla_with_openxla():
    import torch_xla

    device = torch_xla.device()
    for make in (lambda: WordsAlongK(operator_shift=True, seed=5), lambda: WordsAlongN(seed=5),
                 lambda: WordsAlongK(g_idx=True, act_order=True, seed=5)):
        module = make()
        on_xla = copy.deepcopy(module).to(device)
        x = torch.randn(4, _in_features(module))
        reports = []
        torch._dynamo.reset()
        compiled = torch.compile(on_xla, backend=make_backend("openxla", reports=reports), fullgraph=True)
        with torch.no_grad():
            out = compiled(x.to(device)).cpu()
            assert [r.format["unpacked_once"] for rep in reports for r in rep.rewrites] == [True]
            # torch's semantics on every call: the words are unpacked on CPU, never with XLA's shifts
            assert_close_to_float64(module, x, out)
            on_xla.qweight.copy_(make().qweight.flip(0).to(device))
            module.qweight.copy_(on_xla.qweight.cpu())
            assert_close_to_float64(module, x, compiled(x.to(device)).cpu())


class Unprovable(nn.Module):
    """``qweight >> 4`` without a mask: int32 values no int8 / uint8 storage holds."""

    def __init__(self):
        super().__init__()
        self.register_buffer("qweight", torch.randint(0, 2**8, (16, 32), dtype=torch.int32))

    def forward(self, x):
        return F.linear(x, (self.qweight >> 4).to(x.dtype) * 0.1)


class RandomBits(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("qweight", torch.randint(0, 16, (16, 32), dtype=torch.int32))

    def forward(self, x):
        noise = torch.randint_like(self.qweight, 0, 2)
        return F.linear(x, ((self.qweight ^ noise) & 15).to(x.dtype) * 0.1)


class FromTheActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("qweight", torch.randint(0, 16, (16, 32), dtype=torch.int32))

    def forward(self, x):
        offset = (x.sum() > 0).to(torch.int32)
        return F.linear(x, ((self.qweight + offset) & 15).to(x.dtype) * 0.1)


class FlatGroupsAcrossN(FlatGroups):
    """Flat groups reshaped to [K, N] and transposed: row r no longer holds one output feature's group."""

    def forward(self, x):
        w = (self.W_q.to(x.dtype) - self.zero.to(x.dtype)) * self.scale.to(x.dtype)
        return torch.matmul(x, w.reshape(self.k, self.n))


class UnequalGroups(WordsAlongK):
    """A group index whose groups are not all K/G features: the op's contiguous groups cannot hold it."""

    def __init__(self):
        super().__init__(k=32, g=16, g_idx=True)
        self.g_idx[:3] = 1  # group 0 has 13 features, group 1 has 19


@pytest.mark.parametrize("module, reason", [
    (UnequalGroups, "exactly 16 of the 32 input features"),
    (FlatGroupsAcrossN, "a reshape that mixes the weight's axes"),
    (Unprovable, "not provably within int8 or uint8"),
    (RandomBits, "random numbers"),
    (FromTheActivation, "computed from the activation"),
])
def test_unpackings_that_cannot_be_computed_once_are_near_misses(module, reason):
    module = module()
    x = torch.randn(3, 64 if isinstance(module, FlatGroups) else 32)
    x = x[:, :_in_features(module)] if isinstance(module, WordsAlongK) else x
    reports = []
    with torch.no_grad():
        out = compile_eager(module, reports)(x)
    torch_level = [r for r in reports if r.graph.endswith("(torch)")]
    assert sum(len(r.rewrites) for r in reports) == 0, "\n".join(map(str, reports))
    assert [reason in m.reason for r in torch_level for m in r.misses] == [True], "\n".join(map(str, reports))
    if not isinstance(module, RandomBits):
        assert torch.equal(out, module(x))


def test_rewrite_by_hand_computes_once_and_refreshes_with_the_module():
    """A graph traced with buffers kept as attributes: the unpacked weight is a buffer of the rewritten
    module, recomputed before a forward whose source changed."""

    class KeepBuffers(torch.fx.Tracer):
        proxy_buffer_attributes = True

    module = WordsAlongK(seed=6)
    gm = torch.fx.GraphModule(module, KeepBuffers().trace(module))
    x = torch.randn(2, _in_features(module))
    report = xqpass.rewrite(gm, (x,))
    assert [r.format["unpacked_once"] for r in report.rewrites] == [True], str(report)
    with torch.no_grad():
        assert_close_to_float64(module, x, gm(x))
        gm.qweight.copy_(WordsAlongK(seed=7).qweight)
        module.qweight.copy_(gm.qweight)
        assert_close_to_float64(module, x, gm(x))


# ----------------------------------------------------------------------------------------------
# the bounds the storage is chosen by hold for every value of the sources


@given(dtype=st.sampled_from([torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64]),
       shift=st.integers(0, 7), mask=st.integers(0, 300), offset=st.integers(-20, 20),
       order=st.sampled_from(["shift-mask", "mask-shift", "shift", "left-shift-mask"]),
       seed=st.integers(0, 2**16))
def test_value_bounds_hold_for_any_stored_values(dtype, shift, mask, offset, order, seed):
    def unpack(w):
        if order == "shift-mask":
            v = (w >> shift) & mask
        elif order == "mask-shift":
            v = (w & mask) >> shift
        elif order == "shift":
            v = w >> shift
        else:
            v = (w << shift) & mask
        return v - offset

    info = torch.iinfo(dtype)
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(info.min, info.max, (64,), generator=gen, dtype=torch.int64)
    data = torch.cat([data, torch.tensor([info.min, info.max, 0, -1 if info.min < 0 else 1])]).to(dtype)
    gm = torch.fx.symbolic_trace(unpack)
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    FakeTensorProp(gm).propagate(data)
    output = next(iter(gm.graph.find_nodes(op="output"))).args[0]
    lo, hi = value_bounds(Context(gm), output)
    values = unpack(data)
    assert lo <= int(values.min()) and int(values.max()) <= hi, (lo, hi, values.min(), values.max())
