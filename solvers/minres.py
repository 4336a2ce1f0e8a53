"""MINRES for symmetric (possibly indefinite) systems, several right-hand sides.

``MINRES`` is the configuration, ``minres`` the kernel on a function ``X -> A X``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._krylov_loop import LinearSolve, SolveConfig, columns, host_says_stop
from ._krylov_utils import Matmat, check_matmat_output, col_dot, col_norm, fmt
from .result import Solution, Status

__all__ = ["MINRES", "minres"]


@dataclass(frozen=True)
class MINRES(SolveConfig):
    """Minimal residual method for ``A X = B`` with A symmetric, definite or not.

    The method of choice for Newton steps on a Hessian, which is symmetric but not
    positive definite. Each iterate minimizes ``‖b − A x‖`` over the Krylov space
    (``‖b − A x‖_M`` with a preconditioner).

    Stopping rule, per column: ``‖b − A x‖₂ ≤ tol·‖b‖₂ + atol``. The loop tests the
    residual kept by a recurrence (the 2-norm one, also with a preconditioner); once it
    says converged, one product checks the true ``b − A x``, and a column that misses the
    rule restarts from its true residual until ``max_iters``.

    Args:
        tol, atol: relative and absolute tolerances (≥ 0).
        max_iters: at most this many products with A (``None``: ``10·n``).
        preconditioner: ``None``, or an operator / square tensor / callable approximating
            ``A⁻¹``; it must be symmetric positive definite even when A is indefinite.
        x0: warm start of the shape of ``B``; never modified.
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"``.
        check_every: host convergence checks every this many iterations (``None``: 1 on
            the CPU, 10 on an accelerator).

    Example:
        >>> import torch
        >>> from solvers.minres import MINRES, minres
        >>> A = torch.diag(torch.tensor([-2.0, 1.0, 3.0]))
        >>> sol = minres(lambda X: A @ X, torch.ones(3, 1), MINRES(tol=1e-6))
        >>> sol.value.flatten()
        tensor([-0.5000,  1.0000,  0.3333])
    """



def minres(
    matmat: Matmat,
    B: torch.Tensor,
    alg: MINRES | None = None,
    x0: torch.Tensor | None = None,
    preconditioner=None,
    *,
    on_failure: str | None = None,
) -> Solution:
    """Solve ``A X = B`` for symmetric A by MINRES (Paige and Saunders, 1975), all columns
    in one loop.

    A preconditioned Lanczos process builds, per column, the tridiagonal matrix of A in
    the Krylov space; Givens rotations turn the least-squares problem
    ``min ‖β₁e₁ − T y‖`` into a short recurrence, so x is updated at every step with three
    stored direction vectors. The true residual is carried by the same recurrence
    (``r ← r − φ A w``) so the 2-norm stopping rule ``‖b − A x‖ ≤ tol·‖b‖ + atol`` holds
    with a preconditioner too. Converged columns are frozen by masking.

    Cost: one product with A and one with the preconditioner per iteration, plus one with
    A for ``x0`` and one to confirm convergence; about 13 blocks of the shape of B in
    memory.

    A Lanczos breakdown (an invariant subspace, ``β ≤ max(100·eps, 0.01·√eps)·‖T‖``) that
    does not solve the system (A singular and b outside its range) stops the column with
    ``Status.BREAKDOWN`` and the iterate before the undefined step: it minimizes
    ``‖b − A x‖`` (a least-squares solution, though not the minimum-norm one; for ``A⁺b``
    solve the consistent system ``A² y = A b``). A preconditioner with ``rᵀMr < 0`` also
    gives ``Status.BREAKDOWN``; NaN or infinity gives ``Status.NONFINITE``.

    Args:
        matmat: ``X -> A X`` for X (n, k); A symmetric (assumed, not checked).
        B: right-hand sides (n, k) or (n,).
        alg: a :class:`MINRES` configuration (default ``MINRES()``).
        x0, preconditioner, on_failure: override the configuration's.

    Returns:
        A :class:`~solvers.result.Solution` (value of the shape of B, relative residual
        history ``(iterations + 1, k)``).

    Example:
        >>> import torch
        >>> from solvers.minres import MINRES, minres
        >>> A = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1
        >>> sol = minres(lambda X: A @ X, torch.tensor([3.0, 0.0]), MINRES(tol=1e-6))
        >>> sol.value
        tensor([-1.0000,  2.0000])
    """
    job = LinearSolve(MINRES, alg, B, x0, preconditioner, on_failure)
    if not job.inputs_finite:
        return job.nonfinite_inputs()
    X, R, rnorm, active = job.initial_residual(matmat)
    B2, k, M, max_iters = job.B, job.k, job.M, job.max_iters
    thresh, scale = job.thresh, job.scale
    eps = torch.finfo(B2.dtype).eps
    # β below this times ‖T‖ is an invariant subspace: rounding in the products leaves β
    # far above eps·‖A‖ there (about 1e-12·‖A‖ in float64 for a low-rank A)
    stall_ratio = max(100 * eps, 1e-2 * eps**0.5)

    def lanczos_start(R, mask, st):
        """(Re)start the Lanczos/QR state of the columns in ``mask`` from residual R."""
        y0 = M(R) if M is not None else R
        beta_sq = col_dot(R, y0)
        beta0 = torch.sqrt(torch.clamp(beta_sq, min=0))
        zero, zeros_n = torch.zeros_like(beta0), torch.zeros_like(R)
        fresh = dict(
            r1=R, r2=R, y=y0, beta=beta0, oldb=zero, dbar=zero, epsln=zero, phibar=beta0,
            cs=-torch.ones_like(beta0), sn=zero, W=zeros_n, W2=zeros_n, AW=zeros_n,
            AW2=zeros_n,
        )  # fmt: skip
        if st is None:
            return fresh, mask & ~(beta_sq >= 0)
        for key, value in fresh.items():
            st[key] = torch.where(mask, value, st[key])
        return st, mask & ~(beta_sq >= 0)

    st, not_pd = lanczos_start(R, active, None)
    active = active & ~not_pd
    anorm = torch.zeros_like(st["beta"])
    stalled = torch.zeros(k, dtype=torch.bool, device=B2.device)
    col_iters = torch.zeros(k, dtype=torch.long, device=B2.device)
    history = [rnorm / scale]
    one = torch.ones_like(st["beta"])

    it = 0
    while True:
        while it < max_iters:
            if it % job.check_every == 0 and host_says_stop(active, rnorm):
                break
            it += 1
            col_iters += active
            beta, oldb = st["beta"], st["oldb"]
            s = torch.where(active, one / torch.where(active, beta, one), 0)
            V = st["y"] * s
            AV = matmat(V)
            if it == 1:
                check_matmat_output(AV, V)
            y = AV.clone()
            # the three-term recurrence (no r₁ term on a column's first step: oldb = 0)
            y.addcmul_(st["r1"], -torch.where(active & (oldb > 0), beta / torch.where(
                oldb > 0, oldb, one), 0))  # fmt: skip
            alfa = col_dot(V, y)
            y.addcmul_(st["r2"], -alfa * s)
            st["r1"], st["r2"] = st["r2"], y
            st["y"] = M(y) if M is not None else y.clone()
            st["oldb"] = oldb = beta
            beta_sq = col_dot(st["r2"], st["y"])
            new_not_pd = active & ~(beta_sq >= 0)
            not_pd |= new_not_pd
            st["beta"] = beta = torch.sqrt(torch.clamp(beta_sq, min=0))
            anorm = torch.maximum(anorm, torch.where(active, alfa.abs() + beta + oldb, 0))
            # apply the previous rotation, then form the new one
            cs, sn, dbar, oldeps = st["cs"], st["sn"], st["dbar"], st["epsln"]
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            st["epsln"] = sn * beta
            st["dbar"] = -cs * beta
            gamma_raw = torch.hypot(gbar, beta)
            # γ ≈ 0: T is singular on an invariant subspace (A singular, b outside its
            # range); the step is undefined, keep the least-squares iterate
            degenerate = active & (gamma_raw <= stall_ratio * anorm)
            gamma = torch.clamp(gamma_raw, min=eps)
            st["cs"], st["sn"] = gbar / gamma, beta / gamma
            update = active & ~degenerate
            phi = torch.where(update, st["cs"] * st["phibar"], 0)
            st["phibar"] = st["sn"] * st["phibar"]
            # direction update w = (v − ε w₁ − δ w₂)/γ and its image A w
            W1, W2 = st["W2"], st["W"]
            AW1, AW2 = st["AW2"], st["AW"]
            W = torch.where(active, (V - oldeps * W1 - delta * W2) / gamma, 0)
            AW = torch.where(active, (AV - oldeps * AW1 - delta * AW2) / gamma, 0)
            st["W"], st["W2"], st["AW"], st["AW2"] = W, W2, AW, AW2
            X = torch.where(update, X + phi * W, X)
            R = torch.where(update, R - phi * AW, R)
            rnorm = col_norm(R)
            history.append(rnorm / scale)
            converged = rnorm <= thresh
            new_stall = active & ~converged & ((beta <= stall_ratio * anorm) | degenerate)
            stalled |= new_stall
            active = active & ~converged & ~new_stall & ~new_not_pd

        # the recurrence residual drifts from b − A x: check converged columns once
        ok = ~active & ~stalled & ~not_pd & torch.isfinite(rnorm) & (col_iters > 0)
        restart = job.confirm(matmat, X, R, ok)
        if restart is None:
            break
        drifted, R, rnorm = restart
        if it >= max_iters:
            active = active | drifted
            break
        st, bad = lanczos_start(R, drifted, st)
        not_pd |= bad
        active = active | (drifted & ~bad)

    iterations = int(col_iters.max())
    hist = job.history(history, iterations)
    final = hist[-1]
    info = dict(column_iterations=col_iters.tolist(), products=job.products + it)
    end = job.reporter(X, iterations, hist, info)
    if cols := columns(job.nonfinite_columns(final, X)):
        return end(Status.NONFINITE, job.nonfinite_message(cols, iterations))
    if cols := columns(not_pd):
        msg = (
            f"MINRES broke down in column(s) {cols}: rᵀMr < 0, the preconditioner is not "
            "positive definite. MINRES needs a symmetric positive definite preconditioner "
            "even for an indefinite A; use one (e.g. |diag(A)| for Jacobi) or none."
        )
        return end(Status.BREAKDOWN, msg)
    stalled_cpu = stalled.cpu()
    if cols := columns(stalled_cpu & (final <= 1e3 * eps)):
        msg = (
            f"MINRES reached an invariant subspace in column(s) {cols}: x solves the system "
            f"to the working precision of {B2.dtype} (relative residual "
            f"{fmt(float(final[cols].max()))}), but tol={job.alg.tol} asks for more. "
            "Use float64 or a looser tol."
        )
        return end(Status.BREAKDOWN, msg)
    if cols := columns(stalled_cpu):
        msg = (
            f"MINRES reached an invariant subspace in column(s) {cols} without solving the "
            f"system (relative residual {fmt(float(final[cols].max()))}): A is "
            "singular and b is not in its range. The returned x minimizes ‖b − A x‖ over "
            "the Krylov space; use a least-squares formulation or add damping (A + λI)."
        )
        return end(Status.BREAKDOWN, msg)
    if cols := columns(job.stuck):
        return end(Status.BREAKDOWN, job.stagnation_message(cols, final))
    if cols := columns(active):
        msg = job.unconverged_message(
            iterations, f"max_iters={max_iters}", cols, final,
            "Try a larger max_iters, a looser tol, or a symmetric positive definite "
            "preconditioner; MINRES assumes a symmetric A, use GMRES if it is not.",
        )  # fmt: skip
        return end(Status.MAX_ITERS, msg)
    return end(Status.CONVERGED, job.converged_message(iterations, float(final.max())))
