"""Checkpoint load throughput: ``xqpass.load_quantized_checkpoint`` against plain safetensors loading
of the same files. Target: within 2x.

Two baselines: ``load_file`` alone (safetensors maps the file; tensors share the mapping, so most bytes
are not even touched) and ``load_file`` + a copy of every tensor (the bytes read into process memory
once, the least any loader that keeps the weights must do). xqpass reads every tensor through
``safe_open`` and converts it to the op's layout (GPTQ and compressed-tensors: a byte view and a
transpose / XOR; AWQ: its interleaved nibbles undone).

For each format a checkpoint of a Llama-style decoder (default 8 layers, d=1024, hidden 2816: 56
quantized linears, 4-bit weights in groups of 128, W8A8 int8) is written once to a temporary directory,
read once to warm the page cache, then each loader runs ``--runs`` times (a fresh float skeleton each
time, built outside the timing); the median is reported.

    python benchmarks/bench_load.py --json benchmarks/results/load.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file

import xqpass
from xqpass.testing import checkpoints as writers
from xqpass.testing.models import DecoderConfig, TinyDecoder

FORMATS = {
    "gptq int4 g128": lambda path, model: writers.write_gptq_checkpoint(path, model, bits=4, group=128),
    "awq int4 g128": lambda path, model: writers.write_awq_checkpoint(path, model, group=128),
    "compressed-tensors int4 g128": lambda path, model: writers.write_ct_checkpoint(path, model, 4, "group", 128, True),
    "compressed-tensors W8A8": lambda path, model: writers.write_ct_checkpoint(
        path, model, 8, "channel", 128, True, fmt="int-quantized"),
}


def median_seconds(fn, runs, setup=lambda: None):
    times = []
    for _ in range(runs):
        arg = setup()
        start = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=2816)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = DecoderConfig(layers=args.layers, dim=args.dim, heads=8, hidden=args.hidden)
    float_model = TinyDecoder(cfg)
    rows = []
    print(f"decoder {cfg}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"{'format':32s} {'MB':>7s} {'load_file':>10s} {'+ copy':>10s} {'xqpass':>9s} {'/ copy':>7s} {'/ lazy':>8s}  (s)")
    for name, write in FORMATS.items():
        with tempfile.TemporaryDirectory() as path:
            write(path, float_model)
            file = os.path.join(path, "model.safetensors")
            size = os.path.getsize(file)
            load_file(file)  # warm the page cache
            lazy = median_seconds(lambda _: load_file(file), args.runs)
            plain = median_seconds(lambda _: [t.clone() for t in load_file(file).values()], args.runs)
            ours = median_seconds(lambda model: xqpass.load_quantized_checkpoint(model, path), args.runs,
                                  setup=lambda: TinyDecoder(cfg))
        rows.append(dict(format=name, bytes=size, load_file_s=lazy, load_file_copy_s=plain, xqpass_s=ours,
                         ratio_to_copy=ours / plain, ratio_to_load_file=ours / lazy))
        print(f"{name:32s} {size / 1e6:7.1f} {lazy:10.3f} {plain:10.3f} {ours:9.3f} {ours / plain:7.2f} {ours / lazy:8.1f}")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=vars(args), torch=torch.__version__, date=time.strftime("%Y-%m-%d"), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
