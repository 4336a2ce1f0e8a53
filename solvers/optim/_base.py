"""The base of the second-order optimizers: ``Opt(model, loss_fn, lr=..., ...)`` and
``loss, outputs = opt.step((X, y))``.

Private. A subclass sets its hyper-parameters' checks (``_checks``) and implements
``_update(params, batch)``: build the curvature on the batch, read the loss, gradient and
outputs from it, and write the new values into the parameters (a dict name → parameter of
the trainable parameters of the optimizer's groups).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from linops.curvature import loss_curvature
from linops.curvature._distributed import (
    Collective,
    on_every_rank,
    resolve_group,
    shared_seed,
    unwrap_ddp,
)

__all__ = ["CurvatureOptimizer", "positive", "in_unit_interval", "positive_int_or_none",
           "non_negative"]


# ------------------------------------------------------------------ hyper-parameter checks
def _real(name: str, value) -> float:
    if isinstance(value, torch.Tensor) and value.ndim == 0 and value.dtype.is_floating_point:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value!r}.")
    return value


def positive(name: str, value, hint: str = "") -> float:
    value = _real(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0; got {value!r}.{hint}")
    return value


def non_negative(name: str, value, hint: str = "") -> float:
    value = _real(name, value)
    if not value >= 0:
        raise ValueError(f"{name} must be ≥ 0; got {value!r}.{hint}")
    return value


def in_unit_interval(name: str, value, hint: str = "") -> float:
    value = _real(name, value)
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must lie in [0, 1]; got {value!r}.{hint}")
    return value


def positive_int_or_none(name: str, value, hint: str = ""):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None; got {value!r}.{hint}")
    return int(value)


_DROPOUT = (nn.modules.dropout._DropoutNd,)
_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)


class CurvatureOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that owns the model and the loss and runs the whole step.

    Args:
        model: the ``nn.Module`` whose parameters are trained.
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss`` (mean or
            sum reduction), the loss the curvature is of.
        params: None for every parameter of ``model`` that requires grad; or an iterable of
            parameters of ``model``; or parameter groups (dicts with ``"params"`` and their
            own hyper-parameters), as for any ``torch.optim.Optimizer``.
        defaults: the hyper-parameters of the groups that do not set them.
        allow_train_mode: step even when dropout or batch norm modules are in training mode.
        process_group: a ``torch.distributed`` process group over whose ranks each batch is
            sharded: every rank calls ``opt.step`` with its shard, the curvature, loss and
            gradient are those of the union of the shards (``process_group=`` of the
            curvature operators, one all-reduce per product), and every rank takes the same
            step, so the replicas stay equal. A ``DistributedDataParallel`` model is
            unwrapped (``model.module``). An unseeded step seed (``seed=None``) is drawn on
            rank 0 and shared. Each step first agrees, by one all-reduce of 1 + P numbers,
            that every rank accepted its batch (a rank that refuses it makes every rank
            raise). None: one process.

    ``opt.step((X, y))`` returns ``(loss, outputs)``: the batch's loss at the parameters
    before the step (0-dim, detached) and the model's outputs on ``X`` (detached), both
    from the curvature's own forward pass. ``opt.last`` holds what the step measured (the
    solver's record, curvature statistics); its keys are listed by each optimizer.

    A parameter whose ``requires_grad`` is False when ``step`` runs (frozen) is left alone.
    """

    #: per-group hyper-parameter checks: name → function(name, value) → value
    _checks: dict = {}

    def __init__(self, model: nn.Module, loss_fn: nn.Module, params, defaults: dict, *,
                 allow_train_mode: bool = False, process_group=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}. "
                            f"{type(self).__name__} is built as {type(self).__name__}(model, "
                            "loss_fn, lr=...).")
        #: the process group the batches are sharded over (None: one process)
        self.process_group = resolve_group(process_group)  # raises at once on misuse
        model = unwrap_ddp(model, self.process_group)
        loss_curvature(loss_fn)  # raises on an unsupported loss or reduction
        if not isinstance(allow_train_mode, bool):
            raise TypeError(f"allow_train_mode must be True or False; got {allow_train_mode!r}.")
        self.model = model
        self.loss_fn = loss_fn
        self.allow_train_mode = allow_train_mode
        self._names = {id(p): n for n, p in model.named_parameters()}
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise ValueError("The model has no trainable parameter (none requires grad).")
        elif isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of parameters or of parameter groups "
                            "(dicts), not one tensor: write params=[p].")
        elif isinstance(params, dict):
            raise TypeError("params must be an iterable of parameters or a list of parameter "
                            "groups; for a dict name → parameter pass list(d.values()).")
        #: what the last step measured (see the optimizer's docstring)
        self.last: dict = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict) -> None:
        """Add a group after checking its parameters belong to the model and its
        hyper-parameters are valid."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params holds a {type(p).__name__}, not a parameter.")
            if id(p) not in self._names:
                raise ValueError(
                    f"A parameter of shape {tuple(p.shape)} given in params is not a "
                    "parameter of the model given to the optimizer: the curvature is that of "
                    "loss_fn(model(X), y) in the model's parameters. Pass parameters of that "
                    "model (model.parameters(), or a subset of them)."
                )
        super().add_param_group(param_group)
        for key, check in self._checks.items():
            self.param_groups[-1][key] = check(key, self.param_groups[-1][key])

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter, dict]]:
        """(name, parameter, group) of every parameter that requires grad, in the model's
        order."""
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        chosen = [(n, p, groups[id(p)]) for n, p in self.model.named_parameters()
                  if id(p) in groups and p.requires_grad]
        if not chosen:
            raise ValueError("Every parameter of the optimizer is frozen (requires_grad is "
                             "False): there is nothing to train.")
        return chosen

    # ------------------------------------------------------------------ the step
    def _check_batch(self, batch):
        if callable(batch) and not isinstance(batch, torch.Tensor):
            raise TypeError(
                f"{type(self).__name__}.step takes the batch (X, y), not a closure: it runs "
                "the forward pass, the gradient and the curvature itself. Write "
                "loss, outputs = opt.step((X, y))."
            )
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            what = type(batch).__name__
            if isinstance(batch, (tuple, list)):
                what += f" of length {len(batch)}"
            raise TypeError(f"{type(self).__name__}.step takes one batch (X, y) — a pair of "
                            f"inputs and targets; got a {what}.")
        X, y = batch
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"The targets y of the batch must be a tensor; got "
                            f"{type(y).__name__}.")
        return X, y

    def _check_mode(self):
        if self.allow_train_mode:
            return
        bad = [f"{n or 'model'} ({type(m).__name__})" for n, m in self.model.named_modules()
               if m.training and ((isinstance(m, _DROPOUT) and m.p > 0)
                                  or isinstance(m, _BATCHNORM))]
        if bad:
            raise ValueError(
                f"The model is in training mode with {', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}: dropout draws a new mask and batch norm "
                "uses batch statistics at every forward pass, so the curvature of the step is "
                "not one matrix. Call model.eval() before opt.step(...) (or pass "
                f"allow_train_mode=True to {type(self).__name__} if this is intended)."
            )

    def step(self, batch):
        """One step on ``batch = (X, y)``; returns ``(loss, outputs)`` before the update."""

        def checks():
            X, y = self._check_batch(batch)
            self._check_mode()
            return X, y, self._trainable()

        # over a process group a rank whose batch is refused makes every rank raise
        X, y, chosen = on_every_rank(self.process_group, checks,
                                     f"{type(self).__name__}.step", self._device())
        for _, p, _ in chosen:
            state = self.state[p]
            state["step"] = state.get("step", torch.zeros((), dtype=torch.float32)) + 1
        loss, outputs, last = self._update(chosen, (X, y))
        self.last = last
        return loss, outputs

    def _update(self, chosen, batch):
        raise NotImplementedError

    @property
    def steps(self) -> int:
        """The number of steps taken (from the state, so it survives ``state_dict``)."""
        counts = [int(s["step"]) for s in self.state.values() if "step" in s]
        return max(counts, default=0)

    # ------------------------------------------------------------------ helpers
    def _device(self) -> torch.device:
        first = next(iter(self.model.parameters()), None)
        return first.device if first is not None else torch.device("cpu")

    def _step_seed(self, seed):
        """The seed of this step's Monte-Carlo draws: ``seed + t − 1`` at step t, or, for
        ``seed=None``, one drawn from torch's global generator (on rank 0 and shared by
        every rank over a process group)."""
        if seed is not None:
            return seed + self.steps - 1
        if self.process_group is not None:
            return shared_seed(self.process_group, self._device())
        return int(torch.randint(0, 2**31 - 1, ()).item())

    def _loss_and_gradient(self, X, y, params: list | None, flat: bool = True):
        """``(loss, flat gradient in params or None, outputs)`` of ``loss_fn(model(X), y)``
        by one plain forward (and backward) pass; over a process group the loss and
        gradient are those of the union of the shards (the mean over the global number of
        terms, one all-reduce) and a rank that raises makes every rank raise. ``flat=False``
        (one process only): the gradient as a list, one tensor per parameter."""
        device = self._device()
        Xd = X.to(device) if isinstance(X, torch.Tensor) else X
        yd = y.to(device)
        if self.process_group is None:
            with torch.enable_grad() if params else torch.no_grad():
                outputs = self.model(Xd)
                value = self.loss_fn(outputs, yd)
            g = None
            if params:
                grads = torch.autograd.grad(value, params, allow_unused=True,
                                            materialize_grads=True)
                g = torch.cat([gr.reshape(-1) for gr in grads]).detach() if flat else grads
            return value.detach(), g, outputs.detach()
        assert flat, "the gradient over a process group is flat (one all-reduce)"
        curv = loss_curvature(self.loss_fn)
        n = sum(p.numel() for p in params) if params else 0
        got = {}

        def local():
            with torch.enable_grad() if params else torch.no_grad():
                outputs = self.model(Xd)
                state = curv.prepare(outputs, yd)
                summed = curv.summed_loss(outputs, yd, state)
            parts = [summed.detach().reshape(1)]
            if params:
                grads = torch.autograd.grad(summed, params, allow_unused=True,
                                            materialize_grads=True)
                parts = [gr.reshape(-1) for gr in grads] + parts
            got["outputs"] = outputs.detach()
            return torch.cat(parts), curv.count(state)

        dtype = params[0].dtype if params else next(self.model.parameters()).dtype
        flat, total, _ = Collective(self.process_group, dtype, device).sum(
            local, n + 1, f"{type(self).__name__}: the loss")
        flat = flat.to(dtype)
        if curv.reduction == "mean":
            if float(total) == 0:
                raise ValueError("Every target on every rank is ignore_index: the loss has "
                                 "no term.")
            flat = flat / float(total)
        g = flat[:n].detach() if params else None
        return flat[n].detach(), g, got["outputs"]

    def _write(self, chosen, direction: torch.Tensor, sign: float = 1.0) -> None:
        """``p ← p + sign · lr_group · direction[p]`` for a flat direction in ``chosen``'s
        order."""
        offset = 0
        with torch.no_grad():
            for _, p, group in chosen:
                n = p.numel()
                p.add_(direction[offset:offset + n].view_as(p), alpha=sign * group["lr"])
                offset += n

    def _outputs(self, op, X):
        """The model's outputs on ``X`` at the parameters, from the operator's forward pass
        (an extra forward pass only where the operator keeps none: the autograd path of the
        ``Hessian``)."""
        out = getattr(op, "output", None)
        if out is None and getattr(op, "_states", None):
            out = op._states[0].get("out")
        extra = out is None
        if extra:
            with torch.no_grad():
                out = self.model(X.to(op.device) if isinstance(X, torch.Tensor) else X)
        return out.detach(), extra
