"""Conjugate gradients for symmetric positive definite systems, several right-hand sides.

``CG`` is the configuration, ``cg`` the kernel on a function ``X -> A X``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ._krylov_utils import (
    Matmat,
    as_apply,
    check_every_for,
    check_matmat_output,
    col_dot,
    col_norm,
    fmt,
    history_to_cpu,
    prepare_rhs,
    prepare_x0,
    validate_common,
)
from .result import Solution, Status, check_on_failure, report

__all__ = ["CG", "cg"]


@dataclass(frozen=True)
class CG:
    """Preconditioned conjugate gradients for ``A X = B`` with A symmetric positive definite.

    Stopping rule, per column ``b`` of ``B``: ``‖b − A x‖ ≤ tol·‖b‖ + atol``. The loop
    tests the residual its recurrence updates; when that says converged, one product
    computes the true ``b − A x`` of the converged columns, and a column whose true
    residual misses the rule (rounding drift, a tol below the dtype's precision) restarts
    from it until ``max_iters``.

    Args:
        tol: relative tolerance (≥ 0).
        atol: absolute tolerance (≥ 0), useful when b may be (nearly) zero.
        max_iters: at most this many products with A (``None``: ``10·n``, since rounding
            can make CG need more than the n steps of exact arithmetic).
        preconditioner: ``None``, a LinearOperator (or square tensor, or callable
            ``X -> M X``) approximating ``A⁻¹``; it must be symmetric positive definite.
        x0: a warm start of the shape of ``B`` (or ``(n,)`` for one column); never
            modified. ``None``: zero.
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` when CG does not
            converge, meets negative curvature or non-finite values.
        check_every: the loop asks the device whether every column has converged every
            this many iterations (``None``: every iteration on the CPU, every 10 on an
            accelerator, so that a GPU loop does not wait for the host at each step).

    Example:
        >>> import torch
        >>> from solvers.cg import CG, cg
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> sol = cg(lambda X: A @ X, torch.tensor([[1.0], [2.0]]), CG(tol=1e-6))
        >>> torch.allclose(A @ sol.value, torch.tensor([[1.0], [2.0]]), atol=1e-5)
        True
    """

    tol: float = 1e-6
    atol: float = 0.0
    max_iters: int | None = None
    preconditioner: Any = field(default=None, compare=False)
    x0: torch.Tensor | None = field(default=None, compare=False, repr=False)
    on_failure: str = "warn"
    check_every: int | None = None

    def __post_init__(self):
        validate_common(self, atol=True, preconditioner=True, x0=True)


def cg(
    matmat: Matmat,
    B: torch.Tensor,
    alg: CG | None = None,
    x0: torch.Tensor | None = None,
    preconditioner=None,
    *,
    on_failure: str | None = None,
) -> Solution:
    """Solve ``A X = B`` by (preconditioned) conjugate gradients, all columns in one loop.

    Each column has its own step sizes ``α = rᵀz / pᵀAp`` and ``β = r₊ᵀz₊ / rᵀz``
    (``z = M r``); a column that meets its stopping rule
    ``‖b − A x‖ ≤ tol·‖b‖ + atol`` is frozen by masking, so one product ``A P`` of shape
    (n, k) per iteration serves all columns. Cost: one product with A (and M) per
    iteration, plus one for the initial residual when ``x0`` is given and one to confirm
    convergence with the true residual.

    A warm start is honest at any scale of b: the loop starts from ``r₀ = b − A x₀``.
    A zero column of ``B`` (with no ``x0``) gives ``x = 0`` at once. If ``pᵀAp ≤ 0``
    (A not positive definite) the column stops with ``Status.NEGATIVE_CURVATURE`` and
    keeps its last iterate (also when ``pᵀAp ≤ eps·max(pᵀAp/pᵀp)·pᵀp``, a curvature
    that is zero at rounding level: A singular); if ``rᵀMr ≤ 0`` (M not positive definite) with
    ``Status.BREAKDOWN``; NaN or infinity gives ``Status.NONFINITE``.

    Args:
        matmat: ``X -> A X`` for X of shape (n, k); A symmetric positive definite
            (assumed, not checked, except through the curvature test above).
        B: right-hand sides, shape (n, k) or (n,).
        alg: a :class:`CG` configuration (default ``CG()``).
        x0: warm start (shape of B); overrides ``alg.x0``. Never modified.
        preconditioner: callable or operator approximating ``A⁻¹``; overrides
            ``alg.preconditioner``.
        on_failure: overrides ``alg.on_failure`` for this call.

    Returns:
        A :class:`~solvers.result.Solution` with ``value`` of the shape of ``B``,
        ``residuals`` of shape ``(iterations + 1, k)`` (relative residuals per column)
        and ``info`` with ``column_iterations`` and ``products``.

    Example:
        >>> import torch
        >>> from solvers.cg import CG, cg
        >>> A = torch.diag(torch.arange(1.0, 6.0))
        >>> sol = cg(lambda X: A @ X, torch.ones(5, 2), CG(tol=1e-6))
        >>> sol.status.name, sol.iterations
        ('CONVERGED', 5)
    """
    alg = CG() if alg is None else alg
    if not isinstance(alg, CG):
        raise TypeError(f"cg takes a CG configuration, got {type(alg).__name__}.")
    on_failure = alg.on_failure if on_failure is None else check_on_failure(on_failure)
    B2, vector = prepare_rhs(B)
    n, k = B2.shape
    X = prepare_x0(alg.x0 if x0 is None else x0, B2, vector)
    M = as_apply(alg.preconditioner if preconditioner is None else preconditioner)
    max_iters = alg.max_iters if alg.max_iters is not None else 10 * n
    check_every = check_every_for(B2.device, alg.check_every)

    def done(value, status, iterations, hist, message, **info):
        value = value[:, 0] if vector else value
        sol = Solution(value, status, iterations, hist, alg, message, info)
        return report(sol, on_failure, stacklevel=4)

    bnorm = col_norm(B2)
    inputs_finite = torch.isfinite(bnorm).all()
    if X is not None:
        inputs_finite = inputs_finite & torch.isfinite(X).all()
    if not bool(inputs_finite):
        nan = torch.full((1, k), float("nan"), dtype=torch.float64)
        return done(
            torch.full_like(B2, float("nan")), Status.NONFINITE, 0, nan,
            "CG: the right-hand side or x0 holds NaN or infinity; nothing was solved.",
            column_iterations=[0] * k, products=0,
        )  # fmt: skip

    products = 0
    if X is None:
        X = torch.zeros_like(B2)
        R = B2.clone()
    else:
        AX = matmat(X)
        check_matmat_output(AX, X)
        R = B2 - AX
        products = 1
    thresh = alg.tol * bnorm + alg.atol
    scale = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))

    Z = M(R) if M is not None else R
    rz = col_dot(R, Z)
    rnorm = col_norm(R)
    active = ~(rnorm <= thresh)  # NaN stays active and is caught as non-finite
    zeros_b = torch.zeros(k, dtype=torch.bool, device=B2.device)
    negative, breakdown = zeros_b.clone(), zeros_b.clone()
    if M is not None:
        breakdown = active & ~(rz > 0)
        active = active & ~breakdown
    P = torch.where(active, Z, 0)
    neg_iter = torch.zeros(k, dtype=torch.long, device=B2.device)
    neg_curv = torch.zeros(k, dtype=B2.dtype, device=B2.device)
    col_iters = torch.zeros(k, dtype=torch.long, device=B2.device)
    history = [rnorm / scale]
    curv_max = torch.zeros(k, dtype=B2.dtype, device=B2.device)
    zero_curv = torch.finfo(B2.dtype).eps

    it = 0
    true_rel = verified_cols = None
    stuck = torch.zeros(k, dtype=torch.bool, device=B2.device)
    last_true = torch.full((k,), float("inf"), dtype=B2.dtype, device=B2.device)
    while True:
        while it < max_iters:
            if it % check_every == 0:
                any_active, any_bad = torch.stack(
                    [active.any(), (active & ~torch.isfinite(rnorm)).any()]
                ).tolist()
                if not any_active or any_bad:
                    break
            AP = matmat(P)
            if it == 0:
                check_matmat_output(AP, P)
            it += 1
            col_iters += active
            pAp = col_dot(P, AP)
            pp = col_dot(P, P)
            # curvature ≤ 0, or ≈ 0 at rounding level of the largest seen (A singular)
            new_neg = active & ~(pAp > zero_curv * curv_max * pp)
            curv_max = torch.maximum(curv_max, torch.where(active, pAp / pp, 0))
            negative |= new_neg
            neg_iter = torch.where(new_neg, it, neg_iter)
            neg_curv = torch.where(new_neg, pAp, neg_curv)
            active = active & ~new_neg
            alpha = torch.where(active, rz / pAp, 0)
            X.addcmul_(P, alpha)
            R.addcmul_(AP, -alpha)
            rnorm = col_norm(R)
            history.append(rnorm / scale)
            active = active & ~(rnorm <= thresh)
            Z = M(R) if M is not None else R
            rz_new = col_dot(R, Z)
            if M is not None:
                new_break = active & ~(rz_new > 0)
                breakdown |= new_break
                active = active & ~new_break
            beta = torch.where(active, rz_new / rz, 0)
            P = torch.where(active, Z + beta * P, 0)
            rz = rz_new

        # the recurrence residual drifts from b − A x: check converged columns once
        ok = ~active & ~negative & ~breakdown & torch.isfinite(rnorm) & (col_iters > 0)
        if not bool(ok.any()):
            break
        R_true = B2 - matmat(X)
        products += 1
        rtrue = col_norm(R_true)
        true_rel, verified_cols = rtrue / scale, ok
        drifted = ok & ~(rtrue <= thresh)
        # a restart that did not halve the true residual: stuck at working precision
        new_stuck = drifted & ~(rtrue <= 0.5 * last_true)
        stuck |= new_stuck
        last_true = torch.where(ok, rtrue, last_true)
        drifted = drifted & ~new_stuck
        if not bool(drifted.any()):
            break
        if it >= max_iters:
            active = active | drifted
            break
        # residual replacement: restart the drifted columns from the true residual
        R = torch.where(drifted, R_true, R)
        rnorm = col_norm(R)
        Z = M(R) if M is not None else R
        rz = col_dot(R, Z)
        P = torch.where(drifted, Z, P)
        active = active | drifted

    iterations = int(col_iters.max())
    hist = history_to_cpu(history[: iterations + 1])
    if true_rel is not None:  # the last row holds the true residual where it was computed
        hist[-1] = torch.where(verified_cols.cpu(), true_rel.cpu().double(), hist[-1])
    final = hist[-1]
    nonfinite = ~torch.isfinite(final) | ~torch.isfinite(X).all(0).cpu()
    col_info = dict(column_iterations=col_iters.tolist(), products=products + it)
    if bool(nonfinite.any()):
        cols = nonfinite.nonzero().flatten().tolist()
        msg = (
            f"CG: NaN or infinity appeared in column(s) {cols} after {iterations} "
            "iterations: the products of A (or of the preconditioner) are not finite. "
            "Check the operator for overflow or invalid values; in float16/float32 try "
            "float64."
        )
        return done(X, Status.NONFINITE, iterations, hist, msg, **col_info)
    if bool(negative.any()):
        cols = negative.nonzero().flatten().tolist()
        c = cols[0]
        msg = (
            f"CG met non-positive curvature pᵀAp = {fmt(float(neg_curv[c]))} at iteration "
            f"{int(neg_iter[c])} in column(s) {cols}: A is not positive definite (or is "
            "singular, when pᵀAp ≈ 0). The last iterate is returned. Use MINRES for a "
            "symmetric indefinite A (e.g. a Hessian), or damp it: A + λI with λ above "
            "−λ_min(A)."
        )
        return done(X, Status.NEGATIVE_CURVATURE, iterations, hist, msg,
                    negative_curvature_columns=cols, **col_info)  # fmt: skip
    if bool(breakdown.any()):
        cols = breakdown.nonzero().flatten().tolist()
        msg = (
            f"CG broke down in column(s) {cols}: rᵀMr ≤ 0, so the preconditioner is not "
            "positive definite. Use a symmetric positive definite preconditioner (for "
            "Jacobi, a positive diagonal) or none."
        )
        return done(X, Status.BREAKDOWN, iterations, hist, msg, **col_info)
    if bool(stuck.any()):
        cols = stuck.nonzero().flatten().tolist()
        msg = (
            f"CG stagnated in column(s) {cols}: its recurrence residual met tol={alg.tol} "
            f"but the true residual ‖b − A x‖/‖b‖ = {fmt(float(final[stuck.cpu()].max()))} "
            f"does not, and restarting from it did not help: tol is below what "
            f"{B2.dtype} can reach for this A. Use float64, a looser tol or a preconditioner."
        )
        return done(X, Status.BREAKDOWN, iterations, hist, msg, **col_info)
    unconverged = active.cpu()
    if bool(unconverged.any()):
        worst = float(final[unconverged].max())
        msg = (
            f"CG did not converge in {iterations} iterations (max_iters={max_iters}): "
            f"relative residual {fmt(worst)} > tol={alg.tol} in "
            f"{int(unconverged.sum())} of {k} column(s). Try a larger max_iters, a "
            "looser tol, or a preconditioner (Jacobi, Nyström, pivoted Cholesky); if A "
            "may be indefinite use MINRES."
        )
        return done(X, Status.MAX_ITERS, iterations, hist, msg, **col_info)
    msg = (
        f"CG converged in {iterations} iterations: relative residual "
        f"{fmt(float(final.max()))} ≤ tol={alg.tol} (atol={alg.atol}) in all {k} column(s)."
    )
    return done(X, Status.CONVERGED, iterations, hist, msg, **col_info)
