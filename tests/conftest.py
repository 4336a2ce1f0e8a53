"""Shared fixtures for the test suite: devices, dtypes, a fixed seed, one torch thread.

Fixtures only; helpers with behaviour and the parametrization lists live in ``_helpers.py``.
Use them as

    def test_something(device, dtype): ...        # parametrized fixtures

or, for explicit parametrization, ``pytest.mark.parametrize("device", DEVICE_PARAMS)`` with
``from _helpers import DEVICE_PARAMS``. CUDA cases are always collected and skipped cleanly
(with a reason) when no GPU is present.
"""

import pytest
import torch
from _helpers import DEVICE_PARAMS, DEVICES, DTYPE_PARAMS

# The suite runs as `pytest -n 2` on 2 cores: one thread per worker avoids oversubscription
# (small products ran ~100× slower with 2 threads per worker on a busy machine).
torch.set_num_threads(1)


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


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after it (tiny matrices: more threads only
    add contention on a shared machine). Use with ``pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
