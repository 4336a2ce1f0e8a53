"""``Triangular``: a dense lower or upper triangular matrix."""

from __future__ import annotations

import torch

from .operator import LinearOperator

__all__ = ["Triangular"]


class Triangular(LinearOperator):
    """A triangular matrix T (the strictly other triangle of ``M`` is ignored).

    Solves with it (``solvers.inv(T) @ b``) use a triangular solve, O(n²).
    Example:
        >>> T = Triangular(torch.tensor([[2., 0.], [1., 1.]]), lower=True)
        >>> T @ torch.ones(2)
        tensor([2., 2.])
    """

    def __init__(self, M: torch.Tensor, lower: bool = True):
        if not isinstance(M, torch.Tensor):
            raise TypeError(f"Triangular takes a torch.Tensor, got {type(M).__name__}.")
        if M.ndim != 2 or M.shape[0] != M.shape[1]:
            raise ValueError(f"Triangular takes a square matrix; got shape {tuple(M.shape)}.")
        super().__init__(M.dtype, M.shape, M.device)
        self.lower = bool(lower)
        self.M = torch.tril(M) if lower else torch.triu(M)

    def _matmat(self, X):
        return self.M @ X

    def _rmatmat(self, Y):
        return self.M.mH @ Y

    def _transpose(self):
        return Triangular(self.M.mT, lower=not self.lower)

    def _adjoint(self):
        return Triangular(self.M.mH, lower=not self.lower)

    def _to(self, dtype, device):
        return Triangular(self.M.to(dtype=dtype, device=device), self.lower)

    def _diag(self):
        return self.M.diagonal()

    def to_dense(self):
        return self.M

    def _repr(self):
        return ("L" if self.lower else "U") + f"({self.shape[0]}×{self.shape[0]})"
