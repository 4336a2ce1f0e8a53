"""``Kronecker``: A₁ ⊗ A₂ ⊗ … ⊗ A_d, never materialized."""

from __future__ import annotations

import math

import torch

from .dense import Dense
from .operator import LinearOperator

__all__ = ["Kronecker"]


class Kronecker(LinearOperator):
    """The Kronecker product A₁ ⊗ … ⊗ A_d of any number of operators (or matrices).

    A product costs one product with each factor over a reshaped input,
    Σᵢ cost(Aᵢ)·(n/nᵢ) instead of n²; the full matrix is never formed. Row-major
    (``torch.kron``) ordering: (A ⊗ B) vec(X) = vec(A X Bᵀ) with X of shape (n_A, n_B).

    Example:
        >>> K = Kronecker(torch.eye(2), 2 * torch.eye(3))
        >>> K.shape
        (6, 6)
    """

    _precedence = 1

    def __init__(self, *factors):
        if len(factors) == 1 and isinstance(factors[0], (list, tuple)):
            factors = tuple(factors[0])
        if len(factors) < 1:
            raise ValueError("Kronecker needs at least one factor.")
        factors = tuple(Dense(f) if isinstance(f, torch.Tensor) else f for f in factors)
        for f in factors:
            if not isinstance(f, LinearOperator):
                raise TypeError(
                    f"Kronecker factors are LinearOperators or tensors, got {type(f).__name__}."
                )
            factors[0]._check_compatible(f, "⊗")
        m = math.prod(f.shape[0] for f in factors)
        n = math.prod(f.shape[1] for f in factors)
        super().__init__(factors[0].dtype, (m, n), factors[0].device)
        self.factors = factors

    def _children(self):
        return self.factors

    def _apply(self, X, transpose: bool):
        if len(self.factors) == 2 and all(isinstance(f, Dense) for f in self.factors):
            F0, F1 = (f.M.mH if transpose else f.M for f in self.factors)
            return _two_dense(F0, F1, X)
        k = X.shape[1]
        dims_in = [f.shape[0] if transpose else f.shape[1] for f in self.factors]
        T = X.reshape(*dims_in, k)
        for i, f in enumerate(self.factors):
            T = T.movedim(i, 0)
            rest = T.shape[1:]
            M = T.reshape(T.shape[0], -1)
            M = f._rmatmat(M) if transpose else f._matmat(M)
            T = M.reshape(M.shape[0], *rest).movedim(0, i)
        return T.reshape(-1, k)

    def _matmat(self, X):
        return self._apply(X, transpose=False)

    def _rmatmat(self, Y):
        return self._apply(Y, transpose=True)

    def _transpose(self):
        return Kronecker(*(f.T for f in self.factors))

    def _adjoint(self):
        return Kronecker(*(f.H for f in self.factors))

    def _to(self, dtype, device):
        return Kronecker(*(f.to(dtype=dtype, device=device) for f in self.factors))

    def _diag(self):
        if any(not f.is_square() for f in self.factors):
            raise NotImplementedError(
                "diag() of a Kronecker product with non-square factors: use "
                "A.to_dense().diagonal()."
            )
        out = self.factors[0].diag()
        for f in self.factors[1:]:
            out = torch.outer(out, f.diag()).reshape(-1)
        return out

    def to_dense(self):
        out = self.factors[0].to_dense()
        for f in self.factors[1:]:
            b = f.to_dense()
            out = (out[:, None, :, None] * b[None, :, None, :]).reshape(
                out.shape[0] * b.shape[0], out.shape[1] * b.shape[1]
            )
        return out

    def _repr(self):
        return " ⊗ ".join(f._repr_wrapped(2) for f in self.factors)


def _two_dense(F0: torch.Tensor, F1: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``(F0 ⊗ F1) X`` for two matrices: each column is ``vec(F0 V F1ᵀ)`` with ``V`` the
    column as ``(n0, n1)``, two GEMMs over all columns at once, in the cheaper order (the
    K-FAC preconditioners' and optimizers' hot path: the generic loop's transposing copies
    and per-factor dispatch cost as much as its GEMMs on 200 × 200 factors)."""
    (m0, n0), (m1, n1) = F0.shape, F1.shape
    k = X.shape[1]
    if k == 1:
        V = X.reshape(n0, n1)
        if m0 * n1 * (n0 + m1) <= m1 * n0 * (n1 + m0):  # (F0 V) F1ᵀ
            return ((F0 @ V) @ F1.mT).reshape(-1, 1)
        return (F0 @ (V @ F1.mT)).reshape(-1, 1)
    # columns: (n0, n1, k) → F1 along n1 as one GEMM over (n0·k, n1), then F0 over n0
    T = X.reshape(n0, n1, k).transpose(1, 2) @ F1.mT  # (n0, k, m1)
    T = (F0 @ T.reshape(n0, k * m1)).reshape(m0, k, m1)
    return T.transpose(1, 2).reshape(m0 * m1, k)
