"""The pass by hand: ``xqpass.rewrite`` on a ``torch.fx.symbolic_trace`` graph and on a ``torch.export``
program, with the report printed, and the rewritten graphs checked against the original module.

    python examples/rewrite_by_hand.py

A model whose linears dequantize their weights in plain torch code (int8 per channel, packed int4 in
groups of 32) is what a quantization library hands you. ``rewrite`` swaps each dequantize -> matmul for
one ``torch.ops.xq.quantized_matmul`` node that keeps the weight quantized; nothing else changes.
"""
import torch
import torch.nn.functional as F
from torch import nn

import xqpass


class Int8Linear(nn.Module):
    """int8 weight, one scale per output channel: ``w = q * s``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, x):
        return F.linear(x, self.qweight.to(torch.float32) * self.scale[:, None])


class Int4Linear(nn.Module):
    """Packed int4 (two values a byte, low nibble first), asymmetric, groups of 32 along the input."""

    def __init__(self, linear: nn.Linear, group: int = 32):
        super().__init__()
        n, k = linear.weight.shape
        w = linear.weight.detach().reshape(n, k // group, group)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, 15).to(torch.uint8).reshape(n, k)
        self.register_buffer("packed", q[:, 0::2] | (q[:, 1::2] << 4))
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.group = group

    def forward(self, x):
        q = torch.stack([self.packed & 15, self.packed >> 4], dim=-1).reshape(self.packed.shape[0], -1)
        n, k = q.shape
        w = (q.reshape(n, k // self.group, self.group).to(torch.float32) - self.zero[..., None]) * self.scale[..., None]
        return F.linear(x, w.reshape(n, k))


class MLP(nn.Module):
    def __init__(self, d: int = 128, hidden: int = 256):
        super().__init__()
        torch.manual_seed(0)
        self.up = Int8Linear(nn.Linear(d, hidden, bias=False))
        self.down = Int4Linear(nn.Linear(hidden, d, bias=False))

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def check(name: str, rewritten, model, x, report) -> None:
    print(f"\n== {name}\n{report}")
    want = model(x)
    got = rewritten(x)
    err = ((got - want).norm() / want.norm()).item()
    ops = sum(n.target is torch.ops.xq.quantized_matmul.default for n in rewritten.graph.nodes)
    print(f"xq.quantized_matmul nodes: {ops}, relative error against the original module: {err:.2e}")
    if len(report.rewrites) != 2 or ops != 2 or not err < 1e-5:
        raise SystemExit(f"{name}: expected 2 rewrites and the original's output, got {len(report.rewrites)}, {err}")


def main() -> None:
    model = MLP().eval()
    x = torch.randn(4, 128)

    # torch.fx's default tracer evaluates buffers while tracing: the whole dequantization would become one
    # float constant, with no quantized weight left to find. A tracer that keeps buffers as graph
    # attributes keeps the dequantize -> matmul in the graph. It records no shapes: the pass takes them
    # from example inputs (fake tensors)
    class BufferTracer(torch.fx.Tracer):
        proxy_buffer_attributes = True

    gm = torch.fx.GraphModule(model, BufferTracer().trace(model))
    report = xqpass.rewrite(gm, example_inputs=(x,))
    check("torch.fx tracing (buffers kept)", gm, model, x, report)

    # torch.export: an aten-level program with shapes recorded; rewritten in place
    ep = torch.export.export(model, (x,))
    report = xqpass.rewrite(ep)
    check("torch.export", ep.module(), model, x, report)


if __name__ == "__main__":
    with torch.no_grad():
        main()
