"""examples/ run as a user runs them (``python examples/<name>.py``), each in its own process (one of
them turns on SPMD, which is process-wide), and check themselves: each exits non-zero when its result
is wrong (a rewrite missing, an output off its reference, a recompilation where none is expected)."""
import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def run_example(name: str, *args: str) -> str:
    env = dict(os.environ, PJRT_DEVICE="CPU")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_rewrite_by_hand():
    out = run_example("rewrite_by_hand.py")
    assert out.count("xqpass: graph: 2 rewritten, 0 missed") == 2
    assert "W8A16 (int8) per-channel sym" in out and "W4A16 packed (uint8) blockwise by rows(B=32) asym" in out


def test_property_test():
    out = run_example("property_test.py")
    assert "as accurate as the original on every drawn case" in out


def test_shard():
    out = run_example("shard.py")
    assert "14 linears split over mesh axis 'model' (4 devices)" in out
    assert "per-device shards [(64, 256), (64, 256), (64, 256), (64, 256)]" in out


@pytest.mark.parametrize("batch", ["1", "2"])
def test_generate(batch):
    out = run_example("generate.py", "--batch", batch, "--new-tokens", "4")
    rows = [line for line in out.splitlines() if line.startswith(("hand-written", "quantize_model", "GPTQ"))]
    assert len(rows) == 3, out  # each row checked by the example itself (logits error, compilations)
    for row in rows:  # compilations in each of five generate() calls: none after the first
        assert row.split()[-3].endswith("/0/0/0/0"), row


def test_moe():
    out = run_example("moe.py", "--new-tokens", "4")
    rows = [line for line in out.splitlines() if line.startswith(("bfloat16", "quantize_model"))]
    assert len(rows) == 3, out  # each row checked by the example itself (logits error, compilations)
    for row in rows:  # compilations in each of five generate() calls: none after the first
        (counts,) = [field for field in row.split() if field.count("/") == 4]
        assert counts.endswith("/0/0/0/0"), row
