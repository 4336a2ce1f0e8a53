"""``eig``, ``eigmax``, ``eigmin``: which='LA'/'SA'/'LM', k = 1 and 3, every algorithm and the
structural rules, against ``numpy.linalg.eigvalsh`` in float64."""

import dataclasses

import numpy as np
import pytest
import torch
from _helpers import (
    DEVICE_PARAMS,
    DTYPE_PARAMS,
    F64,
    spd,
    spectrum_matrix,
    strict,
    symmetric,
    wanted_eigenvalues,
)

import solvers
from linops import (
    PSD,
    BlockDiag,
    Dense,
    Diagonal,
    I_like,
    Identity,
    Kronecker,
    SelfAdjoint,
)
from solvers import (
    LOBPCG,
    Auto,
    Eigh,
    EigResult,
    Lanczos,
    PowerIteration,
    Status,
    eig,
    eigmax,
    eigmin,
)

#: eigenvalue error allowed, relative to max |λ|, per dtype
VTOL = {torch.float32: 2e-5, torch.float64: 1e-9}
#: eigen-residual ‖A v − λ v‖ allowed, relative to max |λ|
RTOL = {torch.float32: 1e-3, torch.float64: 1e-6}


def check_pairs(res, M, k, which, dtype):
    vals, vecs = res
    assert isinstance(res, EigResult) and vals.shape == (k,) and vecs.shape == (M.shape[0], k)
    scale = float(M.abs().max()) if M.numel() else 1.0
    scale = max(scale, float(np.abs(np.linalg.eigvalsh(M.cpu().to(F64).numpy())).max()))
    ref = torch.from_numpy(wanted_eigenvalues(M, k, which))
    assert float((vals.cpu().to(F64) - ref).abs().max()) <= VTOL[dtype] * scale
    V = vecs.cpu().to(F64)
    assert torch.allclose(V.norm(dim=0), torch.ones(k, dtype=F64), atol=1e-4)
    resid = (M.cpu().to(F64) @ V - V * vals.cpu().to(F64)).norm(dim=0)
    assert float(resid.max()) <= RTOL[dtype] * scale


# eigenvalues {−5, −4.5, …, 1}: the largest in magnitude is negative
N = 40
LAM = torch.cat([torch.tensor([-5.0, -4.5], dtype=F64), torch.linspace(-3, 1, N - 2, dtype=F64)])
S = spectrum_matrix(LAM)

ALGS = {
    "auto-dense": None,
    "auto-lanczos": Auto(tol=1e-9, dense_threshold=0, options={"seed": 0}),
    "lanczos": Lanczos(tol=1e-9, seed=0),
    "lobpcg": LOBPCG(tol=1e-8, seed=0),
    "eigh": Eigh(),
    "dense": solvers.Dense(),
}


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("name", list(ALGS))
def test_eig_generic(name, which, k, dtype, device):
    alg = ALGS[name]
    if dtype == torch.float32 and alg is not None and hasattr(alg, "tol"):
        alg = dataclasses.replace(alg, tol=1e-5)
    A = SelfAdjoint(Dense(S.to(dtype=dtype, device=device)))
    res = eig(A, k, which, alg)
    check_pairs(res, S, k, which, dtype)
    assert res.values.dtype == dtype and res.values.device.type == device
    iterative = name in ("auto-lanczos", "lanczos", "lobpcg")
    assert (res.solution is not None) == iterative
    if iterative:
        assert res.solution.status is Status.CONVERGED
        expected = LOBPCG if name == "lobpcg" else Lanczos
        assert type(res.solution.algorithm) is expected


@pytest.mark.parametrize("name", list(ALGS))
def test_eigmax_is_largest_algebraic(name):
    alg = ALGS[name]
    A = SelfAdjoint(Dense(S))
    lmax, lmin = eigmax(A, alg), eigmin(A, alg)
    assert lmax.ndim == 0 and lmin.ndim == 0
    assert abs(float(lmax) - 1.0) < 1e-8  # not −5, the largest in magnitude
    assert abs(float(lmin) + 5.0) < 1e-8
    assert abs(float(eig(A, 1, "LM", alg).values[0]) + 5.0) < 1e-8
    if name in ("auto-lanczos", "lanczos", "lobpcg"):
        assert lmax.solution.status is Status.CONVERGED
    assert "algebraic" in eigmax.__doc__.lower()


def test_negative_dominant_eigenvalue():
    M = spectrum_matrix(torch.cat([torch.tensor([-10.0]), torch.linspace(0.1, 2.0, 29)]), seed=4)
    A = SelfAdjoint(Dense(M))
    res = eig(A, 1, "LM", PowerIteration(tol=1e-10, seed=0))
    assert abs(float(res.values[0]) + 10.0) < 1e-8
    assert res.solution.status is Status.CONVERGED
    v = res.vectors[:, 0]
    assert float((M @ v + 10.0 * v).norm()) < 1e-7
    assert abs(float(eigmax(A, Lanczos(tol=1e-10, seed=0))) - 2.0) < 1e-8
    assert abs(float(eigmin(A, Lanczos(tol=1e-10, seed=0))) + 10.0) < 1e-8
    assert abs(float(eigmax(A, LOBPCG(tol=1e-9, seed=0))) - 2.0) < 1e-7


def test_power_iteration_refuses_what_it_cannot_do():
    A = PSD(Dense(spd(10)))
    with pytest.raises(ValueError, match="MAGNITUDE"):
        eigmax(A, PowerIteration())
    with pytest.raises(ValueError, match="LM"):
        eig(A, 3, "LM", PowerIteration())
    with pytest.raises(ValueError):
        eig(A, 1, "SA", PowerIteration())
    # on a PSD matrix the largest magnitude is the largest eigenvalue
    res = eig(A, 1, "LM", PowerIteration(tol=1e-10, seed=0, max_iters=5000))
    assert abs(float(res.values[0]) - 10.0) < 1e-7


def test_non_self_adjoint_operator():
    g = torch.Generator().manual_seed(3)
    M = torch.randn(30, 30, dtype=F64, generator=g)
    with pytest.raises(ValueError, match="SelfAdjoint"):
        eig(Dense(M), 1, alg=Auto(dense_threshold=10))
    for alg in (Lanczos(), LOBPCG(), PowerIteration()):
        with pytest.raises(ValueError, match="self-adjoint"):
            eig(Dense(M), 1, "LM", alg)
    # a dense method takes a non-symmetric matrix with a real spectrum
    T = torch.triu(M) + torch.diag(torch.arange(30, dtype=F64))
    res = eig(Dense(T), 3, "LA", solvers.Dense())
    ev = np.sort(np.linalg.eigvals(T.numpy()).real)[::-1][:3].copy()
    assert torch.allclose(res.values, torch.from_numpy(ev), atol=1e-9)
    V = res.vectors
    assert float((T @ V - V * res.values).norm(dim=0).max()) < 1e-8
    # and says so when the spectrum is complex
    R = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=F64)
    with pytest.raises(ValueError, match="complex"):
        eig(Dense(R), 1, alg=solvers.Dense())


# ------------------------------------------------------------------ structural rules
A8 = SelfAdjoint(Dense(symmetric(8)))
B5 = PSD(Dense(spd(5, seed=1)))

STRUCTURES = {
    "scalar+": lambda: 3.0 * A8,
    "scalar-": lambda: -2.0 * A8,
    "diagonal": lambda: Diagonal(torch.randn(10, dtype=F64, generator=torch.Generator()
                                             .manual_seed(5))),
    "identity": lambda: Identity(6, F64),
    "kronecker2": lambda: Kronecker(A8, B5),
    "kronecker3": lambda: Kronecker(SelfAdjoint(Dense(symmetric(3, 1))), PSD(Dense(spd(4))),
                                    SelfAdjoint(Dense(symmetric(2, 3)))),
    "blockdiag": lambda: BlockDiag(A8, B5, Diagonal(torch.tensor([-7.0, 9.0], dtype=F64))),
    "shift+": lambda: A8 + 2.5 * I_like(A8),
    "shift-": lambda: A8 - 2.5 * I_like(A8),
    "shift-I": lambda: A8 + I_like(A8),
}


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("name", list(STRUCTURES))
def test_eig_structural_rule(name, which, dtype, device):
    op = STRUCTURES[name]().to(dtype=dtype, device=device)
    M = op.to_dense().cpu().to(F64)
    for k in (1, 3):
        check_pairs(eig(op, k, which), M, k, which, dtype)


@pytest.mark.parametrize("name", ["scalar+", "scalar-", "kronecker2", "kronecker3", "blockdiag",
                                  "shift+", "shift-", "shift-I"])
def test_eig_structural_rule_works_on_the_parts(name):
    op = STRUCTURES[name]()
    M = op.to_dense()
    # (a shift moves the largest magnitude: 'LM' of B + c·I is not 'LM' of B, so not tested)
    for which in ("LA", "SA") if name.startswith("shift") else ("LA", "SA", "LM"):
        res = eig(strict(op), 3, which, Lanczos(tol=1e-10, seed=0))
        check_pairs(res, M, 3, which, F64)


def test_negative_scalar_flips_the_wanted_end():
    # eig 'LA' of −2·A is −2 times eig 'SA' of A
    res = eig(-2.0 * A8, 2, "LA", Lanczos(tol=1e-10, seed=0))
    ref = np.linalg.eigvalsh(A8.to_dense().numpy())[:2]
    assert torch.allclose(res.values, torch.from_numpy(-2.0 * ref), atol=1e-8)


def test_tag_on_a_scalar_multiple_reaches_the_rule():
    # SelfAdjoint(3·B): the ScalarMul rule recurses into B, which must stay self-adjoint
    B = Dense(symmetric(6, 2))
    op = SelfAdjoint(3.0 * B)
    M = op.to_dense()
    for which in ("LA", "SA"):
        check_pairs(eig(op, 2, which, Lanczos(tol=1e-10, seed=0)), M, 2, which, F64)


def test_shift_of_a_tagged_sum_with_a_scalar_term():
    # SelfAdjoint(3·B + I): the shift rule must see that 3·B is self-adjoint
    B = Dense(symmetric(6, 2))
    op = SelfAdjoint(3.0 * B + I_like(B))
    M = op.to_dense()
    check_pairs(eig(op, 2, "LA"), M, 2, "LA", F64)
    check_pairs(eig(op, 2, "SA", Lanczos(tol=1e-10, seed=0)), M, 2, "SA", F64)


def test_k_equal_n_and_k_none():
    op = SelfAdjoint(Dense(symmetric(6)))
    M = op.to_dense()
    check_pairs(eig(op, 6, "SA"), M, 6, "SA", F64)
    assert eig(op, None, "LA").values.shape == (6,)


# ------------------------------------------------------------------ misuse
def test_eig_misuse_errors():
    op = SelfAdjoint(Dense(S))
    for k in (0, N + 1, 1.5, "2"):
        with pytest.raises(ValueError, match="k must be"):
            eig(op, k)
    for which in ("BE", "la", "LR", None):
        with pytest.raises(ValueError, match="which"):
            eig(op, 1, which)
    with pytest.raises(TypeError, match="instance"):
        eig(op, 1, "LA", Lanczos)
    with pytest.raises(TypeError, match="linops.Dense"):
        eig(S, 1)
    with pytest.raises(ValueError, match="square"):
        eigmax(Dense(torch.ones(3, 4, dtype=F64)))
    with pytest.raises(TypeError, match="eig cannot run"):
        eig(op, 1, "LA", solvers.CG())


# ------------------------------------------------------- repeated eigenvalues (issues 10, 12)
def _top_repeated(mult=5, n=200):
    return spectrum_matrix([10.0] * mult + list(np.linspace(0.0, 9.0, n - mult)), seed=4)


@pytest.mark.parametrize("alg", [None, Lanczos(seed=0), LOBPCG(seed=0, tol=1e-8, block_size=5)],
                         ids=["auto", "lanczos", "lobpcg"])
def test_eig_finds_a_repeated_top_eigenvalue(alg):
    """eig(A, k=3) with the top eigenvalue repeated 5 times: [10, 10, 10], not [10, 10, 8.99]
    (single-vector Lanczos sees one copy per Krylov space)."""
    A = SelfAdjoint(Dense(_top_repeated()))
    alg = Auto(dense_threshold=0, options={"seed": 0}) if alg is None else alg
    res = eig(A, k=3, alg=alg)
    assert res.solution.converged and res.num_converged == 3
    assert torch.allclose(res.values, torch.full((3,), 10.0, dtype=F64), rtol=1e-6)
    # the eigenvectors span part of the 5-dimensional eigenspace
    M = A.to_dense()
    assert float((M @ res.vectors - 10.0 * res.vectors).norm()) < 1e-4


def test_eig_top10_to_1e6_with_repeated_and_clustered_eigenvalues():
    lam = [5.0, 5.0, 5.0, 4.0, 4.0, 3.9999, 3.5, 3.0, 3.0, 2.9, 2.8] + list(
        np.linspace(-2.0, 2.5, 289))
    A = SelfAdjoint(Dense(spectrum_matrix(lam, seed=2)))
    ref = np.sort(lam)[::-1][:10]
    for which, want in (("LA", ref), ("SA", np.sort(lam)[:10])):
        res = eig(A, k=10, which=which, alg=Lanczos(seed=1))
        assert res.solution.converged and res.num_converged == 10
        assert np.abs(res.values.numpy() / want - 1).max() <= 1e-6, which


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_eig_top10_of_a_network_to_1e6(curvature):
    """Top-10 of the Hessian and GGN of a 2,203-parameter tanh MLP, float64, against
    torch.linalg.eigvalsh of the dense matrices built with torch.func."""
    from _spectral_nets import small_network

    import linops

    net = small_network()
    cls = linops.curvature.Hessian if curvature == "hessian" else linops.curvature.GGN
    op = cls(net["model"], net["loss_fn"], (net["X"], net["y"]))
    dense = net["H"] if curvature == "hessian" else net["G"]
    ref = torch.linalg.eigvalsh(dense).flip(0)[:10]
    res = eig(op, k=10, alg=Auto(dense_threshold=0, options={"seed": 0}))
    assert res.solution.converged and res.num_converged == 10
    assert float((res.values / ref - 1).abs().max()) <= 1e-6


def test_num_converged_when_the_budget_is_short():
    A = SelfAdjoint(Dense(_top_repeated()))
    with pytest.warns(solvers.NotConvergedWarning, match="pass the residual test"):
        res = eig(A, k=4, alg=Lanczos(seed=0, max_iters=12))
    assert res.solution.status is Status.MAX_ITERS
    assert 0 <= res.num_converged < 4
    assert res.num_converged == res.solution.info["converged_count"]
    exact = eig(Diagonal(torch.arange(5.0)), k=2)
    assert exact.num_converged == 2


# ------------------------------------------------------------------ half precision (issue 12)
def _bf16_case(dtype):
    lam = [100.0] + list(np.linspace(0.0, 50.0, 199))
    return SelfAdjoint(Dense(spectrum_matrix(lam, seed=0).to(dtype)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("alg", [Lanczos(seed=0), LOBPCG(seed=0), PowerIteration(seed=0, tol=1e-3),
                                 Auto(dense_threshold=0, options={"seed": 0})],
                         ids=["lanczos", "lobpcg", "power", "auto"])
def test_half_precision_krylov_runs_in_float32(alg, dtype):
    """eigmax in bfloat16 once said CONVERGED with 31.4 for a top eigenvalue of 100 (a false
    breakdown at bfloat16's threshold); now the Krylov work is float32."""
    A = _bf16_case(dtype)
    if isinstance(alg, PowerIteration):
        res = eig(A, 1, "LM", alg)
        val, sol = res.values[0], res.solution
    else:
        val = eigmax(A, alg)
        sol = val.solution
    assert val.dtype == dtype
    assert sol.converged
    assert abs(float(val) - 100.0) <= 1.0  # bfloat16 spacing at 100 is 0.5


def test_half_precision_top3_within_two_percent():
    for dtype in (torch.bfloat16, torch.float16):
        res = eig(_bf16_case(dtype), k=3, alg=Lanczos(seed=0))
        assert res.solution.converged
        ref = np.array([100.0, 50.0, 50.0 - 50.0 / 198])
        assert np.abs(res.values.float().numpy() / ref - 1).max() <= 0.02


# ------------------------------------------------------------------ cond
def test_cond_of_psd_operators():
    M = spd(300, cond=1e3, seed=1)
    ref = float(np.linalg.cond(M.numpy()))
    got = solvers.cond(PSD(Dense(M)))
    assert abs(float(got) / ref - 1) < 1e-8
    big = solvers.cond(PSD(Dense(M)), alg=Auto(dense_threshold=0, tol=1e-10,
                                                options={"seed": 0}))
    assert abs(float(big) / ref - 1) < 1e-6
    assert big.solution[0].converged and big.solution[1].converged
    sing = torch.diag(torch.tensor([0.0, 1.0, 2.0], dtype=F64))
    assert float(solvers.cond(PSD(Dense(sing)))) == float("inf")
    with pytest.raises(ValueError, match="linops.PSD"):
        solvers.cond(SelfAdjoint(Dense(M)))
