"""``inv``, ``solve`` and ``pinv``: structural rules, the generic fallback, records, failures.

Every result is compared with a dense float64 solve (torch.linalg / numpy) on random matrices
built with the needed property and a bounded condition number (Q diag(λ) Qᵀ).
"""

import functools
import warnings

import numpy as np
import pytest
import torch
from _helpers import DEVICE_PARAMS, DTYPE_PARAMS, F64, nonsymmetric, randn, spectrum_matrix
from _helpers import spd as _spd

import solvers
from linops import (
    PSD,
    BlockDiag,
    Dense,
    Diagonal,
    Identity,
    Kronecker,
    LinearOperator,
    LowRank,
    Permutation,
    Product,
    ScalarMul,
    SelfAdjoint,
    Sum,
    Triangular,
    is_psd,
    is_self_adjoint,
)
from solvers import (
    CG,
    GMRES,
    MINRES,
    Auto,
    Cholesky,
    InverseOperator,
    Lanczos,
    NotConvergedError,
    NotConvergedWarning,
    Status,
    inv,
    pinv,
    solve,
)

#: relative error allowed against the float64 reference, per dtype
RTOL = {torch.float32: 2e-4, torch.float64: 1e-9}
#: solver tolerance per dtype
STOL = {torch.float32: 1e-5, torch.float64: 1e-12}


# ------------------------------------------------------------------ matrices
#: symmetric positive definite, cond 30 unless a test asks for another
spd = functools.partial(_spd, cond=30.0)


def indefinite(n, cond=20.0, seed=0):
    lam = torch.logspace(0, np.log10(cond), n, dtype=F64)
    lam[::3] *= -1
    return spectrum_matrix(lam, seed)


def rel_err(x, ref):
    x, ref = x.detach().cpu().to(F64), ref.cpu().to(F64)
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


def dense(M, dtype, device):
    return Dense(M.to(dtype=dtype, device=device))


# ------------------------------------------------------------------ generic fallback
KINDS = {
    "psd": (lambda n: spd(n), PSD, Cholesky, CG),
    "symmetric-indefinite": (lambda n: indefinite(n), SelfAdjoint, solvers.Dense, MINRES),
    "nonsymmetric": (lambda n: nonsymmetric(n), lambda A: A, solvers.Dense, GMRES),
}


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("path", ["dense", "iterative"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_generic_fallback_matches_dense_solve(kind, path, dtype, device):
    make, tag, dense_alg, krylov_alg = KINDS[kind]
    n = 30
    M = make(n)
    A = tag(dense(M, dtype, device))
    threshold = 1000 if path == "dense" else 0
    Ainv = inv(A, Auto(tol=STOL[dtype], dense_threshold=threshold))
    assert isinstance(Ainv, InverseOperator)
    expected = dense_alg if path == "dense" else krylov_alg
    assert type(Ainv.algorithm) is expected
    for b in (randn(n), randn(n, 3, seed=2)):
        x = Ainv @ b.to(dtype=dtype, device=device)
        assert x.shape == b.shape and x.dtype == dtype and x.device.type == device
        assert rel_err(x, torch.linalg.solve(M, b)) < RTOL[dtype] * 30
    if path == "iterative":
        sol = Ainv.solution
        assert sol.status is Status.CONVERGED and sol.converged
        assert sol.algorithm is Ainv.algorithm
        assert sol.residuals.shape == (sol.iterations + 1, 3)
        assert float(sol.residuals[-1].max()) <= STOL[dtype] * 1.0001


# ------------------------------------------------------------------ structural rules
def _rules():
    d = torch.rand(8, dtype=F64, generator=torch.Generator().manual_seed(3)) + 0.5
    U = randn(8, 2, seed=4)
    C = torch.tensor([[2.0, 0.3], [0.1, 1.5]], dtype=F64)
    V = randn(8, 2, seed=5)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(6))
    return {
        "diagonal": (lambda: Diagonal(randn(7) + 3 * torch.sign(randn(7))), Diagonal),
        "identity": (lambda: Identity(5, F64), Identity),
        "scalar+": (lambda: 3.0 * PSD(Dense(spd(6))), ScalarMul),
        "scalar-": (lambda: -2.0 * PSD(Dense(spd(6))), ScalarMul),
        "permutation": (lambda: Permutation(perm, F64), Permutation),
        "kronecker2": (lambda: Kronecker(PSD(Dense(spd(4))), Dense(nonsymmetric(3))), Kronecker),
        "kronecker3": (
            lambda: Kronecker(PSD(Dense(spd(3))), Dense(nonsymmetric(2)), Dense(spd(2, seed=2))),
            Kronecker,
        ),
        "blockdiag": (lambda: BlockDiag(PSD(Dense(spd(4))), Dense(nonsymmetric(3))), BlockDiag),
        "product": (lambda: Dense(nonsymmetric(5)) @ Dense(nonsymmetric(5, seed=7)), Product),
        "product-diag-triangular": (
            lambda: Diagonal(d[:5]) @ Triangular(nonsymmetric(5, seed=8)),
            Product,
        ),
        "triangular-lower": (lambda: Triangular(nonsymmetric(6), lower=True), None),
        "triangular-upper": (lambda: Triangular(nonsymmetric(6), lower=False), None),
        "woodbury-diagonal": (lambda: Diagonal(d) + LowRank(U), Sum),
        "woodbury-cI": (lambda: LowRank(U) + 0.7 * Identity(8, F64), Sum),
        "woodbury-I": (lambda: LowRank(U) + Identity(8, F64), Sum),
        "woodbury-UCV": (lambda: Diagonal(d) + LowRank(U, C, V), Sum),
    }


RULES = _rules()


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("name", list(RULES))
def test_structural_rule(name, dtype, device):
    build, expected_type = RULES[name]
    A = build().to(dtype=dtype, device=device)
    M = A.to_dense().cpu().to(F64)
    Ainv = inv(A)
    # the structural rule ran: an exact structured inverse, not a generic solve
    assert not isinstance(Ainv, InverseOperator)
    if expected_type is not None:
        assert isinstance(Ainv, expected_type)
    n = A.shape[0]
    for b in (randn(n), randn(n, 3, seed=2)):
        x = Ainv @ b.to(dtype=dtype, device=device)
        assert rel_err(x, torch.linalg.solve(M, b)) < RTOL[dtype] * 10
    # the inverse is a full operator: its transpose and dense form are right too
    ref = torch.linalg.inv(M)
    assert rel_err(Ainv.to_dense(), ref) < RTOL[dtype] * 10
    assert rel_err(Ainv.T @ b[:, 0].to(dtype=dtype, device=device), ref.T @ b[:, 0]) < (
        RTOL[dtype] * 10
    )


def test_kronecker_and_blockdiag_invert_their_factors():
    A, B, C = PSD(Dense(spd(4))), Dense(nonsymmetric(3)), PSD(Dense(spd(2, seed=1)))
    K = inv(Kronecker(A, B, C))
    assert isinstance(K, Kronecker) and len(K.factors) == 3
    for f, orig in zip(K.factors, (A, B, C)):
        assert f.shape == orig.shape
        assert rel_err(f.to_dense(), torch.linalg.inv(orig.to_dense())) < 1e-10
    Bd = inv(BlockDiag(A, B))
    assert isinstance(Bd, BlockDiag) and [b.shape for b in Bd.blocks] == [(4, 4), (3, 3)]
    D = inv(Diagonal(torch.tensor([2.0, -4.0], dtype=F64)))
    assert isinstance(D, Diagonal) and torch.equal(D.d, torch.tensor([0.5, -0.25], dtype=F64))


PSD_RULES = ["identity", "scalar+", "woodbury-cI", "woodbury-I"]


@pytest.mark.parametrize("name", PSD_RULES + ["congruence"])
def test_inverse_of_psd_operator_is_psd(name):
    # (A⁻¹ of a PSD A is PSD; CG preconditioners and Lanczos on A⁻¹ rely on the tag)
    if name == "congruence":
        J = Dense(nonsymmetric(5))
        A = J.T @ PSD(Dense(spd(5))) @ J
    else:
        A = RULES[name][0]()
    assert is_psd(A)
    Ainv = inv(A)
    assert is_self_adjoint(Ainv) and is_psd(Ainv)


def test_product_of_square_factors_with_explicit_cg():
    # Jᵀ H J is PSD as a whole while J is not: CG must not be run on J and Jᵀ
    J = Dense(nonsymmetric(10, seed=3) + 0.5 * torch.eye(10, dtype=F64))
    H = PSD(Dense(spd(10)))
    G = J.T @ H @ J
    assert is_psd(G)
    b = randn(10)
    ref = torch.linalg.solve(G.to_dense(), b)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotConvergedWarning)
        x = inv(G, CG(tol=1e-12)) @ b
    assert rel_err(x, ref) < 1e-8


# ------------------------------------------------------------------ records, x0, warm start
def test_solution_record_and_solve():
    n = 40
    M = spd(n, cond=100.0)
    A = PSD(Dense(M))
    alg = CG(tol=1e-10)
    Ainv = inv(A, alg)
    assert Ainv.solution is None  # nothing solved yet
    B = randn(n, 2)
    X = Ainv @ B
    sol = Ainv.solution
    assert sol.status is Status.CONVERGED
    assert sol.algorithm is alg and Ainv.algorithm is alg
    assert 0 < sol.iterations <= 10 * n
    assert sol.residuals.shape == (sol.iterations + 1, 2)
    assert torch.allclose(sol.residuals[0], torch.ones(2, dtype=F64))
    assert float(sol.residuals[-1].max()) <= 1e-10
    assert torch.equal(sol.value, X)
    x = solve(A, B[:, 0], alg)
    assert rel_err(x, torch.linalg.solve(M, B[:, 0])) < 1e-8
    assert x.solution.status is Status.CONVERGED and x.solution.algorithm is alg
    assert x.solution.iterations == sol.info["column_iterations"][0]


@pytest.mark.parametrize("alg_cls", [CG, MINRES, GMRES])
def test_x0_is_not_modified_and_warm_start_works_at_any_scale(alg_cls):
    n = 40
    M = spd(n, cond=1e3) if alg_cls is not GMRES else nonsymmetric(n)
    A = PSD(Dense(M)) if alg_cls is not GMRES else Dense(M)
    b = randn(n)
    xstar = torch.linalg.solve(M, b)
    cold = solve(A, b, alg_cls(tol=1e-8)).solution.iterations
    iters = []
    for scale in (1e-8, 1.0, 1e8):
        x0 = scale * (xstar + 1e-4 * randn(n, seed=9))
        keep = x0.clone()
        x = solve(A, scale * b, alg_cls(tol=1e-8), x0=x0)
        assert torch.equal(x0, keep)  # never modified in place
        assert rel_err(x, scale * xstar) < 1e-6
        assert x.solution.status is Status.CONVERGED
        iters.append(x.solution.iterations)
    # a close warm start saves iterations, the same at every scale of b
    assert max(iters) - min(iters) <= 1
    assert max(iters) < cold
    # the exact solution as x0: nothing to do
    assert solve(A, b, alg_cls(tol=1e-8), x0=xstar).solution.iterations == 0


def test_x0_of_the_wrong_shape_is_refused():
    A = PSD(Dense(spd(6)))
    with pytest.raises(ValueError, match="x0"):
        solve(A, randn(6), CG(), x0=torch.zeros(5, dtype=F64))
    with pytest.raises(ValueError, match="x0"):
        solve(A, randn(6, 2), CG(), x0=torch.zeros(6, 3, dtype=F64))


@pytest.mark.parametrize(
    "alg",
    [CG(), MINRES(), GMRES(), Auto(), Auto(dense_threshold=0), Cholesky(), solvers.Dense()],
    ids=["cg", "minres", "gmres", "auto-dense", "auto-iterative", "cholesky", "dense"],
)
def test_zero_right_hand_side(alg):
    A = PSD(Dense(spd(10)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Ainv = inv(A, alg)
        for z in (torch.zeros(10, dtype=F64), torch.zeros(10, 2, dtype=F64)):
            x = Ainv @ z
            assert torch.equal(x, torch.zeros_like(z))
    if Ainv.solution is not None:
        assert Ainv.solution.status is Status.CONVERGED


# ------------------------------------------------------------------ failure is never silent
def test_not_converging_warns_raises_or_reports():
    n = 30
    A = PSD(Dense(spd(n, cond=100.0)))
    b = randn(n)
    Ainv = inv(A, CG(max_iters=1))
    with pytest.warns(NotConvergedWarning, match="max_iters"):
        Ainv @ b
    assert Ainv.solution.status is Status.MAX_ITERS and Ainv.solution.iterations == 1
    with pytest.raises(NotConvergedError) as info:
        inv(A, CG(max_iters=1, on_failure="raise")) @ b
    assert info.value.solution.status is Status.MAX_ITERS
    with pytest.raises(NotConvergedError):
        inv(A, Auto(tol=1e-8, max_iters=1, dense_threshold=0, on_failure="raise")) @ b
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = inv(A, CG(max_iters=1, on_failure="ignore"))
        quiet @ b
    assert quiet.solution.status is Status.MAX_ITERS


def test_cg_on_an_indefinite_matrix_reports_negative_curvature():
    A = PSD(Dense(indefinite(20)))  # a false promise
    Ainv = inv(A, CG())
    with pytest.warns(NotConvergedWarning, match="curvature"):
        Ainv @ randn(20)
    assert Ainv.solution.status is Status.NEGATIVE_CURVATURE


@pytest.mark.parametrize(
    "alg",
    [CG(), Auto(dense_threshold=0), Auto(), Cholesky(), solvers.Dense()],
    ids=["cg", "auto-iterative", "auto-dense", "cholesky", "dense"],
)
def test_non_finite_right_hand_side_is_reported(alg):
    A = PSD(Dense(spd(8)))
    b = randn(8)
    b[3] = float("nan")
    with pytest.warns(NotConvergedWarning):
        x = inv(A, alg) @ b
    assert not bool(torch.isfinite(x).all())


# ------------------------------------------------------------------ pinv
def _singular_psd(n=12, rank=5):
    U = randn(n, rank, seed=11)
    return U @ U.T


def test_pinv_dense_matches_numpy():
    P = _singular_psd()
    ref = torch.from_numpy(np.linalg.pinv(P.numpy()))
    Pp = pinv(PSD(Dense(P)))
    assert rel_err(Pp.to_dense(), ref) < 1e-9
    b = randn(12)
    assert rel_err(Pp @ b, ref @ b) < 1e-9


@pytest.mark.parametrize("rhs", ["in-range", "generic"])
def test_pinv_iterative_matches_numpy(rhs):
    P = _singular_psd()
    ref = torch.from_numpy(np.linalg.pinv(P.numpy()))
    b = randn(12, seed=12)
    if rhs == "in-range":
        b = P @ b
    Pp = pinv(PSD(Dense(P)), Auto(tol=1e-12, dense_threshold=0))
    assert rel_err(Pp @ b, ref @ b) < 1e-6


def test_pinv_structural_rules():
    d = torch.tensor([2.0, 0.0, -4.0], dtype=F64)
    Dp = pinv(Diagonal(d))
    assert isinstance(Dp, Diagonal)
    assert torch.equal(Dp.d, torch.tensor([0.5, 0.0, -0.25], dtype=F64))
    K = Kronecker(Diagonal(d), PSD(Dense(_singular_psd(4, 2))))
    Kp = pinv(K)
    assert isinstance(Kp, Kronecker)
    ref = torch.from_numpy(np.linalg.pinv(K.to_dense().numpy()))
    assert rel_err(Kp.to_dense(), ref) < 1e-8
    B = BlockDiag(Diagonal(d), PSD(Dense(_singular_psd(4, 2))))
    Bp = pinv(B)
    assert isinstance(Bp, BlockDiag)
    assert rel_err(Bp.to_dense(), torch.from_numpy(np.linalg.pinv(B.to_dense().numpy()))) < 1e-8


# ------------------------------------------------------------------ misuse
def test_misuse_errors():
    M = spd(5)
    with pytest.raises(TypeError, match="linops.Dense"):
        inv(M)
    with pytest.raises(ValueError, match="square"):
        inv(Dense(randn(3, 4)))
    with pytest.raises(TypeError, match="instance"):
        inv(PSD(Dense(M)), CG)
    with pytest.raises(TypeError):
        inv(PSD(Dense(M)), "cg")
    with pytest.raises(ValueError, match="pinv"):
        inv(Diagonal(torch.tensor([1.0, 0.0], dtype=F64)))
    with pytest.raises(ValueError, match="rows"):
        inv(PSD(Dense(M)), CG()) @ randn(4)
    with pytest.raises(TypeError, match="linops.Dense"):
        solve(M, randn(5))


def test_an_algorithm_that_cannot_solve_is_refused_at_once():
    # misuse raises when inv is called, not later at the first product
    with pytest.raises(TypeError, match="Lanczos"):
        inv(PSD(Dense(spd(5))), Lanczos())


def test_inverse_operator_is_a_linear_operator():
    M = nonsymmetric(6)
    Ainv = inv(Dense(M), GMRES(tol=1e-12))
    assert isinstance(Ainv, LinearOperator) and Ainv.shape == (6, 6)
    b = randn(6)
    assert rel_err(b @ Ainv, b @ torch.linalg.inv(M)) < 1e-9  # left product: A⁻ᵀ solve
    assert rel_err(Ainv.T @ b, torch.linalg.solve(M.T, b)) < 1e-9
    assert "⁻¹" in repr(Ainv)


def test_shifted_lowrank_sum_with_diagonal_scale_and_identity():
    # D + U Uᵀ with D given as c·Diagonal: Woodbury with a scaled diagonal part
    d = torch.rand(8, dtype=F64) + 0.5
    U = randn(8, 2)
    A = 2.0 * Diagonal(d) + LowRank(U)
    Ainv = inv(A)
    assert not isinstance(Ainv, InverseOperator)
    b = randn(8)
    assert rel_err(Ainv @ b, torch.linalg.solve(A.to_dense(), b)) < 1e-10
