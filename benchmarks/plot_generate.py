"""ms per token of each path of bench_generate.py's JSON, as a PNG bar chart, one panel per size and batch."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    rows = json.load(open(src))
    panels = sorted({(r["size"], r["batch"]) for r in rows}, key=lambda p: (p[0], p[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (size, batch) in zip(axes[0], panels):
        here = [r for r in rows if (r["size"], r["batch"]) == (size, batch)]
        names = [r["path"] for r in here]
        colors = ["tab:gray" if n.startswith("eager") else "tab:red" if "bf16" in n else "tab:blue" for n in names]
        ax.barh(names, [r["ms_per_token"] for r in here], color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("ms per token (median of the timed generate() calls)")
        ax.set_title(f"Llama {size} (hidden x layers), batch {batch}, bf16")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("generate(): eager CPU (gray), dense openxla (red), quantized on XLA:CPU (blue)", fontsize=9)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
