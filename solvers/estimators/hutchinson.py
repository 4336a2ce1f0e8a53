"""Stochastic trace and diagonal estimators: ``Hutchinson``, ``HutchPP``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Hutchinson", "HutchPP", "hutchinson_trace", "hutchpp_trace", "hutchinson_diag"]


def _check(samples, seed, name):
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"{name}: samples must be a positive int, got {samples!r}.")
    if seed is not None and not isinstance(seed, int):
        raise TypeError(f"{name}: seed must be an int or None.")


@dataclass(frozen=True)
class Hutchinson:
    """Hutchinson's estimator with Rademacher probes z: tr(A) ≈ mean zᵀ A z,
    diag(A) ≈ mean z ⊙ A z. Unbiased; variance 2‖A‖_F² − 2Σ aᵢᵢ² per probe for the trace.
    Cost: ``samples`` products (done as one batched product of ``batch`` columns at a time).
    """

    samples: int = 100
    batch: int = 32
    seed: int | None = 0

    def __post_init__(self):
        _check(self.samples, self.seed, "Hutchinson")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError("Hutchinson: batch must be a positive int.")


@dataclass(frozen=True)
class HutchPP:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): a rank-s/3 sketch Q of A's range takes
    tr(QᵀAQ) exactly and Hutchinson estimates the rest, tr((I−QQᵀ)A(I−QQᵀ)) with s/3
    probes. Cost: ``samples`` products in total. Needs a self-adjoint A."""

    samples: int = 99
    seed: int | None = 0

    def __post_init__(self):
        _check(self.samples, self.seed, "HutchPP")
        if self.samples < 3:
            raise ValueError("HutchPP: samples must be ≥ 3 (a third sketches the range).")


def _rademacher(n, k, dtype, device, gen):
    z = torch.randint(0, 2, (n, k), generator=gen, device="cpu").to(device=device, dtype=dtype)
    return 2 * z - 1


def _generator(seed):
    g = torch.Generator(device="cpu")
    g.manual_seed(0 if seed is None else seed)
    return g


def hutchinson_trace(matmat, n, dtype, device, alg: Hutchinson) -> torch.Tensor:
    """tr(A) ≈ (1/s) Σ zᵢᵀ A zᵢ (see ``Hutchinson``)."""
    gen, total, done = _generator(alg.seed), torch.zeros((), dtype=dtype, device=device), 0
    while done < alg.samples:
        b = min(alg.batch, alg.samples - done)
        Z = _rademacher(n, b, dtype, device, gen)
        total = total + (Z * matmat(Z)).sum()
        done += b
    return total / alg.samples


def hutchinson_diag(matmat, n, dtype, device, alg: Hutchinson) -> torch.Tensor:
    """diag(A) ≈ (1/s) Σ zᵢ ⊙ A zᵢ (see ``Hutchinson``)."""
    gen, total, done = _generator(alg.seed), torch.zeros(n, dtype=dtype, device=device), 0
    while done < alg.samples:
        b = min(alg.batch, alg.samples - done)
        Z = _rademacher(n, b, dtype, device, gen)
        total = total + (Z * matmat(Z)).sum(dim=1)
        done += b
    return total / alg.samples


def hutchpp_trace(matmat, n, dtype, device, alg: HutchPP) -> torch.Tensor:
    """Hutch++ trace estimate (see ``HutchPP``)."""
    gen = _generator(alg.seed)
    m = alg.samples // 3
    S = _rademacher(n, m, dtype, device, gen)
    G = _rademacher(n, alg.samples - 2 * m, dtype, device, gen)
    Q, _ = torch.linalg.qr(matmat(S))
    exact = (Q * matmat(Q)).sum()
    G = G - Q @ (Q.mT @ G)
    rest = (G * matmat(G)).sum() / G.shape[1]
    return exact + rest
