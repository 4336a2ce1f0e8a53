"""Conjugate gradients for symmetric positive definite systems, several right-hand sides.

``CG`` is the configuration, ``cg`` the kernel on a function ``X -> A X``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._krylov_loop import LinearSolve, SolveConfig, columns, host_says_stop
from ._krylov_utils import Matmat, check_matmat_output, col_dot, col_norm, fmt
from .result import Solution, Status

__all__ = ["CG", "cg"]


@dataclass(frozen=True)
class CG(SolveConfig):
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
    job = LinearSolve(CG, alg, B, x0, preconditioner, on_failure)
    if not job.inputs_finite:
        return job.nonfinite_inputs()
    X, R, rnorm, active = job.initial_residual(matmat)
    B2, k, M, max_iters = job.B, job.k, job.M, job.max_iters
    thresh, scale = job.thresh, job.scale

    Z = M(R) if M is not None else R
    rz = col_dot(R, Z)
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
    while True:
        while it < max_iters:
            if it % job.check_every == 0 and host_says_stop(active, rnorm):
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
        restart = job.confirm(matmat, X, R, ok)
        if restart is None:
            break
        drifted, R, rnorm = restart
        active = active | drifted
        if it >= max_iters:
            break
        Z = M(R) if M is not None else R
        rz = col_dot(R, Z)
        P = torch.where(drifted, Z, P)

    iterations = int(col_iters.max())
    hist = job.history(history, iterations)
    final = hist[-1]
    info = dict(column_iterations=col_iters.tolist(), products=job.products + it)
    end = job.reporter(X, iterations, hist, info)
    if cols := columns(job.nonfinite_columns(final, X)):
        msg = job.nonfinite_message(cols, iterations, advice="in float16/float32 try float64")
        return end(Status.NONFINITE, msg)
    if cols := columns(negative):
        c = cols[0]
        msg = (
            f"CG met non-positive curvature pᵀAp = {fmt(float(neg_curv[c]))} at iteration "
            f"{int(neg_iter[c])} in column(s) {cols}: A is not positive definite (or is "
            "singular, when pᵀAp ≈ 0). The last iterate is returned. Use MINRES for a "
            "symmetric indefinite A (e.g. a Hessian), or damp it: A + λI with λ above "
            "−λ_min(A)."
        )
        return end(Status.NEGATIVE_CURVATURE, msg, negative_curvature_columns=cols)
    if cols := columns(breakdown):
        msg = (
            f"CG broke down in column(s) {cols}: rᵀMr ≤ 0, so the preconditioner is not "
            "positive definite. Use a symmetric positive definite preconditioner (for "
            "Jacobi, a positive diagonal) or none."
        )
        return end(Status.BREAKDOWN, msg)
    if cols := columns(job.stuck):
        return end(Status.BREAKDOWN, job.stagnation_message(cols, final))
    if cols := columns(active):
        msg = job.unconverged_message(
            iterations, f"max_iters={max_iters}", cols, final,
            "Try a larger max_iters, a looser tol, or a preconditioner (Jacobi, Nyström, "
            "pivoted Cholesky); if A may be indefinite use MINRES, if it is not symmetric "
            "GMRES (CG assumes a symmetric positive definite A).",
        )  # fmt: skip
        return end(Status.MAX_ITERS, msg)
    return end(Status.CONVERGED, job.converged_message(iterations, float(final.max())))
