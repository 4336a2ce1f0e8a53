"""Edge cases found in review: every one either gives the dense float64 answer or raises at
once with a message that says what to do (no silent inf/NaN)."""

import numpy as np
import pytest
import torch

import solvers
from linops import (
    PSD,
    Dense,
    Diagonal,
    Kronecker,
    LowRank,
    Permutation,
    SelfAdjoint,
    Triangular,
)

F64 = torch.float64


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_woodbury_rules_fall_back_when_the_diagonal_has_a_zero():
    A = Diagonal(torch.tensor([0.0, 1.0, 2.0], dtype=F64)) + LowRank(
        torch.randn(3, 1, generator=_g(), dtype=F64))
    M = A.to_dense()
    sign, logabs = solvers.slogdet(A)
    ref_sign, ref_logabs = torch.linalg.slogdet(M)
    assert float(sign) == float(ref_sign)
    torch.testing.assert_close(logabs, ref_logabs)
    b = torch.arange(1.0, 4.0, dtype=F64)
    torch.testing.assert_close(solvers.inv(A) @ b, torch.linalg.solve(M, b))


def test_singular_woodbury_core_raises():
    A = Diagonal(torch.tensor([-1.0, 1.0], dtype=F64)) + LowRank(
        torch.tensor([[1.0], [0.0]], dtype=F64))
    with pytest.raises(ValueError, match="singular.*damping"):
        solvers.inv(A)


@pytest.mark.parametrize("make", [
    lambda: torch.tensor(0.0) * Permutation(torch.tensor([1, 0])),
    lambda: Triangular(torch.tensor([[0.0, 0.0], [1.0, 1.0]])),
    lambda: Diagonal(torch.tensor([float("nan"), 1.0])),
], ids=["zero-tensor-scalar", "singular-triangular", "nan-diagonal"])
def test_structural_inverses_of_singular_operators_raise(make):
    with pytest.raises(ValueError, match="inv of"):
        solvers.inv(make())


def test_matrix_functions_outside_their_domain_raise():
    with pytest.raises(ValueError, match="outside the domain"):
        solvers.sqrt(Diagonal(torch.tensor([-1.0, 4.0])))
    indefinite = SelfAdjoint(Dense(torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)))
    with pytest.raises(ValueError, match="outside the domain"):
        solvers.log(indefinite)
    with pytest.raises(ValueError, match="positive definite"):
        solvers.isqrt(PSD(Dense(torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=F64))))


def test_sqrt_of_a_singular_psd_matrix_is_finite():
    U = torch.randn(6, 2, generator=_g(1), dtype=F64)
    M = U @ U.T  # rank 2: eigenvalues at ±1e-16 after rounding
    R = solvers.sqrt(PSD(Dense(M))).to_dense()
    assert bool(torch.isfinite(R).all())
    torch.testing.assert_close(R @ R, M, atol=1e-10, rtol=1e-8)


def test_complex_scalar_times_real_operator_raises():
    with pytest.raises(TypeError, match="complex64"):
        1j * Dense(torch.eye(3))


def test_algorithm_dense_given_a_matrix_points_at_linops_dense():
    with pytest.raises(TypeError, match="linops.Dense"):
        solvers.Dense(torch.eye(2))


def test_preconditioner_of_the_wrong_shape_is_named():
    Ainv = solvers.inv(PSD(Dense(torch.eye(4))), alg=solvers.CG(preconditioner=Dense(torch.eye(3))))
    with pytest.raises(ValueError, match="preconditioner is 3×3 but A is 4×4"):
        Ainv @ torch.ones(4)


def test_pinv_of_rectangular_and_zero_operators():
    M = torch.randn(4, 3, generator=_g(2), dtype=F64)
    P = solvers.pinv(Dense(M))
    assert P.shape == (3, 4)
    np.testing.assert_allclose(P.to_dense().numpy(), np.linalg.pinv(M.numpy()), atol=1e-12)
    Z = solvers.pinv(torch.tensor(0.0, dtype=F64) * Dense(torch.eye(3, dtype=F64)))
    assert Z.shape == (3, 3) and float(Z.to_dense().abs().max()) == 0.0


def test_trace_of_square_kronecker_with_rectangular_factors():
    K = Kronecker(Dense(torch.randn(2, 3, generator=_g(3), dtype=F64)),
                  Dense(torch.randn(3, 2, generator=_g(4), dtype=F64)))
    torch.testing.assert_close(solvers.trace(K), torch.trace(K.to_dense()))


def test_empty_right_hand_side():
    A = PSD(Dense(torch.eye(5)))
    for alg in (solvers.CG(), solvers.MINRES(), solvers.Cholesky()):
        assert solvers.solve(A, torch.zeros(5, 0), alg=alg).shape == (5, 0)


def test_scalar_misuse():
    A = Dense(torch.eye(3))
    with pytest.raises(TypeError, match="number"):
        A * True
    with pytest.raises(ValueError, match="division by zero"):
        A / 0
    with pytest.raises(ValueError, match="k must be an int"):
        solvers.eig(PSD(A), k=True)
