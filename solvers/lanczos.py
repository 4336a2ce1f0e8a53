"""Lanczos for extreme eigenpairs of a symmetric operator, and the tridiagonalization
behind stochastic Lanczos quadrature.

``Lanczos`` is the configuration; ``lanczos`` finds k eigenpairs; ``lanczos_tridiag``
returns the raw coefficients ``(α, β, Q)`` of a fixed number of steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from ._krylov_utils import (
    KeywordCheck,
    Matmat,
    check_bool,
    check_dtype,
    check_every_for,
    check_matmat_output,
    check_positive_int,
    check_seed,
    eigen_residual_tol,
    fmt,
    random_block,
    validate_common,
)
from ._precision import floor_eps, in_working_precision
from .dense_algs import select_eigen
from .result import Solution, Status, check_on_failure, report

__all__ = ["Lanczos", "lanczos", "lanczos_tridiag"]

_WHICH_NAMES = {"LA": "largest algebraic", "SA": "smallest algebraic", "LM": "largest magnitude"}


@dataclass(frozen=True)
class Lanczos(KeywordCheck):
    """The Lanczos process for a few extreme eigenpairs of a symmetric A.

    Stopping rule: every wanted Ritz pair ``(θᵢ, yᵢ)`` has the residual estimate
    ``‖A yᵢ − θᵢ yᵢ‖ = |βⱼ sⱼᵢ| ≤ τ·|θᵢ| + 10·eps·max|θ|`` with ``τ = min(tol, 1e-3)``
    (``sⱼᵢ`` the last entry of the eigenvector of the tridiagonal matrix, ``eps`` the
    machine epsilon of the dtype). Then some eigenvalue of A lies within ``τ·|θᵢ|`` of
    ``θᵢ`` (and usually within ``(τ·θᵢ)²/gap``). The cap at 1e-3 is there because a
    loose residual test lets a Ritz value settle on the second eigenvalue while the first
    is still hidden (CoLA's eigmax with tol=1e-2 is 14% low on the reference GGN); with it,
    ``tol=1e-2`` gives the top eigenvalue of that GGN to 0.03% in about 8 products.

    Args:
        tol: relative tolerance of the eigen-residual (≥ 0).
        max_iters: at most this many Lanczos steps, each one product with A
            (``None``: ``min(n, max(300, 10·k))``). Memory: one vector of size n per step.
        reorthogonalize: full reorthogonalization against all previous Lanczos vectors
            (classical Gram-Schmidt twice). Without it, rounding creates spurious copies
            of converged eigenvalues; keep it on for ``k > 1``.
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"``.
        seed: seed of the random start (and restart) vectors; ``None``: torch's global RNG
            (for an operator built with ``process_group=``: rank 0's, shared by every rank).
        check_every: convergence checks (a small tridiagonal eigenproblem on the host)
            every this many steps (``None``: 1 on the CPU, 10 on an accelerator).
        block_size: vectors per step (``None``: 1 for k = 1, else k). Block Lanczos with a
            block of b ≥ k vectors finds an eigenvalue repeated up to b times (a single
            vector sees one copy of it per Krylov space: ``eig(A, k=3)`` with the top
            eigenvalue repeated 5 times then returns one copy and the next eigenvalues);
            each step multiplies A with b columns at once and syncs with the host once.

    Half-precision operators (float16, bfloat16) multiply in their dtype; the Krylov basis,
    the coefficients and the tests are computed in float32 (``solvers._precision``), and
    ``eps`` above is the operator's.

    Example:
        >>> import torch
        >>> from solvers.lanczos import Lanczos, lanczos
        >>> A = torch.diag(torch.arange(1.0, 101.0))
        >>> sol = lanczos(lambda X: A @ X, 100, torch.float32, "cpu", Lanczos(tol=1e-4, seed=0))
        >>> round(float(sol.value[0][0]), 2)
        100.0
    """

    tol: float = 1e-6
    max_iters: int | None = None
    reorthogonalize: bool = True
    on_failure: str = "warn"
    seed: int | None = None
    check_every: int | None = None
    block_size: int | None = None

    def __post_init__(self):
        validate_common(self)
        check_bool("Lanczos", "reorthogonalize", self.reorthogonalize)
        check_seed("Lanczos", self.seed)
        check_positive_int("Lanczos", "block_size", self.block_size)


def _check_eig_args(fname: str, n, dtype, k, which):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{fname}: n must be a positive int, got {n!r}.")
    check_dtype(f"{fname}: dtype", dtype)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"{fname}: k must be an int in [1, n={n}], got {k!r}.")
    if which not in _WHICH_NAMES:
        raise ValueError(
            f"{fname}: which must be 'LA' (largest algebraic), 'SA' (smallest algebraic) or "
            f"'LM' (largest magnitude); got {which!r}."
        )


def _start_vector(v0, n, dtype, device, gen_seed) -> torch.Tensor:
    if v0 is None:
        return random_block(n, 1, dtype, device, gen_seed)[:, 0]
    if not isinstance(v0, torch.Tensor) or v0.shape not in ((n,), (n, 1)):
        shape = tuple(v0.shape) if isinstance(v0, torch.Tensor) else type(v0).__name__
        raise ValueError(f"v0 must be a tensor of shape ({n},), got {shape}.")
    return v0.reshape(n).to(dtype=dtype, device=device)


def _breakdown_ratio(eps: float) -> float:
    """``βⱼ`` below this times ``max(|α| + β)`` is a breakdown (an invariant subspace).

    Rounding in the products leaves ``βⱼ`` well above ``eps·‖A‖`` after an invariant
    subspace (``~1e-12·‖A‖`` in float64 for a low-rank A), hence a margin above eps.
    """
    return max(100 * eps, 1e-2 * math.sqrt(eps))


def _orthogonalize(w: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``w`` minus its projection on the orthonormal columns of Q, twice (CGS2)."""
    w = w - Q @ (Q.mT @ w)
    return w - Q @ (Q.mT @ w)


def _ritz(alphas: np.ndarray, betas: np.ndarray):
    """Eigen-decomposition of the symmetric tridiagonal T (float64, on the host)."""
    return eigh_tridiagonal(alphas, betas[: len(alphas) - 1])


def lanczos(
    matmat: Matmat,
    n: int,
    dtype: torch.dtype,
    device,
    alg: Lanczos | None = None,
    k: int = 1,
    which: str = "LA",
    v0: torch.Tensor | None = None,
    *,
    on_failure: str | None = None,
) -> Solution:
    """The ``k`` wanted eigenpairs of a symmetric A by the Lanczos process.

    Builds an orthonormal basis ``Q`` of the Krylov space of ``v0`` and the tridiagonal
    ``T = Qᵀ A Q`` (coefficients ``αⱼ``, ``βⱼ`` kept in float64), and returns the wanted
    Ritz pairs ``(θᵢ, Q sᵢ)`` of T. Stops when they meet the rule of :class:`Lanczos`
    (not only on breakdown). An invariant subspace (``βⱼ ≈ 0``) is exact: the process
    restarts with a random vector orthogonal to Q, which finds repeated eigenvalues, and
    stops once a restart changes nothing wanted or the space is exhausted.

    Cost: one product with A per step, ``O(n·j)`` for reorthogonalization at step j,
    and a host tridiagonal eigenproblem per check. With ``block_size`` b > 1 (the default
    for k > 1) it runs block Lanczos instead (``_block_lanczos``): each step multiplies b
    columns, and an exhausted direction is deflated and restarted at random; ``iterations``
    then counts block steps and ``info["products"]`` the products.

    Args:
        matmat: ``X -> A X`` for X of shape (n, 1); A symmetric (assumed, not checked).
        n, dtype, device: size, dtype and device of A.
        alg: a :class:`Lanczos` configuration (default ``Lanczos()``).
        k: number of eigenpairs.
        which: ``"LA"`` (largest algebraic), ``"SA"`` (smallest algebraic) or ``"LM"``
            (largest magnitude).
        v0: start vector (n,) (``None``: random normal, from ``alg.seed``).
        on_failure: overrides ``alg.on_failure``.

    Returns:
        A :class:`~solvers.result.Solution` with ``value = (eigenvalues (k,),
        eigenvectors (n, k))``, most wanted first (``"LA"``: descending; ``"SA"``:
        ascending; ``"LM"``: by decreasing magnitude), in ``dtype`` on ``device``;
        ``residuals`` of shape ``(iterations + 1, k)``: the relative residual estimate
        ``|βⱼ sⱼᵢ| / |θᵢ|`` at each checked step (NaN elsewhere).

    Example:
        >>> import torch
        >>> from solvers.lanczos import Lanczos, lanczos
        >>> A = torch.diag(torch.tensor([-5.0, 1.0, 2.0, 3.0]))
        >>> vals, vecs = lanczos(lambda X: A @ X, 4, torch.float32, "cpu",
        ...                      Lanczos(seed=0), k=2, which="LM").value
        >>> vals.round(decimals=4)
        tensor([-5.,  3.])
    """
    alg = Lanczos() if alg is None else alg
    if not isinstance(alg, Lanczos):
        raise TypeError(f"lanczos takes a Lanczos configuration, got {type(alg).__name__}.")
    _check_eig_args("lanczos", n, dtype, k, which)
    on_failure = alg.on_failure if on_failure is None else check_on_failure(on_failure)
    device = torch.device(device)
    m_max = min(n, alg.max_iters if alg.max_iters is not None else max(300, 10 * k))
    check_every = check_every_for(device, alg.check_every)
    out_dtype, eps_op = dtype, floor_eps(dtype)
    matmat, dtype = in_working_precision(matmat, dtype)
    block = alg.block_size if alg.block_size is not None else (1 if k == 1 else k)
    if block > 1:
        if v0 is not None:
            raise ValueError("lanczos: v0 is a single start vector; block Lanczos "
                             f"(block_size={block}) starts from a random block. Pass "
                             "Lanczos(block_size=1) to start from v0.")
        sol = _block_lanczos(matmat, n, dtype, device, alg, k, which, min(block, n), m_max,
                             check_every, eps_op)
        vals, vecs = sol.value
        sol.value = (vals.to(out_dtype), vecs.to(out_dtype))
        return report(sol, on_failure)
    eps = torch.finfo(dtype).eps
    eps_floor = eps_op
    rtol = eigen_residual_tol(alg.tol)
    gen = None
    if alg.seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(alg.seed)

    def randvec():
        return torch.randn(n, dtype=dtype, device=device, generator=gen)

    def done(vals, vecs, status, iterations, rows, message, **info):
        hist = torch.stack(rows) if rows else torch.full((1, k), float("nan"))
        hist = hist.to(torch.float64)
        sol = Solution((vals.to(out_dtype), vecs.to(out_dtype)), status, iterations, hist,
                       alg, message, info)
        return report(sol, on_failure)

    q = _start_vector(v0, n, dtype, device, None) if v0 is not None else randvec()
    qnorm = torch.linalg.vector_norm(q)
    if not bool(torch.isfinite(qnorm)) or float(qnorm) == 0:
        bad = "NaN or infinity" if not bool(torch.isfinite(qnorm)) else "zero"
        return done(
            torch.full((k,), float("nan"), dtype=dtype, device=device),
            torch.full((n, k), float("nan"), dtype=dtype, device=device),
            Status.NONFINITE if bad != "zero" else Status.BREAKDOWN, 0, [],
            f"Lanczos: the start vector v0 is {bad}; give a nonzero finite v0 or None.",
            products=0, restarts=0,
        )  # fmt: skip

    cap = min(m_max + 1, 64)
    Q = torch.empty((n, cap), dtype=dtype, device=device)
    Q[:, 0] = q / qnorm
    alphas = torch.zeros(m_max, dtype=torch.float64, device=device)
    betas = torch.zeros(m_max, dtype=torch.float64, device=device)
    rows = [torch.full((k,), float("nan"), dtype=torch.float64)]
    j = last_check = products = restarts = 0
    wanted_at_breakdown = None
    status = None
    theta = S = idx = None

    while True:
        qj = Q[:, j : j + 1]
        w = matmat(qj)
        if products == 0:
            check_matmat_output(w, qj)
        products += 1
        alpha = (qj * w).sum()
        w = w - alpha * qj
        if j > 0:
            w = w - betas[j - 1].to(dtype) * Q[:, j - 1 : j]
        if alg.reorthogonalize:
            w = _orthogonalize(w, Q[:, : j + 1])
        beta = torch.linalg.vector_norm(w)
        alphas[j] = alpha.to(torch.float64)
        betas[j] = beta.to(torch.float64)
        j += 1
        if j >= Q.shape[1] and j < m_max + 1:
            grown = torch.empty((n, min(2 * Q.shape[1], m_max + 1)), dtype=dtype, device=device)
            grown[:, :j] = Q[:, :j]
            Q = grown
        if j < Q.shape[1]:
            Q[:, j : j + 1] = w / torch.clamp(beta, min=torch.finfo(dtype).tiny)
        if j % check_every != 0 and j < m_max:
            rows.append(torch.full((k,), float("nan"), dtype=torch.float64))
            continue

        # ---- host check: breakdown, Ritz values, convergence
        a = alphas[:j].cpu().numpy()
        b = betas[:j].cpu().numpy()
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            status = Status.NONFINITE
            break
        anorm = np.maximum.accumulate(np.abs(a) + b + np.concatenate([[0.0], b[:-1]]))
        broken = np.nonzero(b[last_check:] <= _breakdown_ratio(eps) * anorm[last_check:])[0]
        if broken.size:
            bd = last_check + int(broken[0])
            rows = rows[: bd + 1]
            j = bd + 1
            betas[bd] = 0.0
            a, b = a[:j], b[:j].copy()
            b[-1] = 0.0
        theta, S = _ritz(a, b)
        nw = min(k, j)
        idx = select_eigen(torch.from_numpy(theta), nw, which).numpy()
        est = np.abs(b[j - 1] * S[j - 1, idx])
        floor = 10 * eps_floor * np.abs(theta).max()
        rel = est / np.maximum(np.abs(theta[idx]), np.finfo(np.float64).tiny)
        row = np.full(k, np.nan)
        row[:nw] = rel
        rows.append(torch.from_numpy(row))
        if broken.size:
            exhausted = j >= n
            wanted = theta[idx]
            same = (
                wanted_at_breakdown is not None
                and nw == k
                and len(wanted_at_breakdown) == k
                and np.all(np.abs(wanted - wanted_at_breakdown) <= alg.tol * np.abs(wanted) + floor)
            )
            if exhausted or same:
                status = Status.CONVERGED
                break
            wanted_at_breakdown = wanted
            if j >= m_max:
                status = Status.MAX_ITERS
                break
            # restart with a random vector orthogonal to the invariant subspace found
            z = _orthogonalize(randvec()[:, None], Q[:, :j])
            zn = torch.linalg.vector_norm(z)
            if float(zn) <= 100 * eps * math.sqrt(n):
                status = Status.CONVERGED  # the space is exhausted numerically
                break
            if j >= Q.shape[1]:
                grown = torch.empty((n, min(2 * Q.shape[1], m_max + 1)), dtype=dtype,
                                    device=device)  # fmt: skip
                grown[:, :j] = Q[:, :j]
                Q = grown
            Q[:, j : j + 1] = z / zn
            restarts += 1
            last_check = j
            continue
        if nw == k and bool(np.all(est <= rtol * np.abs(theta[idx]) + floor)):
            status = Status.CONVERGED
            break
        if j >= m_max:
            status = Status.MAX_ITERS
            break
        last_check = j

    info = dict(products=products, restarts=restarts, block_size=1, converged_count=0)
    if status is not Status.NONFINITE and theta is not None:
        info["converged_count"] = _leading_converged(
            est, rtol * np.abs(theta[idx]) + 10 * eps_floor * np.abs(theta).max(), k
        )
        if status is Status.CONVERGED:
            info["converged_count"] = min(k, j)
    if status is Status.NONFINITE:
        return done(
            torch.full((k,), float("nan"), dtype=dtype, device=device),
            torch.full((n, k), float("nan"), dtype=dtype, device=device),
            Status.NONFINITE, j, rows,
            f"Lanczos: NaN or infinity appeared in the products of A by step {j}. Check the "
            "operator for overflow or invalid values; try float64.", **info,
        )  # fmt: skip
    nw = min(k, j)
    vals = torch.from_numpy(theta[idx]).to(dtype=dtype, device=device)
    coeff = torch.from_numpy(np.ascontiguousarray(S[:, idx])).to(dtype=dtype, device=device)
    vecs = Q[:, :j] @ coeff
    vecs = vecs / torch.linalg.vector_norm(vecs, dim=0).clamp_min(torch.finfo(dtype).tiny)
    last = rows[-1][:nw]
    if nw < k:
        # fewer Ritz pairs than asked (max_iters < k): pad so the shapes hold
        status = Status.MAX_ITERS
        vals = torch.cat([vals, torch.full((k - nw,), float("nan"), dtype=dtype, device=device)])
        pad = torch.full((n, k - nw), float("nan"), dtype=dtype, device=device)
        vecs = torch.cat([vecs, pad], dim=1)
    name = _WHICH_NAMES[which]
    worst = float(np.nanmax(last.numpy())) if nw else float("nan")
    if status is Status.CONVERGED:
        msg = (
            f"Lanczos converged in {j} iterations: the {k} {name} Ritz value(s) have "
            f"relative residual ≤ {fmt(worst)} "
            f"(tol={alg.tol}, residual test at {rtol})."
        )
    else:
        msg = (
            f"Lanczos did not converge in {j} iterations (max_iters={m_max}): the {name} "
            f"Ritz value(s) have relative residual estimate up to {fmt(worst)} > {rtol} "
            f"(tol={alg.tol}). "
            "Try a larger max_iters; for clustered or repeated eigenvalues "
            "use LOBPCG with a block of size above k."
        )
    return done(vals, vecs, status, j, rows, msg, **info)


def _leading_converged(est, thr, k) -> int:
    """How many of the wanted pairs, most wanted first, pass their test in a row."""
    ok = np.asarray(est) <= np.asarray(thr)
    count = 0
    for flag in ok[:k]:
        if not flag:
            break
        count += 1
    return count


def _block_lanczos(matmat, n, dtype, device, alg, k, which, b, m_max, check_every, eps_op):
    """Block Lanczos with full reorthogonalization: ``A Qⱼ = Qⱼ₋₁ Bⱼ₋₁ᵀ + Qⱼ Aⱼ + Qⱼ₊₁ Bⱼ``.

    Blocks of ``b`` orthonormal columns; ``T = Vᵀ A V`` is block tridiagonal (kept dense
    in float64 on the host, at most ``m_max`` square). The new block comes from the
    orthogonalized ``W = A Qⱼ − …`` through the eigendecomposition of its Gram matrix:
    directions with singular value ≤ ``_breakdown_ratio(eps)·‖T‖`` are deflated (their
    row of ``Bⱼ`` is zero) and replaced by random vectors orthogonal to the basis, so an
    invariant subspace restarts the columns it exhausted. The residual of a Ritz pair
    ``(θᵢ, V sᵢ)`` is ``‖Bⱼ sᵢ[last block]‖`` exactly; the run stops when the k wanted
    ones pass the test of :class:`Lanczos`, or when the basis spans everything.
    """
    eps = torch.finfo(dtype).eps
    rtol = eigen_residual_tol(alg.tol)
    gen = None
    if alg.seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(alg.seed)

    def randblock(c):
        return torch.randn(n, c, dtype=dtype, device=device, generator=gen)

    cap = min(m_max + b, n)
    V = torch.empty((n, min(cap, max(4 * b, 64))), dtype=dtype, device=device)
    X = randblock(b)
    if not bool(torch.isfinite(X).all()):
        raise ValueError("lanczos: the random start block is not finite.")
    V[:, :b] = torch.linalg.qr(X).Q
    T = np.zeros((cap, cap))
    rows = [torch.full((k,), float("nan"), dtype=torch.float64)]
    start, width = 0, b  # the current block is V[:, start : start + width]
    T_prev_width = 0
    products = restarts = 0
    anorm = 0.0
    status = theta = S = idx = est = thr = None
    while True:
        stop = start + width
        Qj = V[:, start:stop]
        W = matmat(Qj)
        if products == 0:
            check_matmat_output(W, Qj)
        products += width
        if not bool(torch.isfinite(W).all()):
            status = Status.NONFINITE
            break
        Aj = (Qj.mT @ W).to(torch.float64)
        Aj = (Aj + Aj.mT) / 2
        W = W - Qj @ Aj.to(dtype)
        if start > 0:
            prev = start - T_prev_width
            W = W - V[:, prev:start] @ torch.from_numpy(T[start:stop, prev:start].T.copy()).to(
                dtype=dtype, device=device)
        W = _orthogonalize(W, V[:, :stop])
        T[start:stop, start:stop] = Aj.cpu().numpy()
        anorm = max(anorm, float(torch.linalg.matrix_norm(Aj, ord=2)))
        # the next block: rank-revealing QR of W (Householder QR, then the SVD of R)
        room = min(width, n - stop, cap - stop)
        Q1, R1 = torch.linalg.qr(W)
        Ur, sv, Vh = torch.linalg.svd(R1.to(torch.float64))
        anorm = max(anorm, float(sv.max()))
        r = min(int((sv > _breakdown_ratio(eps) * anorm).sum()), room)
        if room > 0:
            Qn = Q1 @ Ur[:, :r].to(dtype)
            fill = randblock(room - r)
            new = torch.cat([Qn, fill], dim=1)
            new = _orthogonalize(new, V[:, :stop])
            new = torch.linalg.qr(new).Q
            if r < width:
                restarts += 1
            Bj = (new.mT @ W).to(torch.float64)  # (room, width); ~0 on the random columns
            if r < room:
                Bj[r:] = 0.0
            if stop + room > V.shape[1]:
                grown = torch.empty((n, min(cap, max(2 * V.shape[1], stop + room))),
                                    dtype=dtype, device=device)
                grown[:, :stop] = V[:, :stop]
                V = grown
            V[:, stop : stop + room] = new
            Bn = Bj.cpu().numpy()
            T[stop : stop + room, start:stop] = Bn
            T[start:stop, stop : stop + room] = Bn.T
        else:
            Bn = (sv[:, None] * Vh).cpu().numpy()  # W in the basis of its own directions
        dim = stop
        check = (dim // b) % check_every == 0 or room == 0 or stop + room > m_max
        if check:
            theta, S = np.linalg.eigh(T[:dim, :dim])
            nw = min(k, dim)
            idx = select_eigen(torch.from_numpy(theta), nw, which).numpy()
            est = np.linalg.norm(Bn @ S[start:stop, idx], axis=0)
            thr = rtol * np.abs(theta[idx]) + 10 * eps_op * np.abs(theta).max()
            row = np.full(k, np.nan)
            row[:nw] = est / np.maximum(np.abs(theta[idx]), np.finfo(np.float64).tiny)
            rows.append(torch.from_numpy(row))
            if nw == k and bool(np.all(est <= thr)):
                status = Status.CONVERGED
                break
            if room == 0:
                status = Status.CONVERGED if dim >= n else Status.MAX_ITERS
                break
            if stop + room > m_max:
                status = Status.MAX_ITERS
                break
        else:
            rows.append(torch.full((k,), float("nan"), dtype=torch.float64))
        T_prev_width = width
        start, width = stop, room

    if status is Status.NONFINITE or theta is None:
        nanv = torch.full((k,), float("nan"), dtype=dtype, device=device)
        sol = Solution((nanv, torch.full((n, k), float("nan"), dtype=dtype, device=device)),
                       Status.NONFINITE, len(rows) - 1, torch.stack(rows).to(torch.float64), alg,
                       f"Lanczos (block of {b}): NaN or infinity appeared in the products of "
                       f"A after {products} products. Check the operator for overflow or "
                       "invalid values; try float64.", dict(products=products, block_size=b,
                                                            converged_count=0))
        return sol
    nw = min(k, dim)
    vals = torch.from_numpy(theta[idx]).to(dtype=dtype, device=device)
    coeff = torch.from_numpy(np.ascontiguousarray(S[:, idx])).to(dtype=dtype, device=device)
    vecs = V[:, :dim] @ coeff
    count = min(k, dim) if status is Status.CONVERGED else _leading_converged(est, thr, k)
    if nw < k:
        status = Status.MAX_ITERS
        vals = torch.cat([vals, torch.full((k - nw,), float("nan"), dtype=dtype, device=device)])
        vecs = torch.cat([vecs, torch.full((n, k - nw), float("nan"), dtype=dtype,
                                           device=device)], dim=1)
    worst = float(np.nanmax(rows[-1].numpy())) if nw else float("nan")
    name = _WHICH_NAMES[which]
    if status is Status.CONVERGED:
        msg = (f"Lanczos (block of {b}) converged in {len(rows) - 1} steps ({products} "
               f"products): the {k} {name} "
               f"Ritz value(s) have relative residual ≤ {fmt(worst)} (tol={alg.tol}, residual "
               f"test at {rtol}).")
    else:
        msg = (f"Lanczos (block of {b}) did not converge in {len(rows) - 1} steps, "
               f"{products} products (max_iters={m_max} products): {count} of the {k} "
               f"{name} Ritz values pass the residual test, the worst has relative "
               f"residual {fmt(worst)} > {rtol} (tol={alg.tol}). Try a larger max_iters, "
               "or a larger block_size for clustered eigenvalues.")
    info = dict(products=products, restarts=restarts, block_size=b, converged_count=count)
    return Solution((vals, vecs), status, len(rows) - 1, torch.stack(rows).to(torch.float64),
                    alg, msg, info)


def lanczos_tridiag(
    matmat: Matmat, v0: torch.Tensor, num_iters: int, reorth: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``num_iters`` Lanczos steps from ``v0``: the tridiagonal ``T = Qᵀ A Q`` and Q.

    For stochastic Lanczos quadrature: ``v0ᵀ f(A) v0 ≈ ‖v0‖² e₁ᵀ f(T) e₁``.

    Args:
        matmat: ``X -> A X`` for X (n, p); A symmetric.
        v0: start vector (n,) (normalized here), or p start vectors (n, p) run together
            in one batched loop (one product of p columns per step).
        num_iters: number of steps m (at most n).
        reorth: full reorthogonalization (CGS2) against the previous vectors.

    Returns:
        ``(alphas, betas, Q)``, coefficients in float64 on v0's device. For v0 (n,):
        ``alphas (m,)``, ``betas (m − 1,)``, ``Q (n, m)``, cut at the first breakdown
        (``βⱼ ≈ 0``, an invariant subspace: T is then exact). For v0 (n, p):
        ``alphas (m, p)``, ``betas (m − 1, p)``, ``Q (n, m, p)``; a probe that breaks
        down keeps ``α = β = 0`` and zero vectors after it, so T decouples and
        ``e₁ᵀ f(T) e₁`` only sees the valid leading block (weights ``s₀ᵢ² = 0`` on the
        rest).

    Cost: ``m`` products; no host synchronization inside the loop.

    Example:
        >>> import torch
        >>> from solvers.lanczos import lanczos_tridiag
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> a, b, Q = lanczos_tridiag(lambda X: A @ X, torch.ones(3, dtype=torch.float64), 3)
        >>> T = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
        >>> torch.linalg.eigvalsh(T).round(decimals=6)
        tensor([1., 2., 3.], dtype=torch.float64)
    """
    if not isinstance(v0, torch.Tensor) or v0.ndim not in (1, 2):
        raise ValueError("lanczos_tridiag: v0 must be a tensor of shape (n,) or (n, p).")
    check_dtype("lanczos_tridiag: v0", v0.dtype)
    single = v0.ndim == 1
    V0 = v0[:, None] if single else v0
    n, p = V0.shape
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"lanczos_tridiag: num_iters must be a positive int, got {num_iters!r}.")
    m = min(num_iters, n)
    dtype, device = V0.dtype, V0.device
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    norms = torch.linalg.vector_norm(V0, dim=0)
    if not bool((norms > 0).all() & torch.isfinite(norms).all()):
        raise ValueError("lanczos_tridiag: every start vector must be nonzero and finite.")
    Q = torch.zeros((n, m, p), dtype=dtype, device=device)
    Q[:, 0] = V0 / norms
    alphas = torch.zeros((m, p), dtype=torch.float64, device=device)
    betas = torch.zeros((m, p), dtype=torch.float64, device=device)
    alive = torch.ones(p, dtype=torch.bool, device=device)
    anorm = torch.zeros(p, dtype=dtype, device=device)
    beta_prev = torch.zeros(p, dtype=dtype, device=device)
    for j in range(m):
        q = Q[:, j]
        w = matmat(q)
        if j == 0:
            check_matmat_output(w, q)
        alpha = (q * w).sum(0)
        w = w - alpha * q
        if j > 0:
            w = w - beta_prev * Q[:, j - 1]
        if reorth:
            Qj = Q[:, : j + 1]
            for _ in range(2):
                w = w - torch.einsum("njp,jp->np", Qj, torch.einsum("njp,np->jp", Qj, w))
        beta = torch.linalg.vector_norm(w, dim=0)
        anorm = torch.maximum(anorm, alpha.abs() + beta + beta_prev)
        alpha = torch.where(alive, alpha, 0)
        alive = alive & (beta > _breakdown_ratio(eps) * anorm)
        beta = torch.where(alive, beta, 0)
        alphas[j] = alpha.to(torch.float64)
        betas[j] = beta.to(torch.float64)
        if j + 1 < m:
            Q[:, j + 1] = torch.where(alive, w / torch.clamp(beta, min=tiny), 0)
        beta_prev = beta
    if single:
        dead = (betas[: m - 1, 0] == 0).nonzero()
        cut = int(dead[0]) + 1 if dead.numel() else m
        return alphas[:cut, 0], betas[: cut - 1, 0], Q[:, :cut, 0]
    return alphas, betas[: m - 1], Q


def lanczos_probes(
    matmat: Matmat, V0: torch.Tensor, num_steps: int, reorthogonalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Independent Lanczos runs from the p columns of ``V0``, sharing every product.

    Step j multiplies A once with the p current vectors (an ``(n, p)`` block), so p probes
    × m steps cost m calls of ``matmat`` on p columns; the coefficients are kept in float64
    on the device and nothing synchronizes with the host inside the loop. This is the
    kernel of stochastic Lanczos quadrature (``solvers.diagnostics.spectral_density``).

    Args:
        matmat: ``X -> A X`` for X (n, p); A symmetric (assumed, not checked).
        V0: start vectors (n, p), nonzero and finite; half precision runs in float32.
        num_steps: steps m ≥ 1 (capped at n).
        reorthogonalize: full reorthogonalization of each run against its own basis (one
            Gram-Schmidt pass per step, stored as ``(p, m, n)``; ``O(n·m·p)`` memory and
            ``O(n·j·p)`` work at step j). Without it (the default) the memory is three
            blocks and the work outside the products ``O(n·p)`` per step: rounding then
            creates spurious copies of converged Ritz values, but their quadrature weights
            add up to the weight of the one they copy, so the quadrature measure stays
            accurate (Knizhnerman 1996; Chen, Trogdon & Ubaru 2021).

    Returns:
        ``(alphas (m, p), betas (m − 1, p), lengths (p,))``, float64 on the device: the
        tridiagonal coefficients of each run, and how many steps each ran before an
        invariant subspace (``βⱼ ≈ 0``: the coefficients after it are zero, so the
        tridiagonal matrix decouples and its extra eigenpairs carry no weight).

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> a, b, lens = lanczos_probes(lambda X: A @ X, torch.ones(3, 2, dtype=torch.float64), 3)
        >>> T = torch.diag(a[:, 0]) + torch.diag(b[:, 0], 1) + torch.diag(b[:, 0], -1)
        >>> torch.linalg.eigvalsh(T).round(decimals=6), lens.tolist()
        (tensor([1., 2., 3.], dtype=torch.float64), [3, 3])
    """
    if not isinstance(V0, torch.Tensor) or V0.ndim != 2:
        raise ValueError("lanczos_probes: V0 must be a tensor of shape (n, p).")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"lanczos_probes: num_steps must be a positive int, got {num_steps!r}.")
    check_dtype("lanczos_probes: V0", V0.dtype)
    matmat, dtype = in_working_precision(matmat, V0.dtype)
    n, p = V0.shape
    m = min(num_steps, n)
    device = V0.device
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    V0 = V0.to(dtype)
    norms = torch.linalg.vector_norm(V0, dim=0)
    if not bool((norms > 0).all() & torch.isfinite(norms).all()):
        raise ValueError("lanczos_probes: every start vector must be nonzero and finite.")
    q = V0 / norms
    q_prev = torch.zeros_like(q)
    Q = None
    if reorthogonalize:
        Q = torch.empty((p, m, n), dtype=dtype, device=device)
        Q[:, 0] = q.mT
    alphas = torch.zeros((m, p), dtype=torch.float64, device=device)
    betas = torch.zeros((m, p), dtype=torch.float64, device=device)
    alive = torch.ones(p, dtype=torch.bool, device=device)
    lengths = torch.zeros(p, dtype=torch.long, device=device)
    anorm = torch.zeros(p, dtype=dtype, device=device)
    beta_prev = torch.zeros(p, dtype=dtype, device=device)
    ratio = _breakdown_ratio(eps)
    # the (n, p) work per step is five passes: the product's output is updated in place
    for j in range(m):
        w = matmat(q)
        if j == 0:
            check_matmat_output(w, q)
        if w.data_ptr() in (q.data_ptr(), q_prev.data_ptr()) or not w.is_contiguous():
            w = w.contiguous().clone()  # an operator that hands back its input
        alpha = torch.linalg.vecdot(q, w, dim=0)
        w.addcmul_(q, alpha, value=-1).addcmul_(q_prev, beta_prev, value=-1)
        if Q is not None:
            Qj = Q[:, : j + 1]  # (p, j+1, n)
            c = torch.bmm(Qj, w.mT.unsqueeze(2))  # (p, j+1, 1)
            w.sub_(torch.bmm(Qj.transpose(1, 2), c).squeeze(2).mT)
        beta = torch.linalg.vector_norm(w, dim=0)
        anorm = torch.maximum(anorm, alpha.abs() + beta + beta_prev)
        alphas[j] = torch.where(alive, alpha, 0).to(torch.float64)
        lengths = lengths + alive.long()
        alive = alive & (beta > ratio * anorm)
        beta = torch.where(alive, beta, 0)
        betas[j] = beta.to(torch.float64)
        scale = torch.where(alive, 1 / torch.clamp(beta, min=tiny), 0)
        q_prev, q = q, w.mul_(scale)
        if Q is not None and j + 1 < m:
            Q[:, j + 1] = q.mT
        beta_prev = beta
    return alphas, betas[: m - 1], lengths
