"""The op's own cost per call on CPU: ``torch.ops.xq.quantized_matmul`` (eager, through
``XlaQuantizedLinear`` and through ``torch.compile(backend="xq_eager")``) against the
``torch._weight_int8pack_mm`` call it makes, at M=1 (bfloat16 activations, int8 symmetric
per-channel, 4096 x 4096).

One process, one thread, the variants interleaved call by call (the order reversed every other
round). Each call is timed in CPU time (``time.thread_time``): a shared machine's preemption stays out
of the figures, the work the call makes the CPU do stays in. Reported: each variant's median, its ratio
to the raw kernel's median, and the median of the paired differences (the cost of everything around the
kernel). The kernel streams the 16 MB weight through the caches, so the Python around it runs cold;
the same code costs a tenth as much in a loop on a small weight (``--size 256``).

    python benchmarks/bench_call_overhead.py [--rounds 500] [--size 4096] [--wall]

``--wall``: wall time with torch's default threads instead (what a user sees; on a shared machine the
kernel's own spread then hides the differences).
"""
import argparse
import statistics
import time

import torch

import xqpass  # noqa: F401  (registers the op and the backends)
from xqpass.nn import XlaQuantizedLinear


def variants(size: int) -> dict:
    torch.manual_seed(0)
    layer = XlaQuantizedLinear.from_float(torch.nn.Linear(size, size, bias=False), bits=8)
    compiled = torch.compile(layer, backend="xq_eager")
    x = torch.randn(1, size).to(torch.bfloat16)
    w, scale = layer.weight, layer.weight_scaler
    scale_x = scale.to(x.dtype)  # the kernel's argument, converted once
    op = torch.ops.xq.quantized_matmul
    return {"raw kernel": lambda: torch._weight_int8pack_mm(x, w, scale_x), "op": lambda: op(x, w, scale),
            "module": lambda: layer(x), "xq_eager": lambda: compiled(x)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--wall", action="store_true")
    args = parser.parse_args()
    clock = time.perf_counter if args.wall else time.thread_time
    if not args.wall:
        torch.set_num_threads(1)  # thread_time counts the calling thread only
    times = {}
    with torch.no_grad():
        fns = variants(args.size)
        for fn in fns.values():
            for _ in range(10):
                fn()
        times = {name: [] for name in fns}
        items = list(fns.items())
        for r in range(args.rounds):
            for name, fn in items if r % 2 else items[::-1]:
                start = clock()
                fn()
                times[name].append((clock() - start) * 1e6)
    raw = times["raw kernel"]
    print(f"{args.size}x{args.size}, M=1, bfloat16, {args.rounds} rounds, "
          f"{'wall time, ' + str(torch.get_num_threads()) + ' threads' if args.wall else 'CPU time, 1 thread'}")
    for name, ts in times.items():
        extra = statistics.median(t - r for t, r in zip(ts, raw))
        print(f"{name:10s} median {statistics.median(ts):8.1f} us  {statistics.median(ts) / statistics.median(raw):.3f}x"
              f"  around the kernel {extra:6.1f} us")


if __name__ == "__main__":
    main()
