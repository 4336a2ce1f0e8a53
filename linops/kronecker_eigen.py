"""``KroneckerEigen``: Q diag(λ) Qᵀ with Q = Q₁ ⊗ … ⊗ Q_d orthogonal, never materialized."""

from __future__ import annotations

import torch

from .kronecker import Kronecker
from .operator import LinearOperator

__all__ = ["KroneckerEigen"]


class KroneckerEigen(LinearOperator):
    """``Q diag(λ) Qᵀ`` with ``Q = Q₁ ⊗ … ⊗ Q_d`` (each ``Qᵢ`` orthogonal) and any real
    eigenvalues ``λ`` of length ``n = Π nᵢ`` (row-major, as ``torch.kron``).

    It holds a Kronecker product of symmetric factors, shifted or not: ``A ⊗ B + c·I`` has
    the eigenvectors of ``A ⊗ B`` and the eigenvalues ``λᵢ μⱼ + c`` (``from_factors``),
    and EKFAC's refitted diagonal in the Kronecker eigenbasis (George et al. 2018). Every
    matrix function is exact and cheap: ``f(Q diag(λ) Qᵀ) = Q diag(f(λ)) Qᵀ`` (inverse,
    square root, log-determinant, trace, eigenpairs, in ``solvers``). A product costs one
    product with each ``Qᵢ`` and its transpose over the reshaped input. Self-adjoint;
    PSD when every λ ≥ 0.

    Args:
        Qs: the orthogonal factors, square tensors ``(nᵢ, nᵢ)``.
        eigenvalues: ``(n,)``.

    Example:
        >>> A, B = torch.tensor([[2.0, 1.0], [1.0, 2.0]]), torch.diag(torch.tensor([1.0, 3.0]))
        >>> K = KroneckerEigen.from_factors([A, B], shift=0.5)
        >>> torch.allclose(K.to_dense(), torch.kron(A, B) + 0.5 * torch.eye(4), atol=1e-6)
        True
    """

    def __init__(self, Qs, eigenvalues: torch.Tensor):
        Qs = tuple(Qs)
        if not Qs or not all(isinstance(Q, torch.Tensor) and Q.ndim == 2
                             and Q.shape[0] == Q.shape[1] for Q in Qs):
            raise ValueError("KroneckerEigen needs square orthogonal factor tensors (n_i, n_i).")
        n = 1
        for Q in Qs:
            n *= Q.shape[0]
        if eigenvalues.shape != (n,):
            raise ValueError(f"KroneckerEigen: {n} eigenvalues expected (the product of the "
                             f"factor sizes); got shape {tuple(eigenvalues.shape)}.")
        if eigenvalues.is_complex():
            raise ValueError("KroneckerEigen takes real eigenvalues.")
        super().__init__(Qs[0].dtype, (n, n), Qs[0].device)
        self.Qs = Qs
        self.eigenvalues = eigenvalues
        self._basis = Kronecker(*Qs)
        tags = {"self_adjoint"}
        if bool((eigenvalues >= 0).all()):
            tags.add("psd")
        self._tags = frozenset(tags)

    @classmethod
    def from_factors(cls, factors, shift: float = 0.0) -> KroneckerEigen:
        """``F₁ ⊗ … ⊗ F_d + shift·I`` for symmetric factor tensors, by one ``eigh`` each."""
        Qs, vals = [], None
        for F in factors:
            F = F.to_dense() if isinstance(F, LinearOperator) else F
            if not bool(F.isfinite().all()):
                raise FloatingPointError(
                    f"A {tuple(F.shape)} Kronecker factor holds NaN or infinity: a K-FAC "
                    "factor of a diverged model? Check the loss and the model's outputs "
                    "(after an optimizer step: lower the learning rate).")
            try:
                lam, Q = torch.linalg.eigh((F + F.mT) / 2)
            except torch.linalg.LinAlgError as err:
                raise FloatingPointError(
                    f"The eigendecomposition of a {tuple(F.shape)} Kronecker factor did not "
                    f"converge ({err}): check the factor's scale (entries of very "
                    "different magnitudes: rescale the model's inputs) and its values.") from err
            Qs.append(Q)
            vals = lam if vals is None else torch.outer(vals, lam).reshape(-1)
        return cls(Qs, vals + shift)

    def with_eigenvalues(self, eigenvalues: torch.Tensor) -> KroneckerEigen:
        """The same eigenbasis with other eigenvalues (``f(λ)``)."""
        return KroneckerEigen(self.Qs, eigenvalues)

    def _matmat(self, X):
        Y = self._basis._rmatmat(X)  # Qᵀ X
        return self._basis._matmat(self.eigenvalues[:, None] * Y)

    def _transpose(self):
        return self

    def _to(self, dtype, device):
        return KroneckerEigen([Q.to(dtype=dtype, device=device) for Q in self.Qs],
                              self.eigenvalues.to(dtype=dtype, device=device))

    def _diag(self):
        # diag(Q Λ Qᵀ)_r = Σ_j Q_rj² λ_j, with Q_rj² = ⊗ (Qᵢ²)_{rᵢ jᵢ}
        return Kronecker(*(Q * Q for Q in self.Qs))._matmat(self.eigenvalues[:, None])[:, 0]

    def to_dense(self):
        Q = self._basis.to_dense()
        return (Q * self.eigenvalues) @ Q.mT

    def _repr(self):
        return "Q Λ Qᵀ"


def shift_structured(B: LinearOperator, c) -> LinearOperator | None:
    """``B + c·I`` rebuilt with its structure kept, or None where no rule applies:
    block-wise for ``BlockDiag``, by the factors' eigendecompositions for a ``Kronecker``
    product of symmetric square tensors (``KroneckerEigen``), on the eigenvalues of a
    ``KroneckerEigen``, entry-wise for ``Diagonal`` and ``Dense``, inside a ``Permuted``.
    The solvers' rules for ``B + c·I`` (inverse, log-determinant, matrix functions) use it
    to stay exact."""
    from .blockdiag import BlockDiag
    from .dense import Dense
    from .diagonal import Diagonal, I_like
    from .permutation import Permuted
    from .properties import is_self_adjoint

    if isinstance(c, torch.Tensor):
        if c.numel() != 1 or c.is_complex():
            return None
        c = float(c)
    if not isinstance(c, (int, float)):
        return None
    if isinstance(B, KroneckerEigen):
        return B.with_eigenvalues(B.eigenvalues + c)
    if isinstance(B, Permuted):  # Pᵀ A P + c·I = Pᵀ (A + c·I) P
        s = shift_structured(B.op, c)
        return B.with_op(s if s is not None else B.op + c * I_like(B.op))
    if isinstance(B, Diagonal) and not B.d.is_complex():
        return Diagonal(B.d + c)
    if isinstance(B, Dense) and not B.dtype.is_complex:
        out = Dense(B.to_dense() + c * torch.eye(B.shape[0], dtype=B.dtype, device=B.device))
        out._tags = B.tags
        return out
    if isinstance(B, Kronecker):
        if B.dtype.is_complex or not all(
                f.is_square() and is_self_adjoint(f) and isinstance(f, Dense)
                for f in B.factors):
            return None
        return KroneckerEigen.from_factors([f.to_dense() for f in B.factors], c)
    if isinstance(B, BlockDiag) and all(b.is_square() for b in B.blocks):
        blocks = []
        for b in B.blocks:
            s = shift_structured(b, c)
            blocks.append(s if s is not None else b + c * I_like(b))
        out = BlockDiag(*blocks)
        return out
    return None
