"""The one result record of every algorithm: ``Solution``, ``Status`` and ``report``.

Every kernel in ``solvers`` (CG, MINRES, GMRES, Lanczos, power iteration, LOBPCG and the
dense methods) returns a :class:`Solution`. Not converging is never silent: the status is
in the record, and :func:`report` turns it into a :class:`NotConvergedWarning` (the
default), a :class:`NotConvergedError` (``on_failure="raise"``) or nothing
(``on_failure="ignore"``, for callers that read ``sol.status`` themselves).

Example:
    >>> import torch
    >>> from solvers.cg import CG, cg
    >>> A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    >>> sol = cg(lambda X: A @ X, torch.ones(3, 1, dtype=torch.float64), CG(tol=1e-8))
    >>> sol.converged, sol.status.name, sol.iterations
    (True, 'CONVERGED', 3)
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Status",
    "Solution",
    "NotConvergedError",
    "NotConvergedWarning",
    "report",
    "ON_FAILURE",
]

#: the accepted values of every algorithm's ``on_failure``
ON_FAILURE = ("warn", "raise", "ignore")


class Status(enum.Enum):
    """How an algorithm ended.

    - ``CONVERGED``: the stopping rule of the algorithm holds.
    - ``MAX_ITERS``: ``max_iters`` iterations ran and the stopping rule does not hold.
    - ``NEGATIVE_CURVATURE``: CG met ``pᵀ A p ≤ 0``: A is not positive definite.
    - ``BREAKDOWN``: the method cannot continue and the answer is not exact (a Krylov
      breakdown that is not a lucky exact solution, a preconditioner that is not positive
      definite, a failed Cholesky factorization, a singular matrix).
    - ``NONFINITE``: a NaN or an infinity in the input, in a product or in the output.
    """

    CONVERGED = "converged"
    MAX_ITERS = "max_iters"
    NEGATIVE_CURVATURE = "negative_curvature"
    BREAKDOWN = "breakdown"
    NONFINITE = "nonfinite"


@dataclass
class Solution:
    """The record an algorithm leaves.

    Attributes:
        value: the solution ``X`` (same shape as the right-hand side) for a solver; the
            pair ``(eigenvalues (k,), eigenvectors (n, k))`` for an eigen-solver.
        status: a :class:`Status`.
        iterations: the number of iterations that ran (for Krylov solvers, the number of
            products with A, not counting the one that forms the initial residual).
        residuals: the convergence history, a float64 CPU tensor. Linear solvers: shape
            ``(iterations + 1, k)``, the relative residual ``‖b − A x‖ / ‖b‖`` of each
            column (the absolute residual for a zero column of b). Eigen-solvers: shape
            ``(iterations + 1, k)``, the relative eigen-residual ``‖A v − θ v‖ / |θ|`` of
            each wanted pair (NaN where it was not evaluated).
        algorithm: the configuration object that ran (``CG(...)``, ``Lanczos(...)``, ...).
        message: what happened and, unless converged, what to try.
        info: algorithm-specific extras (per-column iteration counts, the column that met
            negative curvature, the number of products, ...).
    """

    value: Any
    status: Status
    iterations: int
    residuals: torch.Tensor
    algorithm: Any
    message: str
    info: dict = field(default_factory=dict)
    _reported: bool = field(default=False, repr=False, compare=False)

    @property
    def converged(self) -> bool:
        """``True`` when ``status`` is ``Status.CONVERGED``."""
        return self.status is Status.CONVERGED

    def __repr__(self) -> str:
        return (
            f"Solution(status={self.status.name}, iterations={self.iterations}, "
            f"algorithm={self.algorithm!r}, message={self.message!r})"
        )


class NotConvergedError(RuntimeError):
    """Raised by :func:`report` with ``on_failure="raise"``; ``.solution`` holds the record."""

    def __init__(self, message: str, solution: Solution | None = None):
        super().__init__(message)
        self.solution = solution


class NotConvergedWarning(RuntimeWarning):
    """Warned by :func:`report` with ``on_failure="warn"`` (the default of every algorithm)."""


def check_on_failure(on_failure: str, owner: str = "on_failure") -> str:
    """Validate an ``on_failure`` value; return it."""
    if not isinstance(on_failure, str) or on_failure not in ON_FAILURE:
        raise ValueError(
            f"{owner} must be one of {ON_FAILURE} ('warn': warn and return the last iterate; "
            f"'raise': raise NotConvergedError; 'ignore': only set the status); "
            f"got {on_failure!r}."
        )
    return on_failure


def _user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` called by our caller that points at the
    first frame outside linops, solvers and torch: the user's line that asked for it."""
    import os
    import sys

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo/site dir
    inside = (os.path.join(here, "solvers"), os.path.join(here, "linops"),
              os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def report(sol: Solution, on_failure: str = "warn", stacklevel: int | None = None) -> Solution:
    """Make a failed ``sol`` loud, according to ``on_failure``; return ``sol``.

    Nothing happens when ``sol`` converged, when ``on_failure == "ignore"``, or when
    ``sol`` was already reported (every kernel reports its own result, so a caller that
    reports it again does not warn twice).

    Args:
        sol: the record.
        on_failure: ``"warn"`` (a :class:`NotConvergedWarning` with ``sol.message``),
            ``"raise"`` (a :class:`NotConvergedError`) or ``"ignore"``.
        stacklevel: passed to ``warnings.warn``; by default the warning points at the
            first caller outside linops and solvers.
    """
    check_on_failure(on_failure)
    if sol.converged or on_failure == "ignore" or sol._reported:
        return sol
    sol._reported = True
    if on_failure == "raise":
        raise NotConvergedError(sol.message, sol)
    if stacklevel is None:
        stacklevel = _user_stacklevel()
    warnings.warn(sol.message, NotConvergedWarning, stacklevel=stacklevel)
    return sol
