"""``Permutation``: reorders the entries of a vector."""

from __future__ import annotations

import torch

from .operator import LinearOperator

__all__ = ["Permutation", "Permuted"]


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


class Permuted(LinearOperator):
    """``Pᵀ A P``: the square operator A acting on a reordered vector, (P x)ᵢ = x[perm[i]].

    A product gathers the input by ``perm``, applies A and scatters the result back, so
    A's structure is kept: K-FAC's joint weight-and-bias blocks are a ``Kronecker`` product
    over the layer's ``[W | b]`` (the bias as the inputs' constant last column) seen in
    the parameters' ``[vec W; b]`` order. Since P is orthogonal, ``f(Pᵀ A P) = Pᵀ f(A) P``:
    the solvers' inverse, log-determinant, trace, matrix functions and eigenpairs work on
    A (``solvers.kronecker_eigen``); self-adjoint and PSD when A is.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
        >>> B = Permuted(A, torch.tensor([2, 0, 1]))
        >>> B.to_dense().diagonal()
        tensor([2., 3., 1.])
    """

    def __init__(self, A, perm: torch.Tensor):
        from .dense import Dense

        A = Dense(A) if isinstance(A, torch.Tensor) else A
        if not isinstance(A, LinearOperator) or not A.is_square():
            raise ValueError("Permuted(A, perm) needs a square LinearOperator (or tensor) A.")
        P = perm if isinstance(perm, Permutation) else Permutation(perm, A.dtype)
        if P.shape[0] != A.shape[0]:
            raise ValueError(f"Permuted: a permutation of {P.shape[0]} indices for an "
                             f"operator of size {A.shape[0]}.")
        super().__init__(A.dtype, A.shape, A.device)
        self.op, self.P = A, P
        self._tags = A.tags

    def _children(self):
        return (self.op,)

    def with_op(self, A: LinearOperator) -> Permuted:
        """``Pᵀ A P`` for another A of the same size (the same reordering)."""
        return Permuted(A, self.P)

    def _matmat(self, X):
        return self.op._matmat(X[self.P.perm])[self.P._inverse]

    def _rmatmat(self, Y):
        return self.op._rmatmat(Y[self.P.perm])[self.P._inverse]

    def _transpose(self):
        return Permuted(self.op.T, self.P)

    def _adjoint(self):
        return Permuted(self.op.H, self.P)

    def _to(self, dtype, device):
        return Permuted(self.op.to(dtype=dtype, device=device),
                        Permutation(self.P.perm.to(device), dtype))

    def _diag(self):
        return self.op.diag()[self.P._inverse]

    def to_dense(self):
        inv = self.P._inverse
        return self.op.to_dense()[inv][:, inv]

    def _repr(self):
        return f"Pᵀ ({self.op._repr()}) P"
