"""``GaussNewton``: damped Gauss-Newton and natural-gradient steps, as an optimizer."""

from __future__ import annotations

import dataclasses

import torch

import linops
from linops import PSD, Diagonal, I_like

from ..cg import CG
from ..curvature_preconditioners import PRECONDITIONER_KINDS, curvature_preconditioner
from ..inverse import InverseOperator, inv
from ._base import CurvatureOptimizer, positive

__all__ = ["GaussNewton"]


class GaussNewton(CurvatureOptimizer):
    """Damped Gauss-Newton (or natural-gradient) steps on each batch.

    ``θ ← θ − lr · (C + λ I)⁻¹ g``, the solve by ``alg`` (CG by default) on the lazy
    curvature ``C`` of the batch's loss, never formed: ``C`` is the generalized Gauss-Newton
    matrix ``linops.curvature.GGN`` of ``loss_fn(model(X), y)`` (``fisher=False``) or its
    Fisher (``fisher=True``: the natural gradient). ``g`` is the batch loss's gradient.
    Both come from one forward pass, the operator's (``C.loss``, ``C.gradient``).

    These are the steps of CoLA's Gauss-Newton notebook (``solvers/demo.py``,
    ``notebooks/gauss_newton.ipynb``). Its Gauss-Newton step uses the GGN of
    ``n_classes × mean cross-entropy``, ``c·G``: since ``(c G + λ I)⁻¹ = (G + (λ/c) I)⁻¹ / c``
    and CG's iterates scale the same way, it is ``GaussNewton(lr=lr/c, damping=λ/c)``. Its
    natural-gradient step uses the Fisher of the categorical distributions of the logits
    divided by N (``FIM / N``, the Fisher of the mean loss), which is ``fisher=True``.

    For the supported losses (cross-entropy, binary cross-entropy with logits, squared error
    as a Gaussian of variance 1/2) the Fisher of the model's predictive distribution *is*
    the GGN, so ``fisher=True`` builds the same operator unless ``mc_samples`` asks for the
    Monte-Carlo Fisher (``linops.curvature.MCFisher``, ``mc_samples`` labels drawn from the
    model per sample, fresh draws at every step).

    Args:
        model: the ``nn.Module`` to train (in eval mode if it has dropout or batch norm).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``.
        lr: the step size (> 0; per group).
        damping: ``λ`` (> 0; per group: a group's entries of the diagonal damping).
        fisher: natural gradient (True) or Gauss-Newton (False).
        mc_samples: with ``fisher=True``, None for the exact Fisher, an integer ``S`` for
            the Monte-Carlo Fisher.
        seed: the draws' seed with ``mc_samples``: step ``t`` (counted from 1) uses
            ``seed + t − 1``; None draws each step's seed from torch's global generator
            (so ``torch.manual_seed`` makes a run repeatable).
        alg: how to solve: ``CG(tol=1e-3, max_iters=20)`` by default (CoLA's notebook's
            setting); anything ``solvers.inv`` takes (``Auto``, ``MINRES``, ``Cholesky``,
            ...). CG stops per ``‖b − A x‖ ≤ tol·‖b‖ + atol``; a solve that stops
            otherwise warns (``NotConvergedWarning``) unless ``alg.on_failure`` says not to.
        params: None (every trainable parameter of ``model``), parameters of ``model``, or
            parameter groups with their own ``lr`` and ``damping``.
        preconditioner: None, or a curvature preconditioner for the solve: one of
            ``solvers.PRECONDITIONER_KINDS`` (``"kfac"``, ``"kfac-mc"``, ``"ekfac"``,
            ``"diag"``, ``"diag-mc"``), ``inv(C̃ + μ I)`` of that approximation ``C̃`` of
            the batch's curvature, built by ``solvers.curvature_preconditioner``; ``alg``
            must take a preconditioner (CG, the default, or ``Auto``).
        refresh_every: rebuild the preconditioner every this many steps (1: every step);
            the steps in between reuse the last one, as K-FAC reuses its inverses. A stale
            preconditioner is still a fixed symmetric positive-definite matrix, so the
            solve's answer and its stopping rule are unchanged; only its speed depends on
            how well the preconditioner fits the current curvature.
        preconditioner_damping: μ > 0, the preconditioner's damping (None: ``damping``).
            It changes the number of iterations, not the solution; on the reference MLP a
            μ of 10·λ took fewer iterations than λ (``benchmarks/preconditioners_bench.py``).
        allow_train_mode: step even with dropout or batch norm in training mode.
        process_group: a ``torch.distributed`` process group: each rank steps on its shard
            of the batch and the curvature, loss and gradient are those of the union of the
            shards (see ``linops.curvature.CurvatureOperator``; with ``seed=None`` each step's
            seed is drawn on rank 0 and shared); None: one process.

    ``opt.step((X, y))`` returns ``(loss, outputs)`` before the update. ``opt.last``:
    ``solution`` (the solver's record, or None for a structural solve), ``iterations``,
    ``converged``, ``grad_norm`` ``‖g‖``, ``step_norm`` ``‖(C + λI)⁻¹ g‖``,
    ``directional_derivative`` ``−gᵀ(C + λI)⁻¹ g``, ``curvature`` (the operator's repr),
    ``seed`` (with ``mc_samples``) and, with ``preconditioner=``,
    ``preconditioner_refreshed`` (whether this step rebuilt it).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from solvers.optim import GaussNewton
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> X, y = torch.randn(32, 2), torch.randint(0, 3, (32,))
        >>> opt = GaussNewton(model, nn.CrossEntropyLoss(), lr=1.0, damping=1e-2)
        >>> losses = [opt.step((X, y))[0].item() for _ in range(5)]
        >>> losses[-1] < losses[0], opt.last["converged"]
        (True, True)
    """

    _checks = {"lr": positive, "damping": positive}

    def __init__(self, model, loss_fn, lr: float = 1.0, damping: float = 1e-3, *,
                 fisher: bool = False, mc_samples: int | None = None, seed: int | None = None,
                 alg=None, params=None, preconditioner: str | None = None,
                 refresh_every: int = 1, preconditioner_damping: float | None = None,
                 allow_train_mode: bool = False, process_group=None):
        if not isinstance(fisher, bool):
            raise TypeError(f"fisher must be True or False; got {fisher!r}.")
        if mc_samples is not None:
            if not fisher:
                raise ValueError("mc_samples applies to the Monte-Carlo Fisher: pass "
                                 "fisher=True with it (the GGN is exact).")
            if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
                raise ValueError(f"mc_samples must be None or a positive integer; got "
                                 f"{mc_samples!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be None or an integer; got {seed!r}.")
        self.fisher = fisher
        self.mc_samples = mc_samples
        self.seed = seed
        self.alg = CG(tol=1e-3, max_iters=20) if alg is None else alg
        if preconditioner is not None:
            if preconditioner not in PRECONDITIONER_KINDS:
                raise ValueError(f"preconditioner must be None or one of "
                                 f"{list(PRECONDITIONER_KINDS)}; got {preconditioner!r}.")
            if not (dataclasses.is_dataclass(self.alg)
                    and "preconditioner" in {f.name for f in dataclasses.fields(self.alg)}):
                raise ValueError(f"preconditioner= needs an alg that takes one (CG, Auto, "
                                 f"MINRES); got {type(self.alg).__name__}.")
            if self.alg.preconditioner is not None:
                raise ValueError("alg has a preconditioner of its own and preconditioner= "
                                 "asks for a curvature preconditioner: pass one of them.")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or (
                refresh_every < 1):
            raise ValueError(f"refresh_every must be a positive integer; got "
                             f"{refresh_every!r}.")
        if preconditioner_damping is not None:
            preconditioner_damping = positive("preconditioner_damping", preconditioner_damping)
        self.preconditioner = preconditioner
        self.refresh_every = refresh_every
        self.preconditioner_damping = preconditioner_damping
        self._preconditioner = None
        self._preconditioner_layout = None
        super().__init__(model, loss_fn, params, dict(lr=lr, damping=damping),
                         allow_train_mode=allow_train_mode, process_group=process_group)
        # check alg now, not at the first step
        inv(PSD(Diagonal(torch.ones(1))), alg=self.alg)

    def _update(self, chosen, batch):
        X, y = batch
        named = {n: p for n, p, _ in chosen}
        seed = None
        if self.mc_samples is not None:
            seed = self._step_seed(self.seed)
            C = linops.curvature.MCFisher(self.model, self.loss_fn, (X, y), params=named,
                                          mc_samples=self.mc_samples, seed=seed,
                                          allow_train_mode=self.allow_train_mode,
                                          process_group=self.process_group)
        else:
            C = linops.curvature.GGN(self.model, self.loss_fn, (X, y), params=named,
                                     allow_train_mode=self.allow_train_mode,
                                     process_group=self.process_group)
        loss, g = C.loss, C.gradient
        outputs, extra = self._outputs(C, X)
        dampings = {g_["damping"] for _, _, g_ in chosen}
        if len(dampings) == 1:
            A = PSD(C + dampings.pop() * I_like(C))
        else:
            d = torch.cat([torch.full((p.numel(),), grp["damping"], dtype=C.dtype,
                                      device=C.device) for _, p, grp in chosen])
            A = PSD(C + Diagonal(d))
        alg, refreshed = self.alg, None
        if self.preconditioner is not None:
            # rebuilt every refresh_every steps, and whenever the parameters stepped
            # change (a group frozen or added): the cached one has their layout
            layout = tuple((n, tuple(p.shape)) for n, p, _ in chosen)
            refreshed = (self._preconditioner is None or layout != self._preconditioner_layout
                         or (self.steps - 1) % self.refresh_every == 0)
            if refreshed:
                mu = self.preconditioner_damping
                if mu is None:
                    if len({g_["damping"] for _, _, g_ in chosen}) != 1:
                        raise ValueError(
                            "The parameter groups have different dampings: pass "
                            "preconditioner_damping= (one μ for the preconditioner).")
                    mu = chosen[0][2]["damping"]
                mc = self.preconditioner.endswith("-mc")
                self._preconditioner = curvature_preconditioner(
                    C, self.preconditioner, mu,
                    seed=self._step_seed(self.seed) if mc else 0)
                self._preconditioner_layout = layout
            alg = dataclasses.replace(alg, preconditioner=self._preconditioner)
        Ainv = inv(A, alg=alg)
        step = Ainv @ g
        sol = Ainv.solution if isinstance(Ainv, InverseOperator) else None
        self._write(chosen, step, sign=-1.0)
        last = dict(
            solution=sol,
            iterations=None if sol is None else sol.iterations,
            converged=True if sol is None else sol.converged,
            grad_norm=float(torch.linalg.vector_norm(g)),
            step_norm=float(torch.linalg.vector_norm(step)),
            directional_derivative=float(-(g @ step)),
            curvature=repr(C),
            seed=seed,
            extra_forward=extra,
        )
        if refreshed is not None:
            last["preconditioner_refreshed"] = refreshed
        return loss, outputs, last
