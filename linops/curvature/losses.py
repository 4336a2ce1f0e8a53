"""Closed-form curvature of the supported losses with respect to the model output.

For each loss ``ℓ(o, y)`` (summed over the terms of a batch) these give, without
differentiating through the loss:

- the Hessian product ``∇²_o ℓ · t`` (the middle factor of the GGN ``Jᵀ H J``);
- the gradient ``r = ∇_o ℓ`` (the residual, for the empirical Fisher ``Jᵀ r rᵀ J``);
- gradients ``r̃ = ∇_o ℓ(o, ỹ)`` at labels ``ỹ`` drawn from the model's predictive
  distribution, with ``E[r̃ r̃ᵀ] = ∇²_o ℓ`` (for the Monte-Carlo Fisher);
- the number of terms a ``mean`` reduction divides by.

==================  =====================  ========================  =========================
loss                Hessian in o           residual r                sampled ỹ, r̃
==================  =====================  ========================  =========================
CrossEntropyLoss    diag(p) − p pᵀ,        p − onehot(y)             ỹ ~ Cat(p), p − onehot(ỹ)
                    p = softmax(o)
MSELoss             2 I                    2 (o − y)                 ỹ ~ N(o, I/2), √2 ε
BCEWithLogitsLoss   σ(o) (1 − σ(o))        σ(o) − y                  ỹ ~ Bernoulli(σ(o))
==================  =====================  ========================  =========================

A ``mean`` reduction divides by N (CrossEntropyLoss with class indices: the targets that
are not ``ignore_index``; with extra dimensions ``(N, C, d…)``: N·d…) or by the number of
output entries (MSELoss, BCEWithLogitsLoss), exactly as PyTorch does; over several
batches the operators divide by the total over the data set.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..autodiff._closed_forms import sigmoid_hessian_product, softmax_hessian_product

__all__ = ["LossCurvature", "loss_curvature", "SUPPORTED_LOSSES"]

SUPPORTED_LOSSES = ("CrossEntropyLoss", "MSELoss", "BCEWithLogitsLoss")


def loss_curvature(loss_fn) -> LossCurvature:
    """The closed forms for ``loss_fn``; raises if the loss or its settings are not
    supported."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return _CrossEntropy(loss_fn)
    if isinstance(loss_fn, nn.MSELoss):
        return _MSE(loss_fn)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return _BCEWithLogits(loss_fn)
    raise TypeError(
        f"Unsupported loss {type(loss_fn).__name__}: the curvature operators support "
        f"torch.nn.{', torch.nn.'.join(SUPPORTED_LOSSES)} (instances, for example "
        "nn.CrossEntropyLoss())."
    )


class LossCurvature:
    """Closed forms of one loss module (see the module's table). ``state`` is what
    ``prepare`` returns for one batch: detached quantities computed once per batch."""

    def __init__(self, loss_fn: nn.Module):
        self.loss_fn = loss_fn
        self.name = type(loss_fn).__name__
        self.reduction = getattr(loss_fn, "reduction", None)
        if self.reduction not in ("mean", "sum"):
            raise ValueError(
                f"{self.name}(reduction={self.reduction!r}) is not supported: the curvature "
                "of a loss needs a scalar loss; use reduction='mean' or 'sum'."
            )

    # -------------------------------------------------------------- per batch
    def prepare(self, output: torch.Tensor, target: torch.Tensor) -> dict:
        """Check ``output`` against ``target`` and precompute the batch's state."""
        raise NotImplementedError

    def count(self, state: dict):
        """The number of terms a mean reduction divides by, in this batch (an int, or a
        0-d tensor when it depends on the targets' values)."""
        return state["count"]

    def hessian_product(self, state: dict, T: torch.Tensor) -> torch.Tensor:
        """``∇²_o ℓ · t`` for tangents ``T`` of shape ``(k, *output.shape)``."""
        raise NotImplementedError

    def residual(self, state: dict) -> torch.Tensor:
        """``∇_o ℓ(o, y)`` of the summed loss, shape ``output.shape``."""
        raise NotImplementedError

    def sampled_residuals(self, state: dict, S: int, generator) -> torch.Tensor:
        """``S`` gradients ``∇_o ℓ(o, ỹ)`` at sampled labels, shape ``(S, *output.shape)``."""
        raise NotImplementedError

    def summed_loss(self, output: torch.Tensor, target: torch.Tensor, state: dict):
        """The batch's loss summed over its terms, differentiable in ``output``."""
        value = self.loss_fn(output, self._loss_target(target))
        if self.reduction == "mean":
            value = value * state["count"]
        return value

    def _loss_target(self, target):
        return target

    # -------------------------------------------------------------- helpers
    def _check_float_target(self, output, target):
        if not target.dtype.is_floating_point:
            raise TypeError(
                f"{self.name} needs floating-point targets with the output's dtype "
                f"{output.dtype}; got {target.dtype}. Convert them with y.to({output.dtype})."
            )
        if target.dtype != output.dtype:
            raise TypeError(
                f"{self.name} targets have dtype {target.dtype} but the model output has "
                f"{output.dtype}; convert them with y.to({output.dtype})."
            )
        if target.shape != output.shape:
            raise ValueError(
                f"{self.name}: the model output has shape {tuple(output.shape)} but the "
                f"targets have shape {tuple(target.shape)}; they must match exactly (no "
                "broadcasting). Reshape the targets, e.g. y.view_as(output)."
            )
        if output.ndim == 0:
            raise ValueError(f"{self.name}: the model output is a scalar; expected (N, ...).")


class _CrossEntropy(LossCurvature):
    def __init__(self, loss_fn):
        super().__init__(loss_fn)
        if loss_fn.weight is not None:
            raise ValueError(
                "CrossEntropyLoss(weight=...) is not supported by the curvature operators; "
                "use an unweighted loss."
            )
        if loss_fn.label_smoothing != 0:
            raise ValueError(
                "CrossEntropyLoss(label_smoothing=...) is not supported by the curvature "
                "operators; use label_smoothing=0 (or soft probability targets)."
            )
        self.ignore_index = loss_fn.ignore_index

    def prepare(self, output, target):
        if output.ndim < 2:
            raise ValueError(
                f"CrossEntropyLoss needs model outputs of shape (N, C) or (N, C, d1, ...), "
                f"the classes along dimension 1; got shape {tuple(output.shape)}. For one "
                "logit per sample use BCEWithLogitsLoss; for a single sample add a batch "
                "dimension (output[None])."
            )
        probs = torch.softmax(output.detach(), dim=1)
        wshape = (output.shape[0], 1, *output.shape[2:])
        if target.dtype.is_floating_point:  # class probabilities
            if target.shape != output.shape:
                raise ValueError(
                    f"CrossEntropyLoss with floating-point targets reads them as class "
                    f"probabilities of the output's shape {tuple(output.shape)}, but they "
                    f"have shape {tuple(target.shape)}. For class indices pass integer "
                    "targets (y.long())."
                )
            if target.dtype != output.dtype:
                raise TypeError(
                    f"CrossEntropyLoss probability targets have dtype {target.dtype} but "
                    f"the output has {output.dtype}; convert with y.to({output.dtype})."
                )
            weight = target.sum(dim=1, keepdim=True)
            count = output.numel() // output.shape[1]
            onehot = target
        elif target.dtype == torch.bool or target.dtype.is_complex:
            raise TypeError(
                f"CrossEntropyLoss needs integer class indices (torch.long) or float class "
                f"probabilities as targets; got {target.dtype}."
            )
        else:  # class indices
            expected = (output.shape[0], *output.shape[2:])
            if target.shape != expected:
                raise ValueError(
                    f"CrossEntropyLoss: model output of shape {tuple(output.shape)} (classes "
                    f"along dimension 1) needs class-index targets of shape {expected}; got "
                    f"{tuple(target.shape)}."
                )
            mask = target != self.ignore_index
            weight = mask.to(output.dtype).unsqueeze(1)
            count = mask.sum()
            onehot = None
        return {
            "p": probs, "w": weight.reshape(wshape), "count": count,
            "target": target, "onehot": onehot, "cdim": 1 - output.ndim,
        }

    def hessian_product(self, state, T):
        return state["w"] * softmax_hessian_product(state["p"], T, dim=state["cdim"])

    def residual(self, state):
        p, w = state["p"], state["w"]
        if state["onehot"] is not None:  # probabilities: (Σ_c y_c) p − y
            return w * p - state["onehot"]
        target, C = state["target"], p.shape[1]
        valid = target != self.ignore_index
        bad = valid & ((target < 0) | (target >= C))
        if bool(bad.any()):
            raise ValueError(
                f"CrossEntropyLoss: class-index targets must lie in [0, {C}) (or equal "
                f"ignore_index={self.ignore_index}); got values "
                f"{sorted(set(target[bad].tolist()))[:5]}."
            )
        idx = torch.where(valid, target, 0).long().unsqueeze(1)
        onehot = torch.zeros_like(p).scatter_(1, idx, 1.0)
        return w * (p - onehot)

    def sampled_residuals(self, state, S, generator):
        p, w = state["p"], state["w"]
        C = p.shape[1]
        rows = p.movedim(1, -1).reshape(-1, C)
        labels = torch.multinomial(rows, S, replacement=True, generator=generator)  # (R, S)
        onehot = torch.zeros(S, rows.shape[0], C, dtype=p.dtype, device=p.device)
        onehot.scatter_(2, labels.mT.unsqueeze(-1), 1.0)
        moved_shape = (S, *p.movedim(1, -1).shape)
        onehot = onehot.reshape(moved_shape).movedim(-1, 2)
        return w.sqrt() * (p - onehot)

    def _loss_target(self, target):
        if target.dtype.is_floating_point:
            return target
        return target.long()


class _MSE(LossCurvature):
    def prepare(self, output, target):
        self._check_float_target(output, target)
        return {"count": output.numel(), "out": output.detach(), "target": target}

    def hessian_product(self, state, T):
        return 2 * T

    def residual(self, state):
        return 2 * (state["out"] - state["target"])

    def sampled_residuals(self, state, S, generator):
        out = state["out"]
        eps = torch.randn((S, *out.shape), dtype=out.dtype, device=out.device,
                          generator=generator)
        return math.sqrt(2.0) * eps


class _BCEWithLogits(LossCurvature):
    def __init__(self, loss_fn):
        super().__init__(loss_fn)
        if loss_fn.weight is not None or loss_fn.pos_weight is not None:
            raise ValueError(
                "BCEWithLogitsLoss(weight=..., pos_weight=...) is not supported by the "
                "curvature operators; use an unweighted loss."
            )

    def prepare(self, output, target):
        self._check_float_target(output, target)
        s = torch.sigmoid(output.detach())
        return {"count": output.numel(), "s": s, "target": target}

    def hessian_product(self, state, T):
        return sigmoid_hessian_product(state["s"], T)

    def residual(self, state):
        return state["s"] - state["target"]

    def sampled_residuals(self, state, S, generator):
        s = state["s"]
        draws = torch.bernoulli(s.expand(S, *s.shape), generator=generator)
        return s - draws
