"""``CurvatureOperator``: the base of the network-level curvature operators.

It owns the model, the loss, the data and the parameters, and runs the passes over the
data; subclasses say how to linearize one batch (``_linearize``) and how to multiply
with one batch's curvature (``_apply``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..autodiff._linearization import JVP_ROUTES
from ..operator import LinearOperator
from ..params import ParamSpace
from ._chain import chain_linearize, chain_spec
from ._data import (
    Batches,
    check_eval_mode,
    explain_forward_error,
    progress_bar,
    require_terms,
    require_tqdm,
    resolve_params,
)
from ._distributed import Collective, resolve_group, unwrap_ddp
from ._mlp import mlp_input_problem, mlp_linearize, mlp_spec
from ._routes import (
    KernelSwitch,
    Route,
    canonical_route,
    describe_module_failure,
    fused_kernels_in_graph,
    kernels_for,
    select_output,
)
from .losses import as_count, loss_curvature

__all__ = ["CurvatureOperator"]


class CurvatureOperator(LinearOperator):
    """A curvature matrix of ``loss_fn(model(X), y)`` over ``data``, in the parameters.

    The operator equals the curvature of the loss over the whole data set: with
    ``reduction='sum'`` the batches' curvatures add up; with ``reduction='mean'`` they add
    up and are divided by the total number of terms the mean divides by (see
    ``linops.curvature.losses``), so splitting the data into batches does not change it.

    Args:
        model: a ``torch.nn.Module``; evaluated with ``torch.func.functional_call`` at
            ``params`` (the module's own tensors for the other parameters and buffers).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss`` with
            ``reduction='mean'`` or ``'sum'``.
        data: one batch ``(X, y)`` or a re-iterable of batches (a list, a DataLoader).
            Tensors are moved to the parameters' device.
        params: dict name → tensor, a subset of ``model.named_parameters()`` (for example
            one layer); None means every parameter that requires grad. Products take flat
            vectors in this order; ``op.param_space`` converts to and from dicts.
        cache: over several batches, keep every batch's linearization (one forward per
            batch, once) instead of re-running each batch's forward pass at every product
            and holding one batch's activations at a time. One batch is always cached.
        progress: show a tqdm progress bar over the batches of each pass (needs tqdm).
        allow_train_mode: build even when dropout or batch norm modules are in training
            mode (the operator then changes from pass to pass).
        vectorize: on the autograd path, products with k columns in one vmapped pass
            (True) or a loop (False); None picks by device (vmapped on GPU) and by model
            (vmapped for attention models, whose many small operations favour one pass).
            The MLP fast path always takes the k columns in one batched pass; the
            convolutional chain batches them where this is True.
        fast_path: multiply with hand-written products on raw tensors (no autograd) when
            the model is a multilayer perceptron: an ``nn.Sequential`` of ``nn.Linear``
            layers and elementwise activations, inputs ``(N, d)`` (see
            ``linops.curvature._mlp.mlp_spec``); for the GGN family (GGN,
            EmpiricalFisher, MCFisher) also a convolutional chain: convolutions
            (``groups=1``), max pooling, eval-mode batch norm, ``nn.Flatten()``,
            ``nn.Linear`` and elementwise activations (``linops.curvature._chain``; the
            reference CNN is one). None uses it when the model qualifies (and, batch by
            batch, when the input does); False always uses autograd; True raises a
            ``ValueError`` naming what does not qualify. ``op.fast_path`` says which path
            the operator took.
        route: on the autograd path, how products are computed. GGN, EmpiricalFisher and
            MCFisher (``J v``): ``"auto"`` (forward mode where every operation has a
            forward-mode rule, else the double backward; decided at the first product),
            ``"forward mode"``, ``"double backward"``, ``"linearize"``
            (``torch.func.linearize``: a trace costing many gradients at the first
            product, then the cheapest ``J v``; for long runs of products on one
            operator). Hessian: ``"auto"`` (reverse-over-reverse, else
            forward-over-reverse), ``"reverse-over-reverse"``, ``"forward-over-reverse"``.
            ``op.info`` says which route was taken.
        output_fn: ``output_fn(model(X))`` is the tensor the loss takes; for models that
            return a tuple or dict (``lambda out: out["logits"]``). Not with
            ``fast_path=True``.
        reference_kernels: switch fused kernels without the derivatives the products
            need (the multi-head-attention fast path, flash / memory-efficient
            ``scaled_dot_product_attention``, oneDNN or cuDNN RNNs) to their
            differentiable reference implementation during the operator's own passes,
            restoring the user's settings after each. None: where the model needs it
            (its modules, and the graph of its first forward pass); True: always; False:
            never (the user's settings as they are).
        process_group: a ``torch.distributed`` process group (``torch.distributed.group.
            WORLD``, or one from ``new_group``) over whose ranks the data is sharded; None:
            one process. Each rank passes its own shard as ``data`` and the same model;
            products, ``loss`` and ``gradient`` are computed on the shard and summed by one
            ``all_reduce`` per product (per block of k columns: n·k numbers, plus 2k + 1 + P
            for the term count, the input checksums and the failure flags), a mean dividing
            by the global number of terms, so the operator equals the one-process operator
            over the union of the shards, identically on every rank. The build checks once
            (one all-reduce of a few numbers) that every rank holds the same parameters and
            batches of the same non-batch shape; a rank that raises (at build or in a pass)
            makes every rank raise. Solvers run unchanged on every rank: an unseeded
            randomized solver (Lanczos, LOBPCG, power iteration) takes one seed drawn on
            rank 0 and shared, and a product given different vectors on different ranks
            (a start vector of the user's own) raises. A ``DistributedDataParallel`` model is
            unwrapped (``model.module``; ``params`` names are the unwrapped model's). The
            Monte-Carlo Fisher draws with ``seed + rank·2³²`` on each rank.

    Attributes:
        loss: the loss over the whole data set at the parameters (0-dim, detached).
        gradient: its gradient in the parameters, flat ``(n,)`` in ``param_space`` order
            (detached).
        info: how the products are computed (``Route``: the path, the route of ``route=``
            taken, the kernels switched during the operator's passes).

    Both are computed on first access from the linearization the operator keeps (one
    batch, or ``cache=True``): the loss from the kept outputs (no pass), the gradient by one
    reverse pass per batch, ``Jᵀ r`` with ``r = ∇_o ℓ`` (about 0.4 of an autograd gradient
    with the fast path on the reference MLP; free for the ``Hessian``, which computes it
    when built). Without a cache they cost a pass over the data (forward, and reverse for
    the gradient). An optimizer step reads them instead of running its own forward and
    backward pass.

    No costly check runs by default; ``check_deterministic()`` runs one on request.
    What the build cannot see: only ``nn.Dropout*`` and batch-norm modules in training mode
    are detected (and refused unless ``allow_train_mode``); randomness inside ``forward``
    itself (``F.dropout(x, training=self.training)``, noise from ``torch.rand``, stochastic
    depth) and data that changes between passes are not. ``check_deterministic()`` finds
    them: it compares products from fresh passes over the data and raises if they differ.
    """

    symbol = "C"
    _tag_set = frozenset({"self_adjoint", "psd"})
    _mlp_order = 1  # the derivatives of the activations the fast path needs
    _route_choices = JVP_ROUTES  # the values of route= (the Hessian has its own)

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data,
        params=None,
        *,
        cache: bool = False,
        progress: bool = False,
        allow_train_mode: bool = False,
        vectorize: bool | None = None,
        fast_path: bool | None = None,
        route: str = "auto",
        output_fn=None,
        reference_kernels: bool | None = None,
        process_group=None,
    ):
        self._group = resolve_group(process_group)
        self._collective = None
        if isinstance(model, nn.Module):
            model = unwrap_ddp(model, self._group)
        build = dict(cache=cache, progress=progress, allow_train_mode=allow_train_mode,
                     vectorize=vectorize, fast_path=fast_path, route=route,
                     output_fn=output_fn, reference_kernels=reference_kernels)
        if self._group is None:
            self._build(model, loss_fn, data, params, **build)
            return
        first = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
        device = first.device if first is not None else torch.device("cpu")
        dtype = first.dtype if first is not None else torch.float32
        collective = Collective(self._group, dtype, device)
        err = None
        try:
            self._build(model, loss_fn, data, params, **build)
        except Exception as e:  # noqa: BLE001 - raised on every rank by check_build
            err = e
        counts = collective.check_build(self, err)
        collective.dtype = self.dtype
        self._collective = collective
        if self.cached:
            self._num_terms = sum(counts)
            if self._num_terms == 0:
                raise ValueError(
                    "Every target on every rank is ignore_index: the loss has no term, its "
                    "curvature is undefined."
                )

    def _build(self, model, loss_fn, data, params, *, cache, progress, allow_train_mode,
               vectorize, fast_path, route, output_fn, reference_kernels):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        if fast_path not in (None, True, False):
            raise TypeError(f"fast_path must be None, True or False; got {fast_path!r}.")
        self._route = canonical_route(route, self._route_choices, type(self).__name__)
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be a callable that selects the output tensor "
                            f"from the model's output; got {type(output_fn).__name__}.")
        if reference_kernels not in (None, True, False):
            raise TypeError(f"reference_kernels must be None, True or False; got "
                            f"{reference_kernels!r}.")
        if fast_path is True and output_fn is not None:
            raise ValueError("fast_path=True takes the model's output as it is; it cannot "
                             "apply output_fn. Pass fast_path=None (autograd) with output_fn.")
        self._output_fn = output_fn
        self._loss_curv = loss_curvature(loss_fn)
        self.model = model
        self.loss_fn = loss_fn
        #: the differentiated parameters, name → tensor (the values the operator is built at)
        self.params = resolve_params(model, params)
        space = ParamSpace(self.params)
        if not space.dtype.is_floating_point or space.dtype.is_complex:
            raise TypeError(f"The parameters must have a real floating dtype; got "
                            f"{space.dtype}.")
        check_eval_mode(model, allow_train_mode)
        if progress:
            require_tqdm()
        super().__init__(space.dtype, (space.numel, space.numel), space.device)
        #: the layout of the parameters: ``param_space.unflatten(v)`` gives a dict
        self.param_space = space
        self._tags = self._tag_set
        self._allow_train_mode = allow_train_mode
        self._progress = progress
        self.vectorize = space.device.type != "cpu" if vectorize is None else vectorize
        self.data = Batches(data, space.device)
        self._frozen = {
            n: p.detach() for n, p in model.named_parameters() if n not in self.params
        }
        self._require_fast = fast_path is True
        self._mlp = None
        #: the kernel switches our own passes apply (see ``_routes.py``)
        self._kernels = KernelSwitch(kernels_for(model, space.device, reference_kernels))
        self._detect_kernels = reference_kernels is None
        if vectorize is None and any("attention" in k for k in self._kernels.switches):
            # attention models on a CPU too: their passes are many small operations; with
            # this and forward mode's vmapped block (prefer_columns) the transformer LM's
            # 10-column GGN went from 1.1 to 0.6 of 10 single products
            # (benchmarks/architectures_bench.py, 2 cores)
            self.vectorize = True
        self._kernels_off = reference_kernels is False
        self._route_seen = None
        self._columns_route_seen = None
        self._chain = None
        if fast_path is not False and output_fn is None:
            spec = mlp_spec(model, space.names, space.dtype, self._mlp_order)
            if isinstance(spec, str) and self._mlp_order == 1:
                chain = chain_spec(model, space.names, space.dtype)
                if not isinstance(chain, str):
                    self._chain, spec = chain, None
                elif "no convolution" not in chain:
                    spec = f"{spec}; nor a convolutional chain: {chain}"
            if isinstance(spec, str):
                if fast_path:
                    kinds = ("a multilayer perceptron (an nn.Sequential of nn.Linear layers "
                             "and elementwise activations)")
                    if self._mlp_order == 1:
                        kinds += (" or a convolutional chain (convolutions, max pooling, "
                                  "eval-mode batch norm, nn.Flatten, nn.Linear and "
                                  "elementwise activations)")
                    raise ValueError(
                        f"fast_path=True needs {kinds}, but {spec}. "
                        "Pass fast_path=None to fall back to autograd where it does not "
                        "apply."
                    )
            elif spec is not None:
                self._mlp = spec
        #: whether products use hand-written products on raw tensors (``_mlp.py``, for a
        #: convolutional chain ``_chain.py``) rather than autograd
        self.fast_path = self._mlp is not None or self._chain is not None
        self.cached = bool(cache or self.data.single)
        self._states = None
        self._num_terms = None
        self._loss_value = None
        self._gradient = None
        if self.cached:
            self._states = list(self._linearize_pass())
            total = sum(self._loss_curv.count(s["loss"]) for s in self._states)
            self._num_terms = as_count(total)
            if self._num_terms == 0 and self._group is None:
                raise ValueError(
                    "Every target is ignore_index: the loss has no term, its curvature "
                    "is undefined."
                )

    # -------------------------------------------------------------- model evaluation
    def _forward(self, X, graph: bool = True):
        """``(leaves, output)``: the model at the parameters, with fresh graph leaves (or,
        with ``graph=False``, detached and no graph)."""
        names = self.param_space.names
        leaves = [self.params[n].detach().requires_grad_(graph) for n in names]
        with torch.set_grad_enabled(graph):
            try:
                with self._kernels():
                    out = torch.func.functional_call(
                        self.model, {**self._frozen, **dict(zip(names, leaves))}, (X,)
                    )
            except (RuntimeError, TypeError, ValueError, IndexError) as err:
                raise explain_forward_error(self.model, X, self.dtype, err)  # noqa: B904
        out = select_output(out, self._output_fn, self.model)
        if graph and self._detect_kernels:
            # a fused kernel our modules scan did not foresee (a functional
            # scaled_dot_product_attention): switch it and evaluate the batch again
            self._detect_kernels = False
            if self._kernels.add(fused_kernels_in_graph(out, self.device)):
                return self._forward(X, graph)
        if out.dtype != self.dtype:
            raise ValueError(
                f"The model output has dtype {out.dtype} but the parameters have "
                f"{self.dtype}; make them agree (model.to(dtype), inputs of that dtype)."
            )
        return leaves, out

    def _mlp_linearize(self, X):
        """The batch's MLP linearization, or None where the autograd path takes it."""
        if self._mlp is None:
            return None
        problem = mlp_input_problem(self._mlp, X, self.dtype)
        if problem is not None:
            if self._require_fast:
                raise ValueError(
                    f"fast_path=True, but {problem}. Pass fast_path=None to fall back to "
                    "autograd for such batches."
                )
            return None
        tensors = {**self._frozen, **self.params}
        return mlp_linearize(self._mlp, tensors, X)

    def _chain_linearize(self, X):
        """The batch's convolutional-chain linearization, or None where autograd takes it."""
        if self._chain is None:
            return None
        lin = chain_linearize(self._chain, {**self._frozen, **self.params}, X)
        if lin is None and self._require_fast:
            raise ValueError(
                f"fast_path=True, but the batch input ({type(X).__name__}"
                f"{tuple(X.shape) if isinstance(X, torch.Tensor) else ''}) does not fit the "
                "chain (an nn.Linear layer must take (N, d) inputs, a convolution or pooling "
                "(N, C, *spatial)). Pass fast_path=None to fall back to autograd for such "
                "batches.")
        return lin

    def _summed_value(self, out, y, loss_state) -> torch.Tensor:
        """The batch's loss summed over its terms, detached (0-dim)."""
        with torch.no_grad():
            return self._loss_curv.summed_loss(out.detach(), y, loss_state).reshape(())

    def _state_value(self, state: dict) -> torch.Tensor:
        """The summed loss of a kept batch state (``"value"``, or its ``"out"`` and
        ``"y"``)."""
        if "value" not in state:
            state["value"] = self._summed_value(state["out"], state["y"], state["loss"])
        return state["value"]

    def _rerun(self, X):
        """``f(tensors) -> output`` at the batch ``X``, under the operator's kernel switches.
        It closes over the model and the batch, not over the operator (no reference cycle:
        the operator is freed by reference counting alone)."""
        names, model, frozen = self.param_space.names, self.model, self._frozen
        kernels, output_fn = self._kernels, self._output_fn

        def f(tensors):
            with kernels():
                out = torch.func.functional_call(
                    model, {**frozen, **dict(zip(names, tensors))}, (X,)
                )
            return select_output(out, output_fn, model)

        return f

    def _diagnoser(self, X, order: int):
        """``diagnose() -> str`` naming the module of the model that cannot be
        differentiated (``order`` 1: ``J v``; 2: second derivatives); it runs only when
        every route failed. Closes over the model, not the operator."""
        model, kernels = self.model, self._kernels
        tensors = {**self._frozen, **self.params}
        hint = (" (reference_kernels=False kept PyTorch's fused kernels: pass "
                "reference_kernels=None to switch them during the operator's passes)"
                if self._kernels_off else "")

        def run():
            with kernels():
                return torch.func.functional_call(model, tensors, (X,))

        def diagnose():
            with kernels():
                where = describe_module_failure(model, run, order)
            return where + hint if where else hint.strip()

        return diagnose

    @property
    def info(self) -> Route:
        """How the operator multiplies (``Route``): the MLP fast path or autograd, the route
        of its products (chosen at the first product for ``route='auto'``), and the kernels
        it switches to their reference implementation during its own passes. ``str(op.info)``
        says it in a sentence."""
        if self._mlp is not None and self._route_seen in (None, "mlp"):
            return Route("mlp", "hand-written", self._route)
        if self._chain is not None and self._route_seen in (None, "chain"):
            return Route("chain", "hand-written", self._route)
        products = self._route_seen or (self._route if self._route != "auto"
                                        else "not chosen yet")
        return Route("autograd", products, self._route, self._kernels.switches,
                     self._columns_route_seen)

    # -------------------------------------------------------------- passes over the data
    def _linearize(self, X, y, generator) -> dict:
        """One batch's state; must hold ``"loss"`` (the loss's per-batch state)."""
        raise NotImplementedError

    def _apply(self, state: dict, V: list[torch.Tensor], k: int) -> list[torch.Tensor]:
        """The batch's summed curvature times ``V`` (entries ``(k, *shape)``)."""
        raise NotImplementedError

    def _new_generator(self):
        return None

    def _linearize_pass(self):
        generator = self._new_generator()
        total = len(self.data) if self.data.has_len() else None
        for X, y in progress_bar(self.data, self._progress, total, repr(self)):
            yield self._linearize(X, y, generator)

    def _product(self, X: torch.Tensor, states) -> tuple[torch.Tensor, object]:
        if self._collective is None:
            out, total = self._local_product(X, states)
        else:  # one all_reduce of the block, the count and the input's checksums
            out, total = self._collective.product(X, lambda: self._local_product(X, states))
        require_terms(self, total)
        if self._loss_curv.reduction == "mean":
            out = out / (self._num_terms if self._states is not None else total)
        return out, total

    def _local_product(self, X: torch.Tensor, states) -> tuple[torch.Tensor, object]:
        """The summed curvature of this process's batches times ``X``, and their term
        count (no scaling)."""
        k = X.shape[1]
        V = self.param_space.split(X)
        acc, total = None, 0
        for state in states:
            part = self._apply(state, V, k)
            if acc is None:
                acc = part
            else:
                for a, p in zip(acc, part):
                    a.add_(p)
            total = total + self._loss_curv.count(state["loss"])
        return self.param_space.join(acc, k), total

    def _all_sum(self, compute, size: int, what: str):
        """``compute()`` (a flat tensor of ``size`` entries, a term count) summed over the
        process group by one all_reduce, or as it is in one process."""
        if self._collective is None:
            return compute()
        flat, total, _ = self._collective.sum(compute, size, what)
        return flat.to(self.dtype), total

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        states = self._states if self._states is not None else self._linearize_pass()
        return self._product(X, states)[0]

    # -------------------------------------------------------------- loss and gradient
    def _state_gradient(self, state: dict) -> list[torch.Tensor]:
        """The batch's summed-loss gradient, one tensor per parameter."""
        raise NotImplementedError

    def _scale(self, total):
        if self._loss_curv.reduction != "mean":
            return 1.0
        return self._num_terms if self._states is not None else total

    @property
    def loss(self) -> torch.Tensor:
        """The loss over the data set at the parameters: ``loss_fn``'s reduction over every
        term of every batch (0-dim, detached). From the kept outputs when the operator caches
        its linearization; otherwise one forward pass over the data."""
        if self._loss_value is None:
            if self._states is not None:
                value, _ = self._all_sum(
                    lambda: (sum(self._state_value(s) for s in self._states), 0), 1, "The loss")
                self._loss_value = value.reshape(()) / self._scale(None)
            else:
                value, total = self._all_sum(self._local_loss, 1, "The loss")
                require_terms(self, total)
                self._loss_value = value.reshape(()) / self._scale(total)
        return self._loss_value

    def _local_loss(self):
        value, total = 0.0, 0
        for X, y in progress_bar(self.data, self._progress, None, repr(self)):
            _, out = self._forward(X, graph=False)
            loss_state = self._loss_curv.prepare(out, y)
            value = value + self._summed_value(out, y, loss_state)
            total = total + self._loss_curv.count(loss_state)
        return value, total

    @property
    def gradient(self) -> torch.Tensor:
        """The gradient of ``loss`` in the parameters, flat ``(n,)`` in ``param_space``
        order (detached). With a cached linearization one reverse pass per batch (free for
        the ``Hessian``); otherwise a forward and a reverse pass per batch."""
        if self._gradient is None:
            if self._states is not None:
                def local():
                    acc = None
                    for state in self._states:
                        part = self._state_gradient(state)
                        acc = part if acc is None else [a + p for a, p in zip(acc, part)]
                    return self.param_space.join(acc), 0

                flat, _ = self._all_sum(local, self.shape[0], "The gradient")
                self._gradient = flat / self._scale(None)
            else:
                self._gradient = self._gradient_pass()
        return self._gradient

    def _gradient_pass(self) -> torch.Tensor:
        flat, total = self._all_sum(self._local_gradient_pass, self.shape[0] + 1,
                                    "The gradient")
        require_terms(self, total)
        scale = self._scale(total)
        self._loss_value = flat[-1] / scale
        return flat[:-1] / scale

    def _local_gradient_pass(self):
        acc, value, total = None, 0.0, 0
        for X, y in progress_bar(self.data, self._progress, None, repr(self)):
            leaves, out = self._forward(X)
            loss_state = self._loss_curv.prepare(out, y)
            with torch.enable_grad():
                summed = self._loss_curv.summed_loss(out, y, loss_state)
            part = torch.autograd.grad(summed, leaves, allow_unused=True,
                                       materialize_grads=True)
            acc = list(part) if acc is None else [a + p for a, p in zip(acc, part)]
            value = value + summed.detach()
            total = total + self._loss_curv.count(loss_state)
        return torch.cat([self.param_space.join(acc), value.reshape(1)]), total

    # -------------------------------------------------------------- diagonal
    def _diag(self) -> torch.Tensor:
        """The exact diagonal (the Monte-Carlo Fisher's own, with its seed) from the
        layer-wise engine: one pass over the data (see ``linops.curvature.DiagGGN``)."""
        if getattr(self, "_diagonal", None) is None:
            from .diagonal import operator_diagonal  # diagonal.py imports the operators

            self._diagonal = operator_diagonal(self)
        return self._diagonal

    # -------------------------------------------------------------- explicit checks
    def check_deterministic(self, rtol: float | None = None) -> float:
        """Check that the operator is one fixed matrix: raise if two passes disagree.

        Runs the product with one random vector in two fresh passes over the data (and,
        when cached, compares with the cached linearization too). Costs two or three
        products; nothing like it runs by default.

        Args:
            rtol: tolerance on ‖r₁ − r₂‖ / ‖r₁‖ (default 1e-4 in float32, 1e-9 in float64).

        Returns:
            The largest relative difference seen.

        Raises:
            ValueError: if the model is in training mode with dropout or batch norm, if the
                passes see different numbers of loss terms, or if the products differ
                (shuffled data with a Monte-Carlo Fisher, random augmentation, a model that
                is not deterministic, data that changed since the operator was built).
        """
        check_eval_mode(self.model, self._allow_train_mode)
        if rtol is None:
            rtol = 1e-4 if self.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
        g = torch.Generator(device="cpu").manual_seed(1234)
        v = torch.randn(self.shape[1], 1, generator=g, dtype=torch.float64)
        v = v.to(dtype=self.dtype, device=self.device)
        results = []
        if self._states is not None:
            results.append(("cached", *self._product(v, self._states)))
        for i in range(2):
            results.append((f"pass {i + 1}", *self._product(v, self._linearize_pass())))
        (name0, r0, n0) = results[0]
        worst = 0.0
        for name, r, n in results[1:]:
            n0_, n_ = int(n0), int(n)
            if n0_ != n_:
                raise ValueError(
                    f"{self!r} is not deterministic: {name0} saw {n0_} loss terms but {name} "
                    f"saw {n_}. The data changes between passes."
                )
            rel = float(torch.linalg.vector_norm(r - r0) / torch.linalg.vector_norm(r0)
                        .clamp_min(torch.finfo(self.dtype).tiny))
            worst = max(worst, rel)
            if not rel <= rtol:
                raise ValueError(
                    f"{self!r} is not deterministic: the products of {name0} and {name} with "
                    f"one vector differ by {rel:.3g} (relative; tolerance {rtol:.1g}). Causes: "
                    "shuffled or augmented data (the Monte-Carlo Fisher ties its samples to "
                    "the batch order), a model that is not deterministic (dropout, batch "
                    "norm in training mode), or data that changed since the operator was built."
                )
        return worst

    # -------------------------------------------------------------- metadata
    @property
    def num_terms(self) -> int | float | None:
        """The number of terms the loss sums (what a mean divides by; for a weighted cross
        entropy the sum of the targets' class weights), once known."""
        return self._num_terms

    def _to(self, dtype, device):
        raise ValueError(
            f"{type(self).__name__} cannot be moved with .to(): move the model "
            "(model.to(...)) and build the operator again (data follows the parameters' "
            "device)."
        )

    def _repr(self) -> str:
        return f"{type(self).__name__}({self._loss_curv.name}, {self.shape[0]} params)"
