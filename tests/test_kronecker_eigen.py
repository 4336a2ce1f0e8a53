"""KroneckerEigen and the exact rules for shifted BlockDiag/Kronecker operators, against
dense float64 references."""

import pytest
import torch

import solvers
from linops import (
    PSD,
    BlockDiag,
    Dense,
    Diagonal,
    I_like,
    Kronecker,
    KroneckerEigen,
    Permuted,
    is_psd,
)

F64 = torch.float64


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, dtype=F64, generator=g)
    return A @ A.T + 0.1 * torch.eye(n, dtype=F64)


def _kfac_like():
    return BlockDiag(Kronecker(PSD(Dense(_spd(3, 0))), PSD(Dense(_spd(4, 1)))),
                     PSD(Dense(_spd(3, 2))), Diagonal(torch.rand(2, dtype=F64) + 0.5))


def test_operator_matches_dense():
    A, B = _spd(3, 3), _spd(2, 4)
    K = KroneckerEigen.from_factors([A, B], shift=0.25)
    ref = torch.kron(A, B) + 0.25 * torch.eye(6, dtype=F64)
    X = torch.randn(6, 3, dtype=F64)
    torch.testing.assert_close(K @ X, ref @ X)
    torch.testing.assert_close(K.T @ X, ref @ X)
    torch.testing.assert_close(K.diag(), ref.diagonal())
    torch.testing.assert_close(K.to_dense(), ref)
    assert is_psd(K)
    assert not is_psd(KroneckerEigen.from_factors([A, -B]))
    with pytest.raises(ValueError, match="eigenvalues expected"):
        KroneckerEigen(K.Qs, torch.ones(5, dtype=F64))


@pytest.mark.parametrize("shift", [0.5, 2.0])
def test_shifted_structured_functions_are_exact(shift):
    K = _kfac_like()
    M = K + shift * I_like(K)
    ref = M.to_dense()
    b = torch.randn(ref.shape[0], 2, dtype=F64)
    inv = solvers.inv(M)
    assert isinstance(inv, BlockDiag) and isinstance(inv.blocks[0], KroneckerEigen)
    torch.testing.assert_close(inv @ b, torch.linalg.solve(ref, b))
    torch.testing.assert_close(solvers.logdet(M), torch.logdet(ref))
    S = solvers.sqrt(M)
    torch.testing.assert_close(S.to_dense() @ S.to_dense(), ref)
    torch.testing.assert_close(solvers.trace(M), ref.trace())
    vals, vecs = solvers.eig(M, k=3)
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(ref).flip(0)[:3])
    torch.testing.assert_close(ref @ vecs, vecs * vals)


def test_kronecker_eigen_rules():
    K = KroneckerEigen.from_factors([_spd(3, 5), _spd(3, 6)], shift=0.1)
    ref = K.to_dense()
    torch.testing.assert_close(solvers.inv(K).to_dense(), torch.linalg.inv(ref))
    torch.testing.assert_close(solvers.logdet(K), torch.logdet(ref))
    vals, vecs = solvers.eig(K, k=2, which="SA")
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(ref)[:2])
    torch.testing.assert_close(ref @ vecs, vecs * vals)
    torch.testing.assert_close(solvers.pinv(K).to_dense(), torch.linalg.pinv(ref))
    singular = K.with_eigenvalues(torch.cat([K.eigenvalues[:-1], torch.zeros(1, dtype=F64)]))
    with pytest.raises(ValueError, match="singular.*damping"):
        solvers.inv(singular)
    f_of = solvers.apply_unary(torch.exp, Kronecker(PSD(Dense(_spd(2, 7))), PSD(Dense(_spd(2, 8)))))
    torch.testing.assert_close(f_of.to_dense(), torch.linalg.matrix_exp(
        torch.kron(_spd(2, 7), _spd(2, 8))))


def test_permuted_kronecker_rules_act_on_the_inner_operator():
    """Pᵀ (A ⊗ B) P + c·I (K-FAC's joint weight-and-bias block, damped): the shift stays
    structured (Pᵀ Q Λ Qᵀ P) and every rule is exact."""
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    A, B = _spd(3, 9), _spd(4, 10)
    K = BlockDiag(Permuted(Kronecker(PSD(Dense(A)), PSD(Dense(B))), perm),
                  PSD(Dense(_spd(2, 11))))
    P = torch.eye(12, dtype=F64)[perm]
    ref_block = P.T @ torch.kron(A, B) @ P
    torch.testing.assert_close(K.to_dense()[:12, :12], ref_block)
    assert is_psd(K)
    M = K + 0.3 * I_like(K)
    ref = M.to_dense()
    inv = solvers.inv(M)
    assert isinstance(inv.blocks[0], Permuted) and isinstance(inv.blocks[0].op, KroneckerEigen)
    b = torch.randn(14, 3, dtype=F64)
    torch.testing.assert_close(inv @ b, torch.linalg.solve(ref, b))
    torch.testing.assert_close(solvers.logdet(M), torch.logdet(ref))
    torch.testing.assert_close(solvers.trace(M), ref.trace())
    S = solvers.sqrt(M)
    torch.testing.assert_close(S.to_dense() @ S.to_dense(), ref)
    vals, vecs = solvers.eig(M, k=3)
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(ref).flip(0)[:3])
    torch.testing.assert_close(ref @ vecs, vecs * vals)
    J = Permuted(KroneckerEigen.from_factors([A, B], 0.3), perm)
    torch.testing.assert_close(solvers.pinv(J).to_dense(), torch.linalg.pinv(J.to_dense()))
    with pytest.raises(ValueError, match="square"):
        Permuted(Dense(torch.ones(2, 3, dtype=F64)), torch.arange(2))
    with pytest.raises(ValueError, match="permutation of 5 indices"):
        Permuted(Dense(A), torch.arange(5))


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("shapes", [((4, 3), (2, 5)), ((5, 5), (2, 2)), ((1, 6), (7, 1)),
                                    ((6, 2), (3, 3))])
def test_two_dense_factors_against_kron(shapes, k):
    # the two-matrix fast path (both orders of its GEMMs, one column and several) and
    # its transpose, against torch.kron
    g = torch.Generator().manual_seed(k)
    A, B = (torch.randn(*s, dtype=F64, generator=g) for s in shapes)
    K, ref = Kronecker(A, B), torch.kron(A, B)
    X = torch.randn(ref.shape[1], k, dtype=F64, generator=g)
    Y = torch.randn(ref.shape[0], k, dtype=F64, generator=g)
    torch.testing.assert_close(K @ X, ref @ X, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(K.T @ Y, ref.T @ Y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(K @ X[:, 0], ref @ X[:, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_factor_raises_with_a_hint(bad):
    F = torch.eye(3, dtype=F64)
    F[0, 0] = bad
    with pytest.raises(FloatingPointError, match="NaN or infinity"):
        KroneckerEigen.from_factors([F, torch.eye(2, dtype=F64)])
