"""Gradients of ``inv(A(θ)) @ b`` with respect to θ and b: an adjoint solve, not unrolling.

Checked against dense autograd through ``torch.linalg.solve`` in float64.
"""

import pytest
import torch
from _helpers import DEVICE_PARAMS, F64, randn

import solvers
from linops import PSD, Dense, Diagonal, Kronecker, LinearOperator, SelfAdjoint
from solvers import CG, GMRES, MINRES, Auto, Cholesky, inv


def spd_of(theta):
    """A(θ) = θᵀθ / n + I: symmetric positive definite, cond ≈ 5."""
    n = theta.shape[0]
    return theta.T @ theta / n + torch.eye(n, dtype=theta.dtype, device=theta.device)


def grads(loss_fn, *inputs):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    return torch.autograd.grad(loss_fn(*leaves), leaves)


def close(a, b, tol):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


PSD_ALGS = [CG(tol=1e-13), Cholesky(), solvers.Dense(), None, Auto(tol=1e-13, dense_threshold=0)]
PSD_IDS = ["cg", "cholesky", "dense", "auto-dense", "auto-cg"]


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("k", [None, 3], ids=["vector", "matrix"])
@pytest.mark.parametrize("alg", PSD_ALGS, ids=PSD_IDS)
def test_gradient_psd_dense_operator(alg, k, device):
    n = 8
    theta0 = randn(n, n, seed=2, device=device)
    b0 = randn(n, seed=3, device=device) if k is None else randn(n, k, seed=3, device=device)
    c = torch.randn_like(b0)

    def ours(theta, b):
        x = inv(PSD(Dense(spd_of(theta))), alg) @ b
        return (x * c).sum() + (x**2).sum()

    def reference(theta, b):
        x = torch.linalg.solve(spd_of(theta), b)
        return (x * c).sum() + (x**2).sum()

    g_theta, g_b = grads(ours, theta0, b0)
    r_theta, r_b = grads(reference, theta0, b0)
    assert close(g_theta, r_theta, 1e-9) and close(g_b, r_b, 1e-9)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize(
    "alg", [GMRES(tol=1e-13), solvers.Dense(), Auto(tol=1e-13, dense_threshold=0)],
    ids=["gmres", "dense", "auto-gmres"],
)
def test_gradient_diagonal_plus_dense(alg, device):
    # A(θ) = Diagonal(θ) + D₀ with a non-symmetric D₀: the adjoint solve uses Aᵀ
    n = 8
    theta0 = torch.rand(n, dtype=F64).add(2.0).to(device)
    D0 = (0.2 * randn(n, n, seed=4)).to(device)
    b0 = randn(n, 2, seed=5, device=device)

    def ours(theta, b):
        X = inv(Diagonal(theta) + Dense(D0), alg) @ b
        return (X**2).sum() + X[0, 1]

    def reference(theta, b):
        X = torch.linalg.solve(torch.diag(theta) + D0, b)
        return (X**2).sum() + X[0, 1]

    g_theta, g_b = grads(ours, theta0, b0)
    r_theta, r_b = grads(reference, theta0, b0)
    assert close(g_theta, r_theta, 1e-9) and close(g_b, r_b, 1e-9)


def test_gradient_symmetric_indefinite_with_minres():
    n = 8
    S0 = randn(n, n, seed=6)
    S0 = S0 + S0.T + 0.5 * torch.eye(n, dtype=F64)
    b0 = randn(n, seed=7)

    def ours(S, b):
        return (inv(SelfAdjoint(Dense((S + S.T) / 2)), MINRES(tol=1e-13)) @ b).pow(2).sum()

    def reference(S, b):
        return torch.linalg.solve((S + S.T) / 2, b).pow(2).sum()

    g, r = grads(ours, S0, b0), grads(reference, S0, b0)
    assert all(close(a, e, 1e-8) for a, e in zip(g, r))


def test_gradient_through_structural_rules():
    # Diagonal: x = b / θ; Kronecker: factor-wise inverses, each differentiable
    theta0 = torch.rand(6, dtype=F64) + 1.0
    A0, B0 = randn(3, 3, seed=8), randn(2, 2, seed=9)
    b0 = randn(6, seed=10)

    def ours(theta, A, B, b):
        x = inv(Diagonal(theta)) @ b
        y = inv(Kronecker(PSD(Dense(spd_of(A))), PSD(Dense(spd_of(B)))), CG(tol=1e-13)) @ b
        return (x**2).sum() + (y * x).sum()

    def reference(theta, A, B, b):
        x = b / theta
        y = torch.linalg.solve(torch.kron(spd_of(A), spd_of(B)), b)
        return (x**2).sum() + (y * x).sum()

    g, r = grads(ours, theta0, A0, B0, b0), grads(reference, theta0, A0, B0, b0)
    assert all(close(a, e, 1e-9) for a, e in zip(g, r))


def test_gradcheck_against_finite_differences():
    theta0 = randn(5, 5, seed=11).requires_grad_(True)
    b0 = randn(5, seed=12).requires_grad_(True)

    def f(theta, b):
        return inv(PSD(Dense(spd_of(theta))), CG(tol=1e-14)) @ b

    assert torch.autograd.gradcheck(f, (theta0, b0), eps=1e-6, atol=1e-6)


class CountingPSD(LinearOperator):
    """A PSD dense operator that counts its products (calls and columns)."""

    def __init__(self, M):
        super().__init__(M.dtype, M.shape, M.device)
        self.M = M
        self.calls = 0
        self._tags = frozenset({"self_adjoint", "psd"})

    def _matmat(self, X):
        self.calls += 1
        return self.M @ X


def _graph_nodes(t):
    seen, stack = set(), [t.grad_fn]
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        stack.extend(g for g, _ in f.next_functions)
    return seen


@pytest.mark.parametrize("tol", [1e-2, 1e-12])
def test_backward_is_one_adjoint_solve_not_unrolled(tol):
    n = 30
    theta = randn(n, n, seed=13).requires_grad_(True)
    b = randn(n, seed=14)
    c = randn(n, seed=15)
    A = CountingPSD(spd_of(theta))
    Ainv = inv(A, CG(tol=tol))
    x = Ainv @ b
    forward = A.calls
    assert forward == Ainv.solution.info["products"]
    # the graph has a fixed handful of nodes whatever the number of iterations
    nodes = _graph_nodes(x)
    assert len(nodes) <= 10
    assert any("ImplicitSolve" in type(f).__name__ for f in nodes)
    (x * c).sum().backward()
    backward = A.calls - forward
    # one adjoint solve Aᵀ λ = c, plus one product A x for ∂(A x)/∂θ
    with torch.no_grad():
        probe = CountingPSD(spd_of(theta.detach()))
        inv(probe, CG(tol=tol)) @ c
    assert backward == probe.calls + 1
    # and the gradient is that of the dense solve (up to the solver tolerance)
    th = theta.detach().clone().requires_grad_(True)
    (torch.linalg.solve(spd_of(th), b) * c).sum().backward()
    assert close(theta.grad, th.grad, 1e-8 if tol < 1e-6 else 0.2)


def test_gradient_with_respect_to_b_only():
    n = 12
    M = spd_of(randn(n, n, seed=16))
    A = CountingPSD(M)
    b = randn(n, seed=17).requires_grad_(True)
    x = inv(A, CG(tol=1e-13)) @ b
    forward = A.calls
    x.sum().backward()
    ref = torch.linalg.solve(M.T, torch.ones(n, dtype=F64))
    assert close(b.grad, ref, 1e-10)
    assert 0 < A.calls - forward <= n + 2  # one adjoint solve, no product for θ
