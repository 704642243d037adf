"""``xq_eager`` runs the rewritten torch-level graph as Dynamo's ``eager`` does, without AOT's per-call
wrappers, unless the aten level may find what the torch level cannot (a miss, a tensor subclass, a
higher-order op such as an ``autograd.Function`` Dynamo keeps as a subgraph). The oracle is float64."""
import torch
import torch.nn.functional as F

from xqpass.backend import make_backend


class Int8Linear(torch.nn.Module):
    def __init__(self, inside_a_function=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("q", torch.randint(-127, 128, (16, 32), generator=g, dtype=torch.int8))
        self.register_buffer("s", torch.rand(16, 1, generator=g) / 100)
        self.inside_a_function = inside_a_function

    def forward(self, x):
        if self.inside_a_function:
            return Dequantized.apply(x, self.q, self.s)
        return F.linear(x, self.q.to(x.dtype) * self.s)


class Dequantized(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, s):
        return F.linear(x, q.to(x.dtype) * s)

    @staticmethod
    def backward(ctx, grad):
        return None, None, None


def compiled_reports(module, x):
    reports = []
    torch._dynamo.reset()
    out = torch.compile(module, backend=make_backend("eager", reports=reports))(x)
    exact = F.linear(x.detach().double(), module.q.double() * module.s.double())
    assert (out.detach().double() - exact).abs().max().item() <= 1e-5 * exact.abs().max().item()
    return [str(r).splitlines()[0] for r in reports]


def test_a_graph_rewritten_whole_at_the_torch_level_skips_aot():
    with torch.no_grad():
        reports = compiled_reports(Int8Linear(), torch.randn(3, 32))
    assert reports == ["xqpass: xq graph 0 (torch): 1 rewritten, 0 missed"]


def test_a_higher_order_op_keeps_the_aten_level():
    # with grad enabled Dynamo keeps the autograd.Function as a subgraph: only the aten level sees inside it
    reports = compiled_reports(Int8Linear(inside_a_function=True), torch.randn(3, 32, requires_grad=True))
    assert reports == ["xqpass: xq graph 0 (torch): 0 rewritten, 0 missed",
                       "xqpass: xq graph 0 (aten): 1 rewritten, 0 missed"]
