"""Exact rules for ``linops.KroneckerEigen`` (``Q diag(λ) Qᵀ``, Q a Kronecker product of
orthogonal factors) and for shifted structured operators ``B + c·I`` (``BlockDiag`` of
``Kronecker`` blocks, as K-FAC is), which ``linops.kronecker_eigen.shift_structured``
rebuilds with their structure so that ``inv(K + λ·I_like(K))``, ``logdet``, ``sqrt`` and
every matrix function stay exact and cost a few small eigendecompositions; and for
``linops.Permuted`` (``Pᵀ A P``, K-FAC's joint weight-and-bias blocks), each rule on A."""

from __future__ import annotations

import torch

from linops import Kronecker, LinearOperator, Permuted, dispatch
from linops.kronecker_eigen import KroneckerEigen, shift_structured

from .eigen import EigResult, _select, eig_rule
from .inverse import inv_rule, pinv_rule
from .logdet import _pair, slogdet_rule
from .trace import trace_rule
from .unary import _finite, unary_rule

__all__ = ["shifted_structure"]


def shifted_structure(A) -> LinearOperator | None:
    """``A = B + c·I`` rebuilt by ``shift_structured``, or None (no shift, or no rule)."""
    from .eigen import _split_shift

    shift, rest = _split_shift(A)
    if shift is None or rest is None:
        return None
    return shift_structured(rest, shift)


@dispatch
def inv_rule(A: KroneckerEigen, alg: object) -> LinearOperator:  # noqa: F811
    lam = A.eigenvalues
    if not bool(torch.isfinite(lam).all()):
        raise ValueError("inv of an operator with NaN or infinite eigenvalues.")
    if not bool((lam != 0).all()):
        raise ValueError("inv of a singular operator (a zero eigenvalue): add damping "
                         "c·I_like(A) or use solvers.pinv(A).")
    return A.with_eigenvalues(1 / lam)


@dispatch
def pinv_rule(A: KroneckerEigen, alg: object) -> LinearOperator:  # noqa: F811
    lam = A.eigenvalues
    tol = lam.abs().max() * lam.shape[0] * torch.finfo(lam.dtype).eps
    nz = lam.abs() > tol
    return A.with_eigenvalues(torch.where(nz, 1 / torch.where(nz, lam, 1), 0))


@dispatch
def slogdet_rule(A: KroneckerEigen, alg: object) -> tuple:  # noqa: F811
    lam = A.eigenvalues
    return _pair(torch.sign(lam).prod(), lam.abs().log().sum(), A)


@dispatch
def trace_rule(A: KroneckerEigen, alg: object) -> torch.Tensor:  # noqa: F811
    return A.eigenvalues.sum()


@dispatch
def unary_rule(f: object, A: KroneckerEigen, alg: object) -> LinearOperator:  # noqa: F811
    return A.with_eigenvalues(_finite(f(A.eigenvalues), A.eigenvalues))


@dispatch
def unary_rule(f: object, A: Kronecker, alg: object) -> LinearOperator:  # noqa: F811
    K = shift_structured(A, 0.0)  # symmetric dense factors: f on the eigenvalues
    if K is None:
        return unary_rule.invoke(object, LinearOperator, object)(f, A, alg)
    return unary_rule(f, K, alg)


@dispatch
def eig_rule(A: KroneckerEigen, k: int, which: str, alg: object) -> EigResult:  # noqa: F811
    idx = _select(A.eigenvalues, k, which)
    sizes = [Q.shape[0] for Q in A.Qs]
    multi = torch.unravel_index(idx, sizes)
    cols = None
    for Q, j in zip(A.Qs, multi):
        part = Q[:, j]  # (nᵢ, k)
        cols = part if cols is None else (cols[:, None, :] * part[None, :, :]).reshape(
            -1, part.shape[1])
    return EigResult(A.eigenvalues[idx], cols)


# ---------------------------------------------------------------- Pᵀ A P (P orthogonal)
@dispatch
def inv_rule(A: Permuted, alg: object) -> LinearOperator:  # noqa: F811
    return A.with_op(inv_rule(A.op, alg))


@dispatch
def pinv_rule(A: Permuted, alg: object) -> LinearOperator:  # noqa: F811
    return A.with_op(pinv_rule(A.op, alg))


@dispatch
def slogdet_rule(A: Permuted, alg: object) -> tuple:  # noqa: F811
    return slogdet_rule(A.op, alg)


@dispatch
def trace_rule(A: Permuted, alg: object) -> torch.Tensor:  # noqa: F811
    return trace_rule(A.op, alg)


@dispatch
def unary_rule(f: object, A: Permuted, alg: object) -> LinearOperator:  # noqa: F811
    return A.with_op(unary_rule(f, A.op, alg))


@dispatch
def eig_rule(A: Permuted, k: int, which: str, alg: object) -> EigResult:  # noqa: F811
    res = eig_rule(A.op, k, which, alg)
    vals, vecs = res  # A v = λ v gives (Pᵀ A P)(Pᵀ v) = λ Pᵀ v
    return EigResult(vals, None if vecs is None else vecs[A.P._inverse], res.solution)
