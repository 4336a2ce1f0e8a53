"""``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d`` (zero padding, any stride, dilation, groups).

The input is unfolded (``F.unfold``: one column of ``C_in/groups · kernel`` entries per
output position), which turns the convolution of each group into a Linear layer shared
over the L output positions: the per-sample weight gradient is
``Σₗ gₘₙₗ uₙₗᵀ`` and the formulas of ``linear.py`` apply with T = L (for one group; with
several, per group). Transposed convolutions, padding modes other than zeros and
``padding='same'`` take the generic ``torch.func`` rule.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _memory
from . import linear
from ._base import LayerRule, register

__all__ = ["ConvRule"]

#: up to this many cotangent columns, summed gradients use the convolution's backward kernel
_KERNEL_COLUMNS = 4


def _unfold(m, x, groups):
    """The input patches ``(N, G, C_in/G · kernel, L)`` (the layout of ``F.unfold``, in 1,
    2 or 3 dimensions): zero padding, then one strided slice copy per kernel offset (for a
    5×5 kernel 25 copies of (N, C, *L)). Several times faster on CPU than ``F.unfold``, a
    one-hot-kernel convolution, or one copy of the ``Tensor.unfold`` view (whose innermost
    runs are a few elements long)."""
    k, d = m.kernel_size, len(m.kernel_size)
    N, C = x.shape[0], x.shape[1]
    pad = [p for p in reversed(m.padding) for _ in range(2)]
    if any(pad):
        x = F.pad(x, pad)
    L = [(x.shape[2 + i] - m.dilation[i] * (k[i] - 1) - 1) // m.stride[i] + 1
         for i in range(d)]
    out = torch.empty((N, C, *k, *L), dtype=x.dtype, device=x.device)
    for offset in itertools.product(*(range(ki) for ki in k)):
        window = tuple(slice(o * m.dilation[i], o * m.dilation[i] + m.stride[i] * (L[i] - 1)
                             + 1, m.stride[i]) for i, o in enumerate(offset))
        out[(slice(None), slice(None), *offset)] = x[(slice(None), slice(None), *window)]
    return out.view(N, groups, (C // groups) * math.prod(k), -1)


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
        M, N, G, O, L = g.shape
        I = U.shape[2]
        Ub = U.reshape(N * G, I, L)
        if M > 1 and L > I:  # the cotangents outweigh the result: one GEMM per column
            w = _memory.empty((M, N, G, O, I), torch.result_type(g, U), g.device)
            for m in range(M):
                torch.bmm(g[m].reshape(N * G, O, L), Ub.mT, out=w[m].view(N * G, O, I))
        else:  # one GEMM per sample over all columns (the result outweighs the cotangents)
            w = linear.batched_outer(g.permute(1, 2, 0, 3, 4).reshape(N * G, M * O, L),
                                     Ub).view(N, G, M, O, I).permute(2, 0, 1, 3, 4)
        d = {"weight": w}
        if "bias" in rec.params:
            d["bias"] = g.sum(-1)
        return self._shape(rec, d, cot.shape[:2])

    def summed(self, rec, cot):
        m = rec.module
        if cot.shape[0] <= _KERNEL_COLUMNS:
            # Σ over samples and positions by the convolution's own weight-gradient kernel,
            # one call per column (faster than the unfolded GEMM for few columns)
            d = {}
            if "weight" in rec.params:
                x, w = rec.input, m.weight.detach()
                d["weight"] = torch.stack([torch.ops.aten.convolution_backward(
                    c, x, w, None, m.stride, m.padding, m.dilation, False,
                    [0] * len(m.kernel_size), m.groups, [False, True, False])[1]
                    for c in cot])
            if "bias" in rec.params:
                d["bias"] = cot.sum((1, *range(3, cot.ndim)))
            return d
        U, g = self._ug(rec, cot)
        M, N, G, O, L = g.shape
        # Σ over samples and positions as one batched GEMM per group
        gf = g.permute(0, 2, 3, 1, 4).reshape(M, G, O, N * L)
        Uf = U.permute(1, 0, 3, 2).reshape(G, N * L, U.shape[2])
        d = {"weight": torch.matmul(gf, Uf)}
        if "bias" in rec.params:
            d["bias"] = g.sum((1, -1))
        return self._shape(rec, d, cot.shape[:1])

    def sum_sq(self, rec, cot, w):
        return self._sum_sq(rec, cot, w, False)

    def sum_sq_batch(self, rec, cot, w):
        return self._sum_sq(rec, cot, w, True)

    def sum_sq_summed(self, rec, cot):
        if "weight" not in rec.params:
            return None
        U, g = self._ug(rec, cot)
        M, N, G, O, L = g.shape
        parts = [linear.sum_sq_chunked(U[:, i], g[:, :, i], None, False, summed=True)
                 for i in range(G)]
        sq = {"weight": parts[0][0] if G == 1 else torch.stack([p[0] for p in parts])}
        tot = {"weight": parts[0][1] if G == 1 else torch.stack([p[1] for p in parts], 1)}
        if "bias" in rec.params:
            gs = g.sum(-1)
            sq["bias"] = linear.square_sum(gs, None, False)
            tot["bias"] = gs.sum(1)
        return self._shape(rec, sq, ()), self._shape(rec, tot, (M,))

    def _sum_sq(self, rec, cot, w, batch):
        U, g = self._ug(rec, cot)
        M, N, G, O, L = g.shape
        d = {}
        if "weight" in rec.params:  # each group's block on its own
            parts = [linear.sum_sq_chunked(U[:, i], g[:, :, i], w, batch) for i in range(G)]
            d["weight"] = parts[0] if G == 1 else torch.stack(parts, dim=1 if batch else 0)
        if "bias" in rec.params:
            d["bias"] = linear.square_sum(g.sum(-1), w, batch)
        return self._shape(rec, d, (N,) if batch else ())

    def sq_norm(self, rec, cot):
        U, g = self._ug(rec, cot)
        M, N, G, O, L = g.shape
        if G == 1:
            res = linear.sq_norm(U[:, 0].mT, g[:, :, 0].mT, "bias" in rec.params)
            return {k: v for k, v in res.items() if k in rec.params}
        d = {}
        if "weight" in rec.params:  # Σ over the groups' blocks
            d["weight"] = sum(linear.sq_norm_chunked(U[:, i], g[:, :, i]) for i in range(G))
        if "bias" in rec.params:
            d["bias"] = (g.sum(-1) ** 2).sum((2, 3))
        return d
