"""A Hugging Face causal LM, quantized three ways, compiled for XLA, and ``generate()``.

    python examples/generate.py [--hidden 256] [--layers 2] [--new-tokens 8] [--batch 1]

A ``transformers`` Llama-architecture model built from a config (random weights, seeded), in bfloat16:

1. **hand-written dequant linears** (what a quantization library leaves in the model: an int8 weight
   and a scale, dequantized in ``forward``), compiled with ``backend="xq_openxla"``: the pass rewrites
   every dequantize -> matmul into ``torch.ops.xq.quantized_matmul``;
2. ``xqpass.quantize_model`` (int8, per channel) and ``backend="openxla"``;
3. a GPTQ checkpoint (int4, groups of 32, act-order; written here from the format's published layout)
   loaded with ``xqpass.load_quantized_checkpoint`` and ``backend="openxla"``.

``generate()`` runs with a static KV cache (``cache_implementation="static"``): with the default
dynamic cache every new token changes the cache's shape, and each shape is a new compilation; and with
a step boundary (:class:`StepBoundary`), without which each token's bookkeeping compiles anew. Each
variant prints ms per token (the median of three warm calls), XLA compilations in each ``generate()`` call,
the linears' bytes on the device, and the first step's logits against the float model's (relative
norm; with random weights the tokens themselves mean nothing).
"""
import argparse
import copy
import os
import tempfile
import time

os.environ.setdefault("PJRT_DEVICE", "CPU")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch_xla  # noqa: E402
import torch_xla.debug.metrics as met  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList  # noqa: E402

import xqpass  # noqa: E402
from xqpass.testing.checkpoints import write_gptq_checkpoint  # noqa: E402


class Int8DequantLinear(nn.Module):
    """What a quantization library's linear looks like: int8 weight, a scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))

    def forward(self, x):
        return F.linear(x, self.qweight.to(x.dtype) * self.scale[:, None])


class StepBoundary(LogitsProcessor):
    """Ends XLA's lazy graph once a token. ``generate()`` runs its token selection and stopping checks as
    eager XLA ops it never syncs, so without a boundary each step's graph carries the earlier steps'
    pending ops, a new graph every token of every call (a compilation each). With it, a second call
    compiles only its first step (its static cache is reset, where the first call's was created), and
    later calls nothing."""

    def __call__(self, input_ids, scores):
        torch_xla.sync()
        return scores


def swap_linears(model: nn.Module, make) -> nn.Module:
    """Every ``nn.Linear`` but the output head replaced by ``make(linear)``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(module))
    return model


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the decoder's linear layers (weights, scales, zero points; the output head excluded)."""
    total = 0
    for name, module in model.named_modules():
        if name.startswith("model.layers.") and not list(module.children()):
            total += sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    return total


def compilations() -> int:
    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


def run(name: str, model: nn.Module, backend: str, ids: torch.Tensor, reference: torch.Tensor, new_tokens: int):
    device = torch_xla.device()
    model = model.to(device)
    model.forward = torch.compile(model.forward, backend=backend)
    ids = ids.to(device)
    compiles, seconds, first_logits = [], [], None
    for call in range(5):  # two to compile, three timed
        before = compilations()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             cache_implementation="static", logits_processor=LogitsProcessorList([StepBoundary()]),
                             output_logits=True, return_dict_in_generate=True)
        out.sequences.cpu()  # wait for the device
        seconds.append(time.perf_counter() - start)
        compiles.append(compilations() - before)
        if first_logits is None:
            first_logits = out.logits[0].cpu().float()
    err = ((first_logits - reference).norm() / reference.norm()).item()
    ms = sorted(seconds[2:])[1] / new_tokens * 1e3
    print(f"{name:44} {ms:9.2f} {'/'.join(map(str, compiles)):>14} {linear_bytes(model):>12,} {err:10.2e}")
    return err, compiles


def first_step_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The float model's logits for the next token after the prompt, in float32 on the CPU."""
    with torch.no_grad():
        return copy.deepcopy(model).float()(ids).logits[:, -1].float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 64),
                         max_position_embeddings=args.prompt + args.new_tokens + 16)
    model = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.prompt))
    reference = first_step_logits(model, ids)
    dense = linear_bytes(model)

    print(f"Llama-architecture model: hidden {args.hidden}, {args.layers} layers, bfloat16; batch {args.batch}, "
          f"{args.prompt}-token prompt, {args.new_tokens} new tokens, XLA:CPU")
    print(f"{'':44} {'ms/token':>9} {'compilations':>14} {'linear bytes':>12} {'logits err':>10}")
    print(f"{'bfloat16 (not run: the reference)':44} {'':>9} {'':>14} {dense:>12,}")
    results = {}

    # 1. hand-written dequant code, rewritten by the pass
    handwritten = swap_linears(copy.deepcopy(model), Int8DequantLinear)
    results["hand-written int8 dequant, xq_openxla"] = run(
        "hand-written int8 dequant, xq_openxla", handwritten, "xq_openxla", ids, reference, args.new_tokens)

    # 2. the module swap
    swapped = xqpass.quantize_model(copy.deepcopy(model), bits=8, filter_fn=lambda m, name: name != "lm_head")
    results["quantize_model int8, openxla"] = run(
        "quantize_model int8, openxla", swapped, "openxla", ids, reference, args.new_tokens)

    # 3. a checkpoint: GPTQ int4 g32 act-order; its float model has the weights the format dequantizes to
    with tempfile.TemporaryDirectory() as path:
        layers = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]
        dequantized = write_gptq_checkpoint(path, model, bits=4, group=32, act_order=True, layers=layers)
        gptq_float = copy.deepcopy(model)
        for name, weight in dequantized.items():
            gptq_float.get_submodule(name).weight.data = torch.from_numpy(weight).to(torch.bfloat16)
        loaded = LlamaForCausalLM(config).eval().to(torch.bfloat16)
        xqpass.load_quantized_checkpoint(loaded, path)
    results["GPTQ int4 g32 checkpoint, openxla"] = run(
        "GPTQ int4 g32 act-order checkpoint, openxla", loaded, "openxla", ids,
        first_step_logits(gptq_float, ids), args.new_tokens)

    print("compilations: in each of five generate() calls; ms/token: the median of the last three; logits err: "
          "the first step against the float model in float32")
    # bfloat16 activations: about 2**-8 a rounding, a few roundings a layer; int8 weights add their own error
    bad = {name: err for name, (err, compiles) in results.items() if not err < 0.1 or any(compiles[2:])}
    if bad:
        raise SystemExit(f"too far from the float model, or still compiling after two calls: {bad}")


if __name__ == "__main__":
    main()
