"""``DiagGGN``: gradient steps preconditioned by the damped diagonal of the GGN."""

from __future__ import annotations

import torch

from linops.curvature.diagonal import diagonal_pieces

from ._base import CurvatureOptimizer, positive

__all__ = ["DiagGGN"]


class DiagGGN(CurvatureOptimizer):
    """``p ← p − lr · g / (diag(G) + damping)``, elementwise, on each batch.

    The optimizer of BackPACK's diagonal Gauss-Newton example (``DiagGGNMC``,
    ``STEP_SIZE = 0.05``, ``DAMPING = 1.0``). ``G`` is the generalized Gauss-Newton matrix of
    the batch's loss ``loss_fn(model(X), y)``; its diagonal, the gradient ``g``, the loss and
    the outputs all come from one forward pass, the one of the layer-wise engine's
    ``linops.curvature.DiagGGN`` (``curvature="exact"``: the exact diagonal, back-propagating
    the loss Hessian's ``C`` square-root columns; ``"mc"``: the Monte-Carlo estimate from
    ``mc_samples`` labels drawn from the model per sample, unbiased for the exact one).

    Args:
        model: the ``nn.Module`` to train (in eval mode if it has dropout or batch norm).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``.
        lr: the step size (> 0; per group).
        damping: added to the diagonal (> 0; per group).
        curvature: ``"mc"`` (BackPACK's ``DiagGGNMC``) or ``"exact"`` (``DiagGGNExact``).
        mc_samples: the number of draws per sample for ``"mc"`` (≥ 1).
        seed: the draws' seed: step ``t`` (counted from 1) uses ``seed + t − 1``; None
            draws each step's seed from torch's global generator (``torch.manual_seed``
            makes a run repeatable).
        params: None (every trainable parameter of ``model``), parameters of ``model``, or
            parameter groups with their own ``lr`` and ``damping``.
        allow_train_mode: step even with dropout or batch norm in training mode (the
            optimizer's check; the curvature engine may still refuse).
        process_group: a ``torch.distributed`` process group: each rank steps on its shard
            of the batch; the diagonal, loss and gradient are those of the union of the
            shards (``linops.curvature.DiagGGN(process_group=...)``: one all-reduce per
            step; rank r draws with ``seed + r·2³²``, and ``seed=None`` shares rank 0's);
            ``outputs`` are this rank's. None: one process.

    ``opt.step((X, y))`` returns ``(loss, outputs)`` before the update. ``opt.last``:
    ``diag_min``, ``diag_max``, ``diag_mean`` (of ``diag(G)``), ``grad_norm``,
    ``step_norm`` (of ``g / (diag(G) + damping)``), ``seed`` (for ``"mc"``).
    """

    _checks = {"lr": positive, "damping": positive}

    def __init__(self, model, loss_fn, lr: float = 0.05, damping: float = 1.0, *,
                 curvature: str = "mc", mc_samples: int = 1, seed: int | None = None,
                 params=None, allow_train_mode: bool = False, process_group=None):
        if curvature not in ("mc", "exact"):
            raise ValueError(f"curvature must be 'mc' (Monte-Carlo, BackPACK's DiagGGNMC) or "
                             f"'exact' (DiagGGNExact); got {curvature!r}.")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer; got {mc_samples!r}.")
        if curvature == "exact" and mc_samples != 1:
            raise ValueError("mc_samples applies to curvature='mc'; the exact diagonal draws "
                             "nothing (leave mc_samples at its default).")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be None or an integer; got {seed!r}.")
        self.curvature = curvature
        self.mc_samples = mc_samples
        self.seed = seed
        super().__init__(model, loss_fn, params, dict(lr=lr, damping=damping),
                         allow_train_mode=allow_train_mode, process_group=process_group)

    def _update(self, chosen, batch):
        named = {n: p for n, p, _ in chosen}
        seed = None
        if self.curvature == "mc":
            seed = self._step_seed(self.seed)
        # the engine's per-parameter pieces as they are (no flat copies of the diagonal,
        # the gradient and the damping: a tenth of the step's time on the reference CNN)
        _, diag, info = diagonal_pieces(
            self.model, self.loss_fn, batch, named, "diag_ggn_mc" if self.curvature == "mc"
            else "diag_ggn_exact", self.mc_samples if self.curvature == "mc" else None, seed,
            process_group=self.process_group, caller="DiagGGN")
        stats = []
        with torch.no_grad():
            for n, p, grp in chosen:
                d, g = diag[n], info["gradient"][n].reshape(p.shape)
                direction = g / (d.reshape(p.shape) + grp["damping"])
                stats.append(torch.stack([d.min(), d.max(), d.sum(), g.square().sum(),
                                          direction.square().sum()]))
                p.add_(direction, alpha=-grp["lr"])
        s = torch.stack(stats)
        lo, hi = s[:, 0].min(), s[:, 1].max()
        total, g2, s2 = s[:, 2:].sum(0).tolist()
        numel = sum(p.numel() for _, p, _ in chosen)
        last = dict(diag_min=float(lo), diag_max=float(hi), diag_mean=total / numel,
                    grad_norm=g2 ** 0.5, step_norm=s2 ** 0.5, seed=seed)
        return info["loss"], info["output"].detach(), last
