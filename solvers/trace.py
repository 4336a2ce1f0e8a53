"""``trace`` and ``diag``: exact where structure allows, estimated where asked."""

from __future__ import annotations

import torch

from linops import (
    BlockDiag,
    Dense,
    Diagonal,
    Identity,
    Kronecker,
    LinearOperator,
    LowRank,
    Permutation,
    ScalarMul,
    Sum,
    Triangular,
    dispatch,
)

from ._common import check_alg, check_operator
from .auto import Auto
from .estimators import Hutchinson, HutchPP, hutchinson_diag, hutchinson_trace, hutchpp_trace

__all__ = ["trace", "diag", "trace_rule", "diag_rule"]

_CHEAP_DIAG = (Dense, Diagonal, Identity, Kronecker, BlockDiag, LowRank, Permutation, Triangular)


def trace(A: LinearOperator, alg=None) -> torch.Tensor:
    """tr(A) = Σᵢ aᵢᵢ.

    Exact by structure (sums, scalars, Kronecker: Π tr(Aᵢ), BlockDiag, anything with a
    cheap diagonal). Otherwise ``Auto`` computes it exactly with n products (batched) —
    right for n up to some thousands — or pass ``alg=Hutchinson(samples)`` /
    ``alg=HutchPP(samples)`` for a stochastic estimate at ``samples`` products.
    """
    A = check_operator(A, "trace")
    return trace_rule(A, check_alg(alg, "trace"))


def diag(A: LinearOperator, alg=None) -> torch.Tensor:
    """The diagonal (aᵢᵢ) as a vector (n,).

    Exact by structure; otherwise exact with n products under ``Auto`` or estimated with
    ``alg=Hutchinson(samples)`` (E[z ⊙ A z] = diag(A) for Rademacher z).
    """
    A = check_operator(A, "diag")
    return diag_rule(A, check_alg(alg, "diag"))


def _exact_diag(A: LinearOperator, chunk: int = 256) -> torch.Tensor:
    n = A.shape[0]
    out = torch.empty(n, dtype=A.dtype, device=A.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        E = torch.zeros(n, stop - start, dtype=A.dtype, device=A.device)
        idx = torch.arange(start, stop, device=A.device)
        E[idx, idx - start] = 1
        out[start:stop] = A._matmat(E)[idx, idx - start]
    return out


def _estimate(A, alg, what):
    n, dt, dev = A.shape[0], A.dtype, A.device
    if isinstance(alg, Hutchinson):
        f = hutchinson_trace if what == "trace" else hutchinson_diag
        return f(A._matmat, n, dt, dev, alg)
    if isinstance(alg, HutchPP) and what == "trace":
        return hutchpp_trace(A._matmat, n, dt, dev, alg)
    return None


@dispatch
def trace_rule(A: LinearOperator, alg: object) -> torch.Tensor:
    """Generic trace: a cheap exact diagonal, the estimator asked for, else n products."""
    if isinstance(A, _CHEAP_DIAG):
        try:
            return A.diag().sum()
        except NotImplementedError:  # a part without a cheap diagonal
            pass
    est = _estimate(A, alg, "trace")
    if est is not None:
        return est
    if not isinstance(alg, Auto) and type(alg).__name__ not in ("Dense", "Eigh"):
        raise TypeError(f"trace cannot run {type(alg).__name__}: use Auto, Dense, "
                        "Hutchinson or HutchPP.")
    return _exact_diag(A).sum()


@dispatch
def trace_rule(A: Sum, alg: object) -> torch.Tensor:  # noqa: F811
    out = trace_rule(A.terms[0], alg)
    for t in A.terms[1:]:
        out = out + trace_rule(t, alg)
    return out


@dispatch
def trace_rule(A: ScalarMul, alg: object) -> torch.Tensor:  # noqa: F811
    return A.c * trace_rule(A.op, alg)


@dispatch
def trace_rule(A: Kronecker, alg: object) -> torch.Tensor:  # noqa: F811
    if not all(f.is_square() for f in A.factors):
        return diag_rule(A, alg).sum()
    out = trace_rule(A.factors[0], alg)
    for f in A.factors[1:]:
        out = out * trace_rule(f, alg)
    return out


@dispatch
def trace_rule(A: BlockDiag, alg: object) -> torch.Tensor:  # noqa: F811
    if not all(b.is_square() for b in A.blocks):
        return diag_rule(A, alg).sum()
    return torch.stack([trace_rule(b, alg) for b in A.blocks]).sum()


@dispatch
def diag_rule(A: LinearOperator, alg: object) -> torch.Tensor:
    """Generic diagonal: cheap structural diagonal, the estimator asked for, else exact."""
    if isinstance(A, _CHEAP_DIAG):
        try:
            return A.diag()
        except NotImplementedError:
            pass
    est = _estimate(A, alg, "diag")
    if est is not None:
        return est
    try:
        return A.diag()
    except NotImplementedError:
        pass
    if not isinstance(alg, Auto) and type(alg).__name__ not in ("Dense", "Eigh"):
        raise TypeError(f"diag cannot run {type(alg).__name__}: use Auto, Dense or Hutchinson.")
    return _exact_diag(A)
