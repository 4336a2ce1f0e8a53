"""``GGN(f, loss, x)`` and ``FIM(logits_fn, x)``: Jᵀ H J at a point, function level."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._base import FunctionOperator, evaluate
from ._closed_forms import softmax_hessian_product
from ._linearization import Linearization, batched_grad

__all__ = ["GGN", "FIM"]


class _OutputCurvature(FunctionOperator):
    """``Jᵀ H J`` with J the Jacobian of ``f`` at ``x`` and H an output-space operator."""

    def _init_linearization(self, f, x, vectorize, role):
        space, leaves, out = evaluate(f, x, role)
        self.f = f
        self._vectorize = vectorize
        self._lin = Linearization(
            out, leaves, space.names, rerun=lambda ts: f(space.from_list(ts)),
            vectorize=vectorize, what="entry of x" if space.is_dict else "x",
        )
        super().__init__(space.dtype, (space.numel, space.numel), space.device)
        self._init_point(space, leaves)
        self._tags = frozenset({"self_adjoint", "psd"})
        return out

    @property
    def value(self) -> torch.Tensor:
        """``f(x)`` (the logits for ``FIM``), detached."""
        return self._lin.out.detach()

    @property
    def jacobian(self):
        """J, the Jacobian of ``f`` at ``x``, sharing this operator's linearization (no
        further forward pass): e.g. the gradient of a loss of the outputs is
        ``F.jacobian.T @ dloss_dz``."""
        from .jacobian import Jacobian

        return Jacobian._sharing(self)

    def _output_hessian(self, T: torch.Tensor) -> torch.Tensor:
        """H t for tangents ``T`` of shape ``(k, *out.shape)``."""
        raise NotImplementedError

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        k = X.shape[1]
        jv = self._lin.jvp(self.param_space.split(X), k)
        return self.param_space.join(self._lin.vjp(self._output_hessian(jv), k), k)


class GGN(_OutputCurvature):
    """The generalized Gauss-Newton matrix ``G = Jᵀ H J`` at ``x``, ``n × n``.

    ``J`` is the Jacobian of ``f`` at ``x`` and ``H = ∇²loss(f(x))`` the Hessian of
    ``loss`` with respect to its input, at ``f(x)``. ``G`` is tagged PSD and self-adjoint:
    that holds when ``loss`` is convex in its input (cross entropy, squared error, ...),
    which is assumed and not checked.

    Cost: building evaluates ``f`` once, runs one reverse pass for the linearization and
    one gradient and double backward of ``loss`` (on the output only); each product column
    then costs one reverse pass over the backward graph (``J v``), one Hessian-vector
    product of ``loss`` on the output, and one reverse pass (``Jᵀ u``). No forward pass
    of ``f`` is repeated.

    Args:
        f: a function of ``x`` returning one tensor (for example a model's output).
        loss: a function of ``f(x)`` returning a scalar (targets closed over).
        x: a real floating tensor or a dict name → tensor; products take flat vectors
            ``(n,)`` or ``(n, k)`` (see ``linops.ParamSpace``).
        vectorize: products with k columns in one vmapped pass (True) or a loop (False);
            None picks by device (vmapped on GPU).

    Attributes:
        value: ``f(x)``; ``loss_value``: ``loss(f(x))`` (both detached).

    Example:
        >>> import torch, linops
        >>> A = torch.tensor([[1.0, 2.0], [0.0, 1.0], [1.0, 0.0]])
        >>> G = linops.GGN(lambda x: A @ x, lambda z: (z ** 2).sum(), torch.zeros(2))
        >>> torch.allclose(G.to_dense(), 2 * A.T @ A)
        True
    """

    symbol = "G"

    def __init__(self, f: Callable, loss: Callable, x, *, vectorize: bool | None = None):
        if not callable(loss):
            raise TypeError(f"loss must be callable; got {type(loss).__name__}.")
        out = self._init_linearization(f, x, vectorize, "f")
        self.loss = loss
        with torch.enable_grad():
            z = out.detach().requires_grad_(True)
            value = loss(z)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
                raise ValueError(
                    f"loss(f(x)) must be a scalar; got {shape}. Reduce it with .sum() or "
                    ".mean()."
                )
            if not value.requires_grad:
                raise ValueError("loss(f(x)) does not depend on f(x): check the loss.")
            (gz,) = torch.autograd.grad(value.reshape(()), z, create_graph=True)
        self._z, self._gz = z, gz
        #: ``loss(f(x))``, detached
        self.loss_value = value.detach().reshape(())

    def _rebuild(self, x):
        return GGN(self.f, self.loss, x, vectorize=self._vectorize)

    def _output_hessian(self, T):
        if not self._gz.requires_grad:  # a linear loss has a zero Hessian
            return torch.zeros_like(T)
        (ht,) = batched_grad([self._gz], [self._z], [T], T.shape[0], self._lin.vectorize)
        return ht


class FIM(_OutputCurvature):
    """The Fisher information ``F = Σ_r J_rᵀ (diag(p_r) − p_r p_rᵀ) J_r`` of the categorical
    distributions with logits ``logits_fn(x)``, ``n × n``, PSD.

    The classes lie along the last dimension of the logits; every other index is a row
    ``r`` (one distribution), and the row Fishers are summed. ``p_r = softmax(z_r)``. This
    equals the GGN of the summed softmax cross entropy (the Hessian of the loss in the
    logits does not depend on the labels); it is computed in closed form.

    Cost: as ``GGN``: one evaluation and one reverse pass when built, then per column one
    reverse pass for ``J v`` and one for ``Jᵀ u``.

    Args:
        logits_fn: a function of ``x`` returning logits of shape ``(..., C)``.
        x: a real floating tensor or a dict name → tensor.
        vectorize: products with k columns in one vmapped pass (True) or a loop (False);
            None picks by device.

    Example:
        >>> import torch, linops
        >>> W = torch.randn(3, 2)
        >>> F = linops.FIM(lambda w: torch.randn(5, 2) @ w.T, W)   # 5 rows, 3 classes
        >>> F.shape
        (6, 6)
    """

    symbol = "F"

    def __init__(self, logits_fn: Callable, x, *, vectorize: bool | None = None):
        out = self._init_linearization(logits_fn, x, vectorize, "logits_fn")
        if out.ndim == 0:
            raise ValueError(
                "logits_fn(x) returned a scalar; FIM needs logits with the classes along the "
                "last dimension, shape (C,) or (N, C)."
            )
        self._p = torch.softmax(out.detach(), dim=-1)

    def _rebuild(self, x):
        return FIM(self.f, x, vectorize=self._vectorize)

    def _output_hessian(self, T):
        return softmax_hessian_product(self._p, T, dim=-1)
