"""``GGN``, ``EmpiricalFisher``, ``MCFisher``: Jᵀ B J over a data set, network level.

All three multiply with ``c Σ_n J_nᵀ B_n J_n`` where ``J_n`` is the Jacobian of the model's
output on sample ``n`` in the parameters and ``c`` the loss's scale (1, or 1/number of
terms for a mean). They differ in the output-space block ``B_n``:

- ``GGN``: the loss Hessian ``∇²_o ℓ`` in closed form (exact);
- ``EmpiricalFisher``: ``r_n r_nᵀ``, the outer product of the loss gradient in the output;
- ``MCFisher``: ``(1/S) Σ_s r̃_ns r̃_nsᵀ`` with gradients at labels drawn from the model,
  an unbiased estimate of the GGN.

A product costs ``J v`` (by default in forward mode: the batch's forward pass re-run with
dual tensors and no graph, k columns in one vmapped pass; or the double backward, or
``torch.func.linearize``: see ``route`` in ``CurvatureOperator``) and one reverse pass over
the kept graph (``Jᵀ u``) per batch; the forward pass with its graph runs once when the
operator is built (one batch, or ``cache=True``) or once per batch per product otherwise.
For a multilayer perceptron (``fast_path``) ``J v`` and ``Jᵀ u`` are hand-written on raw
tensors instead (``_mlp.py``): 4 GEMMs per layer, no autograd, k columns batched; for a
convolutional chain (convolutions, max pooling, Flatten, Linear layers, activations) too
(``_chain.py``): per convolution one convolution for ``J v`` and PyTorch's convolution
backward for ``Jᵀ u``.
"""

from __future__ import annotations

import torch

from ..autodiff._linearization import Linearization
from ._base import CurvatureOperator
from ._chain import chain_gradient, chain_jvp, chain_vjp
from ._distributed import rank_seed
from ._mlp import mlp_gradient, mlp_jvp, mlp_vjp

__all__ = ["GGN", "EmpiricalFisher", "MCFisher"]


class _JBJ(CurvatureOperator):
    def _linearize(self, X, y, generator):
        mlp = self._mlp_linearize(X)
        chain = None if mlp is not None else self._chain_linearize(X)
        if mlp is not None:
            out = mlp.out
            state = {"mlp": mlp}
        elif chain is not None:
            out = chain.out
            state = {"chain": chain}
        else:
            leaves, out = self._forward(X)
            prefer = self._preferred_jvp()
            lin = Linearization(out, leaves, self.param_space.names, rerun=self._rerun(X),
                                vectorize=self.vectorize, what="parameter",
                                route=self._route, diagnose=self._diagnoser(X, 1),
                                prefer=prefer,
                                prefer_columns=prefer == "double backward" and self.vectorize)
            state = {"lin": lin}
        state["loss"] = self._loss_curv.prepare(out, y)
        state["out"], state["y"] = out.detach(), y
        self._extend_state(state, generator)
        return state

    def _extend_state(self, state, generator) -> None:
        pass

    def _preferred_jvp(self) -> str:
        """The route ``route='auto'`` tries first. Measured (``benchmarks/architectures_bench.py``,
        2 shared cores): on attention models the double backward's product costs 10 to 30 %
        less than forward mode's (forward mode re-runs the math attention kernel with dual
        tensors); on convolutions with batch norm forward mode's costs 20 to 30 % less; on
        plain CNNs they tie, and forward mode's build is cheaper (no backward graph)."""
        attention = any("attention" in k for k in self._kernels.switches)
        return "double backward" if attention else "forward mode"

    def _apply(self, state, V, k):
        if "mlp" in state:
            mlp = state["mlp"]
            V = [v.detach() for v in V]
            return mlp_vjp(mlp, self._middle(state, mlp_jvp(mlp, V, k)), k)
        if "chain" in state:
            chain, batched = state["chain"], self.vectorize
            V = [v.detach() for v in V]
            return chain_vjp(chain, self._middle(state, chain_jvp(chain, V, k, batched)), k,
                             batched)
        lin = state["lin"]
        jv = lin.jvp(V, k)
        self._route_seen = lin.route_used
        if lin.columns_route_used is not None:
            self._columns_route_seen = lin.columns_route_used
        return lin.vjp(self._middle(state, jv), k)

    def _state_gradient(self, state):
        r = self._loss_curv.residual(state["loss"])
        if "mlp" in state:
            return mlp_gradient(state["mlp"], r)
        if "chain" in state:
            return chain_gradient(state["chain"], r)
        return [g[0] for g in state["lin"].vjp(r.unsqueeze(0), 1)]

    def _middle(self, state, T: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class GGN(_JBJ):
    """The generalized Gauss-Newton matrix of a model's loss over a data set (exact).

    ``G = c Σ_n J_nᵀ ∇²_o ℓ(o_n, y_n) J_n``: ``J_n`` is the Jacobian of the model output on
    sample ``n`` in the parameters, ``∇²_o ℓ`` the loss Hessian in the output (closed
    form, see ``linops.curvature.losses``) and ``c`` 1 for ``reduction='sum'`` or one over
    the number of terms for ``'mean'``: ``G`` is the GGN of the loss over the whole data
    set, however it is split into batches. PSD and self-adjoint.

    Cost: building one batch runs its forward pass (keeping its graph); each product
    column then costs a forward-mode pass (primal and tangent, no graph; on attention
    models the double backward instead, see ``route``) and a reverse pass over the kept
    graph, 1.4 to 1.7 gradients on the transformer, CNN (``fast_path=False``) and ResNet
    of ``benchmarks/architectures_bench.py``; k columns share one primal pass. For a
    multilayer perceptron (``fast_path``) building is one forward pass with raw operations
    and a product a hand-written tangent forward and backward pass (4 GEMMs per layer;
    0.9 to 1.1 autograd gradients on the reference MLP); the same for a convolutional
    chain (``linops.curvature._chain``: 0.8 to 0.9 gradients on the reference CNN).
    Over several batches without ``cache``, each product re-runs every batch's forward
    pass.

    Args:
        model, loss_fn, data, params, cache, progress, allow_train_mode, vectorize,
            fast_path, route, output_fn, reference_kernels, process_group: see
            ``linops.curvature.CurvatureOperator`` (which also documents the attributes
            ``loss`` and ``gradient``, and ``info``: the route taken).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from linops.curvature import GGN
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> G = GGN(model, nn.CrossEntropyLoss(), (X, y))
        >>> G
        GGN(CrossEntropyLoss, 26 params)
        >>> (G @ torch.randn(26)).shape
        torch.Size([26])
        >>> G.param_space.unflatten(G @ torch.randn(26))["0.weight"].shape
        torch.Size([4, 3])
        >>> G.fast_path, G.gradient.shape, G.loss.shape  # an MLP: hand-written products
        (True, torch.Size([26]), torch.Size([]))
    """

    symbol = "G"

    def _middle(self, state, T):
        return self._loss_curv.hessian_product(state["loss"], T)


def _outer_products(R: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """``Σ_s r_sn (r_snᵀ t_n)`` per sample n (dimension 1 of ``R``; dimension 1 of ``T``):
    ``R`` is ``(S, N, ...)``, ``T`` is ``(k, N, ...)``; returns ``(k, N, ...)``."""
    S, N = R.shape[0], R.shape[1]
    k = T.shape[0]
    Rf = R.reshape(S, N, -1)
    a = torch.einsum("snm,knm->ksn", Rf, T.reshape(k, N, -1))
    return torch.einsum("ksn,snm->knm", a, Rf).reshape(T.shape)


class EmpiricalFisher(_JBJ):
    """The empirical Fisher ``F = c Σ_n g_n g_nᵀ`` of a model's loss over a data set.

    ``g_n = ∇_θ ℓ_n`` is the gradient of sample ``n``'s loss (summed over the sample's
    outputs; a sample is an index along the output's first dimension) and ``c`` the same
    scale as the loss (1 for ``'sum'``, one over the number of terms for ``'mean'``). PSD.

    Computed as ``c Σ_n J_nᵀ r_n r_nᵀ J_n`` with ``r_n = ∇_o ℓ`` in closed form: each product
    column costs two reverse passes, like the GGN.

    Args:
        model, loss_fn, data, params, cache, progress, allow_train_mode, vectorize,
            fast_path, process_group: see ``linops.curvature.CurvatureOperator``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from linops.curvature import EmpiricalFisher
        >>> model = nn.Linear(3, 2)
        >>> F = EmpiricalFisher(model, nn.MSELoss(), (torch.randn(8, 3), torch.randn(8, 2)))
        >>> F.shape
        (8, 8)
    """

    symbol = "F"

    def _extend_state(self, state, generator):
        state["R"] = self._loss_curv.residual(state["loss"]).unsqueeze(0)

    def _middle(self, state, T):
        return _outer_products(state["R"], T)


class MCFisher(_JBJ):
    """The Monte-Carlo Fisher: the GGN estimated with labels drawn from the model.

    ``F̃ = c Σ_n (1/S) Σ_s J_nᵀ r̃_ns r̃_nsᵀ J_n`` where ``r̃_ns = ∇_o ℓ(o_n, ỹ_ns)`` at labels
    ``ỹ_ns`` drawn from the model's predictive distribution (categorical for cross
    entropy, Bernoulli for BCE, Gaussian with variance 1/2 for the squared error), so
    that ``E[F̃] = GGN``. PSD.

    The draws are made once per batch with a generator seeded by ``seed`` at the start of
    every pass over the data, so every product sees the same matrix (CG and Lanczos need
    one fixed operator) as long as the batches come in the same order: with a shuffling
    DataLoader pass ``cache=True`` or a fixed order.

    Args:
        mc_samples: ``S``, the number of draws per sample (≥ 1).
        seed: the seed of the draws (over a process group, rank r draws with
            ``seed + r·2³²``: different samples on each rank, reproducible).
        model, loss_fn, data, params, cache, progress, allow_train_mode, vectorize,
            fast_path, process_group: see ``linops.curvature.CurvatureOperator``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from linops.curvature import MCFisher
        >>> model = nn.Linear(3, 4)
        >>> X, y = torch.randn(8, 3), torch.randint(0, 4, (8,))
        >>> F = MCFisher(model, nn.CrossEntropyLoss(), (X, y), mc_samples=4, seed=0)
        >>> F
        MCFisher(CrossEntropyLoss, 16 params, mc_samples=4)
    """

    symbol = "F"

    def __init__(self, model, loss_fn, data, params=None, *, mc_samples: int = 1,
                 seed: int = 0, **kwargs):
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer; got {mc_samples!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer; got {seed!r}.")
        self.mc_samples = mc_samples
        self.seed = seed
        super().__init__(model, loss_fn, data, params, **kwargs)

    def _new_generator(self):
        seed = rank_seed(self.seed, self._group)  # seed + rank·2³² over a process group
        return torch.Generator(device=self.device).manual_seed(seed)

    def _extend_state(self, state, generator):
        R = self._loss_curv.sampled_residuals(state["loss"], self.mc_samples, generator)
        state["R"] = R / self.mc_samples**0.5

    def _middle(self, state, T):
        return _outer_products(state["R"], T)

    def _repr(self):
        return (f"MCFisher({self._loss_curv.name}, {self.shape[0]} params, "
                f"mc_samples={self.mc_samples})")
