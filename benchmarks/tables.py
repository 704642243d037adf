"""Markdown tables for docs/benchmarks.md from the JSON that bench_matmul.py / bench_decoder.py write.

    python benchmarks/tables.py benchmarks/results/matmul.json benchmarks/results/decoder.json

Prints the matmul table (median ms; the fastest call in parentheses for the xq paths), the issue's
targets as ratios computed from the same rows (by median, and by fastest call where a path is under a
few milliseconds), and the decoder table.
"""
from __future__ import annotations

import json
import sys

COLUMNS = ["torch_xla op W8A16", "dense bf16 F.linear", "dense bf16 (w@x.T).T", "convert wall", "xq W8A16",
           "xq W4A16 g64", "xq W8A8", "cpu _weight_int8pack_mm", "cpu xq_eager W8A16"]
XQ = ("xq W8A16", "xq W4A16 g64", "xq W8A8")


def cell(r: dict, name: str) -> str:
    ms = f"{r[name]:.1f}"
    if name in XQ and f"{name} min" in r:
        ms += f" ({r[name + ' min']:.1f})"
    return f"**{ms}**" if name in XQ and r[name] < min(r[c] for c in COLUMNS[:4]) else ms


def matmul_table(rows: list[dict]) -> str:
    lines = ["| N x K | M | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['N']}x{r['K']} | {r['M']} | " + " | ".join(cell(r, c) for c in COLUMNS) + " |")
    return "\n".join(lines)


def ratio(r: dict, a: str, b: str, fastest: bool = False) -> float:
    key = (lambda n: f"{n} min" if f"{n} min" in r else n) if fastest else (lambda n: n)
    return r[key(a)] / r[key(b)]


def targets_table(rows: list[dict]) -> str:
    def at(shape_rows, m):
        return next((r for r in shape_rows if r["M"] == m), None)

    shapes = sorted({(r["N"], r["K"]) for r in rows})
    by_shape = [[r for r in rows if (r["N"], r["K"]) == s] for s in shapes]
    names = " / ".join(f"{n}x{k}" for n, k in shapes)
    lines = [f"| target | {names} |", "|---|---|"]

    def row(label, fn):
        values = []
        for shape_rows in by_shape:
            try:
                values.append(fn(shape_rows))
            except (TypeError, KeyError):
                values.append("-")
        lines.append(f"| {label} | {' / '.join(values)} |")

    row("W8A16 M=1: torch_xla op / xq (>= 4)", lambda s: f"{ratio(at(s, 1), 'torch_xla op W8A16', 'xq W8A16'):.0f}x")
    row("W8A16 M=1: dense `nn.Linear` / xq (>= 4)", lambda s: f"{ratio(at(s, 1), 'dense bf16 F.linear', 'xq W8A16'):.0f}x")
    row("W8A16 M=1: xq / convert wall (<= 1.1)", lambda s: f"{ratio(at(s, 1), 'xq W8A16', 'convert wall'):.2f}x")
    for m, least in ((16, 2), (256, 2.5)):
        row(f"W8A16 M={m}: torch_xla op / xq (>= {least})",
            lambda s, m=m: f"{ratio(at(s, m), 'torch_xla op W8A16', 'xq W8A16'):.2f}x")
        row(f"W8A16 M={m}: xq / best dense bf16 (<= 1.15)",
            lambda s, m=m: f"{ratio(at(s, m), 'xq W8A16', 'dense bf16 (w@x.T).T'):.2f}x")
    row("W4A16 g64 M=1: W4 / W8 (<= 1.5), median (fastest call)",
        lambda s: f"{ratio(at(s, 1), 'xq W4A16 g64', 'xq W8A16'):.2f}x ({ratio(at(s, 1), 'xq W4A16 g64', 'xq W8A16', True):.2f}x)")
    row("W8A8 / W8A16 (<= 1) at M = " + ", ".join(str(r["M"]) for r in by_shape[0]) + ", median",
        lambda s: " ".join(f"{ratio(r, 'xq W8A8', 'xq W8A16'):.2f}" for r in s))
    row("W8A8 / W8A16, fastest call", lambda s: " ".join(f"{ratio(r, 'xq W8A8', 'xq W8A16', True):.2f}" for r in s))
    row("eager M=1: xq_eager / `_weight_int8pack_mm` (<= 1.5)",
        lambda s: f"{ratio(at(s, 1), 'cpu xq_eager W8A16', 'cpu _weight_int8pack_mm'):.2f}x")
    errors = [r[f"{p} err"] for r in rows for p in ("xq W8A16", "xq W4A16 g64")]
    lines.append(f"| W8A16 / W4A16 error vs float64 (<= 4e-3) | {min(errors):.1e} to {max(errors):.1e} |")
    return "\n".join(lines)


def decoder_table(rows: list[dict]) -> str:
    lines = ["| path | ms / token (fastest) | tokens / s | linear weight MB | err vs float |", "|---|---|---|---|---|"]
    for r in rows:
        fastest = f" ({r['fastest ms/token']:.1f})" if "fastest ms/token" in r else ""
        lines.append(f"| {r['path']} | {r['ms/token']:.1f}{fastest} | {r['tokens/s']:.0f} | {r['weight bytes'] / 1e6:.1f} | "
                     f"{r['err vs float']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        matmul = json.load(f)
    print(matmul_table(matmul["rows"]), "\n")
    print(targets_table(matmul["rows"]), "\n")
    if len(argv) > 1:
        with open(argv[1]) as f:
            print(decoder_table(json.load(f)["rows"]))


if __name__ == "__main__":
    main()
