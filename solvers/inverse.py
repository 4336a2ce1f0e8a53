"""``inv``, ``solve`` and ``pinv``: lazy inverses dispatched on structure.

``inv(A)`` returns an operator; ``inv(A) @ b`` solves A x = b. Structural rules are exact
and win over the generic fallback (``Auto`` → Cholesky/LU below a size threshold,
CG/MINRES/GMRES above). Register a rule for your own operator type with::

    @linops.dispatch
    def inv_rule(A: MyOperator, alg: object) -> LinearOperator: ...
"""

from __future__ import annotations

import numbers

import torch

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
    dispatch,
    is_psd,
    is_self_adjoint,
)

from ._common import check_alg, check_operator
from .auto import Auto
from .result import report

__all__ = ["inv", "solve", "pinv", "inv_rule", "pinv_rule", "InverseOperator"]


def inv(A: LinearOperator, alg=None) -> LinearOperator:
    """A⁻¹ as a lazy operator: ``inv(A, alg=CG(tol=1e-3)) @ b`` solves A x = b.

    Args:
        A: a square, invertible operator (n, n).
        alg: ``Auto()`` (default), ``CG``, ``MINRES``, ``GMRES``, ``Cholesky`` or ``Dense``.
            Structural rules (Diagonal, Identity, ScalarMul, Permutation, Kronecker,
            BlockDiag, Product of square factors, Triangular, LowRank + Diagonal by Woodbury)
            are exact and take precedence over ``alg``.

    Iterative solves stop per column when ‖b − A x‖ ≤ tol·‖b‖ + atol. The last solve's
    record (value, status, iterations, residual history, algorithm) is
    ``inv(A).solution``; not converging warns by default (``on_failure='raise'`` raises).
    Gradients with respect to b and to tensors inside A go through an adjoint solve.

    Example:
        >>> import torch, linops
        >>> from solvers import CG
        >>> A = linops.PSD(linops.Dense(torch.tensor([[4.0, 1.0], [1.0, 3.0]])))
        >>> Ainv = inv(A, alg=CG(tol=1e-8))
        >>> Ainv @ torch.tensor([1.0, 2.0])
        tensor([0.0909, 0.6364])
        >>> Ainv.solution.converged, Ainv.solution.iterations
        (True, 2)
    """
    A = check_operator(A, "inv")
    alg = check_alg(alg, "inv")
    if not isinstance(alg, _SOLVE_ALGS()):
        raise TypeError(f"inv cannot run {type(alg).__name__}: use Auto, CG, MINRES, GMRES, "
                        "Cholesky or Dense.")
    return _keep_tags(inv_rule(A, alg), A)


def _SOLVE_ALGS():
    from .cg import CG
    from .dense_algs import Cholesky, Dense, Eigh
    from .gmres import GMRES
    from .minres import MINRES

    return (Auto, CG, MINRES, GMRES, Cholesky, Dense, Eigh)


def _keep_tags(out: LinearOperator, A: LinearOperator) -> LinearOperator:
    """A⁻¹ of a PSD (self-adjoint) A is PSD (self-adjoint), whatever rule built it."""
    if is_psd(A) and not is_psd(out):
        return PSD(out)
    if is_self_adjoint(A) and not is_self_adjoint(out):
        return SelfAdjoint(out)
    return out


def solve(A: LinearOperator, b: torch.Tensor, alg=None, x0: torch.Tensor | None = None):
    """x with A x = b for b of shape (n,) or (n, k); ``solve(A, b, alg)`` = ``inv(A, alg) @ b``.

    ``x0`` is a warm start for iterative algorithms (never modified in place).
    The record of the solve is attached to the returned tensor as ``x.solution`` where an
    iterative method ran.
    """
    Ainv = inv(A, alg)
    if x0 is not None and isinstance(Ainv, InverseOperator):
        Ainv = Ainv.with_x0(x0)
    x = Ainv @ b
    if isinstance(Ainv, InverseOperator) and Ainv.solution is not None:
        x.solution = Ainv.solution
    return x


def pinv(A: LinearOperator, alg=None) -> LinearOperator:
    """The Moore-Penrose pseudo-inverse A⁺ (zero on the null space), lazily.

    Structural rules as for ``inv`` (Diagonal: 1/dᵢ where dᵢ ≠ 0, else 0). Otherwise
    dense ``torch.linalg.pinv`` below ``Auto.dense_threshold``, and above it, for a
    self-adjoint A, CG on A² x = A b from x0 = 0 (the minimum-norm least-squares solution).
    """
    A = check_operator(A, "pinv", square=False)
    return pinv_rule(A, check_alg(alg, "pinv"))


# ------------------------------------------------------------------ the lazy inverse
class InverseOperator(LinearOperator):
    """A⁻¹ applied by an algorithm; ``solution`` holds the record of the last solve."""

    _precedence = 2

    def __init__(self, A: LinearOperator, alg, x0: torch.Tensor | None = None):
        super().__init__(A.dtype, A.shape, A.device)
        self.A = A
        self.alg = alg
        self.x0 = x0
        self.solution = None
        self._factor = None
        self._symmetric_checked = False
        tags = set()
        if is_self_adjoint(A):
            tags.add("self_adjoint")
        if is_psd(A):
            tags.add("psd")
        self._tags = frozenset(tags)

    def with_x0(self, x0: torch.Tensor) -> InverseOperator:
        if not isinstance(x0, torch.Tensor):
            raise TypeError("x0 must be a torch.Tensor shaped like b.")
        return InverseOperator(self.A, self.alg, x0)

    @property
    def algorithm(self):
        """The algorithm config that runs (what ``Auto`` picked)."""
        return self.alg

    def _children(self):
        return (self.A,)

    def _repr(self):
        return self.A._repr_wrapped(2) + "⁻¹"

    def _transpose(self):
        return InverseOperator(self.A.T, self.alg)

    def _adjoint(self):
        return InverseOperator(self.A.H, self.alg)

    def _to(self, dtype, device):
        return InverseOperator(self.A.to(dtype=dtype, device=device), self.alg)

    def _rmatmat(self, Y):
        return self.H._matmat(Y)

    def _matmat(self, B):
        if B.shape[1] == 0:
            return B.clone()
        params = _grad_tensors(self.A) if torch.is_grad_enabled() else []
        if torch.is_grad_enabled() and (B.requires_grad or params):
            return _ImplicitSolve.apply(self, B, *params)
        return self._solve(B)

    # the solve itself, without autograd
    def _solve(self, B):
        from .cg import CG, cg
        from .dense_algs import Cholesky, Dense, Eigh
        from .gmres import GMRES, gmres
        from .minres import MINRES, minres

        alg = self.alg
        with torch.no_grad():
            if isinstance(alg, (CG, MINRES, GMRES)):
                kernel = {CG: cg, MINRES: minres, GMRES: gmres}[type(alg)]
                if isinstance(alg, (CG, MINRES)):
                    self._check_symmetric()
                pre = alg.preconditioner
                if isinstance(pre, LinearOperator):
                    _check_preconditioner(pre, self.A)
                    pre = pre._matmat
                x0 = self.x0 if self.x0 is not None else alg.x0
                if x0 is not None:
                    x0 = x0[:, None] if x0.ndim == 1 else x0
                    if x0.shape != B.shape:
                        raise ValueError(f"x0 has shape {tuple(x0.shape)} but b is "
                                         f"{tuple(B.shape)}: give x0 the shape of b.")
                sol = kernel(self.A._matmat, B, alg, x0=x0, preconditioner=pre)
                self.solution = sol
                report(sol, alg.on_failure)
                return sol.value
            if isinstance(alg, (Cholesky, Dense, Eigh)):
                return self._dense_solve(B)
        raise TypeError(
            f"inv cannot run {type(alg).__name__}: use Auto, CG, MINRES, GMRES, Cholesky or "
            "Dense."
        )

    def _check_symmetric(self):
        """CG and MINRES assume a symmetric A: probe an untagged one once (one product
        with two random columns) and raise if it is clearly not symmetric."""
        from ._krylov_utils import symmetry_defect

        if self._symmetric_checked or is_self_adjoint(self.A):
            return
        defect = symmetry_defect(self.A._matmat, self.shape[0], self.dtype, self.device)
        if not defect <= torch.finfo(self.dtype).eps ** 0.5:
            name = type(self.alg).__name__
            raise ValueError(
                f"{name} needs a symmetric A, but A is not: for random u, v, "
                f"|uᵀAv − vᵀAu| is {defect:.2g} of its scale. Use alg=solvers.GMRES() (or "
                "Auto(), which picks GMRES for an untagged operator) for a non-symmetric A. "
                "If A is symmetric, tag it with linops.SelfAdjoint(A) (or linops.PSD(A))."
            )
        self._symmetric_checked = True

    def _dense_solve(self, B):
        """A factorization of the materialized A (kept for later solves), then a checked solve."""
        from .dense_algs import Cholesky, check_dense_dtype

        if self._factor is None:
            check_dense_dtype(self.dtype, f"inv with alg={type(self.alg).__name__}()")
            M = self.A.to_dense()
            if not bool(torch.isfinite(M).all()):
                return self._dense_checked(torch.full_like(B, float("nan")), B, finite_A=False)
            if isinstance(self.alg, Cholesky):
                L, info = torch.linalg.cholesky_ex(M)
                if bool(info != 0):
                    raise ValueError(
                        "Cholesky failed: the operator is not positive definite (it may "
                        "be tagged PSD but singular or indefinite). Add a damping term "
                        "c·I_like(A), or use alg=solvers.Dense() (LU)."
                    )
                self._factor = L
            else:
                LU, piv, info = torch.linalg.lu_factor_ex(M)
                if bool(info != 0):
                    raise ValueError("The operator is singular (LU found a zero pivot); "
                                     "use solvers.pinv(A) for a least-squares solution.")
                self._factor = (LU, piv)
        if isinstance(self.alg, Cholesky):
            X = torch.cholesky_solve(B, self._factor)
        else:
            X = torch.linalg.lu_solve(*self._factor, B)
        return self._dense_checked(X, B)

    def _dense_checked(self, X, B, finite_A: bool = True):
        """Record a dense solve and check it like the iterative ones: a non-finite A or x,
        or a relative residual ‖b − A x‖/‖b‖ (one product with A) above the algorithm's
        ``tol`` (√eps of the dtype by default), is a status that is reported, never silent."""
        from ._krylov_utils import col_norm
        from .dense_algs import residual_limit, singular_message
        from .result import Solution, Status

        name = type(self.alg).__name__
        if not finite_A:
            res = torch.full((X.shape[1],), float("nan"), dtype=torch.float64)
            status = Status.NONFINITE
            message = (f"{name}: the operator holds NaN or infinity (A.to_dense() is not "
                       "finite), so nothing was solved; check how A was built.")
        else:
            bnorm = col_norm(B)
            res = col_norm(B - self.A._matmat(X)) / torch.where(bnorm > 0, bnorm, 1)
            res = res.to(device="cpu", dtype=torch.float64)
            worst = float(res.max())
            if not bool(torch.isfinite(X).all()):
                status = Status.NONFINITE
                message = (f"{name}: the dense solve produced non-finite values: check b for "
                           "NaN/inf, or A for (near) singularity (add damping, or use pinv).")
            elif not worst <= residual_limit(self.dtype, self.alg.tol):
                status = Status.BREAKDOWN
                message = singular_message(name, worst, self.dtype, self.alg.tol)
            else:
                status = Status.CONVERGED
                message = f"{name}: direct solve, relative residual {worst:.3g}."
        self.solution = Solution(value=X, status=status, iterations=0, residuals=res[None],
                                 algorithm=self.alg, message=message)
        report(self.solution, getattr(self.alg, "on_failure", "warn"))
        return X


def _check_preconditioner(P: LinearOperator, A: LinearOperator) -> None:
    if P.shape != A.shape:
        raise ValueError(f"The preconditioner is {P.shape[0]}×{P.shape[1]} but A is "
                         f"{A.shape[0]}×{A.shape[1]}: it must approximate A⁻¹, of A's shape.")
    P._check_compatible(A, "as a preconditioner of")


class _ImplicitSolve(torch.autograd.Function):
    """x = A⁻¹ B with gradients by one adjoint solve: B̄ = A⁻ᴴ x̄, Ā = −B̄ xᴴ."""

    @staticmethod
    def forward(ctx, op, B, *params):
        x = op._solve(B)
        ctx.op = op
        ctx.save_for_backward(x)
        ctx.n_params = len(params)
        return x

    @staticmethod
    def backward(ctx, gx):
        (x,) = ctx.saved_tensors
        op = ctx.op
        lam = InverseOperator(op.A.H, op.alg)._solve(gx)
        grads = [None] * ctx.n_params
        if ctx.n_params:
            params = _grad_tensors(op.A)
            with torch.enable_grad():
                y = op.A._matmat(x.detach())
                grads = torch.autograd.grad(y, params, -lam, allow_unused=True)
        return (None, lam, *grads)


def _grad_tensors(A: LinearOperator) -> list[torch.Tensor]:
    """Leaf tensors held by A's operator tree that require a gradient."""
    found, seen, stack = [], set(), [A]
    while stack:
        op = stack.pop()
        for v in vars(op).values():
            if isinstance(v, torch.Tensor) and v.requires_grad and id(v) not in seen:
                seen.add(id(v))
                found.append(v)
        stack.extend(op._children())
    return found


# ------------------------------------------------------------------ rules
def _generic_inverse(A: LinearOperator, alg) -> LinearOperator:
    if isinstance(alg, Auto):
        alg = alg.select(A, "solve")
    return InverseOperator(A, alg)


@dispatch
def inv_rule(A: LinearOperator, alg: object) -> LinearOperator:
    """Generic rule: an ``InverseOperator`` running ``alg`` (``Auto`` picks one)."""
    return _generic_inverse(A, alg)


@dispatch
def inv_rule(A: Identity, alg: object) -> LinearOperator:  # noqa: F811
    return A


@dispatch
def inv_rule(A: Diagonal, alg: object) -> LinearOperator:  # noqa: F811
    if not bool(torch.isfinite(A.d).all()):
        raise ValueError("inv of a Diagonal with NaN or infinite entries.")
    if not bool((A.d != 0).all()):
        raise ValueError("inv of a singular Diagonal (a zero entry); use solvers.pinv(A).")
    out = Diagonal(1 / A.d)
    out._tags = A.tags
    return out


@dispatch
def inv_rule(A: ScalarMul, alg: object) -> LinearOperator:  # noqa: F811
    if bool(A.c == 0):
        raise ValueError("inv of 0·A: the operator is zero.")
    op = A.op
    if isinstance(A.c, numbers.Real) and A.c > 0 and is_psd(A):
        op = _keep_tags(op, A)  # c·B PSD with c > 0: B is PSD
    elif isinstance(A.c, numbers.Real) and is_self_adjoint(A) and not is_self_adjoint(op):
        op = SelfAdjoint(op)
    return ScalarMul(1 / A.c, inv_rule(op, alg))


@dispatch
def inv_rule(A: Permutation, alg: object) -> LinearOperator:  # noqa: F811
    return A.inverse()


@dispatch
def inv_rule(A: Kronecker, alg: object) -> LinearOperator:  # noqa: F811
    _require_square(A.factors, "Kronecker factors")
    return Kronecker(*(inv_rule(f, alg) for f in A.factors))


@dispatch
def inv_rule(A: BlockDiag, alg: object) -> LinearOperator:  # noqa: F811
    _require_square(A.blocks, "BlockDiag blocks")
    return BlockDiag(*(inv_rule(b, alg) for b in A.blocks))


@dispatch
def inv_rule(A: Product, alg: object) -> LinearOperator:  # noqa: F811
    from .dense_algs import Dense as DenseAlg
    from .dense_algs import Eigh

    # factor-wise only when alg fits any factor (an explicit CG needs the whole PSD product)
    if all(f.is_square() for f in A.factors) and isinstance(alg, (Auto, DenseAlg, Eigh)):
        return Product(*(inv_rule(f, alg) for f in reversed(A.factors)))
    return _generic_inverse(A, alg)


@dispatch
def inv_rule(A: Triangular, alg: object) -> LinearOperator:  # noqa: F811
    d = A.M.diagonal()
    if not bool(torch.isfinite(d).all()) or not bool((d != 0).all()):
        raise ValueError("inv of a singular Triangular (a zero or non-finite diagonal entry); "
                         "use solvers.pinv(A).")
    return _TriangularInverse(A)


@dispatch
def inv_rule(A: Sum, alg: object) -> LinearOperator:  # noqa: F811
    from .kronecker_eigen import shifted_structure

    structured = shifted_structure(A)  # B + c·I with B BlockDiag / Kronecker: exact
    if structured is not None:
        return inv_rule(structured, alg)
    w = _woodbury_parts(A)
    if w is None or not bool((w[0] != 0).all()):  # Woodbury needs an invertible diagonal
        return _generic_inverse(A, alg)
    d, low = w
    return _woodbury(d, low)


def _require_square(ops, what):
    bad = [op.shape for op in ops if not op.is_square()]
    if bad:
        raise ValueError(f"inv needs square {what}; got shapes {bad}. A Kronecker/BlockDiag "
                         "of non-square factors has no factor-wise inverse: use solvers.pinv.")


def _woodbury_parts(A: Sum):
    """(diagonal vector d, LowRank) if A = D + U C Vᴴ with D diagonal or c·I, else None."""
    if len(A.terms) != 2:
        return None
    diag_t = low_t = None
    for t in A.terms:
        if isinstance(t, LowRank):
            low_t = t
        elif isinstance(t, Diagonal):
            diag_t = t.d
        elif isinstance(t, Identity):
            diag_t = torch.ones(t.shape[0], dtype=t.dtype, device=t.device)
        elif isinstance(t, ScalarMul) and isinstance(t.op, (Identity, Diagonal)):
            diag_t = t.c * t.op.diag()
    if diag_t is None or low_t is None:
        return None
    return diag_t, low_t


def _woodbury(d: torch.Tensor, low: LowRank) -> LinearOperator:
    """(D + U C Vᴴ)⁻¹ = D⁻¹ − D⁻¹U (C⁻¹ + Vᴴ D⁻¹ U)⁻¹ Vᴴ D⁻¹ (C = I when omitted)."""
    if not bool((d != 0).all()):
        raise ValueError("Woodbury inverse needs an invertible diagonal part; add damping.")
    dinv = 1 / d
    U, V = low.U, low.V
    r = U.shape[1]
    Cinv = (torch.eye(r, dtype=U.dtype, device=U.device) if low.C is None
            else torch.linalg.inv(low.C))
    core = Cinv + V.mH @ (dinv[:, None] * U)
    K, info = torch.linalg.inv_ex(core)
    if bool(info != 0) or not bool(torch.isfinite(K).all()):
        raise ValueError(
            "D + U C Vᴴ is singular (its Woodbury core C⁻¹ + Vᴴ D⁻¹ U is): add damping "
            "c·I_like(A), or use solvers.pinv(A)."
        )
    correction = LowRank(dinv[:, None] * U, -K, dinv.conj()[:, None] * V)
    out = Diagonal(dinv) + correction
    return out


class _TriangularInverse(LinearOperator):
    """T⁻¹ by triangular solves, O(n²) per column."""

    def __init__(self, T: Triangular):
        super().__init__(T.dtype, T.shape, T.device)
        self.tri = T

    def _children(self):
        return (self.tri,)

    def _matmat(self, X):
        return torch.linalg.solve_triangular(self.tri.M, X, upper=not self.tri.lower)

    def _rmatmat(self, Y):
        return torch.linalg.solve_triangular(self.tri.M.mH, Y, upper=self.tri.lower)

    def _repr(self):
        return self.tri._repr() + "⁻¹"


# ------------------------------------------------------------------ pinv rules
@dispatch
def pinv_rule(A: LinearOperator, alg: object) -> LinearOperator:
    """Generic pseudo-inverse: dense below the threshold, CG on A² above (self-adjoint)."""
    from .cg import CG
    from .dense_algs import Dense as DenseAlg
    from .dense_algs import Eigh

    auto = alg if isinstance(alg, Auto) else None
    dense = isinstance(alg, (DenseAlg, Eigh)) or (
        auto is not None and max(A.shape) <= auto.dense_threshold)
    if dense or not A.is_square():
        sa = A.is_square() and is_self_adjoint(A)
        return Dense(torch.linalg.pinv(A.to_dense(), hermitian=sa))
    if not isinstance(alg, (Auto, CG)):
        raise TypeError(f"pinv runs Auto, Dense, Eigh or CG, not {type(alg).__name__}.")
    if not is_self_adjoint(A):
        raise ValueError("pinv of a large non-self-adjoint operator is not supported; "
                         "raise Auto(dense_threshold=...) to use a dense pseudo-inverse.")
    if auto is not None:
        alg = auto._make(CG, iterative=True)
    return _PseudoInverse(A, alg)


class _PseudoInverse(LinearOperator):
    """A⁺ b for a self-adjoint A by CG on the consistent system A² x = A b from x0 = 0: the
    iterates stay in range(A), so CG converges to the minimum-norm least-squares solution.
    Stops when ‖A b − A² x‖ ≤ tol·‖A b‖ + atol; costs two products per iteration."""

    def __init__(self, A, alg):
        super().__init__(A.dtype, A.shape, A.device)
        self.A, self.alg, self.solution = A, alg, None
        self._tags = frozenset({"self_adjoint"})

    def _children(self):
        return (self.A,)

    def _repr(self):
        return self.A._repr_wrapped(2) + "⁺"

    def _matmat(self, B):
        from .cg import cg

        with torch.no_grad():
            AB = self.A._matmat(B)
            sol = cg(lambda X: self.A._matmat(self.A._matmat(X)), AB, self.alg,
                     on_failure="ignore")
        self.solution = sol
        report(sol, self.alg.on_failure)
        return sol.value


@dispatch
def pinv_rule(A: Identity, alg: object) -> LinearOperator:  # noqa: F811
    return A


@dispatch
def pinv_rule(A: Diagonal, alg: object) -> LinearOperator:  # noqa: F811
    nz = A.d != 0
    safe = torch.where(nz, A.d, torch.ones_like(A.d))
    return Diagonal(torch.where(nz, 1 / safe, torch.zeros_like(A.d)))


@dispatch
def pinv_rule(A: ScalarMul, alg: object) -> LinearOperator:  # noqa: F811
    if bool(A.c == 0):  # (0·A)⁺ = 0, of Aᵀ's shape
        zero = torch.zeros(A.shape[1], A.shape[0], dtype=A.dtype, device=A.device)
        return Dense(zero)
    return ScalarMul(1 / A.c, pinv_rule(A.op, alg))


@dispatch
def pinv_rule(A: Kronecker, alg: object) -> LinearOperator:  # noqa: F811
    return Kronecker(*(pinv_rule(f, alg) for f in A.factors))


@dispatch
def pinv_rule(A: BlockDiag, alg: object) -> LinearOperator:  # noqa: F811
    return BlockDiag(*(pinv_rule(b, alg) for b in A.blocks))


@dispatch
def pinv_rule(A: Permutation, alg: object) -> LinearOperator:  # noqa: F811
    return A.inverse()


# the rules of KroneckerEigen and of shifted BlockDiag / Kronecker operators
from . import kronecker_eigen as _kronecker_eigen  # noqa: E402, F401
