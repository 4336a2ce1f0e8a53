"""``nn.Conv1d`` and ``nn.Conv2d`` (zero padding, any stride, dilation and groups).

The input is unfolded (``F.unfold``: one column of ``C_in/groups · kernel`` entries per
output position), which turns the convolution of each group into a Linear layer shared
over the L output positions: the per-sample weight gradient is
``Σₗ gₘₙₗ uₙₗᵀ`` and the formulas of ``linear.py`` apply with T = L (for one group; with
several, per group). Conv1d is unfolded as a Conv2d of height 1. Other convolutions
(Conv3d, transposed ones, padding modes other than zeros, ``padding='same'``) take the
generic ``torch.func`` rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import linear
from ._base import LayerRule, register

__all__ = ["ConvRule"]


@register(nn.Conv1d, nn.Conv2d)
class ConvRule(LayerRule):
    description = "closed form on the unfolded input (Linear formulas per group)"

    def problem(self, rec):
        m = rec.module
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            return "its padding is not explicit zero padding"
        if rec.input.ndim != m.weight.ndim:
            return "its input has no sample dimension"
        return None

    @staticmethod
    def _ug(rec, cot):
        m, x = rec.module, rec.input
        k, s, p, d = m.kernel_size, m.stride, m.padding, m.dilation
        if isinstance(m, nn.Conv1d):
            x = x.unsqueeze(2)
            k, s, p, d = (1, k[0]), (1, s[0]), (0, p[0]), (1, d[0])
        N, G = x.shape[0], m.groups
        U = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, C_in·kk, L)
        L = U.shape[-1]
        U = U.reshape(N, G, -1, L)
        M = cot.shape[0]
        g = cot.reshape(M, N, G, -1, L)
        return U, g

    def _shape(self, rec, d, lead):
        w = rec.module.weight
        out = {}
        if "weight" in d:
            out["weight"] = d["weight"].reshape(*lead, *w.shape)
        if "bias" in d:
            out["bias"] = d["bias"].reshape(*lead, w.shape[0])
        return {k: v for k, v in out.items() if k in rec.params}

    def per_sample(self, rec, cot):
        U, g = self._ug(rec, cot)
        d = {"weight": torch.einsum("mngol,ngil->mngoi", g, U)}
        if "bias" in rec.params:
            d["bias"] = g.sum(-1)
        return self._shape(rec, d, cot.shape[:2])

    def summed(self, rec, cot):
        U, g = self._ug(rec, cot)
        d = {"weight": torch.einsum("mngol,ngil->mgoi", g, U)}
        if "bias" in rec.params:
            d["bias"] = g.sum((1, -1))
        return self._shape(rec, d, cot.shape[:1])

    def sq_norm(self, rec, cot):
        U, g = self._ug(rec, cot)
        if U.shape[1] != 1:
            return None
        res = linear.sq_norm(U[:, 0].mT, g[:, :, 0].mT, "bias" in rec.params)
        return None if res is None else {k: v for k, v in res.items() if k in rec.params}
