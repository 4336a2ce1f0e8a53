"""``Hessian(f, x)``: the lazy Hessian of a scalar function at a point."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._base import FunctionOperator, evaluate
from ._linearization import (
    GradientGraph,
    _name_list,
    default_vectorize,
    gradient_with_graph,
)

__all__ = ["Hessian"]


class Hessian(FunctionOperator):
    """The Hessian ``H = ∂²f/∂x²`` of a scalar function at ``x``, ``n × n``, self-adjoint.

    Products are reverse-over-reverse on a kept graph: building evaluates ``f`` and its
    gradient once with ``create_graph=True``; each column of ``H v`` is then one reverse
    pass over the gradient's graph, ``autograd.grad(∇f, x, v)`` (about two gradients'
    cost), with no forward pass. This works for every operation with a double backward,
    including SiLU; where an operation has no double backward it falls back to
    forward-over-reverse (``torch.func``, re-running ``f`` at each product).

    Args:
        f: a function of ``x`` returning a scalar (a tensor with one element).
        x: a real floating tensor of any shape, or a dict name → tensor; products take flat
            vectors ``(n,)`` or ``(n, k)`` (see ``linops.ParamSpace``).
        vectorize: products with k columns in one vmapped pass (True) or a loop (False);
            None picks by device (vmapped on GPU).

    Attributes:
        value: ``f(x)`` (detached); ``gradient``: ``∇f(x)`` as a flat vector ``(n,)``.

    Raises:
        ValueError: if ``f(x)`` is not a scalar, or does not depend on some entry of x.

    Example:
        >>> import torch, linops
        >>> H = linops.Hessian(lambda x: (x ** 3).sum(), torch.tensor([1.0, 2.0]))
        >>> H @ torch.tensor([1.0, 1.0])
        tensor([ 6., 12.])
    """

    symbol = "H"

    def __init__(self, f: Callable, x, *, vectorize: bool | None = None):
        space, leaves, out = evaluate(f, x)
        if out.numel() != 1:
            raise ValueError(
                f"Hessian needs a scalar function, but f(x) has shape {tuple(out.shape)}. "
                "Reduce it (for example .sum() or .mean()), or use linops.Jacobian for "
                "vector-valued functions."
            )
        what = "entry of x" if space.is_dict else "x"
        if not out.requires_grad:
            raise ValueError(
                f"f(x) does not depend on {what} ({_name_list(space.names)}): its value "
                "carries no gradient."
            )
        grads = gradient_with_graph(out, leaves)
        unused = [n for n, g in zip(space.names, grads) if g is None]
        if unused:
            raise ValueError(
                f"f(x) does not depend on the {what}(s) {_name_list(unused)}; leave them out "
                "of x or check that f uses them."
            )
        super().__init__(space.dtype, (space.numel, space.numel), space.device)
        self._init_point(space, leaves)
        self._tags = frozenset({"self_adjoint"})
        self.f = f
        self._vectorize = vectorize
        self._graph = GradientGraph(
            grads, leaves, rerun=lambda ts: f(space.from_list(ts)),
            vectorize=default_vectorize(space.device) if vectorize is None else vectorize,
        )
        self.value = out.detach().reshape(())
        self.gradient = space.join([g.detach() for g in grads])

    def _rebuild(self, x):
        return Hessian(self.f, x, vectorize=self._vectorize)

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        k = X.shape[1]
        return self.param_space.join(self._graph.hvp(self.param_space.split(X), k), k)
