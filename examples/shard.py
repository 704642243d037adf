"""A quantized Llama-architecture model split over 4 XLA:CPU devices with ``xqpass.shard_model`` (GSPMD,
one process): each device holds a quarter of every linear's int8 bytes, and the output is the unsharded
model's.

    python examples/shard.py [--hidden 256] [--layers 2]

On a TPU host the same script splits over the host's chips; on a CPU, ``CPU_NUM_DEVICES=4`` (set below
before torch_xla starts) gives 4 XLA:CPU devices. docs/sharding.md has the plan and what is split.
"""
import argparse
import os

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("CPU_NUM_DEVICES", "4")  # read once, when torch_xla's runtime starts

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch_xla  # noqa: E402
import torch_xla.distributed.spmd as xs  # noqa: E402
import torch_xla.runtime as xr  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import xqpass  # noqa: E402

#: Megatron's split of a Llama block: attention heads and MLP columns first, the projections back in
#: by rows (one all-reduce each)
LLAMA_PLAN = {"*.q_proj": "column", "*.k_proj": "column", "*.v_proj": "column", "*.o_proj": "row",
              "*.gate_proj": "column", "*.up_proj": "column", "*.down_proj": "row"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()

    xr.use_spmd()  # process-wide, before any XLA tensor exists
    n = xr.global_runtime_device_count()
    mesh = xs.Mesh(np.arange(n), (1, n), ("data", "model"))

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    xqpass.quantize_model(model, bits=8, filter_fn=lambda module, name: "lm_head" not in name)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits  # the same quantized model on the host: the op's CPU kernel

    report = xqpass.shard_model(model, mesh, LLAMA_PLAN)
    print(report)
    model.to(torch_xla.device())  # the rest (embeddings, norms, lm_head): replicated
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    shards = [tuple(shard.shape) for shard, _ in torch_xla._XLAC._get_local_shards([q_proj])[0]]
    print(f"layers.0.self_attn.q_proj.weight {tuple(q_proj.shape)} {q_proj.dtype}: per-device shards {shards}")

    compiled = torch.compile(model, backend="openxla")
    with torch.no_grad():
        logits = compiled(ids.to(torch_xla.device())).logits.cpu()
    err = ((logits - expected).norm() / expected.norm()).item()
    print(f"{n} devices: logits' relative error against the unsharded model: {err:.2e}")
    if len(report.layers) != 7 * args.layers or len(set(shards)) != 1 or len(shards) != n or not err < 1e-4:
        raise SystemExit("the sharded model does not match the unsharded one")


if __name__ == "__main__":
    main()
