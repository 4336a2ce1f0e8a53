"""The linear-solver kernels (CG, MINRES, GMRES), their configs and the result record.

Every solve is checked against a dense float64 solution (torch.linalg / numpy) on random
matrices built with the needed property and a bounded condition number (Q diag(λ) Qᵀ).
"""

import dataclasses
import functools
import warnings

import numpy as np
import pytest
import torch
from _helpers import matmat_of, nonsymmetric, randn, spectrum_matrix
from _helpers import spd as _spd

from solvers.cg import CG, cg
from solvers.dense_algs import Cholesky, Dense, Eigh
from solvers.gmres import GMRES, gmres
from solvers.lanczos import Lanczos
from solvers.lobpcg import LOBPCG
from solvers.minres import MINRES, minres
from solvers.power_iteration import PowerIteration
from solvers.result import (
    NotConvergedError,
    NotConvergedWarning,
    Solution,
    Status,
    report,
)

pytestmark = pytest.mark.usefixtures("one_thread")


TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# a float32 recurrence residual drifts from the true one by a few ulps times cond(A)
SLACK = {torch.float64: 10.0, torch.float32: 30.0}


#: symmetric positive definite, cond 100 unless a test asks for another
spd = functools.partial(_spd, cond=100.0)


def indefinite(n, cond=50.0, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    lam = torch.logspace(0, np.log10(cond), n, dtype=torch.float64)
    signs = torch.where(torch.rand(n, generator=g) < 0.4, -1.0, 1.0).double()
    signs[0], signs[-1] = -1.0, 1.0
    return spectrum_matrix(lam * signs, seed)


def rel_residual(A, X, B):
    A, X, B = A.double().cpu(), X.double().cpu(), B.double().cpu()
    return (torch.linalg.vector_norm(B - A @ X, dim=0) / torch.linalg.vector_norm(B, dim=0)).max()


KERNELS = [(cg, CG, spd), (minres, MINRES, indefinite), (gmres, GMRES, nonsymmetric)]
KERNEL_IDS = ["cg", "minres", "gmres"]


# ------------------------------------------------------------------ configs
BAD_CONFIGS = [
    (CG, dict(tol=-1e-3), ValueError),
    (CG, dict(tol=float("nan")), ValueError),
    (CG, dict(tol="1e-3"), TypeError),
    (CG, dict(atol=-1.0), ValueError),
    (CG, dict(max_iters=0), ValueError),
    (CG, dict(max_iters=2.5), TypeError),
    (CG, dict(max_iters=True), TypeError),
    (CG, dict(on_failure="loud"), ValueError),
    (CG, dict(preconditioner=3), TypeError),
    (CG, dict(preconditioner=torch.ones(3, 2)), ValueError),
    (CG, dict(x0=[1.0, 2.0]), TypeError),
    (CG, dict(check_every=0), ValueError),
    (CG, dict(tolerance=1e-3), TypeError),
    (MINRES, dict(tol=-1.0), ValueError),
    (MINRES, dict(restart=5), TypeError),
    (GMRES, dict(restart=0), ValueError),
    (GMRES, dict(restart=None), TypeError),
    (Lanczos, dict(reorthogonalize=1), TypeError),
    (Lanczos, dict(seed=1.5), TypeError),
    (Lanczos, dict(max_iters=-3), ValueError),
    (Lanczos, dict(preconditioner=None), TypeError),
    (PowerIteration, dict(tol=-0.1), ValueError),
    (LOBPCG, dict(block_size=0), ValueError),
    (LOBPCG, dict(preconditioner="jacobi"), TypeError),
    (Cholesky, dict(on_failure="never"), ValueError),
    (Eigh, dict(tol=-1.0), ValueError),
    (Eigh, dict(atol=1e-3), TypeError),
    (Dense, dict(on_failure=None), ValueError),
]


@pytest.mark.parametrize(
    "cls, kwargs, error", BAD_CONFIGS, ids=[f"{c.__name__}-{list(k)[0]}" for c, k, _ in BAD_CONFIGS]
)
def test_config_validation(cls, kwargs, error):
    with pytest.raises(error):
        cls(**kwargs)


def test_config_messages_say_the_fix():
    with pytest.raises(ValueError, match="tol=1e-6"):
        CG(tol=-1)
    with pytest.raises(ValueError, match="'warn'"):
        MINRES(on_failure="loudly")


def test_configs_are_frozen_and_comparable():
    alg = CG(tol=1e-3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        alg.tol = 1.0
    assert CG(tol=1e-3, max_iters=20) == CG(tol=1e-3, max_iters=20)
    assert CG(tol=1e-3) != CG(tol=1e-4)
    assert CG(x0=torch.ones(3)) == CG(x0=torch.zeros(3))  # per-call data is not compared
    assert "x0" not in repr(CG(x0=torch.ones(3)))
    for cls in (CG, MINRES, GMRES, Lanczos, PowerIteration, LOBPCG, Cholesky, Eigh, Dense):
        assert cls().on_failure == "warn"


def test_kernel_rejects_wrong_config_and_shapes():
    A = spd(5)
    with pytest.raises(TypeError, match="CG configuration"):
        cg(matmat_of(A, torch.float64, "cpu"), randn(5, 1), MINRES())
    with pytest.raises(ValueError, match="x0 has shape"):
        cg(matmat_of(A, torch.float64, "cpu"), randn(5, 2), CG(), x0=torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"mapped \(5, 1\) to \(4, 1\)"):
        cg(lambda X: X[:4], randn(5, 1), CG())
    with pytest.raises(TypeError, match="real floating dtype"):
        minres(lambda X: X, torch.ones(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape"):
        gmres(lambda X: X, torch.ones(5, 2, 2))


# ------------------------------------------------------------------ result record
def _failed_solution():
    return Solution(
        torch.zeros(2), Status.MAX_ITERS, 3, torch.zeros(4, 1), CG(), "CG did not converge"
    )


def test_report_modes():
    sol = _failed_solution()
    assert not sol.converged
    with pytest.warns(NotConvergedWarning, match="did not converge"):
        report(sol, "warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report(sol, "warn")  # already reported: not twice
        report(_failed_solution(), "ignore")
    with pytest.raises(NotConvergedError) as err:
        report(_failed_solution(), "raise")
    assert err.value.solution.status is Status.MAX_ITERS
    with pytest.raises(ValueError):
        report(_failed_solution(), "shout")
    ok = Solution(torch.zeros(2), Status.CONVERGED, 1, torch.zeros(2, 1), CG(), "fine")
    assert ok.converged and report(ok, "raise") is ok


# ------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("kernel, cls, make", KERNELS, ids=KERNEL_IDS)
def test_solvers_match_dense_solve(kernel, cls, make, dtype, device):
    n, k = 40, 3
    A, B = make(n), randn(n, k)
    tol = TOL[dtype]
    sol = kernel(matmat_of(A, dtype, device), B.to(dtype=dtype, device=device), cls(tol=tol))
    assert sol.status is Status.CONVERGED, sol.message
    assert sol.value.shape == (n, k) and sol.value.dtype == dtype
    assert sol.value.device.type == torch.device(device).type
    X = torch.from_numpy(np.linalg.solve(A.numpy(), B.numpy()))
    cond = float(np.linalg.cond(A.numpy()))
    assert rel_residual(A, sol.value, B) <= SLACK[dtype] * tol
    err = torch.linalg.norm(sol.value.double().cpu() - X) / torch.linalg.norm(X)
    assert err <= SLACK[dtype] * tol * cond
    # record: history per column, starting at ‖b‖/‖b‖ = 1, ending under tol
    assert sol.residuals.shape == (sol.iterations + 1, k)
    assert sol.residuals.dtype == torch.float64 and sol.residuals.device.type == "cpu"
    assert torch.allclose(sol.residuals[0], torch.ones(k, dtype=torch.float64))
    assert bool((sol.residuals[-1] <= tol).all())
    assert isinstance(sol.algorithm, cls) and sol.algorithm.tol == tol
    assert "converged" in sol.message
    # exact arithmetic needs ≤ n steps; rounding (no reorthogonalization) a few n
    assert 1 <= sol.iterations <= 3 * n


@pytest.mark.parametrize("kernel, cls, make", KERNELS, ids=KERNEL_IDS)
def test_vector_rhs_gives_vector(kernel, cls, make):
    A, b = make(12), randn(12, 1)[:, 0]
    sol = kernel(matmat_of(A, torch.float64, "cpu"), b, cls(tol=1e-12))
    assert sol.value.shape == (12,)
    assert torch.allclose(sol.value, torch.linalg.solve(A, b), atol=1e-9)


@pytest.mark.parametrize("kernel, cls, make", KERNELS, ids=KERNEL_IDS)
def test_sparse_host_checks_give_the_same_answer(kernel, cls, make):
    """check_every > 1 (the GPU pattern) freezes converged columns by masking only."""
    A, B = make(30), randn(30, 3)
    B[:, 1] *= 1e-3
    op = matmat_of(A, torch.float64, "cpu")
    every1 = kernel(op, B, cls(tol=1e-9, check_every=1))
    every7 = kernel(op, B, cls(tol=1e-9, check_every=7))
    assert every1.status is every7.status is Status.CONVERGED
    assert every1.iterations == every7.iterations
    assert every1.info["column_iterations"] == every7.info["column_iterations"]
    assert torch.equal(every1.value, every7.value)
    assert torch.equal(every1.residuals, every7.residuals)
    assert every7.info["products"] >= every1.info["products"]


@pytest.mark.parametrize("kernel, cls, make", KERNELS, ids=KERNEL_IDS)
def test_columns_converge_independently(kernel, cls, make):
    """An eigenvector right-hand side converges in one step while the others go on."""
    A = make(30)
    lam, Q = torch.linalg.eig(A) if make is nonsymmetric else torch.linalg.eigh(A)
    B = randn(30, 3)
    if make is nonsymmetric:  # a real eigenvector of the non-symmetric matrix
        j = int(torch.nonzero(lam.imag.abs() < 1e-12)[0])
        B[:, 1] = Q[:, j].real
    else:
        B[:, 1] = Q[:, 7]
    sol = kernel(matmat_of(A, torch.float64, "cpu"), B, cls(tol=1e-10))
    assert sol.status is Status.CONVERGED
    assert sol.info["column_iterations"][1] == 1
    assert max(sol.info["column_iterations"]) > 5
    assert rel_residual(A, sol.value, B) <= 1e-9


# ------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("kernel, cls, make", KERNELS, ids=KERNEL_IDS)
def test_max_iters_one(kernel, cls, make):
    A, B = make(20), randn(20, 2)
    op = matmat_of(A, torch.float64, "cpu")
    with pytest.warns(NotConvergedWarning, match="did not converge in 1 iteration"):
        sol = kernel(op, B, cls(max_iters=1))
    assert sol.status is Status.MAX_ITERS and sol.iterations == 1
    assert sol.residuals.shape == (2, 2)
    assert torch.isfinite(sol.value).all()
    assert "max_iters" in sol.message
    with pytest.raises(NotConvergedError) as err:
        kernel(op, B, cls(max_iters=1, on_failure="raise"))
    assert err.value.solution.status is Status.MAX_ITERS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = kernel(op, B, cls(max_iters=1, on_failure="ignore"))
        assert quiet.status is Status.MAX_ITERS
        kernel(op, B, cls(max_iters=1), on_failure="ignore")  # per-call override


@pytest.mark.parametrize("kernel, cls, make", KERNELS, ids=KERNEL_IDS)
def test_zero_rhs(kernel, cls, make, dtype):
    A = make(15)
    calls = []

    def op(X):
        calls.append(1)
        return A.to(dtype) @ X

    sol = kernel(op, torch.zeros(15, 2, dtype=dtype), cls())
    assert sol.status is Status.CONVERGED and sol.iterations == 0 and not calls
    assert torch.equal(sol.value, torch.zeros(15, 2, dtype=dtype))
    # a zero column beside a nonzero one stays exactly zero
    B = randn(15, 2).to(dtype)
    B[:, 0] = 0
    sol = kernel(op, B, cls(tol=TOL[dtype]))
    assert sol.status is Status.CONVERGED
    assert torch.equal(sol.value[:, 0], torch.zeros(15, dtype=dtype))
    assert sol.residuals[-1, 0] == 0


@pytest.mark.parametrize("kernel, cls, make", KERNELS, ids=KERNEL_IDS)
def test_x0_not_modified_and_warm_start(kernel, cls, make):
    A, B = make(25), randn(25, 2)
    op = matmat_of(A, torch.float64, "cpu")
    x0 = torch.randn(25, 2, dtype=torch.float64)
    saved = x0.clone()
    sol = kernel(op, B, cls(tol=1e-10), x0=x0)
    assert torch.equal(x0, saved)
    assert rel_residual(A, sol.value, B) <= 1e-9
    sol = kernel(op, B, cls(tol=1e-10, x0=x0))  # through the config
    assert torch.equal(x0, saved) and sol.converged
    # a warm start equal to the solution of a scaled b: 0 iterations, at any scale
    for scale in (1e-8, 1.0, 1e6):
        Bs = scale * B
        exact = torch.linalg.solve(A, Bs)
        warm = kernel(op, Bs, cls(tol=1e-8), x0=exact)
        assert warm.status is Status.CONVERGED and warm.iterations <= 1
        assert torch.allclose(warm.value, exact, rtol=1e-7, atol=0)
    # a warm start of the wrong scale still converges to the right answer
    far = kernel(op, 1e-2 * B, cls(tol=1e-8), x0=torch.linalg.solve(A, B))
    assert far.converged
    assert rel_residual(A, far.value, 1e-2 * B) <= 1e-7


@pytest.mark.parametrize("kernel, cls, make", KERNELS, ids=KERNEL_IDS)
def test_nonfinite_is_reported(kernel, cls, make):
    A, B = make(10), randn(10, 2)
    op = matmat_of(A, torch.float64, "cpu")
    Bnan = B.clone()
    Bnan[3, 1] = float("nan")
    with pytest.warns(NotConvergedWarning, match="NaN or infinity"):
        sol = kernel(op, Bnan, cls())
    assert sol.status is Status.NONFINITE
    Anan = A.clone()
    Anan[2, 5] = float("inf")
    sol = kernel(matmat_of(Anan, torch.float64, "cpu"), B, cls(), on_failure="ignore")
    assert sol.status is Status.NONFINITE
    x0 = torch.zeros(10, 2, dtype=torch.float64)
    x0[0, 0] = float("nan")
    sol = kernel(op, B, cls(on_failure="ignore"), x0=x0)
    assert sol.status is Status.NONFINITE


# ------------------------------------------------------------------ CG specifics
def test_cg_indefinite_reports_negative_curvature(dtype):
    A = indefinite(20)
    with pytest.warns(NotConvergedWarning, match="MINRES"):
        sol = cg(matmat_of(A, dtype, "cpu"), randn(20, 2).to(dtype), CG(tol=1e-8))
    assert sol.status is Status.NEGATIVE_CURVATURE
    assert torch.isfinite(sol.value).all()
    assert sol.info["negative_curvature_columns"]
    with pytest.raises(NotConvergedError, match="not positive definite"):
        cg(matmat_of(A, dtype, "cpu"), randn(20, 1).to(dtype), CG(on_failure="raise"))


def test_cg_negative_definite_stops_at_first_step():
    A = -spd(10)
    b = randn(10, 1)
    sol = cg(matmat_of(A, torch.float64, "cpu"), b, CG(on_failure="ignore"))
    assert sol.status is Status.NEGATIVE_CURVATURE
    assert sol.iterations == 1 and torch.equal(sol.value, torch.zeros_like(b))


def test_cg_singular_inconsistent_is_not_silent():
    A = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))
    sol = cg(matmat_of(A, torch.float64, "cpu"), torch.ones(3, dtype=torch.float64), CG(),
             on_failure="ignore")  # fmt: skip
    assert sol.status is Status.NEGATIVE_CURVATURE
    consistent = cg(matmat_of(A, torch.float64, "cpu"), torch.tensor([1.0, 1.0, 0.0]).double())
    assert consistent.converged
    assert torch.allclose(consistent.value, torch.tensor([1.0, 0.5, 0.0]).double())


def badly_scaled_spd(n=60, seed=0):
    """D^½ C D^½: C diagonally dominant, D spread over six decades (Jacobi's case)."""
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(n, n, dtype=torch.float64, generator=g) / n
    C = C @ C.T + torch.eye(n, dtype=torch.float64)
    d = torch.logspace(-3, 3, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    return d.sqrt()[:, None] * C * d.sqrt()[None, :]


@pytest.mark.parametrize("kernel, cls", [(cg, CG), (minres, MINRES), (gmres, GMRES)])
def test_jacobi_preconditioner_reduces_iterations(kernel, cls, dtype):
    A = badly_scaled_spd()
    B = randn(60, 2)
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    op = matmat_of(A, dtype, "cpu")
    inv_diag = (1 / A.diagonal()).to(dtype)
    plain = kernel(op, B.to(dtype), cls(tol=tol, max_iters=400), on_failure="ignore")
    jac = kernel(op, B.to(dtype), cls(tol=tol, preconditioner=lambda X: inv_diag[:, None] * X))
    assert jac.status is Status.CONVERGED, jac.message
    assert rel_residual(A, jac.value, B) <= SLACK[dtype] * tol
    assert jac.iterations * 3 < plain.iterations, (jac.iterations, plain.iterations)
    assert jac.iterations < 100
    # a dense matrix (anything with @) is a preconditioner too, and gives the same answer
    dense = kernel(op, B.to(dtype), cls(tol=tol, preconditioner=torch.diag(inv_diag)))
    assert dense.iterations == jac.iterations


@pytest.mark.parametrize("kernel, cls", [(cg, CG), (minres, MINRES)])
def test_preconditioner_not_positive_definite_is_breakdown(kernel, cls):
    A, B = spd(10), randn(10, 1)
    sol = kernel(matmat_of(A, torch.float64, "cpu"), B, cls(preconditioner=lambda X: -X),
                 on_failure="ignore")  # fmt: skip
    assert sol.status is Status.BREAKDOWN
    assert "preconditioner" in sol.message and "positive definite" in sol.message


# ------------------------------------------------------------------ MINRES / GMRES specifics
def test_minres_indefinite_with_spd_preconditioner(dtype):
    A = indefinite(40, cond=200.0)
    B = randn(40, 2)
    lam, Q = torch.linalg.eigh(A)
    M = (Q / lam.abs()) @ Q.T  # |A|⁻¹: SPD, and exact up to signs
    tol = TOL[dtype]
    plain = minres(matmat_of(A, dtype, "cpu"), B.to(dtype), MINRES(tol=tol))
    pre = minres(matmat_of(A, dtype, "cpu"), B.to(dtype), MINRES(tol=tol),
                 preconditioner=matmat_of(M, dtype, "cpu"))  # fmt: skip
    X = torch.from_numpy(np.linalg.solve(A.numpy(), B.numpy()))
    for sol in (plain, pre):
        assert sol.status is Status.CONVERGED
        assert rel_residual(A, sol.value, B) <= SLACK[dtype] * tol
        assert torch.allclose(sol.value.double(), X, rtol=0, atol=SLACK[dtype] * tol * 200 * 10)
    assert pre.iterations <= 3 < plain.iterations


def test_minres_singular_inconsistent_is_breakdown():
    A = torch.diag(torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))
    sol = minres(matmat_of(A, torch.float64, "cpu"), torch.ones(3, dtype=torch.float64),
                 on_failure="ignore")  # fmt: skip
    assert sol.status is Status.BREAKDOWN and "range" in sol.message
    # the least-squares solution over the Krylov space
    assert torch.allclose(sol.value, torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))
    # a low-rank A: MINRES stops at the least-squares residual instead of diverging
    g = torch.Generator().manual_seed(11)
    U = torch.randn(12, 5, dtype=torch.float64, generator=g)
    b = torch.randn(12, dtype=torch.float64, generator=g)
    A = U @ U.T
    for dtype in (torch.float64, torch.float32):
        sol = minres(matmat_of(A, dtype, "cpu"), b.to(dtype), MINRES(tol=1e-10),
                     on_failure="ignore")  # fmt: skip
        assert sol.status is Status.BREAKDOWN and sol.iterations <= 8
        best = torch.linalg.norm(b - A @ torch.linalg.pinv(A) @ b) / torch.linalg.norm(b)
        assert abs(rel_residual(A, sol.value[:, None], b[:, None]) - best) < 1e-4


def test_gmres_restart_and_honest_final_residual():
    A, B = nonsymmetric(50, seed=3), randn(50, 2)
    op = matmat_of(A, torch.float64, "cpu")
    short = gmres(op, B, GMRES(tol=1e-10, restart=4))
    full = gmres(op, B, GMRES(tol=1e-10, restart=50))
    assert short.converged and full.converged
    assert short.info["cycles"] > 1 and full.info["cycles"] == 1
    assert short.iterations > full.iterations
    for sol in (short, full):
        assert rel_residual(A, sol.value, B) <= 1e-10  # true residual, not the estimate
        assert torch.allclose(sol.value, torch.linalg.solve(A, B), atol=1e-8)


def test_gmres_singular_is_breakdown():
    A = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))
    sol = gmres(matmat_of(A, torch.float64, "cpu"), torch.ones(2, dtype=torch.float64),
                on_failure="ignore")  # fmt: skip
    assert sol.status is Status.BREAKDOWN and "singular" in sol.message


def test_gmres_on_a_rotation():
    """A rotation by 90°: CG and MINRES do not apply; GMRES needs the full space."""
    A = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    sol = gmres(matmat_of(A, torch.float64, "cpu"), b, GMRES(tol=1e-12))
    assert sol.converged and sol.iterations == 2
    assert torch.allclose(sol.value, torch.tensor([2.0, -1.0], dtype=torch.float64))


@pytest.mark.parametrize("kernel, cls, make", KERNELS, ids=KERNEL_IDS)
def test_convergence_is_judged_on_the_true_residual(kernel, cls, make):
    """float32 with a tol it cannot reach: never CONVERGED, and the record says why."""
    A, B = make(40), randn(40, 2)
    op = matmat_of(A, torch.float32, "cpu")
    sol = kernel(op, B.float(), cls(tol=1e-9), on_failure="ignore")
    assert sol.status in (Status.BREAKDOWN, Status.MAX_ITERS)
    true = rel_residual(A, sol.value, B)
    assert true > 1e-9
    if sol.status is Status.BREAKDOWN:
        assert "float32" in sol.message and sol.iterations < 400
    # a reachable tol: the last history row is the true residual of the returned x
    ok = kernel(op, B.float(), cls(tol=1e-4))
    assert ok.converged
    true = torch.linalg.vector_norm(B - A @ ok.value.double(), dim=0) / B.norm(dim=0)
    assert torch.allclose(ok.residuals[-1], true, rtol=0.05, atol=1e-7)
    assert bool((true <= 1e-4).all())


def test_gmres_stagnation_is_reported():
    """GMRES(1) on a 90° rotation makes no progress at all: said at once, not after 10n."""
    A = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 0.0], dtype=torch.float64)
    sol = gmres(matmat_of(A, torch.float64, "cpu"), b, GMRES(restart=1), on_failure="ignore")
    assert sol.status is Status.BREAKDOWN and "stagnated" in sol.message
    assert "restart" in sol.message and sol.iterations == 1
