"""Restarted GMRES for general (non-symmetric) systems, several right-hand sides.

``GMRES`` is the configuration, ``gmres`` the kernel on a function ``X -> A X``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ._krylov_loop import LinearSolve, columns, host_says_stop
from ._krylov_utils import (
    KeywordCheck,
    Matmat,
    check_matmat_output,
    check_positive_int,
    col_norm,
    fmt,
    validate_common,
)
from .result import Solution, Status

__all__ = ["GMRES", "gmres"]


@dataclass(frozen=True)
class GMRES(KeywordCheck):
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
    job = LinearSolve(GMRES, alg, B, x0, preconditioner, on_failure)
    if not job.inputs_finite:
        return job.nonfinite_inputs(cycles=0)
    X, R, rnorm, active = job.initial_residual(matmat)
    B2, n, k, M, max_iters = job.B, job.n, job.k, job.M, job.max_iters
    thresh, scale, restart = job.thresh, job.scale, job.alg.restart
    dtype, device = B2.dtype, B2.device
    eps = torch.finfo(dtype).eps
    products = job.products
    broken = torch.zeros(k, dtype=torch.bool, device=device)
    nonfinite = torch.zeros(k, dtype=torch.bool, device=device)
    stuck = torch.zeros(k, dtype=torch.bool, device=device)
    col_iters = torch.zeros(k, dtype=torch.long, device=device)
    history = [rnorm / scale]
    iterations = cycles = 0
    first = True
    one = torch.ones((), dtype=dtype, device=device)

    while iterations < max_iters:
        if host_says_stop(active, rnorm):
            break
        cycles += 1
        m = min(restart, n, max_iters - iterations)
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
            if j > 0 and j % job.check_every == 0 and not bool(cyc_active.any()):
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

    hist = job.history(history)
    final = hist[-1]
    info = dict(column_iterations=col_iters.tolist(), products=products, cycles=cycles)
    end = job.reporter(X, iterations, hist, info)
    if cols := columns(nonfinite.cpu() | job.nonfinite_columns(final, X)):
        return end(Status.NONFINITE, job.nonfinite_message(cols, iterations))
    unconverged = (~(rnorm <= thresh)).cpu()
    if cols := columns(broken.cpu() & unconverged):
        msg = (
            f"GMRES broke down in column(s) {cols} (relative residual "
            f"{fmt(float(final[cols].max()))}): A is singular on the Krylov space, so "
            "the least-squares problem has no unique solution. Check that A is "
            "nonsingular, or add damping (A + λI)."
        )
        return end(Status.BREAKDOWN, msg)
    if cols := columns(stuck.cpu() & unconverged):
        msg = (
            f"GMRES stagnated in column(s) {cols}: a whole cycle of restart={restart} "
            f"steps did not reduce the true residual ‖b − A x‖/‖b‖ = "
            f"{fmt(float(final[cols].max()))} (> tol={job.alg.tol}). Either tol is below "
            f"what {dtype} can reach for this A (use float64 or a looser tol), or the Krylov "
            "space of one cycle is too small for this A (use a larger restart or a "
            "preconditioner)."
        )
        return end(Status.BREAKDOWN, msg)
    if cols := columns(unconverged):
        msg = job.unconverged_message(
            iterations, f"{cycles} cycle(s) of at most restart={restart}, "
            f"max_iters={max_iters}", cols, final,
            "Try a larger restart, a larger max_iters, a looser tol or a preconditioner.",
        )  # fmt: skip
        return end(Status.MAX_ITERS, msg)
    msg = job.converged_message(iterations, float(final.max()), f" ({cycles} cycle(s))")
    return end(Status.CONVERGED, msg)
