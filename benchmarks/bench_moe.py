"""One expert bank (a MoE layer's up projection) on XLA:CPU: the grouped op against dense bfloat16.

E experts of N x K (default 8 of 2816 x 1024), top-2 routing, T tokens (1, 16, 256); activations
bfloat16; every path compiled with ``openxla``; each call timed on its own and waited for with
``out.cpu()``, median of ``--runs`` (``bench_matmul.bench_paths``: warm-ups, then the sequence twice).

Paths:
  xq int8 / int4 g128 auto      torch.ops.xq.quantized_grouped_matmul, int8 per-channel and packed int4
                                blockwise by rows (B=128), the route the op picks
  ... gather / dense            the same with the route forced (grouped_tuning): each row's experts'
                                bytes gathered, or every expert against every row then picked
  dense bf16 gather-then-bmm    w[ids] ([T*2, N, K] bf16 gathered) bmm x: what hand-written MoE code does
  dense bf16 bank               every expert against every row (one dot), then each row's experts picked

    python benchmarks/bench_moe.py --tokens 1 16 256 --json out.json

``--decode``: instead, ``generate()`` on a transformers Mixtral built from a config (random weights,
bfloat16; ``--hidden``, ``--layers``, E = ``--experts`` of ``--n`` x hidden, ``--top-k``), quantized by
``xqpass.quantize_model`` (int8 per-channel, int4 g128: attention linears and expert banks; the output
head stays bfloat16) against the bfloat16 model on transformers' ``batched_mm`` experts, each compiled
with ``openxla``, a static cache and a sync before each forward (examples/moe.py): ms per new token
(median of ``--runs`` timed calls after one that compiles), the decoder layers' bytes and the experts'.

    python benchmarks/bench_moe.py --decode --hidden 1024 --n 2816 --layers 2 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import types

os.environ.setdefault("PJRT_DEVICE", "CPU")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import xqpass  # noqa: E402
from bench_matmul import bench_paths  # noqa: E402
from xqpass.ops import GroupedTuning, grouped_tuning  # noqa: E402

op = torch.ops.xq.quantized_grouped_matmul
ROUTES = {"auto": None, "gather": GroupedTuning(gather_max_rows=10**9),
          "dense": GroupedTuning(gather_max_rows=-1, each_row_max_rows=-1),
          "each row": GroupedTuning(gather_max_rows=-1, each_row_max_rows=10**9)}


def quantized_bank(w: torch.Tensor, bits: int, block: int):
    """(weight, scale, block_size, packed) of a float bank ``[E, N, K]``: int8 per-channel or packed int4
    blockwise by rows, symmetric, each expert through ``xqpass.quantize_weight``."""
    parts = [xqpass.quantize_weight(w[e], bits=bits, block_size=block, block_layout="rows") if bits == 4
             else xqpass.quantize_weight(w[e], bits=bits) for e in range(w.shape[0])]
    return (torch.stack([p.weight for p in parts]), torch.stack([p.scale for p in parts]),
            block if bits == 4 else -1, bits == 4)


def run(experts: int, n: int, k: int, top_k: int, tokens: list[int], runs: int, bmm_max_tokens: int) -> list[dict]:
    import torch_xla

    dev = torch_xla.device()
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(experts, n, k, generator=gen) / k**0.5
    w_bf16 = w.to(torch.bfloat16).to(dev)
    banks = {"int8": quantized_bank(w, 8, -1), "int4 g128": quantized_bank(w, 4, 128)}
    banks = {name: (q.to(dev), s.to(dev), block, packed) for name, (q, s, block, packed) in banks.items()}
    results = []
    torch._dynamo.config.cache_size_limit = 64
    for t in tokens:
        torch._dynamo.reset()
        x = torch.randn(t, k, generator=gen).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(t)])  # [T, top_k]
        exact = torch.einsum("tk,tjnk->tjn", x.double(), w.to(torch.bfloat16).double()[ids])
        xd, idsd = x.to(dev), ids.to(dev)
        paths = {}
        for name, (q, s, block, packed) in banks.items():
            for route, tuning in ROUTES.items():
                if route == "gather" and t * top_k > 64:  # [T*top_k, N, K] float32 would not fit
                    continue

                def f(x, ids, q=q, s=s, block=block, packed=packed):
                    return op(x, ids, q, s, None, block, packed, packed=packed)

                compiled = torch.compile(_own_code(f, f"{name}_{route}"), backend="openxla")
                paths[f"xq {name} {route}"] = (compiled if tuning is None else _traced_with(compiled, tuning),
                                               (xd, idsd))

        def bank_then_pick(x, ids):  # [T, E, N] -> each row's experts
            every = torch.einsum("tk,enk->ten", x, w_bf16)
            return torch.gather(every, 1, ids[:, :, None].expand(-1, -1, n))

        def gather_then_bmm(x, ids):
            wg = w_bf16[ids.reshape(-1)]  # [T*top_k, N, K]
            xs = x.repeat_interleave(top_k, dim=0)[:, :, None]  # [T*top_k, K, 1]
            return torch.bmm(wg, xs).reshape(x.shape[0], top_k, n)

        if t <= bmm_max_tokens:
            paths["dense bf16 gather-then-bmm"] = (torch.compile(gather_then_bmm, backend="openxla"), (xd, idsd))
        paths["dense bf16 bank"] = (torch.compile(bank_then_pick, backend="openxla"), (xd, idsd))
        median, fastest = bench_paths(paths, runs=runs)
        for name, (fn, args) in paths.items():
            with torch.no_grad():
                err = float((fn(*args).cpu().double() - exact).norm() / exact.norm())
            row = dict(tokens=t, rows=t * top_k, path=name, ms=round(median[name], 2), fastest_ms=round(fastest[name], 2),
                       rel_err=err)
            results.append(row)
            print(f"T={t:4d} {name:34s} {row['ms']:9.2f} ms (fastest {row['fastest_ms']:8.2f})  err {err:.1e}",
                  flush=True)
    return results


def _own_code(fn, tag: str):
    """``fn`` with a code object of its own: Dynamo caches compiled graphs by code object and does not
    guard on the route (a context variable), so each forced route needs its own."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}".replace(" ", "_"))
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _traced_with(compiled, tuning):
    """``compiled`` traced (its first call) and run under ``tuning``: the route is chosen at trace time."""
    def call(*args):
        with grouped_tuning(tuning):
            return compiled(*args)
    return call


def decode(hidden: int, inner: int, experts: int, top_k: int, layers: int, batch: int, prompt: int, new_tokens: int,
           runs: int) -> list[dict]:
    import copy
    import time

    import torch_xla
    import torch_xla.debug.metrics as met
    from transformers import MixtralConfig, MixtralForCausalLM

    def compilations():
        data = met.metric_data("CompileTime")
        return int(data[0]) if data else 0

    def layer_bytes(model):
        total = expert = 0
        for name, module in model.named_modules():
            if name.startswith("model.layers."):
                size = sum(t.numel() * t.element_size()
                           for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)))
                total, expert = total + size, expert + (size if ".experts" in name else 0)
        return total, expert

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
                           num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                           num_local_experts=experts, num_experts_per_tok=top_k,
                           max_position_embeddings=prompt + new_tokens + 16)
    model = MixtralForCausalLM(config).eval().to(torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (batch, prompt))
    variants = {"dense bf16 (batched_mm)": None, "xq int8": dict(bits=8), "xq int4 g128": dict(bits=4, block_size=128)}
    device, results = torch_xla.device(), []
    for name, fmt in variants.items():
        m = copy.deepcopy(model)
        if fmt is None:
            m.config._experts_implementation = "batched_mm"  # static shapes; grouped_mm is torch's CUDA kernel
        else:
            xqpass.quantize_model(m, **fmt, filter_fn=lambda module, layer: layer != "lm_head")
        m = m.to(device)
        m.forward = torch.compile(m.forward, backend="openxla")
        m.register_forward_pre_hook(lambda module, args: torch_xla.sync())
        seconds, compiles = [], []
        for call in range(runs + 1):
            before, start = compilations(), time.perf_counter()
            out = m.generate(ids.to(device), max_new_tokens=new_tokens, eos_token_id=None, do_sample=False,
                             cache_implementation="static")
            out.cpu()
            seconds.append(time.perf_counter() - start)
            compiles.append(compilations() - before)
        total, expert = layer_bytes(m)
        row = dict(path=name, batch=batch, ms_per_token=round(sorted(seconds[1:])[len(seconds[1:]) // 2] / new_tokens * 1e3, 2),
                   layer_bytes=total, expert_bytes=expert, compilations=compiles)
        results.append(row)
        print(f"{name:26s} {row['ms_per_token']:9.2f} ms/token  layers {total / 1e6:7.1f} MB  experts "
              f"{expert / 1e6:7.1f} MB  compilations {compiles}", flush=True)
        del m
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--n", type=int, default=2816)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--bmm-max-tokens", type=int, default=256,
                        help="skip gather-then-bmm above this many tokens (it materializes [T*top_k, N, K])")
    parser.add_argument("--json")
    parser.add_argument("--decode", action="store_true", help="generate() on a small Mixtral instead (see above)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    if args.decode:
        results = decode(args.hidden, args.n, args.experts, args.top_k, args.layers, args.batch, 16, args.new_tokens,
                         args.runs)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                               hidden=args.hidden, inner=args.n, experts=args.experts, top_k=args.top_k,
                               layers=args.layers, results=results), f, indent=1)
        return
    results = run(args.experts, args.n, args.k, args.top_k, args.tokens, args.runs, args.bmm_max_tokens)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                           experts=args.experts, n=args.n, k=args.k, top_k=args.top_k, results=results), f, indent=1)


if __name__ == "__main__":
    main()
