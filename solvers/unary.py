"""Matrix functions f(A): ``apply_unary``, ``sqrt``, ``isqrt``, ``exp``, ``log``, ``pow``.

f(A) = V f(Λ) Vᴴ for a self-adjoint A = V Λ Vᴴ. Structure first (Diagonal: f(dᵢ);
Identity and c·I: f(c)·I; BlockDiag: block-wise; B + c·I: λ ↦ f(λ + c) applied to B;
Kronecker: factor-wise for powers, log(A⊗B) = log A ⊗ I + I ⊗ log B); dense eigh below
``Auto.dense_threshold``; above it a lazy operator whose product f(A) b runs Lanczos on b:
f(A) b ≈ ‖b‖ Q f(T) e₁.
"""

from __future__ import annotations

import numbers

import torch

from linops import (
    BlockDiag,
    Dense,
    Diagonal,
    Identity,
    Kronecker,
    LinearOperator,
    ScalarMul,
    Sum,
    dispatch,
    is_psd,
    is_self_adjoint,
)

from ._common import check_alg, check_operator
from .auto import Auto

__all__ = ["apply_unary", "sqrt", "isqrt", "exp", "log", "pow", "unary_rule", "Power"]


class Power:
    """λ ↦ λᵖ as a function object (lets Kronecker rules apply it factor-wise)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, x):
        return x**self.p

    def __repr__(self):
        return f"Power({self.p})"


class _Log:
    def __call__(self, x):
        return torch.log(x)


def apply_unary(f, A: LinearOperator, alg=None) -> LinearOperator:
    """f(A) for a self-adjoint A and a function f acting elementwise on a tensor of
    eigenvalues (e.g. ``torch.exp``). Returns an operator. The Lanczos fallback runs
    min(``alg.max_iters`` or 50, n) steps per column (fully reorthogonalized); its error
    falls with the steps as the best polynomial approximation of f on A's spectrum."""
    if not callable(f):
        raise TypeError("apply_unary(f, A): f must be a callable acting on a tensor.")
    A = check_operator(A, "apply_unary")
    return unary_rule(f, A, check_alg(alg, "apply_unary"))


def sqrt(A, alg=None):
    """A^{1/2} of a PSD operator."""
    return apply_unary(Power(0.5), A, alg)


def isqrt(A, alg=None):
    """A^{-1/2} of a positive definite operator."""
    return apply_unary(Power(-0.5), A, alg)


def pow(A, p: float, alg=None):
    """Aᵖ (p real; for non-integer p, A must be PSD)."""
    if not isinstance(p, numbers.Real):
        raise TypeError(f"pow: p must be a real number, got {type(p).__name__}.")
    return apply_unary(Power(float(p)), A, alg)


def exp(A, alg=None):
    """exp(A) of a self-adjoint operator."""
    return apply_unary(torch.exp, A, alg)


def log(A, alg=None):
    """log(A) of a positive definite operator."""
    return apply_unary(_Log(), A, alg)


def _scalar_f(f, c, like):
    return f(torch.as_tensor(c, dtype=like.dtype, device=like.device))


@dispatch
def unary_rule(f: object, A: LinearOperator, alg: object) -> LinearOperator:
    """Generic f(A): dense eigh below the threshold, Lanczos products above."""
    from .dense_algs import Dense as DenseAlg
    from .dense_algs import Eigh
    from .lanczos import Lanczos

    if isinstance(alg, Auto):
        alg = alg.select(A, "function")
    if isinstance(alg, (Eigh, DenseAlg)):
        if not is_self_adjoint(A):
            raise ValueError("apply_unary needs a self-adjoint operator (tag it with "
                             "linops.SelfAdjoint or linops.PSD if it is).")
        vals, vecs = torch.linalg.eigh(A.to_dense())
        out = Dense((vecs * f(vals)[None, :]) @ vecs.mH)
        return _tag_like(out, A)
    if isinstance(alg, Lanczos):
        if not is_self_adjoint(A):
            raise ValueError("Lanczos matrix functions need a self-adjoint operator.")
        return _tag_like(_LanczosFunction(f, A, alg), A)
    raise TypeError(f"apply_unary cannot run {type(alg).__name__}: use Auto, Eigh, Dense or "
                    "Lanczos.")


def _tag_like(out, A):
    # f(A) of a self-adjoint A is self-adjoint (for real f)
    out._tags = frozenset({"self_adjoint"})
    return out


@dispatch
def unary_rule(f: object, A: Diagonal, alg: object) -> LinearOperator:  # noqa: F811
    return Diagonal(f(A.d))


@dispatch
def unary_rule(f: object, A: Identity, alg: object) -> LinearOperator:  # noqa: F811
    return ScalarMul(_scalar_f(f, 1.0, A).item(), A)


@dispatch
def unary_rule(f: object, A: ScalarMul, alg: object) -> LinearOperator:  # noqa: F811
    if isinstance(A.op, Identity):
        return ScalarMul(_scalar_f(f, A.c, A).item(), A.op)
    if isinstance(A.op, Diagonal):
        return Diagonal(f(A.c * A.op.d))
    return unary_rule.invoke(object, LinearOperator, object)(f, A, alg)


@dispatch
def unary_rule(f: object, A: BlockDiag, alg: object) -> LinearOperator:  # noqa: F811
    if not all(b.is_square() for b in A.blocks):
        raise ValueError("apply_unary needs square blocks.")
    return BlockDiag(*(unary_rule(f, b, alg) for b in A.blocks))


@dispatch
def unary_rule(f: object, A: Sum, alg: object) -> LinearOperator:  # noqa: F811
    from .eigen import _split_shift

    shift, rest = _split_shift(A)
    if shift is None:
        return unary_rule.invoke(object, LinearOperator, object)(f, A, alg)
    if isinstance(rest, (Diagonal, Identity)) or (
        isinstance(rest, ScalarMul) and isinstance(rest.op, (Diagonal, Identity))
    ):
        return unary_rule(lambda x: f(x + shift), rest, alg)
    return unary_rule.invoke(object, LinearOperator, object)(f, A, alg)


@dispatch
def unary_rule(f: Power, A: Kronecker, alg: object) -> LinearOperator:  # noqa: F811
    if not all(fa.is_square() for fa in A.factors):
        raise ValueError("A power of a Kronecker product needs square factors.")
    if f.p != int(f.p) and not all(is_psd(fa) for fa in A.factors):
        raise ValueError("A fractional power of a Kronecker product is taken factor-wise "
                         "only for PSD factors: tag them with linops.PSD.")
    return Kronecker(*(unary_rule(f, fa, alg) for fa in A.factors))


@dispatch
def unary_rule(f: _Log, A: Kronecker, alg: object) -> LinearOperator:  # noqa: F811
    # log(A₁ ⊗ … ⊗ A_d) = Σᵢ I ⊗ … ⊗ log Aᵢ ⊗ … ⊗ I for positive definite factors
    if not all(is_psd(fa) for fa in A.factors):
        return unary_rule.invoke(object, LinearOperator, object)(f, A, alg)
    terms = []
    for i, fa in enumerate(A.factors):
        parts = [Identity(g.shape[0], g.dtype, g.device) for g in A.factors]
        parts[i] = unary_rule(f, fa, alg)
        terms.append(Kronecker(*parts))
    return Sum(*terms)


class _LanczosFunction(LinearOperator):
    """f(A) b ≈ ‖b‖ Q f(T) e₁ from a Lanczos run on each column b."""

    def __init__(self, f, A, alg):
        super().__init__(A.dtype, A.shape, A.device)
        self.f, self.A, self.alg = f, A, alg

    def _children(self):
        return (self.A,)

    def _repr(self):
        return f"f({self.A._repr()})"

    def _matmat(self, X):
        from .lanczos import lanczos_tridiag

        steps = min(self.alg.max_iters or 50, self.shape[0])
        cols = []
        for j in range(X.shape[1]):
            b = X[:, j]
            nb = torch.linalg.vector_norm(b)
            if bool(nb == 0):
                cols.append(torch.zeros_like(b))
                continue
            alphas, betas, Q = lanczos_tridiag(self.A._matmat, b / nb, steps, reorth=True)
            m = alphas.shape[0]
            T = torch.diag(alphas.double())
            if m > 1:
                bb = betas[: m - 1].double()
                T = T + torch.diag(bb, 1) + torch.diag(bb, -1)
            theta, S = torch.linalg.eigh(T)
            coeff = S @ (self.f(theta) * S[0])
            cols.append(nb * (Q[:, :m] @ coeff.to(Q.dtype).to(Q.device)))
        return torch.stack(cols, dim=1)
