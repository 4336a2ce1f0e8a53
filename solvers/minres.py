"""MINRES for symmetric (possibly indefinite) systems, several right-hand sides.

``MINRES`` is the configuration, ``minres`` the kernel on a function ``X -> A X``.
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

__all__ = ["MINRES", "minres"]


@dataclass(frozen=True)
class MINRES:
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

    tol: float = 1e-6
    atol: float = 0.0
    max_iters: int | None = None
    preconditioner: Any = field(default=None, compare=False)
    x0: torch.Tensor | None = field(default=None, compare=False, repr=False)
    on_failure: str = "warn"
    check_every: int | None = None

    def __post_init__(self):
        validate_common(self, atol=True, preconditioner=True, x0=True)


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
    alg = MINRES() if alg is None else alg
    if not isinstance(alg, MINRES):
        raise TypeError(f"minres takes a MINRES configuration, got {type(alg).__name__}.")
    on_failure = alg.on_failure if on_failure is None else check_on_failure(on_failure)
    B2, vector = prepare_rhs(B)
    n, k = B2.shape
    X = prepare_x0(alg.x0 if x0 is None else x0, B2, vector)
    M = as_apply(alg.preconditioner if preconditioner is None else preconditioner)
    max_iters = alg.max_iters if alg.max_iters is not None else 10 * n
    check_every = check_every_for(B2.device, alg.check_every)
    eps = torch.finfo(B2.dtype).eps
    # β below this times ‖T‖ is an invariant subspace: rounding in the products leaves β
    # far above eps·‖A‖ there (about 1e-12·‖A‖ in float64 for a low-rank A)
    stall_ratio = max(100 * eps, 1e-2 * eps**0.5)

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
            "MINRES: the right-hand side or x0 holds NaN or infinity; nothing was solved.",
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
    rnorm = col_norm(R)
    active = ~(rnorm <= thresh)

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
    true_rel = verified_cols = None
    stuck = torch.zeros(k, dtype=torch.bool, device=B2.device)
    last_true = torch.full((k,), float("inf"), dtype=B2.dtype, device=B2.device)

    it = 0
    while True:
        while it < max_iters:
            if it % check_every == 0:
                any_active, any_bad = torch.stack(
                    [active.any(), (active & ~torch.isfinite(rnorm)).any()]
                ).tolist()
                if not any_active or any_bad:
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
        st, bad = lanczos_start(R, drifted, st)
        not_pd |= bad
        active = active | (drifted & ~bad)

    iterations = int(col_iters.max())
    hist = history_to_cpu(history[: iterations + 1])
    if true_rel is not None:  # the last row holds the true residual where it was computed
        hist[-1] = torch.where(verified_cols.cpu(), true_rel.cpu().double(), hist[-1])
    final = hist[-1]
    info = dict(column_iterations=col_iters.tolist(), products=products + it)
    nonfinite = ~torch.isfinite(final) | ~torch.isfinite(X).all(0).cpu()
    if bool(nonfinite.any()):
        cols = nonfinite.nonzero().flatten().tolist()
        msg = (
            f"MINRES: NaN or infinity appeared in column(s) {cols} after {iterations} "
            "iterations: the products of A (or of the preconditioner) are not finite. "
            "Check the operator for overflow or invalid values; try float64."
        )
        return done(X, Status.NONFINITE, iterations, hist, msg, **info)
    if bool(not_pd.any()):
        cols = not_pd.nonzero().flatten().tolist()
        msg = (
            f"MINRES broke down in column(s) {cols}: rᵀMr < 0, the preconditioner is not "
            "positive definite. MINRES needs a symmetric positive definite preconditioner "
            "even for an indefinite A; use one (e.g. |diag(A)| for Jacobi) or none."
        )
        return done(X, Status.BREAKDOWN, iterations, hist, msg, **info)
    stalled_cpu = stalled.cpu()
    at_precision = stalled_cpu & (final <= 1e3 * eps)
    if bool(at_precision.any()):
        cols = at_precision.nonzero().flatten().tolist()
        msg = (
            f"MINRES reached an invariant subspace in column(s) {cols}: x solves the system "
            f"to the working precision of {B2.dtype} (relative residual "
            f"{fmt(float(final[at_precision].max()))}), but tol={alg.tol} asks for more. "
            "Use float64 or a looser tol."
        )
        return done(X, Status.BREAKDOWN, iterations, hist, msg, **info)
    if bool(stalled.any()):
        cols = stalled.nonzero().flatten().tolist()
        msg = (
            f"MINRES reached an invariant subspace in column(s) {cols} without solving the "
            f"system (relative residual {fmt(float(final[stalled.cpu()].max()))}): A is "
            "singular and b is not in its range. The returned x minimizes ‖b − A x‖ over "
            "the Krylov space; use a least-squares formulation or add damping (A + λI)."
        )
        return done(X, Status.BREAKDOWN, iterations, hist, msg, **info)
    if bool(stuck.any()):
        cols = stuck.nonzero().flatten().tolist()
        msg = (
            f"MINRES stagnated in column(s) {cols}: its recurrence residual met tol={alg.tol} "
            f"but the true residual ‖b − A x‖/‖b‖ = {fmt(float(final[stuck.cpu()].max()))} "
            f"does not, and restarting from it did not help: tol is below what "
            f"{B2.dtype} can reach for this A. Use float64, a looser tol or a preconditioner."
        )
        return done(X, Status.BREAKDOWN, iterations, hist, msg, **info)
    unconverged = active.cpu()
    if bool(unconverged.any()):
        worst = float(final[unconverged].max())
        msg = (
            f"MINRES did not converge in {iterations} iterations (max_iters={max_iters}): "
            f"relative residual {fmt(worst)} > tol={alg.tol} in {int(unconverged.sum())} "
            f"of {k} column(s). Try a larger max_iters, a looser tol, or a symmetric "
            "positive definite preconditioner."
        )
        return done(X, Status.MAX_ITERS, iterations, hist, msg, **info)
    msg = (
        f"MINRES converged in {iterations} iterations: relative residual "
        f"{fmt(float(final.max()))} ≤ tol={alg.tol} (atol={alg.atol}) in all {k} column(s)."
    )
    return done(X, Status.CONVERGED, iterations, hist, msg, **info)
