"""A/B the XLA:CPU lowering's tuning (``xqpass.ops.XlaCpuTuning``): the op under several tunings, side
by side in one process, each variant checked against the CPU reference.

The thresholds in ``XlaCpuTuning`` were chosen by measurement on this project's machine; this script
re-measures them on yours. Each ``--set FIELD=v1,v2`` multiplies the variants; a variant's tuning is in
force while its graph is traced (the first call, under ``xla_lowering("cpu", tuning)``), so every variant
gets its own compiled function (two variants sharing one ``torch.compile``d function would share
Dynamo's cache and silently time the same graph).

    python benchmarks/bench_lowering.py --formats w4s128 w8s128 --m 8 16 --set large_m=8,16,32
    python benchmarks/bench_lowering.py --formats w8 --m 1 16 32 --set split_k_max_m=0,32

Formats: w8 (int8 per channel), w8a8, w8g128 (int8 groups of 128 by rows), w4 (packed int4 per channel),
w4g32 / w4g64 / w4g128 (packed int4 groups by rows), u4g32 (unsigned packed int4, groups of 32, float
zero points), w8s128 / w4s128 / u4s128 (int8 and packed int4 in the seed's blockwise [K/B, B, N]
layout). Activations bfloat16; milliseconds, median of ``--runs`` calls in each of ``--passes`` passes,
the fastest call in parentheses, every call waited for (``out.cpu()``).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys

os.environ.setdefault("PJRT_DEVICE", "CPU")

import torch  # noqa: E402

import xqpass  # noqa: E402,F401
from xqpass.ops import XlaCpuTuning, xla_lowering  # noqa: E402
from xqpass.testing.strategies import WeightFormat, random_quantized_weight  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_matmul import bench_paths  # noqa: E402

FORMATS = {
    "w8": WeightFormat(8, -1, True, False, False),
    "w8a8": WeightFormat(8, -1, True, False, True),
    "w8g128": WeightFormat(8, 128, True, False, False, by_rows=True),
    "w4": WeightFormat(4, -1, True, True, False),
    "w4g32": WeightFormat(4, 32, True, True, False, by_rows=True),
    "w4g64": WeightFormat(4, 64, True, True, False, by_rows=True),
    "w4g128": WeightFormat(4, 128, True, True, False, by_rows=True),
    "u4g32": WeightFormat(4, 32, False, True, False, by_rows=True),
    "w8s128": WeightFormat(8, 128, True, False, False),
    "w4s128": WeightFormat(4, 128, True, True, False),
    "u4s128": WeightFormat(4, 128, False, True, False),
}


def parse_settings(items: list[str]) -> list[dict]:
    """``["A=1,2", "B=true"]`` -> every combination, e.g. ``[{"A": 1, "B": True}, {"A": 2, "B": True}]``."""
    defaults = XlaCpuTuning()
    fields = {f.name for f in dataclasses.fields(defaults)}
    axes = []
    for item in items:
        name, _, values = item.partition("=")
        if name not in fields:
            raise ValueError(f"--set {item}: XlaCpuTuning has no field {name!r} (it has {sorted(fields)})")
        current = getattr(defaults, name)
        parsed = [(v.lower() == "true") if isinstance(current, bool) else type(current)(v) for v in values.split(",")]
        axes.append([(name, v) for v in parsed])
    return [dict(combo) for combo in itertools.product(*axes)] or [{}]


def compiled_op(tag: str, kwargs: dict):
    """A fresh function (own code object, own Dynamo cache entry) calling the op, compiled for openxla."""
    namespace = {"torch": torch, "kw": kwargs}
    exec(f"def op_{tag}(x, w, scale, zero_point):\n"
         f"    return torch.ops.xq.quantized_matmul(x, w, scale, zero_point, **kw)", namespace)
    return torch.compile(namespace[f"op_{tag}"], backend="openxla", dynamic=False)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", nargs="+", default=["w8", "w4g64"], choices=sorted(FORMATS))
    p.add_argument("--m", type=int, nargs="+", default=[1, 16])
    p.add_argument("--shape", default="4096x4096", help="NxK")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=V1,V2", help="a field of XlaCpuTuning")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--passes", type=int, default=2)
    args = p.parse_args(argv)
    import torch_xla

    torch._dynamo.config.cache_size_limit = 1024
    torch._dynamo.config.recompile_limit = 1024
    dev = torch_xla.device()
    n, k = (int(v) for v in args.shape.split("x"))
    variants = parse_settings(args.set)
    for fmt_name in args.formats:
        fmt = FORMATS[fmt_name]
        qw = random_quantized_weight(fmt, n, k, seed=0)
        kw = qw.op_kwargs()
        block, int4, packed = kw.pop("block_size"), kw.pop("int4_weight"), kw.pop("packed")
        op_kw = dict(block_size=block, int4_weight=int4, quantize_activation=fmt.quantize_activation, packed=packed)
        dev_args = [kw["w"].to(dev), kw["scale"].to(dev), None if kw.get("zero_point") is None else kw["zero_point"].to(dev)]
        for m in args.m:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
            reference = torch.ops.xq.quantized_matmul(x, kw["w"], kw["scale"], kw.get("zero_point"), **op_kw).double()
            paths, errors = {}, {}
            for i, settings in enumerate(variants):
                label = ", ".join(f"{a}={b}" for a, b in settings.items()) or "as is"
                fn = compiled_op(f"{fmt_name}_{m}_{i}", op_kw)
                # traced (and compiled) with this tuning, and under no_grad as bench_paths calls it: a call
                # in another grad mode fails Dynamo's guard and retraces outside this tuning
                with xla_lowering("cpu", XlaCpuTuning(**settings)), torch.no_grad():
                    out = fn(x.to(dev), *dev_args).cpu().double()
                errors[label] = float((out - reference).norm() / reference.norm().clamp_min(1e-30))
                paths[label] = (fn, (x.to(dev), *dev_args))
            # a retrace while timing would run outside the variant's tuning: make it an error, not a figure
            with torch._dynamo.config.patch(error_on_recompile=True):
                medians, fastest = bench_paths(paths, args.runs, args.passes)
            print(f"{fmt_name} {fmt.name}, {n}x{k}, M={m}")
            for label in paths:
                print(f"  {label:48s} {medians[label]:9.3f} ({fastest[label]:.3f}) ms   "
                      f"vs CPU reference {errors[label]:.1e}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
