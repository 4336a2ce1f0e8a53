"""Affine parameters of normalization layers: ``y = x̂ ⊙ γ + β``.

``x̂`` is the normalized input, recomputed from the recorded input exactly as the layer
normalizes it: BatchNorm in eval mode with the running statistics (per channel),
LayerNorm over its ``normalized_shape`` (per sample and position), GroupNorm over the
channels of each group and the spatial positions (per sample). Sample n's gradients are
``∇γ = Σ g ⊙ x̂`` and ``∇β = Σ g`` over the dimensions γ is shared along.
"""

from __future__ import annotations

import torch
from torch import nn

from ._base import LayerRule, register

__all__ = ["BatchNormRule", "LayerNormRule", "GroupNormRule"]


class _AffineNorm(LayerRule):
    description = "closed form (Σ g ⊙ x̂, Σ g)"

    def _normalized(self, rec) -> torch.Tensor:
        raise NotImplementedError

    def _reduce_dims(self, rec, x) -> tuple:
        """The dimensions of ``(N, ...)`` that γ is shared along (not N)."""
        raise NotImplementedError

    def per_sample(self, rec, cot):
        if "xhat" not in rec.cache:
            rec.cache["xhat"] = self._normalized(rec)
        xhat = rec.cache["xhat"]
        dims = tuple(d + 1 for d in self._reduce_dims(rec, xhat))  # cot has M in front
        shape = rec.module.weight.shape if rec.module.weight is not None else None
        def reduce(t):  # (an empty dims would sum everything)
            return (t.sum(dims) if dims else t).reshape(*cot.shape[:2], *shape)

        out = {}
        if "weight" in rec.params:
            out["weight"] = reduce(cot * xhat)
        if "bias" in rec.params:
            out["bias"] = reduce(cot)
        return out


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormRule(_AffineNorm):
    def problem(self, rec):
        m = rec.module
        if m.training or m.running_mean is None:
            return "it normalizes with batch statistics (training mode or no running stats)"
        return None

    def _normalized(self, rec):
        m, x = rec.module, rec.input
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x - m.running_mean.reshape(shape)) / torch.sqrt(
            m.running_var.reshape(shape) + m.eps)

    def _reduce_dims(self, rec, x):
        return tuple(range(2, x.ndim))


@register(nn.LayerNorm)
class LayerNormRule(_AffineNorm):
    def problem(self, rec):
        if rec.module.weight is None and rec.module.bias is None:
            return "it has no affine parameters"
        return None

    def _normalized(self, rec):
        m, x = rec.module, rec.input
        dims = tuple(range(x.ndim - len(m.normalized_shape), x.ndim))
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + m.eps)

    def _reduce_dims(self, rec, x):
        return tuple(range(1, x.ndim - len(rec.module.normalized_shape)))


@register(nn.GroupNorm)
class GroupNormRule(_AffineNorm):
    def _normalized(self, rec):
        m, x = rec.module, rec.input
        g = x.reshape(x.shape[0], m.num_groups, -1)
        mean = g.mean(-1, keepdim=True)
        var = g.var(-1, unbiased=False, keepdim=True)
        return ((g - mean) / torch.sqrt(var + m.eps)).reshape(x.shape)

    def _reduce_dims(self, rec, x):
        return tuple(range(2, x.ndim))
