"""The dense kernels (Cholesky, Eigh, Dense) against numpy/scipy."""

import numpy as np
import pytest
import scipy.linalg
import torch
from _helpers import spectrum_matrix

from solvers.dense_algs import (
    Cholesky,
    Dense,
    Eigh,
    dense_apply_unary,
    dense_eigh,
    dense_slogdet,
    dense_solve,
    select_eigen,
)
from solvers.result import NotConvergedWarning, Status

SPD = spectrum_matrix(np.logspace(0, 2, 12))
INDEF = spectrum_matrix(np.concatenate([-np.logspace(0, 1, 5), np.logspace(0, 2, 7)]))


@pytest.mark.parametrize("alg", [Cholesky(), Dense(), Eigh()], ids=["chol", "lu", "eigh"])
def test_dense_solve_matches_numpy(alg, dtype):
    B = torch.randn(12, 3, dtype=torch.float64)
    sol = dense_solve(SPD.to(dtype), B.to(dtype), alg)
    assert sol.status is Status.CONVERGED and sol.iterations == 0
    ref = np.linalg.solve(SPD.numpy(), B.numpy())
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    assert np.allclose(sol.value.double().numpy(), ref, rtol=tol, atol=tol)
    assert sol.residuals.shape == (1, 3) and bool((sol.residuals < 10 * tol).all())
    vec = dense_solve(SPD.to(dtype), B[:, 0].to(dtype), alg)
    assert vec.value.shape == (12,)


def test_cholesky_on_indefinite_falls_back_and_says_so():
    b = torch.randn(12, dtype=torch.float64)
    with pytest.warns(NotConvergedWarning, match="not positive definite"):
        sol = dense_solve(INDEF, b, Cholesky())
    assert sol.status is Status.BREAKDOWN
    assert np.allclose(sol.value.numpy(), np.linalg.solve(INDEF.numpy(), b.numpy()))


def test_singular_and_nonfinite():
    S = torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))
    b = torch.ones(3, dtype=torch.float64)
    assert dense_solve(S, b, Dense(on_failure="ignore")).status is Status.BREAKDOWN
    assert dense_solve(S, b, Eigh(on_failure="ignore")).status is Status.NONFINITE
    nan = SPD.clone()
    nan[0, 0] = float("nan")
    sol = dense_solve(nan, torch.ones(12, dtype=torch.float64), Dense(on_failure="ignore"))
    assert sol.status is Status.NONFINITE
    assert dense_eigh(nan, Eigh(), on_failure="ignore").status is Status.NONFINITE
    with pytest.raises(ValueError):
        dense_solve(SPD, torch.ones(11, dtype=torch.float64), Dense())
    with pytest.raises(TypeError):
        dense_eigh(SPD, Cholesky())


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_dense_eigh_selection(which):
    vals, vecs = dense_eigh(INDEF, Eigh(), k=3, which=which).value
    lam = np.linalg.eigvalsh(INDEF.numpy())
    key = {"LA": -lam, "SA": lam, "LM": -np.abs(lam)}[which]
    assert np.allclose(vals.numpy(), lam[np.argsort(key)[:3]])
    assert torch.allclose(INDEF @ vecs, vecs * vals, atol=1e-10)
    all_pairs = dense_eigh(INDEF).value[0]
    assert all_pairs.shape == (12,)
    with pytest.raises(ValueError, match="which"):
        select_eigen(torch.tensor([1.0]), 1, "XX")


@pytest.mark.parametrize("alg", [Cholesky(), Dense(), Eigh()], ids=["chol", "lu", "eigh"])
def test_dense_slogdet(alg):
    for A in (SPD, INDEF):
        sign, logabs = dense_slogdet(A, alg)
        ref_sign, ref_log = np.linalg.slogdet(A.numpy())
        assert float(sign) == ref_sign and np.isclose(float(logabs), ref_log)


def test_dense_apply_unary():
    root = dense_apply_unary(SPD, torch.sqrt)
    assert np.allclose(root.numpy(), scipy.linalg.sqrtm(SPD.numpy()).real, atol=1e-10)
    expo = dense_apply_unary(INDEF / 10, torch.exp)
    assert np.allclose(expo.numpy(), scipy.linalg.expm(INDEF.numpy() / 10), atol=1e-10)
