"""Properties (PSD, self-adjoint tags) and the propagation table of linops/properties.py.

Every row builds an operator and its dense float64 matrix; the rules must report the
expected properties, and whatever they claim must be true of the dense matrix (so a wrong
rule fails even if the expectation in the row were wrong too)."""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conformance import CASES, assert_close

import linops
from linops import (
    PSD,
    BlockDiag,
    Dense,
    Diagonal,
    I_like,
    Identity,
    Kronecker,
    LowRank,
    Permutation,
    SelfAdjoint,
    Transpose,
    Triangular,
    is_psd,
    is_self_adjoint,
)

F64 = torch.float64
_g = torch.Generator().manual_seed(7)


def _randn(*shape):
    return torch.randn(*shape, generator=_g, dtype=F64)


def _spd(n):
    B = _randn(n, n)
    return B @ B.T / n + 0.5 * torch.eye(n, dtype=F64)


G4, H4, G3, G2 = _spd(4), _spd(4), _spd(3), _spd(2)
B44, B34, B22, B23, C44 = _randn(4, 4), _randn(3, 4), _randn(2, 2), _randn(2, 3), _randn(4, 4)
S44 = B44 + B44.T  # symmetric, indefinite
E4 = torch.eye(4, dtype=F64)
d4 = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)  # indefinite diagonal


@dataclass(frozen=True)
class Row:
    id: str
    build: Callable[[], tuple[linops.LinearOperator, torch.Tensor]]
    psd: bool
    self_adjoint: bool
    #: the dense matrix is really not PSD (so "not PSD" is not just the rules being cautious)
    truly_not_psd: bool = False


def _G():
    return PSD(Dense(G4.clone()))


ROWS = [
    # sums
    Row("sum_of_psd", lambda: (_G() + PSD(Dense(H4)), G4 + H4), True, True),
    Row("psd_plus_shift", lambda: (_G() + 0.1 * Identity(4, F64), G4 + 0.1 * E4),
        True, True),
    Row("psd_plus_lowrank", lambda: (_G() + LowRank(B34.T), G4 + B34.T @ B34), True, True),
    Row("psd_plus_general", lambda: (_G() + Dense(B44), G4 + B44), False, False),
    Row("psd_plus_symmetric", lambda: (_G() + Diagonal(d4), G4 + torch.diag(d4)), False, True),
    # scalars
    Row("positive_scalar", lambda: (2.5 * _G(), 2.5 * G4), True, True),
    Row("positive_int_scalar_right", lambda: (_G() * 3, 3 * G4), True, True),
    Row("positive_division", lambda: (_G() / 2, G4 / 2), True, True),
    Row("negative_scalar", lambda: (-3 * _G(), -3 * G4), False, True, truly_not_psd=True),
    Row("negative_division", lambda: (_G() / -2, G4 / -2), False, True, truly_not_psd=True),
    Row("negation", lambda: (-_G(), -G4), False, True, truly_not_psd=True),
    Row("double_negation", lambda: ((lambda N: -N)(-_G()), G4), True, True),
    Row("tensor_scalar", lambda: (torch.tensor(2.0, dtype=F64) * _G(), 2 * G4), False, True),
    Row("psd_minus_shift", lambda: (_G() - 10.0 * I_like(_G()), G4 - 10 * E4),
        False, True, truly_not_psd=True),
    Row("psd_minus_shift_lhs", lambda: (-10.0 * Identity(4, F64) + _G(), G4 - 10 * E4),
        False, True, truly_not_psd=True),
    # congruences Bᵀ A B
    Row("congruence_dense", lambda: (lambda B: (B.T @ PSD(Dense(G3)) @ B, B34.T @ G3 @ B34))(
        Dense(B34)), True, True),
    Row("congruence_kronecker",
        lambda: (lambda K: (K.T @ Kronecker(PSD(Dense(G2)), PSD(Dense(G2))) @ K,
                            torch.kron(B22, B23).T @ torch.kron(G2, G2) @ torch.kron(B22, B23)))(
            Kronecker(B22, B23)), True, True),
    Row("congruence_nested", lambda: (lambda B, C: (
        C.T @ (B.T @ PSD(Dense(G3)) @ B) @ C, C44.T @ B34.T @ G3 @ B34 @ C44))(
        Dense(B34), Dense(C44)), True, True),
    Row("congruence_scaled_middle", lambda: (lambda B: (
        B.T @ (2 * PSD(Dense(G3))) @ B, 2 * B34.T @ G3 @ B34))(Dense(B34)), True, True),
    Row("congruence_negative_middle", lambda: (lambda B: (
        B.T @ (-2 * PSD(Dense(G3))) @ B, -2 * B34.T @ G3 @ B34))(Dense(B34)), False, True,
        truly_not_psd=True),
    Row("congruence_hermitian_form", lambda: (lambda B: (
        B.H @ PSD(Dense(G3)) @ B, B34.T @ G3 @ B34))(Dense(B34)), True, True),
    Row("congruence_symmetric_middle", lambda: (lambda B: (
        B.T @ Diagonal(d4) @ B, B44.T @ torch.diag(d4) @ B44))(Dense(B44)), False, True,
        truly_not_psd=True),
    Row("congruence_general_middle", lambda: (lambda B: (
        B.T @ Dense(C44) @ B, B44.T @ C44 @ B44))(Dense(B44)), False, False),
    Row("congruence_permutation", lambda: (lambda P: (
        P.T @ _G() @ P, P.to_dense().T @ G4 @ P.to_dense()))(
        Permutation(torch.tensor([2, 0, 3, 1]), F64)), True, True),
    Row("gram_BtB", lambda: (lambda B: (B.T @ B, B34.T @ B34))(Dense(B34)), True, True),
    Row("gram_BBt", lambda: (lambda B: (B @ B.T, B34 @ B34.T))(Dense(B34)), True, True),
    Row("no_transpose_BAB", lambda: (lambda B: (B @ _G() @ B, B44 @ G4 @ B44))(Dense(B44)),
        False, False),
    Row("unrelated_BtAC", lambda: (Dense(B44).T @ _G() @ Dense(C44), B44.T @ G4 @ C44),
        False, False),
    Row("symmetric_BAB", lambda: (lambda S: (S @ _G() @ S, S44 @ G4 @ S44))(
        SelfAdjoint(Dense(S44))), True, True),
    Row("square_of_symmetric", lambda: (lambda S: (S @ S, S44 @ S44))(SelfAdjoint(Dense(S44))),
        True, True),
    Row("ggn_plus_damping", lambda: (lambda J: (
        J.T @ PSD(Dense(G3)) @ J + 1e-3 * I_like(J.T @ J),
        B34.T @ G3 @ B34 + 1e-3 * E4))(Dense(B34)), True, True),
    # congruences whose outer factor rebuilds itself when transposed
    Row("congruence_triangular", lambda: (lambda L: (
        L.T @ _G() @ L, torch.tril(B44).T @ G4 @ torch.tril(B44)))(Triangular(B44)), True, True),
    Row("gram_triangular", lambda: (lambda L: (L.T @ L, torch.tril(B44).T @ torch.tril(B44)))(
        Triangular(B44)), True, True),
    Row("congruence_lowrank", lambda: (lambda R, r: (R.T @ PSD(Dense(G3)) @ R, r.T @ G3 @ r))(
        LowRank(B34[:, :2], B22, B44[:, :2]), B34[:, :2] @ B22 @ B44[:, :2].T), True, True),
    Row("congruence_sum", lambda: (lambda S: (
        S.T @ _G() @ S, (B44 + C44).T @ G4 @ (B44 + C44)))(Dense(B44) + Dense(C44)), True,
        True),
    # Kronecker and BlockDiag
    Row("kronecker_psd", lambda: (Kronecker(PSD(Dense(G2)), PSD(Dense(G3))), torch.kron(G2, G3)),
        True, True),
    Row("kronecker_psd_identity_lowrank", lambda: (
        Kronecker(Identity(2, F64), LowRank(B23.T)),
        torch.kron(torch.eye(2, dtype=F64), B23.T @ B23)), True, True),
    Row("kronecker_symmetric", lambda: (
        Kronecker(PSD(Dense(G2)), Diagonal(d4)), torch.kron(G2, torch.diag(d4))), False, True,
        truly_not_psd=True),
    Row("kronecker_general", lambda: (Kronecker(PSD(Dense(G2)), Dense(B44)),
                                      torch.kron(G2, B44)), False, False),
    Row("blockdiag_psd", lambda: (BlockDiag(PSD(Dense(G2)), Identity(1, F64), PSD(Dense(G3))),
                                  torch.block_diag(G2, torch.eye(1, dtype=F64), G3)), True, True),
    Row("blockdiag_symmetric", lambda: (BlockDiag(PSD(Dense(G2)), Diagonal(d4)),
                                        torch.block_diag(G2, torch.diag(d4))), False, True,
        truly_not_psd=True),
    Row("blockdiag_general", lambda: (BlockDiag(PSD(Dense(G2)), Dense(B44)),
                                      torch.block_diag(G2, B44)), False, False),
    # transposes and leaves
    Row("transpose_of_psd", lambda: (Transpose(_G()), G4), True, True),
    Row("transpose_of_self_adjoint", lambda: (Transpose(SelfAdjoint(Dense(S44))), S44), False,
        True),
    Row("transpose_of_general", lambda: (Dense(B44).T, B44.T), False, False),
    Row("identity", lambda: (Identity(3, F64), torch.eye(3, dtype=F64)), True, True),
    Row("lowrank_UUt", lambda: (LowRank(B34.T), B34.T @ B34), True, True),
    Row("lowrank_UCUt", lambda: (LowRank(B34.T, G3), B34.T @ G3 @ B34), False, False),
    Row("diagonal_real", lambda: (Diagonal(d4), torch.diag(d4)), False, True),
    Row("diagonal_tagged", lambda: (PSD(Diagonal(d4.abs())), torch.diag(d4.abs())), True, True),
    Row("dense_untagged_spd", lambda: (Dense(G4), G4), False, False),
    Row("self_adjoint_tag", lambda: (SelfAdjoint(Dense(S44)), S44), False, True),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_propagation_table(row):
    A, D = row.build()
    assert_close(A.to_dense(), D, F64)
    assert is_psd(A) == row.psd, f"is_psd({A!r}) should be {row.psd}"
    assert is_self_adjoint(A) == row.self_adjoint, (
        f"is_self_adjoint({A!r}) should be {row.self_adjoint}"
    )


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_claimed_properties_hold_numerically(row):
    """What the rules claim must be true of the dense matrix: a wrong rule fails here."""
    A, D = row.build()
    if is_self_adjoint(A):
        torch.testing.assert_close(D, D.T)
    lam = torch.linalg.eigvalsh((D + D.T) / 2)
    if is_psd(A):
        assert lam.min() >= -1e-10 * max(1.0, float(lam.abs().max())), (A, lam)
    if row.truly_not_psd:
        assert lam.min() < -1e-3, "the row's matrix is PSD after all: fix the row"


def test_the_cola_bugs_are_not_copied():
    G = _G()
    assert not is_psd(-3 * G)
    assert not is_psd(G - 0.5 * I_like(G))
    assert not is_psd(G + (-0.5) * I_like(G))
    assert is_psd(G + 0.5 * I_like(G))


# ------------------------------------------------------------------ tagging
def test_tagging_returns_a_tagged_copy():
    A = Dense(G4)
    P = PSD(A)
    assert P is not A and type(P) is Dense
    assert not is_psd(A) and not is_self_adjoint(A)
    assert is_psd(P) and is_self_adjoint(P)
    assert "psd" in P.tags and "self_adjoint" in P.tags
    S = SelfAdjoint(A)
    assert is_self_adjoint(S) and not is_psd(S)
    x = _randn(4)
    torch.testing.assert_close(P @ x, A @ x)


def test_psd_implies_self_adjoint_and_keeps_existing_tags():
    S = SelfAdjoint(Dense(G4))
    P = PSD(S)
    assert is_psd(P) and is_self_adjoint(P)
    assert is_self_adjoint(S) and not is_psd(S)


SQUARE = [c for c in CASES if c.dense.shape[0] == c.dense.shape[1]]


@pytest.mark.parametrize("case", SQUARE, ids=[c.id for c in SQUARE])
@pytest.mark.parametrize("tag", [PSD, SelfAdjoint], ids=["PSD", "SelfAdjoint"])
def test_any_square_operator_can_be_tagged(case, tag):
    """PSD(A) and SelfAdjoint(A) work on every square operator of the harness."""
    A = case.build(F64, "cpu")
    T = tag(A)
    assert type(T) is type(A)
    assert is_self_adjoint(T)
    assert is_psd(T) == (tag is PSD or is_psd(A))
    x = _randn(A.shape[1], 2)
    assert_close(T @ x, case.dense @ x.numpy(), F64)
    assert is_psd(A) == ("psd" in case.tags)  # the original is untouched


@pytest.mark.parametrize("tag", [PSD, SelfAdjoint], ids=["PSD", "SelfAdjoint"])
def test_tagging_a_non_square_operator_raises(tag):
    with pytest.raises(ValueError, match=r"square.*\(3, 4\)"):
        tag(Dense(B34))
    with pytest.raises(ValueError, match="square"):
        tag(Kronecker(B22, B23))
    with pytest.raises(TypeError, match="LinearOperator"):
        tag(G4)


def test_transpose_keeps_the_properties_of_a_self_adjoint_operator():
    S = SelfAdjoint(Dense(S44))
    assert S.T is S and S.H is S
    assert is_self_adjoint(S.T)
    G = _G()
    assert G.T is G and is_psd(G.T)
    # pushed-down transposes keep them too
    assert is_psd((G + PSD(Dense(H4))).T)
    assert is_psd(Kronecker(PSD(Dense(G2)), PSD(Dense(G3))).T)
    assert is_psd(BlockDiag(PSD(Dense(G2)), PSD(Dense(G3))).T)
    assert is_self_adjoint((S + Diagonal(d4)).T)
    assert not is_self_adjoint(Dense(B44).T)


def test_properties_survive_conversion():
    J = Dense(B34)
    A = J.T @ PSD(Dense(G3)) @ J + 0.1 * I_like(J.T @ J)
    assert is_psd(A)
    assert is_psd(A.to(torch.float32))
    assert is_psd(PSD(Dense(G4)).to(torch.float32))


def test_psd_is_documented_as_an_unchecked_promise():
    for f in (PSD, SelfAdjoint):
        doc = inspect.getdoc(f).lower()
        assert "not checked" in doc or "unchecked" in doc, f.__name__
    module_doc = inspect.getdoc(linops.properties).lower()
    assert "promise" in module_doc


def test_rules_are_written_in_one_place():
    """Every built-in propagation rule lives in linops/properties.py."""
    for rule in (linops.psd_rule, linops.self_adjoint_rule):
        builtin = [
            m for m in rule.methods
            if all(getattr(t, "__module__", "").startswith("linops.") for t in m.signature.types)
        ]
        assert len(builtin) >= 6
        for m in builtin:
            assert m.implementation.__module__ == "linops.properties", m


def test_claims_are_sound_on_random_symmetric_data():
    """PSD(Aᵀ A)-style constructions on several seeds: the rule and the spectrum agree."""
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        B = Dense(torch.randn(3, 5, generator=g, dtype=F64))
        M = PSD(Dense(torch.eye(3, dtype=F64) * (seed + 1)))
        for A in (B.T @ M @ B, B @ B.T, 2 * (B.T @ B) + I_like(B.T @ B), -(B.T @ B)):
            D = A.to_dense()
            lam = np.linalg.eigvalsh(((D + D.T) / 2).numpy())
            if is_psd(A):
                assert lam.min() >= -1e-10 * max(1.0, abs(lam).max())
            else:
                assert lam.min() < 0
