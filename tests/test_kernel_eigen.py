"""The eigen-solver kernels: Lanczos, power iteration, LOBPCG, and lanczos_tridiag.

References are dense float64 eigendecompositions (numpy.linalg.eigh) of random symmetric
matrices Q diag(λ) Qᵀ with a chosen spectrum.
"""

import warnings

import numpy as np
import pytest
import torch
from _helpers import matmat_of, spectrum_matrix, wanted_eigenvalues

from solvers.lanczos import Lanczos, lanczos, lanczos_tridiag
from solvers.lobpcg import LOBPCG, lobpcg
from solvers.power_iteration import PowerIteration, power_iteration
from solvers.result import NotConvergedError, NotConvergedWarning, Status

pytestmark = pytest.mark.usefixtures("one_thread")


# a spectrum with both signs, the most negative one the largest in magnitude, and gaps
SPECTRUM = np.concatenate([[-12.0, -9.0], np.linspace(-5, 5, 56), [7.0, 8.0]])
TOL = {torch.float64: 1e-8, torch.float32: 1e-4}


def check_pairs(A, vals, vecs, ref, tol):
    A = A.double()
    vals, vecs = vals.double().cpu(), vecs.double().cpu()
    scale = float(np.abs(ref).max())
    assert np.allclose(vals.numpy(), ref, rtol=0, atol=tol * scale), (vals, ref)
    assert torch.allclose(vecs.norm(dim=0), torch.ones(vecs.shape[1], dtype=torch.float64),
                          atol=1e-4)  # fmt: skip
    res = torch.linalg.vector_norm(A @ vecs - vecs * vals, dim=0)
    assert bool((res <= 100 * tol * scale).all()), res


# ------------------------------------------------------------------ Lanczos
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("k", [1, 3])
def test_lanczos_matches_eigh(which, k, dtype, device):
    A = spectrum_matrix(SPECTRUM)
    n = A.shape[0]
    sol = lanczos(matmat_of(A, dtype, device), n, dtype, device, Lanczos(tol=TOL[dtype], seed=0),
                  k=k, which=which)  # fmt: skip
    assert sol.status is Status.CONVERGED, sol.message
    vals, vecs = sol.value
    assert vals.shape == (k,) and vecs.shape == (n, k)
    assert vals.dtype == vecs.dtype == dtype
    assert vals.device.type == torch.device(device).type
    check_pairs(A, vals, vecs, wanted_eigenvalues(A, k, which), 10 * TOL[dtype])
    assert sol.residuals.shape == (sol.iterations + 1, k)
    assert sol.residuals.dtype == torch.float64
    assert sol.iterations < n
    assert isinstance(sol.algorithm, Lanczos)


def test_lanczos_orders_most_wanted_first():
    A = spectrum_matrix(SPECTRUM)
    for which, expected in [("LA", [8.0, 7.0]), ("SA", [-12.0, -9.0]), ("LM", [-12.0, -9.0])]:
        sol = lanczos(matmat_of(A), 60, torch.float64, "cpu", Lanczos(seed=1), k=2, which=which)
        vals = sol.value[0]
        assert np.allclose(vals.numpy(), expected, atol=1e-6), (which, vals)


def test_lanczos_negative_dominant_eigenvalue():
    A = spectrum_matrix([-10.0, 1.0, 2.0, 3.0, 4.0] + [0.5] * 20)
    la = lanczos(matmat_of(A), 25, torch.float64, "cpu", Lanczos(seed=0), which="LA").value[0]
    lm = lanczos(matmat_of(A), 25, torch.float64, "cpu", Lanczos(seed=0), which="LM").value[0]
    assert abs(float(la[0]) - 4.0) < 1e-8
    assert abs(float(lm[0]) + 10.0) < 1e-8


def test_lanczos_tridiagonal_coefficients_are_float64():
    """In float32 the Ritz values still come from a float64 tridiagonal matrix."""
    A = spectrum_matrix(SPECTRUM)
    sol = lanczos(matmat_of(A, torch.float32), 60, torch.float32, "cpu", Lanczos(tol=1e-4, seed=0))
    a, b, _ = lanczos_tridiag(matmat_of(A, torch.float32), torch.ones(60), 10)
    assert a.dtype == b.dtype == torch.float64
    assert sol.converged and abs(float(sol.value[0][0]) - 8.0) < 1e-4 * 12


def test_lanczos_stops_on_ritz_convergence_not_breakdown():
    """A loose tol stops long before the Krylov space is exhausted."""
    lam = np.concatenate([[10.0], np.linspace(0, 5, 199)])
    A = spectrum_matrix(lam)
    sol = lanczos(matmat_of(A), 200, torch.float64, "cpu", Lanczos(tol=1e-3, seed=0))
    assert sol.converged and sol.iterations < 30
    assert abs(float(sol.value[0][0]) - 10.0) <= 1e-3 * 10
    last = sol.residuals[-1, 0]
    assert last <= 1e-3


def test_lanczos_ggn_like_spectrum_loose_tol_within_one_percent():
    """CoLA's failure mode: close top eigenvalues and tol=1e-2 (see solvers.problems)."""
    lam = np.concatenate([[0.63618, 0.5887, 0.5322, 0.5253], 0.5 * np.logspace(0, -6, 196)])
    A = spectrum_matrix(lam, seed=3)
    for seed in range(5):
        sol = lanczos(matmat_of(A, torch.float32), 200, torch.float32, "cpu",
                      Lanczos(tol=1e-2, seed=seed))  # fmt: skip
        assert sol.converged
        assert abs(float(sol.value[0][0]) / 0.63618 - 1) < 0.01


def test_lanczos_repeated_and_zero_eigenvalues_by_restart():
    """A low-rank A: the Krylov space breaks down; restarts find the repeated zeros."""
    g = torch.Generator().manual_seed(0)
    U = torch.randn(80, 4, dtype=torch.float64, generator=g)
    A = U @ U.T
    sol = lanczos(matmat_of(A), 80, torch.float64, "cpu", Lanczos(seed=0, block_size=1), k=3,
                  which="SA")
    assert sol.converged and sol.info["restarts"] >= 2
    assert float(sol.value[0].abs().max()) < 1e-10
    # with sparse host checks (the GPU pattern) a breakdown between checks is rolled back
    for every in (3, 4, 7):
        sparse = lanczos(matmat_of(A), 80, torch.float64, "cpu",
                         Lanczos(seed=0, check_every=every, block_size=1), k=3, which="SA")
        assert sparse.converged and sparse.iterations == sol.iterations
        assert torch.allclose(sparse.value[0], sol.value[0], atol=1e-12)
        assert sparse.info["products"] >= sol.info["products"]
    top = lanczos(matmat_of(A), 80, torch.float64, "cpu", Lanczos(seed=0), k=4, which="LA")
    assert np.allclose(top.value[0].numpy(), wanted_eigenvalues(A, 4, "LA"), rtol=1e-10)
    # a multiple of the identity: one step, an exact answer
    eye = lanczos(lambda X: 3 * X, 10, torch.float64, "cpu", Lanczos(seed=0), k=2)
    assert eye.converged and torch.allclose(eye.value[0], torch.tensor([3.0, 3.0]).double())
    # exhausting a small space is exact
    small = spectrum_matrix([1.0, 2.0, 3.0])
    full = lanczos(matmat_of(small), 3, torch.float64, "cpu", Lanczos(seed=0), k=3, which="SA")
    assert full.converged
    assert torch.allclose(full.value[0], torch.tensor([1.0, 2.0, 3.0]).double())


def test_lanczos_without_reorthogonalization_top_eigenvalue():
    A = spectrum_matrix(SPECTRUM)
    sol = lanczos(matmat_of(A), 60, torch.float64, "cpu",
                  Lanczos(tol=1e-8, reorthogonalize=False, seed=0))  # fmt: skip
    assert sol.converged and abs(float(sol.value[0][0]) - 8.0) < 1e-6


def test_lanczos_max_iters_and_failure_modes():
    A = spectrum_matrix(np.linspace(1, 2, 100))
    with pytest.warns(NotConvergedWarning, match="Lanczos did not converge in 3"):
        sol = lanczos(matmat_of(A), 100, torch.float64, "cpu", Lanczos(max_iters=3, seed=0))
    assert sol.status is Status.MAX_ITERS and sol.iterations == 3
    assert torch.isfinite(sol.value[0]).all()
    with pytest.raises(NotConvergedError):
        lanczos(matmat_of(A), 100, torch.float64, "cpu", Lanczos(max_iters=3, on_failure="raise"))
    fewer = lanczos(matmat_of(A), 100, torch.float64, "cpu", Lanczos(max_iters=2, seed=0), k=3,
                    on_failure="ignore")  # fmt: skip
    assert fewer.status is Status.MAX_ITERS and fewer.value[0].shape == (3,)
    Anan = A.clone()
    Anan[0, 0] = float("nan")
    bad = lanczos(matmat_of(Anan), 100, torch.float64, "cpu", Lanczos(seed=0), on_failure="ignore")
    assert bad.status is Status.NONFINITE and "NaN" in bad.message
    with pytest.raises(ValueError, match="which"):
        lanczos(matmat_of(A), 100, torch.float64, "cpu", which="BE")
    with pytest.raises(ValueError, match="k must be"):
        lanczos(matmat_of(A), 100, torch.float64, "cpu", k=0)


def test_lanczos_seed_check_every_and_v0():
    A = spectrum_matrix(SPECTRUM)
    a = lanczos(matmat_of(A), 60, torch.float64, "cpu", Lanczos(seed=5))
    b = lanczos(matmat_of(A), 60, torch.float64, "cpu", Lanczos(seed=5))
    assert torch.equal(a.value[0], b.value[0]) and a.iterations == b.iterations
    sparse = lanczos(matmat_of(A), 60, torch.float64, "cpu", Lanczos(seed=5, check_every=4))
    assert sparse.converged and sparse.iterations % 4 == 0 or sparse.iterations == 60
    assert abs(float(sparse.value[0][0]) - float(a.value[0][0])) < 1e-9
    assert sparse.residuals.shape == (sparse.iterations + 1, 1)
    assert torch.isnan(sparse.residuals[1, 0])  # not evaluated at step 1
    v0 = torch.randn(60, dtype=torch.float64)
    saved = v0.clone()
    c = lanczos(matmat_of(A), 60, torch.float64, "cpu", Lanczos(), v0=v0)
    assert torch.equal(v0, saved) and abs(float(c.value[0][0]) - 8.0) < 1e-8


# ------------------------------------------------------------------ lanczos_tridiag
def test_lanczos_tridiag_relations(dtype):
    A = spectrum_matrix(SPECTRUM)
    m = 15
    alphas, betas, Q = lanczos_tridiag(matmat_of(A, dtype), torch.randn(60, dtype=dtype), m)
    assert alphas.shape == (m,) and betas.shape == (m - 1,) and Q.shape == (60, m)
    T = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
    Qd = Q.double()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(Qd.T @ Qd, torch.eye(m, dtype=torch.float64), atol=tol)
    assert torch.allclose(Qd.T @ A @ Qd, T, atol=tol * 50)


def test_lanczos_tridiag_quadrature_and_batch():
    """e₁ᵀ f(T) e₁ = v₀ᵀ f(A) v₀ / ‖v₀‖² once the space is exhausted; probes batch."""
    A = spectrum_matrix(np.linspace(0.5, 4.0, 12))
    V = torch.randn(12, 3, dtype=torch.float64)
    a, b, Q = lanczos_tridiag(matmat_of(A), V, 12)
    assert a.shape == (12, 3) and b.shape == (11, 3) and Q.shape == (12, 12, 3)
    lam, S = torch.linalg.eigh(A)
    for p in range(3):
        single = lanczos_tridiag(matmat_of(A), V[:, p], 12)
        assert torch.allclose(single[0], a[:, p], atol=1e-10)
        T = torch.diag(a[:, p]) + torch.diag(b[:, p], 1) + torch.diag(b[:, p], -1)
        theta, W = torch.linalg.eigh(T)
        quad = (W[0] ** 2 * theta.log()).sum()
        v = V[:, p] / V[:, p].norm()
        exact = v @ (S * lam.log()) @ S.T @ v
        assert torch.allclose(quad, exact, atol=1e-10)


def test_lanczos_tridiag_cuts_at_breakdown():
    A = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0], dtype=torch.float64))
    a, b, Q = lanczos_tridiag(matmat_of(A), torch.ones(5, dtype=torch.float64), 5)
    assert a.shape == (3,) and b.shape == (2,) and Q.shape == (5, 3)  # 3 distinct eigenvalues
    T = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
    assert torch.allclose(torch.linalg.eigvalsh(T), torch.tensor([1.0, 2.0, 3.0]).double())
    # batched: the broken-down probe keeps zeros after it, so T decouples
    V = torch.stack([torch.ones(5), torch.randn(5)], 1).double()
    a2, b2, _ = lanczos_tridiag(matmat_of(A), V, 5)
    assert torch.all(a2[3:, 0] == 0) and torch.all(b2[2:, 0] == 0)
    assert torch.isfinite(a2).all() and torch.isfinite(b2).all()


# ------------------------------------------------------------------ power iteration
def test_power_iteration_negative_dominant(dtype, device):
    A = spectrum_matrix([-10.0, 6.0, 5.0, 3.0] + [1.0] * 16)
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    sol = power_iteration(matmat_of(A, dtype, device), 20, dtype, device,
                          PowerIteration(tol=tol, seed=0))  # fmt: skip
    assert sol.status is Status.CONVERGED, sol.message
    lam, v = sol.value
    assert lam.shape == (1,) and v.shape == (20, 1) and lam.dtype == dtype
    assert abs(float(lam[0]) + 10.0) <= 10 * tol * 10
    res = torch.linalg.vector_norm(A @ v.double().cpu() - float(lam[0]) * v.double().cpu())
    assert res <= 2 * tol * 10
    assert sol.iterations > 3  # it did not stop at once
    assert sol.residuals.shape == (sol.iterations + 1, 1)


def test_power_iteration_positive_and_sparse_checks():
    A = spectrum_matrix([4.0, -2.0, 1.0, 0.5, 0.1])
    a = power_iteration(matmat_of(A), 5, torch.float64, "cpu", PowerIteration(tol=1e-10, seed=0))
    b = power_iteration(matmat_of(A), 5, torch.float64, "cpu",
                        PowerIteration(tol=1e-10, seed=0, check_every=6))  # fmt: skip
    assert a.converged and b.converged
    assert abs(float(a.value[0][0]) - 4.0) < 1e-9
    assert a.iterations == b.iterations and torch.equal(a.value[0], b.value[0])


def test_power_iteration_plus_minus_pair_does_not_converge():
    A = spectrum_matrix([5.0, -5.0, 1.0, 0.5])
    with pytest.warns(NotConvergedWarning, match="Lanczos"):
        sol = power_iteration(matmat_of(A), 4, torch.float64, "cpu",
                              PowerIteration(max_iters=50, seed=0))  # fmt: skip
    assert sol.status is Status.MAX_ITERS and sol.iterations == 50


def test_power_iteration_edge_cases():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zero = power_iteration(lambda X: 0 * X, 4, torch.float64, "cpu", PowerIteration(seed=0))
    assert zero.converged and float(zero.value[0][0]) == 0.0
    Anan = spectrum_matrix([1.0, 2.0])
    Anan[0, 1] = float("nan")
    bad = power_iteration(matmat_of(Anan), 2, torch.float64, "cpu", on_failure="ignore")
    assert bad.status is Status.NONFINITE
    with pytest.raises(ValueError):
        power_iteration(lambda X: X, 3, torch.float64, "cpu", v0=torch.ones(4))


# ------------------------------------------------------------------ LOBPCG
@pytest.mark.parametrize("which", ["LA", "SA"])
def test_lobpcg_top_k(which, dtype, device):
    A = spectrum_matrix(SPECTRUM)
    tol = TOL[dtype]
    sol = lobpcg(matmat_of(A, dtype, device), 60, dtype, device, LOBPCG(tol=tol, seed=0), k=3,
                 which=which)  # fmt: skip
    assert sol.status is Status.CONVERGED, sol.message
    vals, vecs = sol.value
    assert vals.shape == (3,) and vecs.shape == (60, 3) and vals.dtype == dtype
    check_pairs(A, vals, vecs, wanted_eigenvalues(A, 3, which), 10 * tol)
    # the block is orthonormal
    V = vecs.double().cpu()
    assert torch.allclose(V.T @ V, torch.eye(3, dtype=torch.float64), atol=1e-4)
    assert sol.residuals.shape == (sol.iterations + 1, 3)


def test_lobpcg_largest_magnitude_and_negative():
    A = spectrum_matrix(SPECTRUM)
    sol = lobpcg(matmat_of(A), 60, torch.float64, "cpu", LOBPCG(tol=1e-8, seed=0), k=2, which="LM")
    assert sol.converged
    assert np.allclose(sol.value[0].numpy(), [-12.0, -9.0], atol=1e-6)


def test_lobpcg_repeated_eigenvalues_with_block():
    A = spectrum_matrix([5.0, 5.0, 5.0] + list(np.linspace(-1, 2, 37)))
    sol = lobpcg(matmat_of(A), 40, torch.float64, "cpu", LOBPCG(tol=1e-8, seed=0, block_size=5),
                 k=3)  # fmt: skip
    assert sol.converged and sol.info["block_size"] == 5
    assert torch.allclose(sol.value[0], torch.full((3,), 5.0, dtype=torch.float64), atol=1e-7)


def test_lobpcg_preconditioner_reduces_iterations():
    """Smallest eigenvalues of a badly scaled SPD matrix: Jacobi helps LOBPCG."""
    g = torch.Generator().manual_seed(0)
    n = 80
    C = torch.randn(n, n, dtype=torch.float64, generator=g) / n
    C = C @ C.T + torch.eye(n, dtype=torch.float64)
    d = torch.logspace(-2, 2, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    A = d.sqrt()[:, None] * C * d.sqrt()[None, :]
    inv_diag = 1 / A.diagonal()
    plain = lobpcg(matmat_of(A), n, torch.float64, "cpu", LOBPCG(tol=1e-6, seed=0, max_iters=300),
                   k=2, which="SA", on_failure="ignore")  # fmt: skip
    pre = lobpcg(matmat_of(A), n, torch.float64, "cpu", LOBPCG(tol=1e-6, seed=0), k=2, which="SA",
                 preconditioner=lambda X: inv_diag[:, None] * X)  # fmt: skip
    assert pre.converged
    assert np.allclose(pre.value[0].numpy(), wanted_eigenvalues(A, 2, "SA"), rtol=1e-6)
    assert 2 * pre.iterations < plain.iterations, (pre.iterations, plain.iterations)


def test_lobpcg_failure_modes():
    A = spectrum_matrix(np.linspace(1, 2, 50))
    with pytest.warns(NotConvergedWarning, match="LOBPCG did not converge"):
        sol = lobpcg(matmat_of(A), 50, torch.float64, "cpu", LOBPCG(max_iters=2, seed=0))
    assert sol.status is Status.MAX_ITERS and sol.iterations == 2
    Anan = A.clone()
    Anan[1, 1] = float("inf")
    bad = lobpcg(matmat_of(Anan), 50, torch.float64, "cpu", LOBPCG(seed=0), on_failure="ignore")
    assert bad.status is Status.NONFINITE
    X0 = torch.randn(50, 2, dtype=torch.float64)
    saved = X0.clone()
    warm = lobpcg(matmat_of(A), 50, torch.float64, "cpu", LOBPCG(tol=1e-8), k=2, X0=X0)
    assert torch.equal(X0, saved) and warm.converged
    assert np.allclose(warm.value[0].numpy(), [2.0, wanted_eigenvalues(A, 2, "LA")[1]], atol=1e-7)


# ------------------------------------------------------------------ the reference GGN
# torch.func's jvp of SiLU goes through a deprecated torch.jit.script inside torch itself
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_eigmax_reference_ggn_loose_tol_within_one_percent():
    """The issue's accuracy target at kernel level: the GGN of the CoLA notebook problem.

    Its top eigenvalue is 0.63618 (solvers.problems); CoLA's loose Lanczos returns 0.547.
    """
    from torch.func import functional_call, jvp, vjp

    from solvers.problems import reference_problem

    model, X, _, _ = reference_problem()
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in params]

    def f(flat):
        chunks = flat.split(sizes)
        weights = {nm: c.reshape(p.shape) for nm, c, p in zip(names, chunks, params)}
        return functional_call(model, weights, (X,))

    flat0 = torch.cat([p.reshape(-1) for p in params])
    logits, pullback = vjp(f, flat0)
    P = torch.softmax(logits, -1)

    def ggn(V):  # Jᵀ H J with H the Hessian of the mean cross-entropy in the logits
        cols = []
        for v in V.T:
            Jv = jvp(f, (flat0,), (v,))[1]
            cols.append(pullback((P * Jv - P * (P * Jv).sum(-1, keepdim=True)) / len(X))[0])
        return torch.stack(cols, 1)

    n = flat0.numel()
    for seed in (0, 1):
        sol = lanczos(ggn, n, torch.float32, "cpu", Lanczos(tol=1e-2, seed=seed))
        assert sol.converged and sol.iterations <= 15
        assert abs(float(sol.value[0][0]) / 0.63618 - 1) < 0.01, float(sol.value[0][0])
