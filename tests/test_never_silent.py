"""The cases of issue 12 that gave a wrong number with no word: each is now right (checked
against a float64 reference) or a status the caller reads, warned by default."""

import warnings

import pytest
import torch
from _helpers import F64, randn, spd
from torch import nn

import linops
import solvers
from linops import PSD, Dense, Diagonal, Kronecker
from linops.curvature import GGN, Hessian
from solvers import Auto, NotConvergedError, NotConvergedWarning, Status
from solvers.lanczos import lanczos_tridiag


# ------------------------------------------------------------------ logdet of NaN
def _with_nan(n=4):
    M = spd(n, 5.0)
    M[0, 1] = M[1, 0] = float("nan")
    return M


def _nan_diagonal(M):
    d = M.diagonal().clone()
    d[2] = float("nan")
    return Diagonal(d)


@pytest.mark.parametrize("build", [
    lambda M: Dense(M), lambda M: PSD(Dense(M)), _nan_diagonal,
    lambda M: Kronecker(Dense(M), Dense(torch.eye(2, dtype=F64))),
], ids=["dense", "psd-dense", "diagonal", "kronecker"])
def test_logdet_of_nan_is_nan_not_minus_inf(build):
    A = build(_with_nan())
    assert torch.isnan(torch.logdet(A.to_dense()))  # the reference
    assert torch.isnan(solvers.logdet(A))


def test_logdet_of_a_singular_matrix_is_still_minus_inf():
    assert solvers.logdet(Diagonal(torch.tensor([1.0, 0.0], dtype=F64))) == -torch.inf
    M = spd(5)
    assert solvers.logdet(Dense(M)) == pytest.approx(torch.logdet(M).item(), rel=1e-12)


# ------------------------------------------------------------------ dense solves check x
def _numerically_singular(n=50, r=30):
    B = randn(n, r, seed=3)
    return B @ B.T


def test_auto_lu_on_a_numerically_singular_matrix_warns_with_the_residual():
    M, b = _numerically_singular(), randn(50, seed=4)
    Ainv = solvers.inv(Dense(M))
    with pytest.warns(NotConvergedWarning, match="numerically singular"):
        x = Ainv @ b
    sol = Ainv.solution
    assert sol.status is Status.BREAKDOWN
    ref = float(torch.linalg.vector_norm(b - M @ x) / torch.linalg.vector_norm(b))
    assert ref > 1e-3  # x is not a solution: the record says so, with the true residual
    assert float(sol.residuals[0, 0]) == pytest.approx(ref, rel=1e-6)
    with pytest.raises(NotConvergedError, match="pinv"):
        solvers.inv(Dense(M), alg=Auto(on_failure="raise")) @ b


@pytest.mark.parametrize("alg", [solvers.Dense(), solvers.Cholesky()], ids=["lu", "cholesky"])
def test_dense_solves_of_good_systems_converge_and_record_their_residual(alg, dtype, device):
    M, B = spd(30, 100.0), randn(30, 2, seed=5)
    Md, Bd = M.to(dtype=dtype, device=device), B.to(dtype=dtype, device=device)
    Ainv = solvers.inv(PSD(Dense(Md)), alg=alg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        X = Ainv @ Bd
    assert Ainv.solution.status is Status.CONVERGED
    torch.testing.assert_close(X.double().cpu(), torch.linalg.solve(M, B),
                               rtol=1e-3 if dtype == torch.float32 else 1e-10, atol=0)
    ref = torch.linalg.vector_norm(Bd - Md @ X, dim=0) / Bd.norm(dim=0)
    torch.testing.assert_close(Ainv.solution.residuals[0], ref.double().cpu(), rtol=1e-3,
                               atol=1e-7)


def test_dense_tol_sets_the_residual_accepted():
    """float32 with cond 1e6 leaves a residual of about 1e-2 (eps·cond): reported by default
    (√eps), accepted with an explicit tol; x matches the float64 solution to that level."""
    M, b = spd(100, 1e6), randn(100, seed=10)
    Ainv = solvers.inv(Dense(M.float()))
    with pytest.warns(NotConvergedWarning, match="ill-conditioned for torch.float32"):
        Ainv @ b.float()
    assert Ainv.solution.status is Status.BREAKDOWN
    loose = solvers.inv(Dense(M.float()), alg=solvers.Dense(tol=0.5))
    x = loose @ b.float()
    assert loose.solution.status is Status.CONVERGED
    r = float(torch.linalg.vector_norm(b - M @ x.double()) / b.norm())
    assert float(loose.solution.residuals.max()) == pytest.approx(r, rel=0.25)


def test_dense_solve_kernel_checks_the_residual_too():
    from solvers.dense_algs import dense_solve

    M = _numerically_singular()
    sol = dense_solve(M, randn(50, seed=6), solvers.Dense(on_failure="ignore"))
    assert sol.status is Status.BREAKDOWN and "numerically singular" in sol.message
    good = dense_solve(spd(10), randn(10, seed=7), solvers.Dense())
    assert good.status is Status.CONVERGED


def test_nan_operator_in_cholesky_is_reported_as_nan_not_as_indefinite():
    Ainv = solvers.inv(PSD(Dense(_with_nan())), alg=solvers.Cholesky())
    with pytest.warns(NotConvergedWarning, match="NaN or infinity"):
        x = Ainv @ torch.ones(4, dtype=F64)
    assert Ainv.solution.status is Status.NONFINITE and torch.isnan(x).all()


# ------------------------------------------------------------------ sqrt of a singular PSD A
def test_lanczos_sqrt_of_a_singular_psd_matrix_is_finite_and_right(device):
    """float32 rounding puts Ritz values of a singular PSD A at about −2e-7, where sqrt is
    NaN; they are zero eigenvalues. The product must be finite and match the float64
    reference (half of the spectrum is zero)."""
    n = 200
    Q = torch.linalg.qr(randn(n, n, seed=8))[0]
    lam = torch.cat([torch.zeros(n // 2, dtype=F64), torch.linspace(0.1, 1, n - n // 2,
                                                                    dtype=F64)])
    A = PSD(Dense(((Q * lam) @ Q.T).float().to(device)))
    V = randn(n, 4, seed=9).float().to(device)
    alg = solvers.Lanczos(max_iters=80, tol=1e-2)
    # the trap is there: some Ritz values are negative
    a, b, _ = lanczos_tridiag(A._matmat, V / V.norm(dim=0), 80)
    T = torch.diag_embed(a.mT) + torch.diag_embed(b.mT, 1) + torch.diag_embed(b.mT, -1)
    assert bool((torch.linalg.eigvalsh(T).min(-1).values < 0).any())
    Y = solvers.sqrt(A, alg=alg) @ V
    assert torch.isfinite(Y).all()
    ref = (Q * lam.sqrt()) @ Q.T @ V.double().cpu()
    err = (Y.double().cpu() - ref).norm(dim=0) / ref.norm(dim=0)
    assert float(err.max()) < 1e-2


def test_lanczos_sqrt_of_an_indefinite_matrix_tagged_psd_says_why_it_is_nan():
    n = 60
    A = PSD(Dense(torch.diag(torch.linspace(-1, 1, n))))
    S = solvers.sqrt(A, alg=solvers.Lanczos(max_iters=n, on_failure="raise"))
    with pytest.raises(NotConvergedError, match="undefined at the Ritz value -1"):
        S @ torch.ones(n)


# ------------------------------------------------------------------ curvature
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_uncached_batches_with_some_ignored_targets_match_the_one_batch_reference():
    """Ignored targets in some batches are fine: the uncached operator over the batches
    equals the operator of the concatenated batch (the reference), and the loss is torch's."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(8, 3, generator=g, dtype=F64)
    y = torch.tensor([0, 1, -100, 2, -100, -100, -100, -100])
    batches = [(X[:4], y[:4]), (X[4:], y[4:])]  # the second batch is all ignored
    loss = nn.CrossEntropyLoss()
    model = _mlp()
    G, G1 = GGN(model, loss, batches), GGN(model, loss, (X, y))
    v = torch.randn(G.shape[1], 2, generator=g, dtype=F64)
    torch.testing.assert_close(G @ v, G1 @ v, rtol=1e-10, atol=1e-12)
    assert G.loss.item() == pytest.approx(loss(model(X), y).item(), rel=1e-12)
    torch.testing.assert_close(G.gradient, G1.gradient, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [GGN, Hessian])
def test_uncached_batches_with_every_target_ignored_raise_not_nan(cls):
    X = torch.randn(4, 3, dtype=F64)
    ignored = [(X, torch.full((4,), -100))] * 2
    op = cls(_mlp(), nn.CrossEntropyLoss(), ignored)
    with pytest.raises(ValueError, match="ignore_index"):
        op @ torch.ones(op.shape[1], dtype=F64)
    with pytest.raises(ValueError, match="ignore_index"):
        _ = cls(_mlp(), nn.CrossEntropyLoss(), ignored).loss
    with pytest.raises(ValueError, match="ignore_index"):
        _ = cls(_mlp(), nn.CrossEntropyLoss(), ignored).gradient


class _FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(nn.functional.dropout(torch.tanh(self.a(x)), 0.5, self.training))


def test_functional_dropout_is_found_by_the_opt_in_check_and_eval_mode_passes_it():
    X, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    model = _FunctionalDropout()
    G = GGN(model, nn.CrossEntropyLoss(), (X, y))  # not visible to the build (documented)
    with pytest.raises(ValueError, match="not deterministic"):
        G.check_deterministic()
    model.eval()
    G = GGN(model.double(), nn.CrossEntropyLoss(), (X.double(), y))
    assert G.check_deterministic() <= 1e-9
    # and the eval-mode operator is the GGN of the deterministic network (dense reference)
    J = torch.func.jacrev(lambda p: torch.func.functional_call(
        model, dict(zip(G.param_space.names, G.param_space.unflatten(p).values())), (X.double(),)
    ))(G.param_space.flatten(G.params))
    J = J.reshape(-1, G.shape[1])
    p = torch.softmax(model(X.double()), -1).detach()
    H = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p]) / len(X)
    torch.testing.assert_close(G.to_dense(), J.T @ H @ J, rtol=1e-9, atol=1e-12)


def test_first_batch_of_an_uncached_loader_is_checked_when_built():
    ds = torch.utils.data.TensorDataset(torch.randn(6, 3))  # inputs only
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    with pytest.raises(TypeError, match=r"pair \(X, y\)"):
        GGN(_mlp().float(), nn.CrossEntropyLoss(), loader)


def test_to_scipy_and_back_keeps_the_numbers():
    """A cheap smoke of the interop on a structured operator against its dense matrix."""
    A = Kronecker(Dense(spd(3)), Dense(spd(4, seed=1)))
    B = linops.from_scipy(A.to_scipy())
    torch.testing.assert_close(B.to_dense(), A.to_dense(), rtol=1e-12, atol=1e-12)
