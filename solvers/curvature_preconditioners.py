"""Curvature preconditioners for CG on a GGN: ``inv(C + λ·I)`` with C a cheap structured
approximation of the curvature (its diagonal, K-FAC, EKFAC), built in one call."""

from __future__ import annotations

import math

from linops import I_like, LinearOperator
from linops.curvature import EKFAC, KFAC, DiagGGN
from linops.curvature._base import CurvatureOperator

from .inverse import inv

__all__ = ["curvature_preconditioner", "PRECONDITIONER_KINDS"]

#: the approximations ``curvature_preconditioner`` builds
PRECONDITIONER_KINDS = ("diag", "diag-mc", "kfac", "kfac-mc", "ekfac")


def curvature_preconditioner(G: CurvatureOperator, kind: str = "kfac", damping: float = 1e-3,
                             *, mc_samples: int = 1, seed: int = 0) -> LinearOperator:
    """``inv(C + damping·I)`` for CG on ``G + damping·I``, C approximating ``G``.

    ``kind``: ``"diag"`` (the exact GGN diagonal, ``linops.curvature.DiagGGN``),
    ``"diag-mc"`` (its Monte-Carlo estimate), ``"kfac"`` (KFLR: K-FAC with the exact loss
    Hessian), ``"kfac-mc"`` (K-FAC with sampled labels), ``"ekfac"`` (EKFAC on the exact
    columns). Each costs one pass over ``G``'s data (EKFAC two) to build, and its inverse
    product a few GEMMs per layer; the inverse is exact (structural rules), so CG sees one
    fixed symmetric positive-definite preconditioner. Parameters of layers without a
    Kronecker factorization take a dense block (see ``linops.curvature.KFAC``).

    Args:
        G: a network-level curvature operator (``GGN``, ``MCFisher``, ...): its model,
            loss, data and parameters are used.
        kind: one of ``PRECONDITIONER_KINDS``.
        damping: λ > 0, the damping of the system being solved.
        mc_samples, seed: the draws of the Monte-Carlo kinds.

    Example:
        >>> import torch, solvers
        >>> from torch import nn
        >>> from linops import I_like
        >>> from linops.curvature import GGN
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> G = GGN(model, nn.CrossEntropyLoss(), (torch.randn(32, 3), torch.randint(0, 2, (32,))))
        >>> P = solvers.curvature_preconditioner(G, "kfac", damping=1e-3)
        >>> A = G + 1e-3 * I_like(G)
        >>> x = solvers.inv(A, alg=solvers.CG(tol=1e-3, preconditioner=P)) @ G.gradient
        >>> x.shape
        torch.Size([50])
    """
    if not isinstance(G, CurvatureOperator):
        raise TypeError(
            f"curvature_preconditioner needs a network-level curvature operator "
            f"(linops.curvature.GGN, MCFisher, ...); got {type(G).__name__}. For any other "
            "operator use solvers.jacobi, nystrom or pivoted_cholesky."
        )
    if kind not in PRECONDITIONER_KINDS:
        raise ValueError(f"kind must be one of {list(PRECONDITIONER_KINDS)}; got {kind!r}.")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not (
            damping > 0 and math.isfinite(damping)):
        raise ValueError(f"damping must be a positive number (the inverse of C + damping·I "
                         f"must exist); got {damping!r}.")
    data = G.data._data[0] if G.data.single else G.data._data
    args = (G.model, G.loss_fn, data)
    # the same process group as G: every rank builds the one preconditioner of the union
    # of the shards (else each would precondition with its own and CG would diverge)
    group = dict(params=G.params, process_group=getattr(G, "_group", None))
    if kind in ("diag", "diag-mc"):
        C = DiagGGN(*args, **group, mc_samples=None if kind == "diag" else mc_samples,
                    seed=seed)
    elif kind == "ekfac":
        C = EKFAC(*args, **group, fisher="exact")
    else:
        C = KFAC(*args, **group, fisher="exact" if kind == "kfac" else "mc",
                 mc_samples=mc_samples, seed=seed)
    if C.shape != G.shape:
        raise ValueError(f"The approximation has shape {C.shape} but G has {G.shape}.")
    return inv(C + damping * I_like(C))
