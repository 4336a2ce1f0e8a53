"""``LowRank``: U C Vᴴ with thin U, V (for Woodbury inverses)."""

from __future__ import annotations

import torch

from .operator import LinearOperator

__all__ = ["LowRank"]


class LowRank(LinearOperator):
    """A = U C Vᴴ with U (m, r), C (r, r) and V (n, r); C defaults to I, V to U.

    A product costs O((m + n) r k). ``LowRank(U)`` = U Uᴴ is tagged PSD (and self-adjoint);
    other forms carry no tags (whether C is symmetric is not checked): tag them yourself
    with ``linops.SelfAdjoint`` or ``linops.PSD``.

    Example:
        >>> U = torch.randn(5, 2)
        >>> A = LowRank(U)            # U Uᵀ, rank 2
        >>> torch.allclose(A.to_dense(), U @ U.T)
        True
    """

    def __init__(self, U: torch.Tensor, C: torch.Tensor | None = None,
                 V: torch.Tensor | None = None):
        for name, t in (("U", U), ("C", C), ("V", V)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"LowRank: {name} must be a torch.Tensor, got {type(t).__name__}.")
        if U.ndim != 2:
            raise ValueError(f"LowRank: U must be (m, r); got shape {tuple(U.shape)}.")
        r = U.shape[1]
        Vm = U if V is None else V
        if Vm.ndim != 2 or Vm.shape[1] != r:
            raise ValueError(f"LowRank: V must be (n, {r}) to match U; got {tuple(Vm.shape)}.")
        if C is not None and tuple(C.shape) != (r, r):
            raise ValueError(f"LowRank: C must be ({r}, {r}); got {tuple(C.shape)}.")
        for t in (C, V):
            if t is not None and (t.dtype != U.dtype or t.device != U.device):
                raise ValueError("LowRank: U, C and V need one dtype and one device.")
        super().__init__(U.dtype, (U.shape[0], Vm.shape[0]), U.device)
        self.U, self.C, self.V = U, C, Vm
        self._symmetric_factors = V is None
        if V is None and C is None:
            self._tags = frozenset({"self_adjoint", "psd"})

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def _matmat(self, X):
        Z = self.V.mH @ X
        if self.C is not None:
            Z = self.C @ Z
        return self.U @ Z

    def _rmatmat(self, Y):
        Z = self.U.mH @ Y
        if self.C is not None:
            Z = self.C.mH @ Z
        return self.V @ Z

    def _transpose(self):
        C = None if self.C is None else self.C.mT
        return LowRank(self.V.conj(), C, self.U.conj())

    def _to(self, dtype, device):
        def mv(t):
            return None if t is None else t.to(dtype=dtype, device=device)

        return LowRank(mv(self.U), mv(self.C), None if self._symmetric_factors else mv(self.V))

    def _diag(self):
        UC = self.U if self.C is None else self.U @ self.C
        return (UC * self.V.conj()).sum(dim=1)

    def to_dense(self):
        UC = self.U if self.C is None else self.U @ self.C
        return UC @ self.V.mH

    def _repr(self):
        if self._symmetric_factors:
            return "U Uᵀ" if self.C is None else "U C Uᵀ"
        return "U Vᵀ" if self.C is None else "U C Vᵀ"
