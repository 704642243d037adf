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
a step boundary (:func:`sync_before_forward`: ``torch_xla.sync()`` before each forward call), without
which the second call compiles its first two steps again. It decodes a fixed number of tokens
(``eos_token_id=None``: no EOS stopping, whose ``torch.isin`` runs on the CPU every token). Each variant
prints ms per token (the median of three warm calls), XLA compilations in each ``generate()`` call (the
example fails if any call after the first compiles), the linears' bytes on the device, and the first
step's logits against the float model's (relative norm; with random weights the tokens themselves mean
nothing).
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
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

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


def sync_before_forward(model: nn.Module):
    """Ends XLA's lazy graph before each forward call of ``generate()`` (a forward pre-hook; returns its
    handle). Between two forward calls generate() selects the token, checks the stopping criteria and
    builds the next step's inputs (``cache_position``, the attention mask) with eager XLA ops it never
    syncs, so the compiled forward receives pending lazy tensors, and torch_xla's Dynamo bridge
    materializes them itself, but not the same way each time: on the call that traces a graph (the first
    call's prefill and first decode step) it syncs every live tensor, on later calls only the inputs. The
    two steps' bookkeeping graphs are cut differently, the second call does not find them in the cache,
    and compiles them (5 graphs for this model). Synced here, the bookkeeping is a graph of its own, cut
    at the same place on every call and every step: the second call compiles nothing."""
    return model.register_forward_pre_hook(lambda module, args: torch_xla.sync())


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


def compiled_generate(model: nn.Module, backend: str, ids: torch.Tensor, reference: torch.Tensor,
                      new_tokens: int) -> tuple[nn.Module, float, list, float]:
    """``model`` on the XLA device, compiled with ``backend`` and synced at each step; five ``generate()``
    calls (the first compiles, the second checks that nothing does, three timed). Returns the model on
    the device, ms per token (the median timed call), the compilations of each call, and the first step's
    logits error against ``reference`` (relative norm)."""
    device = torch_xla.device()
    model = model.to(device)
    model.forward = torch.compile(model.forward, backend=backend)
    sync_before_forward(model)
    ids = ids.to(device)
    compiles, seconds, first_logits = [], [], None
    for call in range(5):
        before = compilations()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, eos_token_id=None, do_sample=False,
                             cache_implementation="static", output_logits=True, return_dict_in_generate=True)
        torch_xla.sync()  # the last step's bookkeeping, which no forward call follows: else the next call's
        # first graph would carry it (here the float32 copy of the last logits, which out.logits keeps alive)
        assert out.sequences.cpu().shape[1] == ids.shape[1] + new_tokens  # waits for the device
        seconds.append(time.perf_counter() - start)
        compiles.append(compilations() - before)
        if first_logits is None:
            first_logits = out.logits[0].cpu().float()
    err = ((first_logits - reference).norm() / reference.norm()).item()
    ms = sorted(seconds[2:])[1] / new_tokens * 1e3
    return model, ms, compiles, err


def run(name: str, model: nn.Module, backend: str, ids: torch.Tensor, reference: torch.Tensor, new_tokens: int):
    model, ms, compiles, err = compiled_generate(model, backend, ids, reference, new_tokens)
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
    bad = {name: (err, compiles) for name, (err, compiles) in results.items() if not err < 0.1 or any(compiles[1:])}
    if bad:
        raise SystemExit(f"too far from the float model, or compiling after the first generate() call: {bad}")


if __name__ == "__main__":
    main()
