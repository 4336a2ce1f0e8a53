"""Curvature preconditioners (``solvers.curvature_preconditioner``) for CG on a GGN."""

import pytest
import torch
from torch import nn

import solvers
from linops import I_like
from linops.curvature import GGN, KFAC, DiagGGN
from solvers.curvature_preconditioners import PRECONDITIONER_KINDS, curvature_preconditioner

F64 = torch.float64


def _problem(N=40):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    return model, (torch.randn(N, 4, dtype=F64), torch.randint(0, 3, (N,)))


@pytest.mark.parametrize("kind", PRECONDITIONER_KINDS)
def test_each_preconditioner_is_the_inverse_of_its_damped_approximation(kind):
    model, data = _problem()
    G = GGN(model, nn.CrossEntropyLoss(), data)
    lam = 1e-2
    P = curvature_preconditioner(G, kind, lam, seed=1)
    if kind.startswith("diag"):
        C = DiagGGN(model, nn.CrossEntropyLoss(), data,
                    mc_samples=None if kind == "diag" else 1, seed=1).to_dense()
    elif kind == "ekfac":
        C = None
    else:
        C = KFAC(model, nn.CrossEntropyLoss(), data, bias="joint",
                 fisher="exact" if kind == "kfac" else "mc", seed=1).to_dense()
    V = torch.randn(G.shape[0], 3, dtype=F64)
    if C is not None:
        ref = torch.linalg.solve(C + lam * torch.eye(G.shape[0], dtype=F64), V)
        torch.testing.assert_close(P @ V, ref, rtol=1e-9, atol=1e-11)
    Pd = P.to_dense()
    torch.testing.assert_close(Pd, Pd.T, rtol=1e-9, atol=1e-11)
    assert float(torch.linalg.eigvalsh(Pd).min()) > 0
    # CG with it solves the damped system
    A = G + lam * I_like(G)
    x = solvers.inv(A, alg=solvers.CG(tol=1e-10, preconditioner=P)) @ G.gradient
    torch.testing.assert_close(x, torch.linalg.solve(A.to_dense(), G.gradient), rtol=1e-7,
                               atol=1e-9)


def test_kronecker_preconditioner_cuts_iterations_on_badly_scaled_inputs():
    torch.manual_seed(2)
    model = nn.Linear(20, 4, bias=False).to(F64)
    scales = torch.logspace(-2, 2, 20, dtype=F64)
    X, y = torch.randn(50, 20, dtype=F64) * scales, torch.randn(50, 4, dtype=F64)
    G = GGN(model, nn.MSELoss(), (X, y))
    lam = 1e-6
    A = G + lam * I_like(G)
    iters = {}
    for kind in (None, "diag", "kfac"):
        P = None if kind is None else curvature_preconditioner(G, kind, lam)
        Ainv = solvers.inv(A, alg=solvers.CG(tol=1e-8, max_iters=500, preconditioner=P))
        Ainv @ G.gradient
        iters[kind] = Ainv.solution.iterations
    # one linear layer with MSE: KFLR is the exact GGN, so CG needs one or two steps
    assert iters["kfac"] <= 2 < 15 < iters[None], iters
    assert iters["diag"] < iters[None], iters


def test_bad_input():
    model, data = _problem(8)
    G = GGN(model, nn.CrossEntropyLoss(), data)
    with pytest.raises(ValueError, match="kind must be one of"):
        curvature_preconditioner(G, "shampoo")
    with pytest.raises(ValueError, match="damping must be a positive number"):
        curvature_preconditioner(G, "kfac", 0.0)
    with pytest.raises(TypeError, match="jacobi, nystrom"):
        curvature_preconditioner(G.to_dense(), "kfac")
    assert solvers.curvature_preconditioner is curvature_preconditioner
