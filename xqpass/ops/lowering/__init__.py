"""The XLA lowerings of ``xq::quantized_matmul``: :mod:`.canonical` (TPU, GPU) and :mod:`.xla_cpu`, one
function a layout each, on the helpers and the one epilogue of :mod:`.common`."""
