"""``BlockDiagCurvature``: block-diagonal GGN, Hessian and positive-curvature Hessian.

The block of a parameter (or of a layer's parameters) θ_b of the loss over the data is,
with ``c`` = 1 for ``reduction='sum'`` and one over the number of loss terms for
``'mean'`` (see ``linops.curvature.losses``), summed over the samples n::

    C_b = c Σₙ [ J_{o,b}ᵀ ∇²_o ℓₙ J_{o,b}  +  Σ_a J_{h_a,b}ᵀ diag(R̃_a) J_{h_a,b} ]

``J_{o,b}`` is the Jacobian of the model output in θ_b, and for each elementwise
activation module ``z_a = σ(h_a)`` of the model ``J_{h_a,b}`` is the Jacobian of its input
h_a in θ_b and ``R_a = (∂ℓ/∂z_a) ⊙ σ''(h_a)`` its residual (second-order) term. The choice
of ``R̃`` names the curvature:

==============  ====================  =================================================
curvature       R̃                     the block is
==============  ====================  =================================================
``"ggn"``       0                     the GGN's block (PSD; any model)
``"hessian"``   R                     the Hessian's block (exact on the models below)
``"pch-abs"``   |R|                   the positive-curvature Hessian (PSD)
``"pch-clip"``  max(R, 0)             the positive-curvature Hessian, clipped (PSD)
==============  ====================  =================================================

This is Hessian backpropagation (HBP) with BackPACK's ``modify_2nd_order_terms`` =
``'zero'``, ``None``, ``'abs'``, ``'clip'``: Dangel, Harmeling & Hennig, "Modular
block-diagonal curvature approximations for feedforward architectures" (AISTATS 2020);
BackPACK's ``GGNMP``, ``HMP`` and ``PCHMP``. The Hessian formula is exact when every
nonlinearity of the model is an elementwise activation module and every other operation
is linear or piecewise linear (Linear, convolutions, eval-mode BatchNorm, pooling, ReLU,
residual additions, reshapes) and no parameter is used twice: then the only second-order
terms inside a block are the activations' (products of two parameters only couple
different blocks). The layer-wise engine's graph check (``_Plan.check_hessian_graph``)
verifies this on every batch, and a check of our own that no matrix product multiplies two
tensors depending on one parameter (``h @ h.T``); other models raise for ``"hessian"`` and
``"pch-*"`` (the GGN takes any model).

No block is formed. Per batch the operator runs one forward pass (recording the
activations' inputs h_a), back-propagates the gradient to the activations once (for R),
and builds the double-backward graph ``g(w) = Σ_y (∂y/∂θ)ᵀ w_y`` over the outputs
``y ∈ {o, h_1, …}`` once (one reverse pass with ``create_graph=True``). A product of
block b with k columns is then two reverse passes over the part of the graph downstream of
θ_b, with no forward pass and no forward-mode AD: ``J_{y,b} v = ∂⟨g_b(w), v⟩/∂w`` (the
double-backward trick), the middle ``∇²_o ℓ t_o`` and ``R̃ ⊙ t_h``, and
``J_{y,b}ᵀ u`` by one reverse pass.
"""

from __future__ import annotations

import torch
from torch import nn

from ..autodiff._linearization import Linearization, _twice_differentiable, batched_grad
from ..blockdiag import BlockDiag
from ..operator import LinearOperator
from ._base import CurvatureOperator
from ._data import require_terms
from ._distributed import resolve_group, unwrap_ddp
from ._records import param_owners
from .quantities import Engine, _num_samples, _Plan, activation_residual

__all__ = ["BlockDiagCurvature", "block_product_callables", "CURVATURES", "BLOCKINGS"]

#: the values of ``curvature=``
CURVATURES = ("ggn", "hessian", "pch-abs", "pch-clip")
#: the values of ``blocks=``
BLOCKINGS = ("parameter", "layer")
#: ``quantities`` names (BackPACK's savefields) → the curvature they multiply with
QUANTITY_CURVATURES = {"ggnmp": "ggn", "hmp": "hessian", "pchmp_abs": "pch-abs",
                       "pchmp_clip": "pch-clip"}
#: modules whose parameters enter their output jointly affinely (no second-order term
#: between two parameters of the module): a layer block of them is exact for the Hessian
_AFFINE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                  nn.ConvTranspose2d, nn.ConvTranspose3d, nn.modules.batchnorm._BatchNorm)


def _check_choice(value, choices, what):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"{what}={value!r} is not known; the valid values are "
            f"{', '.join(repr(c) for c in choices)}."
        )
    return value


class _BlockEngine(CurvatureOperator):
    """The block-diagonal curvature as one ``n × n`` operator over the data (private: the
    public ``BlockDiagCurvature`` wraps it). It owns the passes over the data, the mean
    scaling, ``loss`` and ``gradient``; ``blocks`` lists each block's parameter indices."""

    def __init__(self, model, loss_fn, data, params, curvature, blocks, *, cache, progress,
                 vectorize, process_group=None):
        self.curvature = _check_choice(curvature, CURVATURES, "curvature")
        self.blocking = _check_choice(blocks, BLOCKINGS, "blocks")
        if isinstance(model, nn.Module):
            model = unwrap_ddp(model, resolve_group(process_group))
        self._engine = None
        if self.curvature != "ggn":
            # the engine's checks (eval mode, batch-first layers) and its graph check
            self._engine = Engine(model, loss_fn, params)
        self._tag_set = (frozenset({"self_adjoint"}) if self.curvature == "hessian"
                         else frozenset({"self_adjoint", "psd"}))
        self.blocks = None
        self._setup_blocks(model, params)
        super().__init__(model, loss_fn, data, params, cache=cache, progress=progress,
                         vectorize=vectorize, fast_path=False, route="double backward",
                         process_group=process_group)

    # ----------------------------------------------------------------- blocks
    def _setup_blocks(self, model, params):
        from ._data import resolve_params

        names = list(resolve_params(model, params))
        if self.blocking == "parameter":
            self.blocks = [[i] for i in range(len(names))]
            self.block_names = [[n] for n in names]
            self.block_labels = list(names)
            self.block_modules = [None] * len(names)
            return
        owners = param_owners(model, names)
        first_owner = {}
        for m, (path, locals_) in owners.items():
            for n in locals_.values():
                first_owner.setdefault(n, (m, path))
        groups, order = {}, []
        for i, n in enumerate(names):
            m, path = first_owner[n]
            if m not in groups:
                groups[m] = []
                order.append((m, path))
            elif groups[m][-1] != i - 1:
                raise ValueError(
                    f"blocks='layer' needs each layer's parameters next to each other in "
                    f"params (the flat layout is params' order), but {n!r} is apart from "
                    f"{names[groups[m][-1]]!r}. Pass params in model.named_parameters() "
                    "order, or blocks='parameter'."
                )
            groups[m].append(i)
        self.blocks = [groups[m] for m, _ in order]
        self.block_names = [[names[i] for i in groups[m]] for m, _ in order]
        self.block_labels = [path or "model" for _, path in order]
        self.block_modules = [m for m, _ in order]
        if self.curvature != "ggn":
            for m, label, bn in zip(self.block_modules, self.block_labels, self.block_names):
                if len(bn) > 1 and not isinstance(m, _AFFINE_LAYERS):
                    raise ValueError(
                        f"blocks='layer' with curvature={self.curvature!r} is exact for "
                        f"layers whose parameters enter their output affinely (Linear, "
                        f"convolutions, batch norm), but {label!r} ({type(m).__name__}) "
                        f"holds {bn} and may multiply them together, which adds "
                        "second-order terms the engine does not back-propagate. Use "
                        "blocks='parameter', or curvature='ggn'."
                    )

    # ----------------------------------------------------------------- one batch
    def _linearize(self, X, y, generator):
        names = self.param_space.names
        acts = []
        if self._engine is None:
            leaves, out = self._forward(X)
        else:
            eng = self._engine
            tensors = {**eng.tensors, **{n: self.params[n].detach() for n in names}}
            rec = eng.record(X, activations=True, tensors=tensors)
            out = rec.output
            plan = _Plan(eng, rec, _num_samples(X, out))
            leaves = [rec.leaves[n] for n in names]
            try:
                plan.check_hessian_graph()
            except ValueError as err:
                raise ValueError(
                    f"BlockDiagCurvature(curvature={self.curvature!r}) needs the model "
                    f"class where the exact Hessian diagonal is exact, and the check says: "
                    f"{err} For block-diagonal curvature on this model use curvature='ggn'."
                ) from None
            acts = rec.activations
        loss_state = self._loss_curv.prepare(out, y)
        state = {"loss": loss_state, "out": out.detach(), "y": y}
        ys, Rs = [out], [None]
        if acts:
            ys_a, Rs_a = self._residual_terms(out, acts, loss_state)
            ys += ys_a
            Rs += Rs_a
        state["ys"], state["R"], state["leaves"] = ys, Rs, leaves
        self._build_double_backward(state, X)
        return state

    def _residual_terms(self, out, acts, loss_state):
        """``(h_a, R̃_a)`` for every activation whose input depends on the parameters,
        whose output reaches the loss and whose second derivative is not zero."""
        from ._records import backprop

        r = self._loss_curv.residual(loss_state).unsqueeze(0)
        live = [a for a in acts if a.args[0].requires_grad]
        g_z = backprop(out, [a.output for a in live], r, self.vectorize)
        hs, Rs = [], []
        for a, g in zip(live, g_z):
            R = None if g is None else activation_residual(a, g[0])
            if R is None:
                continue
            h = a.args[0]
            R = R.detach()
            if self.curvature == "pch-abs":
                R = R.abs()
            elif self.curvature == "pch-clip":
                R = R.clamp_min(0)
            hs.append(h)
            Rs.append(R)
        return hs, Rs

    def _build_double_backward(self, state, X):
        ys, leaves = state["ys"], state["leaves"]
        with torch.enable_grad():
            ws = [torch.zeros_like(y, requires_grad=True) for y in ys]
            g = torch.autograd.grad(ys, leaves, ws, create_graph=True, allow_unused=True)
        unused = [n for n, gi in zip(self.param_space.names, g) if gi is None]
        if unused:
            raise ValueError(
                f"The loss does not depend on the parameter(s) {unused[:8]}: their block is "
                "structurally zero. Leave them out of params."
            )
        state["w"], state["g"] = ws, list(g)
        if not _twice_differentiable([gi for gi in g if gi.requires_grad]):
            if self._engine is not None:
                raise ValueError(
                    f"BlockDiagCurvature(curvature={self.curvature!r}) multiplies by the "
                    "double-backward trick, but an operation of the model has a backward "
                    "marked once_differentiable (or without a derivative). Use "
                    "curvature='ggn' (which falls back to forward mode)."
                )
            # the GGN: J v in forward mode, re-running the batch's forward pass
            state["fwd"] = Linearization(ys[0], leaves, self.param_space.names,
                                         rerun=self._rerun(X), vectorize=self.vectorize,
                                         what="parameter", route="forward mode")

    # ----------------------------------------------------------------- products
    def _jvp_block(self, state, idx, V, k):
        """``[J_{y,b} v for y in ys]``, each ``(k, *y.shape)``."""
        ys = state["ys"]
        if "fwd" in state:
            full = [None] * len(self.param_space.names)
            for i, v in zip(idx, V):
                full[i] = v
            pad = [v if v is not None else torch.zeros((k, *s), dtype=self.dtype,
                                                       device=self.device)
                   for v, s in zip(full, self.param_space.shapes)]
            return [state["fwd"].jvp(pad, k)]
        live = [(state["g"][i], v) for i, v in zip(idx, V) if state["g"][i].requires_grad]
        if not live:
            return [y.new_zeros((k, *y.shape)) for y in ys]
        T = batched_grad([g for g, _ in live], state["w"], [v for _, v in live], k,
                         self.vectorize)
        # an output upstream of the block comes back as unbatched zeros from a vmapped
        # pass (materialize_grads): give it its k columns
        return [t if t.shape == (k, *y.shape) else y.new_zeros((k, *y.shape))
                for t, y in zip(T, ys)]

    def _apply_block(self, state, idx, V, k):
        T = self._jvp_block(state, idx, V, k)
        ys = [state["ys"][0]]
        U = [self._loss_curv.hessian_product(state["loss"], T[0])]
        for y, t, R in zip(state["ys"][1:], T[1:], state["R"][1:]):
            ys.append(y)
            U.append(t * R)
        leaves = [state["leaves"][i] for i in idx]
        return batched_grad(ys, leaves, U, k, self.vectorize)

    def _apply(self, state, V, k):
        out = [None] * len(V)
        for idx in self.blocks:
            for i, r in zip(idx, self._apply_block(state, idx, [V[i] for i in idx], k)):
                out[i] = r
        return out

    def _state_gradient(self, state):
        r = self._loss_curv.residual(state["loss"])
        return list(torch.autograd.grad(state["ys"][0], state["leaves"], r, retain_graph=True,
                                        materialize_grads=True))

    def block_matmat(self, b: int, X: torch.Tensor) -> torch.Tensor:
        """``C_b X`` for block ``b`` alone, ``X`` of shape ``(n_b, k)``: one pass over the
        data (the cached linearization when there is one); over a process group, one
        all-reduce of the block's ``n_b × k`` product."""
        k = X.shape[1]
        idx = self.blocks[b]
        shapes = [self.param_space.shapes[i] for i in idx]
        sizes = [self.param_space.numels[i] for i in idx]

        def local():
            V = [p.reshape(k, *s) for p, s in zip(torch.split(X.mT, sizes, dim=1), shapes)]
            states = self._states if self._states is not None else self._linearize_pass()
            acc, total = None, 0
            for state in states:
                part = self._apply_block(state, idx, V, k)
                acc = part if acc is None else [a.add_(p) for a, p in zip(acc, part)]
                total = total + self._loss_curv.count(state["loss"])
            if acc is None:  # no batch on this rank
                return X.new_zeros(X.shape), total
            return torch.cat([a.reshape(k, -1) for a in acc], dim=1).mT, total

        if self._collective is None:
            out, total = local()
        else:  # one all_reduce of the block's product, the count and the input's checksums
            out, total = self._collective.product(X, local)
        require_terms(self, total)
        if self._loss_curv.reduction == "mean":
            out = out / (self._num_terms if self._states is not None else total)
        return out

    def _diag(self):
        raise NotImplementedError  # BlockDiagCurvature.diag() answers

    def _repr(self):
        return (f"BlockDiagCurvature({self._loss_curv.name}, {self.curvature}, "
                f"{len(self.blocks)} {self.blocking} blocks, {self.shape[0]} params)")


class _Block(LinearOperator):
    """Block ``b`` of a ``BlockDiagCurvature``: multiplied by its engine, never formed."""

    def __init__(self, engine: _BlockEngine, b: int):
        n = sum(engine.param_space.numels[i] for i in engine.blocks[b])
        super().__init__(engine.dtype, (n, n), engine.device)
        self._engine, self._b = engine, b
        self._tags = engine._tag_set
        #: the parameter names of the block, in the flat layout's order
        self.names = list(engine.block_names[b])
        self.symbol = "C"

    def _matmat(self, X):
        return self._engine.block_matmat(self._b, X)

    def _to(self, dtype, device):
        return self._engine._to(dtype, device)

    def _repr(self):
        return f"C[{self._engine.block_labels[self._b]}]"


class BlockDiagCurvature(BlockDiag):
    """Block-diagonal GGN, Hessian or positive-curvature Hessian of a model's loss.

    ``diag(C_1, …, C_d)`` with one block per parameter (``blocks="parameter"``) or per
    module owning parameters (``blocks="layer"``), in the flat layout of
    ``linops.curvature.GGN`` on the same ``params`` (``op.param_space``). Block b is
    ``C_b = c Σₙ [J_{o,b}ᵀ ∇²_o ℓₙ J_{o,b} + Σ_a J_{h_a,b}ᵀ diag(R̃_a) J_{h_a,b}]`` with
    ``R̃ = 0`` (``"ggn"``), ``R`` (``"hessian"``), ``|R|`` (``"pch-abs"``) or
    ``max(R, 0)`` (``"pch-clip"``), ``R_a = ∂ℓ/∂z_a ⊙ σ''(h_a)`` the second-order term of
    the elementwise activation ``z_a = σ(h_a)`` (see this module's docstring; Dangel,
    Harmeling & Hennig, AISTATS 2020). ``c`` is 1 for ``reduction='sum'`` and one over the
    number of loss terms over the whole data set for ``'mean'``. Tagged PSD for ``"ggn"``
    and ``"pch-*"``, self-adjoint for ``"hessian"``; every block carries the same tag, so
    ``solvers.inv`` of it is block-wise CG or Cholesky.

    ``"hessian"`` and ``"pch-*"`` need a model whose only nonlinearities are elementwise
    activation modules (``nn.Tanh``, ``nn.Sigmoid``, ``nn.SiLU``, ``nn.GELU``, ...) between
    Linear, convolution, eval-mode batch-norm, pooling, ReLU, residual and reshape
    operations, each parameter used once; each batch's graph is checked and any other
    model raises, naming the operation (``curvature="ggn"`` takes any model). On such a
    model ``"hessian"`` is exact: block b equals the Hessian's diagonal block.

    Cost: per batch one forward pass, one reverse pass for the activations' gradients and
    one reverse pass with ``create_graph=True`` (over one batch, or ``cache=True``: once;
    else at every product). A product with k columns then costs, per block, two reverse
    passes of k columns over the part of the graph downstream of the block's parameters,
    computing parameter gradients for that block only; in all about one GGN product
    (measured 1.0-1.3× ``GGN(..., route="double backward")`` on an MLP 784-256-128-10,
    batch 128, CPU). ``op.blocks[b] @ x`` multiplies block b alone. No forward pass per
    product (the GGN of a model with a backward that cannot be differentiated twice falls
    back to forward mode, which re-runs the forward pass).

    Args:
        model: a ``torch.nn.Module`` in eval mode.
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``,
            ``reduction='mean'`` or ``'sum'``.
        data: one batch ``(X, y)`` or a re-iterable of batches (a DataLoader).
        curvature: ``"ggn"``, ``"hessian"``, ``"pch-abs"`` or ``"pch-clip"``.
        blocks: ``"parameter"`` or ``"layer"`` (the parameters a module owns directly form
            one block; with ``"hessian"``/``"pch-*"`` only for affine layers: Linear,
            convolutions, batch norm).
        params: dict name → tensor, a subset of ``model.named_parameters()``; None for
            every parameter that requires grad.
        cache: over several batches, keep every batch's linearization.
        progress: a tqdm progress bar over the batches of each pass.
        vectorize: products with k columns in one vmapped pass (None: on GPU only).
        process_group: a ``torch.distributed`` process group over whose ranks the data is
            sharded (see ``linops.curvature.GGN``): a product of the whole operator or of one
            block (``op.blocks[b] @ X``, which ``solvers.inv`` uses block by block) costs one
            all-reduce of its n × k (n_b × k) result, the mean divides by the global number
            of terms, and ``loss``, ``gradient`` and ``diag()`` are those of the union of
            the shards; None: one process.

    Attributes:
        param_space: the flat layout (``param_space.unflatten(v)`` gives a dict).
        block_names: the parameter names of each block.
        loss, gradient: the loss over the data and its flat gradient (as
            ``linops.curvature.GGN``'s).

    Raises:
        ValueError: an unknown ``curvature`` or ``blocks`` (the message lists the valid
            values); ``"hessian"``/``"pch-*"`` on a model outside the class above (the
            message names the operation and suggests ``curvature='ggn'``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from linops.curvature.blocks import BlockDiagCurvature
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> C = BlockDiagCurvature(model, nn.CrossEntropyLoss(), (X, y), curvature="pch-abs")
        >>> [b.shape for b in C.blocks]
        [(12, 12), (4, 4), (8, 8), (2, 2)]
        >>> (C @ torch.randn(26, 3)).shape
        torch.Size([26, 3])
        >>> from linops import is_psd
        >>> is_psd(C)
        True
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, data, curvature: str = "ggn",
                 blocks: str = "parameter", params=None, *, cache: bool = False,
                 progress: bool = False, vectorize: bool | None = None, process_group=None):
        engine = _BlockEngine(model, loss_fn, data, params, curvature, blocks, cache=cache,
                              progress=progress, vectorize=vectorize,
                              process_group=process_group)
        super().__init__(*[_Block(engine, b) for b in range(len(engine.blocks))])
        self._tags = engine._tag_set
        self.engine = engine
        self.curvature = engine.curvature
        self.param_space = engine.param_space
        self.block_names = [list(n) for n in engine.block_names]
        self._raw_data = data

    def _matmat(self, X):
        return self.engine._matmat(X)  # one pass over the data for every block

    @property
    def loss(self) -> torch.Tensor:
        """The loss over the data set at the parameters (0-dim, detached)."""
        return self.engine.loss

    @property
    def gradient(self) -> torch.Tensor:
        """The loss's gradient, flat in ``param_space`` order (detached)."""
        return self.engine.gradient

    @property
    def num_terms(self):
        return self.engine.num_terms

    def _transpose(self):
        return self

    def _adjoint(self):
        return self

    def _to(self, dtype, device):
        return self.engine._to(dtype, device)

    def _diag(self):
        """The diagonal from the layer-wise engine: ``diag_ggn_exact`` (ggn) or ``diag_h``
        (hessian), one pass over the data."""
        if self.curvature not in ("ggn", "hessian"):
            raise NotImplementedError(
                f"The diagonal of the {self.curvature} blocks has no engine formula yet; "
                "estimate it with solvers.diag(op) or take op.to_dense().diagonal()."
            )
        from .quantities import quantities

        name = "diag_ggn_exact" if self.curvature == "ggn" else "diag_h"
        raw = self._raw_data
        q = quantities(self.engine.model, self.engine.loss_fn, raw, [name],
                       params=self.engine.params, process_group=self.engine._group)[name]
        return self.param_space.join([q[n] for n in self.param_space.names])

    def _repr(self):
        return self.engine._repr()


def block_product_callables(model: nn.Module, loss_fn: nn.Module, data, curvature: str,
                            params=None, *, cache: bool = False, progress: bool = False,
                            vectorize: bool | None = None, process_group=None) -> dict:
    """BackPACK-style block products: ``{param_name: f}`` with ``f(V)`` = the parameter's
    block of ``curvature`` times each of the V matrices in ``V`` (shape ``(V, *p.shape)``,
    returned in the same shape) — BackPACK's ``p.ggnmp(V)``, ``p.hmp(V)``,
    ``p.pchmp(V)`` with ``modify='abs'``/``'clip'``.

    ``curvature`` is one of ``CURVATURES`` or a ``quantities`` name (``"ggnmp"``,
    ``"hmp"``, ``"pchmp_abs"``, ``"pchmp_clip"``). The callables share one
    ``BlockDiagCurvature(..., blocks="parameter")`` (over one batch its linearization is
    kept; over a DataLoader each call passes over the data unless ``cache=True``); a call
    costs two reverse passes of V columns per batch over the graph downstream of the
    parameter. ``params``, ``cache``, ``progress``, ``vectorize``, ``process_group``: as for
    ``BlockDiagCurvature``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from linops.curvature.blocks import block_product_callables
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> X, y = torch.randn(5, 3, 4), torch.randint(0, 3, (5,))
        >>> f = block_product_callables(model, nn.CrossEntropyLoss(), (X, y), "hmp")
        >>> f["1.weight"](torch.randn(2, 3, 12)).shape
        torch.Size([2, 3, 12])
    """
    if isinstance(curvature, str) and curvature in QUANTITY_CURVATURES:
        curvature = QUANTITY_CURVATURES[curvature]
    _check_choice(curvature, CURVATURES + tuple(QUANTITY_CURVATURES), "curvature")
    op = BlockDiagCurvature(model, loss_fn, data, curvature=curvature, blocks="parameter",
                            params=params, cache=cache, progress=progress,
                            vectorize=vectorize, process_group=process_group)
    out = {}
    for block, names in zip(op.blocks, op.block_names):
        (name,) = names
        shape = op.param_space.shapes[op.param_space.names.index(name)]
        out[name] = _product_fn(block, name, tuple(shape))
    return out


def _product_fn(block, name, shape):
    def product(V: torch.Tensor) -> torch.Tensor:
        if not isinstance(V, torch.Tensor) or tuple(V.shape[1:]) != shape:
            got = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise ValueError(
                f"The block product of {name!r} takes V of shape (V, {', '.join(map(str, shape))}) "
                f"(V matrices of the parameter's shape); got {got}."
            )
        nv = V.shape[0]
        return (block @ V.reshape(nv, -1).mT).mT.reshape(V.shape)

    product.__name__ = f"block_product[{name}]"
    return product
