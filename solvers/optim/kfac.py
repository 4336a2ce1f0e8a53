"""``KFAC``: natural-gradient steps with the K-FAC approximation of the Fisher (GGN)."""

from __future__ import annotations

import torch

import linops

from ..curvature_preconditioners import inverse_factor
from ..inverse import inv
from ._base import CurvatureOptimizer, positive

__all__ = ["KFAC"]


class KFAC(CurvatureOptimizer):
    """``p ← p − lr · (K + λ·I)⁻¹ g`` with K the K-FAC approximation of the GGN.

    Every ``update_every`` steps (the first included) ``linops.curvature.KFAC`` is built on
    the step's batch: its factors, the loss, the gradient and the outputs come from one
    forward and one backward pass of the layer-wise engine, and the damped inverse (exact,
    by the factors' eigendecompositions, or the π-heuristic of Martens & Grosse 2015) is
    cached. The steps in between take one plain forward and backward pass for the gradient
    and reuse the cached inverse: a product with it costs two GEMMs per layer.

    Args:
        model, loss_fn: as ``DiagGGN``.
        lr: the step size (> 0; per group).
        damping: λ (> 0); one value for all groups (the inverse is over all of them).
        update_every: refresh the factors and the inverse every this many steps (≥ 1).
        fisher: ``"mc"`` (K-FAC, ``mc_samples`` sampled labels), ``"exact"`` (KFLR) or
            ``"empirical"``.
        mc_samples: draws per sample for ``"mc"``.
        damping_kind: ``"pi"`` (the default: factor-wise π damping, K-FAC's own factored
            Tikhonov damping, Martens & Grosse 2015 §6.3, and curvlinops' default kind; a
            Cholesky inverse per factor at a refresh and two GEMMs per layer and step) or
            ``"exact"`` (``inv(K + λI)`` by the factors' eigendecompositions: four GEMMs
            per layer and step; on the reference CNN at ``update_every=10`` 1.85 SGD steps
            per step against 1.45, ``benchmarks/optim_bench.py``).
        kfac_approx: ``"expand"`` or ``"reduce"`` for weights shared over positions.
        seed: the draws' seed: refresh at step t (from 1) uses ``seed + t − 1``; None draws
            it from torch's global generator.
        params, allow_train_mode: as ``DiagGGN``.
        process_group: a ``torch.distributed`` process group: each rank steps on its shard
            of the batch; the factors (at a refresh), the loss and the gradient (at every
            step) are those of the union of the shards, one all-reduce each, so every rank
            caches the same inverse and takes the same step (``seed`` as ``DiagGGN``'s).
            None: one process.

    The cached inverse is not part of ``state_dict()``: after ``load_state_dict`` the next
    step refreshes it. ``opt.last``: ``refreshed`` (bool), ``grad_norm``, ``step_norm``,
    ``seed``.
    """

    _checks = {"lr": positive, "damping": positive}

    def __init__(self, model, loss_fn, lr: float = 1e-2, damping: float = 1e-3, *,
                 update_every: int = 10, fisher: str = "mc", mc_samples: int = 1,
                 damping_kind: str = "pi", kfac_approx: str = "expand",
                 seed: int | None = None, params=None, allow_train_mode: bool = False,
                 process_group=None):
        if isinstance(update_every, bool) or not isinstance(update_every, int) or (
                update_every < 1):
            raise ValueError(f"update_every must be a positive integer (steps between "
                             f"refreshes of the factors); got {update_every!r}.")
        if damping_kind not in ("exact", "pi"):
            raise ValueError(f"damping_kind must be 'exact' or 'pi'; got {damping_kind!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be None or an integer; got {seed!r}.")
        self.update_every = update_every
        self.fisher, self.mc_samples = fisher, mc_samples
        self.damping_kind, self.kfac_approx, self.seed = damping_kind, kfac_approx, seed
        self._inverse = None
        super().__init__(model, loss_fn, params, dict(lr=lr, damping=damping),
                         allow_train_mode=allow_train_mode, process_group=process_group)
        # the operator's checks (fisher, kfac_approx, mc_samples) at once, not at step 1
        from linops.curvature.kfac import _check

        _check(fisher, kfac_approx)
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer; got {mc_samples!r}.")

    def _blockwise_step(self, X, y, chosen):
        """``p ← p − lr · B_p g_p`` with ``B_p`` parameter p's block of the cached inverse;
        returns the loss, the outputs and the squared norms of the gradient and the step."""
        value, grads, outputs = self._loss_and_gradient(X, y, [p for _, p, _ in chosen],
                                                        flat=False)
        sq = []
        with torch.no_grad():
            for (_, p, grp), g, B in zip(chosen, grads, self._inverse.blocks):
                d = (B @ g.reshape(-1)).view_as(p)
                sq.append(torch.stack([g.square().sum(), d.square().sum()]))
                p.add_(d, alpha=-grp["lr"])
        sq_g, sq_d = torch.stack(sq).sum(0).tolist()
        return value, outputs, sq_g, sq_d

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._inverse = None  # refreshed at the next step

    def _update(self, chosen, batch):
        dampings = {grp["damping"] for _, _, grp in chosen}
        if len(dampings) != 1:
            raise ValueError(f"KFAC takes one damping for all parameter groups (its inverse "
                             f"spans them); got {sorted(dampings)}.")
        damping = dampings.pop()
        named = {n: p for n, p, _ in chosen}
        t = self.steps
        refresh = self._inverse is None or (t - 1) % self.update_every == 0
        seed = None
        if refresh:
            if self.fisher == "mc":
                seed = self._step_seed(self.seed)
            K = linops.curvature.KFAC(self.model, self.loss_fn, batch, fisher=self.fisher,
                                      mc_samples=self.mc_samples, seed=seed,
                                      kfac_approx=self.kfac_approx, params=named,
                                      process_group=self.process_group)
            damped = K.damped(damping, self.damping_kind)
            self._inverse = (_explicit_inverse(damped) if self.damping_kind == "pi"
                             else inv(damped))
            loss, g, outputs = K.loss, K.gradient, K.output
        elif self.process_group is None and len(self._inverse.blocks) == len(chosen):
            # between refreshes on one process: the gradient and the step parameter by
            # parameter (one block of the inverse each), without the flat vector's copies
            X, y = batch
            loss, outputs, sq_g, sq_d = self._blockwise_step(X, y, chosen)
            last = dict(refreshed=False, grad_norm=sq_g ** 0.5, step_norm=sq_d ** 0.5,
                        seed=None)
            return loss, outputs, last
        else:
            X, y = batch
            loss, g, outputs = self._loss_and_gradient(X, y, [p for _, p, _ in chosen])
        direction = self._inverse @ g
        self._write(chosen, direction, sign=-1.0)
        last = dict(refreshed=refresh, grad_norm=float(torch.linalg.vector_norm(g)),
                    step_norm=float(torch.linalg.vector_norm(direction)), seed=seed)
        return loss, outputs.detach(), last


def _explicit_inverse(damped: linops.BlockDiag) -> linops.BlockDiag:
    """The inverse of π-damped K-FAC (``KFAC.damped(λ, "pi")``: Kronecker blocks of dense
    damped factors, dense bias blocks) as explicit inverse matrices, computed once per
    refresh, so the ``update_every`` steps in between cost two GEMMs per Kronecker block
    (the generic ``inv`` would run two Cholesky solves and a residual check per factor and
    step)."""
    blocks = []
    for b in damped.blocks:
        if isinstance(b, linops.Kronecker):
            blocks.append(linops.Kronecker(*(inverse_factor(F) for F in b.factors)))
        else:
            blocks.append(inverse_factor(b))
    out = linops.BlockDiag(*blocks)
    out._tags = frozenset({"self_adjoint", "psd"})
    return out
