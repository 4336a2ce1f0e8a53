"""Hutch++: a low-rank sketch taken exactly, Hutchinson on the rest."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import Estimate, check_samples, check_seed, generator, prepare, rademacher, std_error

__all__ = ["HutchPP", "hutchpp_trace"]


@dataclass(frozen=True)
class HutchPP:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021).

    With s products: ``m = s // 3`` Rademacher sketch vectors S, ``Q = orth(A S)``;
    ``tr(A) ≈ tr(Qᵀ A Q) + (1/g) Σᵢ gᵢᵀ A gᵢ`` with the ``g = s − 2m`` probes
    ``gᵢ = (I − Q Qᵀ) zᵢ``. The first term is exact on the range it captures, so the error
    is that of Hutchinson on A without its top ~m eigenvalues (``O(1/s)`` against
    ``O(1/√s)`` for spectra that decay). Standard error: the sample standard deviation of
    the g probe terms over √g (the sketched part counts as exact).

    Args:
        samples: products with A (≥ 4: one sketch vector, its image, two probes).
        seed: seed of the random vectors; ``None`` means 0.

    Cost: ``samples`` products.
    """

    samples: int = 99
    seed: int | None = 0

    def __post_init__(self):
        check_samples("HutchPP", self.samples, 4,
                      "a third sketches the range, A S and A Q, and two probes estimate the "
                      "rest with a standard error")
        check_seed("HutchPP", self.seed)


def hutchpp_trace(matmat, n, dtype, device, alg: HutchPP) -> Estimate:
    """Hutch++ trace estimate (see :class:`HutchPP`); an :class:`Estimate`."""
    matmat, work = prepare(matmat, dtype)
    gen = generator(alg.seed)
    m = alg.samples // 3
    S = rademacher(n, m, work, device, gen)
    G = rademacher(n, alg.samples - 2 * m, work, device, gen)
    Y = matmat(S).to(torch.float64)
    Q = torch.linalg.qr(Y).Q
    exact = (Q * matmat(Q.to(work)).to(torch.float64)).sum()
    G = G.to(torch.float64)
    G = G - Q @ (Q.mT @ G)
    terms = (G * matmat(G.to(work)).to(torch.float64)).sum(0)
    value = exact + terms.mean()
    return Estimate(value.to(dtype), std_error(terms).to(dtype), alg.samples, G.shape[1], alg,
                    f"Hutch++: a rank-{m} sketch taken exactly, {G.shape[1]} probes on the "
                    "rest.")
