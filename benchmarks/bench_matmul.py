"""Quantized matmul on XLA:CPU against its baselines, side by side in one process.

Every call is timed on its own and waited for (``out.cpu()``), median of ``--runs`` after 3 warm-ups:
a loop that waits only for its last output under-counts any path that falls back to lazy tensors. The
sequence of all paths runs twice (``bench_paths``), so the machine's slow spells spread over the paths.

    python benchmarks/bench_matmul.py --m 1 16 256 --shapes 4096x4096 4096x11008 --json out.json

Paths (activations bfloat16, weight N x K):
  torch_xla op W8A16      torch.ops.xla.quantized_matmul under openxla (the seed)
  dense bf16 F.linear     what nn.Linear compiles to under openxla
  dense bf16 (w@x.T).T    the best dense bf16 formulation on openxla
  convert wall            w.to(float32).sum() over the int8 weight: XLA:CPU's cost of touching it
  xq W8A16 / W4A16 g64 / W8A8
                          hand-written dequant modules compiled with backend="xq_openxla"
  cpu _weight_int8pack_mm torch's eager int8 kernel; cpu xq_eager W8A16: the same module via xq_eager

With ``--fp8``, float8 weights through the op itself instead (``torch.ops.xq.quantized_matmul`` under
openxla, activations bfloat16): int8 per-channel W8A16 (the baseline), e4m3 per-channel, e4m3 128 x 128
blocks (``block_n=128``), e4m3 128 x 128 W8A8-FP8, e5m2 128 x 128 blocks, dense bf16 ``(w@x.T).T``, and
``convert wall`` over the e4m3 weight.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("PJRT_DEVICE", "CPU")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import xqpass  # noqa: E402
from xqpass.testing.modules import DequantLinear, DequantSpec  # noqa: E402

W8 = DequantSpec(weight_form="scale", bits=8)
W4G64 = DequantSpec(weight_form="scale", bits=4, group=64, signed=True)
W8A8 = DequantSpec(product_form="w8a8_matmul")


def bench_paths(paths: dict, runs: int = 7, passes: int = 2) -> tuple[dict, dict]:
    """``{name: (fn, args)}`` -> ``({name: median ms}, {name: fastest ms})`` of ``fn(*args).cpu()``, every
    call waited for (sub-millisecond calls here switch between two speeds ~1.6x apart in bursts; the
    fastest call shows what a path costs when the machine is quiet).

    Each path runs back to back as a decode loop would (warm-up calls, then ``runs`` timed calls), and
    the whole sequence is repeated ``passes`` times: a slow spell of this shared machine then lands on
    different paths in different passes instead of skewing one path's figure. (Alternating single
    calls between paths was tried: a fast path timed right after a 100 ms one is up to 2x slower.)"""
    times = {name: [] for name in paths}
    with torch.no_grad():
        for p in range(passes):
            for name, (fn, args) in paths.items():
                for _ in range(3 if p == 0 else 1):
                    fn(*args).cpu()
                for _ in range(runs):
                    t0 = time.perf_counter()
                    fn(*args).cpu()
                    times[name].append((time.perf_counter() - t0) * 1e3)
    return ({name: sorted(t)[len(t) // 2] for name, t in times.items()},
            {name: min(t) for name, t in times.items()})


def rel_err(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float((out.cpu().double() - exact).norm() / exact.norm())


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for name, b in module.named_buffers() if name in ("qweight", "scale", "zero"))


def run_shape(n: int, k: int, ms: list[int], runs: int) -> list[dict]:
    import torch_xla
    import torch_xla.experimental.xla_quantized_matmul  # noqa: F401  (the seed's op)

    dev = torch_xla.device()
    # one graph per (module, M): several modules share DequantLinear.forward, so allow many cache entries,
    # and keep shapes static (XLA compiles per shape anyway)
    torch._dynamo.config.cache_size_limit = 256
    compile_xla = lambda f: torch.compile(f, backend="openxla", dynamic=False)  # noqa: E731
    layers = {name: DequantLinear(spec, k, n, seed=1, dtype=torch.bfloat16).eval()
              for name, spec in (("xq W8A16", W8), ("xq W4A16 g64", W4G64), ("xq W8A8", W8A8))}
    exact_weights = {name: m.dequantize(torch.float64) for name, m in layers.items()}
    bytes_of = {name: weight_bytes(m) for name, m in layers.items()}
    w8 = layers["xq W8A16"].qweight
    s8 = layers["xq W8A16"].scale
    w_bf16 = (w8.float() * s8.float()[:, None]).to(torch.bfloat16)
    d = {"w8": w8.to(dev), "s8": s8.to(dev), "wb": w_bf16.to(dev)}
    compiled = {name: torch.compile(m.to(dev), backend="xq_openxla", dynamic=False) for name, m in layers.items()}
    eager_cpu = torch.compile(DequantLinear(W8, k, n, seed=1, dtype=torch.bfloat16).eval(), backend="xq_eager",
                              dynamic=False)

    seed_op = compile_xla(lambda x, w, s: torch.ops.xla.quantized_matmul(x, w, s))
    dense_linear = compile_xla(lambda x, w: F.linear(x, w))
    dense_lhs = compile_xla(lambda x, w: (w @ x.t()).t())
    convert_wall = compile_xla(lambda w: w.to(torch.float32).sum())

    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        xd = x.to(dev)
        r = {"N": n, "K": k, "M": m}
        paths = {"torch_xla op W8A16": (seed_op, (xd, d["w8"], d["s8"])),
                 "dense bf16 F.linear": (dense_linear, (xd, d["wb"])),
                 "dense bf16 (w@x.T).T": (dense_lhs, (xd, d["wb"])),
                 "convert wall": (convert_wall, (d["w8"],)),
                 **{name: (fn, (xd,)) for name, fn in compiled.items()},
                 "cpu _weight_int8pack_mm": (torch.ops.aten._weight_int8pack_mm, (x, w8, s8)),
                 "cpu xq_eager W8A16": (eager_cpu, (x,))}
        medians, fastest = bench_paths(paths, runs)
        r.update(medians)
        r.update({f"{name} min": ms for name, ms in fastest.items()})
        for name, fn in compiled.items():
            with torch.no_grad():
                r[f"{name} err"] = rel_err(fn(xd), x.double() @ exact_weights[name].t())
            r[f"{name} weight bytes"] = bytes_of[name]
        r["dense bf16 weight bytes"] = w_bf16.numel() * 2
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


def run_fp8_shape(n: int, k: int, ms: list[int], runs: int) -> list[dict]:
    import torch_xla

    dev = torch_xla.device()
    torch._dynamo.config.cache_size_limit = 256
    compile_xla = lambda f: torch.compile(f, backend="openxla", dynamic=False)  # noqa: E731
    op = torch.ops.xq.quantized_matmul
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=gen) * 0.02
    qw = xqpass.quantize_weight(w, bits=8)
    blocks = w.reshape(-(-n // 128), 128, -(-k // 128), 128).abs().amax(dim=(1, 3))  # [N/128, K/128]
    weights = {  # name -> (weight, scale, block_size, block_n, quantize_activation)
        "xq op int8 per-channel": (qw.weight, qw.scale, -1, 1, False),
        "xq op e4m3 per-channel": ((w / (w.abs().amax(1, keepdim=True) / 448)).to(torch.float8_e4m3fn),
                                   w.abs().amax(1) / 448, -1, 1, False),
        "xq op e4m3 128x128": (None, blocks / 448, 128, 128, False),
        "xq op e4m3 128x128 W8A8": (None, blocks / 448, 128, 128, True),
        "xq op e5m2 128x128": (None, blocks / 57344, 128, 128, False),
    }
    for name in ("xq op e4m3 128x128", "xq op e4m3 128x128 W8A8", "xq op e5m2 128x128"):
        scale = weights[name][1]
        full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
        dtype = torch.float8_e5m2 if "e5m2" in name else torch.float8_e4m3fn
        weights[name] = ((w / full).to(dtype), *weights[name][1:])
    on_device = {name: (wq.to(dev), s.to(dev), b, bn, qa) for name, (wq, s, b, bn, qa) in weights.items()}
    fns = {name: compile_xla(lambda x, wq, s, b=b, bn=bn, qa=qa: op(x, wq, s, None, b, False, qa, block_n=bn))
           for name, (_, _, b, bn, qa) in weights.items()}
    dense = compile_xla(lambda x, wb: (wb @ x.t()).t())
    convert_wall = compile_xla(lambda wq: wq.to(torch.float32).sum())
    wb = w.to(torch.bfloat16).to(dev)
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        xd = x.to(dev)
        paths = {name: (fns[name], (xd, *on_device[name][:2])) for name in weights}
        paths["dense bf16 (w@x.T).T"] = (dense, (xd, wb))
        paths["convert wall e4m3"] = (convert_wall, (on_device["xq op e4m3 per-channel"][0],))
        medians, fastest = bench_paths(paths, runs)
        r = {"N": n, "K": k, "M": m, **medians, **{f"{name} min": v for name, v in fastest.items()}}
        exact = x.double() @ w.double().t()
        for name in weights:
            with torch.no_grad():
                r[f"{name} err"] = rel_err(fns[name](xd, *on_device[name][:2]), exact)
            wq, s = weights[name][:2]
            r[f"{name} weight bytes"] = wq.numel() * wq.element_size() + s.numel() * s.element_size()
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 256])
    p.add_argument("--shapes", nargs="+", default=["4096x4096"], help="NxK")
    p.add_argument("--runs", type=int, default=5, help="timed calls a path in each of two passes")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--fp8", action="store_true", help="float8 weights through the op (see above)")
    args = p.parse_args(argv)
    rows = []
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        rows += (run_fp8_shape if args.fp8 else run_shape)(n, k, args.m, args.runs)
    meta = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d"),
            "xqpass": xqpass.__version__}
    try:
        import torch_xla

        meta["torch_xla"] = torch_xla.__version__
    except ImportError:
        pass
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
