"""scipy interop both ways, against dense float64 references: scipy's eigsh, lsqr and gmres
on ``A.to_scipy()``, and ``linops.from_scipy`` on a scipy LinearOperator, a sparse matrix and
a dense array."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from _helpers import DEVICE_PARAMS, F64, randn, spd
from scipy.sparse.linalg import LinearOperator as ScipyOperator
from scipy.sparse.linalg import aslinearoperator, eigsh, gmres, lsqr
from torch import nn

import linops
from linops import PSD, Dense, Diagonal, I_like, Kronecker, from_scipy


# ------------------------------------------------------------------ to_scipy
@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_eigsh_on_a_structured_operator_matches_dense(device):
    A = PSD(Kronecker(Dense(spd(6, 20.0, seed=1).to(device)), Dense(spd(5, 5.0, seed=2).to(device)))
            + 0.1 * I_like(Dense(torch.eye(30, dtype=F64, device=device))))
    ref = torch.linalg.eigvalsh(A.to_dense().cpu()).numpy()
    vals, vecs = eigsh(A.to_scipy(), k=3, which="LA", tol=1e-12)
    np.testing.assert_allclose(np.sort(vals), ref[-3:], rtol=1e-9)
    M = A.to_dense().cpu().numpy()
    np.testing.assert_allclose(M @ vecs, vecs * vals, atol=1e-8)


def test_lsqr_on_a_rectangular_operator_matches_lstsq():
    M = randn(12, 5, seed=3)
    b = randn(12, seed=4)
    x = lsqr(Dense(M).to_scipy(), b.numpy(), atol=1e-14, btol=1e-14, iter_lim=200)[0]
    ref = torch.linalg.lstsq(M, b[:, None]).solution[:, 0].numpy()
    np.testing.assert_allclose(x, ref, rtol=1e-8, atol=1e-10)


def test_gmres_on_a_sum_of_operators_matches_solve():
    M = randn(15, 15, seed=5) + 6 * torch.eye(15, dtype=F64)
    A = Dense(M) + Diagonal(torch.linspace(1, 2, 15, dtype=F64))
    b = randn(15, seed=6)
    x, info = gmres(A.to_scipy(), b.numpy(), rtol=1e-12, atol=0, restart=15, maxiter=50)
    assert info == 0
    np.testing.assert_allclose(x, torch.linalg.solve(A.to_dense(), b).numpy(), rtol=1e-9)


def test_to_scipy_dtype_and_adjoint():
    M = randn(4, 3, seed=7)
    L = Dense(M.float()).to_scipy()
    assert L.dtype == np.float32 and L.shape == (4, 3)
    L64 = Dense(M.float()).to_scipy(dtype=np.float64)
    y = L64.matvec(np.ones(3))
    assert y.dtype == np.float64 and y.shape == (4,)
    np.testing.assert_allclose(y, M.float().sum(1).double().numpy(), rtol=1e-6)
    Y = L64.rmatmat(np.eye(4))
    np.testing.assert_allclose(Y, M.T.numpy(), rtol=1e-6)
    Z = L64.matmat(np.eye(3))
    assert Z.shape == (4, 3)


@pytest.mark.parametrize("cls", ["GGN", "Hessian"])
@pytest.mark.parametrize("fast_path", [None, False], ids=["fast", "autograd"])
def test_to_scipy_on_a_curvature_operator_gives_its_extreme_eigenvalues(cls, fast_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 2)).double()
    X, y = torch.randn(8, 3, dtype=F64), torch.randint(0, 2, (8,))
    G = getattr(linops.curvature, cls)(model, nn.CrossEntropyLoss(), (X, y),
                                       fast_path=fast_path)
    lam = torch.linalg.eigvalsh(G.to_dense())  # the operator itself is tested elsewhere
    top = eigsh(G.to_scipy(), k=1, which="LA", tol=1e-12)[0][0]
    low = eigsh(G.to_scipy(), k=1, which="SA", tol=1e-12)[0][0]
    assert top == pytest.approx(lam[-1].item(), rel=1e-9)
    assert low == pytest.approx(lam[0].item(), abs=1e-9)


def test_to_scipy_rejects_what_it_cannot_do():
    with pytest.raises(TypeError, match="LinearOperator"):
        linops.scipy_interop.to_scipy(np.eye(2))
    with pytest.raises(TypeError, match="imaginary"):
        Dense(torch.eye(2, dtype=torch.complex128)).to_scipy(dtype=np.float64)
    with pytest.raises(TypeError, match="floating or complex"):
        Dense(torch.eye(2, dtype=F64)).to_scipy(dtype=np.int64)


# ------------------------------------------------------------------ from_scipy
def _check_against(op, M):
    V = randn(M.shape[1], 3, seed=8)
    W = randn(M.shape[0], 2, seed=9)
    torch.testing.assert_close(op @ V, M @ V, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op @ V[:, 0], M @ V[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.H @ W, M.T @ W, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.to_dense(), M, rtol=1e-12, atol=1e-12)


def test_from_scipy_dense_array():
    M = randn(5, 4, seed=10)
    op = from_scipy(M.numpy())
    assert isinstance(op, Dense) and op.dtype == F64 and op.shape == (5, 4)
    _check_against(op, M)
    assert from_scipy(M.numpy(), dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("fmt", ["csr", "coo", "csc"])
def test_from_scipy_sparse_matrix(fmt):
    S = sp.random(7, 6, density=0.4, random_state=0, format=fmt)
    op = from_scipy(S)
    assert op.shape == (7, 6) and op.dtype == F64
    _check_against(op, torch.from_numpy(S.toarray()))


def test_from_scipy_sparse_array_and_integer_entries():
    S = sp.csr_array(np.array([[1, 0, 2], [0, 3, 0]]))
    op = from_scipy(S)
    assert op.dtype == F64  # integer entries become float64
    _check_against(op, torch.tensor([[1.0, 0, 2], [0, 3, 0]], dtype=F64))


def test_from_scipy_linear_operator_solves_like_dense():
    M = spd(8, 10.0, seed=11)
    L = ScipyOperator(shape=(8, 8), matvec=lambda x: M.numpy() @ x,
                      rmatvec=lambda x: M.numpy().T @ x, dtype=np.float64)
    op = from_scipy(L)
    _check_against(op, M)
    import solvers

    b = randn(8, seed=12)
    x = solvers.inv(PSD(op), alg=solvers.CG(tol=1e-12)) @ b
    torch.testing.assert_close(x, torch.linalg.solve(M, b), rtol=1e-9, atol=1e-9)


def test_round_trip_from_scipy_to_scipy():
    M = randn(6, 6, seed=13).numpy()
    L = from_scipy(aslinearoperator(M)).to_scipy()
    np.testing.assert_allclose(L.matmat(np.eye(6)), M, rtol=1e-12)


def test_from_scipy_rejects_other_objects():
    with pytest.raises(TypeError, match="linops.Dense"):
        from_scipy(torch.eye(2))
    with pytest.raises(TypeError, match="2-d numpy array"):
        from_scipy([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="2-d"):
        from_scipy(np.ones(3))
