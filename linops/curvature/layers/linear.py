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

from .. import _memory
from ._base import LayerRule, register

__all__ = ["LinearRule", "batched_outer", "per_sample", "summed", "sum_sq", "sum_sq_batch",
           "sum_sq_chunked", "sq_norm_chunked", "square_sum", "sq_norm"]


def per_sample(a, g, bias: bool):
    """``a`` (N, T, I), ``g`` (M, N, T, O) → weight (M, N, O, I) [, bias (M, N, O)]."""
    M, N, T, O = g.shape
    if T == 1:  # outer products
        w = _memory.empty((M, N, O, a.shape[-1]), torch.result_type(g, a), g.device)
        torch.mul(g[:, :, 0, :, None], a[:, 0, None, :], out=w)
    else:  # one GEMM per sample over all columns: (N, M·O, T) @ (N, T, I)
        w = batched_outer(g.permute(1, 0, 3, 2).reshape(N, M * O, T), a.mT).view(
            N, M, O, -1).transpose(0, 1)
    out = {"weight": w}
    if bias:
        out["bias"] = g.sum(2)
    return out


def batched_outer(g, u):
    """``Σₗ g[b, :, l] u[b, :, l]ᵀ`` per batch entry b: ``g`` (B, R, L), ``u`` (B, I, L) →
    (B, R, I), one batched GEMM into a ``_memory.empty`` buffer (the per-sample gradients
    of every column at once; the cotangent, not the larger input, is what gets reshaped)."""
    out = _memory.empty((g.shape[0], g.shape[1], u.shape[1]), torch.result_type(g, u),
                        g.device)
    return torch.bmm(g, u.mT, out=out)


def summed(a, g, bias: bool):
    if a.shape[1] == 1:  # one GEMM per column, without einsum's planning
        w = torch.mm(g[0, :, 0].T, a[:, 0]).unsqueeze(0) if g.shape[0] == 1 \
            else torch.matmul(g[:, :, 0].mT, a[:, 0])
    else:
        w = torch.einsum("mnto,nti->moi", g, a)
    out = {"weight": w}
    if bias:
        out["bias"] = g[:, :, 0].sum(1) if g.shape[2] == 1 else g.sum((1, 2))
    return out


def _weighted_sq(g, w):
    """Σₘ wₘ gₘ² of ``g`` (M, N, O): (N, O)."""
    if g.shape[0] == 1:
        g0 = g[0].square()
        return g0 if w is None else g0.mul_(w[0, :, None])
    g2 = g * g
    return (g2 if w is None else g2 * w[:, :, None]).sum(0)


def sum_sq(a, g, w, bias: bool):
    """T = 1 only: Σₘₙ w (∇W)², Σₘₙ w (∇b)²."""
    g2 = _weighted_sq(g[:, :, 0], w)  # (N, O)
    out = {"weight": torch.mm(g2.T, a[:, 0] ** 2)}
    if bias:
        out["bias"] = g2.sum(0)
    return out


def sum_sq_batch(a, g, w, bias: bool):
    g2 = _weighted_sq(g[:, :, 0], w)  # (N, O)
    w = _memory.empty((*g2.shape, a.shape[-1]), torch.result_type(g2, a), g2.device)
    out = {"weight": torch.mul(g2[:, :, None], (a[:, 0] ** 2)[:, None, :], out=w)}
    if bias:
        out["bias"] = g2
    return out


#: entries of per-sample gradients formed at once by ``sum_sq_chunked`` (cache-sized)
_CHUNK = 2**20


def sum_sq_chunked(u, g, w, batch: bool, summed: bool = False):
    """Σₘ (Σₙ) wₘₙ (gₘₙ uₙᵀ)² without the (M, N, O, I) per-sample gradients: ``u``
    (N, I, L), ``g`` (M, N, O, L), ``w`` (M, N) or None → (O, I), or (N, O, I) with
    ``batch``. The per-sample gradients are formed a few samples at a time, so they stay in
    cache and are squared and summed where they are: about 3× faster on CPU than forming
    them all (a large fresh buffer) and reducing afterwards. ``summed``: also return
    Σₙ gₘₙ uₙᵀ (M, O, I), summed from the same chunks before they are squared (the
    gradient, for ``variance``, at the cost of reading them once more in cache)."""
    M, N, O, L = g.shape
    I = u.shape[1]
    dtype = torch.result_type(g, u)
    out = (_memory.empty((N, O, I), dtype, g.device) if batch
           else torch.zeros((O, I), dtype=dtype, device=g.device))
    total = torch.zeros((M, O, I), dtype=dtype, device=g.device) if summed else None
    step = max(1, _CHUNK // (M * O * I))
    per_column = M == 1 or L > I  # the cotangents outweigh the gradients: no copy of them
    for s in range(0, N, step):
        e = min(N, s + step)
        ut = u[s:e].mT
        if per_column:
            acc = None
            for m in range(M):
                W = torch.bmm(g[m, s:e], ut)
                if summed:
                    total[m] += W.sum(0)
                W = W.square_()
                if w is not None:
                    W.mul_(w[m, s:e, None, None])
                acc = W if acc is None else acc.add_(W)
        else:
            W = torch.bmm(g[:, s:e].transpose(0, 1).reshape(e - s, M * O, L), ut)
            W = W.view(e - s, M, O, I)
            if summed:
                total += W.sum(0)
            W = W.square_()
            if w is not None:
                W.mul_(w[:, s:e].T[:, :, None, None])
            acc = W[:, 0] + W[:, 1]  # M > 1 here
            for m in range(2, M):
                acc.add_(W[:, m])
        if batch:
            out[s:e] = acc
        else:
            out += acc.sum(0)
    return (out, total) if summed else out


def sq_norm_chunked(u, g):
    """``(M, N)``: ‖gₘₙ uₙᵀ‖² (Frobenius) per column and sample, formed a few samples at a
    time as in ``sum_sq_chunked``: ``u`` (N, I, L), ``g`` (M, N, O, L)."""
    M, N, O, L = g.shape
    I = u.shape[1]
    out = torch.empty((M, N), dtype=torch.result_type(g, u), device=g.device)
    step = max(1, _CHUNK // (M * O * I))
    for s in range(0, N, step):
        e = min(N, s + step)
        ut = u[s:e].mT
        if M == 1 or L > I:
            for m in range(M):
                out[m, s:e] = torch.linalg.vector_norm(torch.bmm(g[m, s:e], ut), dim=(1, 2))
        else:
            W = torch.bmm(g[:, s:e].transpose(0, 1).reshape(e - s, M * O, L), ut)
            out[:, s:e] = torch.linalg.vector_norm(W.view(e - s, M, O * I), dim=2).T
    return out.square_()


def square_sum(g, w, batch: bool):
    """Σₘ (Σₙ) wₘₙ gₘₙ² of per-sample gradients ``g`` (M, N, ...), weights ``w`` (M, N) or
    None; ``batch``: Σₘ only, (N, ...)."""
    if w is None and not batch:  # one fused reduction, no squared copy (3× faster on CPU)
        return torch.linalg.vector_norm(g, dim=(0, 1)).square_()
    # Σₘ by accumulating column by column: no (M, N, ...) temporary, and no reduction over
    # a middle dimension (PyTorch's CPU reductions are slow there)
    out = torch.zeros_like(g[0], memory_format=torch.contiguous_format)
    for m in range(g.shape[0]):
        gm = g[m]
        out.addcmul_(gm if w is None else gm * w[m].reshape(-1, *([1] * (g.ndim - 2))), gm)
    return out if batch else out.sum(0)


def sq_norm(a, g, bias: bool):
    """‖∇W‖², ‖∇b‖² per column and sample, (M, N): closed forms for T = 1, the Gram
    identity where it costs less than the per-sample gradients, else those gradients a few
    samples at a time."""
    M, T, I, O = g.shape[0], a.shape[1], a.shape[2], g.shape[3]
    if T == 1:  # (vector norms: one fused pass each, 1.5× faster than squares summed)
        w = _sq(g[:, :, 0]) * _sq(a[:, 0])
    elif T * (I + M * O) <= M * O * I:  # the Gram matrices cost less than the gradients
        gram_a = torch.matmul(a, a.mT)  # (N, T, T)
        gram_g = torch.matmul(g, g.mT)  # (M, N, T, T)
        w = (gram_g * gram_a).sum((-2, -1))
    else:  # the per-sample gradients, a few samples at a time
        w = sq_norm_chunked(a.mT, g.mT)
    out = {"weight": w}
    if bias:
        out["bias"] = _sq(g.sum(2) if T > 1 else g[:, :, 0])
    return out


def _sq(x):
    """Squared vector norms along the last dimension."""
    return torch.linalg.vector_norm(x, dim=-1).square_()


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
        return self._sum_sq(rec, cot, w, False)

    def sum_sq_batch(self, rec, cot, w):
        return self._sum_sq(rec, cot, w, True)

    def sum_sq_summed(self, rec, cot):
        a, g, b = self._ag(rec, cot)
        if a.shape[1] == 1 or "weight" not in rec.params:
            return None  # T = 1: the closed forms are cheaper than any by-product
        sq, tot = sum_sq_chunked(a.mT, g.mT, None, False, summed=True)
        out_sq, out_sum = {"weight": sq}, {"weight": tot}
        if b:
            gs = g.sum(2)
            out_sq["bias"] = square_sum(gs, None, False)
            out_sum["bias"] = gs.sum(1)
        return _select(out_sq, rec), _select(out_sum, rec)

    def _sum_sq(self, rec, cot, w, batch):
        a, g, b = self._ag(rec, cot)
        if a.shape[1] == 1:
            return _select((sum_sq_batch if batch else sum_sq)(a, g, w, b), rec)
        out = {}
        if "weight" in rec.params:  # T > 1: sequences (weight shared over positions)
            out["weight"] = sum_sq_chunked(a.mT, g.mT, w, batch)
        if b:
            out["bias"] = square_sum(g.sum(2), w, batch)
        return out

    def sq_norm(self, rec, cot):
        res = sq_norm(*self._ag(rec, cot))
        return None if res is None else _select(res, rec)


def _select(d, rec):
    """Only the differentiated parameters of the call."""
    return {k: v for k, v in d.items() if k in rec.params}
