"""Shared fixtures for the test suite: devices, dtypes and a fixed seed.

Fixtures only; no helpers with behaviour. Use them as

    def test_something(device, dtype): ...        # parametrized fixtures

or, for explicit parametrization, ``pytest.mark.parametrize("device", DEVICE_PARAMS)``.
CUDA cases are always collected and skipped cleanly (with a reason) when no GPU is present.
"""

import pytest
import torch

# The suite runs as `pytest -n 2` on 2 cores: one thread per worker avoids oversubscription
# (small products ran ~100× slower with 2 threads per worker on a busy machine).
torch.set_num_threads(1)

#: "cpu", plus "cuda" when a GPU is present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

#: devices for ``pytest.mark.parametrize``: CUDA is always listed and skips without a GPU.
DEVICE_PARAMS = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]

#: the floating dtypes every operator supports.
FLOAT_DTYPES = [torch.float32, torch.float64]
DTYPE_PARAMS = [pytest.param(dt, id=str(dt).removeprefix("torch.")) for dt in FLOAT_DTYPES]


@pytest.fixture(params=DEVICE_PARAMS)
def device(request) -> str:
    """Each device: "cpu", and "cuda" (skipped without a GPU)."""
    return request.param


@pytest.fixture(params=DTYPE_PARAMS)
def dtype(request) -> torch.dtype:
    """Each floating dtype: float32 and float64."""
    return request.param


@pytest.fixture
def devices() -> list[str]:
    """The devices present on this machine ("cpu", plus "cuda" when available)."""
    return list(DEVICES)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    torch.manual_seed(0)
