"""End to end: decode steps of a small Llama-style decoder with int8 / int4 weights on XLA:CPU.

One decode-shaped step (batch 1, one token; no KV cache, so the linears see M = 1 rows, the case
quantization is for) per call, every call waited for (``out.cpu()``), median (and fastest) of ``--runs``
calls in each of two passes over all paths (``bench_matmul.bench_paths``):

  xq_openxla int8        attention + MLP linears dequantize int8 in code, compiled with xq_openxla
  xq_openxla int4        MLP linears packed int4 (groups of 32), attention int8
  openxla dense bf16     the float model in bfloat16 on plain openxla
  eager CPU dense bf16   the float model in bfloat16, eager on the CPU
  eager CPU xq int8      the int8 model through xq_eager (torch's int8 CPU kernel)

With ``--without-split-k`` the two xq models are also timed with XLA:CPU's split-K off
(``XlaCpuTuning(split_k_max_m=0, split_k_max_m_packed=0)``: the weight-as-LHS dot at every M), each
variant traced in its own compiled function.

Weight bytes are those of the linears' tensors on the device (quantized bytes + scales + zero points).

    python benchmarks/bench_decoder.py --layers 8 --dim 1024 --json out.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

os.environ.setdefault("PJRT_DEVICE", "CPU")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import xqpass  # noqa: E402,F401
from xqpass.ops import XlaCpuTuning, xla_lowering  # noqa: E402
from xqpass.testing.models import INT4_GROUPED, INT8, DecoderConfig, TinyDecoder, with_dequant_linears  # noqa: E402
from xqpass.testing.modules import DequantLinear  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_matmul import bench_paths  # noqa: E402

MLP = ("gate_proj", "up_proj", "down_proj")
WITHOUT_SPLIT_K = XlaCpuTuning(split_k_max_m=0, split_k_max_m_packed=0)


def own_step(model: nn.Module, tag: str):
    """``model`` compiled for xq_openxla through a function of its own: two compiled copies of one model
    class share Dynamo's cache (one forward code object), so the second would run the first's graph."""
    namespace = {"model": model}
    exec(f"def step_{tag}(x):\n    return model(x)", namespace)
    return torch.compile(namespace[f"step_{tag}"], backend="xq_openxla", dynamic=False)


def linear_bytes(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, DequantLinear):
            total += sum(t.numel() * t.element_size() for t in (m.qweight, m.scale, getattr(m, "zero", None))
                         if t is not None)
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=2816)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--without-split-k", action="store_true", help="also time the xq models without split-K")
    p.add_argument("--json")
    args = p.parse_args(argv)
    import torch_xla

    dev = torch_xla.device()
    torch._dynamo.config.cache_size_limit = 256
    cfg = DecoderConfig(layers=args.layers, dim=args.dim, heads=max(1, args.dim // 64), hidden=args.hidden)
    float_model = TinyDecoder(cfg).eval()
    int8 = with_dequant_linears(float_model, lambda name: INT8).to(torch.bfloat16)
    int4 = with_dequant_linears(float_model, lambda name: INT4_GROUPED if name.endswith(MLP) else INT8).to(torch.bfloat16)
    dense = copy.deepcopy(float_model).to(torch.bfloat16)
    x = torch.randn(1, 1, cfg.dim).to(torch.bfloat16)
    with torch.no_grad():
        exact = float_model(x.float()).double()
    paths = {
        "xq_openxla int8": (torch.compile(copy.deepcopy(int8).to(dev), backend="xq_openxla", dynamic=False), dev, int8),
        "xq_openxla int4": (torch.compile(copy.deepcopy(int4).to(dev), backend="xq_openxla", dynamic=False), dev, int4),
        "openxla dense bf16": (torch.compile(copy.deepcopy(dense).to(dev), backend="openxla", dynamic=False), dev, dense),
        "eager CPU dense bf16": (dense, "cpu", dense),
        "eager CPU xq int8": (torch.compile(int8, backend="xq_eager", dynamic=False), "cpu", int8),
    }
    if args.without_split_k:
        for name, model in (("int8", int8), ("int4", int4)):
            step = own_step(copy.deepcopy(model).to(dev), f"{name}_without_split_k")
            with xla_lowering("cpu", WITHOUT_SPLIT_K), torch.no_grad():  # traced now, with this tuning
                step(x.to(dev)).cpu()
            paths[f"xq_openxla {name}, split-K off"] = (step, dev, model)
    medians, fastest = bench_paths({name: (fn, (x.to(device),)) for name, (fn, device, _) in paths.items()},
                                   runs=args.runs)
    rows = []
    for name, (fn, device, model) in paths.items():
        ms = medians[name]
        with torch.no_grad():
            out = fn(x.to(device)).cpu().double()
        row = {"path": name, "ms/token": ms, "fastest ms/token": fastest[name], "tokens/s": 1e3 / ms,
               "weight bytes": linear_bytes(model), "err vs float": float((out - exact).norm() / exact.norm())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
