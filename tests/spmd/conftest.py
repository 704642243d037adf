"""Fixtures for the GSPMD tests. These run in their own process (SPMD is process-wide), started by
tests/test_sharding.py with XLA's HLO dump in XQPASS_HLO_DUMP: with CPU_NUM_DEVICES=4 for all but
test_spmd_one_device.py, which has a process of its own with CPU_NUM_DEVICES=1."""
import math
import os
import re

import sys

import numpy as np
import pytest

import torch_xla.runtime as xr

xr.use_spmd()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: checkpoint writers

DUMP = os.environ["XQPASS_HLO_DUMP"]
# "f32[4,8]{1,0} all-reduce(" and tuple results "(f32[4]{0}, s8[2]{0}) all-gather("
_COLLECTIVE = re.compile(r"= (\(?[^=]*?\)?) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
                         r"(?:-start)?\(")


@pytest.fixture(scope="session")
def mesh():
    import torch_xla.distributed.spmd as xs

    n = xr.global_runtime_device_count()
    assert n == 4, f"the SPMD tests expect 4 XLA:CPU devices, got {n}"
    return xs.Mesh(np.arange(n), (1, n), ("data", "model"))


def collectives(hlo: str) -> list[tuple[str, tuple[tuple[str, int], ...]]]:
    """``(op, ((element type, element count), ...))`` for each collective in an HLO module's text."""
    found = []
    for types, op in _COLLECTIVE.findall(hlo):
        results = tuple((dtype, math.prod(int(d) for d in dims.split(",") if d))
                        for dtype, dims in re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", types))
        found.append((op, results))
    return found


@pytest.fixture
def compiled_hlo():
    """A function returning the partitioned, optimized HLO text of every module compiled since the
    test started (XLA's dump)."""
    before = set(os.listdir(DUMP))

    def modules() -> list[str]:
        new = sorted(f for f in set(os.listdir(DUMP)) - before if f.endswith("cpu_after_optimizations.txt"))
        texts = []
        for f in new:
            with open(os.path.join(DUMP, f)) as handle:
                texts.append(handle.read())
        return texts

    return modules
