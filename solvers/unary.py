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
    m = min(``alg.max_iters`` or 100, n) steps per column (fully reorthogonalized, columns
    batched) and reports non-convergence when the estimates after m and after
    m − max(2, m/5) steps differ by more than ``alg.tol`` (relative)."""
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
    return _finite(f(torch.as_tensor(c, dtype=like.dtype, device=like.device)), c)


def _finite(values: torch.Tensor, eigenvalues) -> torch.Tensor:
    """f of the eigenvalues, or a ValueError when some fall outside f's domain."""
    if not bool(torch.isfinite(values).all()):
        ev = torch.as_tensor(eigenvalues)
        raise ValueError(
            "f(A) is not finite: some eigenvalues of A lie outside the domain of f (the "
            f"smallest is {float(ev.real.min()):.3g}); sqrt needs A PSD, isqrt and log need A "
            "positive definite (add damping c·I_like(A)), and NaN/inf in A propagate."
        )
    return values


@dispatch
def unary_rule(f: object, A: LinearOperator, alg: object) -> LinearOperator:
    """Generic f(A): dense eigh below the threshold, Lanczos products above."""
    from .dense_algs import Dense as DenseAlg
    from .dense_algs import Eigh, check_dense_dtype
    from .lanczos import Lanczos

    if isinstance(alg, Auto):
        alg = alg.select(A, "function")
    if isinstance(alg, (Eigh, DenseAlg)):
        if not is_self_adjoint(A):
            raise ValueError("apply_unary needs a self-adjoint operator (tag it with "
                             "linops.SelfAdjoint or linops.PSD if it is).")
        check_dense_dtype(A.dtype, "apply_unary")
        vals, vecs = torch.linalg.eigh(A.to_dense())
        if is_psd(A):  # rounding can leave eigenvalues of a singular PSD A at -1e-17
            vals = vals.clamp_min(0)
        out = Dense((vecs * _finite(f(vals), vals)[None, :]) @ vecs.mH)
        return _tag_like(out, A, f)
    if isinstance(alg, Lanczos):
        if not is_self_adjoint(A):
            raise ValueError("Lanczos matrix functions need a self-adjoint operator.")
        return _tag_like(_LanczosFunction(f, A, alg), A, f)
    raise TypeError(f"apply_unary cannot run {type(alg).__name__}: use Auto, Eigh, Dense or "
                    "Lanczos.")


def _tag_like(out, A, f):
    # f(A) of a self-adjoint A is self-adjoint (real f); exp(A), and Aᵖ of a PSD A, are PSD
    tags = {"self_adjoint"}
    if f is torch.exp or (isinstance(f, Power) and is_psd(A)):
        tags.add("psd")
    out._tags = frozenset(tags)
    return out


@dispatch
def unary_rule(f: object, A: Diagonal, alg: object) -> LinearOperator:  # noqa: F811
    return Diagonal(_finite(f(A.d), A.d))


@dispatch
def unary_rule(f: object, A: Identity, alg: object) -> LinearOperator:  # noqa: F811
    return ScalarMul(_scalar_f(f, 1.0, A).item(), A)


@dispatch
def unary_rule(f: object, A: ScalarMul, alg: object) -> LinearOperator:  # noqa: F811
    if isinstance(A.op, Identity):
        return ScalarMul(_scalar_f(f, A.c, A).item(), A.op)
    if isinstance(A.op, Diagonal):
        d = A.c * A.op.d
        return Diagonal(_finite(f(d), d))
    return unary_rule.invoke(object, LinearOperator, object)(f, A, alg)


@dispatch
def unary_rule(f: object, A: BlockDiag, alg: object) -> LinearOperator:  # noqa: F811
    if not all(b.is_square() for b in A.blocks):
        raise ValueError("apply_unary needs square blocks.")
    return BlockDiag(*(unary_rule(f, b, alg) for b in A.blocks))


@dispatch
def unary_rule(f: object, A: Sum, alg: object) -> LinearOperator:  # noqa: F811
    from .eigen import _split_shift
    from .kronecker_eigen import shifted_structure

    shift, rest = _split_shift(A)
    if shift is None:
        return unary_rule.invoke(object, LinearOperator, object)(f, A, alg)
    structured = shifted_structure(A)  # B + c·I with B BlockDiag / Kronecker: exact
    if structured is not None and not isinstance(rest, Diagonal):
        return unary_rule(f, structured, alg)
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
    """f(A) b ≈ ‖b‖ Q f(T) e₁ from a Lanczos run on each column b (columns batched).

    Runs m = min(``alg.max_iters`` or 100, n) steps and compares with the estimate from the
    first m − max(2, m/5) steps: when they differ by more than ``alg.tol`` (relative), the
    product is reported as not converged (``solution`` holds the record).
    """

    def __init__(self, f, A, alg):
        super().__init__(A.dtype, A.shape, A.device)
        self.f, self.A, self.alg = f, A, alg
        self.solution = None

    def _children(self):
        return (self.A,)

    def _repr(self):
        return f"f({self.A._repr()})"

    def _estimate(self, alphas, betas, Q, norms, m):
        """‖b‖ Q[:, :m] f(T_m) e₁ for every column, T_m the leading m×m block."""
        k = alphas.shape[1]
        T = torch.diag_embed(alphas[:m].mT)  # (k, m, m)
        if m > 1:
            b = betas[: m - 1].mT
            T = T + torch.diag_embed(b, 1) + torch.diag_embed(b, -1)
        theta, S = torch.linalg.eigh(T)
        if is_psd(self.A):
            # Ritz values of a PSD A lie in [0, λ_max]; on a singular A rounding in the
            # products leaves some at about −eps·‖A‖ (−2e-8 on a 5120² cross-entropy Hessian
            # in float32), where sqrt is NaN: those are zero eigenvalues
            eps = torch.finfo(self.dtype).eps * max(1.0, self.shape[0] ** 0.5)
            floor = 100 * eps * theta.abs().amax(-1, keepdim=True)
            theta = torch.where(theta >= -floor, theta.clamp_min(0), theta)
        self._ritz_min = float(theta.min())
        coeff = (S * (self.f(theta) * S[:, 0, :])[:, None, :]).sum(-1)  # (k, m)
        out = torch.einsum("nmk,km->nk", Q[:, :m, :].to(torch.float64), coeff)
        del k
        return out * norms

    def _matmat(self, X):
        from .lanczos import lanczos_tridiag
        from .result import Solution, Status, report

        n = self.shape[0]
        norms = torch.linalg.vector_norm(X, dim=0).to(torch.float64)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        V = X / safe.to(X.dtype)
        V = torch.where(norms[None, :] > 0, V, torch.ones_like(V) / n**0.5)
        m = min(self.alg.max_iters or 100, n)
        alphas, betas, Q = lanczos_tridiag(self.A._matmat, V, m, reorth=True)
        m = alphas.shape[0]
        full = self._estimate(alphas, betas, Q, norms, m)
        coarse = self._estimate(alphas, betas, Q, norms, max(1, m - max(2, m // 5)))
        change = (torch.linalg.vector_norm(full - coarse, dim=0)
                  / torch.linalg.vector_norm(full, dim=0).clamp_min(1e-300))
        change = torch.where(norms > 0, change, torch.zeros_like(change))
        finite = bool(torch.isfinite(full).all())
        worst = float(change.max())
        ok = finite and (worst <= self.alg.tol or m == n)
        status = Status.CONVERGED if ok else (Status.NONFINITE if not finite
                                              else Status.MAX_ITERS)
        msg = ("converged" if ok else
               f"f(A) b by Lanczos changed by {worst:.2e} (relative) over its last steps, "
               f"above tol={self.alg.tol:g}, after {m} steps: raise Lanczos(max_iters=...) "
               "or use a dense method for a small A.")
        if not finite:
            msg = (f"f(A) b by Lanczos is not finite: f is undefined at the Ritz value "
                   f"{self._ritz_min:.3g} (the smallest). sqrt needs A PSD (tag it with "
                   "linops.PSD if it is), isqrt and log need A positive definite (add damping "
                   "c·I_like(A)); NaN or inf in A propagate.")
        self.solution = Solution(value=full.to(X.dtype), status=status, iterations=m,
                                 residuals=change.cpu()[None, :], algorithm=self.alg,
                                 message=msg)
        report(self.solution, self.alg.on_failure)
        out = full.to(X.dtype)
        return torch.where(norms[None, :] > 0, out, torch.zeros_like(out))
