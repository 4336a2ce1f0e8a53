"""LOBPCG: a block eigen-solver for a few extreme eigenpairs of a symmetric operator.

Own implementation (``torch.lobpcg`` only finds the largest or smallest algebraic
eigenvalues, takes no callable operator, and breaks on rank-deficient bases).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ._krylov_utils import (
    KeywordCheck,
    Matmat,
    as_apply,
    check_matmat_output,
    check_operator_like,
    check_positive_int,
    check_real,
    check_seed,
    col_norm,
    eigen_residual_tol,
    fmt,
    random_block,
)
from ._precision import floor_eps, in_working_precision
from .dense_algs import select_eigen
from .lanczos import _WHICH_NAMES, _check_eig_args, _leading_converged
from .result import Solution, Status, check_on_failure, report

__all__ = ["LOBPCG", "lobpcg"]


@dataclass(frozen=True)
class LOBPCG(KeywordCheck):
    """Locally optimal block preconditioned conjugate gradient (Knyazev, 2001).

    Each iteration does a Rayleigh-Ritz step on the span of the current block X, the
    (preconditioned) residuals W and the previous search directions P.

    Stopping rule, for each of the k wanted pairs: ``‖A xᵢ − θᵢ xᵢ‖ ≤ τ·|θᵢ| +
    10·eps·max|θ|`` with ``‖xᵢ‖ = 1`` and ``τ = min(tol, 1e-3)`` (the cap, as for
    Lanczos, keeps a loose tol from settling on the second eigenvalue), the residual
    computed from an explicit product with A once the recurrence says so.

    Args:
        tol: relative tolerance of the eigen-residual (≥ 0).
        max_iters: at most this many iterations (``None``: 500).
        preconditioner: ``None``, or an operator / square tensor / callable ``X -> M X``;
            for the smallest eigenvalues, ``M ≈ A⁻¹`` (symmetric positive definite).
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"``.
        seed: seed of the random start block; ``None``: torch's global RNG (for an
            operator built with ``process_group=``: rank 0's, shared by every rank).
        block_size: number of vectors iterated (``None``: k); a few more than k speeds up
            convergence when the k-th and (k+1)-th eigenvalues are close, and finds
            repeated eigenvalues.

    Half-precision operators multiply in their dtype; everything else runs in float32 (see
    ``solvers._precision``). Each iteration synchronizes with the host once (a Rayleigh-Ritz
    problem of size at most ``3·block_size`` is solved in float64 on the CPU).

    Example:
        >>> import torch
        >>> from solvers.lobpcg import LOBPCG, lobpcg
        >>> A = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))
        >>> sol = lobpcg(lambda X: A @ X, 50, torch.float64, "cpu", LOBPCG(seed=0), k=2)
        >>> sol.value[0].round(decimals=6)
        tensor([50., 49.], dtype=torch.float64)
    """

    tol: float = 1e-6
    max_iters: int | None = None
    preconditioner: Any = field(default=None, compare=False)
    on_failure: str = "warn"
    seed: int | None = None
    block_size: int | None = None

    def __post_init__(self):
        check_real("LOBPCG", "tol", self.tol)
        check_positive_int("LOBPCG", "max_iters", self.max_iters)
        check_operator_like("LOBPCG", "preconditioner", self.preconditioner)
        check_on_failure(self.on_failure, "LOBPCG: on_failure")
        check_seed("LOBPCG", self.seed)
        check_positive_int("LOBPCG", "block_size", self.block_size)


def _rayleigh_ritz(S, AS, m: int, which: str):
    """Ritz pairs of A on span(S): ``(θ (m,), Z (s, m))`` with ``S Z`` orthonormal.

    The basis is orthonormalized through its Gram matrix in float64 on the host; the
    directions with relative Gram eigenvalue below ``eps^(2/3)`` (nearly dependent) are
    dropped.
    """
    dtype, device = S.dtype, S.device
    G = (S.mT @ S).to(device="cpu", dtype=torch.float64)
    T = (S.mT @ AS).to(device="cpu", dtype=torch.float64)
    T = (T + T.mT) / 2
    d = G.diagonal().sqrt()
    d = torch.where(d > 0, d, torch.ones_like(d))
    Gn = G / d[:, None] / d[None, :]
    Tn = T / d[:, None] / d[None, :]
    e, V = torch.linalg.eigh(Gn)
    keep = e > torch.finfo(dtype).eps ** (2 / 3) * e.max()
    C = V[:, keep] / e[keep].sqrt()
    theta, Y = torch.linalg.eigh(C.mT @ Tn @ C)
    mm = min(m, theta.shape[0])
    idx = select_eigen(theta, mm, which)
    Z = (C @ Y[:, idx]) / d[:, None]
    return theta[idx], Z.to(dtype=dtype, device=device)


def lobpcg(
    matmat: Matmat,
    n: int,
    dtype: torch.dtype,
    device,
    alg: LOBPCG | None = None,
    k: int = 1,
    which: str = "LA",
    X0: torch.Tensor | None = None,
    preconditioner=None,
    *,
    on_failure: str | None = None,
) -> Solution:
    """The ``k`` wanted eigenpairs of a symmetric A by LOBPCG.

    Iteration: ``R = A X − X Θ``; ``W = M R`` for the columns not yet converged (soft
    locking), made orthogonal to X; Rayleigh-Ritz on ``[X, W, P]`` gives the new X
    (the wanted Ritz vectors) and ``P`` (their components along W and P). ``A X`` and
    ``A P`` are updated from the Rayleigh-Ritz coefficients, so an iteration costs one
    product with the active columns of W; convergence is confirmed with an explicit
    product ``A X``.

    Args:
        matmat: ``X -> A X`` for X (n, b); A symmetric (assumed, not checked).
        n, dtype, device: size, dtype and device of A.
        alg: a :class:`LOBPCG` configuration.
        k: number of eigenpairs.
        which: ``"LA"``, ``"SA"`` or ``"LM"`` (largest algebraic, smallest algebraic,
            largest magnitude; the last one is a heuristic for LOBPCG, which optimizes the
            Rayleigh quotient: prefer Lanczos for it).
        X0: start block (n, b) with b ≥ 1 (``None``: random normal); columns are added at
            random up to the block size.
        preconditioner: overrides ``alg.preconditioner``.
        on_failure: overrides ``alg.on_failure``.

    Returns:
        A :class:`~solvers.result.Solution` with ``value = (eigenvalues (k,),
        eigenvectors (n, k))``, most wanted first, and ``residuals``
        ``(iterations + 1, k)``: ``‖A xᵢ − θᵢ xᵢ‖ / |θᵢ|`` per iteration.

    Example:
        >>> import torch
        >>> from solvers.lobpcg import LOBPCG, lobpcg
        >>> A = torch.diag(torch.tensor([-3.0, 0.5, 1.0, 2.0], dtype=torch.float64))
        >>> sol = lobpcg(lambda X: A @ X, 4, torch.float64, "cpu", LOBPCG(seed=0), which="SA")
        >>> sol.value[0].round(decimals=6)
        tensor([-3.], dtype=torch.float64)
    """
    alg = LOBPCG() if alg is None else alg
    if not isinstance(alg, LOBPCG):
        raise TypeError(f"lobpcg takes a LOBPCG configuration, got {type(alg).__name__}.")
    _check_eig_args("lobpcg", n, dtype, k, which)
    on_failure = alg.on_failure if on_failure is None else check_on_failure(on_failure)
    device = torch.device(device)
    M = as_apply(alg.preconditioner if preconditioner is None else preconditioner)
    max_iters = alg.max_iters if alg.max_iters is not None else 500
    out_dtype, eps_op = dtype, floor_eps(dtype)
    matmat, dtype = in_working_precision(matmat, dtype)
    if M is not None and dtype != out_dtype:
        M_op = M
        M = lambda R: M_op(R.to(out_dtype)).to(dtype)  # noqa: E731
    eps = torch.finfo(dtype).eps
    rtol = eigen_residual_tol(alg.tol)
    m = max(k, alg.block_size or k)
    if X0 is not None:
        if not isinstance(X0, torch.Tensor) or X0.ndim not in (1, 2) or X0.shape[0] != n:
            raise ValueError(
                f"lobpcg: X0 must have shape ({n}, b), got {getattr(X0, 'shape', X0)}."
            )
        X0 = X0.reshape(n, -1).to(dtype=dtype, device=device)
        m = max(m, X0.shape[1])
    m = min(m, n)
    X = random_block(n, m, dtype, device, alg.seed)
    if X0 is not None:
        X[:, : X0.shape[1]] = X0[:, :m]

    def nan_result(status, iterations, rows, message, **info):
        vals = torch.full((k,), float("nan"), dtype=dtype, device=device)
        vecs = torch.full((n, k), float("nan"), dtype=dtype, device=device)
        return finish((vals, vecs), status, iterations, rows, message, **info)

    def finish(value, status, iterations, rows, message, **info):
        hist = torch.stack(rows).to(dtype=torch.float64)
        value = tuple(v.to(out_dtype) for v in value)
        sol = Solution(value, status, iterations, hist, alg, message, info)
        return report(sol, on_failure)

    nan_row = torch.full((k,), float("nan"), dtype=torch.float64)
    if not bool(torch.isfinite(X).all()):
        return nan_result(
            Status.NONFINITE,
            0,
            [nan_row],
            "LOBPCG: the start block X0 holds NaN or infinity.",
            products=0,
        )
    X = torch.linalg.qr(X).Q
    AX = matmat(X)
    check_matmat_output(AX, X)
    products = m
    if not bool(torch.isfinite(AX).all()):
        return nan_result(
            Status.NONFINITE,
            0,
            [nan_row],
            "LOBPCG: the products of A hold NaN or infinity.",
            products=products,
        )
    theta, Z = _rayleigh_ritz(X, AX, m, which)
    X, AX = X @ Z, AX @ Z
    P = AP = None
    rows = []  # one row per iteration, from the start block on
    status = Status.MAX_ITERS
    iterations = 0
    confirmed_at = -1
    while True:
        th = theta.to(dtype=dtype, device=device)
        R = AX - X * th
        rn = col_norm(R).to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(rn).all() & torch.isfinite(theta).all()):
            status = Status.NONFINITE
            break
        thr = rtol * theta.abs() + 10 * eps_op * theta.abs().max()
        conv = rn <= thr
        rows.append(rn[:k] / theta[:k].abs().clamp_min(torch.finfo(torch.float64).tiny))
        if bool(conv[:k].all()):
            if confirmed_at == iterations:
                status = Status.CONVERGED
                break
            # confirm with an explicit product (A X drifts when updated by recurrence)
            AX = matmat(X)
            products += m
            confirmed_at = iterations
            rows.pop()
            continue
        if iterations >= max_iters:
            break
        iterations += 1
        act = (~conv).nonzero().flatten().to(device)
        W = R[:, act]
        if M is not None:
            W = M(W)
        for _ in range(2):
            W = W - X @ (X.mT @ W)
        W = W / col_norm(W).clamp_min(torch.finfo(dtype).tiny)
        AW = matmat(W)
        products += W.shape[1]
        blocks, images = [X, W], [AX, AW]
        if P is not None:
            # P made orthogonal to X; its image follows from the stored A P and A X
            Pa, APa = P[:, act], AP[:, act]
            before = col_norm(Pa)
            for _ in range(2):
                c = X.mT @ Pa
                Pa, APa = Pa - X @ c, APa - AX @ c
            after = col_norm(Pa)
            ok = (after > eps**0.5 * before).nonzero().flatten()
            if ok.numel():
                nrm = after[ok]
                blocks.append(Pa[:, ok] / nrm)
                images.append(APa[:, ok] / nrm)
        S = torch.cat(blocks, dim=1)
        AS = torch.cat(images, dim=1)
        theta, Z = _rayleigh_ritz(S, AS, m, which)
        X_new, AX_new = S @ Z, AS @ Z
        P, AP = S[:, m:] @ Z[m:], AS[:, m:] @ Z[m:]
        X, AX = X_new, AX_new

    if status is Status.NONFINITE:
        return nan_result(
            Status.NONFINITE, iterations, rows,
            f"LOBPCG: NaN or infinity appeared by iteration {iterations}: check the operator "
            "and the preconditioner for overflow or invalid values; try float64.",
            products=products,
        )  # fmt: skip
    vals = theta[:k].to(dtype=dtype, device=device)
    vecs = X[:, :k]
    count = k if status is Status.CONVERGED else _leading_converged(
        rn[:k].numpy(), thr[:k].numpy(), k)
    info = dict(products=products, block_size=m, converged_count=count)
    worst = float(rows[-1].max())
    name = _WHICH_NAMES[which]
    if status is Status.CONVERGED:
        msg = (
            f"LOBPCG converged in {iterations} iterations: the {k} {name} eigenpair(s) have "
            f"relative residual ≤ {fmt(worst)} (tol={alg.tol}, residual test at {rtol})."
        )
    else:
        msg = (
            f"LOBPCG did not converge in {iterations} iterations (max_iters={max_iters}): "
            f"relative residual {fmt(worst)} > {rtol} (tol={alg.tol}). Try a larger max_iters, a "
            "preconditioner, a larger block_size (when eigenvalues are clustered) or a looser tol."
        )
    return finish((vals, vecs), status, iterations, rows, msg, **info)
