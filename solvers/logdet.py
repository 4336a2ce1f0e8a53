"""``logdet`` and ``slogdet``: exact by structure, dense below a threshold, SLQ above."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from linops import (
    BlockDiag,
    Diagonal,
    Identity,
    Kronecker,
    LinearOperator,
    Permutation,
    Product,
    ScalarMul,
    Sum,
    Triangular,
    dispatch,
    is_psd,
)

from ._common import check_alg, check_operator
from ._krylov_utils import KeywordCheck
from .auto import Auto

__all__ = ["logdet", "slogdet", "slogdet_rule", "SLQ"]


@dataclass(frozen=True)
class SLQ(KeywordCheck):
    """Stochastic Lanczos quadrature for log det of a PSD operator (Ubaru, Chen, Saad
    2017): log det A = tr(log A) ≈ (n/s) Σ_probes Σⱼ τⱼ² log θⱼ with (θⱼ, τⱼ) the Ritz values
    and first eigenvector components of the ``steps``-step Lanczos tridiagonal from each
    Rademacher probe. Cost: ``probes`` × ``steps`` products. An estimate, not exact."""

    probes: int = 30
    steps: int = 30
    seed: int | None = 0

    def __post_init__(self):
        for name in ("probes", "steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"SLQ: {name} must be a positive int, got {v!r}.")


def slogdet(A: LinearOperator, alg=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign, log|det A|) like ``torch.linalg.slogdet``.

    Exact by structure (Diagonal, Identity, ScalarMul, Permutation, Triangular, Kronecker:
    Σ (n/nᵢ) log|det Aᵢ|, BlockDiag, Product of square factors, Diagonal + LowRank by the
    matrix determinant lemma); dense LU/Cholesky below ``Auto.dense_threshold``;
    ``SLQ`` (an estimate) for large PSD operators.
    """
    A = check_operator(A, "slogdet")
    return slogdet_rule(A, check_alg(alg, "slogdet"))


def logdet(A: LinearOperator, alg=None) -> torch.Tensor:
    """log det A; NaN where det A < 0 (as ``torch.logdet``), −inf where A is singular, NaN
    where A holds NaN (``slogdet`` then gives ``(0, nan)``, as ``torch.linalg.slogdet``)."""
    sign, logabs = slogdet(A, alg)
    nan = torch.tensor(torch.nan, dtype=logabs.dtype, device=logabs.device)
    out = torch.where(sign > 0, logabs, torch.where(sign == 0, -torch.inf, nan))
    return torch.where(torch.isnan(logabs), nan, out)


def _real(x):
    return x.real if torch.is_tensor(x) and x.is_complex() else x


def _pair(sign, logabs, like: LinearOperator):
    rd = _real(torch.empty(0, dtype=like.dtype)).dtype
    sign = torch.as_tensor(sign, device=like.device)
    return sign.to(like.dtype if like.dtype.is_complex else rd), torch.as_tensor(
        logabs, dtype=rd, device=like.device)


@dispatch
def slogdet_rule(A: LinearOperator, alg: object) -> tuple:
    """Generic: dense below the threshold, SLQ above (PSD only)."""
    from .dense_algs import Cholesky, check_dense_dtype

    if isinstance(alg, SLQ):
        return _slq(A, alg)
    if isinstance(alg, Auto):
        if A.shape[0] > alg.dense_threshold:
            if not is_psd(A):
                raise ValueError(
                    f"logdet of a {A.shape[0]}×{A.shape[0]} operator not known to be PSD: "
                    "SLQ needs PSD (tag with linops.PSD if it is), or raise "
                    "Auto(dense_threshold=...) to use a dense factorization."
                )
            return _slq(A, SLQ())
    check_dense_dtype(A.dtype, "slogdet")
    M = A.to_dense()
    if isinstance(alg, Cholesky) or (isinstance(alg, Auto) and is_psd(A)):
        L, info = torch.linalg.cholesky_ex(M)
        if not bool(info != 0):
            return _pair(1.0, 2 * _real(L.diagonal()).log().sum(), A)
    return torch.linalg.slogdet(M)


def _slq(A, alg: SLQ):
    from .lanczos import lanczos_tridiag

    n = A.shape[0]
    g = torch.Generator().manual_seed(0 if alg.seed is None else alg.seed)
    Z = (2 * torch.randint(0, 2, (n, alg.probes), generator=g) - 1).to(A.dtype).to(A.device)
    alphas, betas, _ = lanczos_tridiag(A._matmat, Z, min(alg.steps, n), reorth=True)
    m = alphas.shape[0]
    T = torch.diag_embed(alphas.mT)  # (probes, m, m), all probes in one batched run
    if m > 1:
        T = T + torch.diag_embed(betas.mT, 1) + torch.diag_embed(betas.mT, -1)
    theta, S = torch.linalg.eigh(T)
    w = S[:, 0, :] ** 2  # quadrature weights; zero on a broken-down probe's padding
    used = w > 1e-12
    if bool((used & (theta <= 0)).any()):
        raise ValueError("SLQ met a non-positive Ritz value: the operator is not "
                         "positive definite (add damping, or use a dense method).")
    terms = torch.where(used, w * theta.clamp_min(1e-300).log(), torch.zeros_like(w))
    return _pair(1.0, n * terms.sum(-1).mean(), A)


@dispatch
def slogdet_rule(A: Identity, alg: object) -> tuple:  # noqa: F811
    return _pair(1.0, 0.0, A)


@dispatch
def slogdet_rule(A: Diagonal, alg: object) -> tuple:  # noqa: F811
    d = A.d
    if d.is_complex():
        return torch.linalg.slogdet(torch.diag(d))
    return _pair(torch.sign(d).prod(), d.abs().log().sum(), A)


@dispatch
def slogdet_rule(A: Triangular, alg: object) -> tuple:  # noqa: F811
    return slogdet_rule(Diagonal(A.M.diagonal()), alg)


@dispatch
def slogdet_rule(A: Permutation, alg: object) -> tuple:  # noqa: F811
    perm = A.perm.cpu().tolist()
    seen, sign = [False] * len(perm), 1
    for i in range(len(perm)):
        if not seen[i]:
            j, length = i, 0
            while not seen[j]:
                seen[j], j, length = True, perm[j], length + 1
            sign *= -1 if length % 2 == 0 else 1
    return _pair(float(sign), 0.0, A)


@dispatch
def slogdet_rule(A: ScalarMul, alg: object) -> tuple:  # noqa: F811
    s, l = slogdet_rule(A.op, alg)
    n = A.shape[0]
    c = torch.as_tensor(A.c, dtype=A.dtype, device=A.device)
    cs = c / c.abs() if c.is_complex() else torch.sign(c)
    return _pair(s * cs**n, l + n * c.abs().log(), A)


@dispatch
def slogdet_rule(A: Kronecker, alg: object) -> tuple:  # noqa: F811
    if not all(f.is_square() for f in A.factors):
        return slogdet_rule.invoke(LinearOperator, object)(A, alg)
    n, sign, logabs = A.shape[0], 1.0, 0.0
    for f in A.factors:
        s, l = slogdet_rule(f, alg)
        p = n // f.shape[0]
        sign, logabs = sign * s**p, logabs + p * l
    return _pair(sign, logabs, A)


def _product_of(parts, A):
    sign, logabs = 1.0, 0.0
    for s, l in parts:
        sign, logabs = sign * s, logabs + l
    return _pair(sign, logabs, A)


@dispatch
def slogdet_rule(A: BlockDiag, alg: object) -> tuple:  # noqa: F811
    if not all(b.is_square() for b in A.blocks):
        return _pair(0.0, -torch.inf, A)  # a non-square block makes the matrix singular
    return _product_of([slogdet_rule(b, alg) for b in A.blocks], A)


@dispatch
def slogdet_rule(A: Product, alg: object) -> tuple:  # noqa: F811
    if not all(f.is_square() for f in A.factors):
        return slogdet_rule.invoke(LinearOperator, object)(A, alg)
    return _product_of([slogdet_rule(f, alg) for f in A.factors], A)


@dispatch
def slogdet_rule(A: Sum, alg: object) -> tuple:  # noqa: F811
    from .inverse import _woodbury_parts
    from .kronecker_eigen import shifted_structure

    structured = shifted_structure(A)  # B + c·I with B BlockDiag / Kronecker: exact
    if structured is not None:
        return slogdet_rule(structured, alg)

    w = _woodbury_parts(A)
    if w is None or not bool((w[0] != 0).all()):  # the lemma needs an invertible diagonal
        return slogdet_rule.invoke(LinearOperator, object)(A, alg)
    d, low = w
    # det(D + U C Vᴴ) = det(C⁻¹ + Vᴴ D⁻¹ U) · det(C) · det(D)
    U, V = low.U, low.V
    r = U.shape[1]
    eye = torch.eye(r, dtype=U.dtype, device=U.device)
    Cinv = eye if low.C is None else torch.linalg.inv(low.C)
    parts = [torch.linalg.slogdet(Cinv + V.mH @ ((1 / d)[:, None] * U)),
             slogdet_rule(Diagonal(d), alg)]
    if low.C is not None:
        parts.append(torch.linalg.slogdet(low.C))
    return _product_of(parts, A)
