"""``Dense``: an operator around an explicit matrix."""

from __future__ import annotations

import torch

from .operator import LinearOperator

__all__ = ["Dense"]


class Dense(LinearOperator):
    """The operator of an explicit matrix M of shape (m, n): A x = M x.

    Example:
        >>> A = Dense(torch.randn(3, 2))
        >>> (A @ torch.ones(2)).shape
        torch.Size([3])
    """

    symbol = "Dense"

    def __init__(self, M: torch.Tensor):
        if not isinstance(M, torch.Tensor):
            raise TypeError(f"Dense takes a torch.Tensor, got {type(M).__name__}.")
        if M.ndim != 2:
            raise ValueError(f"Dense takes a 2-d matrix; got shape {tuple(M.shape)}.")
        super().__init__(M.dtype, M.shape, M.device)
        self.M = M

    def _matmat(self, X):
        return self.M @ X

    def _rmatmat(self, Y):
        return self.M.mH @ Y

    def _to(self, dtype, device):
        return Dense(self.M.to(dtype=dtype, device=device))

    def _diag(self):
        return self.M.diagonal()

    def to_dense(self):
        return self.M

    def _repr(self):
        m, n = self.shape
        return f"Dense({m}×{n})"
