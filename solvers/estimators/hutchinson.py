"""Hutchinson's estimator of the trace and of the diagonal."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import Estimate, check_samples, check_seed, generator, prepare, rademacher

__all__ = ["Hutchinson", "hutchinson_trace", "hutchinson_diag"]


@dataclass(frozen=True)
class Hutchinson:
    """Hutchinson's estimator with Rademacher probes z (Hutchinson 1989):
    ``tr(A) ≈ (1/s) Σᵢ zᵢᵀ A zᵢ``, ``diag(A) ≈ (1/s) Σᵢ zᵢ ⊙ A zᵢ``.

    Unbiased; the variance of one probe's trace term is ``2‖A‖_F² − 2Σ aᵢᵢ²``, so the
    error falls like ``1/√s`` whatever the spectrum (prefer ``XTrace`` or ``HutchPP``
    when a few eigenvalues dominate, as in network curvature). The record's standard error
    is the sample standard deviation of the s terms over √s.

    Args:
        samples: products with A, one per probe (≥ 2, for a standard error).
        batch: probes multiplied at once (columns per product call).
        seed: seed of the probes (drawn on the CPU); ``None`` means 0.

    Cost: ``samples`` products.

    Example:
        >>> import torch, linops
        >>> from solvers import trace
        >>> D = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
        >>> est = trace(linops.Dense(D) @ linops.Dense(D), Hutchinson(samples=10))
        >>> float(est), float(est.estimate.std_error), est.estimate.products
        (14.0, 0.0, 10)
    """

    samples: int = 100
    batch: int = 32
    seed: int | None = 0

    def __post_init__(self):
        check_samples("Hutchinson", self.samples, 2, "two probes for a standard error")
        check_seed("Hutchinson", self.seed)
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"Hutchinson: batch must be a positive int, got {self.batch!r}.")


def _probe_sums(matmat, n, dtype, device, alg, diag: bool):
    """Running sums of the probe terms and of their squares (``(n,)`` or 0-dim each)."""
    matmat, work = prepare(matmat, dtype)
    acc = torch.float64 if torch.device(device).type != "mps" else work
    gen, done = generator(alg.seed), 0
    s1 = s2 = None
    while done < alg.samples:
        b = min(alg.batch, alg.samples - done)
        Z = rademacher(n, b, work, device, gen)
        T = (Z * matmat(Z)).to(acc)
        if not diag:
            T = T.sum(0, keepdim=True)
        s1 = T.sum(1) if s1 is None else s1 + T.sum(1)
        s2 = (T * T).sum(1) if s2 is None else s2 + (T * T).sum(1)
        done += b
    s = alg.samples
    mean = s1 / s
    var = ((s2 - s * mean * mean) / (s - 1)).clamp_min(0)
    err = (var / s).sqrt()
    if not diag:
        mean, err = mean[0], err[0]
    return mean.to(dtype), err.to(dtype)


def hutchinson_trace(matmat, n, dtype, device, alg: Hutchinson) -> Estimate:
    """tr(A) ≈ (1/s) Σ zᵢᵀ A zᵢ (see :class:`Hutchinson`); an :class:`Estimate`."""
    value, err = _probe_sums(matmat, n, dtype, device, alg, diag=False)
    return Estimate(value, err, alg.samples, alg.samples, alg,
                    f"Hutchinson trace from {alg.samples} Rademacher probes.")


def hutchinson_diag(matmat, n, dtype, device, alg: Hutchinson) -> Estimate:
    """diag(A) ≈ (1/s) Σ zᵢ ⊙ A zᵢ (see :class:`Hutchinson`); an :class:`Estimate` with
    one standard error per entry."""
    value, err = _probe_sums(matmat, n, dtype, device, alg, diag=True)
    return Estimate(value, err, alg.samples, alg.samples, alg,
                    f"Hutchinson diagonal from {alg.samples} Rademacher probes.")
