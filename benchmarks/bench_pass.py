"""The pass's own cost: ``xqpass.rewrite`` on a small decoder's graphs at 8 and 32 layers (7 linears a
layer, each a hand-written int8 dequantize -> linear).

Both graph levels are captured once per depth: the torch-level graph Dynamo hands a backend and the
aten-level forward graph AOT autograd hands its compiler. Each timing rewrites a fresh deep copy (the
copy is not timed), the depths interleaved; printed: the median of ``--runs`` in process CPU time (what
a busy shared machine disturbs least) and wall time, and the growth from 8 to 32 layers in CPU time,
which should stay near 4x (linear in graph size; target <= 4.5x).

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


def time_rewrite(graphs: dict[int, torch.fx.GraphModule], runs: int) -> dict[int, dict]:
    """Per depth: the median CPU and wall milliseconds of ``rewrite`` on fresh copies of its graph (depths
    interleaved, so a load change on a shared machine hits both), and how many linears it rewrote."""
    cpu = {layers: [] for layers in graphs}
    wall = {layers: [] for layers in graphs}
    rewritten = {}
    for _ in range(runs):
        for layers, gm in graphs.items():
            copy_ = copy.deepcopy(gm)
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            report = xqpass.rewrite(copy_)
            cpu[layers].append((time.process_time() - start_cpu) * 1e3)
            wall[layers].append((time.perf_counter() - start_wall) * 1e3)
            rewritten[layers] = len(report.rewrites)
    return {layers: {"cpu_ms": statistics.median(cpu[layers]), "wall_ms": statistics.median(wall[layers]),
                     "nodes": len(gm.graph.nodes), "rewritten": rewritten[layers]} for layers, gm in graphs.items()}


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
        row = time_rewrite({layers: graphs[layers][level] for layers in (small, large)}, args.runs)
        ratio = row[large]["cpu_ms"] / row[small]["cpu_ms"]
        results[level] = {**{str(k): v for k, v in row.items()}, "ratio": ratio}
        print(f"{level:5s} level: " + ", ".join(
            f"{layers} layers {row[layers]['cpu_ms']:6.1f} ms cpu ({row[layers]['wall_ms']:6.1f} wall; "
            f"{row[layers]['nodes']} nodes, {row[layers]['rewritten']} rewritten)" for layers in (small, large))
            + f": {ratio:.2f}x for {large / small:.0f}x the layers")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
