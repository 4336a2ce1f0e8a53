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

from .. import _memory
from . import linear
from ._base import LayerRule, register

__all__ = ["ConvRule"]

#: up to this many cotangent columns, summed gradients use the convolution's backward kernel
_KERNEL_COLUMNS = 4


def _unfold(m, x, groups, feature_major: bool = False):
    """The input patches ``(N, G, C_in/G · kernel, L)`` (the layout of ``F.unfold``, in 1,
    2 or 3 dimensions): zero padding, then the windows as a view (``Tensor.unfold`` per
    spatial dimension, every dilation-th entry of each window) permuted so the output
    positions are innermost, and one copy of that: its inner runs are rows of the input
    (2-2.5× faster on CPU than one strided copy per kernel offset, which in turn beat
    ``F.unfold`` and a one-hot-kernel convolution several times). ``feature_major``
    (groups = 1): ``(C_in · kernel, N, L)`` instead, whose rows are contiguous over samples
    and positions (the Kronecker factor ``A = U Uᵀ`` is then one GEMM on it, without a
    transposed copy)."""
    k, d = m.kernel_size, len(m.kernel_size)
    N, C = x.shape[0], x.shape[1]
    pad = [p for p in reversed(m.padding) for _ in range(2)]
    if any(pad):
        x = F.pad(x, pad)
    v = x
    for i in range(d):  # (N, C, L_1..L_d, K_1..K_d): windows of the dilated extent
        span = m.dilation[i] * (k[i] - 1) + 1
        v = v.unfold(2 + i, span, m.stride[i])
    if any(dl > 1 for dl in m.dilation):
        v = v[(Ellipsis, *(slice(None, None, dl) for dl in m.dilation))]
    pos = list(range(2, 2 + d))
    ker = list(range(2 + d, 2 + 2 * d))
    if feature_major:
        return v.permute(1, *ker, 0, *pos).reshape(C * math.prod(k), N, -1)
    return v.permute(0, 1, *ker, *pos).reshape(N, groups, (C // groups) * math.prod(k), -1)


#: a Conv2d input whose kernel rows hold at least this many entries (C_in/groups · kernel
#: width) is unfolded along its width only, and each kernel row's patches are a view of
#: that (``_row_pieces``); smaller rows are faster fully unfolded (on the reference CNN the
#: row views win on its second layer, 100 entries, and lose on its first, 5)
_ROW_VIEW_MIN = 32


def _row_pieces(m, x):
    """A Conv2d input unfolded along its width only: one copy of its width windows into
    ``X`` (N, C, k_w, H, L_w), a third of the full unfold's entries for a 5×5 kernel,
    whose kernel row ``a`` then gives the patches ``(N, G, C/G · k_w, L)`` of the weight's
    slice ``[:, :, a, :]`` as a strided view (rows (c, j) at a constant stride, the L
    output positions contiguous). ``[(a, U_a)]``, or None where this does not apply
    (other dimensions, a row stride, small rows, a single kernel row)."""
    if not isinstance(m, nn.Conv2d) or m.stride[0] != 1 or m.kernel_size[0] == 1:
        return None
    (kh, kw), (dh, dw), sw, G = m.kernel_size, m.dilation, m.stride[1], m.groups
    N, C = x.shape[0], x.shape[1]
    if (C // G) * kw < _ROW_VIEW_MIN:
        return None
    ph, pw = m.padding
    if ph or pw:
        x = F.pad(x, [pw, pw, ph, ph])
    H, W = x.shape[2], x.shape[3]
    Lh, Lw = H - dh * (kh - 1), (W - dw * (kw - 1) - 1) // sw + 1
    v = x.unfold(3, dw * (kw - 1) + 1, sw)[..., ::dw]  # (N, C, H, L_w, k_w), a view
    X = v.permute(0, 1, 4, 2, 3).contiguous()  # (N, C, k_w, H, L_w): one copy
    return [(a, X[:, :, :, a * dh: a * dh + Lh].view(N, G, (C // G) * kw, Lh * Lw))
            for a in range(kh)]


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
        """The whole unfolded input ``(N, G, C_in/G · kernel, L)`` and the cotangents
        ``(M, N, G, O, L)`` (the Kronecker factors take these)."""
        if "unfolded" not in rec.cache:
            rec.cache["unfolded"] = _unfold(rec.module, rec.input, rec.module.groups)
        U = rec.cache["unfolded"]
        g = cot.reshape(cot.shape[0], U.shape[0], U.shape[1], -1, U.shape[-1])
        return U, g

    @classmethod
    def _pieces(cls, rec, cot):
        """``([(a, U_a)], g)``: the unfolded input in pieces, each a Linear layer's input
        for part of the weight: ``a`` None for the whole input (``_ug``), or a kernel row
        of a Conv2d (``_row_pieces``) for the weight's slice ``[:, :, a, :]``."""
        if "pieces" not in rec.cache:
            rows = _row_pieces(rec.module, rec.input)
            rec.cache["pieces"] = rows if rows is not None else [(None, cls._ug(rec, cot)[0])]
        pieces = rec.cache["pieces"]
        U = pieces[0][1]
        g = cot.reshape(cot.shape[0], U.shape[0], U.shape[1], -1, U.shape[-1])
        return pieces, g

    @staticmethod
    def _place(rec, parts, lead):
        """The weight's ``(*lead, *weight.shape)`` from the pieces' ``(*lead, G, O, I_a)``."""
        w = rec.module.weight
        if len(parts) == 1 and parts[0][0] is None:
            return parts[0][1].reshape(*lead, *w.shape)
        t0 = parts[0][1]
        out = _memory.empty((*lead, *w.shape), t0.dtype, t0.device)
        for a, t in parts:
            out[..., a, :] = t.reshape(*lead, w.shape[0], w.shape[1], w.shape[3])
        return out

    def _shape(self, rec, d, lead):
        w = rec.module.weight
        out = {}
        if "weight" in d:
            out["weight"] = d["weight"].reshape(*lead, *w.shape)
        if "bias" in d:
            out["bias"] = d["bias"].reshape(*lead, w.shape[0])
        return {k: v for k, v in out.items() if k in rec.params}

    def per_sample(self, rec, cot):
        # the whole unfold: the per-sample gradients are the result itself, and pieces
        # would take a copy of it into the weight's layout (for sqrt_ggn_exact on the
        # reference CNN, 128 MB: twice the time)
        U, g = self._ug(rec, cot)
        pieces = [(None, U)]
        M, N, G, O, L = g.shape
        d = {}
        if "weight" in rec.params:
            parts = []
            for a, U in pieces:
                I = U.shape[2]
                Ub = U.reshape(N * G, I, L)
                if M > 1 and L > I:  # the cotangents outweigh the result: a GEMM per column
                    w = _memory.empty((M, N, G, O, I), torch.result_type(g, U), g.device)
                    for m in range(M):
                        torch.bmm(g[m].reshape(N * G, O, L), Ub.mT, out=w[m].view(N * G, O, I))
                else:  # one GEMM per sample over all columns (the result outweighs them)
                    w = linear.batched_outer(g.permute(1, 2, 0, 3, 4).reshape(N * G, M * O, L),
                                             Ub).view(N, G, M, O, I).permute(2, 0, 1, 3, 4)
                parts.append((a, w))
            d["weight"] = self._place(rec, parts, cot.shape[:2])
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
        pieces, g = self._pieces(rec, cot)
        M, N, G, O, L = g.shape
        d = {}
        if "weight" in rec.params:
            # Σ over samples and positions as one batched GEMM per group and piece
            gf = g.permute(0, 2, 3, 1, 4).reshape(M, G, O, N * L)
            d["weight"] = self._place(rec, [
                (a, torch.matmul(gf, U.permute(1, 0, 3, 2).reshape(G, N * L, U.shape[2])))
                for a, U in pieces], (M,))
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
        pieces, g = self._pieces(rec, cot)
        M, N, G, O, L = g.shape
        sq, tot = [], []
        for a, U in pieces:
            parts = [linear.sum_sq_chunked(U[:, i], g[:, :, i], None, False, summed=True)
                     for i in range(G)]
            sq.append((a, torch.stack([p[0] for p in parts])))
            tot.append((a, torch.stack([p[1] for p in parts], 1)))
        sq = {"weight": self._place(rec, sq, ())}
        tot = {"weight": self._place(rec, tot, (M,))}
        if "bias" in rec.params:
            gs = g.sum(-1)
            sq["bias"] = linear.square_sum(gs, None, False)
            tot["bias"] = gs.sum(1)
        return self._shape(rec, sq, ()), self._shape(rec, tot, (M,))

    def _sum_sq(self, rec, cot, w, batch):
        pieces, g = self._pieces(rec, cot)
        M, N, G, O, L = g.shape
        d = {}
        lead = (N,) if batch else ()
        if "weight" in rec.params:  # each group's block on its own
            d["weight"] = self._place(rec, [(a, torch.stack(
                [linear.sum_sq_chunked(U[:, i], g[:, :, i], w, batch) for i in range(G)],
                dim=1 if batch else 0)) for a, U in pieces], lead)
        if "bias" in rec.params:
            d["bias"] = linear.square_sum(g.sum(-1), w, batch)
        return self._shape(rec, d, lead)

    def sq_norm(self, rec, cot):
        pieces, g = self._pieces(rec, cot)
        M, N, G, O, L = g.shape
        d = {}
        if "weight" in rec.params:  # Σ over the pieces' (and the groups') blocks
            d["weight"] = sum(
                linear.sq_norm(U[:, 0].mT, g[:, :, 0].mT, False)["weight"] if G == 1
                else sum(linear.sq_norm_chunked(U[:, i], g[:, :, i]) for i in range(G))
                for _, U in pieces)
        if "bias" in rec.params:
            d["bias"] = (g.sum(-1) ** 2).sum((2, 3))
        return d
