"""Preconditioners for CG: operators that approximate A⁻¹.

Any ``LinearOperator`` P ≈ A⁻¹ can be passed as ``CG(preconditioner=P)``. These build one:

* ``jacobi(A)``: diag(A)⁻¹ (exact diagonal where structure allows, else n products or a
  Hutchinson estimate);
* ``nystrom(A, rank, mu)``: randomized Nyström approximation Â = U Λ Uᵀ of rank r from r
  products (Frangella, Tropp, Udell 2023), and
  P = (λ_r + μ) U (Λ + μI)⁻¹ Uᵀ + (I − U Uᵀ) for A + μI;
* ``pivoted_cholesky(A, rank, mu)``: a rank-r pivoted partial Cholesky L Lᵀ ≈ A from r
  columns and the diagonal (Harbrecht et al. 2012; Gardner et al. 2018), and
  P = (L Lᵀ + μI)⁻¹ by Woodbury.
"""

from __future__ import annotations

import torch

from linops import Diagonal, Identity, LinearOperator, LowRank, is_psd

from .trace import diag as _diag

__all__ = ["jacobi", "nystrom", "pivoted_cholesky"]


def _check(A, name):
    if not isinstance(A, LinearOperator) or not A.is_square():
        raise TypeError(f"{name} takes a square LinearOperator.")


def jacobi(A: LinearOperator, alg=None, eps: float = 0.0) -> Diagonal:
    """diag(A)⁻¹ as a ``Diagonal``. ``alg`` is passed to ``solvers.diag`` (e.g.
    ``Hutchinson(samples)`` for an operator without a cheap diagonal). Entries with
    |aᵢᵢ| ≤ eps are replaced by 1 (no scaling)."""
    _check(A, "jacobi")
    d = _diag(A, alg)
    safe = torch.where(d.abs() > eps, d, torch.ones_like(d))
    out = Diagonal(1 / safe)
    if is_psd(A):
        out._tags = frozenset({"self_adjoint", "psd"})
    return out


def nystrom(A: LinearOperator, rank: int, mu: float = 0.0, seed: int = 0) -> LinearOperator:
    """Nyström preconditioner for A + μI from ``rank`` products with A (A must be PSD).

    Â = U Λ Uᵀ ≈ A from a Gaussian sketch; returns
    P = (λ_r + μ) U (Λ + μI)⁻¹ Uᵀ + (I − U Uᵀ).
    """
    _check(A, "nystrom")
    if not is_psd(A):
        raise ValueError("nystrom needs a PSD operator (tag it with linops.PSD).")
    n = A.shape[0]
    if not isinstance(rank, int) or not 1 <= rank <= n:
        raise ValueError(f"nystrom: rank must be an int in [1, {n}], got {rank!r}.")
    g = torch.Generator().manual_seed(seed)
    Om = torch.randn(n, rank, generator=g, dtype=torch.float64).to(A.dtype).to(A.device)
    Om, _ = torch.linalg.qr(Om)
    Y = A._matmat(Om)
    nu = torch.finfo(A.dtype).eps * torch.linalg.matrix_norm(Y)
    Y = Y + nu * Om
    C = torch.linalg.cholesky(Om.mT @ Y)
    B = torch.linalg.solve_triangular(C, Y.mT, upper=False).mT
    U, S, _ = torch.linalg.svd(B, full_matrices=False)
    lam = (S**2 - nu).clamp_min(0)
    lam_r = lam[-1]
    coeff = (lam_r + mu) / (lam + mu) - 1  # P = I + U diag(coeff) Uᵀ
    eye = Identity(n, A.dtype, A.device)
    out = eye + LowRank(U, torch.diag(coeff), U)
    out._tags = frozenset({"self_adjoint", "psd"})
    return out


def pivoted_cholesky(A: LinearOperator, rank: int, mu: float = 1e-3,
                     tol: float = 0.0) -> LinearOperator:
    """(L Lᵀ + μI)⁻¹ from a rank-r pivoted partial Cholesky L of a PSD A.

    Needs diag(A) (exact by structure or n products) and one column of A per rank step;
    stops early when the trace of the residual diagonal falls below tol·tr(A).
    """
    from .inverse import inv

    _check(A, "pivoted_cholesky")
    if not is_psd(A):
        raise ValueError("pivoted_cholesky needs a PSD operator (tag it with linops.PSD).")
    n = A.shape[0]
    if not isinstance(rank, int) or not 1 <= rank <= n:
        raise ValueError(f"pivoted_cholesky: rank must be an int in [1, {n}], got {rank!r}.")
    if mu <= 0:
        raise ValueError("pivoted_cholesky: mu must be > 0 (P = (L Lᵀ + μI)⁻¹).")
    d = _diag(A).clone()
    total = d.sum()
    L = torch.zeros(n, rank, dtype=A.dtype, device=A.device)
    m = 0
    for m in range(rank):
        i = int(torch.argmax(d))
        if bool(d[i] <= 0) or bool(d.sum() <= tol * total):
            break
        e = torch.zeros(n, 1, dtype=A.dtype, device=A.device)
        e[i] = 1
        col = A._matmat(e)[:, 0] - L[:, :m] @ L[i, :m]
        L[:, m] = col / torch.sqrt(d[i])
        d = (d - L[:, m] ** 2).clamp_min(0)
        d[i] = 0
    else:
        m = rank
    L = L[:, : max(m, 1)]
    approx = mu * Identity(n, A.dtype, A.device) + LowRank(L)
    return inv(approx)
