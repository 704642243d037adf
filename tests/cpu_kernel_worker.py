"""Runs cases of the op's CPU kernel in this process and prints one line a case (see
tests/test_cpu_capabilities.py, which starts it under each ``ATEN_CPU_CAPABILITY``).

stdin: one case a line, ``K M N dtype``. stdout: ``capability <name>`` first, then for each case
``start <case>`` before it runs and ``done <case> <fast> <error>`` after, flushed, so that a parent
reading the stream knows which case a crashed process was running. ``error`` is the largest
``|out - expected| / allowance`` against the float64 oracle (tests/oracle.py): <= 1 is right.
"""
import os
import sys

os.environ.setdefault("PJRT_DEVICE", "CPU")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import xqpass  # noqa: E402,F401  (registers the op)
from oracle import oracle  # noqa: E402
from xqpass.ops.cpu import int8pack_applies  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def run(k: int, m: int, n: int, dtype: torch.dtype) -> tuple[bool, float]:
    g = torch.Generator().manual_seed(k * 10007 + m * 101 + n)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int16).to(torch.int8)
    scale = torch.rand(n, generator=g) * 0.02 + 0.001
    fast = int8pack_applies(x, w, None, -1, False, False, False)
    worst = 0.0
    for _ in range(3):  # the broken variants are nondeterministic: a wrong sum shows in some calls only
        out = torch.ops.xq.quantized_matmul(x, w, scale)
        # the fast path rounds the scale to x.dtype: a second rounding the op's definition allows it
        expected, allowance = oracle(x, w, scale, roundings=2)
        err = np.abs(out.double().numpy() - expected) / allowance
        worst = max(worst, float(np.nan_to_num(err, nan=np.inf).max()) if err.size else 0.0)
    return fast, worst


def main() -> None:
    print("capability", torch.backends.cpu.get_cpu_capability(), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        k, m, n, dtype = line.split()
        case = f"{k} {m} {n} {dtype}"
        print("start", case, flush=True)
        fast, err = run(int(k), int(m), int(n), DTYPES[dtype])
        print("done", case, int(fast), repr(err), flush=True)


if __name__ == "__main__":
    main()
