"""Property-based tests: random compositions of operators against the same algebra on
dense float64 tensors.

A recursive strategy builds a shape-consistent expression tree (sums, differences,
products, scalars, transposes, Kronecker products and block diagonals of random small
operators, and congruences Bᵀ A B) and, in parallel, its dense float64 matrix with plain
torch. Every product, transpose and dense form of the operator must equal the dense one,
and every property the rules claim must hold for the dense matrix.
"""

import numpy as np
import pytest
import scipy.linalg
import torch
from conformance import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linops import (
    PSD,
    BlockDiag,
    Dense,
    Diagonal,
    Identity,
    Kronecker,
    LowRank,
    Permutation,
    Triangular,
    is_psd,
    is_self_adjoint,
)

F64 = torch.float64
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # reproducible in CI
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SIZES = st.sampled_from([2, 4, 3, 6, 1])
SCALARS = st.sampled_from([-2.0, -0.5, 0.25, 1.5, 3.0])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _rng(draw) -> np.random.Generator:
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=F64)


@st.composite
def leaves(draw, m: int, n: int):
    """A random small operator of shape (m, n) and its dense matrix."""
    rng = _rng(draw)
    kinds = ["dense", "lowrank"]
    if m == n:
        kinds += ["diagonal", "diagonal_psd", "identity", "dense_psd", "gram", "triangular",
                  "permutation"]
    kind = draw(st.sampled_from(kinds))
    if kind == "dense":
        M = _tensor(rng.standard_normal((m, n)))
        return Dense(M), M
    if kind == "lowrank":
        r = draw(st.integers(1, 2))
        U, C, V = (_tensor(rng.standard_normal(s)) for s in ((m, r), (r, r), (n, r)))
        return LowRank(U, C, V), U @ C @ V.T
    if kind == "diagonal":
        d = _tensor(rng.standard_normal(n))
        return Diagonal(d), torch.diag(d)
    if kind == "diagonal_psd":
        d = _tensor(np.abs(rng.standard_normal(n)))
        return PSD(Diagonal(d)), torch.diag(d)
    if kind == "identity":
        return Identity(n, F64), torch.eye(n, dtype=F64)
    if kind == "dense_psd":
        B = _tensor(rng.standard_normal((n, n)))
        return PSD(Dense(B @ B.T)), B @ B.T
    if kind == "gram":
        U = _tensor(rng.standard_normal((n, draw(st.integers(1, 3)))))
        return LowRank(U), U @ U.T
    if kind == "triangular":
        lower = draw(st.booleans())
        M = _tensor(rng.standard_normal((n, n)))
        return Triangular(M, lower=lower), (torch.tril(M) if lower else torch.triu(M))
    perm = torch.as_tensor(rng.permutation(n))
    return Permutation(perm, F64), torch.eye(n, dtype=F64)[perm]


def _split(draw, total: int, parts: int) -> list[int]:
    """``total`` as a sum of ``parts`` positive integers."""
    cuts = sorted(draw(st.lists(st.integers(1, total - 1), min_size=parts - 1,
                                max_size=parts - 1, unique=True)))
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def _factor(draw, total: int, parts: int) -> list[int]:
    """``total`` as a product of ``parts`` positive integers."""
    out = []
    for _ in range(parts - 1):
        d = draw(st.sampled_from(_divisors(total)))
        out.append(d)
        total //= d
    return [*out, total]


@st.composite
def operators(draw, m: int, n: int, depth: int):
    """A random expression of shape (m, n) with at most ``depth`` levels of combinators."""
    kinds = ["leaf"]
    if depth > 0:
        kinds += ["sum", "difference", "negation", "scalar", "division", "product",
                  "transpose", "kronecker"]
        if m >= 2 and n >= 2:
            kinds.append("blockdiag")
        if m == n:
            kinds.append("congruence")
    kind = draw(st.sampled_from(kinds))
    sub = depth - 1
    if kind == "leaf":
        return draw(leaves(m, n))
    if kind in ("sum", "difference"):
        (A, a), (B, b) = draw(operators(m, n, sub)), draw(operators(m, n, sub))
        return (A + B, a + b) if kind == "sum" else (A - B, a - b)
    if kind == "negation":
        A, a = draw(operators(m, n, sub))
        return -A, -a
    if kind == "scalar":
        A, a = draw(operators(m, n, sub))
        c = draw(SCALARS)
        if draw(st.booleans()):
            return c * A, c * a
        return A * torch.tensor(c, dtype=F64), c * a
    if kind == "division":
        A, a = draw(operators(m, n, sub))
        c = draw(SCALARS)
        return A / c, a / c
    if kind == "product":
        k = draw(SIZES)
        (A, a), (B, b) = draw(operators(m, k, sub)), draw(operators(k, n, sub))
        return A @ B, a @ b
    if kind == "transpose":
        A, a = draw(operators(n, m, sub))
        return A.T, a.T
    if kind == "congruence":  # Bᵀ A B, PSD when A is
        k = draw(SIZES)
        (A, a), (B, b) = draw(operators(k, k, sub)), draw(operators(k, n, sub))
        return B.T @ A @ B, b.T @ a @ b
    if kind == "kronecker":
        parts = draw(st.integers(2, 3))
        ms, ns = _factor(draw, m, parts), _factor(draw, n, parts)
        if m == n and draw(st.booleans()):
            ns = ms  # square factors, so properties can propagate
        pairs = [draw(operators(mi, ni, sub)) for mi, ni in zip(ms, ns)]
        dense = pairs[0][1]
        for _, f in pairs[1:]:
            dense = _tensor(np.kron(dense.numpy(), f.numpy()))
        return Kronecker(*(p[0] for p in pairs)), dense
    # block diagonal
    parts = draw(st.integers(2, min(3, m, n)))
    ms = _split(draw, m, parts)
    ns = ms if m == n and draw(st.booleans()) else _split(draw, n, parts)
    pairs = [draw(operators(mi, ni, sub)) for mi, ni in zip(ms, ns)]
    dense = _tensor(scipy.linalg.block_diag(*(p[1].numpy() for p in pairs)))
    return BlockDiag(*(p[0] for p in pairs)), dense


@st.composite
def expressions(draw, max_depth: int = 3, square: bool = False):
    m = draw(SIZES)
    n = m if square or draw(st.booleans()) else draw(SIZES)
    return draw(operators(m, n, draw(st.integers(1, max_depth))))


def _tol(ref: torch.Tensor) -> dict:
    return {"rtol": 1e-9, "atol": 1e-9 * max(1.0, float(ref.abs().max()) if ref.numel() else 1)}


@SETTINGS
@given(expressions())
def test_random_composition_products(pair):
    A, D = pair
    m, n = D.shape
    assert A.shape == (m, n) and A.dtype == F64
    torch.testing.assert_close(A.to_dense(), D, **_tol(D))
    X = torch.randn(n, 2, dtype=F64)
    torch.testing.assert_close(A @ X, D @ X, **_tol(D @ X))
    torch.testing.assert_close(A @ X[:, 0], D @ X[:, 0], **_tol(D @ X))
    Y = torch.randn(2, m, dtype=F64)
    torch.testing.assert_close(Y @ A, Y @ D, **_tol(Y @ D))
    torch.testing.assert_close(Y[0] @ A, Y[0] @ D, **_tol(Y @ D))
    torch.testing.assert_close(A.T @ Y.T, D.T @ Y.T, **_tol(Y @ D))


@SETTINGS
@given(expressions())
def test_random_composition_transpose_and_diag(pair):
    A, D = pair
    torch.testing.assert_close(A.T.to_dense(), D.T, **_tol(D))
    torch.testing.assert_close(A.H.to_dense(), D.T, **_tol(D))
    assert A.T.T.shape == A.shape
    torch.testing.assert_close(A.T.T.to_dense(), D, **_tol(D))
    if A.is_square():
        try:
            d = A.diag()
        except NotImplementedError:
            return
        torch.testing.assert_close(d, D.diagonal(), **_tol(D))
    else:
        with pytest.raises(ValueError, match="square"):
            A.diag()


@SETTINGS
@given(expressions(square=True))
def test_random_composition_properties_hold(pair):
    """Whatever the rules claim is true of the dense matrix (a wrong rule fails here)."""
    A, D = pair
    if is_self_adjoint(A) or is_psd(A):
        torch.testing.assert_close(D, D.T, **_tol(D))
    if is_psd(A):
        lam = torch.linalg.eigvalsh((D + D.T) / 2)
        assert lam.min() >= -1e-8 * max(1.0, float(lam.abs().max())), (A, lam)


@SETTINGS
@given(expressions())
def test_random_composition_to_dtype(pair):
    A, D = pair
    B = A.to(torch.float32)
    assert B.dtype == torch.float32 and B.shape == A.shape
    assert_close(B.to_dense(), D, torch.float32)
    assert is_psd(B) == is_psd(A) and is_self_adjoint(B) == is_self_adjoint(A)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(0, 2**32 - 1), st.integers(2, 4), st.integers(2, 4))
def test_scalar_algebra_matches_dense(seed, m, n):
    """c (A + B) - (A / d) and friends, against the same algebra on tensors."""
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(m, n, generator=g, dtype=F64) for _ in range(2))
    A, B = Dense(a), Dense(b)
    c, d = 1.5, -4.0
    expr = c * (A + B) - A / d + (-B) * 2
    torch.testing.assert_close(expr.to_dense(), c * (a + b) - a / d - 2 * b)
    expr2 = (A - B).T @ (d * A) + 0 + A.T @ B
    torch.testing.assert_close(expr2.to_dense(), (a - b).T @ (d * a) + a.T @ b)
