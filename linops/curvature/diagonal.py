"""``DiagGGN`` and ``DiagHessian``: curvature diagonals from the layer-wise engine, as
``linops.Diagonal`` operators for the solvers (``solvers.inv(D + λ·I_like(D))``,
``CG(preconditioner=...)``), and the ``.diag()`` of the network-level operators."""

from __future__ import annotations

import torch

from ..diagonal import Diagonal
from ..params import ParamSpace
from ._data import Batches
from ._distributed import group_sums, rank_seed, resolve_group, unwrap_ddp
from .losses import as_count
from .quantities import Engine, run

__all__ = ["DiagGGN", "DiagHessian", "operator_diagonal", "diagonal_pieces"]


def diagonal_pieces(model, loss_fn, data, params, name, mc_samples, seed, progress=False,
                    process_group=None, caller="DiagGGN"):
    """``(engine, values, info)`` of the layer-wise engine's pass for the diagonal ``name``
    (a ``quantities`` name) with the gradient: per parameter, before any flattening (what
    ``DiagGGN`` / ``DiagHessian`` join, and what an optimizer can use as they are)."""
    group = resolve_group(process_group)
    seed = seed if seed is None else rank_seed(seed, group)
    engine = Engine(unwrap_ddp(model, group), loss_fn, params, mc_samples=mc_samples or 1,
                    seed=seed)
    sums, guard = group_sums(group, engine, caller)
    with guard:
        values, info = run(engine, data, [name], progress, gradient=True, sums=sums)
    return engine, values[name], info


class _CurvatureDiagonal(Diagonal):
    """A curvature diagonal over a data set, with the loss and gradient of the same pass."""

    _name = "D"

    def __init__(self, model, loss_fn, data, params, name, mc_samples, seed, progress,
                 process_group=None):
        engine, values, info = diagonal_pieces(model, loss_fn, data, params, name, mc_samples,
                                               seed, progress, process_group,
                                               type(self).__name__)
        values = {name: values}
        space = ParamSpace(engine.params)
        super().__init__(space.join([values[name][n] for n in space.names]))
        #: the layout of the parameters (``param_space.unflatten(D.d)`` gives a dict)
        self.param_space = space
        #: the loss over the data set at the parameters (0-dim, detached)
        self.loss = info["loss"]
        #: its gradient, flat in ``param_space`` order (detached)
        self.gradient = space.join([info["gradient"][n] for n in space.names]).detach()
        #: the model output of a single batch (None over several batches), detached
        self.output = info["output"]
        #: the number of terms the loss sums (what a mean divides by)
        self.num_terms = as_count(info["num_terms"])
        self._loss_name = engine.loss_curv.name

    def _repr(self):
        return f"{type(self).__name__}({self._loss_name}, {self.shape[0]} params)"


class DiagGGN(_CurvatureDiagonal):
    """The diagonal of the GGN (exact, or Monte-Carlo) of a model's loss over a data set.

    ``diag(G)`` with ``G`` as ``linops.curvature.GGN`` (``mc_samples=None``) or as
    ``linops.curvature.MCFisher(mc_samples=S, seed=seed)`` (an unbiased estimate whose
    entries are never negative, unlike a probing estimate). Computed by the layer-wise
    engine in one forward and one batched backward pass per batch (the C columns of the
    loss Hessian's square root, or S sampled columns, together with the gradient), so
    ``loss`` and ``gradient`` come free. A ``linops.Diagonal``, tagged PSD, in
    ``param_space`` order.

    Args:
        model, loss_fn, data, params: see ``linops.curvature.quantities``.
        mc_samples: None for the exact diagonal; S ≥ 1 for the Monte-Carlo one.
        seed: the seed of the Monte-Carlo draws (None: torch's global generator).
        progress: a tqdm bar over the batches.
        process_group: a ``torch.distributed`` process group over whose ranks the data is
            sharded: the diagonal, loss and gradient of the union of the shards (one
            all-reduce after the pass; rank r draws with ``seed + r·2³²``).

    Attributes:
        param_space, loss, gradient, output (the model output of a single batch),
        num_terms.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from linops.curvature import DiagGGN
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> D = DiagGGN(model, nn.CrossEntropyLoss(), (X, y), mc_samples=1, seed=0)
        >>> D, D.d.shape, bool((D.d >= 0).all()), D.gradient.shape
        (DiagGGN(CrossEntropyLoss, 26 params), torch.Size([26]), True, torch.Size([26]))
    """

    def __init__(self, model, loss_fn, data, *, params=None, mc_samples: int | None = None,
                 seed: int | None = None, progress: bool = False, process_group=None):
        if mc_samples is not None and (isinstance(mc_samples, bool) or not isinstance(
                mc_samples, int) or mc_samples < 1):
            raise ValueError(f"mc_samples must be None (exact) or a positive integer; got "
                             f"{mc_samples!r}.")
        name = "diag_ggn_exact" if mc_samples is None else "diag_ggn_mc"
        super().__init__(model, loss_fn, data, params, name, mc_samples, seed, progress,
                         process_group)
        self.mc_samples = mc_samples
        self._tags = frozenset({"self_adjoint", "psd"})


class DiagHessian(_CurvatureDiagonal):
    """The diagonal of the Hessian of a model's loss over a data set.

    Exact (``estimator=None``) by the layer-wise engine for models whose only
    nonlinearities are elementwise activation modules, with Linear, convolution,
    eval-mode BatchNorm, pooling and residual connections between them (see
    ``linops.curvature.quantities``; any other model raises and points here). With
    ``estimator="hutchinson"`` it is estimated from ``samples`` Rademacher probes of
    ``linops.curvature.Hessian`` products, for any model: ``diag ≈ (1/s) Σ z ⊙ H z``;
    ``D.record`` then holds the products spent and the per-entry standard error. An
    estimated diagonal can have negative entries even where the Hessian is PSD: clamp
    it (``D.d.clamp_min(0)``) before using it as a preconditioner. For XDiag, use
    ``solvers.diag(linops.curvature.Hessian(...), alg=solvers.XDiag(...))``.

    Not tagged PSD (a Hessian need not be).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from linops.curvature import DiagHessian
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> DiagHessian(model, nn.CrossEntropyLoss(), (X, y)).shape
        (26, 26)
    """

    def __init__(self, model, loss_fn, data, *, params=None, estimator: str | None = None,
                 samples: int = 100, seed: int = 0, progress: bool = False,
                 process_group=None):
        if estimator not in (None, "hutchinson"):
            raise ValueError(
                f"estimator must be None (exact) or 'hutchinson'; got {estimator!r}. For "
                "XDiag use solvers.diag(linops.curvature.Hessian(...), alg=solvers.XDiag(...))."
            )
        self.record = None
        if estimator is None:
            super().__init__(model, loss_fn, data, params, "diag_h", None, None, progress,
                             process_group)
            return
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
            raise ValueError(f"samples must be an integer ≥ 2 (the standard error needs two "
                             f"probes); got {samples!r}.")
        from .hessian import Hessian

        H = Hessian(model, loss_fn, data, params, progress=progress,
                    process_group=process_group)
        d, se = _hutchinson_diagonal(H, samples, seed)
        Diagonal.__init__(self, d)
        self.param_space = H.param_space
        self.loss, self.gradient, self.output = H.loss, H.gradient, None
        self.num_terms = H.num_terms
        self._loss_name = H._loss_curv.name
        #: the estimate's record: products spent and per-entry standard error
        self.record = {"estimator": "hutchinson", "products": samples, "stderr": se}


def _hutchinson_diagonal(A, samples: int, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    Z = (torch.randint(0, 2, (A.shape[0], samples), generator=g) * 2 - 1).to(A.dtype)
    Z = Z.to(A.device)
    est = Z * (A @ Z)  # (n, s)
    return est.mean(1), est.std(1) / samples**0.5


def operator_diagonal(op) -> torch.Tensor:
    """The diagonal of a network-level curvature operator by the layer-wise engine (the
    same matrix: the Monte-Carlo Fisher's draws are made with the operator's seed in
    the same order)."""
    from .ggn import GGN, EmpiricalFisher, MCFisher
    from .hessian import Hessian

    if isinstance(op, MCFisher):
        name, mc, seed = "diag_ggn_mc", op.mc_samples, rank_seed(op.seed, op._group)
    elif isinstance(op, GGN):
        name, mc, seed = "diag_ggn_exact", 1, None
    elif isinstance(op, EmpiricalFisher):
        name, mc, seed = "sum_grad_squared", 1, None
    elif isinstance(op, Hessian):
        name, mc, seed = "diag_h", 1, None
    else:  # pragma: no cover - every curvature operator is one of the above
        raise NotImplementedError(type(op).__name__)
    engine = Engine(op.model, op.loss_fn, op.params, mc_samples=mc, seed=seed)
    data = op.data if not isinstance(op.data, Batches) else op.data
    sums, guard = group_sums(op._group, engine, f"{type(op).__name__}.diag()")
    with guard:
        values, info = run(engine, _raw_batches(data), [name], sums=sums)
    d = op.param_space.join([values[name][n] for n in op.param_space.names])
    if name == "sum_grad_squared" and engine.loss_curv.reduction == "mean":
        d = d * float(info["num_terms"])  # Σ gₙ² / c from Σ (gₙ / c)²
    return d


def _raw_batches(batches: Batches):
    return batches._data[0] if batches.single else batches._data
