"""``Jacobian(f, x)``: the lazy Jacobian of a function at a point."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..operator import LinearOperator
from ._base import FunctionOperator, evaluate
from ._linearization import Linearization

__all__ = ["Jacobian"]


class Jacobian(FunctionOperator):
    """The Jacobian ``J = ∂f/∂x`` at ``x``, of shape ``(m, n)``.

    ``n`` is the number of entries of ``x`` (a tensor, or a dict of tensors flattened in
    order, see ``linops.ParamSpace``) and ``m`` the number of entries of ``f(x)``
    (flattened row-major). ``J @ v`` takes flat vectors ``(n,)`` or ``(n, k)``;
    ``J.T @ u`` (and ``u @ J``) takes ``(m,)`` or ``(m, k)``.

    Cost: building evaluates ``f`` once and runs one reverse pass (the linearization is
    kept); then each column of ``J v`` is one reverse pass over the backward graph (no
    forward pass, no forward-mode AD) and each column of ``Jᵀ u`` one reverse pass.

    Args:
        f: a function of ``x`` returning one tensor with x's dtype, differentiable by
            autograd.
        x: a real floating tensor of any shape, or a dict name → tensor.
        vectorize: products with k columns in one vmapped pass (True) or a loop (False);
            None picks by device (vmapped on GPU).

    Raises:
        ValueError: if ``f(x)`` does not depend on ``x`` or on some entry of the dict.

    Example:
        >>> import torch, linops
        >>> x = torch.tensor([1.0, 2.0])
        >>> J = linops.Jacobian(lambda x: torch.stack([x[0] * x[1], x[0] ** 2, x[1]]), x)
        >>> J.shape
        (3, 2)
        >>> J @ torch.tensor([1.0, 0.0])
        tensor([2., 2., 0.])
        >>> J.T @ torch.tensor([1.0, 0.0, 0.0])
        tensor([2., 1.])
    """

    symbol = "J"

    def __init__(self, f: Callable, x, *, vectorize: bool | None = None):
        space, leaves, out = evaluate(f, x)
        self.f = f
        self._vectorize = vectorize
        self._lin = Linearization(
            out, leaves, space.names, rerun=lambda ts: f(space.from_list(ts)),
            vectorize=vectorize, what="entry of x" if space.is_dict else "x",
        )
        super().__init__(space.dtype, (out.numel(), space.numel), space.device)
        self._init_point(space, leaves)
        #: the shape of ``f(x)``
        self.out_shape = out.shape

    @classmethod
    def _sharing(cls, owner) -> Jacobian:
        """The Jacobian of an operator that already linearized ``f`` at ``x`` (GGN, FIM):
        it reuses that linearization, so building it runs no forward or backward pass."""
        J = cls.__new__(cls)
        J.f = owner.f
        J._vectorize = owner._vectorize
        J._lin = owner._lin
        LinearOperator.__init__(J, owner.dtype, (owner._lin.out.numel(), owner.shape[1]),
                                owner.device)
        J._init_point(owner.param_space, owner._lin.leaves)
        J.out_shape = owner._lin.out.shape
        return J

    @property
    def value(self) -> torch.Tensor:
        """``f(x)``, detached."""
        return self._lin.out.detach()

    def _rebuild(self, x):
        return Jacobian(self.f, x, vectorize=self._vectorize)

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        k = X.shape[1]
        jv = self._lin.jvp(self.param_space.split(X), k)
        return jv.reshape(k, -1).mT

    def _rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        k = Y.shape[1]
        U = Y.mT.reshape(k, *self.out_shape)
        return self.param_space.join(self._lin.vjp(U, k), k)
