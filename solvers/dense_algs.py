"""Direct methods on the materialized matrix: ``Cholesky``, ``Eigh``, ``Dense``.

For operators small enough to store (``Auto`` uses them below its ``dense_threshold``).
The kernels return the same :class:`~solvers.result.Solution` record as the iterative
ones; a failed factorization is a status (with a warning by default), not garbage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._krylov_utils import KeywordCheck, check_real, col_norm, fmt, prepare_rhs
from .result import Solution, Status, check_on_failure, report

__all__ = [
    "Cholesky",
    "Eigh",
    "Dense",
    "dense_solve",
    "dense_eigh",
    "dense_slogdet",
    "dense_apply_unary",
    "select_eigen",
    "check_dense_dtype",
    "residual_limit",
]

_WHICH = ("LA", "SA", "LM")


@dataclass(frozen=True)
class Cholesky(KeywordCheck):
    """Cholesky factorization ``A = L Lᵀ`` for a symmetric positive definite A.

    Cost ``n³/3`` flops after ``n`` products to materialize A. If A is not positive
    definite the solve falls back to LU and the record says ``Status.BREAKDOWN``.

    Args:
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` when a solve fails.
        tol: the largest relative residual ``‖b − A x‖/‖b‖`` a solve is accepted with
            (``None``: √eps of the dtype, 3.5e-4 in float32 and 1.5e-8 in float64); above
            it the record says ``Status.BREAKDOWN`` (A too ill-conditioned for the dtype,
            or singular), checked like the iterative solvers' residuals.

    Example:
        >>> import torch
        >>> from solvers.dense_algs import Cholesky, dense_solve
        >>> dense_solve(torch.tensor([[4.0, 2.0], [2.0, 3.0]]), torch.ones(2), Cholesky()).value
        tensor([0.1250, 0.2500])
    """

    on_failure: str = "warn"
    tol: float | None = None

    def __post_init__(self):
        _not_a_matrix(self.on_failure, "Cholesky")
        check_on_failure(self.on_failure, "Cholesky: on_failure")
        if self.tol is not None:
            check_real("Cholesky", "tol", self.tol, positive=True, example="1e-4")


@dataclass(frozen=True)
class Eigh(KeywordCheck):
    """Symmetric eigendecomposition ``A = Q Λ Qᵀ`` (``torch.linalg.eigh``), ``~9n³`` flops.

    Solves as ``x = Q Λ⁻¹ Qᵀ b``; gives all eigenpairs and matrix functions ``Q f(Λ) Qᵀ``.
    A is assumed symmetric (its lower triangle is read).

    Args:
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` when a solve fails.
        tol: the largest relative residual ``‖b − A x‖/‖b‖`` a solve is accepted with
            (``None``: √eps of the dtype, 3.5e-4 in float32 and 1.5e-8 in float64); above
            it the record says ``Status.BREAKDOWN`` (A too ill-conditioned for the dtype,
            or singular), checked like the iterative solvers' residuals.

    Example:
        >>> import torch
        >>> from solvers.dense_algs import Eigh, dense_eigh
        >>> dense_eigh(torch.diag(torch.tensor([1.0, 3.0, 2.0])), Eigh(), k=1).value[0]
        tensor([3.])
    """

    on_failure: str = "warn"
    tol: float | None = None

    def __post_init__(self):
        _not_a_matrix(self.on_failure, "Eigh")
        check_on_failure(self.on_failure, "Eigh: on_failure")
        if self.tol is not None:
            check_real("Eigh", "tol", self.tol, positive=True, example="1e-4")


@dataclass(frozen=True)
class Dense(KeywordCheck):
    """General dense methods: LU (``torch.linalg.solve``), ``torch.linalg.eig``, slogdet.

    For any square A, symmetric or not; ``2n³/3`` flops for a solve.

    Args:
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` when a solve fails.
        tol: the largest relative residual ``‖b − A x‖/‖b‖`` a solve is accepted with
            (``None``: √eps of the dtype, 3.5e-4 in float32 and 1.5e-8 in float64); above
            it the record says ``Status.BREAKDOWN`` (A too ill-conditioned for the dtype,
            or singular), checked like the iterative solvers' residuals.

    Example:
        >>> import torch
        >>> from solvers.dense_algs import Dense, dense_solve
        >>> dense_solve(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1.0, 2.0]),
        ...             Dense()).value
        tensor([2., 1.])
    """

    on_failure: str = "warn"
    tol: float | None = None

    def __post_init__(self):
        _not_a_matrix(self.on_failure, "Dense")
        check_on_failure(self.on_failure, "Dense: on_failure")
        if self.tol is not None:
            check_real("Dense", "tol", self.tol, positive=True, example="1e-4")


def _not_a_matrix(value, name: str) -> None:
    if isinstance(value, torch.Tensor):
        raise TypeError(
            f"solvers.{name} is an algorithm configuration, not an operator: for the operator "
            "of a matrix M use linops.Dense(M) (after `from solvers import *` the name Dense "
            "is the algorithm)."
        )


def _check_matrix(A: torch.Tensor, fname: str):
    if not isinstance(A, torch.Tensor) or A.ndim != 2 or A.shape[0] != A.shape[1]:
        shape = tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__
        raise ValueError(f"{fname} takes a square matrix (n, n), got {shape}.")


#: dtypes torch.linalg factorizes (LU, Cholesky, eigh) on every device
_LINALG_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)


def check_dense_dtype(dtype: torch.dtype, fname: str) -> None:
    """Raise a ``TypeError`` naming the fix when torch.linalg cannot factorize ``dtype``."""
    if dtype not in _LINALG_DTYPES:
        raise TypeError(
            f"{fname}: the dense methods (LU, Cholesky, eigh) need float32 or float64 (or "
            f"complex64/128), but A has dtype {dtype}, which torch.linalg does not "
            "factorize. Convert the operator with A.to(torch.float32) (and back with "
            f".to({dtype}) afterwards), or use an iterative method."
        )


def residual_limit(dtype: torch.dtype, tol: float | None = None) -> float:
    """The largest relative residual ‖b − A x‖/‖b‖ a direct solve passes: ``tol``, or by
    default √eps of the dtype (3.5e-4 in float32, 1.5e-8 in float64). A backward-stable
    solve leaves about eps·cond(A): above √eps, A is too ill-conditioned for the dtype
    (cond ≳ 1/√eps), and near 1, numerically singular."""
    return torch.finfo(dtype).eps ** 0.5 if tol is None else tol


def singular_message(name: str, residual: float, dtype: torch.dtype, tol=None) -> str:
    wider = "" if dtype in (torch.float64, torch.complex128) else ", float64"
    limit = f"√eps = {fmt(residual_limit(dtype))}" if tol is None else f"tol={tol}"
    return (
        f"{name}: the direct solve left a relative residual ‖b − A x‖/‖b‖ = {fmt(residual)} "
        f"> {limit}: A is too ill-conditioned for {dtype}, or numerically singular when the "
        "residual is near 1 (then x is not a solution and may be huge). Add damping "
        f"(A + λI), use solvers.pinv(A) for a least-squares solution{wider}, or accept it "
        f"with {name}(tol=...)."
    )


def _check_alg(alg, allowed, fname: str):
    if not isinstance(alg, allowed):
        names = ", ".join(c.__name__ for c in allowed)
        raise TypeError(f"{fname} takes one of {names}, got {type(alg).__name__}.")


def select_eigen(vals: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices of the ``k`` wanted entries of real ``vals``, most wanted first.

    ``"LA"``: largest algebraic first; ``"SA"``: smallest algebraic first; ``"LM"``:
    largest magnitude first.
    """
    if which not in _WHICH:
        raise ValueError(
            f"which must be 'LA' (largest algebraic), 'SA' (smallest algebraic) or 'LM' "
            f"(largest magnitude); got {which!r}."
        )
    key = {"LA": vals, "SA": -vals, "LM": vals.abs()}[which]
    return torch.argsort(key, descending=True, stable=True)[:k]


def dense_solve(A: torch.Tensor, B: torch.Tensor, alg, *, on_failure=None) -> Solution:
    """Solve ``A X = B`` with a dense factorization chosen by ``alg``.

    ``Cholesky``: ``cholesky_ex`` then ``cholesky_solve``; a failed factorization (A not
    positive definite) falls back to LU with ``Status.BREAKDOWN``. ``Dense``: LU with
    partial pivoting; an exactly singular A gives ``Status.BREAKDOWN``. ``Eigh``:
    ``Q Λ⁻¹ Qᵀ B``; a zero eigenvalue gives ``Status.NONFINITE``. Non-finite input or
    output gives ``Status.NONFINITE``. Like the iterative solvers, the result is checked:
    a relative residual ``‖b − A x‖/‖b‖`` above ``√eps`` of the dtype (A numerically
    singular) gives ``Status.BREAKDOWN``. float16 and bfloat16 raise a ``TypeError``
    (torch.linalg does not factorize them).

    Args:
        A: the matrix (n, n).
        B: right-hand sides (n, k) or (n,).
        alg: ``Cholesky()``, ``Dense()`` or ``Eigh()``.

    Returns:
        A :class:`~solvers.result.Solution` (``iterations = 0``, ``residuals`` of shape
        ``(1, k)``: the relative residual of the result).
    """
    _check_matrix(A, "dense_solve")
    _check_alg(alg, (Cholesky, Dense, Eigh), "dense_solve")
    on_failure = alg.on_failure if on_failure is None else check_on_failure(on_failure)
    B2, vector = prepare_rhs(B)
    if A.shape[0] != B2.shape[0] or A.dtype != B2.dtype or A.device != B2.device:
        raise ValueError(
            f"A is {tuple(A.shape)} ({A.dtype}, {A.device}) but B is {tuple(B.shape)} "
            f"({B.dtype}, {B.device}); B needs {A.shape[0]} rows and A's dtype and device."
        )
    check_dense_dtype(A.dtype, "dense_solve")
    name = type(alg).__name__
    status, message = Status.CONVERGED, f"{name}: solved directly."
    if not bool(torch.isfinite(A).all() & torch.isfinite(B2).all()):
        X = torch.full_like(B2, float("nan"))
        status = Status.NONFINITE
        message = f"{name}: A or B holds NaN or infinity; nothing was solved."
    elif isinstance(alg, Cholesky):
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            X = torch.cholesky_solve(B2, L)
        else:
            X = torch.linalg.solve(A, B2)
            status = Status.BREAKDOWN
            message = (
                f"Cholesky failed at column {int(info)}: A is not positive definite. The "
                "system was solved with LU instead; use Dense() for a general A, or add "
                "damping (A + λI) if A should be positive definite."
            )
    elif isinstance(alg, Dense):
        X, info = torch.linalg.solve_ex(A, B2)
        if int(info) != 0:
            status = Status.BREAKDOWN
            message = (
                f"Dense (LU) found a zero pivot at column {int(info)}: A is singular. Use "
                "pinv for a least-squares solution, or add damping (A + λI)."
            )
    else:
        lam, Q = torch.linalg.eigh(A)
        X = Q @ ((Q.mT @ B2) / lam[:, None])
    res = col_norm(B2 - A @ X) / torch.where(col_norm(B2) > 0, col_norm(B2), 1)
    residuals = res[None].to(device="cpu", dtype=torch.float64)
    if status is Status.CONVERGED and not bool(torch.isfinite(X).all()):
        status = Status.NONFINITE
        message = (
            f"{name}: the solution holds NaN or infinity (relative residual "
            f"{fmt(float(residuals.max()))}): A is singular or too ill-conditioned for "
            f"{A.dtype}. Try float64, damping (A + λI) or pinv."
        )
    elif status is Status.CONVERGED and not float(residuals.max()) <= residual_limit(
        A.dtype, alg.tol
    ):
        status = Status.BREAKDOWN
        message = singular_message(name, float(residuals.max()), A.dtype, alg.tol)
    value = X[:, 0] if vector else X
    sol = Solution(value, status, 0, residuals, alg, message)
    return report(sol, on_failure)


def dense_eigh(
    A: torch.Tensor, alg=None, k: int | None = None, which: str = "LA", *, on_failure=None
) -> Solution:
    """The ``k`` wanted eigenpairs of a symmetric matrix by ``torch.linalg.eigh``.

    Args:
        A: symmetric matrix (n, n) (assumed, not checked).
        alg: ``Eigh()`` (default) or ``Dense()``.
        k: how many pairs (``None``: all n).
        which: ``"LA"``, ``"SA"`` or ``"LM"``; the pairs come most wanted first.

    Returns:
        A :class:`~solvers.result.Solution` with ``value = (eigenvalues (k,),
        eigenvectors (n, k))``; ``Status.NONFINITE`` if A holds NaN or infinity.
    """
    _check_matrix(A, "dense_eigh")
    alg = Eigh() if alg is None else alg
    _check_alg(alg, (Eigh, Dense), "dense_eigh")
    on_failure = alg.on_failure if on_failure is None else check_on_failure(on_failure)
    n = A.shape[0]
    k = n if k is None else k
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"dense_eigh: k must be an int in [1, {n}], got {k!r}.")
    check_dense_dtype(A.dtype, "dense_eigh")
    if not bool(torch.isfinite(A).all()):
        vals = torch.full((k,), float("nan"), dtype=A.dtype, device=A.device)
        vecs = torch.full((n, k), float("nan"), dtype=A.dtype, device=A.device)
        status, message = Status.NONFINITE, "dense_eigh: A holds NaN or infinity."
    else:
        lam, Q = torch.linalg.eigh(A)
        idx = select_eigen(lam, k, which)
        vals, vecs = lam[idx], Q[:, idx]
        status, message = Status.CONVERGED, f"{type(alg).__name__}: eigendecomposition."
    residuals = torch.zeros((1, k), dtype=torch.float64)
    sol = Solution((vals, vecs), status, 0, residuals, alg, message)
    return report(sol, on_failure)


def dense_slogdet(A: torch.Tensor, alg=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sign, log|det A|)`` by Cholesky (``2 Σ log Lᵢᵢ``), eigh (``Σ log|λ|``) or LU.

    ``Cholesky`` falls back to LU when A is not positive definite.
    """
    _check_matrix(A, "dense_slogdet")
    alg = Dense() if alg is None else alg
    _check_alg(alg, (Cholesky, Dense, Eigh), "dense_slogdet")
    check_dense_dtype(A.dtype, "dense_slogdet")
    if isinstance(alg, Cholesky):
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            return torch.ones((), dtype=A.dtype, device=A.device), 2 * L.diagonal().log().sum()
    if isinstance(alg, Eigh):
        lam = torch.linalg.eigvalsh(A)
        sign = torch.where((lam < 0).sum() % 2 == 1, -1.0, 1.0).to(A.dtype)
        sign = torch.where((lam == 0).any(), torch.zeros_like(sign), sign)
        return sign, lam.abs().log().sum()
    return torch.linalg.slogdet(A)


def dense_apply_unary(A: torch.Tensor, fn, alg=None) -> torch.Tensor:
    """``f(A) = Q f(Λ) Qᵀ`` for a symmetric matrix, ``fn`` acting on the eigenvalues."""
    _check_matrix(A, "dense_apply_unary")
    alg = Eigh() if alg is None else alg
    _check_alg(alg, (Eigh, Dense), "dense_apply_unary")
    check_dense_dtype(A.dtype, "dense_apply_unary")
    lam, Q = torch.linalg.eigh(A)
    return (Q * fn(lam)) @ Q.mT
