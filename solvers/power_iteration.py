"""Power iteration for the eigenvalue of largest magnitude, negative ones included."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._krylov_utils import (
    KeywordCheck,
    Matmat,
    check_every_for,
    check_matmat_output,
    check_seed,
    fmt,
    random_block,
    validate_common,
)
from ._precision import floor_eps, in_working_precision
from .result import Solution, Status, check_on_failure, report

__all__ = ["PowerIteration", "power_iteration"]


@dataclass(frozen=True)
class PowerIteration(KeywordCheck):
    """Power iteration ``v ← A v / ‖A v‖`` for the dominant (largest-magnitude) eigenpair.

    Stopping rule: ``‖A v − λ v‖ ≤ tol·|λ|`` with the Rayleigh quotient ``λ = vᵀ A v``
    (so a negative dominant eigenvalue is found with its sign, and convergence is judged on
    the eigen-residual, not on λ ceasing to change). Converges like ``|λ₂/λ₁|ʲ``; prefer
    Lanczos when the two largest magnitudes are close. Half-precision operators multiply in
    their dtype and the iteration runs in float32 (``solvers._precision``).

    Args:
        tol: relative tolerance of the eigen-residual (≥ 0).
        max_iters: at most this many products (``None``: 1000).
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"``.
        seed: seed of the random start vector; ``None``: torch's global RNG (for an
            operator built with ``process_group=``: rank 0's, shared by every rank).
        check_every: host convergence checks every this many iterations (``None``: 1 on
            the CPU, 10 on an accelerator).

    Example:
        >>> import torch
        >>> from solvers.power_iteration import PowerIteration, power_iteration
        >>> A = torch.diag(torch.tensor([-4.0, 1.0, 2.0]))
        >>> sol = power_iteration(lambda X: A @ X, 3, torch.float32, "cpu",
        ...                       PowerIteration(seed=0))
        >>> round(float(sol.value[0][0]), 4)
        -4.0
    """

    tol: float = 1e-6
    max_iters: int | None = None
    on_failure: str = "warn"
    seed: int | None = None
    check_every: int | None = None

    def __post_init__(self):
        validate_common(self)
        check_seed("PowerIteration", self.seed)


def power_iteration(
    matmat: Matmat,
    n: int,
    dtype: torch.dtype,
    device,
    alg: PowerIteration | None = None,
    v0: torch.Tensor | None = None,
    *,
    on_failure: str | None = None,
) -> Solution:
    """The dominant eigenpair (largest ``|λ|``) of a symmetric A by power iteration.

    Each iteration: ``w = A v``, ``λ = vᵀ w``, residual ``‖w − λ v‖``, then
    ``v ← w / ‖w‖``; the pair is frozen on the device as soon as
    ``‖w − λ v‖ ≤ tol·|λ|`` holds, and the host looks every ``check_every`` iterations.
    Cost: one product with A per iteration.

    Args:
        matmat: ``X -> A X`` for X (n, 1); A symmetric (assumed, not checked).
        n, dtype, device: size, dtype and device of A.
        alg: a :class:`PowerIteration` configuration.
        v0: start vector (n,) (``None``: random normal).
        on_failure: overrides ``alg.on_failure``.

    Returns:
        A :class:`~solvers.result.Solution` with ``value = (eigenvalue (1,),
        eigenvector (n, 1))`` and ``residuals`` ``(iterations + 1, 1)``, the relative
        eigen-residual ``‖A v − λ v‖ / |λ|`` per iteration (NaN before the first).

    Example:
        >>> import torch
        >>> from solvers.power_iteration import power_iteration
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
        >>> lam, v = power_iteration(lambda X: A @ X, 2, torch.float32, "cpu").value
        >>> round(float(lam[0]), 4)
        3.0
    """
    alg = PowerIteration() if alg is None else alg
    if not isinstance(alg, PowerIteration):
        raise TypeError(
            f"power_iteration takes a PowerIteration configuration, got {type(alg).__name__}."
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"power_iteration: n must be a positive int, got {n!r}.")
    on_failure = alg.on_failure if on_failure is None else check_on_failure(on_failure)
    device = torch.device(device)
    max_iters = alg.max_iters if alg.max_iters is not None else 1000
    check_every = check_every_for(device, alg.check_every)
    out_dtype, eps = dtype, floor_eps(dtype)
    matmat, dtype = in_working_precision(matmat, dtype)

    if v0 is None:
        v = random_block(n, 1, dtype, device, alg.seed)
    else:
        if not isinstance(v0, torch.Tensor) or v0.shape not in ((n,), (n, 1)):
            raise ValueError(f"power_iteration: v0 must have shape ({n},).")
        v = v0.reshape(n, 1).to(dtype=dtype, device=device)
    vnorm = torch.linalg.vector_norm(v)

    def done(lam, vec, status, iterations, rows, message, **info):
        hist = torch.stack(rows).to(device="cpu", dtype=torch.float64)[:, None]
        info["converged_count"] = int(status is Status.CONVERGED)
        sol = Solution((lam.to(out_dtype), vec.to(out_dtype)), status, iterations, hist, alg,
                       message, info)
        return report(sol, on_failure)

    nan_row = torch.full((), float("nan"), dtype=torch.float64, device=device)
    if not bool(torch.isfinite(vnorm) & (vnorm > 0)):
        return done(
            torch.full((1,), float("nan"), dtype=dtype, device=device),
            torch.full((n, 1), float("nan"), dtype=dtype, device=device),
            Status.NONFINITE, 0, [nan_row],
            "PowerIteration: the start vector is zero or not finite; give a nonzero v0 or None.",
            products=0,
        )  # fmt: skip
    v = v / vnorm
    lam = torch.zeros((), dtype=dtype, device=device)
    conv = torch.zeros((), dtype=torch.bool, device=device)
    rows = [nan_row]
    it = 0
    iters_done = torch.zeros((), dtype=torch.long, device=device)
    while it < max_iters:
        if it % check_every == 0 and it > 0:
            if bool(conv | ~torch.isfinite(lam)):
                break
        w = matmat(v)
        if it == 0:
            check_matmat_output(w, v)
        it += 1
        lam_new = (v * w).sum()
        res = torch.linalg.vector_norm(w - lam_new * v)
        now = ~conv & (res <= alg.tol * lam_new.abs() + 10 * eps * lam_new.abs())
        iters_done = iters_done + (~conv).long()
        rel = res.to(torch.float64) / lam_new.abs().to(torch.float64)
        rows.append(torch.where(conv, rows[-1], rel))
        lam = torch.where(conv, lam, lam_new)
        wnorm = torch.linalg.vector_norm(w)
        step = ~conv & ~now & (wnorm > 0)
        v = torch.where(step, w / torch.where(wnorm > 0, wnorm, 1), v)
        conv = conv | now

    iterations = int(iters_done)
    rows = rows[: iterations + 1]
    info = dict(products=it)
    lam1 = lam.reshape(1)
    if not bool(torch.isfinite(lam) & torch.isfinite(v).all()):
        return done(
            torch.full((1,), float("nan"), dtype=dtype, device=device),
            torch.full((n, 1), float("nan"), dtype=dtype, device=device),
            Status.NONFINITE, iterations, rows,
            f"PowerIteration: NaN or infinity appeared in the products of A by iteration "
            f"{iterations}. Check the operator for overflow or invalid values.", **info,
        )  # fmt: skip
    last = float(rows[-1])
    if bool(conv):
        msg = (
            f"PowerIteration converged in {iterations} iterations: λ = {fmt(float(lam))}, "
            f"relative residual ‖Av − λv‖/|λ| = {fmt(last)} ≤ tol={alg.tol}."
        )
        return done(lam1, v, Status.CONVERGED, iterations, rows, msg, **info)
    msg = (
        f"PowerIteration did not converge in {iterations} iterations: λ ≈ {fmt(float(lam))}, "
        f"relative residual {fmt(last)} > tol={alg.tol}. It converges like |λ₂/λ₁|ʲ, slowly "
        "when the two largest magnitudes are close (or not at all for eigenvalues ±λ); use "
        "Lanczos (which='LM'), or a larger max_iters."
    )
    return done(lam1, v, Status.MAX_ITERS, iterations, rows, msg, **info)
