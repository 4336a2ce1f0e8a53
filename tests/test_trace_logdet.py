"""``trace``, ``diag`` (exact, Hutchinson, Hutch++), ``logdet`` and ``slogdet`` (exact rules,
dense, SLQ), against dense float64 results."""

import pytest
import torch
from _helpers import DEVICE_PARAMS, DTYPE_PARAMS, F64, randn, spd, spectrum_matrix, strict

import solvers
from linops import (
    PSD,
    BlockDiag,
    Dense,
    Diagonal,
    I_like,
    Identity,
    Kronecker,
    LinearOperator,
    LowRank,
    Permutation,
    SelfAdjoint,
    Triangular,
)
from solvers import SLQ, Auto, Hutchinson, HutchPP, diag, logdet, slogdet, trace


class Opaque(LinearOperator):
    """A matrix seen only through products (no cheap diagonal); counts product columns."""

    def __init__(self, M):
        super().__init__(M.dtype, M.shape, M.device)
        self.M = M
        self.columns = 0

    def _matmat(self, X):
        self.columns += X.shape[1]
        return self.M @ X

    def _rmatmat(self, Y):
        self.columns += Y.shape[1]
        return self.M.mH @ Y


# ------------------------------------------------------------------ exact trace and diagonal
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize(
    "alg", [None, Auto(dense_threshold=0), solvers.Dense()], ids=["auto", "auto-0", "dense"]
)
def test_exact_trace_and_diag_of_an_opaque_operator(alg, dtype, device):
    M = randn(30, 30)
    A = Opaque(M.to(dtype=dtype, device=device))
    tol = 1e-12 if dtype == F64 else 1e-5
    t = trace(A, alg)
    assert t.ndim == 0 and t.dtype == dtype and t.device.type == device
    assert abs(float(t) - float(M.trace())) <= tol * float(M.abs().sum())
    d = diag(A, alg)
    assert d.shape == (30,) and float((d.cpu().to(F64) - M.diagonal()).abs().max()) <= tol * 10


def test_trace_refuses_an_algorithm_it_cannot_run():
    with pytest.raises(TypeError, match="trace cannot run"):
        trace(Opaque(randn(4, 4)), solvers.CG())
    with pytest.raises(TypeError, match="diag cannot run"):
        diag(Opaque(randn(4, 4)), HutchPP())
    with pytest.raises(TypeError, match="linops.Dense"):
        trace(randn(4, 4))
    with pytest.raises(ValueError, match="square"):
        trace(Dense(randn(3, 4)))
    with pytest.raises(ValueError):
        Hutchinson(samples=0)
    with pytest.raises(ValueError):
        HutchPP(samples=2)


# ------------------------------------------------------------------ estimators
def _hutchinson_sigma(M, samples):
    """Standard deviation of Hutchinson's trace estimate with Rademacher probes."""
    off = (M**2).sum() - (M.diagonal() ** 2).sum()
    return float(torch.sqrt(2 * off / samples))


@pytest.mark.parametrize("samples", [200, 3000])
def test_hutchinson_trace_within_its_standard_deviation(samples):
    M = spd(40, cond=100.0)
    est = trace(PSD(Opaque(M)), Hutchinson(samples=samples, batch=1000, seed=1))
    err = abs(float(est) - float(M.trace()))
    assert err <= 4 * _hutchinson_sigma(M, samples)
    # with a fixed seed the estimate is reproducible; another seed gives another estimate
    again = trace(PSD(Opaque(M)), Hutchinson(samples=samples, batch=1000, seed=1))
    other = trace(PSD(Opaque(M)), Hutchinson(samples=samples, batch=1000, seed=2))
    assert float(again) == float(est) and float(other) != float(est)


def test_hutchinson_is_exact_on_a_diagonal_matrix():
    # zᵢ² = 1 for Rademacher probes: every probe gives the exact trace and diagonal
    d = randn(25)
    A = Opaque(torch.diag(d))
    assert abs(float(trace(A, Hutchinson(samples=3))) - float(d.sum())) < 1e-12
    assert float((diag(A, Hutchinson(samples=3)) - d).abs().max()) < 1e-12


def test_hutchinson_diagonal_within_its_standard_deviation():
    M = spd(40, cond=100.0, seed=3)
    samples = 2000
    est = diag(PSD(Opaque(M)), Hutchinson(samples=samples, batch=500, seed=0))
    sigma = torch.sqrt(((M**2).sum(1) - M.diagonal() ** 2) / samples)
    assert float(((est - M.diagonal()).abs() / sigma).max()) <= 5.0


def test_hutchpp_exact_on_low_rank_and_better_than_hutchinson():
    n = 50
    U = randn(n, 5, seed=4)
    L = U @ U.T
    est = trace(PSD(Opaque(L)), HutchPP(samples=30, seed=0))
    assert abs(float(est) - float(L.trace())) <= 1e-9 * float(L.trace())
    # a fast-decaying spectrum: Hutch++ beats Hutchinson's standard deviation by far
    M = spectrum_matrix(100.0 * 0.6 ** torch.arange(n, dtype=F64), seed=5)
    samples = 60
    errs = [abs(float(trace(PSD(Opaque(M)), HutchPP(samples=samples, seed=s))) - float(M.trace()))
            for s in range(5)]
    assert max(errs) <= 0.1 * _hutchinson_sigma(M, samples)


# ------------------------------------------------------------------ structural trace / diag
def _structures():
    A4, B3, C2 = randn(4, 4, seed=6), randn(3, 3, seed=7), randn(2, 2, seed=8)
    return {
        "kronecker2": lambda: Kronecker(Opaque(A4), Opaque(B3)),
        "kronecker3": lambda: Kronecker(Opaque(A4), Opaque(B3), Opaque(C2)),
        "kronecker-dense": lambda: Kronecker(Dense(A4), Dense(B3)),
        "blockdiag": lambda: BlockDiag(Dense(A4), Opaque(B3)),
        "scalar": lambda: -3.0 * Opaque(A4),
        "shift": lambda: Opaque(A4) + 2.0 * I_like(Dense(A4)),
        "permutation": lambda: Permutation(torch.tensor([2, 0, 1, 3]), F64),
        "triangular": lambda: Triangular(A4, lower=False),
        "lowrank": lambda: LowRank(randn(5, 2, seed=9), None, randn(5, 2, seed=10)),
        "diagonal": lambda: Diagonal(randn(5)),
        "identity": lambda: Identity(4, F64),
    }


STRUCTURES = _structures()


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_trace_and_diag_of_structures(name):
    op = STRUCTURES[name]()
    M = op.to_dense()
    assert abs(float(trace(op)) - float(M.trace())) <= 1e-12 * max(1.0, float(M.abs().sum()))
    assert float((diag(op) - M.diagonal()).abs().max()) <= 1e-12 * max(1.0, float(M.abs().max()))


def test_kronecker_trace_works_on_the_factors():
    # tr(A ⊗ B) = tr A · tr B: n_A + n_B unit products, not n_A·n_B products of the whole
    A, B = Opaque(randn(4, 4, seed=6)), Opaque(randn(3, 3, seed=7))
    t = trace(Kronecker(A, B))
    assert abs(float(t) - float(A.M.trace() * B.M.trace())) < 1e-12
    assert A.columns == 4 and B.columns == 3


def test_trace_of_blockdiag_and_scalar_use_the_rule():
    A, B = randn(4, 4, seed=6), randn(3, 3, seed=7)
    assert abs(float(trace(strict(BlockDiag(Dense(A), Dense(B))))) - float(A.trace() + B.trace())
               ) < 1e-12
    assert abs(float(trace(strict(Kronecker(Dense(A), Dense(B))))) - float(A.trace() * B.trace())
               ) < 1e-12


# ------------------------------------------------------------------ logdet / slogdet
def _det_cases():
    g = torch.Generator().manual_seed(11)

    def r(*shape):
        return torch.randn(*shape, dtype=F64, generator=g)

    d_neg = torch.tensor([1.5, -2.0, 3.0, 0.5], dtype=F64)
    return {
        "psd-dense": lambda: PSD(Dense(spd(8))),
        "general-dense": lambda: Dense(r(6, 6)),
        "diagonal-negative": lambda: Diagonal(d_neg),
        "identity": lambda: Identity(5, F64),
        "scalar-identity": lambda: -2.0 * Identity(3, F64),
        "scalar-psd-odd": lambda: -1.5 * PSD(Dense(spd(5))),
        "scalar-psd-even": lambda: -0.5 * PSD(Dense(spd(4))),
        "permutation-odd": lambda: Permutation(torch.tensor([1, 0, 2]), F64),
        "permutation-even": lambda: Permutation(torch.tensor([1, 2, 0]), F64),
        "triangular": lambda: Triangular(r(5, 5) + 2 * torch.eye(5, dtype=F64)),
        "kronecker2": lambda: Kronecker(Dense(r(3, 3)), Diagonal(d_neg)),
        "kronecker3": lambda: Kronecker(Dense(r(3, 3)), Dense(r(2, 2)), Diagonal(d_neg[:3])),
        "blockdiag": lambda: BlockDiag(Dense(r(3, 3)), Diagonal(d_neg)),
        "product": lambda: Dense(r(4, 4)) @ Diagonal(d_neg),
        "woodbury-diagonal": lambda: Diagonal(torch.rand(6, dtype=F64, generator=g) + 1)
        + LowRank(r(6, 2)),
        "woodbury-negative-shift": lambda: LowRank(r(6, 2)) - 0.5 * Identity(6, F64),
        "woodbury-UCV": lambda: Diagonal(d_neg) + LowRank(r(4, 2), r(2, 2), r(4, 2)),
    }


DET_CASES = _det_cases()


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("name", list(DET_CASES))
def test_slogdet_and_logdet(name, dtype, device):
    op64 = DET_CASES[name]()
    M = op64.to_dense()
    op = op64.to(dtype=dtype, device=device)
    ref_sign, ref_log = torch.linalg.slogdet(M)
    sign, logabs = slogdet(op)
    assert sign.device.type == device and logabs.device.type == device
    assert float(sign) == float(ref_sign)
    tol = 1e-12 if dtype == F64 else 2e-5
    assert abs(float(logabs) - float(ref_log)) <= tol * max(1.0, abs(float(ref_log)))
    ld = logdet(op)
    if float(ref_sign) > 0:
        assert abs(float(ld) - float(ref_log)) <= tol * max(1.0, abs(float(ref_log)))
    else:
        assert bool(torch.isnan(ld))  # log of a negative determinant, as torch.logdet


@pytest.mark.parametrize("name", ["kronecker2", "kronecker3", "blockdiag", "product",
                                  "scalar-psd-odd", "woodbury-diagonal", "woodbury-UCV"])
def test_slogdet_rule_works_on_the_parts(name):
    op = DET_CASES[name]()
    ref_sign, ref_log = torch.linalg.slogdet(op.to_dense())
    sign, logabs = slogdet(strict(op))
    assert float(sign) == float(ref_sign)
    assert abs(float(logabs) - float(ref_log)) <= 1e-10 * max(1.0, abs(float(ref_log)))


def test_singular_matrices():
    Z = randn(5, 5)
    Z[2] = 0.0
    U = randn(6, 3)
    psd_singular = U @ U.T
    psd_singular[:, 0] = 0.0
    psd_singular[0, :] = 0.0
    for op in (Dense(Z), PSD(Dense(psd_singular)), Diagonal(torch.tensor([1.0, 0.0, 2.0])),
               BlockDiag(Dense(Z), Identity(2, F64)),
               Kronecker(Dense(Z), Dense(randn(2, 2)))):
        sign, logabs = slogdet(op)
        assert float(sign) == 0.0 and float(logabs) == -float("inf")
        assert float(logdet(op)) == -float("inf")


def test_slq_estimate_within_a_few_percent():
    M = spd(60, cond=100.0, seed=4)
    ref = float(torch.linalg.slogdet(M)[1])
    A = PSD(Dense(M))
    est = float(logdet(A, Auto(dense_threshold=0)))  # Auto → SLQ above the threshold
    assert abs(est - ref) <= 0.03 * abs(ref)
    sign, est2 = slogdet(A, SLQ(probes=40, steps=25, seed=1))
    assert float(sign) == 1.0 and abs(float(est2) - ref) <= 0.03 * abs(ref)
    # the exact dense result below the threshold
    assert abs(float(logdet(A)) - ref) <= 1e-12 * abs(ref)


def test_logdet_of_a_large_operator_not_known_psd_is_refused():
    M = spd(20)
    with pytest.raises(ValueError, match="PSD"):
        logdet(SelfAdjoint(Dense(M)), Auto(dense_threshold=5))
    with pytest.raises(ValueError):
        SLQ(probes=0)
    indefinite = spectrum_matrix(torch.linspace(-2.0, 3.0, 20, dtype=F64))
    with pytest.raises(ValueError, match="positive"):
        slogdet(PSD(Dense(indefinite)), SLQ(steps=20))
