"""``Permutation``: reorders the entries of a vector."""

from __future__ import annotations

import torch

from .operator import LinearOperator

__all__ = ["Permutation"]


class Permutation(LinearOperator):
    """P with (P x)ᵢ = x[perm[i]] for a permutation ``perm`` of 0..n-1.

    Pᵀ = P⁻¹ is the inverse permutation. Whether ``perm`` is a permutation is checked once,
    when built. Example:
        >>> P = Permutation(torch.tensor([2, 0, 1]))
        >>> P @ torch.tensor([10., 20., 30.])
        tensor([30., 10., 20.])
    """

    symbol = "P"

    def __init__(self, perm: torch.Tensor, dtype: torch.dtype = torch.float32):
        if not isinstance(perm, torch.Tensor) or perm.dtype not in (torch.int32, torch.int64):
            raise TypeError("Permutation takes an integer tensor of indices (torch.long).")
        if perm.ndim != 1:
            raise ValueError(f"Permutation takes a vector (n,); got shape {tuple(perm.shape)}.")
        n = perm.shape[0]
        if n == 0:
            raise ValueError("Empty operator: a Permutation needs at least one index.")
        check = torch.zeros(n, dtype=torch.bool, device=perm.device)
        check[perm.clamp(0, n - 1)] = True
        if perm.min() < 0 or perm.max() >= n or not bool(check.all()):
            raise ValueError(f"Permutation: indices must be a permutation of 0..{n - 1}.")
        super().__init__(dtype, (n, n), perm.device)
        self.perm = perm.long()
        self._inverse = torch.argsort(self.perm)

    def _matmat(self, X):
        return X[self.perm]

    def _rmatmat(self, Y):
        return Y[self._inverse]

    def _to(self, dtype, device):
        return Permutation(self.perm.to(device), dtype)

    def _diag(self):
        idx = torch.arange(self.shape[0], device=self.device)
        return (self.perm == idx).to(self.dtype)

    def inverse(self) -> Permutation:
        """P⁻¹ = Pᵀ, itself a permutation."""
        return Permutation(self._inverse, self.dtype)

    def to_dense(self):
        eye = torch.eye(self.shape[0], dtype=self.dtype, device=self.device)
        return eye[self.perm]
