"""``Diagonal``, ``Identity`` and ``I_like``."""

from __future__ import annotations

import torch

from .operator import LinearOperator

__all__ = ["Diagonal", "Identity", "I_like"]


class Diagonal(LinearOperator):
    """diag(d) for a vector d of shape (n,): A x = d ⊙ x.

    Example:
        >>> Diagonal(torch.tensor([1.0, 2.0])) @ torch.ones(2)
        tensor([1., 2.])
    """

    def __init__(self, d: torch.Tensor):
        if not isinstance(d, torch.Tensor):
            raise TypeError(f"Diagonal takes a torch.Tensor, got {type(d).__name__}.")
        if d.ndim != 1:
            raise ValueError(
                f"Diagonal takes a vector of shape (n,); got shape {tuple(d.shape)}."
            )
        super().__init__(d.dtype, (d.shape[0], d.shape[0]), d.device)
        self.d = d
        if not d.is_complex():
            self._tags = frozenset({"self_adjoint"})

    def _matmat(self, X):
        return self.d[:, None] * X

    def _rmatmat(self, Y):
        return self.d.conj()[:, None] * Y

    def _transpose(self):
        return self

    def _to(self, dtype, device):
        return Diagonal(self.d.to(dtype=dtype, device=device))

    def _diag(self):
        return self.d

    def to_dense(self):
        return torch.diag(self.d)

    def _repr(self):
        return f"Diag({self.shape[0]})"


class Identity(LinearOperator):
    """The n×n identity I: ``Identity(n, dtype=torch.float32, device=None)`` (the size first;
    ``I_like(A)`` takes all three from A).

    Example:
        >>> Identity(2, torch.float64) @ torch.ones(2, dtype=torch.float64)
        tensor([1., 1.], dtype=torch.float64)
    """

    symbol = "I"
    _default_tags = frozenset({"self_adjoint", "psd"})

    def __init__(self, n: int, dtype: torch.dtype = torch.float32, device=None):
        if isinstance(n, torch.dtype) or not isinstance(dtype, torch.dtype):
            size = dtype if isinstance(n, torch.dtype) else n
            raise TypeError(
                f"Identity(n, dtype, device) takes the size first, then the dtype; got "
                f"Identity({n!r}, {dtype!r}). Write Identity({size!r}, torch.float32), or "
                "I_like(A) for the identity of A's size, dtype and device."
            )
        if isinstance(n, (tuple, list)):
            raise TypeError(
                f"Identity takes the size n of the n×n identity, not a shape; got {n!r}: "
                f"write Identity({n[0] if n else 'n'}, dtype)."
            )
        super().__init__(dtype, (n, n), device)
        self._tags = self._default_tags

    def _matmat(self, X):
        return X

    def _rmatmat(self, Y):
        return Y

    def _transpose(self):
        return self

    def _to(self, dtype, device):
        return Identity(self.shape[0], dtype, device)

    def _diag(self):
        return torch.ones(self.shape[0], dtype=self.dtype, device=self.device)

    def to_dense(self):
        return torch.eye(self.shape[0], dtype=self.dtype, device=self.device)


def I_like(A: LinearOperator) -> Identity:
    """The identity with the size, dtype and device of the square operator A."""
    if not isinstance(A, LinearOperator):
        raise TypeError(f"I_like takes a LinearOperator, got {type(A).__name__}.")
    if not A.is_square():
        raise ValueError(f"I_like needs a square operator; A has shape {A.shape}.")
    return Identity(A.shape[0], A.dtype, A.device)
