"""A library's quantized layer rewritten by the pass against the same layer loaded from its checkpoint.

The library layer is ``xqpass.testing.modules.GPTQTorchLinear`` (GPTQModel's torch forward: int32 words
unpacked with shift tensors, ``scales[g_idx] * (w - zeros[g_idx])`` every call), compiled with
``xq_openxla``: the pass computes the unpacked weight once and the op reads it. The loaded layer is the same
tensors read by ``xqpass.load_quantized_checkpoint`` (``XlaQuantizedLinear``), compiled with ``openxla``.
Both hold the same GPTQ tensors (written once as a ``gptq_v2`` checkpoint, then copied into the library
layer); the outputs are compared before timing. Target (issue 15): the rewritten layer within 1.3x of the
loaded one at M=1.

One process on XLA:CPU; the two layers' calls alternate (the order reversed every other round), each
waited for with ``out.cpu()``; reported: each median and the median of the per-round ratios.

    python benchmarks/bench_library_layers.py [--size 4096] [--rows 1 16] [--rounds 30] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from safetensors.torch import load_file

import xqpass
from xqpass.testing import checkpoints as writers
from xqpass.testing.modules import GPTQTorchLinear


def layers(size: int, bits: int, group: int, act_order: bool, device):
    """(library layer, loaded layer) holding the same GPTQ tensors, both on ``device``."""
    float_model = torch.nn.Sequential(torch.nn.Linear(size, size, bias=False))
    with tempfile.TemporaryDirectory() as path:
        writers.write_gptq_checkpoint(path, float_model, bits=bits, group=group, act_order=act_order, v1=False)
        tensors = load_file(f"{path}/model.safetensors")
        loaded = torch.nn.Sequential(torch.nn.Linear(size, size, bias=False))
        xqpass.load_quantized_checkpoint(loaded, path)
    library = GPTQTorchLinear(bits, group, size, size, bias=False)
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        getattr(library, name).copy_(tensors[f"0.{name}"])
    library.to(device)
    for attr in ("wf_unsqueeze_zero", "wf_unsqueeze_neg_one"):  # plain attributes, as GPTQModel keeps them
        setattr(library, attr, getattr(library, attr).to(device))
    return library, loaded.to(device)


def timed(fn, x):
    start = time.perf_counter()
    fn(x).cpu()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    import torch_xla

    device = torch_xla.device()
    results = []
    for act_order in (False, True):
        library, loaded = layers(args.size, args.bits, args.group, act_order, device)
        reports = []
        torch._dynamo.reset()
        rewritten = torch.compile(library, backend=xqpass.backend.make_backend("openxla", reports=reports))
        plain = torch.compile(loaded, backend="openxla")
        for rows in args.rows:
            x = torch.randn(rows, args.size, dtype=torch.float16).to(device)
            with torch.no_grad():
                ours, ref = rewritten(x).cpu().float(), plain(x).cpu().float()
                error = ((ours - ref).abs().max() / ref.abs().max()).item()
                fns = [("rewritten", rewritten), ("loaded", plain)]
                for _, fn in fns:
                    for _ in range(3):
                        fn(x).cpu()
                times = {name: [] for name, _ in fns}
                for r in range(args.rounds):
                    for name, fn in fns if r % 2 else fns[::-1]:
                        times[name].append(timed(fn, x))
            ratios = [a / b for a, b in zip(times["rewritten"], times["loaded"])]
            row = {"act_order": act_order, "rows": rows, "size": args.size, "bits": args.bits, "group": args.group,
                   "rewritten_ms": 1e3 * statistics.median(times["rewritten"]),
                   "loaded_ms": 1e3 * statistics.median(times["loaded"]),
                   "ratio": statistics.median(ratios), "relative_difference": error,
                   "rewrites": [str(r) for rep in reports for r in rep.rewrites]}
            results.append(row)
            print(f"GPTQ {args.bits}-bit g{args.group} {'act-order ' if act_order else ''}{args.size}x{args.size} "
                  f"M={rows}: rewritten {row['rewritten_ms']:.2f} ms, loaded {row['loaded_ms']:.2f} ms, "
                  f"ratio {row['ratio']:.2f} (outputs differ by {error:.1e} of the largest)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
