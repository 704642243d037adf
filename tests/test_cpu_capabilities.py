"""The op's CPU fast path is right under every CPU capability torch dispatches to.

torch picks a CPU kernel variant by capability (AVX-512, AVX2, default; ``ATEN_CPU_CAPABILITY`` forces a
lower one), and torch 2.9's ``_weight_int8pack_mm`` variants differ: some give wrong sums or crash for
some K. The sweep runs the op (which takes that kernel where :data:`xqpass.ops.cpu.INT8PACK_K_MULTIPLE`
admits the shape, the reference elsewhere) over K around multiples of 8, 16 and 32, M in {1, 2, 7, 64}, N
in {1, 7, 64} and each activation dtype, under each capability, against the float64 oracle. Cases run
in a worker process (tests/cpu_kernel_worker.py); a case that kills the worker fails the test by name
and the sweep goes on in a new worker, so a segmentation fault never takes pytest down.
"""
import itertools
import os
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "cpu_kernel_worker.py")
KS = sorted({1, 4, 12, 33} | {base + d for base in (16, 32, 64, 128, 256, 4096) for d in (-8, 0, 8)})
MS, NS = (1, 2, 7, 64), (1, 7, 64)
DTYPES = ("float32", "float16", "bfloat16")
CASES = [f"{k} {m} {n} {dtype}" for k, m, n, dtype in itertools.product(KS, MS, NS, DTYPES)]


def _sweep(capability: str, cases: list[str]):
    """(capability torch reports, {case: (fast, error)}, {case: exit status}) of the cases, each crash
    restarting the worker at the next case."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1")
    results, crashes, reported, todo = {}, {}, None, list(cases)
    while todo:
        proc = subprocess.run([sys.executable, WORKER], input="\n".join(todo) + "\n", env=env,
                              capture_output=True, text=True, timeout=600)
        running = None
        for line in proc.stdout.splitlines():
            word, _, rest = line.partition(" ")
            if word == "capability":
                reported = rest
            elif word == "start":
                running = rest
            elif word == "done":
                *case, fast, err = rest.split(" ")
                results[" ".join(case)] = (fast == "1", float(err))
                running = None
        if proc.returncode == 0:
            break
        if running is None:  # died outside a case: nothing to attribute it to
            raise AssertionError(f"worker under {capability} exited {proc.returncode}: {proc.stderr[-2000:]}")
        crashes[running] = proc.returncode
        todo = todo[todo.index(running) + 1:]
    return reported, results, crashes


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_cpu_kernel_right_under_each_capability(capability):
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                           env=dict(os.environ, ATEN_CPU_CAPABILITY=capability), capture_output=True, text=True)
    reported = probe.stdout.strip()
    if reported.lower() != capability.lower():
        pytest.skip(f"this CPU runs {reported} when asked for {capability}")
    reported, results, crashes = _sweep(capability, CASES)
    assert reported.lower() == capability.lower()
    assert not crashes, f"under {reported} these cases crashed the process (case: exit status): {crashes}"
    wrong = {case: err for case, (_, err) in results.items() if not err <= 1.0}
    assert not wrong, f"under {reported} these cases are wrong (case: error / allowance): {wrong}"
    assert set(results) == set(CASES)
    # the sweep reaches the fast path for every dtype (not only the reference)
    fast_dtypes = {case.split()[-1] for case, (fast, _) in results.items() if fast}
    assert fast_dtypes == set(DTYPES)
