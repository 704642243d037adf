"""Latency vs M for each path of bench_matmul.py's JSON, as a PNG (log-log), one panel per shape."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PATHS = ["torch_xla op W8A16", "dense bf16 F.linear", "dense bf16 (w@x.T).T", "convert wall",
         "xq W8A16", "xq W4A16 g64", "xq W8A8", "cpu _weight_int8pack_mm", "cpu xq_eager W8A16"]


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    shapes = sorted({(r["N"], r["K"]) for r in data["rows"]})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 4.8), squeeze=False)
    for ax, (n, k) in zip(axes[0], shapes):
        rows = sorted((r for r in data["rows"] if (r["N"], r["K"]) == (n, k)), key=lambda r: r["M"])
        ms = [r["M"] for r in rows]
        for path in PATHS:
            style = "-o" if path.startswith("xq") else ("--" if path.startswith("cpu") else ":s")
            ax.plot(ms, [r[path] for r in rows], style, label=path)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (activation rows)")
        ax.set_ylabel("ms per call (median, waited for)")
        ax.set_title(f"N={n}, K={k}, bf16 activations")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left")
    meta = data["meta"]
    fig.suptitle(f"XLA:CPU, {meta.get('cores')} cores, torch {meta.get('torch')}, torch_xla {meta.get('torch_xla')}, "
                 f"{meta.get('date')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
