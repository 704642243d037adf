"""A Hugging Face mixture-of-experts model (Mixtral architecture) quantized int8 and int4, compiled for
XLA, and ``generate()``.

    python examples/moe.py [--hidden 256] [--experts 8] [--top-k 2] [--layers 2] [--new-tokens 8] [--batch 1]

A ``transformers`` Mixtral model built from a config (random weights, seeded), in bfloat16.
``xqpass.quantize_model`` swaps each layer's fused experts module (``MixtralExperts``: ``gate_up_proj
[E, 2I, H]`` and ``down_proj [E, H, I]`` banks) for ``xqpass.XlaQuantizedGatedExperts``, whose banks
run through ``torch.ops.xq.quantized_grouped_matmul`` (at one token, the op reads the chosen experts'
bytes only), and the attention linears for ``XlaQuantizedLinear``; the model is compiled with
``backend="openxla"`` and generates a fixed number of tokens with a static cache and a sync before each
forward call, as ``examples/generate.py`` does (whose pieces this reuses). The bfloat16 model runs too, with transformers'
``batched_mm`` experts (each token's experts gathered as bfloat16 banks; its default ``grouped_mm`` is
torch's CUDA kernel).

Each variant prints ms per token (the median of three warm calls), XLA compilations in each
``generate()`` call, the decoder layers' weight bytes on the device (experts, attention, router, norms),
and the first step's logits against the float model's (relative norm).
"""
import argparse
import copy
import os

os.environ.setdefault("PJRT_DEVICE", "CPU")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

import xqpass  # noqa: E402
from generate import compiled_generate, first_step_logits  # noqa: E402


def layer_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the decoder layers' tensors, of which the experts'), on whatever device they sit."""
    total = experts = 0
    for name, module in model.named_modules():
        if name.startswith("model.layers."):
            size = sum(t.numel() * t.element_size() for t in (*module.parameters(recurse=False),
                                                              *module.buffers(recurse=False)))
            total += size
            experts += size if ".experts" in name else 0
    return total, experts


def run(name: str, model: nn.Module, ids: torch.Tensor, reference: torch.Tensor, new_tokens: int):
    model, ms, compiles, err = compiled_generate(model, "openxla", ids, reference, new_tokens)
    total, experts = layer_bytes(model)
    print(f"{name:34} {ms:9.2f} {'/'.join(map(str, compiles)):>14} {total:>12,} {experts:>12,} {err:10.2e}")
    return err, compiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                           num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                           num_key_value_heads=max(1, args.hidden // 128), num_local_experts=args.experts,
                           num_experts_per_tok=args.top_k, max_position_embeddings=args.prompt + args.new_tokens + 16)
    model = MixtralForCausalLM(config).eval().to(torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.prompt))
    reference = first_step_logits(model, ids)

    print(f"Mixtral-architecture model: hidden {args.hidden}, {args.experts} experts of {2 * args.hidden} (top-"
          f"{args.top_k}), {args.layers} layers, bfloat16; batch {args.batch}, {args.prompt}-token prompt, "
          f"{args.new_tokens} new tokens, XLA:CPU")
    print(f"{'':34} {'ms/token':>9} {'compilations':>14} {'layer bytes':>12} {'expert bytes':>12} {'logits err':>10}")
    results = {}

    dense = copy.deepcopy(model)
    dense.config._experts_implementation = "batched_mm"  # static shapes; grouped_mm is torch's CUDA kernel
    results["bfloat16"] = run("bfloat16 (batched_mm), openxla", dense, ids, reference, args.new_tokens)
    for label, fmt in (("int8", dict(bits=8)), ("int4 g32", dict(bits=4, block_size=32))):
        quantized, report = xqpass.quantize_model(copy.deepcopy(model), **fmt, return_report=True,
                                                  filter_fn=lambda m, name: name != "lm_head")
        assert len(report.experts) == args.layers, report  # every experts module swapped
        results[label] = run(f"quantize_model {label}, openxla", quantized, ids, reference, args.new_tokens)

    print("compilations: in each of five generate() calls; ms/token: the median of the last three; logits err: "
          "the first step against the float model in float32")
    # bfloat16 activations round ~2**-8 a step; round-to-nearest int4 in groups of 32 errs by ~10% of a
    # random (Gaussian) weight's size, which two layers carry to ~20% of the logits
    limits = {"bfloat16": 0.05, "int8": 0.1, "int4 g32": 0.35}
    # the bfloat16 model's batched_mm experts compile once more in the second call; the quantized models never
    settle = {"bfloat16": 2, "int8": 1, "int4 g32": 1}
    bad = {name: (err, compiles) for name, (err, compiles) in results.items()
           if not err < limits[name] or any(compiles[settle[name]:])}
    if bad:
        raise SystemExit(f"too far from the float model, or compiling after the first generate() call: {bad}")


if __name__ == "__main__":
    main()
