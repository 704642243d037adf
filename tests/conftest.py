import os

os.environ.setdefault("PJRT_DEVICE", "CPU")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import xqpass  # noqa: E402,F401  (registers torch.ops.xq.quantized_matmul)

# tests/spmd needs SPMD mode and 4 devices: tests/test_sharding.py runs it in its own process
collect_ignore = [] if os.environ.get("XQPASS_SPMD_WORKER") else ["spmd"]

# "ci": bounded and derandomized so `make test` is repeatable and stays well under 20 minutes.
# "dev": more examples, random. Pick with HYPOTHESIS_PROFILE=dev.
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=40, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=300, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def xla_device():
    import torch_xla

    return torch_xla.device()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
