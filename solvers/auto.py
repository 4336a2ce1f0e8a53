"""``Auto``: picks an algorithm from the operator's size, structure and properties."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from linops import LinearOperator, is_psd, is_self_adjoint

from ._krylov_utils import KeywordCheck

__all__ = ["Auto"]

_TASKS = ("solve", "eig", "function", "trace")


@dataclass(frozen=True)
class Auto(KeywordCheck):
    """Choose the algorithm for the operator at hand.

    Structural rules (Diagonal, Kronecker, BlockDiag, ...) always come first and are exact.
    For what is left, with n the operator's size:

    * solves: n ≤ ``dense_threshold`` → ``Cholesky`` if A is tagged PSD, else ``Dense``;
      larger → ``CG`` if PSD, ``MINRES`` if self-adjoint, ``GMRES`` otherwise;
    * eigenvalues and matrix functions: n ≤ ``dense_threshold`` → ``Eigh`` (self-adjoint)
      or ``Dense``; larger → ``Lanczos`` (self-adjoint only);
    * trace and diagonal: exact (n products, batched); ask for ``Hutchinson``/``HutchPP``
      explicitly for an estimate (see ``solvers.trace``).

    Dense solves are checked too: a relative residual above √eps of the dtype is reported
    (``Status.BREAKDOWN``); ``tol`` is the iterative algorithms' stopping rule, a dense one
    takes its own (``alg=solvers.Dense(tol=...)``).

    The iterative algorithms get ``tol``, ``atol``, ``max_iters`` and, for solves,
    ``preconditioner``; other keyword arguments go in ``options`` and are passed to the
    chosen algorithm, which rejects those it does not take (``TypeError``). ``select``
    tells which algorithm was picked; the record of every solve names it too.

    Example:
        >>> import torch, linops
        >>> A = linops.PSD(linops.Diagonal(torch.ones(5000)))
        >>> alg = Auto(tol=1e-3, max_iters=20).select(A, "solve")
        >>> type(alg).__name__, alg.tol, alg.max_iters
        ('CG', 0.001, 20)
    """

    tol: float = 1e-6
    atol: float = 0.0
    max_iters: int | None = None
    preconditioner: object = None
    dense_threshold: int = 1000
    on_failure: str = "warn"
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("tol", "atol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"Auto: {name} must be a finite number ≥ 0, got {v!r}.")
        if isinstance(self.max_iters, bool):
            raise TypeError("Auto: max_iters must be a positive int or None, not a bool.")
        if not isinstance(self.tol, (int, float)) or self.tol < 0:
            raise ValueError(f"Auto: tol must be a number ≥ 0, got {self.tol!r}.")
        if not isinstance(self.atol, (int, float)) or self.atol < 0:
            raise ValueError(f"Auto: atol must be a number ≥ 0, got {self.atol!r}.")
        if self.max_iters is not None and (
            not isinstance(self.max_iters, int) or self.max_iters < 1
        ):
            raise ValueError(f"Auto: max_iters must be a positive int or None, got "
                             f"{self.max_iters!r}.")
        if not isinstance(self.dense_threshold, int) or self.dense_threshold < 0:
            raise ValueError("Auto: dense_threshold must be an int ≥ 0.")
        if self.on_failure not in ("warn", "raise", "ignore"):
            raise ValueError("Auto: on_failure must be 'warn', 'raise' or 'ignore'.")
        if not isinstance(self.options, dict):
            raise TypeError("Auto: options must be a dict of keyword arguments.")

    def select(self, A: LinearOperator, task: str = "solve"):
        """The algorithm config ``Auto`` runs for ``task`` on the (unstructured) operator A."""
        from .cg import CG
        from .dense_algs import Cholesky, Dense, Eigh
        from .gmres import GMRES
        from .lanczos import Lanczos
        from .minres import MINRES

        if task not in _TASKS:
            raise ValueError(f"Auto.select: task must be one of {_TASKS}, got {task!r}.")
        n = A.shape[0]
        small = n <= self.dense_threshold
        psd, sa = is_psd(A), is_self_adjoint(A)
        if task == "solve":
            if small:
                return self._make(Cholesky if psd else Dense, iterative=False)
            cls = CG if psd else (MINRES if sa else GMRES)
            return self._make(cls, iterative=True, precond=True)
        if task in ("eig", "function"):
            if small:
                return self._make(Eigh if sa else Dense, iterative=False)
            if not sa:
                raise ValueError(
                    f"No iterative eigen-solver for a non-self-adjoint operator of size {n}: "
                    "tag it with linops.SelfAdjoint(A) if it is symmetric, or pass alg=Dense() "
                    f"(or raise Auto(dense_threshold=...) above {n}) to use a dense method."
                )
            return self._make(Lanczos, iterative=True)
        return self._make(Dense, iterative=False)  # trace: exact below threshold

    def _make(self, cls, iterative: bool, precond: bool = False):
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        if iterative:
            kw.update(tol=self.tol, max_iters=self.max_iters)
            if "atol" in names:
                kw["atol"] = self.atol
            if precond and self.preconditioner is not None:
                kw["preconditioner"] = self.preconditioner
        if "on_failure" in names:
            kw["on_failure"] = self.on_failure
        bad = sorted(set(self.options) - names)
        if bad:
            raise TypeError(
                f"Auto chose {cls.__name__}, which takes no {', '.join(bad)}; its options are "
                f"{sorted(names)}. Pass alg={cls.__name__}(...) explicitly or drop them."
            )
        kw.update(self.options)
        return cls(**kw)
