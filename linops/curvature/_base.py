"""``CurvatureOperator``: the base of the network-level curvature operators.

It owns the model, the loss, the data and the parameters, and runs the passes over the
data; subclasses say how to linearize one batch (``_linearize``) and how to multiply
with one batch's curvature (``_apply``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..operator import LinearOperator
from ..params import ParamSpace
from ._data import Batches, check_eval_mode, progress_bar, require_tqdm, resolve_params
from .losses import loss_curvature

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
        vectorize: products with k columns in one vmapped pass (True) or a loop (False);
            None picks by device (vmapped on GPU).

    No costly check runs by default; ``check_deterministic()`` runs one on request.
    """

    symbol = "C"
    _tag_set = frozenset({"self_adjoint", "psd"})

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
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        self.loss = loss_curvature(loss_fn)
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
        self.cached = bool(cache or self.data.single)
        self._states = None
        self._num_terms = None
        if self.cached:
            self._states = list(self._linearize_pass())
            total = sum(self.loss.count(s["loss"]) for s in self._states)
            self._num_terms = int(total)
            if self._num_terms == 0:
                raise ValueError(
                    "Every target is ignore_index: the loss has no term, its curvature "
                    "is undefined."
                )

    # -------------------------------------------------------------- model evaluation
    def _forward(self, X):
        """``(leaves, output)``: the model at the parameters, with fresh graph leaves."""
        names = self.param_space.names
        leaves = [self.params[n].detach().requires_grad_(True) for n in names]
        with torch.enable_grad():
            out = torch.func.functional_call(
                self.model, {**self._frozen, **dict(zip(names, leaves))}, (X,)
            )
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"The model returned a {type(out).__name__}; the curvature operators need "
                "one output tensor."
            )
        if out.dtype != self.dtype:
            raise ValueError(
                f"The model output has dtype {out.dtype} but the parameters have "
                f"{self.dtype}; make them agree (model.to(dtype), inputs of that dtype)."
            )
        return leaves, out

    def _rerun(self, X):
        names = self.param_space.names

        def f(tensors):
            return torch.func.functional_call(
                self.model, {**self._frozen, **dict(zip(names, tensors))}, (X,)
            )

        return f

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
            total = total + self.loss.count(state["loss"])
        out = self.param_space.join(acc, k)
        if self.loss.reduction == "mean":
            out = out / (self._num_terms if self._states is not None else total)
        return out, total

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        states = self._states if self._states is not None else self._linearize_pass()
        return self._product(X, states)[0]

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
    def num_terms(self) -> int | None:
        """The number of terms the loss sums (what a mean divides by), once known."""
        return self._num_terms

    def _to(self, dtype, device):
        raise ValueError(
            f"{type(self).__name__} cannot be moved with .to(): move the model "
            "(model.to(...)) and build the operator again (data follows the parameters' "
            "device)."
        )

    def _repr(self) -> str:
        return f"{type(self).__name__}({self.loss.name}, {self.shape[0]} params)"
