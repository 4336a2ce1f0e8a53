"""What every stochastic estimator shares: the :class:`Estimate` record, config checks and
the random test vectors (drawn on the CPU from a seeded generator, so a seed gives the same
probes on every device and every rank)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from .._precision import in_working_precision

__all__ = ["Estimate", "check_samples", "check_seed", "rademacher", "generator", "prepare"]


@dataclass
class Estimate:
    """The record of a stochastic trace or diagonal estimate.

    Attributes:
        value: the estimate: 0-dim for a trace, ``(n,)`` for a diagonal.
        std_error: the estimator's own estimate of its standard error, same shape as
            ``value`` (the sample standard deviation of its exchangeable or independent
            terms over √(number of terms)); 0 where the estimate is exact.
        products: the products with A spent (columns of A X counted one each).
        samples: the number of random test vectors behind the stochastic part.
        algorithm: the configuration that ran.
        message: what was computed, and how far to trust it.
    """

    value: torch.Tensor
    std_error: torch.Tensor
    products: int
    samples: int
    algorithm: Any
    message: str = ""

    def __repr__(self) -> str:
        if self.value.ndim == 0:
            what = f"{float(self.value):.6g} ± {float(self.std_error):.2g}"
        else:
            what = f"diagonal of {self.value.shape[0]}, mean std error " \
                   f"{float(self.std_error.mean()):.2g}"
        return (f"Estimate({what}, products={self.products}, "
                f"algorithm={self.algorithm!r})")


def check_samples(owner: str, samples, minimum: int, why: str, even: bool = False) -> int:
    """``samples``: an int ≥ ``minimum`` (and even if ``even``); the error says ``why``."""
    if isinstance(samples, bool) or not isinstance(samples, numbers.Integral):
        raise TypeError(f"{owner}: samples must be an int (the number of products), got "
                        f"{samples!r}.")
    if samples < minimum:
        raise ValueError(f"{owner}: samples={samples} is below the {minimum} products this "
                         f"estimator needs ({why}); for example samples=100.")
    if even and samples % 2:
        raise ValueError(f"{owner}: samples={samples} must be even (each test vector costs "
                         f"two products, A Ω and A Q); for example samples={samples + 1}.")
    return int(samples)


def check_seed(owner: str, seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"{owner}: seed must be an int or None, got {seed!r}.")


def generator(seed) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(0 if seed is None else int(seed))
    return g


def rademacher(n: int, k: int, dtype, device, gen) -> torch.Tensor:
    """An ``(n, k)`` matrix of independent ±1 (drawn on the CPU)."""
    z = torch.randint(0, 2, (n, k), generator=gen, device="cpu").to(device=device, dtype=dtype)
    return 2 * z - 1


def sphere(n: int, k: int, dtype, device, gen) -> torch.Tensor:
    """``(n, k)`` columns uniform on the sphere of radius √n (drawn on the CPU, float64)."""
    G = torch.randn(n, k, dtype=torch.float64, generator=gen)
    G = G * (math.sqrt(n) / torch.linalg.vector_norm(G, dim=0))
    return G.to(device=device, dtype=dtype)


def prepare(matmat, dtype):
    """``(matmat, work)``: products in the operator's dtype, estimates in ``work`` (float32
    for half precision, else the dtype)."""
    return in_working_precision(matmat, dtype)


def std_error(terms: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sample standard deviation of ``terms`` along ``dim`` over √count (0 for one term)."""
    m = terms.shape[dim]
    if m < 2:
        return torch.zeros_like(terms.select(dim, 0))
    return terms.std(dim=dim) / math.sqrt(m)
