"""XTrace and XDiag: exchangeable trace and diagonal estimators (Epperly, Tropp & Webber,
"XTrace: making the most of every sample in stochastic trace estimation", SIMAX 2024).

Both spend s products on ``m = s/2`` test vectors Ω: ``Y = A Ω`` (a sketch of the range)
and ``Z = A Q`` with ``Q R = Y``. For each i, the sketch without column i,
``Qᵢ = orth(A Ω₋ᵢ)``, is taken exactly and the i-th test vector estimates the rest; the
estimate is the mean of the m leave-one-out estimates, so every test vector serves both as
sketch and as probe. ``Qᵢ Qᵢᵀ = Q Qᵀ − uᵢ uᵢᵀ`` with ``uᵢ = Q sᵢ``, ``sᵢ`` the
normalized i-th column of ``R⁻ᵀ`` (the direction of span(Y) orthogonal to the other
columns), so all m estimates come from Y and Z at ``O(n m²)`` work. Their sample standard
deviation over √m is the standard error the record reports (the paper's error estimate).

When Y is numerically rank-deficient (A has rank below m), span(Q) holds A's range, the
sketch alone is the trace (diagonal) up to rounding, and the leave-one-out correction is
dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._common import (
    Estimate,
    check_samples,
    check_seed,
    generator,
    prepare,
    rademacher,
    sphere,
    std_error,
)

__all__ = ["XTrace", "XDiag", "xtrace", "xdiag"]

F64 = torch.float64


@dataclass(frozen=True)
class XTrace:
    """XTrace (Epperly, Tropp & Webber 2024): the exchangeable Hutch++.

    ``tr(A) ≈ (1/m) Σᵢ [tr(Qᵢᵀ A Qᵢ) + ω̂ᵢᵀ (I − QᵢQᵢᵀ) A (I − QᵢQᵢᵀ) ω̂ᵢ]`` with
    ``m = samples/2`` test vectors uniform on the sphere of radius √n and ω̂ᵢ the
    normalized residual ``(I − QᵢQᵢᵀ)ωᵢ`` scaled to length √(n − m + 1) (the paper's
    "improved" variant). Works for any square A; most accurate when a few eigenvalues
    dominate (network curvature): on the reference problems it beats Hutch++ at the same
    budget. See :mod:`solvers.estimators.xtrace` for the algebra.

    Args:
        samples: products with A, even, ≥ 4 (two per test vector); at most 2n.
        seed: seed of the test vectors (drawn on the CPU); ``None`` means 0.

    Cost: ``samples`` products, ``O(n·samples²)`` work, memory for ``3·samples/2``
    vectors of size n in float64.

    Example:
        >>> import torch, linops
        >>> from solvers import trace
        >>> g = torch.Generator().manual_seed(0)
        >>> U = torch.randn(500, 30, dtype=torch.float64, generator=g) * 0.8 ** torch.arange(30)
        >>> A = linops.PSD(linops.Dense(U) @ linops.Dense(U.T))  # no cheap diagonal
        >>> est = trace(A, XTrace(samples=20, seed=0))
        >>> exact = float((U * U).sum())
        >>> bool(abs(float(est) - exact) < 3 * float(est.estimate.std_error) + 1e-3 * exact)
        True
        >>> est.estimate.products
        20
    """

    samples: int = 100
    seed: int | None = 0

    def __post_init__(self):
        check_samples("XTrace", self.samples, 4,
                      "two test vectors, each multiplied twice, for a leave-one-out estimate",
                      even=True)
        check_seed("XTrace", self.seed)


@dataclass(frozen=True)
class XDiag:
    """XDiag (Epperly, Tropp & Webber 2024): the exchangeable diagonal estimator.

    ``diag(A) ≈ (1/m) Σᵢ [diag(QᵢQᵢᵀ A) + ωᵢ ⊙ (I − QᵢQᵢᵀ) A ωᵢ]`` with ``m = samples/2``
    Rademacher test vectors. Needs a self-adjoint A (it uses ``Qᵀ A = (A Q)ᵀ``). The
    record's standard error is per entry.

    Args:
        samples: products with A, even, ≥ 4; at most 2n.
        seed: seed of the test vectors; ``None`` means 0.

    Cost: ``samples`` products, ``O(n·samples²)`` work.

    Example:
        >>> import torch, linops
        >>> from solvers import diag
        >>> U = torch.randn(300, 3, dtype=torch.float64)
        >>> d = diag(linops.PSD(linops.Dense(U) @ linops.Dense(U.T)), XDiag(samples=10))
        >>> bool(torch.allclose(d, (U * U).sum(1)))   # rank 3 < 5 test vectors: exact
        True
    """

    samples: int = 100
    seed: int | None = 0

    def __post_init__(self):
        check_samples("XDiag", self.samples, 4,
                      "two test vectors, each multiplied twice, for a leave-one-out estimate",
                      even=True)
        check_seed("XDiag", self.seed)


def _check_size(owner: str, m: int, n: int):
    if m > n:
        raise ValueError(
            f"{owner}: samples/2 = {m} test vectors exceed the size n = {n}; the exact trace "
            f"(diagonal) costs only n = {n} products: call trace(A) / diag(A) without alg, "
            f"or use samples ≤ {2 * n}."
        )


def _sketch(matmat, n, dtype, device, m, Om):
    """``(Y, Q, R, Z, S or None, products)`` of the shared sketch, in float64."""
    matmat, work = prepare(matmat, dtype)
    Y = matmat(Om.to(work)).to(F64)
    Q, R = torch.linalg.qr(Y)
    Z = matmat(Q.to(work)).to(F64)
    sv = torch.linalg.svdvals(R)
    eps = torch.finfo(dtype).eps
    deficient = bool(sv[-1] <= 100 * eps * math.sqrt(m) * sv[0]) or not bool(sv[0] > 0)
    S = None
    if not deficient:
        eye = torch.eye(m, dtype=F64, device=R.device)
        Rinv_T = torch.linalg.solve_triangular(R.mT, eye, upper=False)  # R⁻ᵀ
        S = Rinv_T / torch.linalg.vector_norm(Rinv_T, dim=0)
    return Y, Q, Z, S


def xtrace(matmat, n, dtype, device, alg: XTrace) -> Estimate:
    """The XTrace estimate of tr(A) (see :class:`XTrace`); an :class:`Estimate`."""
    m = alg.samples // 2
    _check_size("XTrace", m, n)
    Om = sphere(n, m, F64, device, generator(alg.seed))
    Y, Q, Z, S = _sketch(matmat, n, dtype, device, m, Om)
    H = Q.mT @ Z
    W = Q.mT @ Om  # (m, m): wᵢ = Qᵀ ωᵢ
    if S is None:
        Rv = Om - Q @ W
        ARv = Y - Z @ W
        terms = H.trace() + (Rv * ARv).sum(0)
        how = "the sketch spans A's numerical range (rank below samples/2): exact up to rounding"
    else:
        c = (S * W).sum(0)  # cᵢ = sᵢᵀ wᵢ
        Rv = Om - Q @ W + (Q @ S) * c  # residuals (I − QᵢQᵢᵀ) ωᵢ
        ARv = Y - Z @ W + (Z @ S) * c  # A times them, from Y and Z
        norm2 = (Rv * Rv).sum(0).clamp_min(torch.finfo(F64).tiny)
        scale = (n - m + 1) / norm2
        terms = H.trace() - (S * (H @ S)).sum(0) + scale * (Rv * ARv).sum(0)
        how = f"{m} leave-one-out estimates"
    value, err = terms.mean(), std_error(terms)
    return Estimate(value.to(dtype), err.to(dtype), 2 * m, m, alg, f"XTrace: {how}.")


def xdiag(matmat, n, dtype, device, alg: XDiag) -> Estimate:
    """The XDiag estimate of diag(A) for a self-adjoint A (see :class:`XDiag`)."""
    m = alg.samples // 2
    _check_size("XDiag", m, n)
    Om = rademacher(n, m, F64, device, generator(alg.seed))
    Y, Q, Z, S = _sketch(matmat, n, dtype, device, m, Om)
    T = Z.mT @ Om  # Qᵀ A Ω
    base = (Q * Z).sum(1, keepdim=True)  # diag(Q Qᵀ A)
    if S is None:
        D = base + Om * (Y - Q @ T)
        how = "the sketch spans A's numerical range (rank below samples/2): exact up to rounding"
    else:
        QS, ZS = Q @ S, Z @ S
        ct = (S * T).sum(0)  # sᵢᵀ Tᵢ
        D = base - QS * ZS + Om * (Y - Q @ T + QS * ct)
        how = f"{m} leave-one-out estimates per entry"
    value, err = D.mean(1), std_error(D, dim=1)
    return Estimate(value.to(dtype), err.to(dtype), 2 * m, m, alg, f"XDiag: {how}.")
