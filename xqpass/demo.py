"""`make demo`: the op and the pass on XLA:CPU, on built-in models.

1. The op: quantize a small MLP's linears to every format with ``quantize_model``; one row a format:
   weight bytes against float32, error against the float model, XLA device against the CPU reference.
2. The pass: a small Llama-style decoder whose linears dequantize int8 / int4 weights in plain torch
   code; ``xqpass.explain`` it, compile it with ``backend="xq_openxla"``, and compare accuracy against
   the float model and latency against the same model on plain ``openxla``.
3. Checkpoints: a small decoder saved as GPTQ, AWQ, compressed-tensors (int4, W8A8, FP8_DYNAMIC) and
   Hugging Face fp8 (e4m3, 128 x 128 blocks) checkpoints (written on the first run), loaded with ``load_quantized_checkpoint``, run with ``xq_openxla``, against the format's
   own dequantization in float64.

Run as ``python -m xqpass.demo`` (``PJRT_DEVICE=CPU`` is set when unset).
"""
from __future__ import annotations

import copy
import os
import time

os.environ.setdefault("PJRT_DEVICE", "CPU")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from . import XlaQuantizedLinear, quantize_model  # noqa: E402

FORMATS = [
    # (name, quantize_model kwargs)
    ("W8A16 per-channel sym", dict(bits=8)),
    ("W8A16 per-channel asym", dict(bits=8, symmetric=False)),
    ("W8A16 blockwise(64) sym", dict(bits=8, block_size=64)),
    ("W8A16 blockwise(64) asym", dict(bits=8, block_size=64, symmetric=False)),
    ("W4A16 per-channel sym packed", dict(bits=4)),
    ("W4A16 per-channel asym packed", dict(bits=4, symmetric=False)),
    ("W4A16 blockwise(64) sym packed", dict(bits=4, block_size=64)),
    ("W4A16 blockwise(64) asym packed", dict(bits=4, block_size=64, symmetric=False)),
    ("W4A16 blockwise(64) by rows packed", dict(bits=4, block_size=64, block_layout="rows")),
    ("W8A8 per-channel sym", dict(bits=8, quantize_activation=True)),
    ("W8A8 blockwise(64) asym", dict(bits=8, block_size=64, symmetric=False, quantize_activation=True)),
    ("W4A8 per-channel sym packed", dict(bits=4, quantize_activation=True)),
    ("W4A8 blockwise(64) asym packed", dict(bits=4, block_size=64, symmetric=False, quantize_activation=True)),
]


def build_model(seed: int = 0) -> nn.Module:
    """A small MLP block (d=256, hidden 1024) with a head: the built-in default."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256), nn.GELU(), nn.Linear(256, 128)
    ).eval()


def _linear_weight_bytes(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, XlaQuantizedLinear):
            total += sum(t.numel() * t.element_size() for t in (m.weight, m.weight_scaler, m.zero_point) if t is not None)
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _median_ms(fn, x, runs: int = 7) -> float:
    """Median wall time of ``fn(x).cpu()``: every call is waited for."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x).cpu()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def pass_demo(device) -> None:
    from . import explain
    from .backend import make_backend
    from .testing.models import INT4_GROUPED, INT8, DecoderConfig, TinyDecoder, with_dequant_linears

    cfg = DecoderConfig(layers=2, dim=512, heads=8, hidden=1024)
    float_model = TinyDecoder(cfg).eval()
    mlp = ("gate_proj", "up_proj", "down_proj")
    model = with_dequant_linears(float_model, lambda name: INT4_GROUPED if name.endswith(mlp) else INT8)
    x = torch.randn(1, 16, cfg.dim)
    print(f"\n== the pass: a {cfg.layers}-layer decoder (d={cfg.dim}, hidden={cfg.hidden}) whose attention "
          f"linears dequantize int8 weights and MLP linears packed int4 (groups of 32) in plain torch code\n")
    print(explain(model, x))

    reports = []
    with torch.no_grad():
        float_out = float_model(x)
        xq = torch.compile(copy.deepcopy(model).to(device), backend=make_backend("openxla", reports=reports))
        xq_out = xq(x.to(device)).cpu()
        plain = torch.compile(copy.deepcopy(model).to(device), backend="openxla")
        plain_out = plain(x.to(device)).cpu()
        xq_ms, plain_ms = _median_ms(xq, x.to(device)), _median_ms(plain, x.to(device))
    rewrites = sum(len(r.rewrites) for r in reports)
    print(f"\nxq_openxla rewrote {rewrites} of {7 * cfg.layers} linears")
    print(f"{'path':34} {'err vs float':>12} {'ms / call':>10}")
    print(f"{'xq_openxla (quantized_matmul)':34} {_rel(xq_out, float_out):>12.2e} {xq_ms:>10.1f}")
    print(f"{'openxla (dequant code as written)':34} {_rel(plain_out, float_out):>12.2e} {plain_ms:>10.1f}")
    print("latency: median of 7 calls after compiling, each waited for (.cpu()); XLA:CPU, this machine.")


def main() -> None:
    import torch_xla

    device = torch_xla.device()
    print("== the op: torch.ops.xq.quantized_matmul in every format\n")
    model = build_model()
    x = torch.randn(4, 16, 256)
    with torch.no_grad():
        float_out = model(x)
    float_bytes = _linear_weight_bytes(model)
    print(f"xqpass demo: {sum(isinstance(m, nn.Linear) for m in model.modules())} linears "
          f"(256->1024->256->128), x {tuple(x.shape)} float32, XLA device {device} "
          f"({torch_xla.__version__}), float32 weights {float_bytes / 1024:.0f} KiB\n")
    header = f"{'format':34} {'weight bytes':>13} {'vs float32':>10} {'err vs float':>12} {'XLA vs CPU':>11} {'XLA ms':>7}"
    print(header)
    print("-" * len(header))
    worst_agreement = 0.0
    for name, kwargs in FORMATS:
        q = quantize_model(copy.deepcopy(model), **kwargs)
        with torch.no_grad():
            cpu_out = q(x)
            qx = q.to(device)
            xla_out = qx(x.to(device)).cpu()  # first call compiles
            t0 = time.perf_counter()
            qx(x.to(device)).cpu()
            ms = (time.perf_counter() - t0) * 1e3
        nbytes = _linear_weight_bytes(q)
        agreement = _rel(xla_out, cpu_out)
        worst_agreement = max(worst_agreement, agreement)
        print(f"{name:34} {nbytes:>13,} {nbytes / float_bytes:>9.3f}x {_rel(cpu_out, float_out):>12.2e} "
              f"{agreement:>11.1e} {ms:>7.1f}")
    print("\nweight bytes: quantized weights + scales + zero points of all linears; err vs float: relative "
          "norm of the output against the float32 model (CPU); XLA vs CPU: relative norm between the "
          "XLA:CPU device and the op's CPU reference; XLA ms: one call after compiling, waited for (.cpu()), "
          "a smoke figure, not a benchmark.")
    if worst_agreement > 1e-4:
        raise SystemExit(f"XLA and CPU disagree: {worst_agreement:.2e}")
    pass_demo(device)
    checkpoint_demo(device)


#: (name, writer) for the checkpoint demo; group 32 fits the decoder's 128 / 256 features
CHECKPOINTS = [
    ("gptq int4 g32 act-order", lambda w, path, model: w.write_gptq_checkpoint(path, model, 4, 32, act_order=True)),
    ("awq int4 g32", lambda w, path, model: w.write_awq_checkpoint(path, model, 32)),
    ("compressed-tensors int4 g32 asym", lambda w, path, model: w.write_ct_checkpoint(path, model, 4, "group", 32, False)),
    ("compressed-tensors W8A8", lambda w, path, model: w.write_ct_checkpoint(
        path, model, 8, "channel", 32, True, fmt="int-quantized")),
    ("compressed-tensors FP8_DYNAMIC", lambda w, path, model: w.write_ct_fp8_checkpoint(path, model, "channel")),
    ("hf fp8 e4m3 128x128 blocks", lambda w, path, model: w.write_hf_fp8_checkpoint(path, model, (128, 128))),
]


def checkpoint_demo(device, root: str | None = None) -> None:
    """Quantized checkpoints in each format (written on the first run into ``root``, default
    ``.demo-checkpoints/`` or ``$XQPASS_DEMO_DIR``), loaded with ``load_quantized_checkpoint``, run with
    ``xq_openxla`` on the XLA device and compared with the format's own dequantization in float64."""
    from . import load_quantized_checkpoint
    from .testing import checkpoints as writers
    from .testing.models import DecoderConfig, TinyDecoder

    root = root or os.environ.get("XQPASS_DEMO_DIR", ".demo-checkpoints")
    cfg = DecoderConfig(layers=2, dim=128, heads=4, hidden=256)
    skeleton = TinyDecoder(cfg)
    x = torch.randn(1, 8, cfg.dim)
    print(f"\n== checkpoints: a {cfg.layers}-layer decoder (d={cfg.dim}) saved in each format under {root}/, "
          "loaded with xqpass.load_quantized_checkpoint, compiled with xq_openxla\n")
    rows = []
    for name, write in CHECKPOINTS:
        path = os.path.join(root, name.replace(" ", "-"))
        oracle_file = os.path.join(path, "oracle.pt")
        if not os.path.exists(oracle_file):  # first run: write it (random integers, the format's layout)
            oracle = write(writers, path, skeleton)
            torch.save({k: torch.as_tensor(v) for k, v in oracle.items()}, oracle_file)
        oracle = torch.load(oracle_file)
        model = TinyDecoder(cfg)  # a float skeleton, as from_pretrained builds it
        report = load_quantized_checkpoint(model, path)
        lines = str(report).splitlines()
        notes = [line for line in lines if line.startswith("  note:")]
        print("\n".join(lines[:3] + [f"  ... {len(report.layers) - 2} more"] + notes))
        reference = TinyDecoder(cfg).double()  # the format's dequantized weights, float64
        reference.load_state_dict({k: v.double() for k, v in model.state_dict().items()
                                   if not any(k.startswith(f"{layer}.") for layer in oracle)}, strict=False)
        for layer, weight in oracle.items():
            reference.get_submodule(layer).weight.data = weight.double()
        with torch.no_grad():
            exact = reference(x.double())
            # each format a fresh Dynamo cache: the models share one forward, whose cache would otherwise
            # hit the recompile limit after eight formats and run the rest eagerly
            torch._dynamo.reset()
            compiled = torch.compile(model.to(device), backend="xq_openxla")
            out = compiled(x.to(device)).cpu()
        weight_bytes = _linear_weight_bytes(model)
        rows.append((name, weight_bytes, _rel(out.double(), exact)))
    print(f"\n{'checkpoint':34} {'weight bytes':>13} {'err vs dequantized float64':>27}")
    for name, weight_bytes, err in rows:
        print(f"{name:34} {weight_bytes:>13,} {err:>27.2e}")
    print("err: relative norm of the XLA output against the float64 model with the format's dequantized "
          "weights (W8A8 and FP8_DYNAMIC also quantize their activations, int8 / e4m3 per token, hence their "
          "larger figures; hf fp8's dynamic per-128-group activations stay 16-bit, the report's note says so).")


if __name__ == "__main__":
    main()
