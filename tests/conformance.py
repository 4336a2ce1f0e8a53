"""The conformance harness: one list of operator cases, each with its dense reference.

Every entry of ``CASES`` is a ``Case``: an id, a constructor ``build(dtype, device)`` that
returns the operator, its dense float64 reference built independently with numpy
(``np.kron``, ``scipy.linalg.block_diag``, ``np.tril``, ...), the properties the rules
must report, a substring its ``repr`` must contain and whether ``diag()`` is cheap.
``tests/test_operators.py`` runs the same checks on every case (matvec, matmat, ``x @ A``,
the adjoint identity, ``to_dense``, ``diag``, dtype and device propagation, ``.to``, tags,
``repr``). Adding an operator adds exactly one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg
import torch

import linops
from linops import (
    FIM,
    GGN,
    PSD,
    BlockDiag,
    Dense,
    Diagonal,
    Hessian,
    I_like,
    Identity,
    Jacobian,
    Kronecker,
    KroneckerEigen,
    LowRank,
    Permutation,
    Permuted,
    Transpose,
    Triangular,
    from_scipy,
)

PSD_TAG, SA_TAG = "psd", "self_adjoint"


@dataclass(frozen=True)
class Case:
    """One operator of the harness.

    Attributes:
        id: the test id.
        build: ``build(dtype, device) -> LinearOperator``, the operator under test.
        dense: the float64 reference matrix (numpy), shape ``(m, n)``.
        tags: the properties ``is_psd`` / ``is_self_adjoint`` must report
            (a subset of ``{"psd", "self_adjoint"}``; "psd" implies "self_adjoint").
        repr: a substring the operator's ``repr`` must contain.
        diag: True when ``A.diag()`` must be cheap and exact; otherwise a square operator's
            ``diag()`` may raise ``NotImplementedError`` (or be exact).
    """

    id: str
    build: Callable[[torch.dtype, str], linops.LinearOperator]
    dense: np.ndarray
    tags: frozenset[str]
    repr: str
    diag: bool = False

    def __repr__(self) -> str:  # short ids in pytest output
        return self.id


# ------------------------------------------------------------------ data (float64, numpy)
_rng = np.random.default_rng(20240601)


def _randn(*shape) -> np.ndarray:
    return _rng.standard_normal(shape)


def _spd(n: int) -> np.ndarray:
    """A random symmetric positive definite matrix (eigenvalues ≥ 0.5)."""
    B = _randn(n, n)
    return B @ B.T / n + 0.5 * np.eye(n)


def t(a, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A numpy array (or number) as a tensor of the given dtype on the given device."""
    return torch.tensor(np.asarray(a)).to(dtype=dtype, device=device)  # a copy


M44, M33, M22 = _randn(4, 4), _randn(3, 3), _randn(2, 2)
M35, N35, N54 = _randn(3, 5), _randn(3, 5), _randn(5, 4)
M23, M34, M32, M31 = _randn(2, 3), _randn(3, 4), _randn(3, 2), _randn(3, 1)
G2, G3, G4 = _spd(2), _spd(3), _spd(4)
d3, d4 = _randn(3), _randn(4)
pos4 = np.abs(_randn(4)) + 0.1
U52, U42, C22 = _randn(5, 2), _randn(4, 2), _randn(2, 2)
PERM = np.array([3, 0, 4, 1, 2])
PERM6 = np.array([4, 0, 5, 2, 1, 3])
P6 = np.eye(6)[PERM6]  # (P x)ᵢ = x[PERM6[i]]
P_DENSE = np.eye(5)[PERM]
T44 = _randn(4, 4)

# autodiff operators at x0, with closed-form references: f(x) = tanh(W x) has
# J = diag(1 - f²) W; h(x) = ½ xᵀ S x + Σ sin(x) has H = S - diag(sin x); the loss
# Σ z⁴/4 has Hessian diag(3 z²) in z; softmax cross entropy has Hessian diag(p) - p pᵀ.
W34, x4 = _randn(3, 4), _randn(4)
S44 = M44 + M44.T
_z = np.tanh(W34 @ x4)
J_REF = np.diag(1 - _z**2) @ W34
_p = np.exp(W34 @ x4 - (W34 @ x4).max())
_p /= _p.sum()


def _tanh_layer(x):
    return torch.tanh(torch.as_tensor(W34).to(x) @ x)


def _quadratic_plus_sin(x):
    return 0.5 * x @ (torch.as_tensor(S44).to(x) @ x) + torch.sin(x).sum()


def _logits(x):
    return torch.as_tensor(W34).to(x) @ x


def _case(id, build, dense, tags=(), repr="", diag=False) -> Case:
    tags = frozenset(tags)
    if PSD_TAG in tags:
        tags = tags | {SA_TAG}
    return Case(id, build, np.asarray(dense, dtype=np.float64), tags, repr, diag)


PSDT = (PSD_TAG, SA_TAG)
SAT = (SA_TAG,)

# ------------------------------------------------------------------ the cases
CASES: list[Case] = [
    _case("dense_square", lambda dt, dev: Dense(t(M44, dt, dev)), M44,
          repr="Dense(4×4)", diag=True),
    _case("dense_rect", lambda dt, dev: Dense(t(M35, dt, dev)), M35, repr="Dense(3×5)"),
    _case("dense_psd", lambda dt, dev: PSD(Dense(t(G4, dt, dev))), G4, PSDT,
          repr="Dense(4×4)", diag=True),
    _case("diagonal", lambda dt, dev: Diagonal(t(d4, dt, dev)), np.diag(d4), SAT,
          repr="Diag(4)", diag=True),
    _case("diagonal_psd", lambda dt, dev: PSD(Diagonal(t(pos4, dt, dev))), np.diag(pos4),
          PSDT, repr="Diag(4)", diag=True),
    _case("identity", lambda dt, dev: Identity(4, dt, dev), np.eye(4), PSDT, repr="I",
          diag=True),
    _case("i_like", lambda dt, dev: I_like(Dense(t(M44, dt, dev))), np.eye(4), PSDT,
          repr="I", diag=True),
    _case("scalar_number", lambda dt, dev: 2.5 * Dense(t(M44, dt, dev)), 2.5 * M44,
          repr="2.5·Dense(4×4)", diag=True),
    _case("scalar_right_div", lambda dt, dev: Dense(t(M35, dt, dev)) * 3 / 4, 0.75 * M35,
          repr="0.75·Dense(3×5)"),
    _case("scalar_tensor", lambda dt, dev: t(-1.5, dt, dev) * Dense(t(M35, dt, dev)),
          -1.5 * M35, repr="Dense(3×5)"),
    _case("scalar_psd", lambda dt, dev: 3 * PSD(Dense(t(G4, dt, dev))), 3 * G4, PSDT,
          repr="3·Dense(4×4)", diag=True),
    _case("negation", lambda dt, dev: -Dense(t(M44, dt, dev)), -M44, repr="-Dense(4×4)",
          diag=True),
    _case("sum", lambda dt, dev: Dense(t(M44, dt, dev)) + Diagonal(t(d4, dt, dev)),
          M44 + np.diag(d4), repr="Dense(4×4) + Diag(4)", diag=True),
    _case("difference",
          lambda dt, dev: Dense(t(M35, dt, dev)) - 2 * Dense(t(N35, dt, dev)),
          M35 - 2 * N35, repr="Dense(3×5) - 2·Dense(3×5)"),
    _case("sum_psd",
          lambda dt, dev: PSD(Dense(t(G4, dt, dev))) + LowRank(t(U42, dt, dev))
          + Identity(4, dt, dev),
          G4 + U42 @ U42.T + np.eye(4), PSDT, repr="Dense(4×4) + U Uᵀ + I", diag=True),
    _case("sum_self_adjoint",
          lambda dt, dev: Diagonal(t(d4, dt, dev)) - 0.5 * PSD(Dense(t(G4, dt, dev))),
          np.diag(d4) - 0.5 * G4, SAT, repr="Diag(4) - 0.5·Dense(4×4)", diag=True),
    _case("product", lambda dt, dev: Dense(t(M35, dt, dev)) @ Dense(t(N54, dt, dev)),
          M35 @ N54, repr="Dense(3×5) Dense(5×4)"),
    _case("product_square",
          lambda dt, dev: Dense(t(M44, dt, dev)) @ Diagonal(t(d4, dt, dev)),
          M44 @ np.diag(d4), repr="Dense(4×4) Diag(4)"),
    _case("gram", lambda dt, dev: (B := Dense(t(M35, dt, dev))).T @ B,
          M35.T @ M35, PSDT, repr="Dense(3×5)ᵀ Dense(3×5)"),
    _case("symmetric_square", lambda dt, dev: (S := Diagonal(t(d4, dt, dev))) @ S,
          np.diag(d4) @ np.diag(d4), PSDT, repr="Diag(4) Diag(4)"),
    _case("transpose", lambda dt, dev: Dense(t(M35, dt, dev)).T, M35.T, repr="Dense(3×5)ᵀ"),
    _case("transpose_class", lambda dt, dev: Transpose(Dense(t(M44, dt, dev))), M44.T,
          repr="Dense(4×4)ᵀ", diag=True),
    _case("kronecker_2", lambda dt, dev: Kronecker(t(M22, dt, dev), t(M33, dt, dev)),
          np.kron(M22, M33), repr="Dense(2×2) ⊗ Dense(3×3)", diag=True),
    _case("kronecker_3",
          lambda dt, dev: Kronecker(Dense(t(M22, dt, dev)), Diagonal(t(d3, dt, dev)),
                                    Dense(t(M22.T, dt, dev))),
          np.kron(np.kron(M22, np.diag(d3)), M22.T), repr="Dense(2×2) ⊗ Diag(3) ⊗ Dense(2×2)",
          diag=True),
    _case("kronecker_rect", lambda dt, dev: Kronecker(t(M23, dt, dev), t(M34, dt, dev)),
          np.kron(M23, M34), repr="Dense(2×3) ⊗ Dense(3×4)"),
    _case("kronecker_rect_square",
          lambda dt, dev: Kronecker(Dense(t(M23, dt, dev)), Dense(t(M32, dt, dev))),
          np.kron(M23, M32), repr="Dense(2×3) ⊗ Dense(3×2)"),
    _case("kronecker_eigen",
          lambda dt, dev: KroneckerEigen.from_factors([t(G2, dt, dev), t(G3, dt, dev)], 0.5),
          np.kron(G2, G3) + 0.5 * np.eye(6), PSDT, repr="Q Λ Qᵀ", diag=True),
    _case("kronecker_operators",
          lambda dt, dev: Kronecker(PSD(Dense(t(G2, dt, dev))), Identity(3, dt, dev),
                                    LowRank(t(U42, dt, dev))),
          np.kron(np.kron(G2, np.eye(3)), U42 @ U42.T), PSDT, repr="Dense(2×2) ⊗ I ⊗ U Uᵀ",
          diag=True),
    _case("blockdiag",
          lambda dt, dev: BlockDiag(Dense(t(M22, dt, dev)), Diagonal(t(d3, dt, dev)),
                                    Identity(1, dt, dev)),
          scipy.linalg.block_diag(M22, np.diag(d3), np.eye(1)),
          repr="BlockDiag(Dense(2×2), Diag(3), I)", diag=True),
    _case("blockdiag_rect", lambda dt, dev: BlockDiag([t(M23, dt, dev), t(M31, dt, dev)]),
          scipy.linalg.block_diag(M23, M31), repr="BlockDiag(Dense(2×3), Dense(3×1))"),
    _case("blockdiag_psd",
          lambda dt, dev: BlockDiag(PSD(Dense(t(G3, dt, dev))), LowRank(t(U42, dt, dev))),
          scipy.linalg.block_diag(G3, U42 @ U42.T), PSDT,
          repr="BlockDiag(Dense(3×3), U Uᵀ)", diag=True),
    _case("lowrank_U", lambda dt, dev: LowRank(t(U52, dt, dev)), U52 @ U52.T, PSDT,
          repr="U Uᵀ", diag=True),
    _case("lowrank_UC", lambda dt, dev: LowRank(t(U52, dt, dev), t(C22, dt, dev)),
          U52 @ C22 @ U52.T, repr="U C Uᵀ", diag=True),
    _case("lowrank_UV", lambda dt, dev: LowRank(t(U52, dt, dev), V=t(U42, dt, dev)),
          U52 @ U42.T, repr="U Vᵀ"),
    _case("lowrank_UCV",
          lambda dt, dev: LowRank(t(U52, dt, dev), t(C22, dt, dev), t(U42, dt, dev)),
          U52 @ C22 @ U42.T, repr="U C Vᵀ"),
    _case("permutation", lambda dt, dev: Permutation(torch.as_tensor(PERM).to(dev), dt),
          P_DENSE, repr="P", diag=True),
    _case("permuted_kronecker",
          lambda dt, dev: Permuted(
              Kronecker(PSD(Dense(t(G2, dt, dev))), PSD(Dense(t(G3, dt, dev)))),
              torch.as_tensor(PERM6).to(dev)),
          P6.T @ np.kron(G2, G3) @ P6, PSDT, repr="Pᵀ (Dense(2×2) ⊗ Dense(3×3)) P", diag=True),
    _case("permuted_dense",
          lambda dt, dev: Permuted(t(np.kron(M22, M33), dt, dev), torch.as_tensor(PERM6).to(dev)),
          P6.T @ np.kron(M22, M33) @ P6, repr="Pᵀ (Dense(6×6)) P", diag=True),
    _case("triangular_lower", lambda dt, dev: Triangular(t(T44, dt, dev), lower=True),
          np.tril(T44), repr="L(4×4)", diag=True),
    _case("triangular_upper", lambda dt, dev: Triangular(t(T44, dt, dev), lower=False),
          np.triu(T44), repr="U(4×4)", diag=True),
    _case("sparse_from_scipy",
          lambda dt, dev: from_scipy(scipy.sparse.csr_matrix(np.triu(M35)), dt, dev),
          np.triu(M35), repr="Sparse(3×5, nnz=12)"),
    _case("scipy_operator",
          lambda dt, dev: from_scipy(scipy.sparse.linalg.aslinearoperator(M35), dt, dev),
          M35, repr="scipy(3×5)"),
    _case("jacobian", lambda dt, dev: Jacobian(_tanh_layer, t(x4, dt, dev)), J_REF, repr="J"),
    _case("hessian", lambda dt, dev: Hessian(_quadratic_plus_sin, t(x4, dt, dev)),
          S44 - np.diag(np.sin(x4)), SAT, repr="H"),
    _case("ggn", lambda dt, dev: GGN(_tanh_layer, lambda z: (z**4).sum() / 4, t(x4, dt, dev)),
          J_REF.T @ np.diag(3 * _z**2) @ J_REF, PSDT, repr="G"),
    _case("fim", lambda dt, dev: FIM(_logits, t(x4, dt, dev)),
          W34.T @ (np.diag(_p) - np.outer(_p, _p)) @ W34, PSDT, repr="F"),
    _case("ggn_like",
          lambda dt, dev: (J := Dense(t(M35, dt, dev))).T @ PSD(Dense(t(G3, dt, dev))) @ J
          + 0.1 * I_like(J.T @ J),
          M35.T @ G3 @ M35 + 0.1 * np.eye(5), PSDT,
          repr="Dense(3×5)ᵀ Dense(3×3) Dense(3×5) + 0.1·I"),
    _case("kronecker_congruence",
          lambda dt, dev: (B := Kronecker(t(M22, dt, dev), t(M23, dt, dev))).T
          @ Kronecker(PSD(Dense(t(G2, dt, dev))), PSD(Dense(t(G2, dt, dev)))) @ B,
          np.kron(M22, M23).T @ np.kron(G2, G2) @ np.kron(M22, M23), PSDT,
          repr="(Dense(2×2)ᵀ ⊗ Dense(2×3)ᵀ)"),
    _case("nested_mixed",
          lambda dt, dev: (Dense(t(M44, dt, dev)) + 2 * Diagonal(t(d4, dt, dev))).T
          @ Triangular(t(T44, dt, dev)) - Kronecker(t(M22, dt, dev), t(M22.T, dt, dev)) / 2,
          (M44 + 2 * np.diag(d4)).T @ np.tril(T44) - np.kron(M22, M22.T) / 2,
          repr="(Dense(4×4)ᵀ + 2·Diag(4)) L(4×4) - 0.5·(Dense(2×2) ⊗ Dense(2×2))"),
    _case("permuted_blocks",
          lambda dt, dev: (P := Permutation(torch.as_tensor(PERM).to(dev), dt)).T
          @ BlockDiag(LowRank(t(U42[:2], dt, dev)), PSD(Dense(t(G3, dt, dev)))) @ P,
          P_DENSE.T @ scipy.linalg.block_diag(U42[:2] @ U42[:2].T, G3) @ P_DENSE, PSDT,
          repr="Pᵀ BlockDiag(U Uᵀ, Dense(3×3)) P"),
]


# ------------------------------------------------------------------ comparison helpers
def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for comparing a result in ``dtype`` with a float64 reference of size ~1."""
    return (1e-4, 1e-5) if dtype == torch.float32 else (1e-10, 1e-12)


def assert_close(actual: torch.Tensor, expected, dtype: torch.dtype) -> None:
    """``actual`` (any device) equals the float64 ``expected`` (numpy or torch) to ``dtype``
    precision, with an absolute tolerance scaled by the size of ``expected``."""
    if isinstance(expected, torch.Tensor):
        exp = expected.detach().to(device="cpu", dtype=torch.float64)
    else:
        exp = torch.tensor(np.array(expected, dtype=np.float64))
    act = actual.detach().to(torch.float64).cpu()
    assert act.shape == exp.shape, f"shape {tuple(act.shape)} != expected {tuple(exp.shape)}"
    rtol, atol = tolerances(dtype)
    scale = max(1.0, float(exp.abs().max())) if exp.numel() else 1.0
    torch.testing.assert_close(act, exp, rtol=rtol, atol=atol * scale)


def walk(A: linops.LinearOperator):
    """Every operator in the expression tree of A (A included)."""
    yield A
    for child in A._children():
        yield from walk(child)
