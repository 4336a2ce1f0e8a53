"""``nn.Linear``: ``h = a Wᵀ + b`` on inputs ``(N, ..., in)``.

With the input flattened to ``a`` ``(N, T, in)`` (T = 1 for 2-D inputs, the product of
the middle dimensions otherwise, where W is shared across positions) and the output
cotangents to ``g`` ``(M, N, T, out)``, sample n's gradient of column m is
``∇W = Σₜ gₘₙₜ aₙₜᵀ``, ``∇b = Σₜ gₘₙₜ``. Closed forms that never form the per-sample
gradients:

- T = 1: ``‖∇W‖² = ‖aₙ‖² ‖gₘₙ‖²`` and ``Σₙ w (∇W)² = Σₙ w gₘₙ² (aₙ²)ᵀ`` (squares
  elementwise);
- T > 1: ``‖∇W‖² = Σₜₛ (gₜ·gₛ)(aₜ·aₛ)`` (the Gram-matrix identity), used when the Gram
  matrices, T²(I + M·O) multiply-adds per sample, cost less than the M per-sample
  gradients, M·T·O·I.

The same functions serve convolutions (``conv.py``), whose unfolded input is a Linear
layer's input with T = the number of output positions.
"""

from __future__ import annotations

import torch
from torch import nn

from ._base import LayerRule, register

__all__ = ["LinearRule", "per_sample", "summed", "sum_sq", "sum_sq_batch", "sq_norm"]


def per_sample(a, g, bias: bool):
    """``a`` (N, T, I), ``g`` (M, N, T, O) → weight (M, N, O, I) [, bias (M, N, O)]."""
    out = {"weight": torch.einsum("mnto,nti->mnoi", g, a)}
    if bias:
        out["bias"] = g.sum(2)
    return out


def summed(a, g, bias: bool):
    out = {"weight": torch.einsum("mnto,nti->moi", g, a)}
    if bias:
        out["bias"] = g.sum((1, 2))
    return out


def _weighted_sq(g, w):
    g2 = g * g
    return g2 if w is None else g2 * w[:, :, None]


def sum_sq(a, g, w, bias: bool):
    """T = 1 only: Σₘₙ w (∇W)², Σₘₙ w (∇b)²."""
    g2 = _weighted_sq(g[:, :, 0], w)  # (M, N, O)
    out = {"weight": torch.einsum("mno,ni->oi", g2, a[:, 0] ** 2)}
    if bias:
        out["bias"] = g2.sum((0, 1))
    return out


def sum_sq_batch(a, g, w, bias: bool):
    g2 = _weighted_sq(g[:, :, 0], w).sum(0)  # (N, O)
    out = {"weight": g2[:, :, None] * (a[:, 0] ** 2)[:, None, :]}
    if bias:
        out["bias"] = g2
    return out


def sq_norm(a, g, bias: bool):
    """‖∇W‖², ‖∇b‖² per column and sample, (M, N), or None where the Gram identity would
    cost more than the per-sample gradients."""
    M, T, I, O = g.shape[0], a.shape[1], a.shape[2], g.shape[3]
    if T == 1:
        w = (g[:, :, 0] ** 2).sum(-1) * (a[:, 0] ** 2).sum(-1)
    elif T * (I + M * O) <= M * O * I:  # the Gram matrices cost less than the gradients
        gram_a = torch.matmul(a, a.mT)  # (N, T, T)
        gram_g = torch.matmul(g, g.mT)  # (M, N, T, T)
        w = (gram_g * gram_a).sum((-2, -1))
    else:
        return None
    out = {"weight": w}
    if bias:
        out["bias"] = (g.sum(2) ** 2).sum(-1)
    return out


@register(nn.Linear)
class LinearRule(LayerRule):
    description = "closed form (einsum; ‖a‖²‖g‖² and the Gram identity for norms)"
    kronecker = "G ⊗ A; inputs with extra dimensions by `expand` or `reduce`; KFRA in MLP chains"

    def problem(self, rec):
        if rec.input.ndim < 2:
            return "its input has no sample dimension"
        return None

    @staticmethod
    def _ag(rec, cot):
        a = rec.input
        N = a.shape[0]
        a = a.reshape(N, -1, a.shape[-1])
        g = cot.reshape(cot.shape[0], N, -1, cot.shape[-1])
        return a, g, "bias" in rec.params

    def per_sample(self, rec, cot):
        return _select(per_sample(*self._ag(rec, cot)), rec)

    def summed(self, rec, cot):
        return _select(summed(*self._ag(rec, cot)), rec)

    def sum_sq(self, rec, cot, w):
        a, g, b = self._ag(rec, cot)
        return _select(sum_sq(a, g, w, b), rec) if a.shape[1] == 1 else None

    def sum_sq_batch(self, rec, cot, w):
        a, g, b = self._ag(rec, cot)
        return _select(sum_sq_batch(a, g, w, b), rec) if a.shape[1] == 1 else None

    def sq_norm(self, rec, cot):
        res = sq_norm(*self._ag(rec, cot))
        return None if res is None else _select(res, rec)


def _select(d, rec):
    """Only the differentiated parameters of the call."""
    return {k: v for k, v in d.items() if k in rec.params}
