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


def as_count(total):
    """A total count of loss terms as a Python number: an int where it is one, else the
    float it is (a weighted cross entropy's mean divides by the sum of the targets' class
    weights, 6.5 say, which ``int`` would truncate)."""
    t = float(total)
    return int(t) if t.is_integer() else t


def loss_curvature(loss_fn) -> LossCurvature:
    """The closed forms for ``loss_fn``; raises if the loss or its settings are not
    supported."""
    for cls, impl in ((nn.CrossEntropyLoss, _CrossEntropy), (nn.MSELoss, _MSE),
                      (nn.BCEWithLogitsLoss, _BCEWithLogits)):
        if isinstance(loss_fn, cls):
            _check_unchanged(loss_fn, cls)
            return impl(loss_fn)
    raise TypeError(
        f"Unsupported loss {type(loss_fn).__name__}: the curvature operators support "
        f"torch.nn.{', torch.nn.'.join(SUPPORTED_LOSSES)} (instances, for example "
        "nn.CrossEntropyLoss())."
    )


def _check_unchanged(loss_fn, cls) -> None:
    """A subclass may compute another loss: accept it only if it changes nothing that
    computes the value (``forward``, ``__call__``, ``_call_impl``)."""
    if type(loss_fn) is cls:
        return
    changed = [name for name in ("forward", "__call__", "_call_impl")
               if getattr(type(loss_fn), name) is not getattr(cls, name)]
    if changed:
        raise TypeError(
            f"{type(loss_fn).__name__} subclasses nn.{cls.__name__} but overrides "
            f"{', '.join(changed)}: the closed-form curvature of nn.{cls.__name__} would be "
            f"wrong for it. Pass a plain nn.{cls.__name__}(...) (the curvature operators "
            "support only the loss itself), or wrap the extra computation into the model."
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
        0-d tensor when it depends on the targets' values: the sum of the targets' class
        weights for a weighted cross entropy, not an integer then)."""
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

    def hessian_sqrt(self, state: dict) -> torch.Tensor:
        """``V`` of shape ``(M, *output.shape)`` with ``Σ_m v_mn v_mnᵀ = ∇²_o ℓ_n`` for every
        sample n (M = the output entries per sample; each column lives on one sample's
        entries, so the samples stay separate): the columns the exact diagonal GGN and the
        square-root GGN back-propagate."""
        raise NotImplementedError

    def summed_loss(self, output: torch.Tensor, target: torch.Tensor, state: dict):
        """The batch's loss summed over its terms, differentiable in ``output``."""
        value = self.loss_fn(output, self._loss_target(target))
        if self.reduction == "mean":  # a batch with no term (all ignore_index) adds 0, not NaN
            count = state["count"]
            value = torch.where(torch.as_tensor(count) > 0, value * count, 0.0)
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


def _softmax_classes(out):
    """``softmax(out, dim=1)``; for (N, C) outputs with few classes through the transpose,
    where PyTorch's CPU kernel is 2-2.5× faster (it reduces along the contiguous dimension
    slowly when that dimension is short)."""
    if out.ndim == 2 and out.shape[1] <= 64 and out.device.type == "cpu":
        return torch.softmax(out.T, dim=0).T.contiguous()
    return torch.softmax(out, dim=1)


class _CrossEntropy(LossCurvature):
    """Cross entropy with class weights ``w`` and label smoothing ``ε``, as PyTorch.

    Sample n's (or position's) loss is ``−Σ_c q_c log p_c`` with the weighted soft target
    ``q_c = (1 − ε) w_y δ_cy + ε w_c / C`` (class indices; zero at ``ignore_index``) or
    ``q_c = w_c ((1 − ε) y_c + ε / C)`` (class probabilities ``y``). With ``s = Σ_c q_c``
    its gradient in the logits is ``s p − q`` and its Hessian ``s (diag(p) − p pᵀ)``. A
    mean divides by ``Σ_n w_{y_n}`` over the targets that are not ignored (class
    indices) or by the number of rows (probabilities), as PyTorch does.
    """

    def __init__(self, loss_fn):
        super().__init__(loss_fn)
        self.ignore_index = loss_fn.ignore_index
        self.smoothing = float(loss_fn.label_smoothing)
        self.class_weight = loss_fn.weight

    def prepare(self, output, target):
        if (output.ndim >= 2 and target.dtype == torch.long and self.class_weight is None
                and self.smoothing == 0 and target.numel()
                and target.shape == (output.shape[0], *output.shape[2:])):  # the common case
            state = self._plain_indices(output, target)
            if state is not None:
                return state
        if output.ndim < 2:
            raise ValueError(
                f"CrossEntropyLoss needs model outputs of shape (N, C) or (N, C, d1, ...), "
                f"the classes along dimension 1; got shape {tuple(output.shape)}. For one "
                "logit per sample use BCEWithLogitsLoss; for a single sample add a batch "
                "dimension (output[None])."
            )
        C = output.shape[1]
        probs = _softmax_classes(output.detach())
        cshape = (1, C) + (1,) * (output.ndim - 2)
        w = self.class_weight
        if w is not None:
            if w.shape != (C,):
                raise ValueError(
                    f"CrossEntropyLoss(weight=...) has shape {tuple(w.shape)} but the model "
                    f"output has C={C} classes along dimension 1; pass one weight per class."
                )
            w = w.to(dtype=output.dtype, device=output.device).reshape(cshape)
        eps = self.smoothing
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
            q = target if eps == 0 else (1 - eps) * target + eps / C
            if w is not None:
                q = q * w
            count = output.numel() // C
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
            valid = target != self.ignore_index
            bad = valid & ((target < 0) | (target >= C))
            if bool(bad.any()):
                raise ValueError(
                    f"CrossEntropyLoss: class-index targets must lie in [0, {C}) (or equal "
                    f"ignore_index={self.ignore_index}); got values "
                    f"{sorted(set(target[bad].tolist()))[:5]}."
                )
            idx = torch.where(valid, target, 0).long().unsqueeze(1)
            onehot = torch.zeros_like(probs).scatter_(1, idx, 1.0)
            mask = valid.to(output.dtype).unsqueeze(1)
            wy = mask if w is None else mask * (onehot * w).sum(1, keepdim=True)
            q = (1 - eps) * wy * onehot
            if eps:
                q = q + mask * (eps / C) * (1.0 if w is None else w)
            count = wy.sum()
        s_ = q.sum(dim=1, keepdim=True)
        return {"p": probs, "q": q, "s": s_, "count": count, "cdim": 1 - output.ndim}

    def _plain_indices(self, output, target):
        """The state for valid class indices without weights or smoothing (None if some
        target is out of range or ignored): the operations of the general path that
        matter, without its checks' overhead (most of a small model's preparation)."""
        C = output.shape[1]
        lo, hi = torch.aminmax(target)
        lo, hi = int(lo), int(hi)
        if not (0 <= lo and hi < C and not lo <= self.ignore_index <= hi):
            return None
        probs = _softmax_classes(output.detach())
        q = torch.zeros_like(probs).scatter_(1, target.unsqueeze(1), 1.0)
        # s = 1 (None): every target valid, unit weights
        return {"p": probs, "q": q, "s": None, "count": target.numel(),
                "cdim": 1 - output.ndim}

    def hessian_product(self, state, T):
        hp = softmax_hessian_product(state["p"], T, dim=state["cdim"])
        return hp if state["s"] is None else state["s"] * hp

    def residual(self, state):
        if state["s"] is None:
            return state["p"] - state["q"]
        return state["s"] * state["p"] - state["q"]

    def sampled_residuals(self, state, S, generator):
        p, s_ = state["p"], state["s"]
        C = p.shape[1]
        rows = p.movedim(1, -1).reshape(-1, C)
        labels = torch.multinomial(rows, S, replacement=True, generator=generator)  # (R, S)
        onehot = torch.zeros(S, rows.shape[0], C, dtype=p.dtype, device=p.device)
        onehot.scatter_(2, labels.mT.unsqueeze(-1), 1.0)
        moved_shape = (S, *p.movedim(1, -1).shape)
        onehot = onehot.reshape(moved_shape).movedim(-1, 2)
        return p - onehot if s_ is None else s_.sqrt() * (p - onehot)

    def hessian_sqrt(self, state):
        # s (diag(p) − p pᵀ) = V Vᵀ with column c = √s (√p_c e_c − p √p_c), at every
        # position d separately (a column per class and position)
        p, s_ = state["p"], state["s"]
        N, C = p.shape[0], p.shape[1]
        pf = p.reshape(N, C, -1)  # (N, C, D)
        D = pf.shape[-1]
        sq = pf.sqrt()
        eye = torch.eye(C, dtype=p.dtype, device=p.device)
        cols = sq.unsqueeze(2) * (eye[None, :, :, None] - pf.unsqueeze(1))  # (N, c, i, D)
        if s_ is not None:
            cols = cols * s_.reshape(N, 1, 1, -1).sqrt()
        # column (c, d) is nonzero at position d only
        out = torch.zeros(C, D, N, C, D, dtype=p.dtype, device=p.device)
        idx = torch.arange(D, device=p.device)
        out[:, idx, :, :, idx] = cols.permute(3, 1, 0, 2)
        return out.reshape(C * D, *p.shape)

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

    def hessian_sqrt(self, state):
        out = state["out"]
        N = out.shape[0]
        D = out[0].numel()
        eye = torch.eye(D, dtype=out.dtype, device=out.device) * math.sqrt(2.0)
        return eye[:, None, :].expand(D, N, D).reshape(D, *out.shape)


class _BCEWithLogits(LossCurvature):
    """Binary cross entropy with logits, element weights ``w`` and ``pos_weight`` ``π``
    (broadcast along the last dimension), as PyTorch:
    ``ℓ = −w [π y log σ(o) + (1 − y) log(1 − σ(o))]``, gradient ``w (c σ − π y)`` and
    Hessian ``w c σ (1 − σ)`` with ``c = 1 − y + π y``. A mean divides by the number of
    output entries."""

    def prepare(self, output, target):
        self._check_float_target(output, target)
        s = torch.sigmoid(output.detach())
        w = self.loss_fn.weight
        pw = self.loss_fn.pos_weight
        c = torch.ones_like(s) if pw is None else 1 - target + pw.to(s) * target
        scale = c if w is None else torch.broadcast_to(w.to(s), s.shape) * c
        wpy = target if pw is None else pw.to(s) * target
        if w is not None:
            wpy = wpy * w.to(s)
        return {"count": output.numel(), "s": s, "scale": scale, "wpy": wpy}

    def hessian_product(self, state, T):
        return state["scale"] * sigmoid_hessian_product(state["s"], T)

    def residual(self, state):
        return state["scale"] * state["s"] - state["wpy"]

    def sampled_residuals(self, state, S, generator):
        s = state["s"]
        draws = torch.bernoulli(s.expand(S, *s.shape), generator=generator)
        return state["scale"].sqrt() * (s - draws)

    def hessian_sqrt(self, state):
        s = state["s"]
        N = s.shape[0]
        diag = (state["scale"] * s * (1 - s)).sqrt().reshape(N, -1)  # (N, D)
        D = diag.shape[1]
        out = torch.diag_embed(diag).permute(2, 0, 1)  # (D, N, D)
        return out.reshape(D, *s.shape)
