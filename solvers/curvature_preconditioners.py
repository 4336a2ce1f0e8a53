"""Curvature preconditioners for CG on a GGN: ``inv(C + λ·I)`` with C a cheap structured
approximation of the curvature (its diagonal, K-FAC, EKFAC), built in one call."""

from __future__ import annotations

import math

import torch

import linops
from linops import I_like, LinearOperator
from linops.curvature import EKFAC, KFAC, DiagGGN
from linops.curvature._base import CurvatureOperator

from .inverse import inv

__all__ = ["curvature_preconditioner", "PRECONDITIONER_KINDS", "spd_inverse",
           "inverse_factor"]

#: the approximations ``curvature_preconditioner`` builds
PRECONDITIONER_KINDS = ("diag", "diag-mc", "kfac", "kfac-mc", "ekfac")


def curvature_preconditioner(G: CurvatureOperator, kind: str = "kfac", damping: float = 1e-3,
                             *, mc_samples: int = 1, seed: int = 0) -> LinearOperator:
    """``inv(C + damping·I)`` for CG on ``G + damping·I``, C approximating ``G``.

    ``kind``: ``"diag"`` (the exact GGN diagonal, ``linops.curvature.DiagGGN``),
    ``"diag-mc"`` (its Monte-Carlo estimate), ``"kfac"`` (KFLR: K-FAC with the exact loss
    Hessian), ``"kfac-mc"`` (K-FAC with sampled labels; both with each layer's weight and
    bias in one block, ``KFAC(bias="joint")``), ``"ekfac"`` (EKFAC on the exact
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
        # a layer's weight and bias in one block (homogeneous coordinates): on the
        # reference MLP about half the CG iterations of separate bias blocks
        C = KFAC(*args, **group, fisher="exact" if kind == "kfac" else "mc",
                 mc_samples=mc_samples, seed=seed, bias="joint")
    if C.shape != G.shape:
        raise ValueError(f"The approximation has shape {C.shape} but G has {G.shape}.")
    if isinstance(C, linops.BlockDiag):
        # block by block: the dense blocks (biases) as explicit inverses (float64 Cholesky,
        # checked once: spd_inverse), so an application is a GEMV instead of a checked
        # Cholesky solve
        # (on the reference MLP the bias blocks took 40 % of a K-FAC preconditioner's
        # product); the Kronecker blocks by their exact structural inverse
        blocks = []
        for b in C.blocks:
            if isinstance(b, linops.Dense):
                M = b.M + damping * torch.eye(b.shape[0], dtype=b.M.dtype, device=b.M.device)
                blocks.append(inverse_factor(linops.PSD(linops.Dense(M)), float64=True))
            else:
                blocks.append(inv(b + damping * I_like(b)))
        out = linops.BlockDiag(*blocks)
        out._tags = frozenset({"self_adjoint", "psd"})
        return out
    return inv(C + damping * I_like(C))


def spd_inverse(M: torch.Tensor, float64: bool = False) -> linops.LinearOperator | None:
    """The explicit inverse of a damped SPD factor (Cholesky in M's dtype, and in float64
    where that is not accurate enough; ``float64``: in float64 alone, the inverse then
    exact up to its rounding to M's dtype), in M's dtype, checked once on a fixed probe:
    the inverse actually applied must solve to √eps of the dtype. None where no precision
    gives that (the π heuristic left this factor a tiny share of the damping): the caller
    then solves with the factor itself, as ``inv`` does, whose checked solves report any
    trouble."""
    M64 = M.to(torch.float64)
    v = torch.cos(torch.arange(M.shape[0], dtype=torch.float64, device=M.device))
    tried = []
    # (float32 first where allowed: 2× faster for the K-FAC optimizer's large factors;
    # half precisions have no Cholesky: float64 alone)
    low = not float64 and M.dtype == torch.float32
    for dtype in (M.dtype, torch.float64) if low else (torch.float64,):
        L, info = torch.linalg.cholesky_ex(M64 if dtype == torch.float64 else M.to(dtype))
        tried.append(int(info))
        if int(info) != 0:
            continue
        Minv = torch.cholesky_inverse(L)
        Minv = ((Minv + Minv.mT) / 2).to(M.dtype)  # exactly symmetric (CG needs it)
        err = float(torch.linalg.vector_norm(M64 @ (Minv.to(torch.float64) @ v) - v)
                    / torch.linalg.vector_norm(v))
        if err <= torch.finfo(M.dtype).eps ** 0.5:
            return linops.PSD(linops.Dense(Minv))
    if tried[-1] != 0:  # not even float64 could factor it
        raise FloatingPointError(
            "A damped curvature block (a K-FAC factor, a dense bias block) is not positive "
            "definite (non-finite or indefinite); raise damping or check the model's "
            "outputs.")
    return None


def inverse_factor(F: linops.LinearOperator, float64: bool = False) -> linops.LinearOperator:
    """``F⁻¹`` of a damped SPD ``Dense`` block: explicit (``spd_inverse``) where accurate,
    else the checked solves of ``inv(F)``."""
    explicit = spd_inverse(F.M, float64)
    return explicit if explicit is not None else inv(F)
