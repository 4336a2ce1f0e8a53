"""``Auto``: validation, the algorithm it picks by size, structure and tags, the options it
passes on or rejects, and the record that names what ran."""

import dataclasses

import numpy as np
import pytest
import torch
from _helpers import F64, nonsymmetric, spectrum_matrix

import solvers
from linops import PSD, Dense, SelfAdjoint
from solvers import (
    CG,
    GMRES,
    MINRES,
    Auto,
    Cholesky,
    Eigh,
    Lanczos,
    Status,
    eig,
    eigmax,
    inv,
    jacobi,
)

N = 20
M_PSD = spectrum_matrix(torch.logspace(0, 1, N, dtype=F64))
M_SYM = spectrum_matrix(torch.linspace(-3.0, 2.0, N, dtype=F64), seed=1)
M_GEN = nonsymmetric(N, seed=2)

OPERATORS = {
    "psd": lambda: PSD(Dense(M_PSD)),
    "self-adjoint": lambda: SelfAdjoint(Dense(M_SYM)),
    "general": lambda: Dense(M_GEN),
}


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(tol=-1.0), ValueError),
        (dict(atol=-1e-3), ValueError),
        (dict(max_iters=0), ValueError),
        (dict(max_iters=2.5), ValueError),
        (dict(dense_threshold=-1), ValueError),
        (dict(on_failure="loud"), ValueError),
        (dict(options=["restart", 5]), TypeError),
        (dict(restart=5), TypeError),  # unknown keyword
        (dict(tolerance=1e-3), TypeError),
    ],
)
def test_invalid_configuration_raises_at_once(kwargs, error):
    with pytest.raises(error):
        Auto(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(tol=float("nan")), dict(tol=float("inf")),
                                    dict(atol=float("nan")), dict(max_iters=True)])
def test_non_finite_or_boolean_settings_are_refused(kwargs):
    # a NaN tolerance never converges and True is no iteration count: misuse, at once
    with pytest.raises((ValueError, TypeError)):
        Auto(**kwargs)


def test_auto_is_frozen_and_has_documented_defaults():
    a = Auto()
    assert a.tol == 1e-6 and a.atol == 0.0 and a.max_iters is None
    assert a.dense_threshold == 1000 and a.on_failure == "warn" and a.options == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.tol = 1.0


# ------------------------------------------------------------------ what it picks
@pytest.mark.parametrize(
    "kind, task, small, large",
    [
        ("psd", "solve", Cholesky, CG),
        ("self-adjoint", "solve", solvers.Dense, MINRES),
        ("general", "solve", solvers.Dense, GMRES),
        ("psd", "eig", Eigh, Lanczos),
        ("self-adjoint", "eig", Eigh, Lanczos),
        ("general", "eig", solvers.Dense, None),
        ("psd", "function", Eigh, Lanczos),
        ("self-adjoint", "function", Eigh, Lanczos),
    ],
)
def test_select_by_size_and_tags(kind, task, small, large):
    A = OPERATORS[kind]()
    assert type(Auto().select(A, task)) is small
    assert type(Auto(dense_threshold=N).select(A, task)) is small  # n ≤ threshold: dense
    if large is None:
        with pytest.raises(ValueError, match="SelfAdjoint"):
            Auto(dense_threshold=N - 1).select(A, task)
    else:
        assert type(Auto(dense_threshold=N - 1).select(A, task)) is large
        assert type(Auto(dense_threshold=0).select(A, task)) is large


def test_select_passes_its_settings_to_the_iterative_algorithm():
    P = jacobi(PSD(Dense(M_PSD)))
    alg = Auto(tol=1e-3, atol=1e-9, max_iters=20, preconditioner=P, dense_threshold=0,
               on_failure="raise").select(PSD(Dense(M_PSD)), "solve")
    assert isinstance(alg, CG)
    assert (alg.tol, alg.atol, alg.max_iters, alg.on_failure) == (1e-3, 1e-9, 20, "raise")
    assert alg.preconditioner is P
    lan = Auto(tol=1e-4, max_iters=15, dense_threshold=0, on_failure="ignore").select(
        PSD(Dense(M_PSD)), "eig")
    assert isinstance(lan, Lanczos)
    assert (lan.tol, lan.max_iters, lan.on_failure) == (1e-4, 15, "ignore")
    dense = Auto(on_failure="raise").select(PSD(Dense(M_PSD)), "solve")
    assert isinstance(dense, Cholesky) and dense.on_failure == "raise"


def test_options_go_to_the_chosen_algorithm_or_are_rejected():
    big = dict(dense_threshold=0)
    # CG takes no restart: the error names what was chosen and how to fix it
    with pytest.raises(TypeError, match="CG") as info:
        Auto(options={"restart": 5}, **big).select(PSD(Dense(M_PSD)), "solve")
    assert "restart" in str(info.value)
    with pytest.raises(TypeError, match="CG"):
        inv(PSD(Dense(M_PSD)), Auto(options={"restart": 5}, **big))
    assert Auto(options={"restart": 5}, **big).select(Dense(M_GEN), "solve").restart == 5
    assert Auto(options={"seed": 3}, **big).select(PSD(Dense(M_PSD)), "eig").seed == 3
    with pytest.raises(TypeError, match="Cholesky"):
        Auto(options={"restart": 5}).select(PSD(Dense(M_PSD)), "solve")


def test_select_rejects_an_unknown_task():
    with pytest.raises(ValueError, match="task"):
        Auto().select(PSD(Dense(M_PSD)), "invert")


# ------------------------------------------------------------------ the choice is visible
@pytest.mark.parametrize("kind, expected", [("psd", CG), ("self-adjoint", MINRES),
                                            ("general", GMRES)])
def test_inv_names_the_algorithm_that_ran(kind, expected):
    A = OPERATORS[kind]()
    M = A.to_dense()
    Ainv = inv(A, Auto(tol=1e-10, dense_threshold=0))
    assert type(Ainv.algorithm) is expected
    b = torch.randn(N, dtype=F64)
    x = Ainv @ b
    assert float((x - torch.linalg.solve(M, b)).norm() / torch.linalg.solve(M, b).norm()) < 1e-8
    assert Ainv.solution.algorithm is Ainv.algorithm
    assert Ainv.solution.status is Status.CONVERGED
    small = inv(A, Auto())
    assert type(small.algorithm) is (Cholesky if kind == "psd" else solvers.Dense)


def test_eig_and_functions_name_the_algorithm_that_ran():
    A = PSD(Dense(M_PSD))
    res = eig(A, 2, "LA", Auto(tol=1e-10, dense_threshold=0, options={"seed": 0}))
    assert isinstance(res.solution.algorithm, Lanczos)
    assert np.allclose(res.values.numpy(), np.linalg.eigvalsh(M_PSD.numpy())[::-1][:2])
    top = eigmax(A, Auto(tol=1e-10, dense_threshold=0, options={"seed": 0}))
    assert isinstance(top.solution.algorithm, Lanczos)
    assert eig(A, 1, "LA", Auto()).solution is None  # dense: exact, no iterative record


def test_a_psd_tag_on_a_scaled_operator_reaches_the_choice():
    # PSD(3·A) is PSD: Auto must pick CG (not GMRES) for the solve it runs
    Ainv = inv(PSD(3.0 * Dense(M_PSD)), Auto(tol=1e-10, dense_threshold=0))
    b = torch.randn(N, dtype=F64)
    x = Ainv @ b
    assert float((3.0 * M_PSD @ x - b).norm() / b.norm()) < 1e-8
    solves = [op for op in _walk(Ainv) if isinstance(op, solvers.InverseOperator)]
    assert solves and all(isinstance(op.algorithm, CG) for op in solves)


def test_non_convergence_under_auto_warns_or_raises():
    A = PSD(Dense(spectrum_matrix(torch.logspace(0, 3, 40, dtype=F64))))
    b = torch.randn(40, dtype=F64)
    with pytest.warns(solvers.NotConvergedWarning):
        inv(A, Auto(tol=1e-10, max_iters=2, dense_threshold=0)) @ b
    with pytest.raises(solvers.NotConvergedError):
        inv(A, Auto(tol=1e-10, max_iters=1, dense_threshold=0, on_failure="raise")) @ b


def _walk(op):
    out, stack = [], [op]
    while stack:
        o = stack.pop()
        out.append(o)
        stack.extend(o._children())
    return out
