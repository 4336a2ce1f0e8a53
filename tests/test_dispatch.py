"""Dispatch: linops has one private plum Dispatcher that cannot clash with plum's global
``dispatch``, and users extend it with rules for their own operator types."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import plum
import pytest
import torch

import linops
from linops import (
    PSD,
    BlockDiag,
    Dense,
    I_like,
    Identity,
    Kronecker,
    LinearOperator,
    is_psd,
    is_self_adjoint,
)

F64 = torch.float64
REPO = Path(linops.__file__).resolve().parents[1]


# ------------------------------------------------------------------ a private dispatcher
def test_the_dispatcher_is_private():
    assert isinstance(linops.dispatch, plum.Dispatcher)
    assert linops.dispatch is not plum.dispatch
    from linops._dispatch import dispatch

    assert dispatch is linops.dispatch


def _library_generics():
    return {name: f for name, f in vars(linops).items() if isinstance(f, plum.Function)}


def test_every_generic_is_registered_on_the_private_dispatcher():
    generics = _library_generics()
    assert {"psd_rule", "self_adjoint_rule"} <= set(generics)
    for name, f in generics.items():
        assert linops.dispatch.functions.get(name) is f, name
        assert plum.dispatch.functions.get(name) is not f, name


def test_global_dispatch_functions_of_the_same_name_do_not_clash():
    """A package using plum's global ``dispatch``, imported before and after linops,
    registers functions named like linops' generics with conflicting signatures; both
    keep working. Runs in a fresh interpreter so import order is real."""
    script = textwrap.dedent(
        """
        from plum import dispatch

        @dispatch
        def psd_rule(x: int) -> str:
            return "theirs-int"

        @dispatch
        def self_adjoint_rule(x: object) -> str:
            return "theirs-object"

        import torch
        import linops

        @dispatch
        def psd_rule(x: linops.LinearOperator) -> str:
            return "theirs-operator"

        @dispatch
        def is_psd(x: linops.Dense) -> str:
            return "theirs-is_psd"

        G = linops.PSD(linops.Dense(torch.eye(2)))
        D = linops.Dense(torch.ones(2, 2))
        B = linops.Dense(torch.randn(3, 2))
        assert linops.is_psd(G) and linops.is_self_adjoint(G)
        assert not linops.is_psd(D) and not linops.is_self_adjoint(D)
        assert linops.psd_rule(D) is False and linops.self_adjoint_rule(D) is False
        assert linops.is_psd(B @ G @ B.T) and linops.is_psd(G + linops.I_like(G))
        assert psd_rule(1) == "theirs-int"
        assert psd_rule(D) == "theirs-operator"
        assert self_adjoint_rule("anything") == "theirs-object"
        assert is_psd(D) == "theirs-is_psd"
        assert psd_rule is not linops.psd_rule
        print("no clash")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "no clash" in out.stdout


def test_global_dispatch_registration_in_process_does_not_leak():
    """The same in this process: plum's global dispatcher gets its own function."""

    @plum.dispatch
    def self_adjoint_rule(x: Dense) -> str:  # a third party's function of the same name
        return "theirs"

    D = Dense(torch.ones(2, 2))
    assert self_adjoint_rule(D) == "theirs"
    assert linops.self_adjoint_rule(D) is False
    assert not is_self_adjoint(D)
    assert self_adjoint_rule is not linops.self_adjoint_rule


# ------------------------------------------------------------------ user extensions
class _UserMatrix(LinearOperator):
    """A user's square operator that implements only ``_matmat``."""

    def __init__(self, M: torch.Tensor):
        super().__init__(M.dtype, M.shape, M.device)
        self.M = M

    def _matmat(self, X):
        return self.M @ X


class UserPSD(_UserMatrix):
    """PSD by a rule registered below."""

    symbol = "K"


@linops.dispatch
def psd_rule(A: UserPSD) -> bool:
    return True


class UserSymmetric(_UserMatrix):
    """Self-adjoint by a rule registered below."""

    symbol = "S"


@linops.dispatch
def self_adjoint_rule(A: UserSymmetric) -> bool:
    return True


class UserRect(LinearOperator):
    """A user's rectangular operator with ``_matmat`` and ``_rmatmat`` (no other hooks)."""

    symbol = "R"

    def __init__(self, M: torch.Tensor):
        super().__init__(M.dtype, M.shape, M.device)
        self.M = M

    def _matmat(self, X):
        return self.M @ X

    def _rmatmat(self, Y):
        return self.M.mT @ Y


def _spd(n):
    B = torch.randn(n, n, dtype=F64)
    return B @ B.T + torch.eye(n, dtype=F64)


def test_user_rule_is_used_by_is_psd():
    M = _spd(3)
    K = UserPSD(M)
    assert is_psd(K)
    B = Dense(torch.randn(3, 4, dtype=F64))
    assert is_psd(B.T @ K @ B)
    assert is_psd(K + I_like(K)) and is_psd(2 * K)
    assert is_psd(Kronecker(K, K)) and is_psd(BlockDiag(K, Identity(2, F64)))
    assert not is_psd(-K)
    assert not is_psd(Dense(M))  # the rule is for the user's type only


def test_a_user_psd_operator_is_self_adjoint():
    """PSD implies self-adjoint, also when PSD comes from a user's structural rule."""
    K = UserPSD(_spd(3))
    assert is_self_adjoint(K)
    B = Dense(torch.randn(3, 4, dtype=F64))
    assert is_self_adjoint(B.T @ K @ B)


def test_a_user_psd_operator_works_from_the_left_and_transposed():
    M = _spd(3)
    K = UserPSD(M)
    x = torch.randn(3, dtype=F64)
    torch.testing.assert_close(x @ K, x @ M)
    torch.testing.assert_close(K.T @ x, M.T @ x)
    B = Dense(torch.randn(3, 4, dtype=F64))
    G = B.T @ K @ B
    torch.testing.assert_close(G.T.to_dense(), (B.M.T @ M @ B.M).T)


def test_user_self_adjoint_rule():
    M = _spd(3)
    S = UserSymmetric(M)
    assert is_self_adjoint(S) and not is_psd(S)
    assert S.T is S
    x = torch.randn(2, 3, dtype=F64)
    torch.testing.assert_close(x @ S, x @ M)
    assert is_self_adjoint(S + PSD(Dense(M)))


def test_user_operator_in_every_algebra_operation():
    """Only ``_matmat``/``_rmatmat`` given: the base class supplies the rest."""
    g = torch.Generator().manual_seed(3)
    m = torch.randn(3, 4, generator=g, dtype=F64)
    q = torch.randn(3, 4, generator=g, dtype=F64)
    R, Q = UserRect(m), Dense(q)
    exprs = {
        "R": (R, m),
        "R.T": (R.T, m.T),
        "R.H": (R.H, m.T),
        "R + Q": (R + Q, m + q),
        "R - Q": (R - Q, m - q),
        "-R": (-R, -m),
        "2R": (2 * R, 2 * m),
        "R*2": (R * 2, 2 * m),
        "R/4": (R / 4, m / 4),
        "R.T @ R": (R.T @ R, m.T @ m),
        "R @ Q.T": (R @ Q.T, m @ q.T),
        "kron": (Kronecker(R, Q), torch.kron(m, q)),
        "blockdiag": (BlockDiag(R, Q), torch.block_diag(m, q)),
        "PSD": (PSD(R @ R.T), m @ m.T),
        "shift": (R @ R.T + 0.5 * I_like(R @ R.T), m @ m.T + 0.5 * torch.eye(3, dtype=F64)),
    }
    for name, (A, D) in exprs.items():
        assert A.shape == tuple(D.shape), name
        torch.testing.assert_close(A.to_dense(), D, msg=name)
        x = torch.randn(D.shape[1], 2, dtype=F64)
        torch.testing.assert_close(A @ x, D @ x, msg=name)
        y = torch.randn(2, D.shape[0], dtype=F64)
        torch.testing.assert_close(y @ A, y @ D, msg=name)
        torch.testing.assert_close(A.T @ y.T, D.T @ y.T, msg=name)
        assert isinstance(repr(A), str) and repr(A), name
    assert is_psd(R.T @ R) and is_psd(R @ R.T)
    assert repr(R.T @ R) == "Rᵀ R"


def test_user_operator_defaults_fail_clearly():
    R = UserRect(torch.randn(3, 3, dtype=F64))
    with pytest.raises(NotImplementedError, match="diagonal"):
        R.diag()
    with pytest.raises(NotImplementedError, match="rebuild"):
        R.to(torch.float32)
    assert R.to(F64) is R  # no conversion needed

    class SubPSD(UserPSD):
        pass

    assert is_psd(SubPSD(_spd(3)))  # a subclass inherits the user's rule

    class Bare(LinearOperator):
        def _matmat(self, X):
            return X

    A = Bare(F64, (3, 3))
    with pytest.raises(NotImplementedError, match="_rmatmat"):
        torch.ones(3, dtype=F64) @ A
    with pytest.raises(NotImplementedError, match="SelfAdjoint"):
        A.T @ torch.ones(3, dtype=F64)
    x = torch.arange(3.0, dtype=F64)
    torch.testing.assert_close(x @ linops.SelfAdjoint(A), x)  # the fix the message gives
