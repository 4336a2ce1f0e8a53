"""The scaffolding the linear Krylov kernels (CG, MINRES, GMRES) share around their recurrences.

Private. A kernel builds a :class:`LinearSolve` from its arguments (configuration check,
right-hand side, warm start, preconditioner, initial residual and stopping thresholds),
runs its own recurrence with :func:`host_says_stop` as the convergence-check cadence,
confirms converged columns against the true residual with :meth:`LinearSolve.confirm`,
and reports through :meth:`LinearSolve.reporter` with the shared messages, so that the
three kernels validate, stop and report the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ._krylov_utils import (
    KeywordCheck,
    Matmat,
    check_every_for,
    check_matmat_output,
    col_norm,
    fmt,
    history_to_cpu,
    preconditioner_apply,
    prepare_rhs,
    prepare_x0,
    validate_common,
)
from .result import Solution, Status, check_on_failure, report


@dataclass(frozen=True)
class SolveConfig(KeywordCheck):
    """The fields CG and MINRES share (each documents them): tol, atol, max_iters,
    preconditioner, x0, on_failure, check_every."""

    tol: float = 1e-6
    atol: float = 0.0
    max_iters: int | None = None
    preconditioner: Any = field(default=None, compare=False)
    x0: torch.Tensor | None = field(default=None, compare=False, repr=False)
    on_failure: str = "warn"
    check_every: int | None = None

    def __post_init__(self):
        validate_common(self, atol=True, preconditioner=True, x0=True)


def host_says_stop(active: torch.Tensor, rnorm: torch.Tensor) -> bool:
    """One host synchronization: whether no column is active or an active one is not finite."""
    any_active, any_bad = torch.stack(
        [active.any(), (active & ~torch.isfinite(rnorm)).any()]
    ).tolist()
    return not any_active or any_bad


def columns(mask: torch.Tensor) -> list[int]:
    """The indices of the columns set in a (k,) boolean mask."""
    return mask.nonzero().flatten().tolist()


class LinearSolve:
    """The checked inputs, stopping rule and end of one call of a linear Krylov kernel.

    ``LinearSolve(CG, alg, B, x0, preconditioner, on_failure)`` checks that ``alg`` (``None``
    for the default) is a ``CG`` configuration, and prepares ``B`` as an (n, k) block
    (``self.B``), the warm start, the preconditioner ``self.M`` (a function or ``None``),
    ``self.max_iters`` (``10·n`` by default) and ``self.check_every``.
    ``self.inputs_finite`` says whether ``B`` and ``x0`` are finite; if they are not the
    kernel returns :meth:`nonfinite_inputs`, else it calls :meth:`initial_residual`.
    """

    def __init__(self, config: type, alg, B, x0, preconditioner, on_failure: str | None):
        self.name = name = config.__name__
        alg = config() if alg is None else alg
        if not isinstance(alg, config):
            raise TypeError(
                f"{name.lower()} takes a {name} configuration, got {type(alg).__name__}."
            )
        self.alg = alg
        self.on_failure = alg.on_failure if on_failure is None else check_on_failure(on_failure)
        self.B, self.vector = prepare_rhs(B)
        self.n, self.k = self.B.shape
        self.X0 = prepare_x0(alg.x0 if x0 is None else x0, self.B, self.vector)
        self.M = preconditioner_apply(
            alg.preconditioner if preconditioner is None else preconditioner, self.n, name
        )
        self.max_iters = alg.max_iters if alg.max_iters is not None else 10 * self.n
        self.check_every = check_every_for(self.B.device, alg.check_every)
        self.bnorm = col_norm(self.B)
        inputs_finite = torch.isfinite(self.bnorm).all()
        if self.X0 is not None:
            inputs_finite = inputs_finite & torch.isfinite(self.X0).all()
        self.inputs_finite = bool(inputs_finite)
        #: products with A outside the recurrence (warm start, true-residual checks)
        self.products = 0
        k, device = self.k, self.B.device
        #: columns whose true residual stopped improving on restarts (see :meth:`confirm`)
        self.stuck = torch.zeros(k, dtype=torch.bool, device=device)
        self._last_true = torch.full((k,), float("inf"), dtype=self.B.dtype, device=device)
        self._true_rel = self._verified = None

    # ---------------------------------------------------------------- start
    def nonfinite_inputs(self, **info) -> Solution:
        """The ``NONFINITE`` record of a call whose ``B`` or ``x0`` is not finite."""
        nan = torch.full((1, self.k), float("nan"), dtype=torch.float64)
        return self._solution(
            torch.full_like(self.B, float("nan")), Status.NONFINITE, 0, nan,
            f"{self.name}: the right-hand side or x0 holds NaN or infinity; nothing was solved.",
            dict(column_iterations=[0] * self.k, products=0, **info),
        )  # fmt: skip

    def initial_residual(self, matmat: Matmat):
        """``(X, R, ‖R‖, active)`` at the start: ``X = x0`` (or 0) and ``R = B − A X``.

        Also sets ``self.thresh = tol·‖b‖ + atol`` and ``self.scale`` (``‖b‖``, 1 for a zero
        column), the per-column stopping threshold and the residual normalization.
        """
        B, X = self.B, self.X0
        if X is None:
            X = torch.zeros_like(B)
            R = B.clone()
        else:
            AX = matmat(X)
            check_matmat_output(AX, X)
            R = B - AX
            self.products = 1
        bnorm = self.bnorm
        self.thresh = self.alg.tol * bnorm + self.alg.atol
        self.scale = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
        rnorm = col_norm(R)
        return X, R, rnorm, ~(rnorm <= self.thresh)  # NaN stays active, caught as non-finite

    # ---------------------------------------------------------------- true residual
    def confirm(self, matmat: Matmat, X: torch.Tensor, R: torch.Tensor, ok: torch.Tensor):
        """Check the columns ``ok`` that the recurrence calls converged on ``b − A X``.

        The recurrence residual drifts from the true one (rounding, a tol below the dtype's
        precision), so one product computes ``b − A X``. A column that misses the stopping
        rule is to restart from its true residual, unless the previous restart did not
        halve it: then it is stuck at working precision (``self.stuck``).

        Returns ``None`` when no column is to restart, else ``(drifted, R, ‖R‖)``: the
        columns to restart and the residual with those columns replaced by the true one.
        """
        if not bool(ok.any()):
            return None
        R_true = self.B - matmat(X)
        self.products += 1
        rtrue = col_norm(R_true)
        self._true_rel, self._verified = rtrue / self.scale, ok
        drifted = ok & ~(rtrue <= self.thresh)
        # a restart that did not halve the true residual: stuck at working precision
        new_stuck = drifted & ~(rtrue <= 0.5 * self._last_true)
        self.stuck |= new_stuck
        self._last_true = torch.where(ok, rtrue, self._last_true)
        drifted = drifted & ~new_stuck
        if not bool(drifted.any()):
            return None
        # residual replacement: restart the drifted columns from the true residual
        R = torch.where(drifted, R_true, R)
        return drifted, R, col_norm(R)

    # ---------------------------------------------------------------- end
    def history(self, rows: list[torch.Tensor], iterations: int | None = None) -> torch.Tensor:
        """The relative residual history on the host, first ``iterations + 1`` rows.

        The last row holds the true residual where :meth:`confirm` computed it.
        """
        hist = history_to_cpu(rows if iterations is None else rows[: iterations + 1])
        if self._true_rel is not None:
            hist[-1] = torch.where(self._verified.cpu(), self._true_rel.cpu().double(), hist[-1])
        return hist

    @staticmethod
    def nonfinite_columns(final: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """The (host) mask of the columns whose final residual or iterate is not finite."""
        return ~torch.isfinite(final) | ~torch.isfinite(X).all(0).cpu()

    def reporter(
        self, X: torch.Tensor, iterations: int, hist: torch.Tensor, info: dict
    ) -> Callable[..., Solution]:
        """``end(status, message, **extra)``: the reported record of this call, ending in X."""

        def end(status: Status, message: str, **extra) -> Solution:
            return self._solution(X, status, iterations, hist, message, {**extra, **info})

        return end

    def _solution(self, value, status, iterations, hist, message, info) -> Solution:
        value = value[:, 0] if self.vector else value
        sol = Solution(value, status, iterations, hist, self.alg, message, info)
        return report(sol, self.on_failure)

    # ---------------------------------------------------------------- messages
    def nonfinite_message(self, cols: list[int], iterations: int, advice="try float64") -> str:
        return (
            f"{self.name}: NaN or infinity appeared in column(s) {cols} after {iterations} "
            "iterations: the products of A (or of the preconditioner) are not finite. "
            f"Check the operator for overflow or invalid values; {advice}."
        )

    def stagnation_message(self, cols: list[int], final: torch.Tensor) -> str:
        """For the columns ``cols`` that :meth:`confirm` found stuck; ``final``: last residuals."""
        worst = float(final[cols].max())
        return (
            f"{self.name} stagnated in column(s) {cols}: its recurrence residual met "
            f"tol={self.alg.tol} but the true residual ‖b − A x‖/‖b‖ = {fmt(worst)} "
            f"does not, and restarting from it did not help: tol is below what "
            f"{self.B.dtype} can reach for this A. Use float64, a looser tol or a preconditioner."
        )

    def unconverged_message(
        self, iterations: int, budget: str, cols: list[int], final: torch.Tensor, advice: str
    ) -> str:
        """For the columns ``cols`` still active at the end; ``final``: the last residuals."""
        worst = float(final[cols].max())
        return (
            f"{self.name} did not converge in {iterations} iterations ({budget}): relative "
            f"residual {fmt(worst)} > tol={self.alg.tol} in {len(cols)} of {self.k} column(s). "
            f"{advice}"
        )

    def converged_message(self, iterations: int, worst: float, detail: str = "") -> str:
        return (
            f"{self.name} converged in {iterations} iterations{detail}: relative residual "
            f"{fmt(worst)} ≤ tol={self.alg.tol} (atol={self.alg.atol}) in all {self.k} "
            "column(s)."
        )
