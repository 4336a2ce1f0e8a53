"""Helpers shared by the test files: devices and dtypes to parametrize over, random float64
matrices with a chosen property (``Q diag(λ) Qᵀ``), dense references and small wrappers.

Import them as ``from _helpers import spd, DEVICE_PARAMS`` (tests/ is on ``sys.path``, as
for ``conformance``). Fixtures live in ``conftest.py``; everything with behaviour lives here.
Matrices are built on the CPU in float64 from their own seeded generator, so they do not
depend on (nor advance) torch's global random state.
"""

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from linops import Dense

F64 = torch.float64

# ------------------------------------------------------------------ devices and dtypes
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


# ------------------------------------------------------------------ random matrices
def randn(*shape, seed=1, device="cpu"):
    """A standard normal float64 tensor from its own generator (seeded), on ``device``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=F64, generator=g).to(device)


def spectrum_matrix(lam, seed=0):
    """Q diag(lam) Qᵀ with a random orthogonal Q (float64, CPU)."""
    g = torch.Generator().manual_seed(seed)
    n = len(lam)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    return (Q * torch.as_tensor(lam, dtype=F64)) @ Q.T


def spd(n, cond=10.0, seed=0):
    """Symmetric positive definite, eigenvalues spread log-uniformly over [1, cond]."""
    return spectrum_matrix(torch.logspace(0, np.log10(cond), n, dtype=F64), seed)


def symmetric(n, seed=0):
    """Symmetric with normal eigenvalues of standard deviation 3 (indefinite)."""
    g = torch.Generator().manual_seed(seed + 100)
    return spectrum_matrix(3 * torch.randn(n, dtype=F64, generator=g), seed)


def nonsymmetric(n, seed=0):
    """A random n×n matrix / √n + 2.5 I: nonsymmetric and well conditioned."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n, dtype=F64, generator=g) / n**0.5 + 2.5 * torch.eye(n, dtype=F64)


def random_dense(m=4, n=None, dtype=F64, device="cpu"):
    """A ``linops.Dense`` m×n (m×m when n is None) from torch's global random state."""
    return Dense(torch.randn(m, m if n is None else n, dtype=dtype, device=device))


# ------------------------------------------------------------------ references and wrappers
def wanted_eigenvalues(M, k, which):
    """The k wanted eigenvalues of a dense symmetric matrix (float64 ndarray), most wanted
    first: ``"LA"`` largest algebraic, ``"SA"`` smallest, ``"LM"`` largest magnitude."""
    ev = np.linalg.eigvalsh(M.cpu().to(F64).numpy())
    key = {"LA": -ev, "SA": ev, "LM": -np.abs(ev)}[which]
    return ev[np.argsort(key, kind="stable")][:k]


def matmat_of(A, dtype=F64, device="cpu"):
    """The function ``X -> A X`` of a dense matrix, in ``dtype`` on ``device``."""
    M = A.to(dtype=dtype, device=device)
    return lambda X: M @ X


def strict(op):
    """A copy of ``op`` that fails if multiplied or densified as a whole: proves that a
    structural rule worked on its parts."""

    def fail(self, *args):
        raise AssertionError(f"{type(op).__name__} was used as a whole, not by its structure")

    cls = type("Strict" + type(op).__name__, (type(op),),
               {"_matmat": fail, "_rmatmat": fail, "to_dense": fail})  # fmt: skip
    out = object.__new__(cls)
    out.__dict__.update(op.__dict__)
    return out


# ------------------------------------------------------------------ the peers' environment
REPO = Path(__file__).resolve().parents[1]
#: the Python of benchmarks/.envs/peers (BackPACK, curvlinops), made by setup_peers.sh
PEERS_PYTHON = REPO / "benchmarks" / ".envs" / "peers" / "bin" / "python"


def backpack_missing() -> str | None:
    """Why BackPACK cannot run here (a skip reason), or None when its environment works."""
    if not PEERS_PYTHON.exists():
        return (f"BackPACK's environment {PEERS_PYTHON.relative_to(REPO)} is not present "
                "(make it with: bash benchmarks/setup_peers.sh peers)")
    probe = subprocess.run([str(PEERS_PYTHON), "-c", "import backpack"], capture_output=True,
                           text=True, timeout=120)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"{PEERS_PYTHON.relative_to(REPO)} cannot import backpack ({last})"
    return None
