"""Preconditioners: each one reduces CG iterations on a problem where it should.

Iterations are read from ``inv(A, alg).solution.iterations``; every preconditioned solve is
also checked against a dense float64 solve.
"""

import numpy as np
import pytest
import torch
from _helpers import DEVICE_PARAMS, DTYPE_PARAMS, F64, randn, spectrum_matrix

from linops import PSD, Dense, Diagonal, LinearOperator, SelfAdjoint, is_psd
from solvers import CG, MINRES, Auto, Hutchinson, Status, inv, jacobi, nystrom, pivoted_cholesky

N = 60
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def badly_scaled():
    """D^{1/2} S D^{1/2}: a well conditioned S (cond 3) under a diagonal scaling over 6
    orders of magnitude, so that diag(A)⁻¹ removes most of the ill conditioning."""
    S = spectrum_matrix(torch.linspace(1.0, 3.0, N, dtype=F64), seed=1)
    s = torch.logspace(-3, 3, N, dtype=F64).sqrt()
    return s[:, None] * S * s[None, :]


MU = 1e-2
#: (largest eigenvalue of K, μ) per dtype: cond(K + μI) = 10⁵ in float64, 10³ in float32,
#: where a relative residual of 1e-4 is still within reach
DECAY = {torch.float64: (1e3, MU), torch.float32: (1e2, 0.1)}


def fast_decaying(lmax=1e3):
    """K with a geometrically decaying spectrum lmax·2⁻ⁱ; the system is K + μI."""
    return spectrum_matrix(lmax * 0.5 ** torch.arange(N, dtype=F64), seed=3)


def cg_run(A, b, pre, dtype, max_iters=2000):
    Ainv = inv(A, CG(tol=TOL[dtype], preconditioner=pre, max_iters=max_iters))
    x = Ainv @ b
    return x, Ainv.solution


def check_solution(x, M, b, dtype):
    ref = torch.linalg.solve(M, b)
    err = float((x.cpu().to(F64) - ref).norm() / ref.norm())
    assert err < (1e-7 if dtype == F64 else 1e-2)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_jacobi_reduces_cg_iterations_on_a_badly_scaled_matrix(dtype, device):
    M = badly_scaled()
    A = PSD(Dense(M.to(dtype=dtype, device=device)))
    b = randn(N).to(dtype=dtype, device=device)
    P = jacobi(A)
    assert isinstance(P, Diagonal) and is_psd(P)
    assert torch.allclose(P.d.cpu().to(F64), 1 / M.diagonal(), rtol=1e-5)
    x_pre, sol_pre = cg_run(A, b, P, dtype)
    _, sol = cg_run(A, b, None, dtype)
    assert sol_pre.status is Status.CONVERGED
    check_solution(x_pre, M, b.cpu().to(F64), dtype)
    assert sol_pre.iterations * 5 <= sol.iterations


class Opaque(LinearOperator):
    """A PSD matrix seen only through products (no cheap diagonal)."""

    def __init__(self, M):
        super().__init__(M.dtype, M.shape, M.device)
        self.M = M
        self._tags = frozenset({"self_adjoint", "psd"})

    def _matmat(self, X):
        return self.M @ X


def test_jacobi_of_an_operator_without_a_cheap_diagonal():
    M = badly_scaled()
    A = Opaque(M)
    b = randn(N)
    _, sol = cg_run(A, b, None, F64)
    P = jacobi(A)  # exact diagonal from n products
    assert torch.allclose(P.d, 1 / M.diagonal())
    x, sol_pre = cg_run(A, b, P, F64)
    check_solution(x, M, b, F64)
    assert sol_pre.iterations * 5 <= sol.iterations
    # an estimated diagonal: a diagonally dominant matrix with a spread-out diagonal
    E = 0.01 * spectrum_matrix(torch.linspace(-1.0, 1.0, N, dtype=F64), seed=4)
    D = torch.diag(torch.logspace(0, 3, N, dtype=F64)) + E
    B = Opaque(D)
    P_est = jacobi(B, Hutchinson(samples=200))
    assert float(((1 / P_est.d) - D.diagonal()).abs().max()) < 0.05
    _, sol = cg_run(B, b, None, F64)
    x, sol_pre = cg_run(B, b, P_est, F64)
    check_solution(x, D, b, F64)
    assert sol_pre.iterations * 3 <= sol.iterations


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("kind", ["nystrom", "pivoted_cholesky"])
def test_low_rank_preconditioners_on_a_fast_decaying_spectrum(kind, dtype, device):
    lmax, mu = DECAY[dtype]
    K64 = fast_decaying(lmax)
    M = K64 + mu * torch.eye(N, dtype=F64)
    K = PSD(Dense(K64.to(dtype=dtype, device=device)))
    A = PSD(Dense(M.to(dtype=dtype, device=device)))
    b = randn(N).to(dtype=dtype, device=device)
    P = nystrom(K, 20, mu=mu) if kind == "nystrom" else pivoted_cholesky(K, 20, mu=mu)
    assert P.shape == (N, N) and P.dtype == dtype and P.device.type == device
    x_pre, sol_pre = cg_run(A, b, P, dtype)
    _, sol = cg_run(A, b, None, dtype)
    assert sol_pre.status is Status.CONVERGED
    check_solution(x_pre, M, b.cpu().to(F64), dtype)
    assert sol_pre.iterations * 3 <= sol.iterations


def test_low_rank_preconditioners_approximate_the_inverse():
    # with a rank above the numerical rank, P ≈ (K + μI)⁻¹ up to a scale (Nyström) or
    # exactly (pivoted Cholesky): P (K + μI) has a tight spectrum
    K64 = spectrum_matrix(torch.cat([torch.logspace(3, 0, 8, dtype=F64),
                                     torch.zeros(N - 8, dtype=F64)]), seed=5)
    M = K64 + MU * torch.eye(N, dtype=F64)
    for P in (nystrom(PSD(Dense(K64)), 12, mu=MU), pivoted_cholesky(PSD(Dense(K64)), 12, mu=MU)):
        PM = P.to_dense() @ M
        ev = np.linalg.eigvals(PM.numpy()).real
        assert ev.max() / ev.min() < 1.01


def test_any_linear_operator_is_a_preconditioner():
    M = badly_scaled()
    A = PSD(Dense(M))
    b = randn(N)
    _, sol = cg_run(A, b, None, F64)
    # the exact inverse as a Dense operator: one iteration
    x, sol_exact = cg_run(A, b, Dense(torch.linalg.inv(M)), F64)
    check_solution(x, M, b, F64)
    assert sol_exact.iterations <= 2
    # a plain Diagonal operator built by hand
    x, sol_diag = cg_run(A, b, Diagonal(1 / M.diagonal()), F64)
    check_solution(x, M, b, F64)
    assert sol_diag.iterations * 5 <= sol.iterations
    # through Auto, which passes it to the Krylov solver it picks
    Ainv = inv(A, Auto(tol=1e-10, preconditioner=jacobi(A), dense_threshold=0))
    x = Ainv @ b
    assert isinstance(Ainv.algorithm, CG) and Ainv.algorithm.preconditioner is not None
    check_solution(x, M, b, F64)
    assert Ainv.solution.iterations * 5 <= sol.iterations


def test_jacobi_with_minres_on_an_indefinite_badly_scaled_matrix():
    lam = torch.linspace(1.0, 3.0, N, dtype=F64)
    lam[::4] *= -1
    S = spectrum_matrix(lam, seed=7)
    s = torch.logspace(-2, 2, N, dtype=F64).sqrt()
    M = s[:, None] * S * s[None, :]
    A = SelfAdjoint(Dense(M))
    b = randn(N)
    plain = inv(A, MINRES(tol=1e-10, max_iters=3000))
    plain @ b
    P = Diagonal(1 / M.diagonal().abs())  # positive definite, as MINRES needs
    pre = inv(A, MINRES(tol=1e-10, preconditioner=P, max_iters=3000))
    x = pre @ b
    check_solution(x, M, b, F64)
    assert pre.solution.iterations * 2 <= plain.solution.iterations


def test_preconditioner_misuse():
    K = PSD(Dense(fast_decaying()))
    with pytest.raises(TypeError):
        jacobi(fast_decaying())
    with pytest.raises(ValueError, match="PSD"):
        nystrom(Dense(fast_decaying()), 5)
    with pytest.raises(ValueError, match="rank"):
        nystrom(K, 0)
    with pytest.raises(ValueError, match="rank"):
        pivoted_cholesky(K, N + 1)
    with pytest.raises(ValueError, match="mu"):
        pivoted_cholesky(K, 5, mu=0.0)
    with pytest.raises(ValueError, match="PSD"):
        pivoted_cholesky(SelfAdjoint(Dense(fast_decaying())), 5)
