"""``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d`` (zero padding, any stride, dilation, groups).

The input is unfolded (``F.unfold``: one column of ``C_in/groups · kernel`` entries per
output position), which turns the convolution of each group into a Linear layer shared
over the L output positions: the per-sample weight gradient is
``Σₗ gₘₙₗ uₙₗᵀ`` and the formulas of ``linear.py`` apply with T = L (for one group; with
several, per group). Transposed convolutions, padding modes other than zeros and
``padding='same'`` take the generic ``torch.func`` rule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import linear
from ._base import LayerRule, register

__all__ = ["ConvRule"]


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _unfold(m, x, groups):
    """The input patches ``(N, G, C_in/G · kernel, L)`` (the layout of ``F.unfold``, in 1,
    2 or 3 dimensions), computed as a convolution with a one-hot kernel (several times
    faster on CPU than ``im2col``)."""
    k = m.kernel_size
    N, C = x.shape[0], x.shape[1]
    kk = math.prod(k)
    eye = torch.eye(kk, dtype=x.dtype, device=x.device).reshape(kk, 1, *k)
    U = _CONV[len(k)](x, eye.repeat(C, *([1] * (len(k) + 1))), stride=m.stride,
                      padding=m.padding, dilation=m.dilation, groups=C)
    return U.reshape(N, groups, (C // groups) * kk, -1)


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(LayerRule):
    description = "closed form on the unfolded input (Linear formulas per group)"
    kronecker = "KFC: G ⊗ A over the unfolded input (groups = 1; other groups: dense block)"

    def problem(self, rec):
        m = rec.module
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            return "its padding is not explicit zero padding"
        if rec.input.ndim != m.weight.ndim:
            return "its input has no sample dimension"
        return None

    @staticmethod
    def _ug(rec, cot):
        if "unfolded" not in rec.cache:
            rec.cache["unfolded"] = _unfold(rec.module, rec.input, rec.module.groups)
        U = rec.cache["unfolded"]
        g = cot.reshape(cot.shape[0], U.shape[0], U.shape[1], -1, U.shape[-1])
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
        M, N, G, O, L = g.shape
        # Σ over samples and positions as one batched GEMM per group
        gf = g.permute(0, 2, 3, 1, 4).reshape(M, G, O, N * L)
        Uf = U.permute(1, 0, 3, 2).reshape(G, N * L, U.shape[2])
        d = {"weight": torch.matmul(gf, Uf)}
        if "bias" in rec.params:
            d["bias"] = g.sum((1, -1))
        return self._shape(rec, d, cot.shape[:1])

    def sq_norm(self, rec, cot):
        U, g = self._ug(rec, cot)
        if U.shape[1] != 1:
            return None
        res = linear.sq_norm(U[:, 0].mT, g[:, :, 0].mT, "bias" in rec.params)
        return None if res is None else {k: v for k, v in res.items() if k in rec.params}
