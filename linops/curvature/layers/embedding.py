"""``nn.Embedding``: row ``x`` of the weight for each index; sample n's gradient adds its
positions' output cotangents into the rows of their indices (``index_add``)."""

from __future__ import annotations

import torch
from torch import nn

from ._base import LayerRule, register

__all__ = ["EmbeddingRule"]


@register(nn.Embedding)
class EmbeddingRule(LayerRule):
    description = "closed form (the cotangents added into the indexed rows)"

    def problem(self, rec):
        m = rec.module
        if m.max_norm is not None or m.scale_grad_by_freq or m.sparse:
            return "it renormalizes rows, scales by frequency or is sparse"
        if rec.input.ndim < 1:
            return "its input has no sample dimension"
        return None

    def per_sample(self, rec, cot):
        idx = rec.input  # (N, ...) indices
        M, N = cot.shape[0], idx.shape[0]
        V, d = rec.module.weight.shape
        flat = idx.reshape(N, -1)  # (N, T)
        T = flat.shape[1]
        g = cot.reshape(M, N, T, d)
        # one row block per sample: index n·V + idx
        offsets = torch.arange(N, device=flat.device, dtype=flat.dtype)[:, None] * V
        rows = (flat + offsets).reshape(-1)
        out = cot.new_zeros((M, N * V, d))
        out.index_add_(1, rows, g.reshape(M, N * T, d))
        res = out.reshape(M, N, V, d)
        if rec.module.padding_idx is not None:  # its row gets no gradient
            res[:, :, rec.module.padding_idx] = 0
        return {"weight": res}
