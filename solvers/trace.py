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
    is_self_adjoint,
)

from ._common import check_alg, check_operator
from .auto import Auto
from .estimators import (
    Estimate,
    Hutchinson,
    HutchPP,
    XDiag,
    XTrace,
    hutchinson_diag,
    hutchinson_trace,
    hutchpp_trace,
    xdiag,
    xtrace,
)

__all__ = ["trace", "diag", "trace_rule", "diag_rule"]

_CHEAP_DIAG = (Dense, Diagonal, Identity, Kronecker, BlockDiag, LowRank, Permutation, Triangular)


def trace(A: LinearOperator, alg=None) -> torch.Tensor:
    """tr(A) = Σᵢ aᵢᵢ.

    Exact by structure (sums, scalars, Kronecker: Π tr(Aᵢ), BlockDiag, anything with a
    cheap diagonal). Otherwise ``Auto`` computes it exactly with n products (batched) —
    right for n up to some thousands — or pass ``alg=XTrace(samples)`` (the most accurate
    per product when a few eigenvalues dominate), ``alg=HutchPP(samples)`` or
    ``alg=Hutchinson(samples)`` for a stochastic estimate at ``samples`` products. An
    estimate carries its record, ``result.estimate`` (a :class:`solvers.estimators.Estimate`:
    standard error, products spent).

    Example:
        >>> import torch, linops
        >>> from solvers import trace, XTrace
        >>> U = torch.randn(400, 5, dtype=torch.float64) * torch.arange(1.0, 6.0)
        >>> A = linops.Dense(U) @ linops.Dense(U.T)   # a product: no cheap diagonal
        >>> t = trace(A, XTrace(samples=40, seed=0))   # rank 5 < 20 test vectors: exact
        >>> bool(abs(t - (U * U).sum()) < 1e-8), t.estimate.products
        (True, 40)
    """
    A = check_operator(A, "trace")
    return trace_rule(A, check_alg(alg, "trace"))


def diag(A: LinearOperator, alg=None) -> torch.Tensor:
    """The diagonal (aᵢᵢ) as a vector (n,).

    Exact by structure; otherwise exact with n products under ``Auto`` or estimated with
    ``alg=XDiag(samples)`` (self-adjoint A) or ``alg=Hutchinson(samples)``
    (E[z ⊙ A z] = diag(A) for Rademacher z); an estimate carries ``result.estimate``, whose
    ``std_error`` is per entry.
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
    """The estimate asked for, as a tensor carrying its record (``.estimate``), or None."""
    n, dt, dev = A.shape[0], A.dtype, A.device
    if what == "trace":
        kernels = {Hutchinson: hutchinson_trace, HutchPP: hutchpp_trace, XTrace: xtrace}
    else:
        kernels = {Hutchinson: hutchinson_diag, XDiag: xdiag}
    f = kernels.get(type(alg))
    if f is None:
        if isinstance(alg, (XDiag, HutchPP)) and what == "trace":
            raise TypeError(f"trace cannot run {type(alg).__name__} (a diagonal estimator); "
                            "use XTrace, HutchPP or Hutchinson.")
        if isinstance(alg, (XTrace, HutchPP)) and what == "diag":
            raise TypeError(f"diag cannot run {type(alg).__name__} (a trace estimator); use "
                            "XDiag or Hutchinson.")
        return None
    if isinstance(alg, XDiag) and not is_self_adjoint(A):
        raise ValueError("XDiag needs a self-adjoint operator (it uses Qᵀ A = (A Q)ᵀ): tag A "
                         "with linops.SelfAdjoint(A) or linops.PSD(A) if it is, or use "
                         "Hutchinson.")
    rec = f(A._matmat, n, dt, dev, alg)
    return _attach(rec.value.clone(), rec)


def _exact_record(value: torch.Tensor, alg) -> torch.Tensor:
    """An exact structural value; when an estimator was asked for, with a record saying so
    (standard error 0, no product)."""
    if isinstance(alg, (Hutchinson, HutchPP, XTrace, XDiag)):
        value = value.clone()
        _attach(value, Estimate(value.detach().clone(), torch.zeros_like(value), 0, 0, alg,
                                "exact: the operator's structure gives its diagonal"))
    return value


def _attach(value: torch.Tensor, rec: Estimate) -> torch.Tensor:
    value.estimate = rec
    return value


def _combine(parts, scale=None):
    """The record of a sum (or a scalar multiple) of estimates; exact parts count as 0 ± 0."""
    recs = [getattr(p, "estimate", None) for p in parts]
    if all(r is None for r in recs):
        return None
    err2, products, samples, alg = 0, 0, 0, None
    for p, r in zip(parts, recs):
        if r is not None:
            err2 = err2 + r.std_error.to(p.dtype) ** 2
            products, samples, alg = products + r.products, samples + r.samples, r.algorithm
    err = err2.sqrt() if scale is None else abs(scale) * err2.sqrt()
    return Estimate(None, err, products, samples, alg, "sum of estimates")


@dispatch
def trace_rule(A: LinearOperator, alg: object) -> torch.Tensor:
    """Generic trace: a cheap exact diagonal, the estimator asked for, else n products."""
    if isinstance(A, _CHEAP_DIAG):
        try:
            return _exact_record(A.diag().sum(), alg)
        except NotImplementedError:  # a part without a cheap diagonal
            pass
    est = _estimate(A, alg, "trace")
    if est is not None:
        return est
    if not isinstance(alg, Auto) and type(alg).__name__ not in ("Dense", "Eigh"):
        raise TypeError(f"trace cannot run {type(alg).__name__}: use Auto, Dense, "
                        "XTrace, HutchPP or Hutchinson.")
    return _exact_diag(A).sum()


@dispatch
def trace_rule(A: Sum, alg: object) -> torch.Tensor:  # noqa: F811
    parts = [trace_rule(t, alg) for t in A.terms]
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    rec = _combine(parts)
    if rec is not None:
        rec.value = out.detach().clone()
        _attach(out, rec)
    return out


@dispatch
def trace_rule(A: ScalarMul, alg: object) -> torch.Tensor:  # noqa: F811
    inner = trace_rule(A.op, alg)
    out = A.c * inner
    c = A.c.item() if isinstance(A.c, torch.Tensor) and A.c.numel() == 1 else A.c
    if isinstance(c, (int, float)) and getattr(inner, "estimate", None) is not None:
        rec = _combine([inner], scale=c)
        rec.value = out.detach().clone()
        _attach(out, rec)
    return out


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
            return _exact_record(A.diag(), alg)
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
        raise TypeError(f"diag cannot run {type(alg).__name__}: use Auto, Dense, XDiag or "
                        "Hutchinson.")
    return _exact_diag(A)
