"""xqpass: int8 / int4 quantized matmul for PyTorch on XLA.

``import xqpass`` registers ``torch.ops.xq.quantized_matmul`` (CPU reference, fake kernel, XLA
lowering). torch_xla is imported only when an XLA tensor reaches the op.
"""
from . import ops  # noqa: F401  (registers torch.ops.xq.quantized_matmul)
from .nn import QuantizeReport, XlaQuantizedLinear, quantize_model
from .experts import XlaQuantizedExperts, XlaQuantizedGatedExperts, quantize_expert_bank
from .quant import QuantizedWeight, dequantize, pack_int4, quantize_per_token, quantize_weight, unpack_int4
from .rewrite import Missed, RewriteReport, Rewritten, rewrite
from . import backend  # noqa: E402,F401  (registers the xq_openxla and xq_eager backends)
from .explain import ExplainReport, explain  # noqa: E402
from .checkpoints import CheckpointReport, load_quantized_checkpoint  # noqa: E402
from .sharding import ShardingReport, shard_model  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CheckpointReport",
    "load_quantized_checkpoint",
    "ExplainReport",
    "explain",
    "Missed",
    "QuantizeReport",
    "QuantizedWeight",
    "RewriteReport",
    "ShardingReport",
    "Rewritten",
    "XlaQuantizedExperts",
    "XlaQuantizedGatedExperts",
    "XlaQuantizedLinear",
    "dequantize",
    "pack_int4",
    "quantize_expert_bank",
    "quantize_model",
    "quantize_per_token",
    "quantize_weight",
    "rewrite",
    "shard_model",
    "unpack_int4",
]
