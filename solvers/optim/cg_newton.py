"""``CGNewton``: Newton steps solved by CG on blocks of the curvature (bpexts' CGNewton)."""

from __future__ import annotations

import warnings

import torch

import linops

from ..cg import CG, cg
from ..result import NotConvergedError, NotConvergedWarning, check_on_failure
from ._base import (
    CurvatureOptimizer,
    in_unit_interval,
    non_negative,
    positive,
    positive_int_or_none,
)

__all__ = ["CGNewton"]

CURVATURES = ("ggn", "hessian", "pch-abs", "pch-clip")
BLOCKS = ("parameter", "layer", "full")
APPROXIMATIONS = ("exact", "kfra", "kflr")


class CGNewton(CurvatureOptimizer):
    """Newton steps ``θ ← θ + lr · d`` with ``((1 − α) C + α I) d = −g`` solved by CG on each
    block of the curvature ``C``.

    The update of the HBP tutorial (bpexts' ``CGNewton``, after Chen et al., BDA-PCH 2018).
    ``C`` is the curvature of the batch's loss ``loss_fn(model(X), y)``: the generalized
    Gauss-Newton matrix (``curvature="ggn"``, ``linops.curvature.GGN``) or the Hessian
    (``"hessian"``, ``linops.curvature.Hessian``), restricted to its diagonal blocks:

    - ``blocks="parameter"``: one block per parameter tensor (bpexts' choice: ``C_ww`` for a
      weight, ``C_bb`` for a bias);
    - ``blocks="layer"``: one block per module (a layer's weight and bias together);
    - ``blocks="full"``: the whole matrix, Hessian-free optimization (Martens 2010), with
      Levenberg-Marquardt adaptation of the damping on request (``adapt_damping``).

    The blocks are exact, not approximated: every block's CG runs as one column of a single
    product ``C [x_1 … x_m]`` (column ``j`` zero outside block ``j``, the product restricted
    to block ``j`` afterwards), so one CG iteration costs one curvature product with (at
    most) ``m`` columns, not ``m`` products; the columns of blocks whose CG has stopped drop
    out of the product. ``g`` and the model's outputs come from the operator's own
    forward pass. The positive-curvature Hessians ``"pch-abs"``/``"pch-clip"`` (BDA-PCH:
    the activations' second-order terms taken in absolute value or clipped at zero, so
    every block is PSD) come from ``linops.curvature.BlockDiagCurvature`` (blocks
    ``"parameter"`` or ``"layer"``); ``approximation="kflr"``/``"kfra"`` replace the exact GGN
    by its Kronecker factorization ``linops.curvature.KFAC(fisher="exact", kfra=...)`` (the
    tutorial's HBP layers use such batch-averaged approximations).

    Stopping rule, per block: ``‖b − A d‖ ≤ cg_tol·‖b‖ + cg_atol`` with ``b = −g`` restricted
    to the block, or ``cg_maxiter`` iterations. A block whose CG stops otherwise is reported:
    ``NotConvergedWarning`` naming the blocks (``on_failure="warn"``, the default), an
    exception (``"raise"``, before any parameter changes) or nothing (``"ignore"``), and
    always in ``opt.last``. A Hessian block with negative curvature (``pᵀ A p ≤ 0`` in CG,
    ``A`` not positive definite) keeps CG's last iterate, which is a descent direction, or
    no step when that happens at its first iteration.

    Args:
        model: the ``nn.Module`` to train (in eval mode if it has dropout or batch norm).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``.
        lr: the step size ``lr`` (> 0). Per group.
        alpha: ``α`` in [0, 1], the weight of the identity (1: gradient descent). Per group;
            a block's parameters must share it.
        cg_tol, cg_atol: CG's relative and absolute tolerances (≥ 0). Per group (as alpha).
        cg_maxiter: at most this many CG iterations per step (None: 10 × the number of
            parameters).
        curvature: ``"ggn"``, ``"hessian"``, ``"pch-abs"`` or ``"pch-clip"``.
        blocks: ``"parameter"``, ``"layer"`` or ``"full"``.
        approximation: ``"exact"``, ``"kflr"`` or ``"kfra"`` (with ``curvature="ggn"``).
        adapt_damping: with ``blocks="full"``, adapt ``α`` after each step by
            Levenberg-Marquardt's rule on ``λ = α / (1 − α)``: with the reduction ratio
            ``ρ = (L(θ + δ) − L(θ)) / (gᵀδ + ½ δᵀ C δ)`` of the step ``δ``, ``λ ← 3λ/2`` if
            ``ρ < 1/4`` and ``λ ← 2λ/3`` if ``ρ > 3/4``. Costs one forward pass (``L(θ + δ)``
            on the batch) and one product (``C δ``) per step. The adapted ``α`` is written
            into the groups (so ``state_dict`` keeps it).
        params: None (every trainable parameter), parameters of ``model``, or groups.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` for a block whose CG did not
            converge.
        allow_train_mode: step even with dropout or batch norm in training mode.
        process_group: a ``torch.distributed`` process group: each rank steps on its shard
            of the batch and the curvature (every operator above takes ``process_group=``:
            one all-reduce per product, of all the blocks' columns at once), the loss and
            the gradient are those of the union of the shards; CG then runs identically on
            every rank, and ``adapt_damping``'s new loss is reduced the same way (one
            all-reduce). ``outputs`` are this rank's. None: one process.

    The defaults are the tutorial's: ``lr=0.1``, ``alpha=0.02``, ``cg_tol=0.1``,
    ``cg_atol=0``, ``cg_maxiter=50``.

    ``opt.last``: ``blocks`` (the block names), ``iterations`` (CG iterations per block),
    ``residuals`` (final relative residual per block), ``converged`` (per block),
    ``negative_curvature`` (names of the blocks that met it), ``solutions`` (the CG
    records, one per distinct CG setting), ``products`` (curvature products in the
    step, each with one column per block), ``grad_norm``, ``step_norm`` ``‖d‖``,
    ``directional_derivative`` ``gᵀd``, ``curvature`` (the operator's repr); with
    ``adapt_damping`` also ``rho`` and ``alpha`` (the new α).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from solvers.optim import CGNewton
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Linear(4, 3)
        >>> X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> opt = CGNewton(model, nn.CrossEntropyLoss(), lr=0.5, alpha=0.02, cg_tol=1e-3)
        >>> losses = [opt.step((X, y))[0].item() for _ in range(5)]
        >>> losses[-1] < losses[0], opt.last["blocks"], opt.last["converged"]
        (True, ['weight', 'bias'], [True, True])
    """

    _checks = {"lr": positive, "alpha": in_unit_interval, "cg_tol": non_negative,
               "cg_atol": non_negative, "cg_maxiter": positive_int_or_none}

    def __init__(self, model, loss_fn, lr: float = 0.1, alpha: float = 0.02,
                 cg_tol: float = 0.1, cg_atol: float = 0.0, cg_maxiter: int | None = 50, *,
                 curvature: str = "ggn", blocks: str = "parameter",
                 approximation: str = "exact", adapt_damping: bool = False, params=None,
                 on_failure: str = "warn", allow_train_mode: bool = False,
                 process_group=None):
        for name, value, allowed in (("curvature", curvature, CURVATURES),
                                     ("blocks", blocks, BLOCKS),
                                     ("approximation", approximation, APPROXIMATIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {value!r}.")
        if curvature in ("pch-abs", "pch-clip") and blocks == "full":
            raise ValueError(f"curvature={curvature!r} is block-diagonal by definition (the "
                             "positive-curvature Hessian of each block): use "
                             "blocks='parameter' or 'layer'.")
        if approximation != "exact" and curvature != "ggn":
            raise ValueError(f"approximation={approximation!r} factorizes the GGN: use it "
                             f"with curvature='ggn' (got {curvature!r}).")
        if not isinstance(adapt_damping, bool):
            raise TypeError(f"adapt_damping must be True or False; got {adapt_damping!r}.")
        if adapt_damping and blocks != "full":
            raise ValueError("adapt_damping=True adapts the damping of one system for all "
                             "parameters: use it with blocks='full' (Hessian-free).")
        self.curvature = curvature
        self.blocks = blocks
        self.approximation = approximation
        self.adapt_damping = adapt_damping
        self.on_failure = check_on_failure(on_failure, "on_failure")
        super().__init__(model, loss_fn, params,
                         dict(lr=lr, alpha=alpha, cg_tol=cg_tol, cg_atol=cg_atol,
                              cg_maxiter=cg_maxiter),
                         allow_train_mode=allow_train_mode, process_group=process_group)
        if adapt_damping:
            bad = [g["alpha"] for g in self.param_groups if not 0 < g["alpha"] < 1]
            if bad:
                raise ValueError(f"adapt_damping needs 0 < alpha < 1 (λ = α/(1 − α) is "
                                 f"adapted multiplicatively); got alpha={bad[0]}.")

    # ------------------------------------------------------------------ blocks
    def _block_list(self, chosen):
        """[(name, [indices into chosen], group settings)], in the model's order."""
        if self.blocks == "parameter":
            keys = [n for n, _, _ in chosen]
        elif self.blocks == "layer":
            keys = [n.rpartition(".")[0] or "(model)" for n, _, _ in chosen]
        else:
            keys = ["full"] * len(chosen)
        order: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            order.setdefault(k, []).append(i)
        out = []
        for name, idx in order.items():
            settings = {tuple(chosen[i][2][k] for k in ("alpha", "cg_tol", "cg_atol",
                                                        "cg_maxiter")) for i in idx}
            if len(settings) > 1:
                members = [chosen[i][0] for i in idx]
                raise ValueError(
                    f"The parameters {members} form one block ({self.blocks!r}) but their "
                    "groups set different alpha / cg_tol / cg_atol / cg_maxiter: one system "
                    "needs one setting. Give them the same values, or use blocks='parameter'."
                )
            out.append((name, idx, settings.pop()))
        return out

    # ------------------------------------------------------------------ the step
    def _curvature(self, X, y, named):
        """The curvature operator of the batch, in ``named``'s flat layout."""
        cv = linops.curvature
        group = self.process_group
        if self.approximation != "exact":
            return cv.KFAC(self.model, self.loss_fn, (X, y), fisher="exact",
                           kfra=self.approximation == "kfra", params=named,
                           process_group=group)
        if self.curvature in ("pch-abs", "pch-clip"):
            return cv.BlockDiagCurvature(self.model, self.loss_fn, (X, y),
                                         curvature=self.curvature,
                                         blocks="layer" if self.blocks == "layer"
                                         else "parameter", params=named,
                                         process_group=group)
        kind = cv.GGN if self.curvature == "ggn" else cv.Hessian
        return kind(self.model, self.loss_fn, (X, y), params=named,
                    allow_train_mode=self.allow_train_mode, process_group=group)

    def _update(self, chosen, batch):
        X, y = batch
        named = {n: p for n, p, _ in chosen}
        C = self._curvature(X, y, named)
        loss, g = C.loss, C.gradient
        outputs, extra = self._outputs(C, X)
        blocks = self._block_list(chosen)
        n, m, dev, dt = g.shape[0], len(blocks), g.device, g.dtype
        sizes = [p.numel() for _, p, _ in chosen]
        starts = [0]
        for s in sizes:
            starts.append(starts[-1] + s)
        mask = torch.zeros(n, m, dtype=torch.bool, device=dev)
        for j, (_, idx, _) in enumerate(blocks):
            for i in idx:
                mask[starts[i]:starts[i + 1], j] = True
        alpha = torch.tensor([s[0] for _, _, s in blocks], dtype=dt, device=dev)
        negative = torch.zeros(m, dtype=torch.bool, device=dev)
        counter = {"products": 0}
        B_all = torch.where(mask, -g[:, None], 0)
        D = torch.zeros(n, m, dtype=dt, device=dev)
        iterations, residuals, converged, solutions = [0] * m, [0.0] * m, [True] * m, []
        # the columns with one CG setting run in one CG (usually all of them)
        settings = {}
        for j, (_, _, s) in enumerate(blocks):
            settings.setdefault(s[1:], []).append(j)
        for (tol, atol, maxiter), cols in settings.items():
            cols_t = torch.tensor(cols, device=dev)
            mk, a = mask[:, cols_t], alpha[cols_t]

            def matmat(P, mk=mk, a=a, cols_t=cols_t):
                # CG zeroes the directions of the blocks that have converged: multiply only
                # the live columns (a block that converges early stops costing products)
                live = (P != 0).any(0)
                if bool(live.all()):
                    CP = C @ P
                else:
                    CP = torch.zeros_like(P)
                    idx = live.nonzero().squeeze(1)
                    if idx.numel():
                        CP[:, idx] = C @ P[:, idx]
                counter["products"] += 1
                AP = torch.where(mk, (1 - a) * CP, 0) + a * P
                pAp, pp = (P * AP).sum(0), (P * P).sum(0)
                negative[cols_t] |= (pp > 0) & ~(pAp > 0)
                return AP

            B = B_all[:, cols_t]
            alg = CG(tol=tol, atol=atol, max_iters=maxiter, on_failure="ignore")
            sol = cg(matmat, B, alg)
            solutions.append(sol)
            D[:, cols_t] = torch.where(mk, sol.value, 0)
            bnorm = torch.linalg.vector_norm(B, dim=0).cpu().double()
            final = sol.residuals[-1]
            ok = final * torch.where(bnorm > 0, bnorm, 1.0) <= tol * bnorm + atol
            ok &= torch.isfinite(final)
            for c, j in enumerate(cols):
                iterations[j] = int(sol.info.get("column_iterations", [sol.iterations] * len(
                    cols))[c])
                residuals[j] = float(final[c])
                converged[j] = bool(ok[c]) and not bool(negative[j])
        d = D.sum(1)
        names = [b[0] for b in blocks]
        neg_names = [names[j] for j in range(m) if bool(negative[j])]
        failed = [names[j] for j in range(m) if not converged[j]]
        last = dict(
            blocks=names, iterations=iterations, residuals=residuals, converged=converged,
            negative_curvature=neg_names, solutions=solutions,
            grad_norm=float(torch.linalg.vector_norm(g)),
            step_norm=float(torch.linalg.vector_norm(d)),
            directional_derivative=float(g @ d), curvature=repr(C), extra_forward=extra,
        )
        if failed:
            self._report(failed, neg_names, last)
        if self.adapt_damping:
            # the model's decrease needs C δ at the old parameters: before the update (the
            # operator reads the parameters' values when it multiplies)
            lrs = torch.cat([torch.full((p.numel(),), grp["lr"], dtype=dt, device=dev)
                             for _, p, grp in chosen])
            delta = lrs * d
            model_decrease = float(g @ delta + 0.5 * delta @ (C @ delta))
            counter["products"] += 1
        self._write(chosen, d)
        if self.adapt_damping:
            self._adapt(chosen, model_decrease, loss, X, y, C.device, last)
        last["products"] = counter["products"]
        return loss, outputs, last

    def _report(self, failed, neg_names, last):
        if self.on_failure == "ignore":
            return
        parts = []
        if neg_names:
            parts.append(
                f"met non-positive curvature pᵀAp ≤ 0 in block(s) {neg_names} (the "
                f"{self.curvature} block is indefinite there): those blocks took CG's last "
                "iterate, or no step if it was the first; use curvature='ggn' (PSD) or a "
                "larger alpha"
            )
        other = [b for b in failed if b not in neg_names]
        if other:
            parts.append(
                f"did not reach ‖b − A d‖ ≤ cg_tol·‖b‖ + cg_atol in block(s) {other} within "
                "cg_maxiter iterations (the step uses the last iterate); raise cg_maxiter, "
                "loosen cg_tol or raise alpha"
            )
        msg = (f"CGNewton: CG {'; and it '.join(parts)}. Per-block iterations and residuals "
               "are in opt.last.")
        if self.on_failure == "raise":
            raise NotConvergedError(msg, last["solutions"][0] if last["solutions"] else None)
        warnings.warn(msg, NotConvergedWarning, stacklevel=4)

    def _adapt(self, chosen, model_decrease, loss, X, y, device, last) -> None:
        new_loss = float(self._loss_and_gradient(X, y, None)[0])  # over every shard
        alpha = chosen[0][2]["alpha"]
        rho = float("nan")
        if model_decrease < 0:
            rho = (new_loss - float(loss)) / model_decrease
            lam = alpha / (1 - alpha)
            if rho < 0.25:
                lam *= 1.5
            elif rho > 0.75:
                lam *= 2 / 3
            lam = min(max(lam, 1e-8), 1e8)  # keeps 0 < α < 1 in floating point
            alpha = lam / (1 + lam)
            for group in self.param_groups:
                group["alpha"] = alpha
        last["rho"], last["alpha"] = rho, alpha
