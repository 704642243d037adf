"""``torch.ops.xq.quantized_matmul`` and ``torch.ops.xq.quantized_grouped_matmul`` (expert banks):
definitions, CPU reference, fake kernel and XLA lowering.

Importing this package registers the op and all its kernels. torch_xla itself is imported only when
an XLA tensor reaches the XLA kernel.
"""
from . import cpu as _cpu_kernel  # noqa: F401  (registers the "cpu" kernel)
from .xla import XlaCpuTuning, xla_lowering  # importing .xla registers the "xla" kernel
from .checks import MatmulSpec, check_inputs, compute_dtype, max_int32_reduction
from .quantized_matmul import quantized_matmul
from .reference import quantized_matmul_reference
from .grouped import GroupedSpec, check_grouped_inputs, quantized_grouped_matmul, quantized_grouped_matmul_reference
from .grouped_xla import GroupedTuning, grouped_tuning  # importing .grouped_xla registers the grouped op's "xla" kernel

__all__ = [
    "GroupedSpec",
    "GroupedTuning",
    "MatmulSpec",
    "XlaCpuTuning",
    "check_grouped_inputs",
    "check_inputs",
    "compute_dtype",
    "grouped_tuning",
    "max_int32_reduction",
    "quantized_grouped_matmul",
    "quantized_grouped_matmul_reference",
    "quantized_matmul",
    "quantized_matmul_reference",
    "xla_lowering",
]
