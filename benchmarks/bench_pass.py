"""The pass's own cost: ``xqpass.rewrite`` on a small decoder's graphs at 8 and 32 layers (7 linears a
layer, each a hand-written int8 dequantize -> linear).

Both graph levels are captured once per depth: the torch-level graph Dynamo hands a backend and the
aten-level forward graph AOT autograd hands its compiler. Each timing rewrites a fresh deep copy (the
copy is not timed); the median of ``--runs`` is printed with the growth from 8 to 32 layers, which
should stay near 4x (linear in graph size).

    python benchmarks/bench_pass.py --runs 5
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

os.environ.setdefault("PJRT_DEVICE", "CPU")

import torch  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402

import xqpass  # noqa: E402
from xqpass.testing.models import INT8, DecoderConfig, TinyDecoder, with_dequant_linears  # noqa: E402


def capture(layers: int) -> dict[str, torch.fx.GraphModule]:
    """The torch-level and aten-level graphs of a ``layers``-layer decoder, not rewritten."""
    model = with_dequant_linears(TinyDecoder(DecoderConfig(layers=layers)), lambda name: INT8)
    graphs: dict[str, torch.fx.GraphModule] = {}

    def aten_level(gm, example_inputs):
        graphs["aten"] = copy.deepcopy(gm)
        return gm.forward

    aot = aot_autograd(fw_compiler=aten_level)

    def torch_level(gm, example_inputs):
        graphs["torch"] = copy.deepcopy(gm)
        return aot(gm, example_inputs)

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=torch_level, fullgraph=True)(torch.randn(1, 4, 64))
    return graphs


def time_rewrite(gm: torch.fx.GraphModule, runs: int) -> tuple[float, int]:
    """Median milliseconds of ``rewrite`` on fresh copies of ``gm``, and how many linears it rewrote."""
    times, rewritten = [], 0
    for _ in range(runs):
        copy_ = copy.deepcopy(gm)
        start = time.perf_counter()
        report = xqpass.rewrite(copy_)
        times.append((time.perf_counter() - start) * 1e3)
        rewritten = len(report.rewrites)
    return statistics.median(times), rewritten


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs=2, default=(8, 32))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    small, large = args.layers
    graphs = {layers: capture(layers) for layers in (small, large)}
    results = {}
    for level in ("torch", "aten"):
        row = {}
        for layers in (small, large):
            gm = graphs[layers][level]
            ms, rewritten = time_rewrite(gm, args.runs)
            row[layers] = {"ms": ms, "nodes": len(gm.graph.nodes), "rewritten": rewritten}
        ratio = row[large]["ms"] / row[small]["ms"]
        results[level] = {**{str(k): v for k, v in row.items()}, "ratio": ratio}
        print(f"{level:5s} level: {small} layers {row[small]['ms']:7.1f} ms ({row[small]['nodes']} nodes, "
              f"{row[small]['rewritten']} rewritten), {large} layers {row[large]['ms']:7.1f} ms "
              f"({row[large]['nodes']} nodes, {row[large]['rewritten']} rewritten): {ratio:.2f}x for "
              f"{large / small:.0f}x the layers")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
