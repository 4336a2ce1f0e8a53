"""Closed-form Hessians of losses with respect to their input, as products.

Pure functions on tensors, shared by ``FIM`` and the network-level curvature operators.
"""

from __future__ import annotations

import torch

__all__ = ["softmax_hessian_product", "sigmoid_hessian_product"]


def softmax_hessian_product(p: torch.Tensor, T: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``(diag(p) − p pᵀ) t`` for every row: the Hessian of ``logsumexp(z) − z_y`` (cross
    entropy) with respect to the logits ``z``, where ``p = softmax(z)``.

    Args:
        p: probabilities, classes along ``dim``.
        T: tangents broadcasting against ``p`` (for example ``(k, *p.shape)``).
        dim: the class dimension of ``T`` (negative indices count from the end, so they
            agree between ``p`` and ``T``).
    """
    pt = p * T
    return pt - p * pt.sum(dim=dim, keepdim=True)


def sigmoid_hessian_product(s: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """``σ(z)(1 − σ(z)) t`` elementwise: the Hessian of binary cross entropy with logits,
    given ``s = σ(z)``."""
    return s * (1 - s) * T
