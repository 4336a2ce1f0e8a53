"""``BlockDiag``: a block-diagonal operator with blocks of any sizes."""

from __future__ import annotations

import torch

from .operator import LinearOperator

__all__ = ["BlockDiag"]


class BlockDiag(LinearOperator):
    """diag(A₁, …, A_d): blocks of (possibly different) shapes (mᵢ, nᵢ) on the diagonal.

    A product splits x into pieces of nᵢ rows, multiplies each by its block and stacks the
    results. Example:
        >>> B = BlockDiag(torch.eye(2), 3 * torch.eye(1))
        >>> B @ torch.ones(3)
        tensor([1., 1., 3.])
    """

    def __init__(self, *blocks):
        if len(blocks) == 1 and isinstance(blocks[0], (list, tuple)):
            blocks = tuple(blocks[0])
        if len(blocks) < 1:
            raise ValueError("BlockDiag needs at least one block.")
        from .dense import Dense

        blocks = tuple(Dense(b) if isinstance(b, torch.Tensor) else b for b in blocks)
        for b in blocks:
            if not isinstance(b, LinearOperator):
                raise TypeError(
                    f"BlockDiag blocks are LinearOperators or tensors, got {type(b).__name__}."
                )
            blocks[0]._check_compatible(b, "⊕")
        m = sum(b.shape[0] for b in blocks)
        n = sum(b.shape[1] for b in blocks)
        super().__init__(blocks[0].dtype, (m, n), blocks[0].device)
        self.blocks = blocks
        self._rows = [b.shape[0] for b in blocks]
        self._cols = [b.shape[1] for b in blocks]

    def _children(self):
        return self.blocks

    def _matmat(self, X):
        parts = torch.split(X, self._cols, dim=0)
        return torch.cat([b._matmat(p) for b, p in zip(self.blocks, parts)], dim=0)

    def _rmatmat(self, Y):
        parts = torch.split(Y, self._rows, dim=0)
        return torch.cat([b._rmatmat(p) for b, p in zip(self.blocks, parts)], dim=0)

    def _transpose(self):
        return BlockDiag(*(b.T for b in self.blocks))

    def _adjoint(self):
        return BlockDiag(*(b.H for b in self.blocks))

    def _to(self, dtype, device):
        return BlockDiag(*(b.to(dtype=dtype, device=device) for b in self.blocks))

    def _diag(self):
        if any(not b.is_square() for b in self.blocks):
            raise NotImplementedError(
                "diag() of a BlockDiag with non-square blocks: use A.to_dense().diagonal()."
            )
        return torch.cat([b.diag() for b in self.blocks])

    def to_dense(self):
        return torch.block_diag(*(b.to_dense() for b in self.blocks))

    def _repr(self):
        return "BlockDiag(" + ", ".join(b._repr() for b in self.blocks) + ")"
