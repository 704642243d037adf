"""The decode benchmark users compare: ``generate()`` of a transformers Llama-architecture model on the CPU
and on XLA:CPU, dense and quantized, ms per token and peak host memory.

Per size (hidden x layers, bfloat16, random weights) and batch: a ``--prompt``-token prompt and exactly
``--new-tokens`` greedy tokens (``eos_token_id=None``: no EOS stopping in any path) with a static KV cache;
on XLA a step boundary before each forward call (``sync_before_forward`` of examples/generate.py: without
it the second call compiles its first two steps again) and a sync after each call (the last step's
bookkeeping). One call to compile, one to check that nothing compiles any more, then ``--runs`` timed
calls (median, every call waited for). Each path runs in a process of its own, so that peak host memory
(``ru_maxrss``) is its own:

  eager bf16            the float model, eager on the CPU (what a user runs today)
  eager int8            xqpass.quantize_model(bits=8), eager on the CPU (torch's int8 weight-only kernel)
  openxla bf16          the float model, torch.compile(backend="openxla")
  xq_openxla int8       hand-written int8 dequant linears (examples/generate.py), through the pass
  xq_openxla int4 g128  hand-written packed int4 dequant linears, groups of 128, through the pass
  openxla qm int8       xqpass.quantize_model(bits=8) + openxla
  openxla qm int4 g128  xqpass.quantize_model(bits=4, block_size=128, by rows) + openxla
  openxla qm int8 all   the same as qm int8 with the output head quantized too (not in the default paths)

    python benchmarks/bench_generate.py --sizes 1024x8 --batches 1 8 --json benchmarks/results/generate.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("PJRT_DEVICE", "CPU")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

PATHS = ("eager bf16", "eager int8", "openxla bf16", "xq_openxla int8", "xq_openxla int4 g128", "openxla qm int8",
         "openxla qm int4 g128")


class Int4DequantLinear(nn.Module):
    """Packed int4 (low nibble first), symmetric, groups along the input, dequantized in forward."""

    def __init__(self, linear: nn.Linear, group: int = 128):
        super().__init__()
        n, k = linear.weight.shape
        w = linear.weight.detach().float().reshape(n, k // group, group)
        scale = w.abs().amax(dim=-1).clamp(min=1e-8) / 7
        q = torch.clamp(torch.round(w / scale[..., None]), -8, 7).to(torch.int8).reshape(n, k)
        self.register_buffer("packed", ((q[:, 0::2] & 15) | (q[:, 1::2] << 4)).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.group = group

    def forward(self, x):
        low = (self.packed << 4) >> 4  # sign-extended nibbles (int8 shifts are arithmetic)
        high = self.packed >> 4
        q = torch.stack([low, high], dim=-1).reshape(self.packed.shape[0], -1)
        n, k = q.shape
        w = q.reshape(n, k // self.group, self.group).to(x.dtype) * self.scale[..., None]
        return F.linear(x, w.reshape(n, k))


def build(path: str, hidden: int, layers: int):
    """(model, device, backend) for one path, in bfloat16."""
    from generate import Int8DequantLinear, swap_linears
    from transformers import LlamaConfig, LlamaForCausalLM

    import xqpass

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128,
                         num_key_value_heads=hidden // 128, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    not_head = lambda module, name: name != "lm_head"  # noqa: E731
    if path == "eager int8" or path == "openxla qm int8":
        xqpass.quantize_model(model, bits=8, filter_fn=not_head)
    elif path == "openxla qm int8 all":
        xqpass.quantize_model(model, bits=8)
    elif path == "openxla qm int4 g128":
        xqpass.quantize_model(model, bits=4, block_size=128, block_layout="rows", filter_fn=not_head)
    elif path == "xq_openxla int8":
        swap_linears(model, Int8DequantLinear)
    elif path == "xq_openxla int4 g128":
        swap_linears(model, Int4DequantLinear)
    if path.startswith("eager"):
        return model, torch.device("cpu"), None
    import torch_xla

    return model, torch_xla.device(), "xq_openxla" if path.startswith("xq_openxla") else "openxla"


def measure(path: str, hidden: int, layers: int, batch: int, prompt: int, new_tokens: int, runs: int) -> dict:
    from generate import compilations, linear_bytes, sync_before_forward

    model, device, backend = build(path, hidden, layers)
    model = model.to(device)
    if backend is not None:
        import torch_xla

        model.forward = torch.compile(model.forward, backend=backend)
        sync_before_forward(model)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    seconds, compiles = [], []
    with torch.no_grad():
        for _ in range(2 + runs):
            before = compilations() if backend is not None else 0
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, eos_token_id=None, do_sample=False,
                                 cache_implementation="static")
            if backend is not None:
                torch_xla.sync()
            assert out.cpu().shape[1] == prompt + new_tokens
            seconds.append(time.perf_counter() - start)
            compiles.append((compilations() if backend is not None else 0) - before)
    timed = sorted(seconds[2:])
    return dict(path=path, size=f"{hidden}x{layers}", batch=batch, ms_per_token=timed[len(timed) // 2] / new_tokens * 1e3,
                fastest_ms_per_token=timed[0] / new_tokens * 1e3, compilations=compiles,
                linear_bytes=linear_bytes(model), peak_host_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1024x8"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="every path this many times, interleaved")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=[*PATHS, "openxla qm int8 all"])
    parser.add_argument("--json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # worker: "path|hidden|layers|batch"
    args = parser.parse_args()
    if args.one:
        path, hidden, layers, batch = args.one.split("|")
        print(json.dumps(measure(path, int(hidden), int(layers), int(batch), args.prompt, args.new_tokens, args.runs)))
        return
    results = []
    print(f"{'size':>8} {'batch':>5} {'path':22} {'round':>5} {'ms/token':>9} {'fastest':>8} {'compilations':>14} "
          f"{'linear bytes':>14} {'peak host MB':>12}", flush=True)
    for size in args.sizes:
        hidden, layers = map(int, size.split("x"))
        for batch in args.batches:
            rows = {}
            for round_ in range(args.rounds):  # the paths interleaved: every path once a round
                for path in args.paths:
                    proc = subprocess.run([sys.executable, __file__, "--one", f"{path}|{hidden}|{layers}|{batch}",
                                           "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens),
                                           "--runs", str(args.runs)], capture_output=True, text=True)
                    if proc.returncode:
                        print(f"{size:>8} {batch:>5} {path:22} failed: {proc.stderr[-500:]}", flush=True)
                        continue
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    rows.setdefault(path, []).append(r)
                    print(f"{size:>8} {batch:>5} {path:22} {round_:>5} {r['ms_per_token']:9.1f} "
                          f"{r['fastest_ms_per_token']:8.1f} {'/'.join(map(str, r['compilations'])):>14} "
                          f"{r['linear_bytes']:>14,} {r['peak_host_mb']:12.0f}", flush=True)
            for path, runs in rows.items():  # a path's row: its median round, every round's ms kept
                r = dict(sorted(runs, key=lambda r: r["ms_per_token"])[len(runs) // 2])
                r["rounds_ms_per_token"] = [x["ms_per_token"] for x in runs]
                r["rounds_compilations"] = [x["compilations"] for x in runs]
                results.append(r)
            ratios(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def ratios(rows: dict) -> None:
    """The issue's speed targets as ratios of paths measured in the same round, each round's, then the median."""
    def per_round(a: str, b: str) -> str:
        if a not in rows or b not in rows:
            return "-"
        r = [x["ms_per_token"] / y["ms_per_token"] for x, y in zip(rows[a], rows[b])]
        return f"{sorted(r)[len(r) // 2]:.2f}x (rounds {', '.join(f'{v:.2f}' for v in r)})"

    print(f"  xq int8 speed-up over openxla bf16: {per_round('openxla bf16', 'xq_openxla int8')} "
          f"(qm {per_round('openxla bf16', 'openxla qm int8')})")
    print(f"  xq int8 speed-up over eager bf16:   {per_round('eager bf16', 'xq_openxla int8')} "
          f"(qm {per_round('eager bf16', 'openxla qm int8')})")
    print(f"  int4 g128 time over int8:           {per_round('xq_openxla int4 g128', 'xq_openxla int8')} "
          f"(qm {per_round('openxla qm int4 g128', 'openxla qm int8')})", flush=True)


if __name__ == "__main__":
    main()
