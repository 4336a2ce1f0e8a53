"""Properties (tags) and every rule that propagates them, in one place.

A tag is a promise: ``PSD(A)`` tells the library that xᴴ A x ≥ 0 for all x and
``SelfAdjoint(A)`` that A = Aᴴ. Neither is checked (checking would cost a dense
eigendecomposition); algorithms rely on them (CG on a PSD operator, Lanczos on a
self-adjoint one), so a false promise gives wrong answers.

Rules (each is a dispatched method below, so a user can register one for their type):

====================  ===========================================  ==========================
operator              self-adjoint when                            PSD when
====================  ===========================================  ==========================
A₁ + … + A_k          every term is                                every term is
c · A                 A is and c is real                           A is and c > 0 (a number;
                                                                   a tensor's sign is unknown)
B₁ … B_k              it reads Bᴴ A B (mirrored factors) with       same, with A PSD
                      A self-adjoint (or Bᴴ B)
A₁ ⊗ … ⊗ A_k          every factor is                              every factor is
BlockDiag(A₁, …)      every block is                               every block is
Aᵀ                    A is                                         A is
Pᵀ A P (Permuted)     A is                                         A is
Identity              always                                       always
Diagonal (real)       always                                       when tagged
====================  ===========================================  ==========================
"""

from __future__ import annotations

import copy
import numbers

from ._dispatch import dispatch
from .algebra import Product, ScalarMul, Sum, Transpose
from .blockdiag import BlockDiag
from .kronecker import Kronecker
from .operator import LinearOperator
from .permutation import Permuted

__all__ = ["PSD", "SelfAdjoint", "is_psd", "is_self_adjoint", "psd_rule", "self_adjoint_rule"]


def _tagged(A: LinearOperator, tags: set[str], what: str) -> LinearOperator:
    if not isinstance(A, LinearOperator):
        raise TypeError(f"{what} annotates a LinearOperator, got {type(A).__name__}.")
    if not A.is_square():
        raise ValueError(f"{what}(A) needs a square operator; A has shape {A.shape}.")
    out = copy.copy(A)
    out._tags = A.tags | frozenset(tags)
    return out


def SelfAdjoint(A: LinearOperator) -> LinearOperator:
    """A copy of A tagged self-adjoint (A = Aᴴ). The promise is the caller's, unchecked."""
    return _tagged(A, {"self_adjoint"}, "SelfAdjoint")


def PSD(A: LinearOperator) -> LinearOperator:
    """A copy of A tagged positive semi-definite (and self-adjoint).

    The promise is the caller's and is not checked: CG and Lanczos-based functions rely
    on it. Example: ``G = PSD(J.T @ H @ J + 1e-3 * I_like(...))``.
    """
    return _tagged(A, {"self_adjoint", "psd"}, "PSD")


def is_psd(A: LinearOperator) -> bool:
    """True if A was tagged PSD or its structure makes it PSD (see the module's table)."""
    if "psd" in A.tags:
        return True
    return bool(psd_rule(A))


def is_self_adjoint(A: LinearOperator) -> bool:
    """True if A was tagged self-adjoint or PSD, or its structure makes it self-adjoint."""
    if "self_adjoint" in A.tags or "psd" in A.tags:
        return True
    return bool(self_adjoint_rule(A)) or bool(psd_rule(A))


# ------------------------------------------------------------------ PSD rules
@dispatch
def psd_rule(A: LinearOperator) -> bool:
    """Structural PSD rule; the default is: not known to be PSD."""
    return False


@dispatch
def psd_rule(A: Sum) -> bool:  # noqa: F811
    return all(is_psd(t) for t in A.terms)


@dispatch
def psd_rule(A: ScalarMul) -> bool:  # noqa: F811
    return _positive_number(A.c) and is_psd(A.op)


@dispatch
def psd_rule(A: Product) -> bool:  # noqa: F811
    return _congruence(A.factors, is_psd)


@dispatch
def psd_rule(A: Kronecker) -> bool:  # noqa: F811
    return all(is_psd(f) for f in A.factors)


@dispatch
def psd_rule(A: BlockDiag) -> bool:  # noqa: F811
    return all(is_psd(b) for b in A.blocks)


@dispatch
def psd_rule(A: Transpose) -> bool:  # noqa: F811
    return is_psd(A.op)


@dispatch
def psd_rule(A: Permuted) -> bool:  # noqa: F811
    return is_psd(A.op)


# ------------------------------------------------------------------ self-adjoint rules
@dispatch
def self_adjoint_rule(A: LinearOperator) -> bool:
    """Structural self-adjointness rule; the default is: not known to be self-adjoint."""
    return False


@dispatch
def self_adjoint_rule(A: Sum) -> bool:  # noqa: F811
    return all(is_self_adjoint(t) for t in A.terms)


@dispatch
def self_adjoint_rule(A: ScalarMul) -> bool:  # noqa: F811
    c = A.c
    real = not (isinstance(c, complex) or (hasattr(c, "is_complex") and c.is_complex()))
    return real and is_self_adjoint(A.op)


@dispatch
def self_adjoint_rule(A: Product) -> bool:  # noqa: F811
    return _congruence(A.factors, is_self_adjoint)


@dispatch
def self_adjoint_rule(A: Kronecker) -> bool:  # noqa: F811
    return all(is_self_adjoint(f) for f in A.factors)


@dispatch
def self_adjoint_rule(A: BlockDiag) -> bool:  # noqa: F811
    return all(b.is_square() and is_self_adjoint(b) for b in A.blocks)


@dispatch
def self_adjoint_rule(A: Transpose) -> bool:  # noqa: F811
    return is_self_adjoint(A.op)


@dispatch
def self_adjoint_rule(A: Permuted) -> bool:  # noqa: F811
    return is_self_adjoint(A.op)


# ------------------------------------------------------------------ helpers
def _positive_number(c) -> bool:
    return isinstance(c, numbers.Real) and not isinstance(c, bool) and c > 0


def _congruence(factors, middle_ok) -> bool:
    """True if B₁ … B_k reads Bᴴ M B with ``middle_ok(M)`` (or Bᴴ B for even k)."""
    k = len(factors)
    for i in range(k // 2):
        if not _mirror(factors[i], factors[k - 1 - i]):
            return False
    return middle_ok(factors[k // 2]) if k % 2 else True


def _mirror(P: LinearOperator, Q: LinearOperator) -> bool:
    """True if P = Qᴴ by structure (same objects, transposed)."""
    if P.shape != (Q.shape[1], Q.shape[0]):
        return False
    real = not P.dtype.is_complex
    if isinstance(P, Transpose) and P.op is Q and (P.conj or real):
        return True
    if isinstance(Q, Transpose) and Q.op is P and (Q.conj or real):
        return True
    if real and (getattr(P, "_transpose_of", None) is Q
                 or getattr(Q, "_transpose_of", None) is P):
        return True
    if P is Q:
        return is_self_adjoint(P)
    if isinstance(P, Kronecker) and isinstance(Q, Kronecker):
        return len(P.factors) == len(Q.factors) and all(
            _mirror(a, b) for a, b in zip(P.factors, Q.factors)
        )
    if isinstance(P, BlockDiag) and isinstance(Q, BlockDiag):
        return len(P.blocks) == len(Q.blocks) and all(
            _mirror(a, b) for a, b in zip(P.blocks, Q.blocks)
        )
    return False
