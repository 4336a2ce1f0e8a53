"""Restarted GMRES for general (non-symmetric) systems, several right-hand sides.

``GMRES`` is the configuration, ``gmres`` the kernel on a function ``X -> A X``.
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
    check_positive_int,
    col_norm,
    fmt,
    history_to_cpu,
    prepare_rhs,
    prepare_x0,
    validate_common,
)
from .result import Solution, Status, check_on_failure, report

__all__ = ["GMRES", "gmres"]


@dataclass(frozen=True)
class GMRES:
    """Restarted GMRES(m) for ``A X = B`` with A square, not necessarily symmetric.

    Stopping rule, per column: ``‖b − A x‖ ≤ tol·‖b‖ + atol``. Inside a cycle the
    residual is the least-squares estimate ``|gⱼ₊₁|``; at every restart (and at the end)
    it is recomputed as ``b − A x``, and only that true residual declares convergence.

    Args:
        tol, atol: relative and absolute tolerances (≥ 0).
        max_iters: at most this many Arnoldi steps in total, over all cycles (``None``:
            ``10·n``).
        restart: Arnoldi steps per cycle (memory: ``restart + 1`` blocks of the shape of B).
        preconditioner: ``None``, or an operator / square tensor / callable approximating
            ``A⁻¹``, applied on the right (``A M u = b``, ``x = M u``) so the residual
            that is minimized and tested is the true one.
        x0: warm start of the shape of B; never modified.
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"``.
        check_every: host convergence checks every this many steps inside a cycle
            (``None``: 1 on the CPU, 10 on an accelerator).

    Example:
        >>> import torch
        >>> from solvers.gmres import GMRES, gmres
        >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
        >>> sol = gmres(lambda X: A @ X, torch.tensor([3.0, 3.0]), GMRES(tol=1e-8))
        >>> sol.value
        tensor([1., 1.])
    """

    tol: float = 1e-6
    atol: float = 0.0
    max_iters: int | None = None
    restart: int = 20
    preconditioner: Any = field(default=None, compare=False)
    x0: torch.Tensor | None = field(default=None, compare=False, repr=False)
    on_failure: str = "warn"
    check_every: int | None = None

    def __post_init__(self):
        validate_common(self, atol=True, preconditioner=True, x0=True)
        check_positive_int("GMRES", "restart", self.restart, allow_none=False)


def gmres(
    matmat: Matmat,
    B: torch.Tensor,
    alg: GMRES | None = None,
    x0: torch.Tensor | None = None,
    preconditioner=None,
    *,
    on_failure: str | None = None,
) -> Solution:
    """Solve ``A X = B`` by restarted GMRES (Saad and Schultz, 1986), all columns together.

    Each cycle runs up to ``restart`` Arnoldi steps per column (classical Gram-Schmidt
    done twice, batched over columns), reduces the Hessenberg matrix with Givens
    rotations, and stops a column when its residual estimate ``|gⱼ₊₁|`` meets
    ``tol·‖b‖ + atol``; then each column solves its own triangular system, x is updated
    and the true residual ``b − A x`` starts the next cycle.

    Cost: one product with A (and the preconditioner) per step, one more per cycle for
    the true residual; memory ``restart + 1`` blocks of the shape of B.

    A zero pivot in the Hessenberg reduction (A singular on the Krylov space) stops the
    column with ``Status.BREAKDOWN``; NaN or infinity gives ``Status.NONFINITE``.

    Args:
        matmat: ``X -> A X`` for X (n, k).
        B: right-hand sides (n, k) or (n,).
        alg: a :class:`GMRES` configuration (default ``GMRES()``).
        x0, preconditioner, on_failure: override the configuration's.

    Returns:
        A :class:`~solvers.result.Solution`; ``residuals`` has one row per Arnoldi step
        (the estimate, and the true residual at the end of each cycle); ``info`` has
        ``cycles``, ``column_iterations`` and ``products``.

    Example:
        >>> import torch
        >>> from solvers.gmres import GMRES, gmres
        >>> A = torch.tensor([[1.0, 2.0], [-2.0, 1.0]])
        >>> sol = gmres(lambda X: A @ X, torch.tensor([3.0, -1.0]))
        >>> sol.status.name, sol.value
        ('CONVERGED', tensor([1.0000, 1.0000]))
    """
    alg = GMRES() if alg is None else alg
    if not isinstance(alg, GMRES):
        raise TypeError(f"gmres takes a GMRES configuration, got {type(alg).__name__}.")
    on_failure = alg.on_failure if on_failure is None else check_on_failure(on_failure)
    B2, vector = prepare_rhs(B)
    n, k = B2.shape
    dtype, device = B2.dtype, B2.device
    X = prepare_x0(alg.x0 if x0 is None else x0, B2, vector)
    M = as_apply(alg.preconditioner if preconditioner is None else preconditioner)
    max_iters = alg.max_iters if alg.max_iters is not None else 10 * n
    check_every = check_every_for(device, alg.check_every)
    eps = torch.finfo(dtype).eps

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
            "GMRES: the right-hand side or x0 holds NaN or infinity; nothing was solved.",
            column_iterations=[0] * k, products=0, cycles=0,
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
    broken = torch.zeros(k, dtype=torch.bool, device=device)
    nonfinite = torch.zeros(k, dtype=torch.bool, device=device)
    stuck = torch.zeros(k, dtype=torch.bool, device=device)
    col_iters = torch.zeros(k, dtype=torch.long, device=device)
    history = [rnorm / scale]
    iterations = cycles = 0
    first = True
    one = torch.ones((), dtype=dtype, device=device)

    while iterations < max_iters:
        any_active, any_bad = torch.stack(
            [active.any(), (active & ~torch.isfinite(rnorm)).any()]
        ).tolist()
        if not any_active or any_bad:
            break
        cycles += 1
        m = min(alg.restart, n, max_iters - iterations)
        V = torch.zeros((m + 1, n, k), dtype=dtype, device=device)
        V[0] = torch.where(active, R / torch.where(active, rnorm, one), 0)
        H = torch.zeros((m + 1, m, k), dtype=dtype, device=device)
        g = torch.zeros((m + 1, k), dtype=dtype, device=device)
        g[0] = torch.where(active, rnorm, 0)
        # rot[i] = [[c, s], [−s, c]] per column, shaped to act on rows (i, i+1) of H
        rot = torch.zeros((m, 2, 2, k), dtype=dtype, device=device)
        cyc_active = active.clone()
        steps = torch.zeros(k, dtype=torch.long, device=device)
        rows = []
        last = rnorm / scale
        for j in range(m):
            if j > 0 and j % check_every == 0 and not bool(cyc_active.any()):
                break
            Z = M(V[j]) if M is not None else V[j]
            Wv = matmat(Z)
            if first:
                check_matmat_output(Wv, Z)
                first = False
            products += 1
            wnorm0 = col_norm(Wv)
            Vj = V[: j + 1]
            h = torch.einsum("ink,nk->ik", Vj, Wv)
            Wv = Wv - torch.einsum("ink,ik->nk", Vj, h)
            h2 = torch.einsum("ink,nk->ik", Vj, Wv)
            Wv = Wv - torch.einsum("ink,ik->nk", Vj, h2)
            h = h + h2
            hn = col_norm(Wv)
            lucky = ~(hn > eps * wnorm0)
            V[j + 1] = torch.where(lucky | ~cyc_active, 0, Wv / torch.where(lucky, one, hn))
            col = torch.cat([h, hn[None]], dim=0)  # (j + 2, k)
            for i in range(j):  # previous Givens rotations, one 2×2 product each
                col[i : i + 2] = (rot[i] * col[i : i + 2][None]).sum(1)
            denom = torch.hypot(col[j], col[j + 1])
            new_bad = cyc_active & ~torch.isfinite(denom)
            nonfinite |= new_bad
            new_break = cyc_active & ~new_bad & ~(denom > eps * wnorm0)
            safe = torch.where(denom > 0, denom, one)
            c = torch.where(denom > 0, col[j] / safe, one)
            s = torch.where(denom > 0, col[j + 1] / safe, 0)
            rot[j] = torch.stack([torch.stack([c, s]), torch.stack([-s, c])])
            col[j] = torch.where(denom > 0, denom, 0)
            col[j + 1] = 0
            H[: j + 2, j] = col
            g[j + 1] = -s * g[j]
            g[j] = c * g[j]
            good = cyc_active & ~new_break & ~new_bad
            steps += good
            broken |= new_break
            res = g[j + 1].abs()
            last = torch.where(good, res / scale, last)
            rows.append(last)
            cyc_active = good & ~(res <= thresh)
        # per-column triangular solves of size steps[c] (identity padding beyond)
        used = int(steps.max())
        if used > 0:
            Hs = H[:used, :used].permute(2, 0, 1)
            keep = torch.arange(used, device=device)[None, :] < steps[:, None]  # (k, used)
            eye = torch.eye(used, dtype=dtype, device=device).expand(k, used, used)
            Hs = torch.where(keep[:, :, None] & keep[:, None, :], Hs, eye)
            rhs = torch.where(keep, g[:used].T, 0)
            y = torch.linalg.solve_triangular(Hs, rhs[..., None], upper=True)[..., 0]
            update = torch.einsum("ink,ki->nk", V[:used], y)
            if M is not None:
                update = M(update)
            X = torch.where(active & (steps > 0), X + update, X)
            R = B2 - matmat(X)
            products += 1
            rnorm_before, rnorm = rnorm, col_norm(R)
            # a cycle that cut the true residual by less than 0.1%: restarting cannot help
            stuck |= active & ~(rnorm <= thresh) & ~(rnorm < 0.999 * rnorm_before)
            rows = rows[:used]
            rows[-1] = torch.where(active, rnorm / scale, rows[-1])
        history.extend(rows)
        col_iters += steps
        iterations += used
        active = active & ~(rnorm <= thresh) & ~broken & ~nonfinite & ~stuck
        if used == 0:
            break

    hist = history_to_cpu(history)
    final = hist[-1]
    info = dict(column_iterations=col_iters.tolist(), products=products, cycles=cycles)
    nonfinite = nonfinite.cpu() | ~torch.isfinite(final) | ~torch.isfinite(X).all(0).cpu()
    if bool(nonfinite.any()):
        cols = nonfinite.nonzero().flatten().tolist()
        msg = (
            f"GMRES: NaN or infinity appeared in column(s) {cols} after {iterations} "
            "iterations: the products of A (or of the preconditioner) are not finite. "
            "Check the operator for overflow or invalid values; try float64."
        )
        return done(X, Status.NONFINITE, iterations, hist, msg, **info)
    unconverged = (~(rnorm <= thresh)).cpu()
    bad_break = broken.cpu() & unconverged
    if bool(bad_break.any()):
        cols = bad_break.nonzero().flatten().tolist()
        msg = (
            f"GMRES broke down in column(s) {cols} (relative residual "
            f"{fmt(float(final[bad_break].max()))}): A is singular on the Krylov space, so "
            "the least-squares problem has no unique solution. Check that A is "
            "nonsingular, or add damping (A + λI)."
        )
        return done(X, Status.BREAKDOWN, iterations, hist, msg, **info)
    bad_stuck = stuck.cpu() & unconverged
    if bool(bad_stuck.any()):
        cols = bad_stuck.nonzero().flatten().tolist()
        msg = (
            f"GMRES stagnated in column(s) {cols}: a whole cycle of restart={alg.restart} "
            f"steps did not reduce the true residual ‖b − A x‖/‖b‖ = "
            f"{fmt(float(final[bad_stuck].max()))} (> tol={alg.tol}). Either tol is below what "
            f"{dtype} can reach for this A (use float64 or a looser tol), or the Krylov space "
            "of one cycle is too small for this A (use a larger restart or a preconditioner)."
        )
        return done(X, Status.BREAKDOWN, iterations, hist, msg, **info)
    if bool(unconverged.any()):
        worst = float(final[unconverged].max())
        msg = (
            f"GMRES did not converge in {iterations} iterations ({cycles} cycle(s) of at "
            f"most restart={alg.restart}, max_iters={max_iters}): relative residual "
            f"{fmt(worst)} > tol={alg.tol} in {int(unconverged.sum())} of {k} column(s). "
            "Try a larger restart, a larger max_iters, a looser tol or a preconditioner."
        )
        return done(X, Status.MAX_ITERS, iterations, hist, msg, **info)
    msg = (
        f"GMRES converged in {iterations} iterations ({cycles} cycle(s)): relative residual "
        f"{fmt(float(final.max()))} ≤ tol={alg.tol} (atol={alg.atol}) in all {k} column(s)."
    )
    return done(X, Status.CONVERGED, iterations, hist, msg, **info)
