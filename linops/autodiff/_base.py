"""What the function-level autodiff operators share: evaluating ``f`` once at ``x``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..operator import LinearOperator
from ..params import ParamSpace

__all__ = ["FunctionOperator", "evaluate"]


def evaluate(f: Callable, x, role: str = "f"):
    """Evaluate ``f`` once at a copy of ``x`` whose tensors are graph leaves.

    Returns ``(space, leaves, out)``: the ``ParamSpace`` of ``x``, the leaves (sharing
    storage with ``x``, requiring grad) and ``out = f(x)`` with its graph.
    """
    if not callable(f):
        raise TypeError(f"{role} must be callable; got {type(f).__name__}.")
    space = ParamSpace(x)
    if not space.dtype.is_floating_point or space.dtype.is_complex:
        raise TypeError(
            f"x must have a real floating dtype to be differentiated; got {space.dtype}. "
            "Convert it with x.float() or x.double()."
        )
    leaves = [t.detach().requires_grad_(True) for t in space.to_list(x)]
    with torch.enable_grad():
        out = f(space.from_list(leaves))
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"{role}(x) must return a tensor; got {type(out).__name__}. Return one tensor "
            "(stack or concatenate several outputs)."
        )
    if out.dtype != space.dtype:
        raise ValueError(
            f"{role}(x) returned dtype {out.dtype} but x has {space.dtype}; an operator has "
            "one dtype: make f keep x's dtype."
        )
    if out.numel() == 0:
        raise ValueError(f"{role}(x) returned an empty tensor (shape {tuple(out.shape)}).")
    return space, leaves, out


class FunctionOperator(LinearOperator):
    """Base of ``Jacobian``, ``Hessian``, ``FIM``, ``GGN``: remembers ``x`` and the
    ``ParamSpace`` and rebuilds itself for ``.to()``."""

    def _init_point(self, space: ParamSpace, leaves) -> None:
        #: the layout of x: ``param_space.unflatten(v)`` turns a flat vector into x's form
        self.param_space = space
        #: the point x (detached), as a tensor or dict like the one given
        self.x = space.from_list([t.detach() for t in leaves])

    def _rebuild(self, x) -> FunctionOperator:
        raise NotImplementedError

    def _to(self, dtype: torch.dtype, device: torch.device) -> LinearOperator:
        if not dtype.is_floating_point or dtype.is_complex:
            raise TypeError(f"{type(self).__name__} needs a real floating dtype, not {dtype}.")
        tensors = [t.to(dtype=dtype, device=device) for t in self.param_space.to_list(self.x)]
        try:
            return self._rebuild(self.param_space.from_list(tensors))
        except (RuntimeError, ValueError, TypeError) as err:
            raise ValueError(
                f"Could not rebuild {type(self).__name__} at x moved to {dtype} on {device}: "
                f"evaluating the function there raised {type(err).__name__}: {err}. Move "
                "what the function closes over (for example model.to(...)) and build the "
                "operator again at the moved x."
            ) from err
