"""Spectral density by stochastic Lanczos quadrature (SLQ).

For a symmetric A (n × n) with eigenpairs (λₖ, uₖ), the spectral measure is
``μ = (1/n) Σₖ δ(λₖ)``. For a probe v with ``E[v vᵀ] = I``, ``μ_v = Σₖ (vᵀuₖ)²/‖v‖² δ(λₖ)``
is an unbiased (for Rademacher v, ‖v‖² = n) estimate of μ, and m Lanczos steps from v give
its m-point Gauss quadrature: the nodes are the Ritz values θⱼ of the tridiagonal T and the
weights the squared first components τⱼ² of its eigenvectors (Golub & Meurant; Lin, Saad &
Yang 2016; Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019 for network Hessians).
Averaging over probes gives the SLQ measure; smoothing it with a Gaussian gives a density.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from linops import LinearOperator, is_self_adjoint

from .._common import check_operator
from .._precision import in_working_precision
from ..result import NotConvergedWarning, Status

__all__ = ["SpectralDensity", "spectral_density"]


def _check_width(width) -> float:
    if isinstance(width, bool) or not isinstance(width, numbers.Real):
        raise TypeError(f"width must be a positive number, got {width!r}.")
    width = float(width)
    if not (math.isfinite(width) and width > 0):
        raise ValueError(
            f"width must be finite and > 0, got {width!r}: the Gaussian smoothing needs a "
            "positive standard deviation, e.g. width=0.01 * (λmax − λmin) (see "
            "SpectralDensity.suggested_width())."
        )
    return width


def _grid_tensor(grid) -> torch.Tensor:
    g = torch.as_tensor(grid, dtype=torch.float64).reshape(-1).cpu()
    if g.numel() == 0 or not bool(torch.isfinite(g).all()):
        raise ValueError("grid must be a non-empty tensor/array of finite points.")
    return g


def _gaussian_mix(points: torch.Tensor, nodes: torch.Tensor, weights: torch.Tensor,
                  width: float) -> torch.Tensor:
    out = torch.zeros_like(points)
    chunk = max(1, 2_000_000 // max(nodes.numel(), 1))
    c = 1.0 / (width * math.sqrt(2 * math.pi))
    for s in range(0, points.numel(), chunk):
        d = (points[s : s + chunk, None] - nodes[None, :]) / width
        out[s : s + chunk] = c * (torch.exp(-0.5 * d * d) @ weights)
    return out


@dataclass
class SpectralDensity:
    """The SLQ estimate of the spectral measure of a symmetric operator.

    Attributes:
        nodes: the quadrature nodes (Ritz values) of all probes, ``(K,)`` float64, sorted.
        weights: their weights, ``(K,)`` float64, summing to 1.
        probe_nodes, probe_weights: per probe, ``(p, m)`` (a probe's weights sum to 1;
            nodes past an early invariant subspace have weight 0).
        n: the size of the operator.
        num_probes, num_steps: the probes p and Lanczos steps m that ran.
        products: products with A spent (p·m columns, in m block products).
        status: ``Status.CONVERGED`` or ``Status.NONFINITE``; message: what happened.

    Example:
        >>> import torch, linops
        >>> A = linops.SelfAdjoint(linops.Dense(torch.diag(torch.arange(100.0))))
        >>> d = spectral_density(A, num_probes=4, num_steps=30, seed=0)
        >>> round(float(d.weights.sum()), 6), d.products
        (1.0, 120)
        >>> grid = torch.linspace(-10, 110, 7)
        >>> bool((d.density(grid, width=5.0) >= 0).all())
        True
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    probe_nodes: torch.Tensor
    probe_weights: torch.Tensor
    n: int
    num_probes: int
    num_steps: int
    products: int
    status: Status = Status.CONVERGED
    message: str = ""
    info: dict = field(default_factory=dict)

    # ------------------------------------------------------------ summaries
    @property
    def range(self) -> tuple[float, float]:
        """(smallest, largest) node: estimates of λmin and λmax (the extreme Ritz values
        converge first; they lie inside the spectrum)."""
        live = self.nodes[self.weights > 0]
        return float(live.min()), float(live.max())

    def mean(self) -> float:
        """``∫ λ dμ`` = tr(A)/n estimated (Hutchinson with the same probes)."""
        return float((self.nodes * self.weights).sum())

    def trace(self) -> float:
        """``n ∫ λ dμ``: the trace estimate the quadrature implies."""
        return self.n * self.mean()

    def suggested_width(self, fraction: float = 0.01) -> float:
        """``fraction`` of the estimated spectral range (a common smoothing choice)."""
        lo, hi = self.range
        return max(fraction * (hi - lo), 1e-12 * max(abs(lo), abs(hi), 1.0))

    def grid(self, num: int = 1000, width: float | None = None) -> torch.Tensor:
        """``num`` points covering the nodes with 4 widths of margin."""
        width = self.suggested_width() if width is None else _check_width(width)
        lo, hi = self.range
        return torch.linspace(lo - 4 * width, hi + 4 * width, num, dtype=torch.float64)

    # ------------------------------------------------------------ densities
    def density(self, grid, width: float) -> torch.Tensor:
        """``φ(t) = Σₖ wₖ N(t; θₖ, width²)``: the measure smoothed by a Gaussian of
        standard deviation ``width`` (> 0), at the points ``grid``; integrates to 1."""
        width = _check_width(width)
        return _gaussian_mix(_grid_tensor(grid), self.nodes, self.weights, width)

    def log_density(self, grid, width: float, sign: int = 1, floor: float = 0.0) -> torch.Tensor:
        """The log-spectrum variant for spectra spanning decades (as Papyan 2020 reads deep
        network spectra on logarithmic axes): the density of ``t = log10(sign·λ)`` over
        the eigenvalues with ``sign·λ > floor``, smoothed by a Gaussian of ``width``
        decades, at the points ``grid`` (in decades). It integrates to the fraction of
        eigenvalues on that side (the quadrature weight of nodes with ``sign·θ > floor``).
        """
        width = _check_width(width)
        if sign not in (1, -1):
            raise ValueError(f"sign must be 1 (positive eigenvalues) or -1, got {sign!r}.")
        if not (isinstance(floor, numbers.Real) and floor >= 0):
            raise ValueError(f"floor must be a number ≥ 0, got {floor!r}.")
        x = sign * self.nodes
        keep = (x > floor) & (self.weights > 0)
        return _gaussian_mix(_grid_tensor(grid), torch.log10(x[keep]), self.weights[keep],
                             width)

    def cdf(self, points) -> torch.Tensor:
        """The quadrature measure's distribution function ``μ((−∞, t])`` at ``points``."""
        t = _grid_tensor(points)
        return (self.weights[None, :] * (self.nodes[None, :] <= t[:, None])).sum(1)

    def __repr__(self) -> str:
        lo, hi = self.range
        return (f"SpectralDensity(n={self.n}, probes={self.num_probes}, steps={self.num_steps}, "
                f"range=[{lo:.4g}, {hi:.4g}], products={self.products}, "
                f"status={self.status.name})")


def spectral_density(
    A: LinearOperator,
    num_probes: int = 10,
    num_steps: int = 80,
    seed: int | None = 0,
    *,
    reorthogonalize: bool = False,
    on_failure: str = "warn",
) -> SpectralDensity:
    """The spectral density of a self-adjoint A by stochastic Lanczos quadrature.

    ``num_probes`` Rademacher probes (drawn on the CPU from ``seed``, so the same on every
    device) each run ``num_steps`` Lanczos steps; all probes share one batched run (one
    product with ``num_probes`` columns per step, ``solvers.lanczos.lanczos_probes``) and
    the ``num_probes`` tridiagonal eigenproblems are solved as one batched float64
    ``eigh``. The measure ``Σ wₖ δ(θₖ)`` this returns (``.nodes``, ``.weights``) is
    exact on polynomials of degree ``2·num_steps − 1`` for each probe's measure; its
    Wasserstein distance to the true spectral measure falls like ``1/num_steps`` plus the
    probes' sampling error ``O(1/√(n·num_probes))``.

    Args:
        A: self-adjoint operator (``linops.SelfAdjoint``/``PSD`` tags, or a Hessian/GGN).
        num_probes: probes p ≥ 1 (10 is typical).
        num_steps: Lanczos steps m ≥ 1 per probe (capped at n; 80 is typical).
        seed: seed of the probes (``None``: 0).
        reorthogonalize: full reorthogonalization of each probe's Lanczos basis (more work
            and ``p·m·n`` memory; not needed for the measure, see ``lanczos_probes``).
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` when NaN or infinity
            appears in the products.

    Cost: ``num_probes · num_steps`` products in ``num_steps`` block products, plus
    ``O(n·num_probes)`` work per step (no host synchronization inside the loop).

    Raises:
        ValueError: A is not self-adjoint, or num_probes / num_steps are not positive ints.
    """
    from ..lanczos import lanczos_probes
    from ..result import NotConvergedError, check_on_failure

    A = check_operator(A, "spectral_density")
    for name, v in (("num_probes", num_probes), ("num_steps", num_steps)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"spectral_density: {name} must be a positive int, got {v!r} "
                             "(for example num_probes=10, num_steps=80).")
    if not is_self_adjoint(A):
        raise ValueError(
            "spectral_density needs a self-adjoint operator (Lanczos quadrature of a "
            "symmetric matrix): tag A with linops.SelfAdjoint(A) or linops.PSD(A) if it is "
            "symmetric; curvature operators (Hessian, GGN, Fisher) already are."
        )
    if not isinstance(reorthogonalize, bool):
        raise TypeError("spectral_density: reorthogonalize must be True or False.")
    check_on_failure(on_failure)
    n = A.shape[0]
    p, m = int(num_probes), min(int(num_steps), n)
    g = torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))
    matmat, work = in_working_precision(A._matmat, A.dtype)  # half precision: float32
    Z = (2 * torch.randint(0, 2, (n, p), generator=g) - 1).to(dtype=work, device=A.device)
    alphas, betas, lengths = lanczos_probes(matmat, Z, m, reorthogonalize=reorthogonalize)
    T = torch.diag_embed(alphas.mT)
    if m > 1:
        T = T + torch.diag_embed(betas.mT, 1) + torch.diag_embed(betas.mT, -1)
    finite = bool(torch.isfinite(T).all())
    status, message = Status.CONVERGED, (
        f"SLQ: {p} Rademacher probes × {m} Lanczos steps ({p * m} products).")
    if finite:
        theta, S = torch.linalg.eigh(T.cpu())
        # weights: squared first components; a probe's sum to 1 up to rounding (and are 0
        # on the decoupled part after an early invariant subspace)
        w = S[:, 0, :] ** 2
        w = w / w.sum(1, keepdim=True)
    else:
        theta = torch.full((p, m), float("nan"), dtype=torch.float64)
        w = torch.full((p, m), 0.0, dtype=torch.float64)
        status = Status.NONFINITE
        message = ("SLQ: NaN or infinity appeared in the products of A; check the operator "
                   "(overflow, invalid values) or try float64.")
    flat_nodes = theta.reshape(-1)
    flat_w = w.reshape(-1) / p
    order = torch.argsort(flat_nodes)
    dens = SpectralDensity(
        nodes=flat_nodes[order], weights=flat_w[order], probe_nodes=theta, probe_weights=w,
        n=n, num_probes=p, num_steps=m, products=p * m, status=status, message=message,
        info=dict(lengths=lengths.cpu(), reorthogonalize=reorthogonalize),
    )
    if status is not Status.CONVERGED and on_failure != "ignore":
        if on_failure == "raise":
            raise NotConvergedError(message)
        warnings.warn(message, NotConvergedWarning, stacklevel=2)
    return dens


def wasserstein1(nodes, weights, values, value_weights=None) -> float:
    """W₁ between two discrete measures on the line (``∫ |F₁ − F₂|``); helper for tests
    and benchmarks (``value_weights`` default: uniform)."""
    x = np.asarray(torch.as_tensor(nodes, dtype=torch.float64).cpu())
    wx = np.asarray(torch.as_tensor(weights, dtype=torch.float64).cpu())
    y = np.asarray(torch.as_tensor(values, dtype=torch.float64).cpu()).reshape(-1)
    wy = (np.full(y.shape, 1.0 / y.size) if value_weights is None
          else np.asarray(torch.as_tensor(value_weights, dtype=torch.float64).cpu()))
    pts = np.concatenate([x, y])
    order = np.argsort(pts, kind="stable")
    pts = pts[order]
    mass = np.concatenate([wx / wx.sum(), -wy / wy.sum()])[order]
    F = np.cumsum(mass)[:-1]
    return float(np.sum(np.abs(F) * np.diff(pts)))
