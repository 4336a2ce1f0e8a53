"""``eig``, ``eigmax``, ``eigmin``: eigenvalues dispatched on structure.

``eig(A, k, which)`` returns the k wanted eigenpairs of a self-adjoint operator (any
square operator for dense algorithms): ``which='LA'`` largest algebraic (default),
``'SA'`` smallest algebraic, ``'LM'`` largest magnitude. Register a rule for your own type
with ``@linops.dispatch def eig_rule(A: MyOp, k: int, which: str, alg: object)``.
"""

from __future__ import annotations

import numbers

import torch

from linops import (
    BlockDiag,
    Diagonal,
    Identity,
    Kronecker,
    LinearOperator,
    ScalarMul,
    SelfAdjoint,
    Sum,
    dispatch,
    is_psd,
    is_self_adjoint,
)

from ._common import check_alg, check_operator
from .auto import Auto
from .result import report

__all__ = ["eig", "eigmax", "eigmin", "cond", "eig_rule", "EigResult"]

_WHICH = ("LA", "SA", "LM")


class EigResult(tuple):
    """``(eigenvalues (k,), eigenvectors (n, k))``; ``.solution`` is the iterative record
    (None for exact structural or dense results); ``.num_converged`` says how many of the
    k pairs, most wanted first, the solver is sure of (all k for exact results)."""

    solution = None

    def __new__(cls, values, vectors, solution=None):
        self = super().__new__(cls, (values, vectors))
        self.solution = solution
        return self

    @property
    def num_converged(self) -> int:
        """The number of leading wanted pairs that pass the solver's residual test (k when
        it converged or the result is exact)."""
        k = int(self[0].shape[0])
        if self.solution is None:
            return k
        return int(self.solution.info.get("converged_count",
                                          k if self.solution.converged else 0))

    @property
    def values(self):
        return self[0]

    @property
    def vectors(self):
        return self[1]


def eig(A: LinearOperator, k: int = 1, which: str = "LA", alg=None) -> EigResult:
    """The k eigenpairs of A selected by ``which``, sorted as selected (LA: descending,
    SA: ascending, LM: descending magnitude).

    Args:
        A: square operator (n, n); iterative algorithms need it self-adjoint
            (``linops.SelfAdjoint``/``PSD`` tags, or structure such as Jᵀ H J).
        k: how many eigenpairs, 1 ≤ k ≤ n; ``k=None`` for all (dense).
        which: 'LA', 'SA' or 'LM'.
        alg: ``Auto()`` (dense ``Eigh`` up to ``dense_threshold``, ``Lanczos`` above, with
            a block of k vectors for k > 1), ``Lanczos``, ``LOBPCG``, ``PowerIteration``
            (k=1, which='LM'), ``Eigh``, ``Dense``.

    Lanczos stops when each wanted Ritz pair's residual ‖A v − θ v‖ ≤ τ·|θ| + 10·eps·max|θ|
    with τ = min(tol, 1e-3) (the cap keeps a loose tol from settling on a neighbouring
    eigenvalue; see ``solvers.Lanczos``). For k > 1 it runs block Lanczos with a block of
    k vectors (``Lanczos(block_size=...)`` to change it), which finds eigenvalues repeated
    up to the block size; ``result.num_converged`` says how many of the k pairs passed the
    test. The iterative solvers run half-precision operators in float32 (products in the
    operator's dtype).

    Example:
        >>> import torch, linops
        >>> from solvers import Lanczos
        >>> H = linops.SelfAdjoint(linops.Dense(torch.diag(torch.arange(1.0, 2001.0))))
        >>> vals, vecs = eig(H, k=2, which="LA", alg=Lanczos(tol=1e-6, seed=0))
        >>> [round(v, 2) for v in vals.tolist()]
        [2000.0, 1999.0]
    """
    A = check_operator(A, "eig")
    if which not in _WHICH:
        raise ValueError(f"eig: which must be one of {_WHICH}, got {which!r}.")
    n = A.shape[0]
    if k is None:
        k = n
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n:
        raise ValueError(f"eig: k must be an int with 1 ≤ k ≤ {n}, got {k!r}.")
    return eig_rule(A, int(k), which, check_alg(alg, "eig"))


def eigmax(A: LinearOperator, alg=None) -> torch.Tensor:
    """The largest ALGEBRAIC eigenvalue λ_max of a self-adjoint A (not the largest in
    magnitude: for A with eigenvalues {-5, 1}, eigmax is 1). A 0-dim tensor; where an
    iterative method ran, its record is ``result.solution``."""
    res = eig(A, 1, "LA", alg)
    out = res.values[0]
    out.solution = res.solution
    return out


def eigmin(A: LinearOperator, alg=None) -> torch.Tensor:
    """The smallest algebraic eigenvalue λ_min of a self-adjoint A (0-dim tensor)."""
    res = eig(A, 1, "SA", alg)
    out = res.values[0]
    out.solution = res.solution
    return out


def cond(A: LinearOperator, alg=None) -> torch.Tensor:
    """The 2-norm condition number κ(A) = λ_max / λ_min of a PSD operator (0-dim tensor).

    ``inf`` when λ_min ≤ 0 (a singular PSD matrix, such as most network curvatures). Costs
    an ``eigmax`` and an ``eigmin`` (each with ``alg``); the records are
    ``result.solution = (record of eigmax, record of eigmin)``.

    Raises:
        ValueError: A is not tagged PSD (``linops.PSD(A)`` if it is; for a general matrix
            use ``torch.linalg.cond(A.to_dense())``).

    Example:
        >>> import torch, linops
        >>> float(cond(linops.PSD(linops.Dense(torch.diag(torch.tensor([1.0, 4.0]))))))
        4.0
    """
    A = check_operator(A, "cond")
    if not is_psd(A):
        raise ValueError(
            "cond(A) needs a positive semi-definite operator: tag A with linops.PSD(A) if it "
            "is one (GGN and Fisher are); for any other matrix use "
            "torch.linalg.cond(A.to_dense())."
        )
    hi, lo = eigmax(A, alg), eigmin(A, alg)
    out = torch.where(lo > 0, hi / lo.clamp_min(torch.finfo(lo.dtype).tiny),
                      torch.full_like(hi, float("inf")))
    out.solution = (hi.solution, lo.solution)
    return out


def _seed_across_ranks(A: LinearOperator, alg):
    """``alg`` with a seed drawn on rank 0 and shared by every rank when ``A`` contains a
    data-parallel operator (``process_group=``): an unseeded random start drawn from each
    rank's own global generator would differ across ranks, and so would the solvers'
    decisions. Unchanged in one process."""
    import dataclasses

    from linops.curvature._distributed import operator_group, shared_seed

    group = operator_group(A)
    if group is None:
        return alg
    return dataclasses.replace(alg, seed=shared_seed(group, A.device))


def _select(vals: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices of the k wanted entries of a real vector, in the wanted order."""
    key = {"LA": vals, "SA": -vals, "LM": vals.abs()}[which]
    return torch.argsort(key, descending=True, stable=True)[:k]


# ------------------------------------------------------------------ rules
@dispatch
def eig_rule(A: LinearOperator, k: int, which: str, alg: object) -> EigResult:
    """Generic rule: dense eigendecomposition or an iterative eigensolver."""
    from .dense_algs import Dense, Eigh, check_dense_dtype
    from .lanczos import Lanczos, lanczos
    from .lobpcg import LOBPCG, lobpcg
    from .power_iteration import PowerIteration, power_iteration

    if isinstance(alg, Auto):
        alg = alg.select(A, "eig")
    if isinstance(alg, (Eigh, Dense)):
        check_dense_dtype(A.dtype, "eig")
        M = A.to_dense()
        if isinstance(alg, Eigh) or is_self_adjoint(A):
            vals, vecs = torch.linalg.eigh(M)
        else:
            vals, vecs = torch.linalg.eig(M)
            if bool((vals.imag.abs() > 1e-6 * vals.abs().max().clamp_min(1e-30)).any()):
                raise ValueError(
                    "eig: A has complex eigenvalues; 'LA'/'SA' need a real spectrum. Use "
                    "torch.linalg.eig(A.to_dense()) for the complex spectrum."
                )
            vals, vecs = vals.real, vecs.real
        idx = _select(vals, k, which)
        return EigResult(vals[idx], vecs[:, idx])
    if not is_self_adjoint(A):
        raise ValueError(
            f"{type(alg).__name__} needs a self-adjoint operator; tag A with "
            "linops.SelfAdjoint(A) or linops.PSD(A) if it is, or use alg=solvers.Dense()."
        )
    n, dt, dev = A.shape[0], A.dtype, A.device
    if isinstance(alg, (Lanczos, LOBPCG, PowerIteration)) and alg.seed is None:
        alg = _seed_across_ranks(A, alg)
    if isinstance(alg, Lanczos):
        sol = lanczos(A._matmat, n, dt, dev, alg, k=k, which=which)
    elif isinstance(alg, LOBPCG):
        pre = alg.preconditioner
        if isinstance(pre, LinearOperator):
            pre = pre._matmat
        sol = lobpcg(A._matmat, n, dt, dev, alg, k=k, which=which, preconditioner=pre)
    elif isinstance(alg, PowerIteration):
        if k != 1 or which != "LM":
            if which == "LA" and k == 1:
                raise ValueError(
                    "PowerIteration finds the eigenvalue of largest MAGNITUDE; for the largest "
                    "algebraic one (eigmax) use Lanczos, or eig(A, which='LM', "
                    "alg=PowerIteration()) if A is PSD."
                )
            raise ValueError("PowerIteration gives one eigenpair with which='LM'.")
        sol = power_iteration(A._matmat, n, dt, dev, alg)
    else:
        raise TypeError(f"eig cannot run {type(alg).__name__}: use Auto, Lanczos, LOBPCG, "
                        "PowerIteration, Eigh or Dense.")
    report(sol, alg.on_failure)
    vals, vecs = sol.value
    return EigResult(vals, vecs, sol)


@dispatch
def eig_rule(A: Diagonal, k: int, which: str, alg: object) -> EigResult:  # noqa: F811
    if A.d.is_complex():
        raise ValueError("eig of a complex Diagonal: 'LA'/'SA' need a real spectrum.")
    idx = _select(A.d, k, which)
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return EigResult(A.d[idx], eye[:, idx])


@dispatch
def eig_rule(A: Identity, k: int, which: str, alg: object) -> EigResult:  # noqa: F811
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return EigResult(torch.ones(k, dtype=A.dtype, device=A.device), eye[:, :k])


@dispatch
def eig_rule(A: ScalarMul, k: int, which: str, alg: object) -> EigResult:  # noqa: F811
    c = A.c
    if isinstance(c, torch.Tensor):
        if c.is_complex():
            return eig_rule.invoke(LinearOperator, int, str, object)(A, k, which, alg)
        c = c.item()
    if isinstance(c, complex):
        return eig_rule.invoke(LinearOperator, int, str, object)(A, k, which, alg)
    inner = which if c >= 0 or which == "LM" else {"LA": "SA", "SA": "LA"}[which]
    op = A.op
    if c != 0 and is_self_adjoint(A) and not is_self_adjoint(op):
        op = SelfAdjoint(op)  # A = c·B with c real ≠ 0 is self-adjoint only if B is
    res = eig_rule(op, k, inner, alg)
    return EigResult(c * res.values, res.vectors, res.solution)


@dispatch
def eig_rule(A: Sum, k: int, which: str, alg: object) -> EigResult:  # noqa: F811
    # shifted spectrum: eig(B + c·I) = eig(B) + c (for LA/SA; LM depends on the shift)
    shift, rest = _split_shift(A)
    if shift is None or which == "LM" or rest is None:
        return eig_rule.invoke(LinearOperator, int, str, object)(A, k, which, alg)
    if is_self_adjoint(A) and not is_self_adjoint(rest):
        rest = SelfAdjoint(rest)  # B = A − c·I is self-adjoint when A is
    res = eig_rule(rest, k, which, alg)
    return EigResult(res.values + shift, res.vectors, res.solution)


@dispatch
def eig_rule(A: BlockDiag, k: int, which: str, alg: object) -> EigResult:  # noqa: F811
    if any(not b.is_square() for b in A.blocks):
        return eig_rule.invoke(LinearOperator, int, str, object)(A, k, which, alg)
    vals, vecs, offset = [], [], 0
    n = A.shape[0]
    for b in A.blocks:
        kb = min(k, b.shape[0])
        r = eig_rule(b, kb, which, alg)
        V = torch.zeros(n, kb, dtype=r.vectors.dtype, device=r.vectors.device)
        V[offset:offset + b.shape[0]] = r.vectors
        vals.append(r.values)
        vecs.append(V)
        offset += b.shape[0]
    vals, vecs = torch.cat(vals), torch.cat(vecs, dim=1)
    idx = _select(vals, k, which)
    return EigResult(vals[idx], vecs[:, idx])


@dispatch
def eig_rule(A: Kronecker, k: int, which: str, alg: object) -> EigResult:  # noqa: F811
    # eigenpairs of A₁ ⊗ A₂ are (λᵢ μⱼ, uᵢ ⊗ vⱼ): full factor spectra, then select
    if any(not f.is_square() or not is_self_adjoint(f) for f in A.factors):
        return eig_rule.invoke(LinearOperator, int, str, object)(A, k, which, alg)
    vals, vecs = None, None
    for f in A.factors:
        r = eig_rule(f, f.shape[0], "LA", Auto(dense_threshold=max(f.shape[0], 1)))
        if vals is None:
            vals, vecs = r.values, [r.vectors]
        else:
            vals = torch.outer(vals, r.values).reshape(-1)
            vecs.append(r.vectors)
    idx = _select(vals, k, which)
    # build the selected Kronecker eigenvectors column by column
    sizes = [f.shape[0] for f in A.factors]
    multi = torch.unravel_index(idx, sizes)
    cols = None
    for V, ii in zip(vecs, multi):
        sel = V[:, ii]  # (n_f, k)
        cols = sel if cols is None else (cols[:, None, :] * sel[None, :, :]).reshape(-1, k)
    return EigResult(vals[idx], cols)


def _split_shift(A: Sum):
    """(c, B) if A = B + c·I with a real number c, else (None, None)."""
    shift, rest = None, []
    for t in A.terms:
        if isinstance(t, Identity):
            shift = (shift or 0) + 1
        elif (isinstance(t, ScalarMul) and isinstance(t.op, Identity)
              and isinstance(t.c, numbers.Real)):
            shift = (shift or 0) + t.c
        else:
            rest.append(t)
    if shift is None or not rest:
        return None, None
    return shift, (rest[0] if len(rest) == 1 else Sum(*rest))
