"""Working precision of the Krylov kernels.

Half-precision floats (float16, bfloat16) have 3 significant digits: a Krylov basis, its
orthogonalization and its breakdown test cannot work in them (``eigmax`` of a bfloat16
operator once stopped on a false breakdown at 31.4 where the top eigenvalue is 100). The
kernels keep the operator's products in its own dtype but compute everything else in
``float32``; accuracy is then bounded by the products (about ``eps·‖A‖`` of the
operator's dtype), and the stopping rules' floors use that ``eps``.
"""

from __future__ import annotations

import torch

from ._krylov_utils import Matmat

__all__ = ["LOW_PRECISION", "working_dtype", "in_working_precision", "floor_eps"]

#: dtypes the kernels never compute in
LOW_PRECISION = (torch.float16, torch.bfloat16)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """``float32`` for a half-precision ``dtype``, else ``dtype``."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def in_working_precision(matmat: Matmat, dtype: torch.dtype) -> tuple[Matmat, torch.dtype]:
    """``(matmat, work)``: a product that takes and returns ``work`` (= working_dtype)
    tensors while the operator multiplies in its own ``dtype``."""
    work = working_dtype(dtype)
    if work == dtype:
        return matmat, dtype

    def upcast(X: torch.Tensor) -> torch.Tensor:
        return matmat(X.to(dtype)).to(work)

    return upcast, work


def floor_eps(dtype: torch.dtype) -> float:
    """The ``eps`` of the eigen-solvers' residual floor ``10·eps·max|θ|`` for an operator of
    ``dtype``: its machine epsilon, divided by 5 in half precision (there the products' own
    rounding, about ``eps·‖A‖``, is what the residual test meets, and ``10·eps`` would
    accept errors of 8 % in bfloat16)."""
    eps = torch.finfo(dtype).eps
    return eps / 5 if dtype in LOW_PRECISION else eps
