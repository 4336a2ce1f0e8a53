"""``Hessian``: the Hessian of a model's loss over a data set, network level."""

from __future__ import annotations

from functools import partial

import torch

from ..autodiff._linearization import (
    HVP_ROUTES,
    GradientGraph,
    _name_list,
    gradient_with_graph,
)
from ._base import CurvatureOperator
from ._mlp import mlp_gradient, mlp_hvp

__all__ = ["Hessian"]


class Hessian(CurvatureOperator):
    """The Hessian ``H = ∇²_θ L`` of the loss ``L`` over a data set in the parameters.

    ``L`` is the loss over the whole data set: the sum of the batches' losses for
    ``reduction='sum'``, their sum divided by the total number of terms for ``'mean'``.
    Self-adjoint (not PSD in general).

    Products are reverse-over-reverse on a kept graph: building one batch runs its forward
    pass and its gradient with ``create_graph=True``; each product column is then one
    reverse pass over the gradient's graph (about two gradients' cost), with no forward
    pass. It works for every activation with a double backward (SiLU, GELU, ...); where an
    operation has none it falls back to forward-over-reverse (``torch.func``, re-running
    the batch's forward pass at each product), and raises a clear error if PyTorch has
    neither rule (``Hardsigmoid``).

    For a multilayer perceptron (``fast_path``) the product is instead Pearlmutter's
    R-operator written out on raw tensors (``_mlp.py``): building runs one forward and
    one backward pass (the gradient, kept as ``op.gradient``), each product column a
    tangent forward and a backward pass of 6 GEMMs per layer in all, no autograd.

    Args:
        model, loss_fn, data, params, cache, progress, allow_train_mode, vectorize,
            fast_path, route, output_fn, reference_kernels, process_group: see
            ``linops.curvature.CurvatureOperator`` (which also documents the attributes
            ``loss`` and ``gradient``, and ``info``: the route taken).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from linops.curvature import Hessian
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 1))
        >>> H = Hessian(model, nn.MSELoss(), (torch.randn(8, 3), torch.randn(8, 1)))
        >>> H
        Hessian(MSELoss, 21 params)
    """

    symbol = "H"
    _tag_set = frozenset({"self_adjoint"})
    _mlp_order = 2
    _route_choices = HVP_ROUTES

    def _linearize(self, X, y, generator):
        mlp = self._mlp_linearize(X)
        if mlp is not None:
            loss_state = self._loss_curv.prepare(mlp.out, y)
            grads = mlp_gradient(mlp, self._loss_curv.residual(loss_state))
            return {"mlp": mlp, "loss": loss_state, "grad": grads, "out": mlp.out, "y": y}
        leaves, out = self._forward(X)
        loss_state = self._loss_curv.prepare(out, y)
        with torch.enable_grad():
            value = self._loss_curv.summed_loss(out, y, loss_state)
            if not value.requires_grad:
                raise ValueError(
                    f"The loss does not depend on the parameters "
                    f"{_name_list(self.param_space.names)}."
                )
        grads = gradient_with_graph(value, leaves)
        unused = [n for n, g in zip(self.param_space.names, grads) if g is None]
        if unused:
            raise ValueError(
                f"The loss does not depend on the parameter(s) {_name_list(unused)}: their "
                "derivative is structurally zero. Leave them out of params."
            )
        rerun, loss_curv = self._rerun(X), self._loss_curv  # no reference to self: no cycle

        def loss_of(tensors):
            return loss_curv.summed_loss(rerun(tensors), y, loss_state)

        graph = GradientGraph(grads, leaves, loss_of, self.vectorize, route=self._route,
                              diagnose=self._diagnoser(X, 2))
        return {"graph": graph,
                "loss": loss_state, "grad": [g.detach() for g in grads],
                "value": value.detach().reshape(())}

    def _apply(self, state, V, k):
        if "mlp" in state:
            return mlp_hvp(state["mlp"], [v.detach() for v in V], k,
                           partial(self._loss_curv.hessian_product, state["loss"]))
        graph = state["graph"]
        out = graph.hvp(V, k)
        self._route_seen = graph.route_used
        return out

    def _state_gradient(self, state):
        return state["grad"]
